"""Every backend against the dense reference in float64: odd lengths, random padding (a fully padded sequence
included), every head and layer, forward and gradients. The blocked backend's relative terms have two eager CPU forms,
the C kernel (cpu_kernels) and the pure-PyTorch reads: every test here runs with each (the `term_reads` fixture)."""

import pytest
import torch

from bigbird_ja.attention import RelativePositionSpec, disentangled_attention, layout_for, resolve_backend
from conftest import tiny_config

LENGTHS = [1, 5, 8, 37, 64, 65, 131]


@pytest.fixture(autouse=True, params=["c-kernel", "torch-reads"])
def term_reads(request, monkeypatch):
    """Runs the test with the C kernel's relative terms (where a compiler is) and again with the pure-PyTorch reads."""
    from bigbird_ja.attention import blocked, cpu_kernels

    if request.param == "torch-reads":
        monkeypatch.setattr(blocked, "relative_terms_kernel", lambda: None)
    elif cpu_kernels.relative_terms() is None:
        pytest.skip("the CPU kernel cannot be built here (no C compiler)")
    return request.param


def make_inputs(config, batch, length, seed, dtype=torch.float64, fully_padded_row=True):
    gen = torch.Generator().manual_seed(seed)
    H, D, S = config.num_attention_heads, config.attention_head_size, config.relative_span

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(True)

    q, k, v = rand(batch, H, length, D), rand(batch, H, length, D), rand(batch, H, length, D)
    pos_key, pos_query = rand(H, 2 * S, D), rand(H, 2 * S, D)
    padding = torch.ones(batch, length, dtype=torch.bool)
    if batch > 1:
        padding[1, int(torch.randint(1, length + 1, (1,), generator=gen)):] = False
    if fully_padded_row and batch > 2:
        padding[2] = False
    return q, k, v, pos_key, pos_query, padding


def run(backend, config, layer, inputs, use_c2p=True, use_p2c=True):
    q, k, v, pos_key, pos_query, padding = inputs
    out = disentangled_attention(
        q, k, v, layout_for(config, layer, q.shape[2]), padding, scale=0.37,
        pos_key=pos_key if use_c2p else None, pos_query=pos_query if use_p2c else None,
        rel_spec=RelativePositionSpec.from_config(config), backend=backend)
    # drawn on the CPU (the same values on every device), then placed beside the output
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64, device="cpu")
    weights = weights.to(out.device, out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), [q, k, v, pos_key, pos_query], allow_unused=True)
    return out, grads


def _assert_blocked_matches_reference(config, layer: int, length: int) -> None:
    """Blocked against the dense reference in float64 on fresh random inputs (padding included): output and every
    gradient within 1e-10."""
    inputs = make_inputs(config, 3, length, seed=length * 10 + layer)
    ref_out, ref_grads = run("reference", config, layer, inputs)
    out, grads = run("blocked", config, layer, inputs)
    print(f"layer {layer}: max |blocked - reference| = {(out - ref_out).abs().max().item():.2e}")
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    for name, g, ref_g in zip("q k v pos_key pos_query".split(), grads, ref_grads):
        torch.testing.assert_close(g, ref_g, rtol=0, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("sparsity", [dict(), dict(num_window_blocks=1, num_global_blocks=0, num_random_blocks=3),
                                      dict(num_window_blocks=5, num_global_blocks=2, num_random_blocks=1),
                                      dict(attention_type="full")])
def test_blocked_matches_reference_in_float64(length, sparsity):
    config = tiny_config(**sparsity)
    for layer in range(config.num_hidden_layers):
        _assert_blocked_matches_reference(config, layer, length)


@pytest.mark.parametrize("length", [65, 131])
@pytest.mark.parametrize("sparsity", [dict(), dict(num_window_blocks=1, num_global_blocks=0, num_random_blocks=3)])
def test_blocked_matches_reference_in_float64_with_every_random_block_live(length, sparsity):
    # At its own max_position_embeddings a model's layout holds every drawn random block (shorter inputs hold some)
    config = tiny_config(max_position_embeddings=length, **sparsity)
    for layer in range(config.num_hidden_layers):
        layout = layout_for(config, layer, length)
        assert layout.key_valid[..., -config.num_random_blocks:].all()
        _assert_blocked_matches_reference(config, layer, length)


@pytest.mark.parametrize("terms", [(True, False), (False, True), (False, False)])
def test_each_relative_term_alone(terms):
    config = tiny_config()
    inputs = make_inputs(config, 2, 77, seed=3)
    ref_out, ref_grads = run("reference", config, 1, inputs, *terms)
    out, grads = run("blocked", config, 1, inputs, *terms)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    for g, ref_g in zip(grads, ref_grads):
        if ref_g is None:
            assert g is None
        else:
            torch.testing.assert_close(g, ref_g, rtol=0, atol=1e-10)


def test_relative_terms_change_the_result():
    """Guards the comparisons above against a backend that ignores the position terms."""
    config = tiny_config()
    inputs = make_inputs(config, 2, 77, seed=4)
    with_terms, _ = run("blocked", config, 0, inputs)
    without, _ = run("blocked", config, 0, inputs, False, False)
    assert (with_terms - without).abs().max() > 1e-3


def test_padding_is_never_attended():
    config = tiny_config()
    q, k, v, pk, pq, padding = make_inputs(config, 2, 50, seed=5, fully_padded_row=False)
    padding[0, 30:] = False
    for backend in ("reference", "blocked"):
        args = (layout_for(config, 0, 50), padding, 0.5, pk, pq, RelativePositionSpec.from_config(config))
        out = disentangled_attention(q, k, v, *args, backend=backend)
        v2 = v.detach().clone()
        v2[0, :, 30:] = 1e6  # changing padded values must not move any output
        k2 = k.detach().clone()
        k2[0, :, 30:] = -7.0
        out2 = disentangled_attention(q, k2, v2, *args, backend=backend)
        torch.testing.assert_close(out2[0], out[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_has_no_nan_even_on_fully_padded_rows(dtype):
    config = tiny_config()
    inputs = make_inputs(config, 3, 45, seed=6, dtype=dtype)
    for backend in ("reference", "blocked"):
        out, grads = run(backend, config, 0, inputs)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert all(torch.isfinite(g).all() for g in grads)
        assert out[2].abs().max() == 0  # the fully padded sequence attends to nothing


def test_low_precision_stays_within_budget_of_float64():
    config = tiny_config()
    inputs64 = make_inputs(config, 2, 90, seed=7)
    ref, _ = run("reference", config, 0, inputs64)
    inputs16 = tuple(t.detach().to(torch.bfloat16).requires_grad_(t.requires_grad) if t.is_floating_point() else t
                     for t in inputs64)
    same_dtype_torch, _ = run("reference", config, 0, inputs16)
    blocked, _ = run("blocked", config, 0, inputs16)
    budget = 2 * (same_dtype_torch.double() - ref).abs().max() + 1e-3
    error = (blocked.double() - ref).abs().max()
    print(f"bf16 blocked error {error:.3e}, budget {budget:.3e}")
    assert error <= budget
    with torch.no_grad():  # the no-gradient path (masks in place, workspace buffers) in bf16 too
        q, k, v, pos_key, pos_query, padding = inputs16
        args = (layout_for(config, 0, 90), padding, 0.37, pos_key, pos_query, RelativePositionSpec.from_config(config))
        for _ in range(2):  # the second call reuses the workspace
            out = disentangled_attention(q, k, v, *args, backend="blocked")
            assert out.dtype == torch.bfloat16 and (out.double() - ref).abs().max() <= budget


def test_bad_inputs_are_rejected_with_clear_errors():
    config = tiny_config()
    q, k, v, pk, pq, padding = make_inputs(config, 2, 20, seed=8)
    layout = layout_for(config, 0, 20)
    spec = RelativePositionSpec.from_config(config)
    with pytest.raises(TypeError, match="dtype"):
        disentangled_attention(q, k.float(), v, layout, padding, 1.0)
    with pytest.raises(ValueError, match="layout"):
        disentangled_attention(q, k, v, layout_for(config, 0, 40), padding, 1.0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        disentangled_attention(q, k, v, layout, padding[:, :10], 1.0)
    with pytest.raises(ValueError, match="pos_key"):
        disentangled_attention(q, k, v, layout, padding, 1.0, pos_key=pk[:, :5], rel_spec=spec)


def test_triton_backend_refusal_names_blocked(monkeypatch):
    from bigbird_ja.attention import triton_backend

    monkeypatch.setattr(triton_backend, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="blocked"):
        resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "blocked"


# ----------------------------------------------------------------------------------------------------------------
# Batch invariance: a sequence's outputs and gradients do not depend on the other sequences of its batch, nor on
# how far the batch is padded (random blocks included).

# (length, padded length, block size): lengths that cross block boundaries, padded over several more blocks
INVARIANCE_CASES = [(37, 120, 16), (83, 177, 16), (83, 200, 32), (300, 611, 32)]


def alone_and_in_batch(backend, config, layer, length, padded_length, seed, dtype=torch.float64, device="cpu"):
    """([out, dq, dk, dv, dpos_key, dpos_query] of one sequence of `length` tokens run alone, the same padded to
    `padded_length` in a batch with a full-length sequence): outputs and q/k/v gradients on its own tokens.

    The loss reads only that sequence's outputs, so the relative embeddings' gradients are its own in both runs."""
    gen = torch.Generator().manual_seed(seed)
    H, D, S = config.num_attention_heads, config.attention_head_size, config.relative_span
    q, k, v = (torch.randn(2, H, padded_length, D, generator=gen, dtype=torch.float64) for _ in range(3))
    pos_key, pos_query = (torch.randn(H, 2 * S, D, generator=gen, dtype=torch.float64) for _ in range(2))
    weights = torch.randn(H, length, D, generator=gen, dtype=torch.float64).to(device, dtype)
    padding = torch.ones(2, padded_length, dtype=torch.bool, device=device)
    padding[0, length:] = False

    def one(batch, n, key_padding_mask):
        leaves = [t[:batch, :, :n] for t in (q, k, v)] + [pos_key, pos_query]
        leaves = [t.to(device, dtype).requires_grad_(True) for t in leaves]
        out = disentangled_attention(*leaves[:3], layout_for(config, layer, n), key_padding_mask, scale=0.37,
                                     pos_key=leaves[3], pos_query=leaves[4],
                                     rel_spec=RelativePositionSpec.from_config(config), backend=backend)
        mine = out[0, :, :length]
        grads = torch.autograd.grad((mine * weights).sum(), leaves)
        return [mine] + [g[0, :, :length] for g in grads[:3]] + list(grads[3:])

    return one(1, length, None), one(2, padded_length, padding)


def max_batch_difference(alone, batched):
    """{name: max |alone - batched|} over the output and every gradient."""
    names = "out dq dk dv dpos_key dpos_query".split()
    return {name: (a - b).abs().max().item() for name, a, b in zip(names, alone, batched)}


def invariance_config(block_size, padded_length, **overrides):
    """A model exactly as long as the batch, so every random block is live in it (random blocks are drawn over the
    model's length and fall inside a shorter sequence only now and then)."""
    return tiny_config(block_size=block_size, num_random_blocks=3, max_position_embeddings=padded_length,
                       **overrides)


@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("length, padded_length, block_size", INVARIANCE_CASES)
def test_a_sequence_alone_equals_it_padded_in_a_batch_in_float64(backend, length, padded_length, block_size):
    config = invariance_config(block_size, padded_length)
    for layer in range(config.num_hidden_layers):
        errors = max_batch_difference(*alone_and_in_batch(backend, config, layer, length, padded_length, seed=layer))
        print(f"layer {layer}: max |alone - in batch| {errors}")
        assert max(errors.values()) <= 1e-10, errors


def _model_alone_and_in_batch(config, length, padded_length, seed, device="cpu"):
    """(outputs, input-embedding gradients, parameter gradients) of a sequence's tokens through the whole model in
    float32 on `device`: alone, and padded in a batch with a full-length sequence. The loss reads that sequence's
    outputs only."""
    from conftest import randomize_

    import bigbird_ja

    model = randomize_(bigbird_ja.BigBirdJaModel(config), seed=seed).to(device).eval()
    # drawn on the CPU generator (the same values on every device), then moved to the model's device
    gen = torch.Generator().manual_seed(seed)
    embeds = (0.5 * torch.randn(2, padded_length, config.embedding_size, generator=gen, device="cpu")).to(device)
    weights = torch.randn(length, config.hidden_size, generator=gen, device="cpu").to(device)
    mask = torch.ones(2, padded_length, dtype=torch.long, device=device)
    mask[0, length:] = 0
    results = []
    for batch, n, attention_mask in ((1, length, None), (2, padded_length, mask)):
        model.zero_grad()
        leaf = embeds[:batch, :n].clone().requires_grad_(True)
        out = model(inputs_embeds=leaf, attention_mask=attention_mask).last_hidden_state[0, :length]
        (out * weights).sum().backward()
        results.append((out.detach(), leaf.grad[0, :length], {n: p.grad.clone() for n, p in model.named_parameters()
                                                             if p.grad is not None}))
    return results


@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("length, padded_length, block_size", [(37, 150, 8), (83, 300, 16), (300, 611, 32)])
def test_model_outputs_and_gradients_of_a_sequence_do_not_depend_on_its_batch(backend, length, padded_length,
                                                                               block_size):
    config = invariance_config(block_size, padded_length, num_hidden_layers=2, attention_backend=backend)
    (out, grad, params), (out_b, grad_b, params_b) = _model_alone_and_in_batch(config, length, padded_length, seed=3)
    print(f"max |alone - in batch|: outputs {(out - out_b).abs().max():.2e}, input gradients "
          f"{(grad - grad_b).abs().max():.2e}")
    torch.testing.assert_close(out_b, out, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_b, grad, rtol=0, atol=1e-5)
    assert params.keys() == params_b.keys()
    for name, g in params.items():  # sums over every position: float32 rounding relative to their size
        torch.testing.assert_close(params_b[name], g, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------------------------
# The blocked backend's own paths, each against the reference: dense rows for short inputs, sparse rows with the
# window read as a strided band (when delta is a plain shift of i - j there) or from the window's own products,
# and a layout that promises no slot order (every slot gathered).

BAND_CONFIGS = {
    "window products (delta bucketed in the window)": dict(),  # buckets 16, block 8: |i - j| up to 15 > 8
    "band of the per-bucket products": dict(position_buckets=32),
    "band, window 5, block 4": dict(position_buckets=32, num_window_blocks=5, block_size=4, num_global_blocks=2),
    "band, no log buckets": dict(position_buckets=-1, max_relative_positions=20),
    "band, no global blocks": dict(position_buckets=32, num_global_blocks=0, num_random_blocks=3),
}


@pytest.mark.parametrize("path, margin", [("sparse", 0.0), ("dense", 1e9)])
@pytest.mark.parametrize("name", list(BAND_CONFIGS))
@pytest.mark.parametrize("length", [37, 131])
def test_blocked_dense_and_sparse_paths_match_reference_in_float64(monkeypatch, path, margin, name, length):
    from bigbird_ja.attention import blocked

    monkeypatch.setattr(blocked, "DENSE_MARGIN", margin)
    # random blocks live (all of them at 131), odd lengths, random padding and a fully padded row (make_inputs)
    config = tiny_config(max_position_embeddings=131, **BAND_CONFIGS[name])
    for layer in range(config.num_hidden_layers):
        _assert_blocked_matches_reference(config, layer, length)


@pytest.mark.parametrize("name", list(BAND_CONFIGS))
def test_blocked_traced_form_matches_reference_in_float64(monkeypatch, name):
    """The form traced graphs take (export, ONNX, torch.compile: plain ops differentiated by autograd, one path for
    every batch size), run eagerly: output and gradients against the reference, as the eager form's are above."""
    from bigbird_ja.attention import blocked

    monkeypatch.setattr(blocked.torch.compiler, "is_compiling", lambda: True)
    config = tiny_config(max_position_embeddings=131, **BAND_CONFIGS[name])
    for layer in range(config.num_hidden_layers):
        _assert_blocked_matches_reference(config, layer, 131)
        _assert_blocked_matches_reference(config, layer, 37)


@pytest.mark.parametrize("terms", [(False, False), (True, False), (False, True)])
def test_blocked_traced_form_without_one_or_both_relative_terms_matches_reference(monkeypatch, terms):
    """The traced form masks by the terms when there are any, in the softmax when there are none: both against the
    reference in float64, output and gradients, random padding and a fully padded row."""
    from bigbird_ja.attention import blocked

    monkeypatch.setattr(blocked.torch.compiler, "is_compiling", lambda: True)
    config = tiny_config(max_position_embeddings=131)
    inputs = make_inputs(config, 3, 131, seed=7)
    ref_out, ref_grads = run("reference", config, 0, inputs, *terms)
    out, grads = run("blocked", config, 0, inputs, *terms)
    print(f"terms {terms}: max |blocked - reference| = {(out - ref_out).abs().max().item():.2e}")
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    for g, ref_g in zip(grads, ref_grads):
        assert (g is None) == (ref_g is None)
        if g is not None:
            torch.testing.assert_close(g, ref_g, rtol=0, atol=1e-10)


@pytest.mark.parametrize("form", ["eager", "traced"])
@pytest.mark.parametrize("length", [5, 37, 64, 131])
@pytest.mark.parametrize("sparsity", [dict(), dict(num_window_blocks=1, num_global_blocks=0, num_random_blocks=3),
                                      dict(num_window_blocks=5, num_global_blocks=2, num_random_blocks=1),
                                      dict(num_random_blocks=0)] + list(BAND_CONFIGS.values()))
def test_blocked_forward_without_gradients_matches_reference_in_float64(monkeypatch, form, length, sparsity):
    """Without gradients the sparse rows read the global and window key/value blocks in place (no copies): eagerly,
    and in a traced graph (torch.compile) as one opaque op, `bigbird_ja::slot_rows`, which must then be taken. The
    output against the reference, with and without relative terms, every layer, random padding and a fully padded
    row. With gradients, or under export, the traced form runs plain ops instead (the tests above and
    tests/test_deploy_onnx.py)."""
    from bigbird_ja.attention import blocked

    calls = []
    real = blocked.slot_rows
    monkeypatch.setattr(blocked, "slot_rows", lambda *args: calls.append(1) or real(*args))
    monkeypatch.setattr(blocked, "DENSE_MARGIN", 0.0)  # eager: sparse rows at every length (traced: always)
    if form == "traced":
        monkeypatch.setattr(blocked.torch.compiler, "is_compiling", lambda: True)
    config = tiny_config(max_position_embeddings=131, **sparsity)
    spec = RelativePositionSpec.from_config(config)
    for layer in range(config.num_hidden_layers):
        q, k, v, pos_key, pos_query, padding = make_inputs(config, 3, length, seed=length + 7 * layer)
        layout = layout_for(config, layer, length)
        for rel in (dict(pos_key=pos_key, pos_query=pos_query), dict(pos_key=pos_key), dict(pos_query=pos_query),
                    dict()):
            kwargs = dict(scale=0.37, rel_spec=spec, **rel)
            with torch.no_grad():
                out = disentangled_attention(q, k, v, layout, padding, backend="blocked", **kwargs)
                ref = disentangled_attention(q, k, v, layout, padding, backend="reference", **kwargs)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    sparse_rows = layout.num_blocks > layout.num_global_blocks and config.num_window_blocks > 0
    assert bool(calls) == (form == "traced" and sparse_rows), (len(calls), sparse_rows)


@pytest.mark.parametrize("name", list(BAND_CONFIGS))
def test_blocked_matches_reference_in_float64_at_batch_1(monkeypatch, name):
    """Batch 1 copies and accumulates whole blocks along another dimension than larger batches
    (blocked_slots.select_blocks)."""
    from bigbird_ja.attention import blocked

    monkeypatch.setattr(blocked, "DENSE_MARGIN", 0.0)
    config = tiny_config(max_position_embeddings=131, **BAND_CONFIGS[name])
    for layer in range(config.num_hidden_layers):
        inputs = make_inputs(config, 1, 131, seed=layer)
        ref_out, ref_grads = run("reference", config, layer, inputs)
        out, grads = run("blocked", config, layer, inputs)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
        for g, ref_g in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref_g, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", list(BAND_CONFIGS))
@pytest.mark.parametrize("whole_blocks", [True, False])
def test_blocked_without_a_padding_mask_matches_reference_in_float64(monkeypatch, name, whole_blocks):
    """No padding mask: the global rows then skip the mask when the length is whole blocks, and the sparse rows fill
    only the layout's unused slots (and the padded tail of the last block otherwise). Output and every gradient
    against the reference, batch 2, every layer, with gradients and without."""
    from bigbird_ja.attention import blocked

    monkeypatch.setattr(blocked, "DENSE_MARGIN", 0.0)
    config = tiny_config(max_position_embeddings=256, **BAND_CONFIGS[name])
    length = 16 * config.block_size + (0 if whole_blocks else 3)
    for layer in range(config.num_hidden_layers):
        q, k, v, pos_key, pos_query, _ = make_inputs(config, 2, length, seed=100 + layer)
        inputs = (q, k, v, pos_key, pos_query, None)
        ref_out, ref_grads = run("reference", config, layer, inputs)
        out, grads = run("blocked", config, layer, inputs)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
        for g, ref_g in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref_g, rtol=0, atol=1e-10)
        with torch.no_grad():
            args = (layout_for(config, layer, length), None, 0.37, pos_key, pos_query,
                    RelativePositionSpec.from_config(config))
            torch.testing.assert_close(disentangled_attention(*inputs[:3], *args, backend="blocked"), ref_out,
                                       rtol=0, atol=1e-10)


def test_the_window_band_applies_to_the_default_model():
    """The default config (block 64, window 3, 256 buckets) has delta = S + (i - j) across its window: the band."""
    from bigbird_ja import BigBirdJaConfig
    from bigbird_ja.attention.relative import delta_is_shift

    config = BigBirdJaConfig()
    max_distance = (config.num_window_blocks // 2 + 1) * config.block_size - 1
    assert delta_is_shift(RelativePositionSpec.from_config(config), max_distance)


@pytest.mark.parametrize("buckets, max_relative, max_distance, claimed", [
    (256, 512, 127, True), (256, 512, 128, True), (256, 512, 129, False), (256, 512, 200, False),
    (16, 128, 8, True), (16, 128, 15, False), (-1, 20, 19, True), (-1, 20, 20, False)])
def test_delta_is_shift_claims_a_shift_only_where_delta_is_one(buckets, max_relative, max_distance, claimed):
    from bigbird_ja.attention.relative import delta_is_shift, relative_delta

    spec = RelativePositionSpec(buckets if buckets > 0 else max_relative, buckets, max_relative)
    distance = torch.arange(-max_distance, max_distance + 1)
    assert delta_is_shift(spec, max_distance) == claimed  # up to bucket_size // 2 (a bit beyond it may hold too)
    if claimed:
        assert torch.equal(relative_delta(distance, spec), spec.span + distance)


@pytest.mark.parametrize("length", [37, 131])
def test_blocked_reads_a_layout_without_slot_order_through_key_blocks(length):
    import dataclasses

    from bigbird_ja.attention import blocked_attention, reference_attention

    config = tiny_config(max_position_embeddings=131, position_buckets=32)
    q, k, v, pos_key, pos_query, padding = make_inputs(config, 3, length, seed=11)
    layout = dataclasses.replace(layout_for(config, 1, length), num_window_blocks=0)
    kwargs = dict(scale=0.37, pos_key=pos_key, pos_query=pos_query, rel_spec=RelativePositionSpec.from_config(config))
    out = blocked_attention(q, k, v, layout, padding, **kwargs)
    ref = reference_attention(q, k, v, layout.token_mask(length), padding, **kwargs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    grads = torch.autograd.grad(out.sum(), [q, k, v, pos_key, pos_query])
    ref_grads = torch.autograd.grad(ref.sum(), [q, k, v, pos_key, pos_query])
    for g, ref_g in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref_g, rtol=0, atol=1e-10)


def test_dense_path_is_chosen_only_while_it_costs_no_more_than_the_sparse_one():
    from bigbird_ja.attention.blocked import _dense_is_cheaper

    # base settings: 2 global + 3 window + 3 random slots, block 64
    assert _dense_is_cheaper(8, 2, 8) and _dense_is_cheaper(10, 2, 8)  # 512 and 640 tokens
    assert not _dense_is_cheaper(12, 2, 8) and not _dense_is_cheaper(256, 2, 8)  # 768 and 16k tokens


def _default_op_inputs(length, seed, dtype=torch.float64):
    config = tiny_config(max_position_embeddings=512, position_buckets=32)
    q, k, v, pos_key, pos_query, padding = make_inputs(config, 2, length, seed=seed, dtype=dtype)
    args = (layout_for(config, 0, length), padding, 0.37, pos_key, pos_query, RelativePositionSpec.from_config(config))
    return (q.detach(), k.detach(), v.detach()), args


def test_blocked_no_grad_reuses_its_workspace_across_lengths_and_inference_mode(monkeypatch):
    """The no-gradient CPU forward takes its scratch buffers from a kept workspace: calls at growing and shrinking
    lengths, under no_grad and inference_mode in turn, each equal the reference; the buffers are kept between calls
    and release_workspace frees them; with gradients enabled nothing is taken from it."""
    from bigbird_ja.attention import blocked, workspace

    monkeypatch.setattr(blocked, "DENSE_MARGIN", 0.0)
    monkeypatch.setenv("BIGBIRD_JA_CPU_WORKSPACE", "1")
    workspace.release_workspace()
    for step, length in enumerate([67, 200, 131, 40, 131]):  # grown under inference_mode, reused outside it
        tensors, args = _default_op_inputs(length, seed=step)
        context = torch.inference_mode() if step % 2 else torch.no_grad()
        with context:
            out = disentangled_attention(*tensors, *args, backend="blocked")
        ref = disentangled_attention(*tensors, *args, backend="reference")
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        assert workspace.WORKSPACE._local.buffers  # kept for the next call
    workspace.release_workspace()
    tensors, args = _default_op_inputs(131, seed=9)
    disentangled_attention(*tensors, *args, backend="blocked")  # gradients enabled: fresh tensors only
    assert not getattr(workspace.WORKSPACE._local, "buffers", None)


def test_blocked_keeps_no_workspace_unless_asked(monkeypatch):
    """By default the op outside a model forward takes no workspace and keeps nothing between calls (a server's
    memory returns to where it was)."""
    from bigbird_ja.attention import blocked, workspace

    monkeypatch.delenv("BIGBIRD_JA_CPU_WORKSPACE", raising=False)
    monkeypatch.setattr(blocked, "DENSE_MARGIN", 0.0)
    workspace.release_workspace()
    tensors, args = _default_op_inputs(131, seed=2)
    with torch.no_grad():
        out = disentangled_attention(*tensors, *args, backend="blocked")
    torch.testing.assert_close(out, disentangled_attention(*tensors, *args, backend="reference"), rtol=0, atol=1e-10)
    assert not getattr(workspace.WORKSPACE._local, "buffers", None)


@pytest.mark.parametrize("mode", ["forward", "keep", "off"])
def test_model_forward_scopes_the_workspace_by_default(monkeypatch, mode):
    """By default (unset or "forward") a model's no-gradient CPU forward takes its attention's scratch buffers from
    the workspace (layers after the first reuse them, the native terms op writes into one) and frees them when it
    returns; "keep" keeps them between calls, "off" takes none. Every mode gives the same hidden states, padding and
    an odd length included."""
    from conftest import randomize_

    import bigbird_ja
    from bigbird_ja.attention import blocked, workspace

    monkeypatch.setattr(blocked, "DENSE_MARGIN", 0.0)  # sparse rows at this length
    taken = []
    real_empty = workspace.Workspace.empty

    def counted(self, role, shape, like):
        taken.append(role)
        return real_empty(self, role, shape, like)

    monkeypatch.setattr(workspace.Workspace, "empty", counted)
    config = tiny_config(max_position_embeddings=256, num_hidden_layers=2)
    model = randomize_(bigbird_ja.BigBirdJaModel(config), seed=3).eval().double()
    ids = torch.randint(5, config.vocab_size, (2, 203), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 203, dtype=torch.long)
    mask[1, 150:] = 0
    workspace.release_workspace()
    monkeypatch.setenv("BIGBIRD_JA_CPU_WORKSPACE", "0")
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not taken
    if mode == "forward":
        monkeypatch.delenv("BIGBIRD_JA_CPU_WORKSPACE")
    else:
        monkeypatch.setenv("BIGBIRD_JA_CPU_WORKSPACE", mode)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    kept = getattr(workspace.WORKSPACE._local, "buffers", None)
    if mode == "off":
        assert not taken and not kept
    else:
        assert "sparse terms" in taken and "random keys" in taken, sorted(set(taken))
        assert bool(kept) == (mode == "keep")
    workspace.release_workspace()


def test_an_unknown_workspace_setting_is_refused_by_name(monkeypatch):
    from bigbird_ja.attention import workspace

    monkeypatch.setenv("BIGBIRD_JA_CPU_WORKSPACE", "yes please")
    with pytest.raises(ValueError, match="BIGBIRD_JA_CPU_WORKSPACE='yes please': use forward"):
        with torch.no_grad():
            workspace.workspace_for(torch.zeros(1), traced=False)


def test_blocked_no_grad_workspace_is_per_thread(monkeypatch):
    """Threads running the op at once never share a scratch buffer: each result equals the reference."""
    import threading

    from bigbird_ja.attention import workspace

    monkeypatch.setenv("BIGBIRD_JA_CPU_WORKSPACE", "1")

    cases = [_default_op_inputs(length, seed=length) for length in (131, 200, 96, 131)]
    results = [None] * len(cases)
    start = threading.Barrier(len(cases))

    def work(i):
        start.wait()
        with torch.no_grad():
            for _ in range(3):
                results[i] = disentangled_attention(*cases[i][0], *cases[i][1], backend="blocked")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (tensors, args), out in zip(cases, results):
        torch.testing.assert_close(out, disentangled_attention(*tensors, *args, backend="reference"), rtol=0,
                                   atol=1e-10)
    workspace.release_workspace()
