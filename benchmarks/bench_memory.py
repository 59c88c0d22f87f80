"""Does the blocked backend's time and peak memory grow linearly with sequence length?

Question
    bigbird_ja's "blocked" attention backend is meant to use memory linear in the sequence length n. Does it, and
    how do its forward time and peak memory compare with bigbird_ja's dense "reference" backend (O(n^2) scores with
    the sparse mask), with transformers' DeBERTa-v2 (dense disentangled attention, O(n^2)) and with transformers'
    own BigBird block-sparse attention (linear)?

Setup
    One forward pass of a ONE-layer base-size encoder (hidden 768, 12 heads x 64, intermediate 3072, vocab 32000),
    batch 1, float32, eval mode, torch.no_grad, 2 torch threads, at n = 1024, 2048, 4096, 8192, 16384. Cases:
      blocked        bigbird_ja, attention_backend="blocked", block_sparse (block 64, window 3, global 2, random 3),
                     DeBERTa relative attention (256 log buckets, p2c|c2p, shared keys), max_position_embeddings = n
      reference      the same model with attention_backend="reference"
      hf-deberta-v2  transformers.DebertaV2Model with the same relative-attention settings, dense O(n^2)
      hf-bigbird     transformers.BigBirdModel, attention_type="block_sparse", block 64, 3 random blocks
    Every (case, n) runs in a fresh subprocess so that one measurement's peak cannot leak into the next. The child
    builds the model and a random input, warms up at 1024 tokens, resets the kernel's RSS high-water mark
    (/proc/self/clear_refs, where allowed), reads its RSS from /proc/self/statm, then times the forward
    (the median of --repeats runs; fewer runs when one run is slow). Peak memory is
        peak = ru_maxrss after the timed runs - RSS just before them,
    i.e. everything the forward itself made resident (activations, attention scores, index tensors, workspace).
    torch's CPU allocator takes its memory from malloc/mmap and returns large blocks at once, so its tensors show up
    in RSS; `--self-check` verifies that on this machine with a tensor of known size.

    Dense cases whose estimated n^2 memory exceeds --memory-budget-gib are not run but recorded as skipped. As a
    second line of defence each child caps its own address space at (its size before the forward + budget), so an
    underestimate ends in a recorded allocation failure instead of the kernel's OOM killer. A child that crashes,
    raises or runs past --timeout is recorded as failed and the benchmark goes on.

Run
    python benchmarks/bench_memory.py                       # everything, about 10-20 minutes on 2 CPU cores
    python benchmarks/bench_memory.py --lengths 1024 2048 --cases blocked reference --repeats 1
    python benchmarks/bench_memory.py --self-check          # does RSS see torch's allocations?

Output: a markdown table on stdout (rows = n, columns = case, cells "time ms / peak MiB" or why there is no
number), the blocked backend's growth per doubling of n, a JSON file (--out, default
benchmarks/results/cpu-2core/memory.json) with every measurement and the environment, and a PNG plot beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "cpu-2core" / "memory.json"
RESULT_MARKER = "BENCH_RESULT "  # the child prints exactly one line starting with this, followed by JSON

CASES = {
    "blocked": "bigbird_ja blocked",
    "reference": "bigbird_ja reference",
    "hf-deberta-v2": "HF DebertaV2Model (dense)",
    "hf-bigbird": "HF BigBirdModel (block_sparse)",
}
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)

# One base-size layer.
HIDDEN, HEADS, INTERMEDIATE, VOCAB = 768, 12, 3072, 32000
BLOCK, WINDOW, GLOBAL, RANDOM, BUCKETS = 64, 3, 2, 3, 256
# transformers' BigBird silently switches itself (permanently) to full attention at or below
# (5 + 2 * random) * block = 704 tokens, so the warm-up must be longer than that.
WARMUP_LENGTH = 1024
MIB = 2**20
GIB = 2**30

# Peak bytes of the dense cases per element of one [heads, n, n] score tensor, counted from the source and checked
# against measurements on this 2-core machine (peak(4096) - peak(2048) over 12 * (4096^2 - 2048^2) elements):
#   reference      (bigbird_ja/attention/reference.py) four live float32 [H, n, n] tensors at the end of
#                  masked_softmax (scores, masked scores, softmax, softmax * row mask), the [H, n, n] bool layout and
#                  key masks and an int64 [n, n] delta index: about 19 B counted, 19.4 B measured.
#   hf-deberta-v2  (transformers' modeling_deberta_v2.py) five live float32 [H, n, n] tensors inside
#                  disentangled_attention_bias (scores, c2p gathered, c2p bias, score sum, p2c gathered/scaled) plus
#                  four int64 [n, n] tensors (relative positions, c2p and p2c indices, the attention mask):
#                  about 22.7 B counted, 23.0 B measured.
DENSE_BYTES_PER_SCORE = {"reference": 20.0, "hf-deberta-v2": 23.5}
# The parts linear in n (embeddings, projections, the 3072-wide FFN, ...): about 60 KiB per token, generous.
LINEAR_BYTES_PER_TOKEN = 64 * 1024


# --------------------------------------------------------------------------------------------------------------
# Memory probes (Linux /proc and getrusage)
# --------------------------------------------------------------------------------------------------------------
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def virtual_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (what ru_maxrss reports), so that the peak of model building and
    warm-up cannot hide the forward's own peak. Linux >= 4.0; may be forbidden in some containers."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------
def build_model(case: str, length: int, layers: int = 1):
    """The base model of `case` with `layers` layers, able to take `length` tokens, in eval mode."""
    if case in ("blocked", "reference"):
        import bigbird_ja

        config = bigbird_ja.BigBirdJaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=layers,
            intermediate_size=INTERMEDIATE, max_position_embeddings=length, attention_type="block_sparse",
            attention_backend=case, block_size=BLOCK, num_window_blocks=WINDOW, num_global_blocks=GLOBAL,
            num_random_blocks=RANDOM, relative_attention=True, position_buckets=BUCKETS,
            pos_att_type=["p2c", "c2p"], share_att_key=True)
        return bigbird_ja.BigBirdJaModel(config).eval()
    if case == "hf-deberta-v2":
        from transformers import DebertaV2Config, DebertaV2Model

        config = DebertaV2Config(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=layers,
            intermediate_size=INTERMEDIATE, max_position_embeddings=length, relative_attention=True,
            position_buckets=BUCKETS, pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm",
            position_biased_input=False, type_vocab_size=0)
        return DebertaV2Model(config).eval()
    if case == "hf-bigbird":
        from transformers import BigBirdConfig, BigBirdModel

        config = BigBirdConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=layers,
            intermediate_size=INTERMEDIATE, max_position_embeddings=length, attention_type="block_sparse",
            block_size=BLOCK, num_random_blocks=RANDOM)
        # No pooler: the other cases have none either.
        return BigBirdModel(config, add_pooling_layer=False).eval()
    raise ValueError(f"unknown case {case!r}; choose from {list(CASES)}")


def make_inputs(length: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (1, length), generator=gen)
    return {"input_ids": input_ids, "attention_mask": torch.ones(1, length, dtype=torch.long)}


def estimated_dense_bytes(case: str, length: int) -> float | None:
    """Peak memory a dense case needs at `length` tokens, or None for the cases linear in n (never skipped)."""
    if case not in DENSE_BYTES_PER_SCORE:
        return None
    return DENSE_BYTES_PER_SCORE[case] * HEADS * length**2 + LINEAR_BYTES_PER_TOKEN * length


# --------------------------------------------------------------------------------------------------------------
# Child: one (case, length) measurement
# --------------------------------------------------------------------------------------------------------------
def measure_in_this_process(case: str, length: int, repeats: int, threads: int, budget_bytes: int,
                            time_budget_s: float) -> dict:
    import torch

    # If memory runs out anyway, let the kernel kill this child first, never a process outside the benchmark.
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    model = build_model(case, length)
    inputs = make_inputs(length)
    with torch.no_grad():
        model(**make_inputs(min(WARMUP_LENGTH, length)))  # thread pool, kernel selection, lazy imports

    # Cap the address space: an allocation beyond the budget raises here instead of waking the OOM killer.
    limit = virtual_size_bytes() + budget_bytes
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))

    peak_was_reset = reset_peak_rss()
    rss_before = current_rss_bytes()
    maxrss_before = peak_rss_bytes()
    times, cpu_times = [], []
    with torch.no_grad():
        while len(times) < repeats:
            start, cpu_start = time.perf_counter(), time.process_time()
            out = model(**inputs)
            times.append(time.perf_counter() - start)
            # CPU time (all threads) next to wall time: on a shared VM wall time also counts waiting for a CPU.
            cpu_times.append(time.process_time() - cpu_start)
            del out
            # Repeat only while another run fits the time budget: one run is enough at long lengths.
            if sum(times) + times[-1] > time_budget_s:
                break
    maxrss_after = peak_rss_bytes()

    result = {
        "status": "ok",
        "time_ms": 1000 * statistics.median(times),
        "times_ms": [1000 * t for t in times],
        "time_min_ms": 1000 * min(times),
        "cpu_time_ms": 1000 * statistics.median(cpu_times),
        "peak_mib": (maxrss_after - rss_before) / MIB,
        "rss_before_mib": rss_before / MIB,
        "maxrss_before_mib": maxrss_before / MIB,
        "maxrss_after_mib": maxrss_after / MIB,
        "peak_was_reset": peak_was_reset,
        "torch_threads": torch.get_num_threads(),
    }
    if not peak_was_reset and maxrss_after <= maxrss_before:
        # The forward never rose above the earlier high-water mark: the number is only an upper bound.
        result["note"] = "peak RSS not reset and not exceeded by the forward: peak_mib is an upper bound"
    if case == "hf-bigbird":
        # transformers falls back to full attention for short inputs; make sure block_sparse is what we timed.
        result["hf_attention_type"] = model.encoder.attention_type
    return result


def child_main(args) -> int:
    try:
        result = measure_in_this_process(args.case, args.length, args.repeats, args.threads,
                                         int(args.memory_budget_gib * GIB), args.time_budget)
    except (RuntimeError, MemoryError, ValueError) as err:
        text = str(err)
        if "can't allocate memory" in text or isinstance(err, MemoryError):
            # The address-space cap hit: say so briefly, the full text goes to the JSON.
            result = {"status": "failed", "message": "out of memory under the --memory-budget-gib cap",
                      "error": text[:500]}
        else:
            result = {"status": "failed", "message": f"{type(err).__name__}: {text.splitlines()[0][:200]}",
                      "error": text[:500]}
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------------------
# Parent: run every (case, length) in its own process
# --------------------------------------------------------------------------------------------------------------
def run_case(case: str, length: int, args) -> dict:
    record = {"case": case, "length": length, "loadavg_1min_before": os.getloadavg()[0]}
    estimate = estimated_dense_bytes(case, length)
    if estimate is not None:
        record["estimated_gib"] = round(estimate / GIB, 2)
        if estimate > args.memory_budget_gib * GIB:
            record.update(status="skipped",
                          message=f"skipped: est. {estimate / GIB:.1f} GiB > budget {args.memory_budget_gib:g} GiB")
            return record
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--case", case, "--length", str(length),
               "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--memory-budget-gib", str(args.memory_budget_gib), "--time-budget", str(args.time_budget)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        record.update(status="failed", message=f"failed: timeout after {args.timeout:g} s")
        return record
    record["child_wall_s"] = round(time.perf_counter() - start, 1)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        # Killed (e.g. -9 from the OOM killer) or crashed before reporting: keep the tail of stderr for the record.
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])[-400:]
        record.update(status="failed", returncode=proc.returncode, message=f"failed: returncode {proc.returncode}"
                      + (f": {tail}" if tail else ""))
        return record
    record.update(json.loads(lines[-1][len(RESULT_MARKER):]))
    if record["status"] == "failed":
        record["message"] = "failed: " + record["message"]
    return record


def environment(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)

    from envinfo import cpu_model as read_cpu_model, provenance

    cpu_model = read_cpu_model()
    return {
        "device": {
            "kind": "cpu",
            "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model,
            "cpu_count": os.cpu_count(),
            "torch_num_threads": torch.get_num_threads(),
            "memory_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
            "platform": platform.platform(),
        },
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": metadata.version("transformers"),
        "bigbird_ja": metadata.version("bigbird-ja") if _installed("bigbird-ja") else None,
        **provenance(),
        "settings": {
            "model": {"layers": 1, "hidden": HIDDEN, "heads": HEADS, "intermediate": INTERMEDIATE, "vocab": VOCAB,
                      "block_size": BLOCK, "window_blocks": WINDOW, "global_blocks": GLOBAL,
                      "random_blocks": RANDOM, "position_buckets": BUCKETS},
            "batch": 1, "dtype": "float32", "repeats": args.repeats, "time_budget_s": args.time_budget,
            "warmup_length": WARMUP_LENGTH, "memory_budget_gib": args.memory_budget_gib, "timeout_s": args.timeout,
            "peak_definition": "ru_maxrss after the timed forwards - RSS (/proc/self/statm) just before them",
        },
    }


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------
def cell(record: dict | None) -> str:
    if record is None:
        return ""
    if record["status"] == "ok":
        return f"{record['time_ms']:,.0f} ms / {record['peak_mib']:,.0f} MiB"
    return record["message"]


def markdown_table(records: list[dict], cases: list[str], lengths: list[int]) -> str:
    by_key = {(r["case"], r["length"]): r for r in records}
    lines = ["| n | " + " | ".join(CASES[c] for c in cases) + " |", "|---:|" + "---|" * len(cases)]
    for n in lengths:
        lines.append(f"| {n} | " + " | ".join(cell(by_key.get((c, n))) for c in cases) + " |")
    return "\n".join(lines)


def doubling_ratios(records: list[dict], case: str, lengths: list[int]) -> list[dict]:
    """value(n) / value(n/2) for peak and time: 2 means linear growth, 4 quadratic."""
    ok = {r["length"]: r for r in records if r["case"] == case and r["status"] == "ok"}
    ratios = []
    for n in lengths:
        half = ok.get(n // 2)
        if n in ok and half is not None and half["peak_mib"] > 0:
            ratios.append({"length": n, "peak_ratio": ok[n]["peak_mib"] / half["peak_mib"],
                           "time_ratio": ok[n]["time_ms"] / half["time_ms"]})
    return ratios


def ratio_table(records: list[dict], cases: list[str], lengths: list[int]) -> str:
    lines = ["| n / (n/2) | " + " | ".join(f"{CASES[c]} peak / time" for c in cases) + " |",
             "|---|" + "---|" * len(cases)]
    per_case = {c: {r["length"]: r for r in doubling_ratios(records, c, lengths)} for c in cases}
    for n in lengths[1:]:
        cells = []
        for c in cases:
            r = per_case[c].get(n)
            cells.append(f"{r['peak_ratio']:.2f} / {r['time_ratio']:.2f}" if r else "")
        lines.append(f"| {n} / {n // 2} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict], cases: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = dict(zip(CASES, "osD^"))
    for case in cases:
        ok = sorted((r for r in records if r["case"] == case and r["status"] == "ok"), key=lambda r: r["length"])
        if not ok:
            continue
        xs = [r["length"] for r in ok]
        ax_mem.plot(xs, [r["peak_mib"] for r in ok], marker=markers[case], label=CASES[case])
        ax_time.plot(xs, [r["time_ms"] for r in ok], marker=markers[case], label=CASES[case])
    anchor = next((r for c in cases for r in sorted(records, key=lambda r: r["length"])
                   if r["case"] == c and r["status"] == "ok"), None)
    lengths = sorted({r["length"] for r in records})
    if anchor is not None:
        # Slope guides through the first case's shortest length: linear (x2 per doubling) and quadratic (x4).
        x0, x1 = anchor["length"], lengths[-1]
        for ax, key in ((ax_mem, "peak_mib"), (ax_time, "time_ms")):
            y0 = anchor[key]
            ax.plot([x0, x1], [y0, y0 * x1 / x0], ":", color="grey", linewidth=1, label="slope 1 (linear)")
            ax.plot([x0, x1], [y0, y0 * (x1 / x0) ** 2], "--", color="grey", linewidth=1,
                    label="slope 2 (quadratic)")
    missing = [f"{CASES[r['case']]} n={r['length']}: {r['message']}" for r in records if r["status"] != "ok"]
    for ax, ylabel in ((ax_mem, "peak RSS increase during forward [MiB]"), (ax_time, "forward time [ms], median")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("sequence length n [tokens]")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_mem.set_title("peak memory of one forward")
    ax_time.set_title("time of one forward")
    ax_time.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    if missing:
        fig.text(0.01, 0.01, "not plotted: " + "; ".join(missing), fontsize=7, color="dimgrey", wrap=True)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * (len(missing) // 3) if missing else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# Self-check: does RSS see torch's allocations?
# --------------------------------------------------------------------------------------------------------------
def self_check() -> int:
    import torch

    reset_ok = reset_peak_rss()
    before = current_rss_bytes()
    size = 512 * MIB
    x = torch.ones(size // 4)  # float32, written, so resident
    during = current_rss_bytes()
    del x
    after = current_rss_bytes()
    peak = peak_rss_bytes() - before
    print(f"allocated a {size / MIB:.0f} MiB float32 tensor: RSS +{(during - before) / MIB:.1f} MiB while alive, "
          f"+{(after - before) / MIB:.1f} MiB after del; ru_maxrss - RSS before = {peak / MIB:.1f} MiB "
          f"(high-water mark reset: {reset_ok})")
    ok = abs((during - before) - size) < 0.05 * size and abs(peak - size) < 0.05 * size
    print("OK: torch CPU allocations are visible in RSS" if ok else "MISMATCH: RSS does not track torch allocations")
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="sequence lengths")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="cases to run")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per measurement (median reported)")
    p.add_argument("--time-budget", type=float, default=90.0,
                   help="seconds of timed forwards per measurement; no further repeat once it would be exceeded")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--memory-budget-gib", type=float, default=16.0,
                   help="skip dense cases estimated above this; also each child's address-space headroom")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per (case, length) child process")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output; the PNG goes beside it")
    p.add_argument("--self-check", action="store_true", help="check that RSS sees torch allocations, then exit")
    # Internal: run one measurement in this process.
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    if args.self_check:
        return self_check()
    lengths = sorted(set(args.lengths))
    env = environment(args)
    records = []
    for n in lengths:
        for case in args.cases:
            record = run_case(case, n, args)
            records.append(record)
            print(f"[{datetime.datetime.now():%H:%M:%S}] {case:>14} n={n:>6}: {cell(record)}", flush=True)

    table = markdown_table(records, args.cases, lengths)
    ratios = ratio_table(records, args.cases, lengths)
    print("\n" + table + "\n\nGrowth per doubling of n (peak ratio / time ratio; 2 = linear, 4 = quadratic):\n\n"
          + ratios)

    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "question": "Does the blocked backend's time and peak memory grow linearly with n, and how does it compare "
                    "with the dense reference and with transformers' DeBERTa-v2 and BigBird?",
        "environment": env,
        "cases": {c: CASES[c] for c in args.cases},
        "measurements": records,
        "doubling_ratios": {c: doubling_ratios(records, c, lengths) for c in args.cases},
        "markdown_table": table,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    png = out.with_suffix(".png")
    plot(records, args.cases, png, f"one base-size layer, batch 1, float32, {env['device']['torch_num_threads']} "
         f"threads on {env['device']['cpu_count']} CPUs ({env['device']['cpu_model'] or env['device']['processor']})")
    print(f"\nwrote {out}\nwrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
