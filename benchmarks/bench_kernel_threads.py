"""The native CPU kernels on torch's own OpenMP team against pthreads of their own (csrc/threads.c), in one process,
interleaved.

Threads of its own share the cores with torch's OpenMP workers, which spin for a while after every torch op before
they sleep; a kernel call that follows a matmul (as every one does inside attention) then competes with them. Setup:
one layer's blocked attention op at base dims (12 heads x 64, block 64, window 3, global 2, random 3, 256 buckets,
c2p + p2c), batch 1, float32, random inputs. Timed, the median of --repeats runs, the two settings taking turns:

    terms fwd idle     the relative-terms kernel's forward (sparse rows), nothing run just before
    terms fwd busy     the same right after a [12, n, 64] x [12, 64, 512] torch.bmm (torch's workers spinning)
    terms bwd busy     its backward right after the same bmm
    op train           the attention op's forward+backward in training (dropout 0.1: the hashed dropout kernel too)

Run (from the repository root):
    python benchmarks/bench_kernel_threads.py --lengths 1024 2048 4096 \
        --out benchmarks/results/cpu-2core/kernel_threads.json
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from envinfo import write_results  # noqa: E402

SETTINGS = ("openmp", "pthreads")
COLUMNS = ("terms fwd idle", "terms fwd busy", "terms bwd busy", "op train")


def measure(length: int, repeats: int) -> dict:
    import torch

    import bigbird_ja
    from bigbird_ja.attention import RelativePositionSpec, cpu_kernels, disentangled_attention, layout_for
    from bigbird_ja.attention.relative import relative_index_table

    kernel = cpu_kernels.KERNEL
    if kernel is None:
        raise SystemExit("the C kernel was not built at install: reinstall with gcc or clang on the PATH")
    lib = ctypes.CDLL(str(kernel.path))
    config = bigbird_ja.BigBirdJaConfig(max_position_embeddings=max(length, 4096), num_hidden_layers=1)
    spec = RelativePositionSpec.from_config(config)
    H, D, bs = config.num_attention_heads, config.hidden_size // config.num_attention_heads, config.block_size
    gen = torch.Generator().manual_seed(0)
    nb, R = length // bs, 2 * spec.span
    # the kernel's inputs as the sparse rows of one layer have them (8 key blocks per query block, one halo block)
    qp = torch.randn(H, length, R, generator=gen)
    kp = torch.randn(H, length + 2 * bs, R, generator=gen)
    table = relative_index_table(length, spec)
    kblocks = torch.randint(0, nb, (H, nb - 2, 8), generator=gen)
    kw = dict(H=H, q_block0=2, bs=bs, hw=1)
    out = torch.empty(H, nb - 2, bs, 8 * bs)
    gqp, gkp = torch.empty_like(qp), torch.empty_like(kp)
    a, b = torch.randn(H, length, D, generator=gen), torch.randn(H, D, R, generator=gen)
    busy = torch.empty(H, length, R)
    q, k, v = (torch.randn(1, H, length, D, generator=gen).requires_grad_() for _ in range(3))
    pos_key, pos_query = (torch.randn(H, R, D, generator=gen).requires_grad_() for _ in range(2))
    layout = layout_for(config, 0, length)

    def timed(fn, before=None):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def bmm():
        torch.bmm(a, b, out=busy)

    def train():
        disentangled_attention(q, k, v, layout, None, D ** -0.5, pos_key, pos_query, spec, dropout_p=0.1,
                               training=True, backend="blocked").square().sum().backward()

    cases = {
        "terms fwd idle": (lambda: kernel.forward(qp, kp, out, table, kblocks, **kw), None),
        "terms fwd busy": (lambda: kernel.forward(qp, kp, out, table, kblocks, **kw), bmm),
        "terms bwd busy": (lambda: kernel.backward(out, gqp, gkp, table, kblocks, **kw, zero=True), bmm),
        "op train": (train, None),
    }
    times = {(s, c): [] for s in SETTINGS for c in COLUMNS}
    try:
        for round_ in range(repeats + 1):  # the first round warms up
            for setting in (SETTINGS if round_ % 2 == 0 else SETTINGS[::-1]):
                if setting == "openmp" and not cpu_kernels.use_torch_threads(lib):
                    raise SystemExit("torch here does not run on OpenMP (or BIGBIRD_JA_CPU_THREADS=pthreads)")
                if setting == "pthreads":
                    lib.bbja_use_openmp(None, None, None)
                for column, (fn, before) in cases.items():
                    time.sleep(0.05)  # "idle": torch's workers asleep again
                    seconds = timed(fn, before)
                    if round_:
                        times[setting, column].append(seconds)
    finally:
        cpu_kernels.use_torch_threads(lib)  # as the import set it
    return {f"{s} {c} ms": round(statistics.median(times[s, c]) * 1e3, 2) for s in SETTINGS for c in COLUMNS}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="JSON output (and <out>.md; the table is printed either way)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    lines = ["| n | threads of the kernels | " + " | ".join(COLUMNS) + " |", "|---:|---|" + "---:|" * len(COLUMNS)]
    print("\n".join(lines), flush=True)
    for length in args.lengths:
        result = measure(length, args.repeats)
        for setting in SETTINGS:
            row = {"length": length, "threads_of_the_kernels": setting,
                   **{c.replace(" ", "_") + "_ms": result[f"{setting} {c} ms"] for c in COLUMNS}}
            rows.append(row)
            lines.append(f"| {length:,} | {setting} | "
                         + " | ".join(f"{result[f'{setting} {c} ms']:.2f} ms" for c in COLUMNS) + " |")
            print(lines[-1], flush=True)
        ratio = result["pthreads op train ms"] / result["openmp op train ms"]
        print(f"n={length}: op train with pthreads / with torch's OpenMP team = {ratio:.2f}x", flush=True)
    if args.out:
        parallel = "OpenMP" if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info() else "other"
        write_results(args.out, __doc__.split("\n\n")[0], {"threads": args.threads, "repeats": args.repeats,
                                                               "parallel_backend": parallel}, rows, lines)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
