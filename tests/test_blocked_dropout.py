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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("key_heads", [1, 3])
def test_the_fused_softmax_and_dropout_backward_is_their_gradient(monkeypatch, dtype, native, key_heads):
    """dropout.softmax_dropout_backward_ (SlotAttention's backward: the native pass, or PyTorch's steps) writes into
    the dropped probabilities' gradient that of the scores: autograd's through softmax and hashed_dropout, with the
    call's mask or no dropout, on rows and keys of odd sizes."""
    from bigbird_ja.attention import dropout as D

    if not native:
        monkeypatch.setenv("BIGBIRD_JA_CPU_KERNELS", "0")
    elif D.NATIVE is None:
        pytest.skip("no native library")
    gen = torch.Generator().manual_seed(key_heads)
    scores = (3 * torch.randn(2, 3, 5, 7, 53, generator=gen, dtype=torch.float64)).requires_grad_()
    query_pos = torch.randperm(5 * 7, generator=gen).view(5, 7)
    key_pos = torch.randint(0, 500, (key_heads, 5, 53), generator=gen)
    for drop in (None, AttentionDropout(P, 987654321)):
        probs = torch.softmax(scores, dim=-1)
        dropped = probs if drop is None else D.hashed_dropout(probs, query_pos, key_pos, drop)
        grad = torch.randn(dropped.shape, generator=gen, dtype=torch.float64)
        (expected,) = torch.autograd.grad(dropped, scores, grad)
        got = D.softmax_dropout_backward_(grad.to(dtype), probs.detach().to(dtype), query_pos, key_pos, drop)
        tol = 1e-14 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=tol * expected.abs().max().item())
        assert D.native_supports(got) == native


def test_sparse_rows_in_training_keep_one_score_buffer_and_make_three(monkeypatch):
    """The eager sparse rows (float32/float64) are one node (blocked_slots.SlotAttention): of the [B, H, nr, bs,
    K*bs] score-sized buffers, one is kept for the backward (the probabilities, not also the dropped ones) and three
    are made per forward and backward (the scores, taken over by the softmax; the dropped probabilities; the
    backward's one), where scores, softmax, dropout and context as separate nodes kept two and made six."""
    from bigbird_ja.attention import blocked

    monkeypatch.setattr(blocked, "DENSE_MARGIN", 0.0)
    config, tensors, padding = _inputs(131, seed=5)
    q = tensors[0]
    layout = layout_for(config, 0, 131)
    B, H, bs = q.shape[0], q.shape[1], layout.block_size
    nr, K = layout.num_blocks - layout.num_global_blocks, layout.key_blocks.shape[-1]
    score_numel = B * H * nr * bs * K * bs
    kept = []

    def pack(t):
        if t.numel() == score_numel:
            kept.append(t.data_ptr())
        return t

    with torch.profiler.profile(profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = _blocked(config, 0, tensors, padding)
        _grads(out, tensors)
    assert len(set(kept)) == 1, len(set(kept))
    made = [e for e in prof.events() if e.self_cpu_memory_usage == score_numel * q.element_size()]
    assert len(made) == 3, [e.name for e in made]


def test_a_second_derivative_through_the_native_nodes_is_refused_not_wrong(monkeypatch):
    """SlotAttention and the native terms' node (eager CPU training) have first derivatives only: differentiating
    their gradients (create_graph=True, then backward) raises instead of returning second derivatives that would
    miss the native passes' part."""
    from bigbird_ja.attention import blocked, cpu_kernels

    if cpu_kernels.relative_terms() is None:
        pytest.skip("no native library")
    monkeypatch.setattr(blocked, "DENSE_MARGIN", 0.0)
    config, tensors, padding = _inputs(131, seed=9)
    out = _blocked(config, 0, tensors, padding)
    (grad_q,) = torch.autograd.grad(out.square().sum(), tensors[:1], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_q.sum().backward()
