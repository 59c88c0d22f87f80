"""What attention dropout costs on CPU: torch's F.dropout against the hashed dropout (bigbird_ja/attention/dropout.py:
the native op, and its PyTorch hash) on one layer's sparse attention probabilities, forward and forward+backward.

Setup: probs [1, 12, 63, 64, 512] (batch 1, 12 heads, 63 query blocks of 64 rows, 8 key blocks of 64 per row: the
sparse rows of a 4,096-token layer at base dims), float32, p = 0.1, key positions from random blocks per head; the
backward takes a gradient of ones. Each form is timed --repeats times, the forms taking turns, and the minimum is
kept; "saved" is what autograd keeps for the backward (F.dropout: its mask; the hash: the two position tensors,
which the attention holds anyway). A plain multiply of the same tensor is the floor any form could reach.

Run (from the repository root):
    python benchmarks/bench_dropout.py --out benchmarks/results/cpu-2core/dropout.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from envinfo import cpu_description, provenance  # noqa: E402


def measure(shape, p: float, repeats: int, pytorch_hash: bool) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from bigbird_ja.attention import dropout as D

    B, H, G, R, C = shape
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(shape, generator=gen)
    query_pos = torch.arange(G * R).view(G, R)
    blocks = torch.randint(0, G, (H, G, C // R), generator=gen)
    key_pos = (blocks[..., None] * R + torch.arange(R)).reshape(H, G, C)
    drop = D.AttentionDropout(p, 12345)
    grad = torch.ones(shape)

    def hashed(x):
        return D.hashed_dropout(x, query_pos, key_pos, drop)

    # the floor: one multiply, reading and writing what dropout reads and writes
    forms = {"F.dropout": lambda x: F.dropout(x, p, True), "hashed (native)": hashed,
             "probs * scale (no mask)": lambda x: x * drop.scale}
    if pytorch_hash:
        forms["hashed (PyTorch hash)"] = hashed
    if D.NATIVE is None:
        raise SystemExit(f"the native hashed dropout is not loaded: {D._NATIVE_WHY_NOT}")
    best: dict = {}
    saved: dict = {}
    for round_ in range(repeats + 1):  # round 0 warms up
        for form, fn in forms.items():
            if form == "hashed (PyTorch hash)" and round_ > 1:
                continue  # slow: one timed round
            native = D.NATIVE
            if form == "hashed (PyTorch hash)":
                D.NATIVE = None
            try:
                with torch.no_grad():
                    start = time.perf_counter()
                    fn(probs)
                    forward = time.perf_counter() - start
                x = probs.clone().requires_grad_()
                kept = []
                with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
                    start = time.perf_counter()
                    out = fn(x)
                    middle = time.perf_counter()
                out.backward(grad)
                end = time.perf_counter()
            finally:
                D.NATIVE = native
            saved[form] = sum(t.numel() * t.element_size() for t in kept)
            if round_ == 0:
                continue
            for mode, seconds in (("forward", forward), ("forward+backward", end - start),
                                  ("backward", end - middle)):
                best[form, mode] = min(best.get((form, mode), float("inf")), seconds)
    return [{"form": form, "forward_ms": round(best[form, "forward"] * 1e3, 1),
             "backward_ms": round(best[form, "backward"] * 1e3, 1),
             "forward_backward_ms": round(best[form, "forward+backward"] * 1e3, 1),
             "saved_for_backward_mb": round(saved[form] / 2 ** 20, 1)} for form in forms]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=5, default=[1, 12, 63, 64, 512], metavar=("B", "H", "G", "R", "C"))
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-pytorch-hash", action="store_true", help="skip the (slow) PyTorch hash row")
    ap.add_argument("--out", type=Path, default=None, help="JSON output (the table is printed either way)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = measure(tuple(args.shape), args.p, args.repeats, not args.no_pytorch_hash)
    base = rows[0]["forward_backward_ms"]
    print(f"probs {args.shape} float32, p = {args.p}, {args.threads} threads, min of {args.repeats}\n")
    print("| form | forward | backward | forward+backward | vs F.dropout | saved for backward |\n"
          "|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['form']} | {r['forward_ms']:.1f} ms | {r['backward_ms']:.1f} ms | "
              f"{r['forward_backward_ms']:.1f} ms | {base / r['forward_backward_ms']:.2f}x | "
              f"{r['saved_for_backward_mb']:.1f} MB |")
    if args.out:
        from bigbird_ja.common.atomic_io import atomic_write_text

        payload = {"question": __doc__.split("\n\n")[0], "shape": args.shape, "p": args.p, "dtype": "float32",
                   "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
                   "environment": {**cpu_description(), **provenance()}, "rows": rows}
        atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
