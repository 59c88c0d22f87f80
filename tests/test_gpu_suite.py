"""The GPU suite rehearsed without a GPU: the GPU tests' helpers keep every tensor and generator on the tensors'
device (checked on the meta device, as strictly as CUDA checks), the suite script runs end to end in its CPU
stand-in mode, and the GPU image's Triton (3.6) compiles every kernel configuration the suite tunes for sm_90."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import bigbird_ja
from bigbird_ja.attention import layout_for
from conftest import random_batch, randomize_, tiny_config
from test_attention_backends import _model_alone_and_in_batch, make_inputs, run


class StrictDevices(TorchFunctionMode):
    """Fails a torch call that mixes devices the way CUDA refuses: tensors on two devices in one op (a 0-dim CPU
    tensor excepted: CUDA accepts it as a scalar), or a generator on another device than what it fills. Transfers
    (`to`, `copy_`) are the one legitimate meeting of two devices."""

    TRANSFERS = ("to", "copy_", "__get__", "__set__", "_has_compatible_shallow_copy_type")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in self.TRANSFERS:
            return func(*args, **kwargs)
        devices = {t.device.type for t in tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            raise RuntimeError(f"{name} mixes devices {sorted(devices)}")
        result = func(*args, **kwargs)
        generator = kwargs.get("generator")
        filled = {t.device.type for t in tree_leaves(result) if isinstance(t, torch.Tensor)}
        if generator is not None and filled - {generator.device.type}:
            raise RuntimeError(f"{name} mixes devices: a {generator.device.type} generator fills {sorted(filled)}")
        return result


def test_strict_devices_refuses_what_cuda_refuses():
    with StrictDevices():
        torch.ones(3, device="meta") * torch.tensor(2.0)  # a CPU scalar is fine
        torch.ones(3).to("meta")
        for bad in (lambda: torch.ones(3, device="meta") @ torch.ones(3),
                    lambda: torch.randn(3, generator=torch.Generator(), device="meta")):
            try:
                bad()
            except RuntimeError as err:
                assert "mixes devices" in str(err)
            else:
                raise AssertionError("StrictDevices let a device mix through")


def _triton_config(**overrides):
    return tiny_config(hidden_size=64, num_attention_heads=2, num_hidden_layers=2, block_size=16, **overrides)


def test_gpu_test_helpers_keep_tensors_and_generators_on_the_device():
    # The meta device stands in for CUDA: the Triton ops' fake implementations run there, so the tests' own code
    # (inputs, loss weights, model, generators) is what is checked.
    pytest.importorskip("triton")
    config = _triton_config()
    inputs = tuple(t.detach().to("meta").requires_grad_(t.is_floating_point()) for t in make_inputs(config, 2, 37, 1))
    with StrictDevices():
        out, grads = run("triton", config, 0, inputs)
    assert out.device.type == "meta" and all(g.device.type == "meta" for g in grads)

    with StrictDevices(), torch.device("meta"):
        model = randomize_(bigbird_ja.BigBirdJaForMaskedLM(config), seed=1)
        ids, mask = random_batch(3, 40, 101, seed=2)
    assert next(model.parameters()).device.type == "meta" and ids.device.type == mask.device.type == "cpu"

    config = _triton_config(num_random_blocks=3, max_position_embeddings=120, attention_backend="triton")
    with StrictDevices():
        (out, grad, params), _ = _model_alone_and_in_batch(config, 70, 120, seed=3, device="meta")
    assert out.device.type == grad.device.type == "meta" and params


# ----------------------------------------------------------------------------------------------------------------
# The suite script (benchmarks/run_gpu_suite.sh) in its CPU stand-in mode

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "benchmarks" / "run_gpu_suite.sh"


def _run_suite(out: Path, *args: str, **env) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1", **env)
    environment.pop("TRITON_INTERPRET", None)  # the dry run chooses it itself
    return subprocess.run(["bash", str(SUITE), *args], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=900)


def test_suite_skips_a_stage_with_a_line_once_its_budget_is_spent(tmp_path):
    proc = _run_suite(tmp_path, "--dry-run", GPU_SUITE_BUDGET_S="0")
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / "summary.txt").read_text()
    stages = ["cuda", "peak", "correctness", "attention-4k", "pretrain", "attention-16k-32k"]
    for name in stages:
        assert f"{name}: skipped, " in summary, summary
    assert not list(tmp_path.glob("*.json"))


def test_suite_refuses_an_unknown_argument(tmp_path):
    proc = _run_suite(tmp_path, "--fast")
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.slow
def test_suite_dry_run_runs_every_stage_end_to_end(tmp_path):
    proc = _run_suite(tmp_path, "--dry-run")
    summary = (tmp_path / "summary.txt").read_text()
    print(summary)
    assert proc.returncode == 0, proc.stderr
    for name in ("cuda", "peak", "correctness", "attention-4k", "pretrain", "attention-16k-32k"):
        assert f"{name}: exit 0," in summary, (name, (tmp_path / f"{name}.log").read_text()[-3000:])
    record = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert record["cuda"]["ok"] and record["cuda"]["auto_backend"] == "blocked"
    assert record["peak"]["tflops"] > 0
    assert record["correctness"]["ok"] and record["correctness"]["tests"][0]["outcome"] == "passed"
    for name in ("attention-4k", "attention-16k-32k"):
        rows = record[name]["results"]
        assert rows and all(r["status"] == "ok" for r in rows), rows
        assert {r["case"] for r in rows} >= {"triton", "flex-128", "sdpa"}
        # triton and flex compute the op itself: the bench checks them against the blocked backend
        assert all(r["max_abs_diff_vs_blocked"] < 1e-4 for r in rows if r["case"] != "sdpa"), rows
        assert all("forward_fraction_of_peak" in r for r in rows)
    (case,) = record["pretrain"]["gpu"]
    assert case["backend"] == "triton" and case["tokens_per_s"] > 0 and case["mfu_vs_measured_peak"] > 0
    assert record["pretrain"]["cpu"] == []  # the DeepSpeed stages are skipped with a line saying so
    assert "skipping the CPU / DeepSpeed ZeRO stages" in (tmp_path / "pretrain.log").read_text()


# ----------------------------------------------------------------------------------------------------------------
# The GPU image's Triton (3.6.0, not this project's pin): .ci/run installs it into a folder of its own and names it
# in BIGBIRD_JA_TRITON_GPU_IMAGE; put first on PYTHONPATH it shadows the installed triton.

GPU_IMAGE_TRITON = "3.6.0"
TRITON_FOLDER = os.environ.get("BIGBIRD_JA_TRITON_GPU_IMAGE")
needs_gpu_image_triton = pytest.mark.skipif(
    not TRITON_FOLDER, reason="BIGBIRD_JA_TRITON_GPU_IMAGE is unset (.ci/run sets it: pip install --no-deps "
    f"--target FOLDER triton=={GPU_IMAGE_TRITON})")


def _gpu_image_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TRITON_FOLDER or "", str(REPO / "kernels"),
                                                       os.environ.get("PYTHONPATH", "")]), **extra)
    return env


@needs_gpu_image_triton
def test_gpu_image_triton_shadows_the_installed_one():
    proc = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=_gpu_image_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == GPU_IMAGE_TRITON, proc.stdout + proc.stderr


@pytest.mark.slow
@needs_gpu_image_triton
def test_gpu_image_triton_compiles_every_configuration_the_suite_tunes_for_sm90():
    from bigbird_ja_kernels.aot import SUITE_SHAPES, tuning_space

    # two processes (without and with dropout): the compiles are CPU-bound and independent
    children = [subprocess.Popen([sys.executable, "-m", "bigbird_ja_kernels.aot", "--suite", "--arch", "90",
                                  "--dropout", dropout], env=_gpu_image_env(TRITON_INTERPRET="0"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for dropout in ("off", "on")]
    rows = []
    for child in children:
        stdout, stderr = child.communicate(timeout=900)
        assert child.returncode == 0, stderr[-3000:]
        rows += [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    expected = {(kernel, str(dtype).removeprefix("torch.").replace("bfloat16", "bf16"), head_dim, layout_block,
                 config, dropout)
                for kernel in ("forward", "backward_dq", "backward_dkdv") for dtype, head_dim, layout_block in
                SUITE_SHAPES for config in tuning_space(head_dim, layout_block, dtype, space="suite")
                for dropout in (False, True)}
    compiled = {(r["kernel"], r["dtype"], r["head_dim"], r["layout_block"], tuple(r["config"]), r["dropout"])
                for r in rows}
    assert compiled == expected and len(rows) == len(expected)
    for row in rows:
        print(row)
        assert row["triton"] == GPU_IMAGE_TRITON and row["arch"] == 90
        assert 0 < row["shared"] <= row["limit"], row


@pytest.mark.slow
@needs_gpu_image_triton
def test_gpu_image_triton_runs_the_gpu_tests_stand_in_in_its_interpreter():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                           "tests/test_triton_kernels.py", "-k", "test_long_sequence_and_dropout_checks_run_here"],
                          cwd=REPO, env=_gpu_image_env(TRITON_INTERPRET="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------------
# The suite's autotuning space (BIGBIRD_JA_AUTOTUNE=suite)

def test_suite_autotuning_space_keeps_all_its_tiles_for_the_suite_shapes():
    from bigbird_ja_kernels.aot import SUITE_SHAPES, tuning_space
    from bigbird_ja_kernels.block_sparse import SUITE_CONFIGS

    for dtype, head_dim, layout_block in SUITE_SHAPES:
        suite = tuning_space(head_dim, layout_block, dtype, space="suite")
        assert suite == list(SUITE_CONFIGS)  # none pruned away (nor replaced by the fallback tile)
        assert set(suite) < set(tuning_space(head_dim, layout_block, dtype, space="full"))


def test_the_autotuners_take_the_space_named_in_the_environment():
    import bigbird_ja_kernels.block_sparse as kernels  # decorated in this process without the variable: full

    assert [len(t.configs) for t in (kernels._fwd_tuned, kernels._dq_tuned, kernels._dkdv_tuned)] == [54] * 3
    code = ("import bigbird_ja_kernels.block_sparse as b; "
            "print(len(b._fwd_tuned.configs), len(b._dq_tuned.configs), len(b._dkdv_tuned.configs))")
    env = dict(os.environ, BIGBIRD_JA_AUTOTUNE="suite")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["4"] * 3


def test_an_unknown_autotuning_space_is_refused_naming_the_choices(monkeypatch):
    from bigbird_ja_kernels.block_sparse import _configs

    monkeypatch.setenv("BIGBIRD_JA_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match=r"BIGBIRD_JA_AUTOTUNE='fast'.*'full', 'suite'"):
        _configs()
