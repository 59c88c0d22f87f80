"""What does `bigbird-ja pretrain` cost per step, per ZeRO stage, and (on a GPU) how fast is the base model?

CPU (always): the tiny preset (configs/pretrain/tiny-cpu.yaml: 128 hidden x 2 layers, 256-token sequences, global
batch 8, fp32) trained by the real entry point under the DeepSpeed launcher (gloo) for each ZeRO stage, with
--nprocs processes (default 2). From the run's metrics.jsonl, after the first --skip steps: median step time,
median tokens/s and samples/s (all ranks together), and rank 0's peak resident memory (ru_maxrss: the whole
process, model, optimizer, DeepSpeed buffers and the interpreter).

GPU (when CUDA is available): the base model (configs/model/base-4096.yaml, vocab 32,000) on one GPU, 4,096-token
sequences, bf16 autocast, torch's fused AdamW, random tokens with 15% of positions predicted, the preset's dropout.
For the block-sparse model with the fastest backend ("auto": the fused Triton kernels on CUDA) and for the same
model with dense attention (attention_type=full, same backend): the largest micro-batch that fits (doubling from 1
until out of memory) and, at it, tokens/s, model TFLOP/s and MFU. FLOPs are bigbird_ja.training.flops.training_flops:
3 x the forward, the attention counted over the attended block pairs of the layout (dense: all pairs), padding
included; MFU against the device's bf16 peak (flops.PEAK_TFLOPS).

--gpu-only skips the CPU table (it needs DeepSpeed, which a GPU image may lack; without DeepSpeed the CPU table is
skipped anyway, with a line saying so). --micro-batches tries the given sizes, largest first, and keeps the first
that fits (instead of doubling until out of memory); --peak-tflops (a measured bf16 matmul peak) adds MFU against it;
--dry-run is the GPU case's CPU stand-in (a tiny model, 128 tokens, float32, the Triton kernels interpreted).

Writes <out>.json (numbers + environment; rewritten after each case), <out>.md (the tables) and <out>.png; prints the
tables. A failed case is recorded with its error, not fatal.

    python benchmarks/bench_pretrain.py                                # -> benchmarks/results/cpu-2core/pretrain.*
    python benchmarks/bench_pretrain.py --stages 2 --steps 10 --out /tmp/p.json
    python benchmarks/bench_pretrain.py --gpu-only --cases block_sparse --micro-batches 16 8 4 --peak-tflops 700
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_case(stage: int, nprocs: int, steps: int, skip: int, data: Path, tok: Path, work: Path, threads: int) -> dict:
    out = work / f"zero{stage}"
    args = ["pretrain", "--config", PRESET, f"--run.output_dir={out}", f"--data.dir={data}",
            f"--data.tokenizer={tok}", f"--zero.stage={stage}", f"--train.max_steps={steps}",
            "--log.every_steps=1", "--checkpoint.every_steps=0", "--eval.every_steps=0",
            "--log.progress_bar=false", "--log.tensorboard=false", "--optim.warmup_steps=2"]
    if nprocs == 1:
        cmd = [sys.executable, "-m", "bigbird_ja.cli", *args]
    else:
        launcher = Path(sys.executable).parent / "deepspeed"
        cmd = [str(launcher), "--num_gpus", str(nprocs), "--master_port", str(_free_port()), "--module",
               "bigbird_ja.cli", *args]
    # the CPU table stays a CPU measurement on a GPU machine too (the trainer would take the GPU otherwise)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    case = {"zero_stage": stage, "processes": nprocs, "wall_s": round(time.perf_counter() - started, 1)}
    if proc.returncode != 0:
        case["error"] = (proc.stdout + proc.stderr)[-2000:]
        return case
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train" and r["step"] > skip]
    start = next(r for r in records if r["event"] == "start")
    case.update(
        steps_measured=len(train), global_batch=start["global_batch_size"], seq_len=start["seq_len"],
        num_params=start["num_params"],
        step_time_s=statistics.median(r["step_time_s"] for r in train),
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in train),
        samples_per_s=statistics.median(r["samples_per_s"] for r in train),
        peak_memory_gib_rank0=max(r["peak_memory_gib"] for r in train),
        loss_first=train[0]["loss"], loss_last=train[-1]["loss"],
    )
    return case


GPU_CASES = {"block_sparse": ("block_sparse, auto backend", {"attention_type": "block_sparse"}),
             "dense": ("dense (attention_type=full)", {"attention_type": "full"})}


def gpu_cases(steps: int, cases=tuple(GPU_CASES), micro_batches=None, measured_peak=None, dry_run=False,
              on_case=lambda results: None) -> list[dict]:
    """The base model on one GPU: largest micro-batch and throughput, sparse (auto backend) vs dense attention.

    micro_batches: sizes tried largest first, the first that fits kept; None: doubling from 1 until out of memory.
    dry_run: the CPU stand-in (tiny model, 128 tokens, float32, the Triton backend interpreted).
    on_case(results) is called after each case (to save what finished)."""
    import contextlib

    import torch
    import yaml

    from bigbird_ja import BigBirdJaConfig
    from bigbird_ja.modeling import BigBirdJaForMaskedLM
    from bigbird_ja.training.flops import peak_tflops, training_flops

    device = torch.device("cpu" if dry_run else "cuda")
    name = "CPU (dry run)" if dry_run else torch.cuda.get_device_name()
    peak = peak_tflops(name, "bf16")
    seq = 128 if dry_run else 4096

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    results = []
    for key in cases:
        label, overrides = GPU_CASES[key]
        values = yaml.safe_load((REPO / "configs/model/base-4096.yaml").read_text(encoding="utf-8"))
        values.update(overrides, attention_backend="auto")
        if dry_run:
            values.update(vocab_size=1000, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=128, max_position_embeddings=seq, block_size=32, position_buckets=32,
                          num_global_blocks=1, num_random_blocks=0,
                          attention_backend="triton")
        config = BigBirdJaConfig(**values)

        def run(micro: int) -> dict:
            torch.manual_seed(0)
            model = BigBirdJaForMaskedLM(config).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            gen = torch.Generator(device="cpu").manual_seed(0)
            ids = torch.randint(5, config.vocab_size, (micro, seq), generator=gen).to(device)
            labels = torch.where(torch.rand(micro, seq, generator=gen).to(device) < 0.15, ids, -100)
            mask = torch.ones_like(ids)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for i in range(steps):
                sync()
                t = time.perf_counter()
                autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                            else contextlib.nullcontext())
                with autocast:
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync()
                times.append(time.perf_counter() - t)
            step = statistics.median(times[2:] if len(times) > 3 else times)
            tflops = training_flops(config, seq, micro) / step / 1e12
            out = {"micro_batch": micro, "step_time_s": step, "tokens_per_s": micro * seq / step,
                   "tflops": tflops, "mfu": tflops / peak if peak else None,
                   "mfu_vs_measured_peak": tflops / measured_peak if measured_peak else None,
                   "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
            del model, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return out

        case = {"case": label, "device": name, "seq_len": seq, "backend": config.attention_backend}
        best = None
        sizes = sorted(micro_batches, reverse=True) if micro_batches else [2**i for i in range(9)]
        for micro in sizes:
            started = time.perf_counter()
            try:
                result = run(micro)
            except torch.OutOfMemoryError:
                print(f"{label}: micro-batch {micro} is out of memory", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if micro_batches:
                    continue  # try the next smaller size
                break
            except Exception as err:  # recorded, not fatal
                case["error"] = f"{type(err).__name__}: {err}"[:2000]
                break
            print(f"{label}: micro-batch {micro}: {result['tokens_per_s']:,.0f} tokens/s, {result['tflops']:.1f} "
                  f"TFLOP/s ({time.perf_counter() - started:.0f} s)", flush=True)
            best = result
            if micro_batches:
                break  # the largest that fits
        if best is not None:
            case.update(largest_micro_batch=best["micro_batch"], **{k: v for k, v in best.items()
                                                                    if k != "micro_batch"})
        results.append(case)
        on_case(results)
    return results


def environment() -> dict:
    from importlib import metadata

    import torch
    from envinfo import cpu_description, provenance

    try:
        deepspeed = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        deepspeed = None
    env = {"device": cpu_description(), "python": sys.version.split()[0], "torch": torch.__version__,
           "deepspeed": deepspeed, "transformers": metadata.version("transformers"), **provenance()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def tables(result: dict) -> str:
    lines = [] if not result["cpu"] else [
        f"CPU: tiny preset, {result['cpu'][0].get('processes', '?')} processes (gloo), fp32, "
        f"{result['environment']['device'].get('cpu_model')}", "",
        "| ZeRO stage | step time (s) | tokens/s | samples/s | peak RSS rank 0 (GiB) | loss first -> last |",
        "|---|---|---|---|---|---|"]
    for c in result["cpu"]:
        if "error" in c:
            lines.append(f"| {c['zero_stage']} | failed | | | | {c['error'].splitlines()[-1][:60]} |")
        else:
            lines.append(f"| {c['zero_stage']} | {c['step_time_s']:.3f} | {c['tokens_per_s']:,.0f} | "
                         f"{c['samples_per_s']:,.1f} | {c['peak_memory_gib_rank0']:.2f} | "
                         f"{c['loss_first']:.3f} -> {c['loss_last']:.3f} |")
    if result.get("gpu"):
        first = result["gpu"][0]
        precision = "float32, tiny model" if result["settings"].get("dry_run") else "bf16"
        lines += ["", f"GPU: base model, {first.get('seq_len', 4096):,} tokens, {precision}, one {first['device']}", "",
                  "| attention | largest micro-batch | tokens/s | TFLOP/s | MFU (datasheet) | MFU (measured peak) | "
                  "peak memory (GiB) |", "|---|---|---|---|---|---|---|"]

        def pct(value):
            return "n/a" if value is None else f"{value:.1%}"

        for c in result["gpu"]:
            if "largest_micro_batch" not in c:
                lines.append(f"| {c['case']} | failed: {c.get('error', 'out of memory')[:60]} | | | | | |")
            else:
                memory = "n/a" if c["peak_memory_gib"] is None else f"{c['peak_memory_gib']:.1f}"
                lines.append(f"| {c['case']} | {c['largest_micro_batch']} | {c['tokens_per_s']:,.0f} | "
                             f"{c['tflops']:.1f} | {pct(c['mfu'])} | {pct(c.get('mfu_vs_measured_peak'))} | "
                             f"{memory} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [c for c in result["cpu"] if "error" not in c]
    if not ok:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    labels = [f"ZeRO-{c['zero_stage']}" for c in ok]
    axes[0].bar(labels, [c["tokens_per_s"] for c in ok], color="tab:blue")
    axes[0].set_ylabel("tokens/s (all ranks)")
    axes[1].bar(labels, [c["peak_memory_gib_rank0"] for c in ok], color="tab:orange")
    axes[1].set_ylabel("peak RSS, rank 0 (GiB)")
    fig.suptitle(f"bigbird-ja pretrain, tiny preset, {ok[0]['processes']} CPU processes (gloo)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out (warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process")
    parser.add_argument("--gpu-steps", type=int, default=8)
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU (DeepSpeed) table")
    parser.add_argument("--cases", nargs="+", choices=list(GPU_CASES), default=list(GPU_CASES),
                        help="GPU cases (default: both)")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=None,
                        help="GPU micro-batch sizes to try, largest first; the first that fits is kept "
                        "(default: doubling from 1 until out of memory)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="measured bf16 matmul peak for MFU")
    parser.add_argument("--dry-run", action="store_true", help="the GPU case's CPU stand-in (implies --gpu-only)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/pretrain.json: "
                        "the GPU's name, or cpu-2core)")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    folder = torch.cuda.get_device_name().lower().replace(" ", "-") if cuda else "cpu-2core"
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / folder / "pretrain.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"question": "step time, tokens/s and peak memory of bigbird-ja pretrain per ZeRO stage",
              "settings": {"preset": PRESET, "steps": args.steps, "skip": args.skip, "nprocs": args.nprocs,
                           "omp_num_threads": args.threads, "gpu_steps": args.gpu_steps, "cases": args.cases,
                           "micro_batches": args.micro_batches, "measured_peak_tflops": args.peak_tflops,
                           "dry_run": args.dry_run},
              "environment": environment(), "cpu": []}

    def save(_=None):
        from bigbird_ja.common.atomic_io import atomic_write_text

        atomic_write_text(out, json.dumps(result, indent=1) + "\n", durable=False)

    if args.gpu_only or args.dry_run:
        print("skipping the CPU / DeepSpeed ZeRO stages (--gpu-only)", flush=True)
    elif result["environment"]["deepspeed"] is None:
        print("skipping the CPU / DeepSpeed ZeRO stages: deepspeed is not installed", flush=True)
    else:
        from bigbird_ja.training import load_pretrain_config
        from bigbird_ja.training.trainer import ensure_data

        with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
            work = Path(tmp)
            data, tok = work / "data", work / "tokenizer"
            cfg = load_pretrain_config(REPO / PRESET, [f"--data.dir={data}", f"--data.tokenizer={tok}"])
            ensure_data(cfg, log=lambda text: None)
            for stage in args.stages:
                case = cpu_case(stage, args.nprocs, args.steps, args.skip, data, tok, work, args.threads)
                print(json.dumps(case), flush=True)
                result["cpu"].append(case)
                save()
    if cuda or args.dry_run:
        def keep(cases):
            result["gpu"] = cases
            save()

        try:
            gpu_cases(args.gpu_steps, args.cases, args.micro_batches, args.peak_tflops, args.dry_run, on_case=keep)
        except Exception as err:  # recorded, not fatal
            name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
            result["gpu"] = result.get("gpu", []) + [{"case": "all", "device": name, "error": repr(err)[:2000]}]
    save()
    table = tables(result)
    out.with_suffix(".md").write_text(table + "\n")
    plot(result, out.with_suffix(".png"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
