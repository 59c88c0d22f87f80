"""The launch recipes on a real small cluster: how long from `sbatch` to the first step, and how long until a lost
host, a downed link or a slow link is noticed and the run resumes?

Question
    On a real scheduler the first failures are in host lists, rendezvous, requeue after a node failure and a node
    whose network goes away. How long does each take to notice and recover from, and is every sample still read
    exactly once?

Setup
    tests/cluster/vcluster.py: hosts as network namespaces on one machine (own hostname, address, /etc/hosts),
    munge, slurmctld and one slurmd per host (SlurmdTimeout=10 s, cred_expire=10 s: how long a requeued job waits),
    Open MPI with a remote-shell agent entering the host's namespaces. `bigbird-ja pretrain`, the tiny setting of
    tests/test_pretrain.py (14 steps, checkpoints at 6 and 12, global batch 8), gloo, collective timeout 1 minute,
    2 ranks per host. The cases are the tests of tests/test_cluster.py (run here with the full lane on), which
    append what they measure to a JSON-lines file:

    slurm-2x2, slurm-4x2      sbatch of configs/launch/slurm.sbatch: sbatch -> first step, sbatch -> job done
    slurm-host-killed         every process of bbjn1 SIGKILLed after checkpoint 6: -> node DOWN, -> requeued, host
                              back (slurmd restarted) -> next attempt's first step; samples once (asserted)
    pbs-mpirun-rank-killed    configs/launch/abci-pbs.sh with PBS_NODEFILE, real mpirun; rank 3 SIGKILLed: ->
                              mpirun's exit, -> the retry's resume
    slurm-link-down           bbjn1's link down after checkpoint 6: -> attempt ended (requeue), -> resumed
    slurm-slow-link           bbjn1's link slowed (netem 2 s, or tbf 50 kbit/s without netem): the same

    Times are seconds from a harness that polls metrics.jsonl and `scontrol show job` every 0.2 s.

Run (as root, with slurm-wlm, munge, openmpi-bin installed)
    python benchmarks/bench_cluster.py                   # all cases, 7-11 minutes on 2 shared cores
    python benchmarks/bench_cluster.py -k host_killed    # one case (pytest -k)

Output: a markdown table on stdout, JSON with the environment (--out, default
benchmarks/results/cluster/cluster.json) and the table beside it (.md). A failed case is recorded with its test
outcome, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from envinfo import cpu_description, provenance  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "cluster" / "cluster.json"
COLUMNS = ["case", "outcome", "sbatch_to_first_step_s", "start_to_first_step_s", "detected_node_down_s",
           "detected_mpirun_exit_s", "detected_s", "requeued_s", "resumed_after_kill_s", "resumed_after_hit_s",
           "resumed_after_host_back_s", "resumed_after_restore_s", "sbatch_to_done_s", "applied"]


def versions() -> dict:
    def first_line(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.splitlines()[0].strip()
        except (OSError, IndexError, subprocess.SubprocessError):
            return None

    import torch

    return {"slurm": first_line("slurmd", "-V"), "munge": first_line("munged", "--version"),
            "openmpi": first_line("mpirun", "--version"), "torch": torch.__version__, "kernel": os.uname().release,
            "python": sys.version.split()[0]}


def table(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", default=None, help="only the tests matching this pytest -k expression")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--timeout", type=int, default=3600, help="for the whole pytest run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results.jsonl"
        report = Path(tmp) / "report.xml"
        env = dict(os.environ, BIGBIRD_JA_CLUSTER_FULL="1", BIGBIRD_JA_CLUSTER_RESULTS=str(results),
                   OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_cluster.py",
               f"--junitxml={report}", *(["-k", args.k] if args.k else [])]
        start = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
            tail = (done.stdout + done.stderr)[-4000:]
        except subprocess.TimeoutExpired as err:
            tail = f"pytest killed after {args.timeout} s\n{(err.stdout or b'')[-4000:]!r}"
        wall = time.monotonic() - start
        rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
        outcomes = {}
        if report.exists():
            import xml.etree.ElementTree as ET

            for case in ET.parse(report).iter("testcase"):
                kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
                outcomes[case.get("name")] = kind
    for row in rows:
        row.setdefault("outcome", "measured")
    print(table(rows))
    print(f"\npytest: {outcomes}\nwall {wall:.0f} s")
    payload = {"question": "time to first step, to detection and to resume on a namespace cluster",
               "environment": {**cpu_description(), **versions(), **provenance(),
                               "loadavg_before": os.getloadavg()},
               "wall_s": round(wall, 1), "tests": outcomes, "cases": rows, "pytest_tail": tail}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    tmp_out.replace(args.out)
    args.out.with_suffix(".md").write_text(table(rows) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
