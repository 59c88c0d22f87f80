"""The Triton backend against the float64 dense reference (Triton's interpreter on CPU, real kernels on a GPU),
and ahead-of-time compilation of every kernel for sm_80, sm_90, sm_100 and sm_120."""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

import bigbird_ja
from bigbird_ja.attention import RelativePositionSpec, disentangled_attention, layout_for
from conftest import random_batch, randomize_, tiny_config
from test_attention_backends import (INVARIANCE_CASES, _model_alone_and_in_batch, alone_and_in_batch,
                                     invariance_config, make_inputs, max_batch_difference, run)

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def triton_config(**overrides):
    values = dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=2, block_size=16)  # head dim 32
    values.update(overrides)
    return tiny_config(**values)


def to_dtype(inputs, dtype):
    return tuple(t.detach().to(DEVICE, dtype).requires_grad_(True) if t.is_floating_point() else t.to(DEVICE)
                 for t in inputs)


def check_against_float64(config, layer, inputs64, terms=(True, True), floor=2e-5, dtype=torch.float32):
    """|triton - ref64| <= 2 |same-dtype torch - ref64| + floor, forward and every gradient."""
    ref64, grads64 = run("reference", config, layer, inputs64, *terms)
    ref32, grads32 = run("reference", config, layer, to_dtype(inputs64, dtype), *terms)
    tri, grads = run("triton", config, layer, to_dtype(inputs64, dtype), *terms)
    pairs = [("out", tri, ref32, ref64)] + [
        (name, g, g32, g64) for name, g, g32, g64 in zip("q k v pos_key pos_query".split(), grads, grads32, grads64)
        if g64 is not None]
    for name, fast, same_dtype, truth in pairs:
        error = (fast.double().cpu() - truth).abs().max().item()
        budget = 2 * (same_dtype.double().cpu() - truth).abs().max().item() + floor
        print(f"layer {layer} {name}: |triton - ref64| = {error:.2e} (budget {budget:.2e})")
        assert error <= budget, name


@pytest.mark.parametrize("length", [1, 37, 83])
@pytest.mark.parametrize("sparsity", [dict(), dict(num_window_blocks=1, num_global_blocks=0, num_random_blocks=3),
                                      dict(num_window_blocks=5, num_global_blocks=2, num_random_blocks=1),
                                      dict(attention_type="full")])
def test_triton_matches_float64_reference(length, sparsity):
    config = triton_config(**sparsity)
    for layer in range(config.num_hidden_layers):
        # 3 sequences: unpadded, randomly padded, fully padded
        check_against_float64(config, layer, make_inputs(config, 3, length, seed=100 * layer + length))


@pytest.mark.parametrize("sparsity", [dict(), dict(num_window_blocks=1, num_global_blocks=0, num_random_blocks=3)])
def test_triton_matches_float64_reference_with_every_random_block_live(sparsity):
    # at its own max_position_embeddings a model's layout holds every drawn random block (shorter inputs hold some)
    config = triton_config(max_position_embeddings=100, **sparsity)
    for layer in range(config.num_hidden_layers):
        assert layout_for(config, layer, 100).key_valid[..., -config.num_random_blocks:].all()
        check_against_float64(config, layer, make_inputs(config, 3, 100, seed=100 * layer + 1))


@pytest.mark.parametrize("terms", [(True, False), (False, True), (False, False)])
def test_triton_with_each_relative_term(terms):
    config = triton_config()
    check_against_float64(config, 1, make_inputs(config, 2, 70, seed=5), terms=terms)


def test_triton_in_float16():
    # bfloat16 is checked on GPUs only: Triton's interpreter multiplies bfloat16 tiles wrongly (numpy has no
    # bfloat16), while float16 runs there as on a device.
    config = triton_config()
    check_against_float64(config, 0, make_inputs(config, 3, 45, seed=12), floor=1e-3, dtype=torch.float16)


def test_triton_block_size_32_head_dim_16():
    config = triton_config(hidden_size=32, block_size=32, num_window_blocks=1, num_global_blocks=1,
                           num_random_blocks=1)
    check_against_float64(config, 0, make_inputs(config, 2, 150, seed=6))


def test_model_on_triton_matches_blocked():
    ids, mask = random_batch(3, 75, 101, seed=7)
    outputs = {}
    for backend in ("blocked", "triton"):
        model = bigbird_ja.BigBirdJaForMaskedLM(triton_config(attention_backend=backend))
        randomize_(model, seed=8).to(DEVICE)
        out = model(ids.to(DEVICE), attention_mask=mask.to(DEVICE), labels=ids.to(DEVICE))
        out.loss.backward()
        outputs[backend] = (out.logits.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()})
    valid = mask.bool()
    torch.testing.assert_close(outputs["triton"][0][valid], outputs["blocked"][0][valid], atol=2e-4, rtol=1e-4)
    for name, grad in outputs["blocked"][1].items():
        torch.testing.assert_close(outputs["triton"][1][name], grad, atol=2e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_model_on_triton_runs_under_torch_compile():
    model = bigbird_ja.BigBirdJaModel(triton_config(attention_backend="triton")).to(DEVICE).eval()
    ids, mask = random_batch(2, 40, 101, seed=9)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).last_hidden_state
    # aot_eager traces through the autograd.Function and the custom ops without needing a C++/GPU code generator
    compiled = torch.compile(model, backend="aot_eager" if DEVICE == "cpu" else "inductor", fullgraph=False)
    with torch.no_grad():
        out = compiled(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    compiled.train()
    compiled(ids, attention_mask=mask).last_hidden_state.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_input_precision_is_ieee_for_float32_and_accepted_by_every_triton_backend(dtype):
    from triton.backends.amd.compiler import HIPOptions
    from triton.backends.nvidia.compiler import CUDAOptions

    from bigbird_ja_kernels.block_sparse import input_precision

    precision = input_precision(dtype)
    if dtype == torch.float32:
        assert precision == "ieee"  # the exactness path: the float64-referenced tests hold it to float32's budget
    for options in (CUDAOptions, HIPOptions):  # tl.dot rejects a precision its target does not list
        assert precision in options.allowed_dot_input_precisions, (options.__name__, precision)


@pytest.mark.parametrize("kernel", ["forward", "backward_dq", "backward_dkdv"])
@pytest.mark.parametrize("tiles, message", [(dict(BLOCK_M=32, BLOCK_N=16), "query tiles"),
                                            (dict(BLOCK_M=16, BLOCK_N=32), "key tiles")], ids=["m32", "n32"])
def test_every_kernel_refuses_tiles_that_straddle_layout_blocks(kernel, tiles, message):
    from bigbird_ja_kernels import KERNELS
    from bigbird_ja_kernels.aot import _POINTER_ARGS, _SCALAR_ARGS

    # The check is static: it fires before any argument is read, so placeholders will do.
    args = {name: torch.zeros(1, device=DEVICE) for name in _POINTER_ARGS[kernel]}
    args.update({name: 0.0 if kind == "fp32" else 1 for name, kind in _SCALAR_ARGS.items()})
    consts = dict(HEAD_DIM=16, LAYOUT_BLOCK=16, HAS_C2P=True, HAS_P2C=True, HAS_DROPOUT=False,
                  INPUT_PRECISION="ieee", **tiles)
    with pytest.raises(Exception) as info:
        KERNELS[kernel][(1, 1)](**args, **consts)
    error = info.value
    while error.__cause__ is not None:  # a compiled kernel wraps the assertion in a CompilationError
        error = error.__cause__
    assert str(error).strip().splitlines()[-1] == f"{message} must not straddle layout blocks"


def test_unsupported_shapes_name_the_blocked_backend():
    config = triton_config(hidden_size=24, num_attention_heads=2)  # head dim 12
    inputs = to_dtype(make_inputs(config, 1, 20, seed=1), torch.float32)
    with pytest.raises(ValueError, match="blocked"):
        run("triton", config, 0, inputs)


def check_dropout(config, batch, length, p, dtype, floor):
    """Triton with attention dropout on DEVICE in `dtype` against the float64 reference given the kernels' own keep
    mask (output and every gradient within 2 x the same-dtype reference's error + floor), and replayed: the same torch
    seed gives the same output, another seed another. The GPU test runs it at 4,096 tokens, the CPU one small."""
    from bigbird_ja.attention import reference_attention
    from bigbird_ja_kernels import dropout_keep_mask

    inputs64 = make_inputs(config, batch, length, seed=13, fully_padded_row=False)
    layout = layout_for(config, 1, length)
    spec = RelativePositionSpec.from_config(config)
    q, k, v, pk, pq, padding = to_dtype(inputs64, dtype)
    torch.manual_seed(21)
    out = disentangled_attention(q, k, v, layout, padding, 0.4, pk, pq, spec, dropout_p=p, training=True,
                                 backend="triton")
    torch.manual_seed(21)  # the wrapper draws its seed from torch's CPU generator: replay the draw
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    Np = layout.num_blocks * layout.block_size
    H = config.num_attention_heads
    keep = dropout_keep_mask(batch * H, Np, p, seed, DEVICE).view(batch, H, Np, Np)[..., :length, :length]
    kept = keep[:, :, 0].float().mean().item()
    assert 1 - p - 0.2 < kept < 1 - p + 0.2, kept  # about 1 - p of the probabilities survive
    # drawn on the CPU (the same values on every device), placed beside each output
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64, device="cpu")
    grads = torch.autograd.grad((out * weights.to(out.device, out.dtype)).sum(), [q, k, v, pk, pq])
    inputs64 = to_dtype(inputs64, torch.float64)  # the truth on DEVICE too: at 4,096 tokens the CPU is too slow
    references = {}
    for name, inputs in (("ref64", inputs64), ("same", to_dtype(inputs64, dtype))):
        q_r, k_r, v_r, pk_r, pq_r, pad_r = inputs
        ref = reference_attention(q_r, k_r, v_r, layout.token_mask(length).to(DEVICE), pad_r, 0.4, pk_r, pq_r, spec,
                                  dropout_p=p, training=True, dropout_mask=keep)
        ref_grads = torch.autograd.grad((ref * weights.to(ref.device, ref.dtype)).sum(), [q_r, k_r, v_r, pk_r, pq_r])
        references[name] = (ref, ref_grads)
    pairs = [("out", out, references["same"][0], references["ref64"][0])] + list(
        zip("q k v pos_key pos_query".split(), grads, references["same"][1], references["ref64"][1]))
    for name, fast, same_dtype, truth in pairs:
        error = (fast.double() - truth).abs().max().item()
        budget = 2 * (same_dtype.double() - truth).abs().max().item() + floor
        print(f"dropout {dtype} {name}: |triton - ref64| = {error:.2e} (budget {budget:.2e})")
        assert error <= budget, name
    torch.manual_seed(21)
    again = disentangled_attention(q, k, v, layout, padding, 0.4, pk, pq, spec, dropout_p=p, training=True,
                                   backend="triton")
    torch.manual_seed(22)
    other = disentangled_attention(q, k, v, layout, padding, 0.4, pk, pq, spec, dropout_p=p, training=True,
                                   backend="triton")
    assert torch.equal(again, out) and not torch.equal(other, out)


def test_triton_dropout_matches_the_reference_given_the_kernels_mask():
    check_dropout(triton_config(), 2, 45, 0.3, torch.float32, floor=2e-5)


@pytest.mark.slow
def test_every_kernel_compiles_for_each_target_within_shared_memory_or_is_pruned_there():
    from bigbird_ja_kernels.aot import ARCHS, DTYPE_NAMES, KERNEL_NAMES, extremes
    from bigbird_ja_kernels.block_sparse import SPACE_FITS

    env = dict(os.environ, TRITON_INTERPRET="0")
    # one process per target: the compiles are CPU-bound and independent
    children = [subprocess.Popen([sys.executable, "-m", "bigbird_ja_kernels.aot", "--arch", str(arch)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for arch in ARCHS]
    rows = []
    for child in children:
        stdout, stderr = child.communicate(timeout=3600)
        assert child.returncode == 0, stderr[-3000:]
        rows += [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    for arch, kernel, dtype in itertools.product(ARCHS, KERNEL_NAMES, (torch.bfloat16, torch.float32)):
        mine = [r for r in rows if (r["arch"], r["kernel"], r["dtype"]) == (arch, kernel, DTYPE_NAMES[dtype])]
        measured = {(r["head_dim"], tuple(r["config"])) for r in mine if r["stage"] == "shared"}
        assert measured == set(extremes(dtype)), (arch, kernel, dtype)
        assert any(r["role"] == "heaviest kept" for r in mine if r["stage"] == "cubin"), (arch, kernel, dtype)
    for row in rows:
        print(row)
        if row["stage"] == "shared":
            # the autotuner on that target drops exactly the configurations over its limit
            assert row["kept"] == (row["shared"] <= row["limit"]), row
        else:
            assert row["fast"] == row["shared"], row  # the pruning's figure is the compiler's
            assert (row["shared"] <= row["limit"]) == (row["role"] != "lightest dropped"), row
    for arch in ARCHS:
        dropped = sorted({(r["kernel"], r["dtype"], r["head_dim"], tuple(r["config"])) for r in rows
                          if r["arch"] == arch and r["stage"] == "shared" and not r["kept"]})
        print(f"sm_{arch}: {len(dropped)} dropped: {dropped}")
    for arch, limit in SPACE_FITS:  # where the autotuner measures nothing, the whole space must fit
        assert all(r["shared"] <= limit for r in rows if r["arch"] == arch and r["stage"] == "shared"), arch


class _FakeCudaTensor:
    is_cuda = True
    device = "cuda:0"
    dtype = torch.bfloat16


def test_cuda_target_reads_the_opt_in_shared_memory_limit(monkeypatch):
    from types import SimpleNamespace

    from bigbird_ja_kernels import block_sparse

    props = SimpleNamespace(major=12, minor=0, shared_memory_per_block=49152, shared_memory_per_block_optin=101376)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.version, "hip", None)
    assert block_sparse._cuda_target(_FakeCudaTensor()) == (120, 101376)
    assert block_sparse._cuda_target(torch.zeros(1)) is None


@pytest.mark.parametrize("tuned, name", [("_fwd_tuned", "forward"), ("_dq_tuned", "backward_dq"),
                                         ("_dkdv_tuned", "backward_dkdv")])
@pytest.mark.parametrize("target", [(120, 101376), (90, 232448)], ids=["sm120", "sm90"])
def test_runtime_autotuning_space_drops_the_configurations_over_the_device_limit(monkeypatch, tuned, name, target):
    from bigbird_ja_kernels import aot, block_sparse

    calls = []

    def figure(config):  # a stand-in for the compiler's figure: some tiles over 99 KiB, some not
        return (config.kwargs["BLOCK_M"] + config.kwargs["BLOCK_N"]) * 128 * 2 * config.num_stages * 3

    def fake_shared_memory(kernel, arch, dtype, head_dim, layout_block, bm, bn, warps, stages, **flags):
        calls.append((kernel, arch, dtype, head_dim, layout_block, flags))
        return figure(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages))

    monkeypatch.setattr(aot, "shared_memory", fake_shared_memory)
    monkeypatch.setattr(block_sparse, "_cuda_target", lambda q: target)
    autotuner = getattr(block_sparse, tuned)
    monkeypatch.setattr(autotuner, "nargs", {"Q": _FakeCudaTensor()}, raising=False)
    consts = dict(HEAD_DIM=128, LAYOUT_BLOCK=128, HAS_C2P=True, HAS_P2C=False, HAS_DROPOUT=True,
                  INPUT_PRECISION="ieee")
    kept = autotuner.prune_configs(consts)
    static = block_sparse._prune(autotuner.configs, {"Q": _FakeCudaTensor()}, **consts)  # no device: no measuring
    if target in block_sparse.SPACE_FITS:
        assert kept == static and not calls  # the sweep shows the whole space fits there: nothing measured
    else:
        assert kept == [c for c in static if figure(c) <= target[1]]
        assert 0 < len(kept) < len(static)
        assert {call[:5] for call in calls} == {(name, 120, torch.bfloat16, 128, 128)}
        assert all(call[5] == dict(has_c2p=True, has_p2c=False, has_dropout=True) for call in calls)


def base_attention_config(length):
    """The base model's attention (12 heads x 64, 64-token blocks, 256 buckets) for sequences up to `length`."""
    return tiny_config(hidden_size=768, num_attention_heads=12, num_hidden_layers=2, block_size=64,
                       num_window_blocks=3, num_global_blocks=2, num_random_blocks=3, position_buckets=256,
                       max_relative_positions=length, max_position_embeddings=length)


def check_long_sequence(config, length, dtype, floor):
    """Triton on DEVICE in `dtype` against the float64 reference (on DEVICE too) for one long unpadded sequence:
    output and every gradient within 2 x the same-dtype reference's error + floor."""
    inputs64 = to_dtype(make_inputs(config, 1, length, seed=11, fully_padded_row=False), torch.float64)
    ref64, grads64 = run("reference", config, 0, inputs64)
    same, grads_same = run("reference", config, 0, to_dtype(inputs64, dtype))
    fast, grads_fast = run("triton", config, 0, to_dtype(inputs64, dtype))
    for name, f, s, t in [("out", fast, same, ref64)] + list(zip("q k v pos_key pos_query".split(), grads_fast,
                                                                   grads_same, grads64)):
        error = (f.double() - t).abs().max().item()
        budget = 2 * (s.double() - t).abs().max().item() + floor
        print(f"{dtype} {name}: {error:.2e} <= {budget:.2e}")
        assert error <= budget, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_at_4096_tokens_within_the_error_budget(dtype):
    check_long_sequence(base_attention_config(4096), 4096, dtype, floor=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_dropout_at_4096_tokens_matches_the_reference_and_replays():
    check_dropout(base_attention_config(4096), 1, 4096, 0.1, torch.bfloat16, floor=1e-3)


def test_long_sequence_and_dropout_checks_run_here_as_on_a_gpu():
    # The GPU tests' own code path (placement, generators, budgets) at a size the interpreter can run; float16, as
    # the interpreter multiplies bfloat16 tiles wrongly. Head dim 16, 16-token blocks, every random block live.
    config = triton_config(hidden_size=32, block_size=16, num_random_blocks=1, position_buckets=32,
                           max_relative_positions=80, max_position_embeddings=80)
    check_long_sequence(config, 80, torch.float16, floor=1e-3)
    check_dropout(config, 1, 80, 0.1, torch.float16, floor=1e-3)


def test_triton_dropout_is_replayed_by_activation_checkpointing():
    config = triton_config(attention_backend="triton", attention_probs_dropout_prob=0.2)
    ids, mask = random_batch(2, 40, 101, seed=14)
    grads = []
    for checkpointing in (False, True):
        model = randomize_(bigbird_ja.BigBirdJaForMaskedLM(config), seed=15).to(DEVICE).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        torch.manual_seed(16)
        model(ids.to(DEVICE), attention_mask=mask.to(DEVICE), labels=ids.to(DEVICE)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("length, padded_length, block_size", INVARIANCE_CASES[1:3])
def test_triton_a_sequence_alone_equals_it_padded_in_a_batch(length, padded_length, block_size):
    # float32 (the kernels' widest type): only float32 rounding may differ, the blocks attended may not
    config = invariance_config(block_size, padded_length, hidden_size=64, num_attention_heads=2, num_hidden_layers=2)
    for layer in range(config.num_hidden_layers):
        errors = max_batch_difference(*alone_and_in_batch("triton", config, layer, length, padded_length, seed=layer,
                                                          dtype=torch.float32, device=DEVICE))
        print(f"layer {layer}: max |alone - in batch| {errors}")
        assert max(errors.values()) <= 1e-5, errors


def test_model_on_triton_outputs_and_gradients_of_a_sequence_do_not_depend_on_its_batch():
    config = triton_config(num_random_blocks=3, max_position_embeddings=120, attention_backend="triton")
    (out, grad, params), (out_b, grad_b, params_b) = _model_alone_and_in_batch(config, 70, 120, seed=3, device=DEVICE)
    print(f"max |alone - in batch|: outputs {(out - out_b).abs().max():.2e}, input gradients "
          f"{(grad - grad_b).abs().max():.2e}")
    torch.testing.assert_close(out_b, out, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_b, grad, rtol=0, atol=1e-5)
    for name, g in params.items():
        torch.testing.assert_close(params_b[name], g, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
