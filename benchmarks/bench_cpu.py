"""Is bigbird-ja's blocked backend faster on CPU than transformers' BigBird, DeBERTa-v2 and ModernBERT?

Question
    bigbird-ja computes DeBERTa-v2's disentangled attention (c2p + p2c relative terms) on BigBird's block layout.
    On a CPU, how do its forward and forward+backward time and peak memory compare, in one run on one machine, with
    transformers' BigBirdModel (block_sparse, no relative terms: less work), DebertaV2Model (the same relative
    attention, dense O(n^2)) and ModernBertModel (what a Japanese user compares against today: ModernBERT-Ja, Ruri v3),
    in eval mode and in train mode with each library's default dropout?

Setup
    Batch 1, float32, random weights built from configs (nothing downloaded), `--threads` torch threads (default 2),
    n = 1024 .. 16384. Depth: `--layers N` gives every model N layers (equal depth, default 2); `--layers base` gives
    each its own base depth (12; ModernBERT 22).
      bigbird-ja     BigBirdJaModel, attention_backend="blocked", base dims (hidden 768, 12 heads x 64, FFN 3072,
                     vocab 32000): block 64, window 3, global 2, random 3, 256 log buckets, p2c|c2p, shared keys;
                     max_position_embeddings = n (every random block live)
      hf-bigbird     transformers.BigBirdModel, attention_type="block_sparse", block 64, 3 random blocks, no pooler
      hf-deberta-v2  transformers.DebertaV2Model, the same relative-attention settings, dense
      modernbert     transformers.ModernBertModel, its base dims (hidden 768, 12 heads, GLU FFN 1152, RoPE, full
                     attention every 3rd layer, the others a 128-token sliding window), vocab 32000, attention "sdpa".
                     sdpa ignores the window size: its sliding-window layers compute every score of the [n, n]
                     matrix under a boolean mask, O(n^2) like the full layers (the flash-attention and flex
                     implementations would skip the masked blocks; not used here).
    Model modes (`--model-mode`, default both):
      eval           model.eval(): no dropout
      train          model.train() with each library's default dropout: bigbird-ja, DeBERTa-v2 0.1 hidden and 0.1
                     attention; transformers' BigBird 0.1 hidden (its block_sparse attention applies no attention
                     dropout); ModernBERT 0.0 everywhere (its config's defaults). Recorded per measurement.
    Passes (`--modes`):
      forward        torch.no_grad forward
      train          forward + backward of mean(last_hidden_state ** 2) (gradients of every weight)
    Every (case, n) runs in a fresh subprocess (its own peak memory): per (model mode, pass) one warm-up run, then up
    to `--repeats` timed runs (the median is reported; fewer runs once `--time-budget` seconds are spent). Peak memory
    is the RSS high-water mark of the warm-up run minus RSS before it, with freed heap memory first handed back to the
    OS (malloc_trim), so the run's every allocation is counted (bench_memory.py's probes). Cases whose estimated peak
    exceeds `--memory-budget-gib` are recorded as skipped, never run; a child that fails or times out is recorded,
    and the run goes on. The JSON is rewritten after every child; `--resume` keeps what it holds and measures only
    what is missing or failed (so a cut run goes on, and runs of other depths or lengths join the same table).

    Each timed run's minor page faults are recorded too. With glibc's default settings a run whose temporaries
    exceed its heap-trim threshold (at most 64 MiB) gets its memory back from the kernel, zeroed, on every run: at
    1k tokens that is ~60k faults and 20-30% of bigbird-ja's forward in some runs and not in others. `--malloc keep`
    runs every case with the heap kept (the behaviour of jemalloc/tcmalloc, which PyTorch's CPU tuning guide
    recommends), so that times compare compute alone.

Run (from the repository root)
    python benchmarks/bench_cpu.py                       # 3 baselines + ModernBERT, both model modes, 2 layers
    python benchmarks/bench_cpu.py --quick               # 1k and 4k, forward only, 1 timed run
    python benchmarks/bench_cpu.py --lengths 1024 2048 --modes forward --model-mode train
    python benchmarks/bench_cpu.py --layers base --lengths 4096 --resume   # base depth, into the same table
    python benchmarks/bench_cpu.py --profile 4096        # torch.profiler table of bigbird-ja's forward, then exit
    python benchmarks/bench_cpu.py --malloc keep --out benchmarks/results/cpu-2core/cpu_attention_malloc_keep.json
    python benchmarks/bench_cpu.py --dtype bfloat16 --out benchmarks/results/cpu-2core/cpu_attention_bf16.json

Output: a markdown table (stdout and --out with .md), the JSON (--out, default
benchmarks/results/cpu-2core/cpu_attention.json) with every run, the load average before each case and the
environment, and a PNG beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import (  # noqa: E402  the shared probes and model builders
    BLOCK, BUCKETS, GIB, GLOBAL, HEADS, HIDDEN, INTERMEDIATE, MIB, RANDOM, VOCAB, WINDOW, build_model,
    current_rss_bytes, make_inputs, peak_rss_bytes, reset_peak_rss, virtual_size_bytes)
from envinfo import cpu_description, provenance  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "cpu-2core" / "cpu_attention.json"
RESULT_MARKER = "BENCH_RESULT "
CASES = {"bigbird-ja": "bigbird-ja blocked", "hf-bigbird": "HF BigBird block_sparse",
         "hf-deberta-v2": "HF DeBERTa-v2 (dense)", "modernbert": "HF ModernBERT (sdpa)"}
BUILD_CASE = {"bigbird-ja": "blocked", "hf-bigbird": "hf-bigbird", "hf-deberta-v2": "hf-deberta-v2",
              "modernbert": "modernbert"}
# Each model's own base depth (`--layers base`): BERT-base for the first three, ModernBERT-base's 22.
BASE_LAYERS = {"bigbird-ja": 12, "hf-bigbird": 12, "hf-deberta-v2": 12, "modernbert": 22}
MODES = {"forward": "forward", "train": "forward+backward"}
MODEL_MODES = {"eval": "eval", "train": "train, default dropout"}
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
# ModernBERT-base (answerdotai/ModernBERT-base's config.json) but for the vocabulary, shared with the others.
MODERNBERT = {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 1152,
              "global_attn_every_n_layers": 3, "local_attention": 128}
MODERNBERT_ATTN = "sdpa"

# Peak-memory estimates (bytes), to skip what cannot fit instead of waking the OOM killer. Quadratic cases: bytes
# per element of one [heads, n, n] score tensor, per layer whose tensors are alive at the peak (forward: one layer;
# train: every layer keeps its own until backward). DeBERTa-v2: bench_memory.py's measured 23.5 B, a quarter more in
# train mode (its dropout keeps a mask and the dropped probabilities). transformers' BigBird assembles the dense
# [B, H, n, n] attention matrix in every block_sparse forward (transformers 5.24): 14.7 GiB at 16k in one forward on
# this machine, i.e. 4.6 B. ModernBERT builds its [n, n] sliding-window mask once for all layers (transformers 5.25):
# 17 B per element at its peak, measured at 4k and 8k with 1 and 2 layers, so 20 B, not per head or layer. Linear
# part: 64 KiB per token and layer, generous.
QUADRATIC_BYTES = {"hf-deberta-v2": 23.5, "hf-bigbird": 4.6}
TRAIN_MODE_QUADRATIC_FACTOR = {"hf-deberta-v2": 1.25}
SHARED_QUADRATIC_BYTES = {"modernbert": 20.0}
LINEAR_BYTES_PER_TOKEN_LAYER = 64 * 1024

# glibc hands the top of its heap back to the OS once more than its trim threshold is free there (at most 64 MiB with
# its default, self-adjusting thresholds), so a forward whose temporaries exceed that faults its pages in again
# (zeroed by the kernel) on every run. 'keep' raises the trim threshold (which fixes the mmap threshold too: at
# glibc's 32 MiB maximum), as jemalloc or tcmalloc would behave; times then compare compute alone.
MALLOC_SETTINGS = {"default": {}, "keep": {"MALLOC_TRIM_THRESHOLD_": str(64 * GIB),
                                           "MALLOC_MMAP_THRESHOLD_": str(32 * MIB)}}
# Settings a resumed run must share with the file it adds to, or its rows would not compare.
RESUME_MUST_MATCH = ("dtype", "threads", "malloc", "cpu_kernel", "batch")


def estimated_bytes(case: str, length: int, mode: str, layers: int, model_mode: str = "eval") -> float:
    live_layers = layers if mode == "train" else 1
    per_head = QUADRATIC_BYTES.get(case, 0.0) * (TRAIN_MODE_QUADRATIC_FACTOR.get(case, 1.0)
                                                 if model_mode == "train" else 1.0)
    quadratic = (per_head * HEADS * live_layers + SHARED_QUADRATIC_BYTES.get(case, 0.0)) * length**2
    return quadratic + LINEAR_BYTES_PER_TOKEN_LAYER * length * layers * (3 if mode == "train" else 1)


def case_layers(case: str, layers: int | None) -> int:
    """The depth `case` runs at: `layers` (equal depth), or its own base depth when `layers` is None."""
    return BASE_LAYERS[case] if layers is None else layers


def build_case(case: str, length: int, layers: int):
    """The model of `case`, `layers` deep, able to take `length` tokens, in eval mode, random weights."""
    if case != "modernbert":
        return build_model(BUILD_CASE[case], length, layers=layers)
    from transformers import ModernBertConfig, ModernBertModel

    # Token ids below the shared vocabulary (ModernBERT's defaults point past 32000).
    config = ModernBertConfig(vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=max(length, 8192),
                              pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                              **MODERNBERT)
    config._attn_implementation = MODERNBERT_ATTN
    return ModernBertModel(config).eval()


def dropout_settings(case: str, model) -> dict:
    """The dropout probabilities `case` applies in train mode, as its config sets them (its library's defaults)."""
    c = model.config
    if case == "modernbert":
        return {"embedding": c.embedding_dropout, "attention": c.attention_dropout, "mlp": c.mlp_dropout}
    settings = {"hidden": c.hidden_dropout_prob, "attention": c.attention_probs_dropout_prob}
    if case == "hf-bigbird" and model.encoder.attention_type == "block_sparse":
        settings["attention"] = 0.0  # BigBirdBlockSparseAttention has no dropout; the config's value is unused
        settings["attention_config_unused"] = c.attention_probs_dropout_prob
    return settings


# --------------------------------------------------------------------------------------------------------------
# Child: every (model mode, pass) of one (case, length, depth)
# --------------------------------------------------------------------------------------------------------------
def run_mode(model, inputs, mode: str, repeats: int, time_budget_s: float) -> dict:
    import torch

    def once():
        if mode == "forward":
            with torch.no_grad():
                model(**inputs)
        else:
            model.zero_grad(set_to_none=True)
            out = model(**inputs).last_hidden_state
            out.float().square().mean().backward()

    # Peak memory: the warm-up (the mode's first run at this length), after handing freed heap memory back to the
    # OS, so that every byte the run needs is faulted in and counted (later runs reuse glibc's resident free lists).
    release_free_heap()
    peak_was_reset = reset_peak_rss()
    rss_before = current_rss_bytes()
    once()
    peak_mib = (peak_rss_bytes() - rss_before) / MIB
    times, cpu_times, faults = [], [], []
    while len(times) < repeats:
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start, cpu_start = time.perf_counter(), time.process_time()
        once()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
        if sum(times) + times[-1] > time_budget_s:
            break
    return {"status": "ok", "time_s": statistics.median(times), "times_s": times, "time_min_s": min(times),
            "cpu_time_s": statistics.median(cpu_times), "page_faults": faults,
            "page_faults_median": statistics.median(faults), "peak_mib": peak_mib, "peak_was_reset": peak_was_reset}


def release_free_heap() -> None:
    """glibc's malloc_trim(0): return free heap pages to the OS (no-op where there is no glibc)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def child_main(args) -> int:
    import torch

    try:
        with open("/proc/self/oom_score_adj", "w") as f:  # if memory runs out anyway, this child goes first
            f.write("1000")
    except OSError:
        pass
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the same dropout masks in every run of the benchmark
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = build_case(args.case, args.length, args.layers).to(getattr(torch, args.dtype))
    inputs = make_inputs(args.length)
    # Cap the address space: an allocation beyond the budget fails here instead of taking the machine down.
    limit = virtual_size_bytes() + int(args.memory_budget_gib * GIB)
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    for run in args.runs:
        model_mode, mode = run.split("/")
        model.train(model_mode == "train")
        try:
            result = run_mode(model, inputs, mode, args.repeats, args.time_budget)
        except (RuntimeError, MemoryError) as err:
            text = str(err)
            brief = ("out of memory under the --memory-budget-gib cap" if "alloc" in text or isinstance(err, MemoryError)
                     else f"{type(err).__name__}: {text.splitlines()[0][:200]}")
            result = {"status": "failed", "message": brief, "error": text[:500]}
        if args.case == "hf-bigbird":  # transformers falls back to full attention for short inputs: check
            result["hf_attention_type"] = model.encoder.attention_type
        if args.case == "modernbert":
            result["attn_implementation"] = model.config._attn_implementation
        if BUILD_CASE[args.case] == "blocked":  # whether the relative terms ran in the native op (installed, on)
            from bigbird_ja.attention import cpu_kernels

            result["cpu_kernel_used"] = cpu_kernels.relative_terms() is not None
        result["dropout"] = dropout_settings(args.case, model) if model_mode == "train" else None
        print(RESULT_MARKER + json.dumps({"mode": mode, "model_mode": model_mode, **result}), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------------------------
def record_key(record: dict) -> tuple:
    """What one measurement is of; files written before model modes and depths existed read as eval mode."""
    return (record["case"], record["length"], record["mode"], record.get("model_mode", "eval"),
            record.get("depth", "equal"), record.get("layers"))


def run_child(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def run_case(case: str, length: int, args, done: set | frozenset = frozenset()) -> list[dict]:
    """Measure every (model mode, pass) of (case, length) that `done` (record keys) lacks, in one child."""
    layers = case_layers(case, args.layers)
    depth = "equal" if args.layers is not None else "base"
    base = {"case": case, "length": length, "depth": depth, "layers": layers,
            "loadavg_1min_before": os.getloadavg()[0]}
    records, runs = [], []
    for model_mode in args.model_modes:
        for mode in args.modes:
            if (case, length, mode, model_mode, depth, layers) in done:
                continue
            estimate = estimated_bytes(case, length, mode, layers, model_mode)
            if estimate > args.memory_budget_gib * GIB:
                records.append({**base, "mode": mode, "model_mode": model_mode, "status": "skipped",
                                "estimated_gib": round(estimate / GIB, 1),
                                "message": f"skipped: est. {estimate / GIB:.0f} GiB > {args.memory_budget_gib:g} GiB"})
            else:
                runs.append(f"{model_mode}/{mode}")
    if not runs:
        return records
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--case", case, "--length", str(length),
               "--runs", *runs, "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--layers", str(layers), "--memory-budget-gib", str(args.memory_budget_gib),
               "--time-budget", str(args.time_budget), "--dtype", args.dtype]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", BIGBIRD_JA_CPU_KERNELS="1" if args.cpu_kernel == "on" else "0",
               **MALLOC_SETTINGS[args.malloc])
    start = time.perf_counter()
    try:
        proc = run_child(command, env, args.timeout)
        stdout, tail = proc.stdout, " | ".join(proc.stderr.strip().splitlines()[-3:])[-400:]
        failure = None if proc.returncode == 0 else f"failed: returncode {proc.returncode}: {tail}"
    except subprocess.TimeoutExpired as err:
        stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        failure = f"failed: timeout after {args.timeout:g} s"
    wall = round(time.perf_counter() - start, 1)
    reported = {}
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
            reported[f"{result['model_mode']}/{result['mode']}"] = result
    for run in runs:
        model_mode, mode = run.split("/")
        result = reported.get(run) or {"status": "failed", "message": failure or "failed: no result"}
        if result["status"] == "failed" and not result["message"].startswith("failed"):
            result["message"] = "failed: " + result["message"]
        records.append({**base, **result, "mode": mode, "model_mode": model_mode, "child_wall_s": wall})
    return records


def cell(record: dict | None) -> str:
    if record is None:
        return ""
    if record["status"] != "ok":
        return record["message"]
    return f"{record['time_s']:.3f} s / {record['peak_mib']:,.0f} MiB"


def ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    if numerator and denominator and numerator["status"] == denominator["status"] == "ok":
        return numerator["time_s"] / denominator["time_s"]
    return None


def row_keys(records: list[dict]) -> list[tuple]:
    """The table's rows, (model mode, depth, pass, n), in reading order: eval before train, equal depth first."""
    order = {"eval": 0, "train": 1, "equal": 0, "base": 1, "forward": 0}
    keys = {(r.get("model_mode", "eval"), r.get("depth", "equal"), r["mode"], r["length"]) for r in records}
    return sorted(keys, key=lambda k: (order.get(k[0], 2), order.get(k[1], 2), order.get(k[2], 1), k[3]))


def by_row(records: list[dict]) -> dict:
    return {(r["case"], r.get("model_mode", "eval"), r.get("depth", "equal"), r["mode"], r["length"]): r
            for r in records}


def comparisons(records: list[dict]) -> list[dict]:
    """Per row: ours / BigBird and ours / ModernBERT time (below 1: we are faster), DeBERTa / ours (how many times
    faster we are)."""
    by = by_row(records)
    rows = []
    for key in row_keys(records):
        ours = by.get(("bigbird-ja", *key))
        model_mode, depth, mode, n = key
        rows.append({"length": n, "mode": mode, "model_mode": model_mode, "depth": depth,
                     "ours_over_hf_bigbird": ratio(ours, by.get(("hf-bigbird", *key))),
                     "hf_deberta_over_ours": ratio(by.get(("hf-deberta-v2", *key)), ours),
                     "ours_over_modernbert": ratio(ours, by.get(("modernbert", *key)))})
    return rows


def depth_label(records: list[dict], depth: str) -> str:
    """'2' at equal depth; at base depth each case's own, e.g. '12 (ModernBERT 22)'."""
    layers = {r["case"]: r.get("layers") for r in records if r.get("depth", "equal") == depth}
    if depth == "equal" or len(set(layers.values())) == 1:
        return "/".join(str(v) for v in sorted(set(layers.values()), key=str)) or "?"
    common = sorted({v for c, v in layers.items() if c != "modernbert"}, key=str)
    return "/".join(str(v) for v in common) + f" (ModernBERT {layers['modernbert']})"


def markdown_table(records: list[dict], cases: list[str]) -> str:
    """One row per (model mode, depth, pass, n) found in `records`; columns: the cases, then the ratios."""
    shown = [c for c in CASES if c in cases or any(r["case"] == c for r in records)]
    by = by_row(records)
    cmp = {(c["model_mode"], c["depth"], c["mode"], c["length"]): c for c in comparisons(records)}
    head = (["n", "layers", "model mode", "pass"] + [CASES[c] + " (time / peak)" for c in shown]
            + ["ours / BigBird", "DeBERTa / ours", "ours / ModernBERT"])
    lines = ["| " + " | ".join(head) + " |", "|---:|---:|---|---|" + "---|" * len(shown) + "---:|---:|---:|"]

    def fmt(x):
        return "-" if x is None else f"{x:.2f}x"

    for key in row_keys(records):
        model_mode, depth, mode, n = key
        c = cmp[key]
        cells = ([f"{n:,}", depth_label(records, depth), MODEL_MODES.get(model_mode, model_mode), MODES[mode]]
                 + [cell(by.get((case, *key))) for case in shown])
        lines.append("| " + " | ".join(cells + [fmt(c["ours_over_hf_bigbird"]), fmt(c["hf_deberta_over_ours"]),
                                                fmt(c["ours_over_modernbert"])]) + " |")
    return "\n".join(lines)


def growth(records: list[dict], case: str, mode: str, model_mode: str = "eval", depth: str = "equal") -> list[dict]:
    """peak(n) / peak(n/2) and time(n) / time(n/2): 2 is linear."""
    ok = {r["length"]: r for r in records if r["case"] == case and r["mode"] == mode and r["status"] == "ok"
          and r.get("model_mode", "eval") == model_mode and r.get("depth", "equal") == depth}
    return [{"length": n, "peak_ratio": ok[n]["peak_mib"] / ok[n // 2]["peak_mib"],
             "time_ratio": ok[n]["time_s"] / ok[n // 2]["time_s"]}
            for n in sorted(ok) if n // 2 in ok and ok[n // 2]["peak_mib"] > 0]


def plot(records: list[dict], path: Path, title: str) -> None:
    """Time and peak against n, one column per (model mode, pass); lines at equal depth, hollow markers at base
    depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = sorted({(r.get("model_mode", "eval"), r["mode"]) for r in records},
                     key=lambda k: (list(MODEL_MODES).index(k[0]) if k[0] in MODEL_MODES else 9,
                                    list(MODES).index(k[1])))
    cases = [c for c in CASES if any(r["case"] == c for r in records)]
    # One y range per row: eval and train columns compare at a glance.
    fig, axes = plt.subplots(2, len(columns), figsize=(5.5 * len(columns), 8.5), squeeze=False, sharey="row")
    lengths = sorted({r["length"] for r in records})
    for col, (model_mode, mode) in enumerate(columns):
        for row, (key, label) in enumerate((("time_s", "time [s], median"), ("peak_mib", "peak memory [MiB]"))):
            ax = axes[row][col]
            for index, (case, marker) in enumerate(zip(cases, "osD^")):
                color = f"C{index}"
                for depth in ("equal", "base"):
                    ok = sorted((r for r in records if r["case"] == case and r["mode"] == mode
                                 and r.get("model_mode", "eval") == model_mode and r.get("depth", "equal") == depth
                                 and r["status"] == "ok"), key=lambda r: r["length"])
                    if not ok:
                        continue
                    xs, ys = [r["length"] for r in ok], [r[key] for r in ok]
                    if depth == "equal":
                        ax.plot(xs, ys, marker=marker, color=color, label=CASES[case])
                    else:
                        ax.plot(xs, ys, marker=marker, color=color, linestyle="none", markerfacecolor="none",
                                markersize=9, label=f"{CASES[case]}, {ok[0]['layers']} layers (base depth)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.set_xlabel("sequence length n [tokens]")
            ax.set_ylabel(label)
            ax.set_title(f"{MODEL_MODES.get(model_mode, model_mode)}, {MODES[mode]}: {label.split(' [')[0]}",
                         fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    missing = [f"{CASES[r['case']]} n={r['length']} {r.get('model_mode', 'eval')} {MODES[r['mode']]}: "
               f"{r['message']}" for r in records if r["status"] != "ok"]
    fig.suptitle(title, fontsize=10)
    if missing:
        fig.text(0.01, 0.005, "not plotted: " + "; ".join(missing), fontsize=6.5, color="dimgrey", wrap=True)
    fig.tight_layout(rect=(0, 0.07 if missing else 0, 1, 1))
    from bigbird_ja.common.atomic_io import atomic_open

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def profile(length: int, threads: int, layers: int) -> int:
    """torch.profiler's table of bigbird-ja's forward at `length` (the ops that take the time)."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.set_num_threads(threads)
    model = build_model("blocked", length, layers=layers)
    inputs = make_inputs(length)
    with torch.no_grad():
        model(**inputs)
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(**inputs)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30,
                                                             max_name_column_width=28, max_shapes_column_width=80))
    return 0


def layers_arg(text: str) -> int | None:
    """`--layers`: a positive count (every model that deep), or 'base' (None: each model's own base depth)."""
    if text == "base":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--layers {text!r}: give a positive layer count (equal depth for every "
                                         f"model) or 'base' (each model's own depth: {BASE_LAYERS})")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="sequence lengths")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                   help="passes: forward (no_grad) and/or train (forward+backward)")
    p.add_argument("--model-mode", choices=["eval", "train", "both"], default="both",
                   help="model.eval() (no dropout), model.train() with each library's default dropout, or both")
    p.add_argument("--quick", action="store_true", help="n = 1024 and 4096, forward only, 1 timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--time-budget", type=float, default=60.0,
                   help="seconds of timed runs per measurement; no further run once it would be exceeded")
    p.add_argument("--layers", type=layers_arg, default=2,
                   help="layers of every model (equal depth), or 'base': each its own base depth "
                        "(12; ModernBERT 22)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--memory-budget-gib", type=float, default=12.0,
                   help="skip cases estimated above this; also each child's address-space headroom")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per (case, length) child")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="every model's weights (and so its compute) in this dtype: bfloat16 for CPUs with AVX512-BF16/AMX")
    p.add_argument("--malloc", choices=list(MALLOC_SETTINGS), default="default",
                   help="glibc heap settings of every child (the same for every case): 'default', or 'keep' (freed "
                        "memory stays in the heap: no page faults once warm)")
    p.add_argument("--cpu-kernel", choices=["on", "off"], default="on",
                   help="bigbird-ja's native op for the relative terms (off: BIGBIRD_JA_CPU_KERNELS=0, the PyTorch "
                        "reads)")
    p.add_argument("--resume", action="store_true",
                   help="keep the measurements already in --out and run only those missing or failed there (same "
                        "dtype, threads, malloc and cpu-kernel settings required)")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'machine shared with 3 jobs')")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output; .md and .png go beside it")
    p.add_argument("--profile", type=int, metavar="N", help="print a profile of bigbird-ja's forward at N, exit")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--runs", nargs="+", default=[], help=argparse.SUPPRESS)  # child: model_mode/pass items
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.modes, args.repeats = [1024, 4096], ["forward"], 1
    args.model_modes = ["eval", "train"] if args.model_mode == "both" else [args.model_mode]
    return args


def load_for_resume(out: Path, settings: dict) -> tuple[list[dict], list[dict]]:
    """The measurements and earlier runs in `out`, checked to share `settings`' RESUME_MUST_MATCH keys."""
    if not out.exists():
        return [], []
    payload = json.loads(out.read_text())
    old = payload.get("environment", {}).get("settings", {})
    differ = {k: (old.get(k), settings[k]) for k in RESUME_MUST_MATCH if old.get(k, settings[k]) != settings[k]}
    if differ:
        listed = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
        raise SystemExit(f"--resume: {out} was measured with other settings ({listed}); rerun with the file's "
                         "settings, or write to a new --out")
    runs = payload.get("environment", {}).get("runs") or [
        {k: payload["environment"].get(k) for k in ("command", "date_utc", "git_commit", "git_dirty", "note")}]
    # Files written before model modes and depths existed: eval mode, every case at the file's one depth.
    old_layers = old.get("model", {}).get("layers")
    records = [{"model_mode": "eval", "depth": "equal", "layers": old_layers, **r}
               for r in payload.get("measurements", [])]
    return records, runs


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    if args.profile:
        return profile(args.profile, args.threads, case_layers("bigbird-ja", args.layers))
    import torch

    from bigbird_ja.common.atomic_io import atomic_write_text

    lengths = sorted(set(args.lengths))
    settings = {"model": {"layers": "base" if args.layers is None else args.layers, "base_layers": BASE_LAYERS,
                          "hidden": HIDDEN, "heads": HEADS,
                          "intermediate": INTERMEDIATE, "vocab": VOCAB, "block_size": BLOCK,
                          "window_blocks": WINDOW, "global_blocks": GLOBAL, "random_blocks": RANDOM,
                          "position_buckets": BUCKETS,
                          "modernbert": {**MODERNBERT, "attn_implementation": MODERNBERT_ATTN}},
                "batch": 1, "dtype": args.dtype, "threads": args.threads, "repeats": args.repeats,
                "time_budget_s": args.time_budget,
                "malloc": {"choice": args.malloc, "environment": MALLOC_SETTINGS[args.malloc]},
                "cpu_kernel": args.cpu_kernel,
                "memory_budget_gib": args.memory_budget_gib,
                "train_loss": "mean(last_hidden_state ** 2)",
                "model_modes": {"eval": "model.eval(): no dropout",
                                "train": "model.train(), each library's default dropout (per record: 'dropout')"},
                "peak_definition": "ru_maxrss of the warm-up run - RSS just before it, after malloc_trim(0)"}
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    records, runs = load_for_resume(out, settings) if args.resume else ([], [])
    # One equal depth per file: the table's rows and the plot's lines are keyed by equal/base depth.
    equal_layers = {r["layers"] for r in records if r["depth"] == "equal"}
    if args.layers is not None and equal_layers - {args.layers}:
        raise SystemExit(f"--resume: {out} holds equal-depth rows at {sorted(equal_layers)} layers, not "
                         f"--layers {args.layers}; use --layers {min(equal_layers)} or 'base', or a new --out")
    this_run = provenance()
    runs = runs + [{**{k: this_run[k] for k in ("command", "date_utc", "git_commit", "git_dirty")},
                    "note": args.note}]
    env = {"device": {**cpu_description(), "torch_num_threads": args.threads,
                      "memory_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)},
           "python": sys.version.split()[0], "torch": torch.__version__,
           "transformers": metadata.version("transformers"), **this_run, "note": args.note, "runs": runs,
           "settings": settings}

    def save() -> str:  # after every case, so that an interrupted run keeps what it measured
        table = markdown_table(records, args.cases)
        growth_rows = {f"{case}/{model_mode}/{mode}": growth(records, case, mode, model_mode)
                       for case in CASES for model_mode in MODEL_MODES for mode in MODES}
        payload = {"question": __doc__.split("\n\n")[0], "environment": env,
                   "cases": {c: CASES[c] for c in CASES if c in args.cases or any(r["case"] == c for r in records)},
                   "measurements": records, "comparisons": comparisons(records),
                   "growth_per_doubling": {k: v for k, v in growth_rows.items() if v}, "markdown_table": table}
        atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
        commands = "; ".join(f"{r['command']} ({r['date_utc']})" for r in runs)
        atomic_write_text(out.with_suffix(".md"), f"<!-- {commands} -->\n\n{table}\n")
        return table

    # Done: measured. A failure is tried again, a skip estimated again (the budget may have grown); the new record
    # replaces the old one.
    done = {record_key(r) for r in records if r["status"] == "ok"}
    for n in lengths:
        for case in args.cases:
            new = run_case(case, n, args, done)
            if not new:
                continue
            fresh = {record_key(r) for r in new}
            records[:] = [r for r in records if record_key(r) not in fresh]
            for record in new:
                records.append(record)
                print(f"[{datetime.datetime.now():%H:%M:%S}] {case:>13} n={n:>6} L={record['layers']:>2} "
                      f"{record['model_mode']:>5} {MODES[record['mode']]:>16}: {cell(record)} "
                      f"(load {record['loadavg_1min_before']:.1f})", flush=True)
            save()

    print("\n" + save() + "\n")
    for case in CASES:
        for model_mode in MODEL_MODES:
            for mode in MODES:
                rows = growth(records, case, mode, model_mode)
                if rows:
                    print(f"{case} {model_mode} {MODES[mode]} per doubling (peak / time): "
                          + ", ".join(f"{r['length']}: {r['peak_ratio']:.2f} / {r['time_ratio']:.2f}" for r in rows))
    dev = env["device"]
    depths = [f"{depth_label(records, 'equal')} layers"] if any(r["depth"] == "equal" for r in records) else []
    if any(r["depth"] == "base" for r in records):
        depths.append(f"hollow: base depth, {depth_label(records, 'base')} layers")
    plot(records, out.with_suffix(".png"),
         f"{'; '.join(depths)}; batch 1, {args.dtype}, {args.threads} threads on {dev['cpu_count']} CPUs, "
         f"malloc {args.malloc} ({dev['cpu_model'] or dev['processor']}), {env['date_utc']}")
    print(f"\nwrote {out}, {out.with_suffix('.md').name}, {out.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
