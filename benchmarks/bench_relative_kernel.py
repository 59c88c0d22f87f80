"""The blocked attention op on CPU with its relative terms from the native op built at install (bigbird_ja/attention/cpu_kernels.py)
against the same op with the pure-PyTorch reads, in one process, interleaved.

Setup: one layer's op at base dims (12 heads x 64, block 64, window 3, global 2, random 3, 256 buckets, c2p + p2c),
batch 1, float32 (or --dtype bfloat16), random inputs; forward without gradients and forward+backward of sum(out **
2); the minimum of --repeats runs of each, the two forms taking turns so that both see the same machine. The heap is
kept (MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_, see bench_cpu.py's --malloc keep) when the script starts
itself.

Run (from the repository root):
    python benchmarks/bench_relative_kernel.py --lengths 1024 2048 4096 \
        --out benchmarks/results/cpu-2core/relative_kernel.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import MALLOC_SETTINGS  # noqa: E402  one home for the heap-kept settings

KEEP_HEAP = MALLOC_SETTINGS["keep"]


def measure(length: int, repeats: int, dtype: str = "float32") -> dict:
    import torch

    import bigbird_ja
    from bigbird_ja.attention import RelativePositionSpec, blocked, cpu_kernels, disentangled_attention, layout_for

    kernel = cpu_kernels.relative_terms()
    if kernel is None:
        raise SystemExit("the C kernel was not built at install (no C compiler, or BIGBIRD_JA_NO_NATIVE=1): reinstall with gcc or clang on the PATH")
    config = bigbird_ja.BigBirdJaConfig(max_position_embeddings=max(length, 4096), num_hidden_layers=1)
    spec = RelativePositionSpec.from_config(config)
    H, D = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    q, k, v = (torch.randn(1, H, length, D, generator=gen).to(dt).requires_grad_() for _ in range(3))
    pos_key, pos_query = (torch.randn(H, 2 * spec.span, D, generator=gen).to(dt).requires_grad_() for _ in range(2))
    args = (layout_for(config, 0, length), None, D ** -0.5, pos_key, pos_query, spec)
    forms = {"c kernel": lambda: kernel, "pytorch reads": lambda: None}
    best = {}
    try:
        for _ in range(repeats + 1):  # the first round warms up (and builds nothing: the kernel is loaded)
            for form, choose in forms.items():
                blocked.relative_terms_kernel = choose
                with torch.no_grad():
                    start = time.perf_counter()
                    disentangled_attention(q, k, v, *args, backend="blocked")
                    forward = time.perf_counter() - start
                start = time.perf_counter()
                disentangled_attention(q, k, v, *args, backend="blocked").square().sum().backward()
                train = time.perf_counter() - start
                for mode, seconds in (("forward", forward), ("forward+backward", train)):
                    key = (form, mode)
                    best[key] = min(best.get(key, float("inf")), seconds)
    finally:
        blocked.relative_terms_kernel = cpu_kernels.relative_terms
    return {f"{form} {mode} ms": round(seconds * 1e3, 1) for (form, mode), seconds in best.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--out", type=Path, default=None, help="JSON output (the table is printed either way)")
    args = p.parse_args(argv)
    if any(os.environ.get(name) != value for name, value in KEEP_HEAP.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_HEAP})
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    print("| n | mode | C kernel | PyTorch reads | speed-up |\n|---:|---|---:|---:|---:|")
    for length in args.lengths:
        result = measure(length, args.repeats, args.dtype)
        for mode in ("forward", "forward+backward"):
            ours, theirs = result[f"c kernel {mode} ms"], result[f"pytorch reads {mode} ms"]
            rows.append({"length": length, "mode": mode, "c_kernel_ms": ours, "pytorch_reads_ms": theirs,
                         "speedup": round(theirs / ours, 2)})
            print(f"| {length:,} | {mode} | {ours:.1f} ms | {theirs:.1f} ms | {theirs / ours:.2f}x |", flush=True)
    if args.out:
        import platform

        from bigbird_ja.common.atomic_io import atomic_write_text

        payload = {"question": __doc__.split("\n\n")[0], "command": " ".join(["python", *sys.argv]),
                   "threads": args.threads, "repeats": args.repeats, "dtype": args.dtype, "torch": torch.__version__,
                   "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                   "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
        atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
