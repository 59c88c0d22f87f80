"""Many training steps of one case in one process: median and min time, minor page faults per step, max RSS.

bench_cpu.py times 5 steps per (case, length) in a fresh process and writes tables; on a noisy shared VM a ratio of
two such medians moves by up to 0.2x between runs. This prints one line per run, for interleaving checkouts and
cases by hand (A/B of a change):

    PYTHONPATH=<other checkout> python benchmarks/train_step_repeats.py 1024 bigbird-ja --steps 15 --tag before
    python benchmarks/train_step_repeats.py 1024 bigbird-ja --steps 15 --tag after
    python benchmarks/train_step_repeats.py 1024 hf-bigbird --steps 15

Same model, inputs and step as bench_cpu.py's train mode (2 base layers, batch 1, fp32, train mode with each
library's default dropout, loss mean(h^2)), 2 warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("length", type=int)
    p.add_argument("case", help="a bench_cpu.py case: bigbird-ja, hf-bigbird, hf-deberta, modernbert")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="", help="a label printed first (which checkout)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line (train_step_ab.py reads it)")
    args = p.parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    import bench_cpu

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = bench_cpu.build_case(args.case, args.length, 2)
    inputs = bench_cpu.make_inputs(args.length)
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        model(**inputs).last_hidden_state.float().square().mean().backward()

    for _ in range(2):
        step()
    times, faults = [], []
    for _ in range(args.steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    times.sort()
    faults.sort()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    if args.json:
        print(json.dumps({"tag": args.tag, "case": args.case, "length": args.length, "steps": args.steps,
                          "threads": args.threads, "median_s": times[len(times) // 2], "min_s": times[0],
                          "times_s": times, "faults_per_step": faults[len(faults) // 2], "max_rss_mib": rss}),
              flush=True)
        return 0
    print(f"{args.tag} {args.case} n={args.length}: median {times[len(times) // 2]:.3f} s, min {times[0]:.3f} s, "
          f"{faults[len(faults) // 2]} faults per step (median), max RSS {rss} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
