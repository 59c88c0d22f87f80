"""Is `bigbird-ja plan` right? Its memory and step-time predictions against real `bigbird-ja pretrain` runs on CPU.

Memory. Real runs of the entry point under the DeepSpeed launcher (2 processes, gloo, fp32, one thread each) over
ZeRO 0-3 x activation checkpointing off/on x two models (tiny: configs/model/tiny-cpu.yaml; small: 256 x 4 layers
x 4 heads) x three sequence lengths (256, 512, 1,024), micro-batch 2, 2 optimizer steps each (the second step is the
first with the optimizer states allocated), a balanced half of that grid (FULL_GRID). Measured: rank 0's
peak resident memory (ru_maxrss, logged by the trainer as peak_memory_gib; the training step is the peak: with
Linux's VmHWM reset when training starts, the floor runs read the same), with glibc's mmap threshold fixed
(MALLOC_ENV below: freed tensors go back to the system, so RSS follows the live tensors, not the heap's high-water
mark). The planner predicts the memory of the training state (weights, gradients, optimizer
states, DeepSpeed buffers, activations), not the interpreter, torch, DeepSpeed, gloo, the tokenizer and the
allocator's floor. That floor is measured, per ZeRO stage and checkpointing setting (checkpointing loads more code
on first use: a few MiB of RSS, as much as a tiny run's checkpointed activations), by the same run with a floor
model (32 x 1 layer, 256 tokens: FLOOR below) and its own (small) prediction taken off:

    measured part = peak RSS - (peak RSS of the floor run - the planner's prediction for the floor run)

and the table compares the measured part with the planner's prediction (`planner.memory_breakdown` for a CPU:
device="cpu", allowance excluded: on CPU there is no CUDA context or caching allocator). The runs import the
package of the checkout this script is in (PYTHONPATH), so a snapshot copy measures its own code.

Step time. The CPU's "peak" is its measured fp32 matmul rate on one thread (`matmul_rate`, a 1,024^3 matmul, best
of 5): the planner's compute time at that peak (MFU 1) against the step times of
benchmarks/results/cpu-2core/pretrain.json (bench_pretrain.py, the tiny preset, 2 processes) and of the runs here;
the ratio measured / predicted is the CPU's achieved fraction of its matmul rate (documented in the README as the
calibration, not hidden in the planner).

Writes benchmarks/results/cpu-2core/planner.json / .md / .png. A failed case is recorded, not fatal.

    python benchmarks/bench_planner.py                    # measure (about 15 minutes on 2 cores) and compare
    python benchmarks/bench_planner.py --reuse             # recompute predictions from the measured runs in the JSON
    python benchmarks/bench_planner.py --cases tiny:1024:0:0 --out /tmp/x/planner.json   # single runs (+ floors)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parent.parent
PRESET = "configs/pretrain/tiny-cpu.yaml"
OUT = REPO / "benchmarks" / "results" / "cpu-2core" / "planner.json"
MICRO, WORLD, STEPS = 2, 2, 2
SEQ_LENS = (256, 512, 1024)
MODELS = {
    "tiny": {"preset": "configs/model/tiny-cpu.yaml", "overrides": {}},
    "small": {"preset": "configs/model/tiny-cpu.yaml",
              "overrides": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                            "intermediate_size": 1024}},
}
# The floor run: what every run costs besides the training state (its own small prediction is taken off).
FLOOR = {"preset": "configs/model/tiny-cpu.yaml",
         "overrides": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                       "position_buckets": 16}}
FLOOR_SEQ = 256
# glibc's malloc serves a block above its mmap threshold from its own mapping, returned to the system when freed,
# and one below it from the heap, kept when freed. The threshold is dynamic by default: each freed mapping raises it
# to that block's size (up to 32 MiB), so after the first step the activations come from the heap, and the heap
# keeps the high-water mark of its fragments: peak RSS then exceeds the bytes of live tensors by 20-40% (measured:
# a tiny-model step at 1,024 tokens, 274 MiB of RSS above the start for 192 MiB of live tensors). A fixed threshold
# (setting it turns the dynamic rule off) gives every tensor above 64 KiB its own mapping: RSS follows the live
# tensors. The allocator's caching is not what the planner predicts (on a GPU: the allowance).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# The full grid (2 x 3 x 4 x 2 = 48 runs) takes over an hour on 2 shared cores; the default runs half of it,
# balanced: each (model, length) has two stages with checkpointing and two without, each stage both settings.
FULL_GRID = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_args(model: dict, seq: int) -> list[str]:
    args = [f"--model.preset={model['preset']}", f"--model.overrides.max_position_embeddings={max(seq, 1024)}"]
    return args + [f"--model.overrides.{k}={v}" for k, v in model["overrides"].items()]


def run_case(name: str, model: dict, seq: int, stage: int, ac: bool, data: Path, tok: Path, work: Path) -> dict:
    out = work / f"{name}-{seq}-z{stage}-ac{int(ac)}"
    args = ["pretrain", "--config", PRESET, f"--run.output_dir={out}", f"--data.dir={data}",
            f"--data.tokenizer={tok}", "--data.eval_shards=0", f"--zero.stage={stage}",
            f"--train.activation_checkpointing={str(ac).lower()}", f"--train.max_steps={STEPS}",
            f"--batch.micro_batch_size={MICRO}", f"--batch.global_batch_size={MICRO * WORLD}",
            "--log.every_steps=1", "--checkpoint.every_steps=0", "--eval.every_steps=0", "--optim.warmup_steps=2",
            "--log.progress_bar=false", "--log.tensorboard=false", "--preflight.check_disk=false",
            *_model_args(model, seq)]
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(WORLD), "--master_port", str(_free_port()), "--module",
           "bigbird_ja.cli", *args]
    # the package of this checkout (e.g. a snapshot copy), not whichever one the environment would find
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=path,
               **MALLOC_ENV)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    case = {"model": name, "seq_len": seq, "zero_stage": stage, "activation_checkpointing": ac,
            "micro_batch": MICRO, "world": WORLD, "wall_s": round(time.perf_counter() - started, 1)}
    if proc.returncode != 0:
        case["error"] = (proc.stdout + proc.stderr)[-2000:]
        return case
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    start = next(r for r in records if r["event"] == "start")
    case.update(num_params=start["num_params"], vocab_size=None,
                step_time_s=statistics.median(r["step_time_s"] for r in train[1:] or train),
                peak_rss_gib=max(r["peak_memory_gib"] for r in train))
    config = json.loads((out / "model_config.json").read_text())
    case["vocab_size"] = config["vocab_size"]
    return case


def prepare_data(work: Path, seq: int, tok: Path) -> Path:
    from bigbird_ja.training import load_pretrain_config
    from bigbird_ja.training.trainer import ensure_data

    data = work / f"data-{seq}"
    cfg = load_pretrain_config(REPO / PRESET, [f"--data.dir={data}", f"--data.tokenizer={tok}",
                                               f"--prepare.seq_len={seq}", f"--prepare.shard_tokens={seq * 4}"])
    ensure_data(cfg, log=lambda text: None)
    return data


def measure(only: list[str] | None = None) -> list[dict]:
    """The grid (or ``only``: MODEL:SEQ:STAGE:CKPT items, e.g. tiny:1024:0:0), after the floor runs it needs."""
    cases = []
    with tempfile.TemporaryDirectory(prefix="bench-planner-") as tmp:
        work = Path(tmp)
        tok = work / "tokenizer"
        datas = {seq: prepare_data(work, seq, tok) for seq in sorted({*SEQ_LENS, FLOOR_SEQ})}
        grid = [(name, model, seq, stage, ac) for m, (name, model) in enumerate(MODELS.items())
                for s, seq in enumerate(SEQ_LENS) for stage in range(4) for ac in (False, True)
                if FULL_GRID or ac == bool((m + s + stage) % 2)]
        if only:
            picked = [item.split(":") for item in only]
            grid = [(name, MODELS[name], int(seq), int(stage), ac == "1") for name, seq, stage, ac in picked]
        grid = [("floor", FLOOR, FLOOR_SEQ, stage, ac) for stage, ac in sorted({(g[3], g[4]) for g in grid})] + grid
        for name, model, seq, stage, ac in grid:
            case = run_case(name, model, seq, stage, ac, datas[seq], tok, work)
            print(json.dumps({k: v for k, v in case.items() if k != "error"} | ({"error": "yes"} if "error" in case
                                                                                else {})), flush=True)
            cases.append(case)
    return cases


def matmul_rate(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of one fp32 matmul on one thread: the CPU's "peak" for the step-time calibration."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best


def predicted_part(case: dict) -> tuple[float, dict]:
    """The planner's prediction (bytes, allowance excluded) for one measured run, and its breakdown."""
    from bigbird_ja.configuration import build_model_config
    from bigbird_ja.training import planner

    model = FLOOR if case["model"] == "floor" else MODELS[case["model"]]
    config = build_model_config(model["preset"], {**model["overrides"], "vocab_size": case["vocab_size"],
                                                  "max_position_embeddings": max(case["seq_len"], 1024)})
    facts = planner.model_facts(config, case["seq_len"], "fp32")
    parts = planner.memory_breakdown(facts, case["zero_stage"], case["world"], case["micro_batch"],
                                     case["activation_checkpointing"], "fp32", allowance=False, device="cpu")
    return parts["total"], parts, config


def _setting(case: dict) -> tuple[int, bool]:
    return case["zero_stage"], case["activation_checkpointing"]


def compare(cases: list[dict], rate: float, environment: dict) -> dict:
    from bigbird_ja.training.flops import hardware_training_flops

    floors = {}
    for case in cases:
        if case["model"] == "floor" and "error" not in case:
            predicted, _, _ = predicted_part(case)
            floors[_setting(case)] = case["peak_rss_gib"] * 2**30 - predicted
    rows = []
    for case in cases:
        if case["model"] == "floor" or "error" in case or _setting(case) not in floors:
            continue
        predicted, parts, config = predicted_part(case)
        measured = case["peak_rss_gib"] * 2**30 - floors[_setting(case)]
        flops = hardware_training_flops(config, case["seq_len"], case["micro_batch"], 1,
                                        case["activation_checkpointing"])
        rows.append({**{k: case[k] for k in ("model", "seq_len", "zero_stage", "activation_checkpointing",
                                             "num_params", "peak_rss_gib", "step_time_s")},
                     "floor_gib": floors[_setting(case)] / 2**30, "measured_part_gib": measured / 2**30,
                     "predicted_gib": predicted / 2**30, "error": predicted / measured - 1,
                     "predicted_parts_gib": {k: v / 2**30 for k, v in parts.items()},
                     "predicted_compute_s_at_matmul_rate": flops / rate,
                     "achieved_fraction_of_matmul_rate": flops / rate / case["step_time_s"]})
    bench = REPO / "benchmarks" / "results" / "cpu-2core" / "pretrain.json"
    step_rows = []
    if bench.exists():
        from bigbird_ja.configuration import build_model_config

        previous = json.loads(bench.read_text())
        for case in previous.get("cpu", []):
            if "error" in case:
                continue
            config = build_model_config("configs/model/tiny-cpu.yaml", {"max_position_embeddings": 256,
                                                                         "vocab_size": 1319})
            per_rank = case["global_batch"] // case["processes"]
            flops = hardware_training_flops(config, case["seq_len"], per_rank)
            step_rows.append({"zero_stage": case["zero_stage"], "measured_step_s": case["step_time_s"],
                              "predicted_compute_s_at_matmul_rate": flops / rate,
                              "achieved_fraction_of_matmul_rate": flops / rate / case["step_time_s"]})
    return {"question": "does bigbird-ja plan predict the peak memory and step time of real pretrain runs?",
            "environment": environment, "matmul_flops_per_s": rate, "floors_gib": {
                f"zero{stage}-ckpt{int(ac)}": v / 2**30 for (stage, ac), v in floors.items()},
            "runs": cases, "memory": rows, "step_time_bench_pretrain": step_rows}


def tables(result: dict) -> str:
    rows = result["memory"]
    lines = ["Predicted vs measured peak memory per rank (CPU, 2 processes, gloo, fp32, micro-batch 2); measured part "
             "= peak RSS - floor of the stage and checkpointing setting (interpreter, libraries, allocator; floor "
             "run minus its prediction); glibc mmap threshold fixed at 64 KiB (RSS follows the live tensors)",
             "", "| model | params | seq | ZeRO | ckpt | peak RSS GiB | floor GiB | measured part GiB | predicted GiB "
             "| error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['num_params'] / 1e6:.2f} M | {r['seq_len']} | {r['zero_stage']} | "
                     f"{'on' if r['activation_checkpointing'] else 'off'} | {r['peak_rss_gib']:.3f} | "
                     f"{r['floor_gib']:.3f} | {r['measured_part_gib']:.3f} | {r['predicted_gib']:.3f} | "
                     f"{r['error']:+.1%} |")
    if rows:
        errors = sorted(abs(r["error"]) for r in rows)
        within = sum(e <= 0.15 for e in errors)
        lines += ["", f"{within} of {len(rows)} within 15%; median |error| {statistics.median(errors):.1%}, "
                  f"largest {errors[-1]:.1%}"]
    rate = result["matmul_flops_per_s"]
    lines += ["", f"Step time at the CPU's measured matmul rate ({rate / 1e9:.1f} GFLOP/s, one thread, 1,024^3 fp32) "
              "as peak: bench_pretrain.py's runs (tiny preset, 256 tokens, 2 processes)", "",
              "| ZeRO | measured step s | predicted compute s (MFU 1) | achieved fraction of the matmul rate |",
              "|---|---|---|---|"]
    for r in result["step_time_bench_pretrain"]:
        lines.append(f"| {r['zero_stage']} | {r['measured_step_s']:.3f} | {r['predicted_compute_s_at_matmul_rate']:.4f} "
                     f"| {r['achieved_fraction_of_matmul_rate']:.1%} |")
    if rows:
        fr = [r["achieved_fraction_of_matmul_rate"] for r in rows]
        lines += ["", f"runs of this benchmark: achieved fraction of the matmul rate {min(fr):.1%} - {max(fr):.1%} "
                  f"(median {statistics.median(fr):.1%})"]
    lines += ["", f"Environment: {result['environment'].get('note', '')}; {result['environment'].get('date_utc')}"]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["memory"]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 5))
    for model, marker in (("tiny", "o"), ("small", "s")):
        for ac, color in ((False, "tab:blue"), (True, "tab:orange")):
            pts = [r for r in rows if r["model"] == model and r["activation_checkpointing"] == ac]
            if pts:
                ax.scatter([r["measured_part_gib"] for r in pts], [r["predicted_gib"] for r in pts], marker=marker,
                           color=color, label=f"{model}, checkpointing {'on' if ac else 'off'}")
    top = max(max(r["measured_part_gib"], r["predicted_gib"]) for r in rows) * 1.1
    ax.plot([0, top], [0, top], "k-", lw=0.8)
    ax.plot([0, top], [0, top * 1.15], "k:", lw=0.6)
    ax.plot([0, top], [0, top * 0.85], "k:", lw=0.6, label="+-15%")
    ax.set_xlabel("measured peak RSS - floor (GiB)")
    ax.set_ylabel("planner's prediction (GiB)")
    ax.set_title("bigbird-ja plan vs real pretrain runs (CPU, 2 ranks)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reuse", action="store_true", help="take the measured runs from the JSON, only predict")
    parser.add_argument("--runs-log", help="take the measured runs from a log of this script's JSON lines")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--cases", nargs="+", metavar="MODEL:SEQ:STAGE:CKPT",
                        help="measure only these runs (and their stages' floor runs), e.g. tiny:1024:0:0 "
                             "small:512:3:1; write them with --out elsewhere")
    parser.add_argument("--glibc-default", action="store_true",
                        help="measure with glibc's default (dynamic) mmap threshold: RSS then keeps the heap's "
                             "fragments (what a CPU user sees; not what the planner predicts)")
    parser.add_argument("--note", default="", help="said in the environment block (e.g. what the checkout is)")
    args = parser.parse_args()
    if args.glibc_default:
        MALLOC_ENV.clear()
    out = Path(args.out)
    if args.runs_log:
        from bench_pretrain import environment as env_info

        cases = [json.loads(line) for line in Path(args.runs_log).read_text().splitlines() if line.startswith("{")]
        rate = float(next(line.split()[1] for line in Path(args.runs_log).read_text().splitlines()
                          if line.startswith("rate ")))
        environment = env_info()
        environment["note"] = "2-core machine shared with 3 other jobs while measuring"
    elif args.reuse:
        previous = json.loads(out.read_text())
        cases, rate, environment = previous["runs"], previous["matmul_flops_per_s"], previous["environment"]
    else:
        from bench_pretrain import environment as env_info

        rate = matmul_rate()
        cases = measure(args.cases)
        environment = env_info()
        import bigbird_ja

        environment.update(note=" ".join(filter(None, ["2-core machine shared with other jobs while measuring",
                                                       args.note])),
                           package=str(Path(bigbird_ja.__file__).parent), malloc_env=MALLOC_ENV)
        out.parent.mkdir(parents=True, exist_ok=True)  # the measurements first: comparing is cheap to redo
        out.write_text(json.dumps({"runs": cases, "matmul_flops_per_s": rate, "environment": environment}, indent=1))
    result = compare(cases, rate, environment)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    table = tables(result)
    out.with_suffix(".md").write_text(table + "\n")
    plot(result, out.with_suffix(".png"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
