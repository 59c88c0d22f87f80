"""Is bigbird-ja under torch.compile (inductor, the default backend) at least as fast as eager on CPU?

Question
    A user calls `torch.compile(model)` or `torch.compile(model, dynamic=True)` and feeds sequences of several
    lengths. Does each compile once, give the eager result, and run no slower than eager?

Setup
    BigBirdJaModel at base dims (hidden 768, 12 heads x 64, FFN 3072, vocab 32000), `--layers` layers (default 2),
    blocked backend (block 64, window 3, global 2, random 3, 256 log buckets), batch 1, float32, eval, torch.no_grad,
    `--threads` torch threads (default 2), n = 1024 and 4096 (`--lengths`). Two compiled forms, each in its own
    process beside the eager model:
      compile   torch.compile(model) (automatic dynamic: static at the first length, one recompile after)
      dynamic   torch.compile(model, dynamic=True)
    Each process runs every length once to warm up (the compile time is recorded), then `--repeats` rounds in which
    the eager and the compiled model run each length in turn (so both see the same machine load); the median per
    length and form is reported, with the max |compiled - eager| of the last hidden state and the number of graphs
    dynamo compiled. A form that fails is recorded with its error; the run goes on.

Run (from the repository root)
    python benchmarks/bench_compile.py --out benchmarks/results/cpu-2core/compile.json
    python benchmarks/bench_compile.py --lengths 1024 --repeats 3 --out /tmp/compile.json   # quicker

Output: a markdown table (stdout, and beside --out as .md) and the JSON (--out) with an environment block.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from envinfo import cpu_description, provenance  # noqa: E402

FORMS = ("compile", "dynamic")


def run_form(form: str, lengths: list[int], layers: int, threads: int, repeats: int) -> dict:
    """One compiled form and the eager model in this process: median ms per length of each, compile seconds,
    graphs, max error against eager."""
    import torch
    from torch._dynamo.utils import counters

    from bigbird_ja import BigBirdJaConfig, BigBirdJaModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = BigBirdJaConfig(num_hidden_layers=layers, max_position_embeddings=max(lengths),
                             attention_backend="blocked")
    model = BigBirdJaModel(config).eval()
    compiled = torch.compile(model, dynamic=True if form == "dynamic" else None)
    inputs = {n: torch.randint(5, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
              for n in lengths}
    result = {"form": form, "warmup_s": {}, "max_abs_error_vs_eager": {}}
    with torch.no_grad():
        for n in lengths:  # warm-up: the compile happens here
            start = time.perf_counter()
            out = compiled(input_ids=inputs[n]).last_hidden_state
            result["warmup_s"][n] = round(time.perf_counter() - start, 1)
            expected = model(input_ids=inputs[n]).last_hidden_state
            result["max_abs_error_vs_eager"][n] = (out - expected).abs().max().item()
        times = {(name, n): [] for name in ("eager", form) for n in lengths}
        for _ in range(repeats):
            for n in lengths:
                for name, runner in (("eager", model), (form, compiled)):
                    start = time.perf_counter()
                    runner(input_ids=inputs[n])
                    times[name, n].append(time.perf_counter() - start)
    result["eager_ms"] = {n: round(statistics.median(times["eager", n]) * 1e3, 1) for n in lengths}
    result["compiled_ms"] = {n: round(statistics.median(times[form, n]) * 1e3, 1) for n in lengths}
    result["graphs"] = counters["stats"]["unique_graphs"]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    p.add_argument("--timeout", type=int, default=1800, help="seconds per form")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", choices=FORMS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_form(args.child, args.lengths, args.layers, args.threads, args.repeats)))
        return 0

    results = []
    for form in args.forms:
        cmd = [sys.executable, __file__, "--child", form, "--lengths", *map(str, args.lengths), "--layers",
               str(args.layers), "--threads", str(args.threads), "--repeats", str(args.repeats)]
        load = os.getloadavg()[0]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            if done.returncode == 0:
                results.append({**json.loads(done.stdout.strip().splitlines()[-1]), "load_before": load})
            else:
                results.append({"form": form, "error": done.stderr.strip().splitlines()[-1:], "load_before": load})
        except subprocess.TimeoutExpired:
            results.append({"form": form, "error": f"timed out after {args.timeout} s", "load_before": load})
        print(f"{form}: {results[-1]}", file=sys.stderr, flush=True)

    lines = ["| form | n | eager | compiled | compiled / eager | graphs | warm-up (compile) s | max err |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['form']} | failed: {r['error']} |")
            continue
        for n in map(str, args.lengths):
            eager, compiled = r["eager_ms"][n], r["compiled_ms"][n]
            lines.append(f"| {r['form']} | {int(n):,} | {eager:.0f} ms | {compiled:.0f} ms | {compiled / eager:.2f}x "
                         f"| {r['graphs']} | {r['warmup_s'][n]:.0f} | {r['max_abs_error_vs_eager'][n]:.1e} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        from bigbird_ja.common.atomic_io import atomic_write_text

        payload = {"question": __doc__.split("\n\n")[0], "environment": {**provenance(), **cpu_description()},
                   "threads": args.threads, "layers": args.layers, "repeats": args.repeats, "results": results}
        atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
        atomic_write_text(args.out.with_suffix(".md"), table + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
