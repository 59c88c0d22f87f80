"""Rehearsal of a many-rank, multi-node run on one machine: what does each rank cost as the world grows?

Question
    The one public attempt at this model (960 A100s) died of open-file exhaustion and scaled worse than planned.
    Before such a run: do open file descriptors, resident memory, start-up time and checkpoint time per rank stay
    flat as the world size and the number of data shards grow? And does a resume at another world size read every
    sample exactly once with the same global batch?

Setup
    `bigbird-ja pretrain` (the real entry point) under torchrun on 127.0.0.1, gloo, one thread per rank, a tiny model
    (configs/pretrain/tiny-cpu.yaml with 64 hidden x 2 layers, seq_len 128), fp32, global batch --global-batch at
    micro-batch 1. Worlds (--worlds, default 4 8 16 12 4) run as one elastic CHAIN per ZeRO stage (--stages,
    default 1 3): a fresh run at the first world size, then each next world size resumes from the last checkpoint
    (--resume auto; DeepSpeed's universal checkpoint conversion when the world changes), --steps steps each and a
    checkpoint at the end of each. World sizes >= --two-nodes-from start as 2 "nodes": two torchrun invocations with
    --nnodes 2 --node_rank 0/1 and one master port, as the two hosts of a job would. Then the SHARD SWEEP: fresh
    runs at the first world size, ZeRO-1, on the same corpus prepared into --shard-counts shards.
    Data: the bundled sample corpus repeated (documents shuffled per copy, fixed seed) to --corpus-copies copies,
    enough sequences for 1,000 one-sequence shards.
    Measured from outside, polling /proc every 0.2 s for every process whose environment holds RANK: peak open file
    descriptors and peak resident memory (VmHWM) per rank. From the timestamped output lines: time from launch to
    the first step's log line; checkpoint write (the trainer's own "saved checkpoint (X s)"); for a resumed session,
    conversion + engine set-up + load ("converting" / "world:" line to "resumed from" line). From the sample logs
    (log.sample_log): every stream position read exactly once over the whole chain, and the global batch and
    accumulation steps of each session (metrics.jsonl).

    OFFLOAD (--offload, a separate run): zero.offload_optimizer=cpu at --offload-world ranks as 2 nodes, ZeRO 2 and
    3, a fresh run then a resume at half the ranks: what works, and the error of what does not.

Run
    python benchmarks/bench_scale.py                       # about 40 minutes on 2 shared cores
    python benchmarks/bench_scale.py --offload             # about 5 minutes -> scale_offload.json
    python benchmarks/bench_scale.py --worlds 2 4 --stages 1 --shard-counts 10 --out /tmp/s.json   # a smoke test

Output: a markdown table on stdout, JSON (--out, default benchmarks/results/cpu-2core/scale.json) with every
measurement and the environment, and a PNG beside it. A failed session is recorded with its output tail, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "cpu-2core" / "scale.json"
TINY = [
    "--model.overrides.hidden_size=64", "--model.overrides.intermediate_size=128",
    "--model.overrides.num_hidden_layers=2", "--model.overrides.num_attention_heads=4",
    "--model.overrides.max_position_embeddings=128", "--model.overrides.position_buckets=32",
    "--model.overrides.block_size=16", "--model.overrides.num_global_blocks=1",
    "--model.overrides.num_random_blocks=1", "--model.overrides.hidden_dropout_prob=0.0",
    "--model.overrides.attention_probs_dropout_prob=0.0",
    "--prepare.seq_len=128", "--data.eval_shards=0", "--batch.micro_batch_size=1",
    "--optim.warmup_steps=1", "--optim.lr=2e-3", "--checkpoint.keep_last=1", "--eval.every_steps=0",
    "--log.every_steps=1", "--log.sample_log=true", "--log.progress_bar=false", "--log.tensorboard=false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


# ----------------------------------------------------------------------------------------------------------------
# Data


def build_data(work: Path, copies: int, shard_counts: list[int], seed: int) -> dict[int, Path]:
    """One tokenizer; the corpus prepared once per shard count (shard_tokens chosen to give that many shards)."""
    from bigbird_ja.data import prepare, read_manifest, sample_documents
    from bigbird_ja.training.config import load_pretrain_config
    from bigbird_ja.training.trainer import ensure_data

    rng = random.Random(seed)
    docs = sample_documents()
    corpus = work / "corpus.txt"
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(copies):
            order = docs[:]
            rng.shuffle(order)
            f.write("\n\n".join(order) + "\n\n")
    tok = work / "tokenizer"
    base = work / "data-base"
    cfg = load_pretrain_config(REPO_ROOT / "configs/pretrain/tiny-cpu.yaml",
                               [f"--data.dir={base}", f"--data.tokenizer={tok}", f"--prepare.inputs=[{corpus}]",
                                "--prepare.seq_len=128", "--prepare.shard_tokens=1280"])
    ensure_data(cfg, log=lambda text: None)
    num_sequences = read_manifest(base)["totals"]["num_sequences"]
    dirs = {}
    for count in shard_counts:
        per_shard = max(1, num_sequences // count)
        out = work / f"data-{count}"
        prepare(tok, [corpus], out, seq_len=128, num_workers=0, shard_tokens=128 * per_shard, progress=False)
        dirs[count] = out
    dirs["tokenizer"] = tok
    return dirs


# ----------------------------------------------------------------------------------------------------------------
# One session: launch, watch /proc, timestamp lines


def _descendants(pids: list[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    rank = env.get(b"RANK")
    return int(rank) if rank is not None and rank.isdigit() else None


class Monitor(threading.Thread):
    """Peak descriptors and peak RSS of every rank process under the launchers, sampled every ``interval`` s."""

    def __init__(self, launchers: list[subprocess.Popen], interval: float = 0.2):
        super().__init__(daemon=True)
        self.launchers = launchers
        self.interval = interval
        self.stop = threading.Event()
        self.ranks: dict[int, dict] = {}  # rank -> {"pid", "peak_fds", "peak_rss_mib"}

    def run(self) -> None:
        pid_rank: dict[int, int] = {}
        while not self.stop.is_set():
            for pid in _descendants([p.pid for p in self.launchers]):
                # Only a found rank is cached: a launcher's child read before its exec has no RANK yet.
                rank = pid_rank.get(pid)
                if rank is None:
                    rank = _rank_of(pid)
                    if rank is None:
                        continue
                    pid_rank[pid] = rank
                try:
                    fds = len(os.listdir(f"/proc/{pid}/fd"))
                    with open(f"/proc/{pid}/status") as f:
                        status = dict(line.split(":", 1) for line in f if ":" in line)
                    hwm = int(status.get("VmHWM", "0 kB").split()[0]) / 1024
                except (OSError, ValueError):
                    continue
                entry = self.ranks.setdefault(rank, {"pid": pid, "peak_fds": 0, "peak_rss_mib": 0.0})
                if entry["pid"] != pid:  # a launcher helper that also carries RANK: keep the busier process
                    if fds < entry["peak_fds"]:
                        continue
                    entry["pid"] = pid
                entry["peak_fds"] = max(entry["peak_fds"], fds)
                entry["peak_rss_mib"] = max(entry["peak_rss_mib"], hwm)
            self.stop.wait(self.interval)


def _pump(proc: subprocess.Popen, lines: list, t0: float) -> None:
    for line in proc.stdout:
        lines.append((time.perf_counter() - t0, line.rstrip("\n")))


def torchrun_commands(world: int, nodes: int, args: list[str]) -> list[list[str]]:
    port = _free_port()
    per_node = world // nodes
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node),
             "--nproc_per_node", str(per_node), "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "bigbird_ja.cli", *args] for node in range(nodes)]


def run_session(world: int, nodes: int, args: list[str], timeout: float) -> dict:
    cmds = torchrun_commands(world, nodes, args)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for cmd in cmds]
    monitor = Monitor(procs)
    monitor.start()
    lines: list = []
    pumps = [threading.Thread(target=_pump, args=(p, lines, t0), daemon=True) for p in procs]
    for t in pumps:
        t.start()
    deadline = t0 + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.perf_counter())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append("timeout")
    for t in pumps:
        t.join(timeout=10)
    monitor.stop.set()
    monitor.join()
    wall = time.perf_counter() - t0
    result = {"world": world, "nodes": nodes, "returncodes": codes, "wall_s": wall,
              "ranks": {str(r): v for r, v in sorted(monitor.ranks.items())}}
    result.update(_timings(lines))
    if any(c != 0 for c in codes):
        result["error"] = "\n".join(text for _, text in lines[-60:])
    return result


def _timings(lines: list) -> dict:
    """Launch -> first step line; the checkpoint write the trainer reports; resume set-up + load."""
    first_step = next((t for t, text in lines if re.match(r"^step \d+/\d+ \| loss", text)), None)
    saved = [float(m.group(1)) for _, text in lines if (m := re.search(r"saved checkpoint \S+ \(([\d.]+) s\)", text))]
    start = next((t for t, text in lines if text.startswith("converting ")), None)
    start = start if start is not None else next((t for t, text in lines if text.startswith("world: ")), None)
    resumed = next((t for t, text in lines if text.startswith("resumed from ")), None)
    return {"launch_to_first_step_s": first_step, "checkpoint_write_s": saved[-1] if saved else None,
            "resume_setup_and_load_s": resumed - start if resumed is not None and start is not None else None,
            "universal_conversion": any(text.startswith("converting ") for _, text in lines)}


# ----------------------------------------------------------------------------------------------------------------
# Exactly-once accounting


def sample_accounting(out: Path, global_batch: int) -> dict:
    steps: dict[int, list[int]] = {}
    for path in sorted(out.glob("samples-rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "step" in record:
                steps.setdefault(record["step"], []).extend(record["positions"])
    positions = sorted(p for pos in steps.values() for p in pos)
    sessions = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in sessions if r["event"] == "start"]
    return {
        "steps": len(steps), "positions_read": len(positions),
        "exactly_once": positions == list(range(len(steps) * global_batch)),
        "every_step_full_batch": all(len(p) == global_batch for p in steps.values()),
        "sessions": [{"world_size": s["world_size"], "step": s["step"], "global_batch_size": s["global_batch_size"],
                      "grad_accum_steps": s["grad_accum_steps"]} for s in starts],
        "losses": {r["step"]: r["loss"] for r in sessions if r["event"] == "train"},
    }


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[4, 8, 16, 12, 4],
                        help="the chain: a fresh run at the first, each next resumes from the last checkpoint")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--shard-counts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--chain-shards", type=int, default=100, help="shards of the data the chains read")
    parser.add_argument("--two-nodes-from", type=int, default=16, help="worlds this large run as 2 nodes")
    parser.add_argument("--steps", type=int, default=2, help="steps per session")
    parser.add_argument("--global-batch", type=int, default=48)
    parser.add_argument("--corpus-copies", type=int, default=12)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per session")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--offload", action="store_true", help="only the offload rehearsal: --offload-world ranks "
                        "on 2 nodes, zero.offload_optimizer=cpu, ZeRO 2 and 3, a fresh run then a resume at half "
                        "the ranks; -> scale_offload.json")
    parser.add_argument("--offload-world", type=int, default=8)
    args = parser.parse_args(argv)
    if args.offload:
        return main_offload(args)
    for w in args.worlds:
        if args.global_batch % w:
            parser.error(f"--global-batch {args.global_batch} is not divisible by world size {w}")
    counts = sorted(set(args.shard_counts) | {args.chain_shards})
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    result = {"environment": environment(args), "chains": {}, "shard_sweep": {}}
    try:
        print("preparing data ...", file=sys.stderr, flush=True)
        dirs = build_data(work, args.corpus_copies, counts, args.seed)
        tok = dirs.pop("tokenizer")
        result["data"] = {str(c): _shards(d) for c, d in dirs.items()}

        def session(out: Path, data: Path, world: int, stage: int, steps: int, resume: bool) -> dict:
            nodes = 2 if world >= args.two_nodes_from and world % 2 == 0 else 1
            extra = ["--train.activation_checkpointing=true"] if stage == 3 else []
            cli = ["pretrain", "--config", "configs/pretrain/tiny-cpu.yaml", f"--run.output_dir={out}",
                   f"--data.dir={data}", f"--data.tokenizer={tok}", *TINY, f"--zero.stage={stage}", *extra,
                   f"--batch.global_batch_size={args.global_batch}", f"--train.max_steps={steps}",
                   f"--checkpoint.every_steps={args.steps}", *(["--resume", "auto"] if resume else [])]
            print(f"  world {world} ({nodes} node(s)), ZeRO-{stage}, to step {steps}"
                  f"{' (resume)' if resume else ''} ...", file=sys.stderr, flush=True)
            r = run_session(world, nodes, cli, args.timeout)
            r.update(stage=stage, resumed=resume)
            print(f"    {r['wall_s']:.0f} s, codes {r['returncodes']}", file=sys.stderr, flush=True)
            if "error" in r:
                print("\n".join(r["error"].splitlines()[-25:]), file=sys.stderr, flush=True)
            return r

        for stage in args.stages:
            out = work / f"chain-zero{stage}"
            runs = []
            for k, world in enumerate(args.worlds):
                runs.append(session(out, dirs[args.chain_shards], world, stage, args.steps * (k + 1), k > 0))
                if "error" in runs[-1]:
                    break
            chain = {"runs": runs}
            if (out / "metrics.jsonl").exists():
                chain["samples"] = sample_accounting(out, args.global_batch)
            result["chains"][str(stage)] = chain
            shutil.rmtree(out, ignore_errors=True)
        for count in args.shard_counts:
            out = work / f"shards-{count}"
            result["shard_sweep"][str(count)] = session(out, dirs[count], args.worlds[0], 1, args.steps, False)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def main_offload(args) -> int:
    """Multi-node CPU offload (the other failure of the 960-GPU run): what runs, what fails, with the error."""
    work = Path(tempfile.mkdtemp(prefix="bench-scale-offload-"))
    result = {"environment": environment(args), "runs": []}
    try:
        dirs = build_data(work, 2, [10], args.seed)
        for stage in (2, 3):
            out = work / f"offload-zero{stage}"
            for world, steps, resume in ((args.offload_world, 2, False), (args.offload_world // 2, 3, True)):
                cli = ["pretrain", "--config", "configs/pretrain/tiny-cpu.yaml", f"--run.output_dir={out}",
                       f"--data.dir={dirs[10]}", f"--data.tokenizer={dirs['tokenizer']}", *TINY,
                       f"--zero.stage={stage}", "--zero.offload_optimizer=cpu", "--batch.global_batch_size=8",
                       f"--train.max_steps={steps}", "--checkpoint.every_steps=2",
                       *(["--resume", "auto"] if resume else [])]
                print(f"  offload: world {world} on 2 nodes, ZeRO-{stage}{' (resume)' if resume else ''} ...",
                      file=sys.stderr, flush=True)
                r = run_session(world, 2, cli, args.timeout)
                r.update(stage=stage, resumed=resume, ok="error" not in r)
                if (out / "metrics.jsonl").exists():
                    r["losses"] = {rec["step"]: rec["loss"] for rec in map(json.loads, (out / "metrics.jsonl")
                                                                            .read_text().splitlines())
                                   if rec["event"] == "train"}
                result["runs"].append(r)
                print(f"    {'ok' if r['ok'] else 'FAILED'} in {r['wall_s']:.0f} s", file=sys.stderr, flush=True)
                if not r["ok"]:
                    break
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = ["| ZeRO | world | nodes | resumed | result | launch to first step s | checkpoint write s | losses |",
             "|---:|---:|---:|---|---|---:|---:|---|"]
    for r in result["runs"]:
        losses = ", ".join(f"{v:.3f}" for v in r.get("losses", {}).values())
        lines.append(f"| {r['stage']} | {r['world']} | {r['nodes']} | {r['resumed']} | "
                     f"{'ok' if r['ok'] else 'failed: ' + r['error'].splitlines()[-1][:120]} | "
                     f"{_fmt(r['launch_to_first_step_s'])} | {_fmt(r['checkpoint_write_s'], '.2f')} | {losses} |")
    print("\n".join(lines))
    out = args.out.with_name("scale_offload.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


def _shards(data: Path) -> int:
    return len(json.loads((data / "manifest.json").read_text())["shards"])


def _per_rank(run: dict, key: str) -> tuple[float, float]:
    values = [v[key] for v in run["ranks"].values()]
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


def _fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def table(result: dict) -> str:
    lines = ["| ZeRO | world | nodes | ranks seen | peak FDs per rank (min-max) | peak RSS MiB per rank (min-max) | "
             "launch to first step s | checkpoint write s | resume: convert + set-up + load s | wall s |",
             "|---:|---:|---:|---:|---|---|---:|---:|---:|---:|"]
    for stage, chain in result["chains"].items():
        for r in chain["runs"]:
            fds, rss = _per_rank(r, "peak_fds"), _per_rank(r, "peak_rss_mib")
            status = "" if "error" not in r else " (failed)"
            lines.append(f"| {stage} | {r['world']}{status} | {r['nodes']} | {len(r['ranks'])} | {fds[0]}-{fds[1]} | "
                         f"{rss[0]:.0f}-{rss[1]:.0f} | {_fmt(r['launch_to_first_step_s'])} | "
                         f"{_fmt(r['checkpoint_write_s'], '.2f')} | {_fmt(r['resume_setup_and_load_s'])} | "
                         f"{r['wall_s']:.0f} |")
    lines += ["", "| shards | world | peak FDs per rank (min-max) | peak RSS MiB per rank (min-max) | "
              "launch to first step s |", "|---:|---:|---|---|---:|"]
    for count, r in result["shard_sweep"].items():
        fds, rss = _per_rank(r, "peak_fds"), _per_rank(r, "peak_rss_mib")
        lines.append(f"| {count} | {r['world']} | {fds[0]}-{fds[1]} | {rss[0]:.0f}-{rss[1]:.0f} | "
                     f"{_fmt(r['launch_to_first_step_s'])} |")
    lines += ["", "| ZeRO | worlds | steps | positions read | exactly once | global batch per session | "
              "accumulation per session |", "|---:|---|---:|---:|---|---|---|"]
    for stage, chain in result["chains"].items():
        s = chain.get("samples")
        if s:
            lines.append(f"| {stage} | {' -> '.join(str(x['world_size']) for x in s['sessions'])} | {s['steps']} | "
                         f"{s['positions_read']} | {s['exactly_once'] and s['every_step_full_batch']} | "
                         f"{[x['global_batch_size'] for x in s['sessions']]} | "
                         f"{[x['grad_accum_steps'] for x in s['sessions']]} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for stage, chain in result["chains"].items():
        runs = sorted((r for r in chain["runs"] if r["ranks"]), key=lambda r: (r["world"], r["resumed"]))
        worlds = [r["world"] for r in runs]
        axes[0].plot(worlds, [_per_rank(r, "peak_fds")[1] for r in runs], "o", label=f"ZeRO-{stage}")
        axes[1].plot(worlds, [_per_rank(r, "peak_rss_mib")[1] for r in runs], "o", label=f"ZeRO-{stage}")
    axes[0].set_xlabel("world size")
    axes[0].set_ylabel("peak open FDs, busiest rank")
    axes[1].set_xlabel("world size")
    axes[1].set_ylabel("peak RSS MiB, largest rank")
    sweep = result["shard_sweep"]
    counts = [int(c) for c in sweep]
    axes[2].plot(counts, [_per_rank(r, "peak_fds")[1] for r in sweep.values()], "s-")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("data shards")
    axes[2].set_ylabel("peak open FDs, busiest rank")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_ylim(bottom=0)
    fig.suptitle("bigbird-ja pretrain rehearsal: tiny model, gloo, 1 thread/rank, 2 shared CPU cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def environment(args) -> dict:
    import platform

    import deepspeed
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from envinfo import cpu_model, provenance

    return {"device": {"kind": "cpu", "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                       "platform": platform.platform(), "shared": "other jobs ran beside this benchmark"},
            "python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            **provenance(), "settings": vars(args) | {"out": str(args.out)}}


if __name__ == "__main__":
    sys.exit(main())
