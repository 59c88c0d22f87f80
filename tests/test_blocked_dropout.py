"""The blocked backend's attention dropout is the hashed mask (dropout.py): against the dense reference given the
same [B, H, N, N] keep mask, in float64, forward and gradients, for dense rows, sparse rows read in place (eager) and
copied (the traced form), and replayed by activation checkpointing."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from bigbird_ja.attention import RelativePositionSpec, blocked_attention, layout_for, reference_attention
from bigbird_ja.attention.dropout import AttentionDropout, keep_mask
from conftest import tiny_config

P = 0.3

# (DENSE_MARGIN, traced): which rows and which path
PATHS = {"dense rows": (1e9, False), "sparse rows, eager": (0.0, False), "sparse rows, traced": (0.0, True)}


def _inputs(length: int, seed: int):
    config = tiny_config(max_position_embeddings=256, position_buckets=32)  # random blocks live at 131 tokens
    B, H, D, S = 3, config.num_attention_heads, config.attention_head_size, config.relative_span
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)

    tensors = [rand(B, H, length, D) for _ in range(3)] + [rand(H, 2 * S, D), rand(H, 2 * S, D)]
    padding = torch.ones(B, length, dtype=torch.bool)
    padding[1, length // 2:] = False
    padding[2, 1:] = False
    return config, tensors, padding


def _blocked(config, layer, tensors, padding):
    q, k, v, pos_key, pos_query = tensors
    return blocked_attention(q, k, v, layout_for(config, layer, q.shape[2]), padding, 0.37, pos_key, pos_query,
                             RelativePositionSpec.from_config(config), dropout_p=P, training=True)


def _grads(out, tensors):
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return torch.autograd.grad((out * weights).sum(), tensors)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("length", [37, 131])
def test_blocked_dropout_is_the_hashed_mask_of_the_reference(monkeypatch, path, length):
    from bigbird_ja.attention import blocked

    margin, traced = PATHS[path]
    monkeypatch.setattr(blocked, "DENSE_MARGIN", margin)
    if traced:
        monkeypatch.setattr(blocked.torch.compiler, "is_compiling", lambda: True)
    config, tensors, padding = _inputs(length, seed=length)
    B, H = tensors[0].shape[:2]
    for layer in range(config.num_hidden_layers):
        torch.manual_seed(layer)
        out = _blocked(config, layer, tensors, padding)
        torch.manual_seed(layer)
        drop = AttentionDropout.draw(P, True)  # the draw the call made
        q, k, v, pos_key, pos_query = tensors
        ref = reference_attention(q, k, v, layout_for(config, layer, length).token_mask(length), padding, 0.37,
                                  pos_key, pos_query, RelativePositionSpec.from_config(config), dropout_p=P,
                                  training=True, dropout_mask=keep_mask(drop, B, H, length))
        print(f"{path}, layer {layer}: max |blocked - reference| = {(out - ref).abs().max().item():.2e}")
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        for name, g, ref_g in zip("q k v pos_key pos_query".split(), _grads(out, tensors), _grads(ref, tensors)):
            torch.testing.assert_close(g, ref_g, rtol=0, atol=1e-10, msg=lambda m: f"grad {name}: {m}")
    # something was dropped, and not everything: the comparison above is not of two undropped outputs
    torch.manual_seed(0)
    undropped = blocked_attention(*tensors[:3], layout_for(config, 0, length), padding, 0.37, *tensors[3:],
                                  RelativePositionSpec.from_config(config))
    torch.manual_seed(0)
    assert not torch.allclose(_blocked(config, 0, tensors, padding), undropped)


@pytest.mark.parametrize("path", ["dense rows", "sparse rows, eager"])
def test_activation_checkpointing_replays_the_dropout_mask(monkeypatch, path):
    from bigbird_ja.attention import blocked

    monkeypatch.setattr(blocked, "DENSE_MARGIN", PATHS[path][0])
    config, tensors, padding = _inputs(131, seed=7)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(3)
        if checkpointed:
            out = checkpoint(lambda *t: _blocked(config, 1, t, padding), *tensors, use_reentrant=False)
        else:
            out = _blocked(config, 1, tensors, padding)
        grads.append(_grads(out, tensors))
    for name, g, ref_g in zip("q k v pos_key pos_query".split(), *grads):
        torch.testing.assert_close(g, ref_g, rtol=0, atol=0, msg=lambda m: f"grad {name}: {m}")
