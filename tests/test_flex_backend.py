"""The FlexAttention backend against the dense reference in float64: forward and gradients on odd lengths with
random padding (a fully padded row included), several heads, each combination of relative terms; its BlockMask tile
lists against the layout; batch invariance; the model with attention_backend="flex" against "blocked".

Torch runs Flex uncompiled on CPU (its dense math) and refuses a CPU backward at the call's entry only; the
`cpu_backward` fixture lifts that check so the same math's autograd (the joint graph of our score_mod and mask_mod,
gradients of the captured relative products included) is checked here against the reference."""

import pytest
import torch

import bigbird_ja
from bigbird_ja.attention import RelativePositionSpec, disentangled_attention, layout_for, resolve_backend
from bigbird_ja.attention.flex_backend import flex_block_mask
from conftest import tiny_config

flex_attention_module = pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.fixture
def cpu_backward(monkeypatch):
    monkeypatch.setattr(flex_attention_module, "_validate_device", lambda *tensors: None)


def make_inputs(config, length, seed, batch=3):
    gen = torch.Generator().manual_seed(seed)
    H, D, S = config.num_attention_heads, config.attention_head_size, config.relative_span

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)

    q, k, v = rand(batch, H, length, D), rand(batch, H, length, D), rand(batch, H, length, D)
    pos_key, pos_query = rand(H, 2 * S, D), rand(H, 2 * S, D)
    padding = torch.ones(batch, length, dtype=torch.bool)
    padding[1, int(torch.randint(1, length, (1,), generator=gen)):] = False
    padding[2] = False  # no key at all: the reference gives zeros
    return q, k, v, pos_key, pos_query, padding


def run(backend, config, layer, inputs, terms):
    q, k, v, pos_key, pos_query, padding = inputs
    out = disentangled_attention(
        q, k, v, layout_for(config, layer, q.shape[2]), padding, scale=0.37,
        pos_key=pos_key if "c2p" in terms else None, pos_query=pos_query if "p2c" in terms else None,
        rel_spec=RelativePositionSpec.from_config(config), backend=backend)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), [q, k, v, pos_key, pos_query], allow_unused=True)
    return out, grads


SPARSITIES = {
    "bigbird": dict(),
    "sparse": dict(num_window_blocks=1, num_global_blocks=0, num_random_blocks=3),
    "dense-ish": dict(num_window_blocks=5, num_global_blocks=2, num_random_blocks=1),
}


# The terms shape only the score_mod and the sparsity only the mask: each is varied against the other's default.
@pytest.mark.parametrize("sparsity, terms", [("bigbird", "c2p+p2c"), ("bigbird", "c2p"), ("bigbird", "p2c"),
                                             ("bigbird", "none"), ("sparse", "c2p+p2c"), ("dense-ish", "c2p+p2c")])
def test_flex_matches_reference_in_float64_forward_and_backward(sparsity, terms, cpu_backward):
    config = tiny_config(**SPARSITIES[sparsity])
    for length, layer in ((37, 1), (131, 2)):  # odd lengths; layers draw different random blocks per head
        inputs = make_inputs(config, length, seed=length + layer)
        ref_out, ref_grads = run("reference", config, layer, inputs, terms)
        out, grads = run("flex", config, layer, inputs, terms)
        print(f"{sparsity} {terms} n={length}: max |flex - reference| = {(out - ref_out).abs().max().item():.2e}")
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
        assert out[2].abs().max() == 0  # the fully padded row
        for name, g, ref_g in zip("q k v pos_key pos_query".split(), grads, ref_grads):
            if ref_g is None:  # the term is off: no gradient on either side
                assert g is None or g.abs().max() == 0, name
            else:
                torch.testing.assert_close(g, ref_g, rtol=0, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("length, mask_block", [(37, 8), (131, 8), (131, 32), (200, 128)])
def test_flex_block_mask_lists_every_attended_tile_and_only_whole_ones_as_full(length, mask_block):
    """Compiled Flex reads only the listed tiles and skips mask_mod on full ones (the uncompiled math reads neither):
    every attended token pair lies in a listed tile, and a full tile is attended at every token pair."""
    config = tiny_config()
    _, _, _, _, _, padding = make_inputs(config, length, seed=length)
    layout = layout_for(config, 1, length)
    attended = layout.token_mask(length).unsqueeze(0) & padding[:, None, None, :]  # [B, H, N, N]
    block_mask = flex_block_mask(layout, padding, 3, length, torch.device("cpu"), mask_block=mask_block)
    nm = -(-length // mask_block)

    def listed(counts, indices):  # [B, H, nm, nm] bool from Flex's kv lists
        tiles = torch.zeros(*counts.shape, nm, dtype=torch.bool)
        for b, h, row in torch.cartesian_prod(*(torch.arange(s) for s in counts.shape)).tolist():
            tiles[b, h, row, indices[b, h, row, :counts[b, h, row]].long()] = True
        return tiles

    partial = listed(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = listed(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    assert not (partial & full).any()
    pad = nm * mask_block - length
    tiled = torch.nn.functional.pad(attended, (0, pad, 0, pad)).view(3, 4, nm, mask_block, nm, mask_block)
    any_pair = tiled.any(dim=5).any(dim=3)
    in_range = torch.nn.functional.pad(torch.ones(length, length, dtype=torch.bool), (0, pad, 0, pad))
    whole = (tiled | ~in_range.view(nm, mask_block, nm, mask_block)).all(dim=5).all(dim=3)
    assert not (any_pair & ~(partial | full)).any(), "an attended tile is not listed"
    assert not (full & ~whole).any(), "a full tile holds a masked pair"
    assert partial.any() and (full.any() or mask_block > config.block_size)  # coarse tiles here are never whole


def test_flex_rows_are_batch_invariant():
    """A sequence alone gives the same rows as inside a padded batch (row b alone == row b in the batch)."""
    config = tiny_config()
    q, k, v, pos_key, pos_query, padding = make_inputs(config, 131, seed=5)
    spec = RelativePositionSpec.from_config(config)
    with torch.no_grad():
        batched = disentangled_attention(q, k, v, layout_for(config, 1, 131), padding, 0.37, pos_key, pos_query, spec,
                                         backend="flex")
        for b in (0, 1):  # whole, padded
            n = int(padding[b].sum())
            alone = disentangled_attention(q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                           layout_for(config, 1, n), None, 0.37, pos_key, pos_query, spec,
                                           backend="flex")
            torch.testing.assert_close(alone[0], batched[b, :, :n], rtol=0, atol=1e-12)


def test_model_with_flex_equals_blocked_in_float64(cpu_backward):
    torch.manual_seed(0)
    config = tiny_config(num_hidden_layers=2)
    model = bigbird_ja.BigBirdJaModel(config).double().eval()
    input_ids = torch.randint(1, config.vocab_size, (2, 45))
    attention_mask = torch.ones(2, 45, dtype=torch.long)
    attention_mask[1, 30:] = 0
    outputs = {}
    for backend in ("blocked", "flex"):
        model.config.attention_backend = backend
        model.zero_grad()
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        (hidden * attention_mask[..., None]).pow(2).sum().backward()
        outputs[backend] = hidden.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
    print(f"max |flex - blocked| = {(outputs['flex'][0] - outputs['blocked'][0]).abs().max().item():.2e}")
    torch.testing.assert_close(outputs["flex"][0], outputs["blocked"][0], rtol=0, atol=1e-10)
    assert len(outputs["flex"][1]) == len(outputs["blocked"][1])
    for g, ref_g in zip(outputs["flex"][1], outputs["blocked"][1]):
        torch.testing.assert_close(g, ref_g, rtol=1e-9, atol=1e-10)


def test_flex_refuses_attention_dropout_in_training_naming_the_fix():
    config = tiny_config(attention_backend="flex", attention_probs_dropout_prob=0.1)
    model = bigbird_ja.BigBirdJaModel(config).train()
    with pytest.raises(ValueError, match="attention_probs_dropout_prob=0"), torch.no_grad():
        model(input_ids=torch.randint(1, config.vocab_size, (1, 20)))
    with torch.no_grad():  # evaluation has no dropout: it runs
        model.eval()(input_ids=torch.randint(1, config.vocab_size, (1, 20)))


def test_flex_backward_on_cpu_is_refused_naming_the_fix():
    config = tiny_config()
    q, k, v, pos_key, pos_query, padding = make_inputs(config, 20, seed=0)
    with pytest.raises(NotImplementedError, match="attention_backend='blocked'"):
        disentangled_attention(q, k, v, layout_for(config, 0, 20), padding, 0.37, pos_key, pos_query,
                               RelativePositionSpec.from_config(config), backend="flex")


def test_flex_is_chosen_only_when_asked():
    assert resolve_backend("flex", torch.device("cpu")) == "flex"
    assert resolve_backend("auto", torch.device("cpu")) != "flex"
    assert tiny_config(attention_backend="flex").attention_backend == "flex"
    with pytest.raises(ValueError, match="'flex'"):
        resolve_backend("flexx", torch.device("cpu"))
