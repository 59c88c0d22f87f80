"""A/B of the training step on a noisy machine: checkouts and transformers' BigBird interleaved, round after round.

On this project's shared 2-core VM the same code's step time moves by up to 20% between minutes, so one run of each
side says little. This runs `train_step_repeats.py` (many steps in one process, 2 warm-up steps) once per side per
round, the order of the sides rotating from round to round, and compares each side with BigBird *of the same round*:
a slow minute slows both. It prints and writes, per length, every round's median step and ratio and the median of
the per-round ratios with their range.

    python benchmarks/train_step_ab.py --checkout before=/tmp/base --checkout after=. --lengths 1024 2048 \\
        --rounds 5 --steps 10 --out benchmarks/results/cpu-2core/train_step_ab.json

A checkout is a folder holding `bigbird_ja/` with its native library built (`python setup.py build_ext --inplace`
there); it is put first on PYTHONPATH of its runs. "." is this one. Writes <out> (JSON) and <out>.md.
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

HERE = Path(__file__).resolve().parent
BIGBIRD = "hf-bigbird"


def run_side(side: str, path: Path | None, length: int, steps: int, threads: int) -> dict:
    """One process of train_step_repeats.py: `path` None runs transformers' BigBird (with this checkout's script)."""
    env = dict(os.environ)
    case = BIGBIRD if path is None else "bigbird-ja"
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [sys.executable, str(HERE / "train_step_repeats.py"), str(length), case, "--steps", str(steps),
               "--threads", str(threads), "--tag", side, "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{side} at {length} tokens failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def summarise(records: list[dict], sides: list[str]) -> list[dict]:
    """Per length and checkout: the per-round ratios of median steps to BigBird's of the same round."""
    rows = []
    for length in sorted({r["length"] for r in records}):
        for side in sides:
            ratios, medians = [], []
            for round_ in sorted({r["round"] for r in records}):
                ours = [r for r in records if (r["length"], r["round"], r["tag"]) == (length, round_, side)]
                theirs = [r for r in records if (r["length"], r["round"], r["tag"]) == (length, round_, BIGBIRD)]
                if ours and theirs:
                    ratios.append(ours[0]["median_s"] / theirs[0]["median_s"])
                    medians.append(ours[0]["median_s"])
            if ratios:
                rows.append({"length": length, "checkout": side, "rounds": len(ratios),
                             "ratios": [round(x, 3) for x in ratios],
                             "median_ratio": round(statistics.median(ratios), 3),
                             "min_ratio": round(min(ratios), 3), "max_ratio": round(max(ratios), 3),
                             "median_step_s": round(statistics.median(medians), 3)})
    return rows


def markdown(rows: list[dict], records: list[dict]) -> str:
    lines = ["| tokens | checkout | rounds | ours / BigBird per round | median ratio | median step (s) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['length']:,} | {row['checkout']} | {row['rounds']} | "
                     f"{', '.join(f'{x:.2f}x' for x in row['ratios'])} | **{row['median_ratio']:.2f}x** | "
                     f"{row['median_step_s']:.3f} |")
    bigbird = {}
    for r in records:
        if r["tag"] == BIGBIRD:
            bigbird.setdefault(r["length"], []).append(r["median_s"])
    for length, values in sorted(bigbird.items()):
        lines.append(f"| {length:,} | BigBird (reference) | {len(values)} | "
                     f"{', '.join(f'{x:.3f} s' for x in values)} | 1.00x | {statistics.median(values):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkout", action="append", required=True, metavar="NAME=PATH",
                   help="a side: a name and a checkout folder ('.' for this one); repeat for each")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="JSON path (and <out>.md); none: print only")
    args = p.parse_args(argv)
    sides = {}
    for item in args.checkout:
        name, sep, folder = item.partition("=")
        path = (HERE.parent if folder == "." else Path(folder)).resolve()
        if not sep or not name or name == BIGBIRD:
            p.error(f"--checkout {item!r}: write NAME=PATH (NAME not {BIGBIRD!r})")
        if not (path / "bigbird_ja").is_dir():
            p.error(f"--checkout {item!r}: {path} holds no bigbird_ja/ folder")
        sides[name] = path
    order = list(sides) + [BIGBIRD]
    records = []
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for round_ in range(args.rounds):
        for length in args.lengths:
            shift = round_ % len(order)  # each side goes first in turn
            for side in order[shift:] + order[:shift]:
                record = run_side(side, sides.get(side), length, args.steps, args.threads)
                record["round"] = round_
                records.append(record)
                print(f"round {round_ + 1} {length:>6} {side:>12}: median {record['median_s']:.3f} s, "
                      f"min {record['min_s']:.3f} s", flush=True)
    rows = summarise(records, list(sides))
    table = markdown(rows, records)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {"started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "checkouts": {name: str(path) for name, path in sides.items()}, "rounds": args.rounds,
                    "steps": args.steps, "threads": args.threads, "lengths": args.lengths}
        args.out.write_text(json.dumps({"settings": settings, "summary": rows, "runs": records}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
