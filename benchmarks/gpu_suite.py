"""One stage of the GPU suite (benchmarks/run_gpu_suite.sh runs them in order, each under its own timeout).

    python benchmarks/gpu_suite.py STAGE --out DIR [--dry-run] [stage options]

Stages, most valuable first; each writes DIR/<name>.json (--name, default the stage) as soon as it has something
(the shell script writes DIR/<name>.log beside it):
  cuda         versions, the device, and which backend attention_backend="auto" resolves to there
  peak         measured bf16 matmul peak (TFLOP/s): the yardstick of the stages after it
  correctness  the GPU tests at 4,096 tokens in bf16 (forward, backward, dropout replayed), one record per test
  attention    benchmarks/bench_attention.py: triton vs FlexAttention (64-token mask with tiles given, and a
               128-token mask) vs dense SDPA, fwd and fwd+bwd, fraction of the measured peak (--lengths)
  pretrain     benchmarks/bench_pretrain.py --gpu-only: the base model at 4,096 tokens, tokens/s, MFU against the
               measured peak, peak memory

--dry-run is the CPU stand-in that CI runs: the same stages and code on the CPU, the Triton kernels in Triton's
interpreter, tiny sizes, and the packages the GPU image lacks (deepspeed, fugashi, unidic_lite, datasets) made
unimportable, so a GPU path that needs one fails here first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
STAGES = ("cuda", "peak", "correctness", "attention", "pretrain")
MISSING_ON_GPU_IMAGE = ("deepspeed", "fugashi", "unidic_lite", "datasets")
# The GPU tests the correctness stage runs (tests/test_triton_kernels.py), and their CPU stand-in: the same checks
# at a size the interpreter can run.
GPU_TESTS = "test_triton_at_4096_tokens_within_the_error_budget and bfloat16 or test_triton_dropout_at_4096_tokens"
STAND_IN_TESTS = "test_long_sequence_and_dropout_checks_run_here_as_on_a_gpu"


def write_json(out: Path, name: str, record: dict) -> None:
    from bigbird_ja.common.atomic_io import atomic_write_text

    atomic_write_text(out / f"{name}.json", json.dumps(record, indent=1) + "\n", durable=False)


def measured_peak(out: Path) -> float | None:
    """The peak stage's TFLOP/s, if it finished."""
    try:
        return json.loads((out / "peak.json").read_text())["tflops"]
    except (OSError, KeyError, ValueError):
        return None


def stage_cuda(args) -> int:
    import torch

    from bigbird_ja.attention import resolve_backend
    from bigbird_ja.attention.triton_backend import kernels_importable

    record = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "cuda_available": torch.cuda.is_available(), "dry_run": args.dry_run,
              "autotune_space": os.environ.get("BIGBIRD_JA_AUTOTUNE", "full"),
              "kernels_importable": kernels_importable()}
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError as err:
        record["triton"] = f"not importable: {err}"
    if torch.cuda.is_available():
        record.update(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                      memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record["auto_backend"] = resolve_backend("auto", device)
    # on a GPU "auto" must reach the fused kernels; in the dry run the interpreter stands in for them
    expected = "blocked" if args.dry_run else "triton"
    record["ok"] = record["auto_backend"] == expected and record["kernels_importable"]
    print(json.dumps(record, indent=1))
    write_json(args.out, args.name, record)
    return 0 if record["ok"] else 1


def stage_peak(args) -> int:
    """bf16 matmul TFLOP/s: the median of timed n x n x n products (2 n^3 FLOPs each)."""
    import torch

    from bigbird_ja.training.flops import peak_tflops

    cuda = torch.cuda.is_available() and not args.dry_run
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    n = args.size or (8192 if cuda else 256)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
    times = []
    for i in range(args.repeats + 3):  # 3 warm-up products
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            a @ b
            seconds = time.perf_counter() - t
        if i >= 3:
            times.append(seconds)
    median = sorted(times)[len(times) // 2]
    name = torch.cuda.get_device_name() if cuda else "CPU (dry run)"
    record = {"device": name, "dtype": str(dtype).removeprefix("torch."), "n": n, "repeats": args.repeats,
              "median_ms": median * 1e3, "tflops": 2 * n**3 / median / 1e12,
              "datasheet_tflops": peak_tflops(name, "bf16")}
    print(json.dumps(record, indent=1))
    write_json(args.out, args.name, record)
    return 0


class _Outcomes:
    """pytest plugin: one record per test (outcome, seconds, the printed errors and budgets, the failure's end)."""

    def __init__(self):
        self.tests = []

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.tests.append({"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                               "seconds": round(report.duration, 2), "stdout": report.capstdout[-3000:],
                               "failure": str(report.longrepr)[-3000:] if report.failed else None})


def stage_correctness(args) -> int:
    import pytest

    plugin = _Outcomes()
    selection = STAND_IN_TESTS if args.dry_run else GPU_TESTS
    started = time.perf_counter()
    # -rA: the log shows every test's printed errors and budgets too
    code = pytest.main(["-q", "-rA", "-p", "no:cacheprovider", str(REPO / "tests" / "test_triton_kernels.py"),
                        "-k", selection], plugins=[plugin])
    record = {"selection": selection, "exit_code": int(code), "seconds": round(time.perf_counter() - started, 1),
              "tests": plugin.tests}
    passed = sum(t["outcome"] == "passed" for t in plugin.tests if t["when"] == "call")
    record["ok"] = int(code) == 0 and passed > 0 and passed == len(plugin.tests)
    write_json(args.out, args.name, record)
    return 0 if record["ok"] else 1


def stage_attention(args) -> int:
    sys.path.insert(0, str(BENCHMARKS))
    import bench_attention

    argv = ["--lengths", *map(str, args.lengths), "--cases", *args.cases, "--out", str(args.out / f"{args.name}.json")]
    peak = measured_peak(args.out)
    if peak:
        argv += ["--peak-tflops", str(peak)]
    if args.dry_run:
        argv += ["--interpret", "--batch", "1", "--heads", "1", "--repeats", "1"]
    elif args.batch:
        argv += ["--batch", str(args.batch)]
    bench_attention.main(argv)
    return 0


def stage_pretrain(args) -> int:
    sys.path.insert(0, str(BENCHMARKS))
    import bench_pretrain

    argv = ["--gpu-only", "--cases", *args.cases, "--out", str(args.out / f"{args.name}.json")]
    peak = measured_peak(args.out)
    if peak:
        argv += ["--peak-tflops", str(peak)]
    if args.dry_run:
        argv += ["--dry-run", "--gpu-steps", "1", "--micro-batches", "1"]
    else:
        argv += ["--gpu-steps", str(args.steps), "--micro-batches", *map(str, args.micro_batches)]
    return bench_pretrain.main(argv)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--out", type=Path, required=True, help="the suite's output folder")
    parser.add_argument("--name", default=None, help="output file stem: DIR/NAME.json (default: the stage)")
    parser.add_argument("--dry-run", action="store_true", help="CPU stand-in: interpreter, tiny sizes")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096], help="attention: sequence lengths")
    parser.add_argument("--cases", nargs="+", default=None, help="attention or pretrain: the cases to run")
    parser.add_argument("--batch", type=int, default=None, help="attention: batch size (default: the bench's)")
    parser.add_argument("--size", type=int, default=None, help="peak: matrix size (default 8192; dry run 256)")
    parser.add_argument("--repeats", type=int, default=20, help="peak: timed products")
    parser.add_argument("--steps", type=int, default=6, help="pretrain: steps per micro-batch size")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[16, 8, 4],
                        help="pretrain: sizes tried largest first (the first that fits is kept)")
    args = parser.parse_args(argv)
    args.name = args.name or args.stage
    if args.cases is None:
        # flex (64-token mask) last: its backward may find no default Hopper tiles that divide a 64-token block
        args.cases = {"attention": ["triton", "flex-128", "sdpa", "flex"], "pretrain": ["block_sparse"]}.get(
            args.stage, [])
    if args.dry_run:
        # before anything imports triton or the packages: the interpreter runs the kernels; the GPU image's gaps
        os.environ["TRITON_INTERPRET"] = "1"
        for name in MISSING_ON_GPU_IMAGE:
            sys.modules[name] = None  # `import name` raises ImportError; find_spec(name) returns None
        args.lengths = [128 + 64 * i for i in range(len(args.lengths))]  # distinct, and small enough to interpret
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"stage {args.stage}{' (dry run)' if args.dry_run else ''}: {' '.join(sys.argv[1:])}", flush=True)
    return {"cuda": stage_cuda, "peak": stage_peak, "correctness": stage_correctness, "attention": stage_attention,
            "pretrain": stage_pretrain}[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
