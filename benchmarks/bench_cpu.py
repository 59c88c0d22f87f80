"""Is bigbird-ja's blocked backend faster on CPU than transformers' BigBird and DeBERTa-v2?

Question
    bigbird-ja computes DeBERTa-v2's disentangled attention (c2p + p2c relative terms) on BigBird's block layout.
    On a CPU, how do its forward and forward+backward time and peak memory compare, in one run on one machine, with
    transformers' BigBirdModel (block_sparse, no relative terms: less work) and DebertaV2Model (the same relative
    attention, dense O(n^2))?

Setup
    Base dims (hidden 768, 12 heads x 64, FFN 3072, vocab 32000), 2 layers, batch 1, float32, random weights built
    from configs (nothing downloaded), `--threads` torch threads (default 2), n = 1024 .. 16384:
      bigbird-ja     BigBirdJaModel, attention_backend="blocked": block 64, window 3, global 2, random 3, 256 log
                     buckets, p2c|c2p, shared keys; max_position_embeddings = n (every random block live)
      hf-bigbird     transformers.BigBirdModel, attention_type="block_sparse", block 64, 3 random blocks, no pooler
      hf-deberta-v2  transformers.DebertaV2Model, the same relative-attention settings, dense
    Two modes, eval mode (no dropout) in both:
      forward        torch.no_grad forward
      train          forward + backward of mean(last_hidden_state ** 2) (gradients of every weight)
    Every (case, n) runs in a fresh subprocess (its own peak memory): one warm-up run of each mode at n, then up to
    `--repeats` timed runs (the median is reported; fewer runs once `--time-budget` seconds are spent). Peak memory is
    the RSS high-water mark of the warm-up run minus RSS before it, with freed heap memory first handed back to the
    OS (malloc_trim), so the run's every allocation is counted (bench_memory.py's probes). Cases whose
    estimated peak exceeds `--memory-budget-gib` are recorded as skipped, never run; a child that fails or times
    out is recorded, and the run goes on.

    Each timed run's minor page faults are recorded too. With glibc's default settings a run whose temporaries
    exceed its heap-trim threshold (at most 64 MiB) gets its memory back from the kernel, zeroed, on every run: at
    1k tokens that is ~60k faults and 20-30% of bigbird-ja's forward in some runs and not in others. `--malloc keep`
    runs every case with the heap kept (the behaviour of jemalloc/tcmalloc, which PyTorch's CPU tuning guide
    recommends), so that times compare compute alone.

Run (from the repository root)
    python benchmarks/bench_cpu.py                       # everything, ~10-15 min on 2 cores
    python benchmarks/bench_cpu.py --quick               # 1k and 4k, forward only, 1 timed run: ~1 min
    python benchmarks/bench_cpu.py --lengths 1024 2048 --modes forward
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
         "hf-deberta-v2": "HF DeBERTa-v2 (dense)"}
BUILD_CASE = {"bigbird-ja": "blocked", "hf-bigbird": "hf-bigbird", "hf-deberta-v2": "hf-deberta-v2"}
MODES = {"forward": "forward", "train": "forward+backward"}
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)

# Peak-memory estimates (bytes), to skip what cannot fit instead of waking the OOM killer. Quadratic cases: bytes
# per element of one [heads, n, n] score tensor, per layer whose tensors are alive at the peak (forward: one layer;
# train: every layer keeps its own until backward). DeBERTa-v2: bench_memory.py's measured 23.5 B. transformers'
# BigBird assembles the dense [B, H, n, n] attention matrix in every block_sparse forward (transformers 5.24):
# 14.7 GiB at 16k in one forward on this machine, i.e. 4.6 B. Linear part: 64 KiB per token and layer, generous.
QUADRATIC_BYTES = {"hf-deberta-v2": 23.5, "hf-bigbird": 4.6}
LINEAR_BYTES_PER_TOKEN_LAYER = 64 * 1024

# glibc hands the top of its heap back to the OS once more than its trim threshold is free there (at most 64 MiB with
# its default, self-adjusting thresholds), so a forward whose temporaries exceed that faults its pages in again
# (zeroed by the kernel) on every run. 'keep' raises the trim threshold (which fixes the mmap threshold too: at
# glibc's 32 MiB maximum), as jemalloc or tcmalloc would behave; times then compare compute alone.
MALLOC_SETTINGS = {"default": {}, "keep": {"MALLOC_TRIM_THRESHOLD_": str(64 * GIB),
                                           "MALLOC_MMAP_THRESHOLD_": str(32 * MIB)}}


def estimated_bytes(case: str, length: int, mode: str, layers: int) -> float:
    live_layers = layers if mode == "train" else 1
    quadratic = QUADRATIC_BYTES.get(case, 0.0) * HEADS * length**2 * live_layers
    return quadratic + LINEAR_BYTES_PER_TOKEN_LAYER * length * layers * (3 if mode == "train" else 1)


# --------------------------------------------------------------------------------------------------------------
# Child: every mode of one (case, length)
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
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = build_model(BUILD_CASE[args.case], args.length, layers=args.layers).to(getattr(torch, args.dtype))
    inputs = make_inputs(args.length)
    # Cap the address space: an allocation beyond the budget fails here instead of taking the machine down.
    limit = virtual_size_bytes() + int(args.memory_budget_gib * GIB)
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    for mode in args.modes:
        try:
            result = run_mode(model, inputs, mode, args.repeats, args.time_budget)
        except (RuntimeError, MemoryError) as err:
            text = str(err)
            brief = ("out of memory under the --memory-budget-gib cap" if "alloc" in text or isinstance(err, MemoryError)
                     else f"{type(err).__name__}: {text.splitlines()[0][:200]}")
            result = {"status": "failed", "message": brief, "error": text[:500]}
        if args.case == "hf-bigbird":  # transformers falls back to full attention for short inputs: check
            result["hf_attention_type"] = model.encoder.attention_type
        if BUILD_CASE[args.case] == "blocked":  # whether the relative terms ran in the native op (installed, on)
            from bigbird_ja.attention import cpu_kernels

            result["cpu_kernel_used"] = cpu_kernels.relative_terms() is not None
        print(RESULT_MARKER + json.dumps({"mode": mode, **result}), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------------------------
def run_case(case: str, length: int, args) -> list[dict]:
    base = {"case": case, "length": length, "loadavg_1min_before": os.getloadavg()[0]}
    records, modes = [], []
    for mode in args.modes:
        estimate = estimated_bytes(case, length, mode, args.layers)
        if estimate > args.memory_budget_gib * GIB:
            records.append({**base, "mode": mode, "status": "skipped", "estimated_gib": round(estimate / GIB, 1),
                            "message": f"skipped: est. {estimate / GIB:.0f} GiB > {args.memory_budget_gib:g} GiB"})
        else:
            modes.append(mode)
    if not modes:
        return records
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--case", case, "--length", str(length),
               "--modes", *modes, "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--layers", str(args.layers), "--memory-budget-gib", str(args.memory_budget_gib),
               "--time-budget", str(args.time_budget), "--dtype", args.dtype]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", BIGBIRD_JA_CPU_KERNELS="1" if args.cpu_kernel == "on" else "0",
               **MALLOC_SETTINGS[args.malloc])
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
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
            reported[result["mode"]] = result
    for mode in modes:
        result = reported.get(mode) or {"status": "failed", "message": failure or "failed: no result"}
        if result["status"] == "failed" and not result["message"].startswith("failed"):
            result["message"] = "failed: " + result["message"]
        records.append({**base, **result, "mode": mode, "child_wall_s": wall})
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


def comparisons(records: list[dict], lengths: list[int], modes: list[str]) -> list[dict]:
    """Per (n, mode): ours / BigBird time (below 1: we are faster), DeBERTa / ours (how many times faster we are)."""
    by = {(r["case"], r["length"], r["mode"]): r for r in records}
    rows = []
    for mode in modes:
        for n in lengths:
            ours = by.get(("bigbird-ja", n, mode))
            rows.append({"length": n, "mode": mode,
                         "ours_over_hf_bigbird": ratio(ours, by.get(("hf-bigbird", n, mode))),
                         "hf_deberta_over_ours": ratio(by.get(("hf-deberta-v2", n, mode)), ours)})
    return rows


def markdown_table(records: list[dict], cases: list[str], lengths: list[int], modes: list[str]) -> str:
    by = {(r["case"], r["length"], r["mode"]): r for r in records}
    cmp = {(c["length"], c["mode"]): c for c in comparisons(records, lengths, modes)}
    head = ["n", "mode"] + [CASES[c] + " (time / peak)" for c in cases] + ["ours / BigBird", "DeBERTa / ours"]
    lines = ["| " + " | ".join(head) + " |", "|---:|---|" + "---|" * len(cases) + "---:|---:|"]

    def fmt(x):
        return "-" if x is None else f"{x:.2f}x"

    for mode in modes:
        for n in lengths:
            c = cmp[(n, mode)]
            cells = [f"{n:,}", MODES[mode]] + [cell(by.get((case, n, mode))) for case in cases]
            lines.append("| " + " | ".join(cells + [fmt(c["ours_over_hf_bigbird"]), fmt(c["hf_deberta_over_ours"])])
                         + " |")
    return "\n".join(lines)


def growth(records: list[dict], case: str, mode: str, lengths: list[int]) -> list[dict]:
    """peak(n) / peak(n/2) and time(n) / time(n/2): 2 is linear."""
    ok = {r["length"]: r for r in records if r["case"] == case and r["mode"] == mode and r["status"] == "ok"}
    return [{"length": n, "peak_ratio": ok[n]["peak_mib"] / ok[n // 2]["peak_mib"],
             "time_ratio": ok[n]["time_s"] / ok[n // 2]["time_s"]}
            for n in lengths if n in ok and n // 2 in ok and ok[n // 2]["peak_mib"] > 0]


def plot(records: list[dict], cases: list[str], modes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8.5), squeeze=False)
    lengths = sorted({r["length"] for r in records})
    for col, mode in enumerate(modes):
        for row, (key, label) in enumerate((("time_s", "time [s], median"), ("peak_mib", "peak memory [MiB]"))):
            ax = axes[row][col]
            for case, marker in zip(cases, "osD"):
                ok = sorted((r for r in records if r["case"] == case and r["mode"] == mode and r["status"] == "ok"),
                            key=lambda r: r["length"])
                if ok:
                    ax.plot([r["length"] for r in ok], [r[key] for r in ok], marker=marker, label=CASES[case])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.set_xlabel("sequence length n [tokens]")
            ax.set_ylabel(label)
            ax.set_title(f"{MODES[mode]}: {label.split(' [')[0]}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8, loc="upper left")
    missing = [f"{CASES[r['case']]} n={r['length']} {MODES[r['mode']]}: {r['message']}" for r in records
               if r["status"] != "ok"]
    fig.suptitle(title, fontsize=10)
    if missing:
        fig.text(0.01, 0.005, "not plotted: " + "; ".join(missing), fontsize=6.5, color="dimgrey", wrap=True)
    fig.tight_layout(rect=(0, 0.05 if missing else 0, 1, 1))
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="sequence lengths")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--quick", action="store_true", help="n = 1024 and 4096, forward only, 1 timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--time-budget", type=float, default=60.0,
                   help="seconds of timed runs per measurement; no further run once it would be exceeded")
    p.add_argument("--layers", type=int, default=2)
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
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'machine shared with 3 jobs')")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output; .md and .png go beside it")
    p.add_argument("--profile", type=int, metavar="N", help="print a profile of bigbird-ja's forward at N, exit")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.modes, args.repeats = [1024, 4096], ["forward"], 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    if args.profile:
        return profile(args.profile, args.threads, args.layers)
    import torch

    from bigbird_ja.common.atomic_io import atomic_write_text

    lengths = sorted(set(args.lengths))
    env = {"device": {**cpu_description(), "torch_num_threads": args.threads,
                      "memory_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)},
           "python": sys.version.split()[0], "torch": torch.__version__,
           "transformers": metadata.version("transformers"), **provenance(), "note": args.note,
           "settings": {"model": {"layers": args.layers, "hidden": HIDDEN, "heads": HEADS,
                                  "intermediate": INTERMEDIATE, "vocab": VOCAB, "block_size": BLOCK,
                                  "window_blocks": WINDOW, "global_blocks": GLOBAL, "random_blocks": RANDOM,
                                  "position_buckets": BUCKETS},
                        "batch": 1, "dtype": args.dtype, "repeats": args.repeats, "time_budget_s": args.time_budget,
                        "malloc": {"choice": args.malloc, "environment": MALLOC_SETTINGS[args.malloc]},
                        "cpu_kernel": args.cpu_kernel,
                        "memory_budget_gib": args.memory_budget_gib,
                        "train_loss": "mean(last_hidden_state ** 2), eval mode (no dropout)",
                        "peak_definition": "ru_maxrss of the warm-up run - RSS just before it, after malloc_trim(0)"}}
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(records: list[dict]) -> str:  # after every case, so that an interrupted run keeps what it measured
        table = markdown_table(records, args.cases, lengths, args.modes)
        growth_rows = {f"{case}/{mode}": growth(records, case, mode, lengths)
                       for case in args.cases for mode in args.modes}
        payload = {"question": __doc__.split("\n\n")[0], "environment": env,
                   "cases": {c: CASES[c] for c in args.cases}, "measurements": records,
                   "comparisons": comparisons(records, lengths, args.modes), "growth_per_doubling": growth_rows,
                   "markdown_table": table}
        atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
        atomic_write_text(out.with_suffix(".md"), f"<!-- {env['command']} ({env['date_utc']}) -->\n\n{table}\n")
        return table

    records = []
    for n in lengths:
        for case in args.cases:
            for record in run_case(case, n, args):
                records.append(record)
                print(f"[{datetime.datetime.now():%H:%M:%S}] {case:>13} n={n:>6} {MODES[record['mode']]:>16}: "
                      f"{cell(record)} (load {record['loadavg_1min_before']:.1f})", flush=True)
            save(records)

    print("\n" + save(records) + "\n")
    for case in args.cases:
        for mode in args.modes:
            rows = growth(records, case, mode, lengths)
            if rows:
                print(f"{case} {MODES[mode]} per doubling (peak / time): "
                      + ", ".join(f"{r['length']}: {r['peak_ratio']:.2f} / {r['time_ratio']:.2f}" for r in rows))
    dev = env["device"]
    plot(records, args.cases, args.modes, out.with_suffix(".png"),
         f"{args.layers} base layers, batch 1, {args.dtype}, {args.threads} threads on {dev['cpu_count']} CPUs, "
         f"malloc {args.malloc} "
         f"({dev['cpu_model'] or dev['processor']}), {env['date_utc']}")
    print(f"\nwrote {out}, {out.with_suffix('.md').name}, {out.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
