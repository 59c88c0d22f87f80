"""What attention dropout adds to bigbird-ja's training step on CPU: the default (0.1) against none, interleaved.

Setup: bench_cpu.py's bigbird-ja case (2 base layers, batch 1, float32, 2 threads), train mode, hidden dropout 0.1 in
both; one model with attention dropout 0.1 (the default) and one with 0.0, the same weights. Each round times
--steps steps of each (after 2 warm-up steps; the order alternates by round) and keeps their median; the table gives
the median over rounds. Issue 28's target: at most +10% at 1k-8k tokens.

Run (from the repository root):
    python benchmarks/attention_dropout_cost.py --lengths 1024 2048 4096 8192 \
        --out benchmarks/results/cpu-2core/attention_dropout_cost.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from envinfo import write_results  # noqa: E402

RATES = (0.1, 0.0)


def build(length: int, rate: float):
    import torch

    import bench_cpu

    torch.manual_seed(0)
    model = bench_cpu.build_case("bigbird-ja", length, 2)
    configs = {id(m.config) for m in model.modules() if hasattr(m, "config")}
    assert configs == {id(model.config)}, "every module reads the one config (the rate is set on it below)"
    model.config.attention_probs_dropout_prob = rate
    return model.train()


def measure(length: int, rounds: int, steps: int) -> dict:
    import bench_cpu

    models = {rate: build(length, rate) for rate in RATES}
    inputs = bench_cpu.make_inputs(length)

    def step(model):
        model.zero_grad(set_to_none=True)
        model(**inputs).last_hidden_state.float().square().mean().backward()

    per_round = {rate: [] for rate in RATES}
    for round_ in range(rounds):
        for rate in (RATES if round_ % 2 == 0 else RATES[::-1]):
            for _ in range(2):
                step(models[rate])
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                step(models[rate])
                times.append(time.perf_counter() - start)
            per_round[rate].append(statistics.median(times))
    with_dropout, without = (statistics.median(per_round[rate]) for rate in RATES)
    return {"length": length, "rounds": rounds, "steps": steps, "step_s_attention_dropout_0.1": round(with_dropout, 4),
            "step_s_attention_dropout_0": round(without, 4), "added": round(with_dropout / without - 1, 4),
            "per_round_s": {str(rate): [round(t, 4) for t in per_round[rate]] for rate in RATES}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="JSON output (and <out>.md; the table is printed either way)")
    args = p.parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    lines = ["| tokens | step, attention dropout 0.1 | step, attention dropout 0 | added |", "|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    rows = []
    for length in args.lengths:
        row = measure(length, args.rounds, args.steps)
        rows.append(row)
        lines.append(f"| {length:,} | {row['step_s_attention_dropout_0.1']:.3f} s | "
                     f"{row['step_s_attention_dropout_0']:.3f} s | {100 * row['added']:+.1f}% |")
        print(lines[-1], flush=True)
    if args.out:
        write_results(args.out, __doc__.split("\n\n")[0], {"threads": args.threads}, rows, lines)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
