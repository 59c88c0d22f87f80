"""How much does `bigbird-ja prepare` cost over bare tokenisation, and how fast does the loader serve samples?

Question
    `prepare` reads, decodes, cleans (control characters, NFKC, emoji counts), tokenises, packs and writes. The
    tokenizer itself is the unavoidable cost; is the rest of the pipeline cheap (target: under 1.5x the CPU time of
    bare fast-tokenizer encoding of the same text)? And can `PackedDataset` (+ `MLMCollator`) feed a trainer?

Setup
    Text: a synthetic Japanese corpus of --mb megabytes made from the bundled sample corpus by recombining its
    clauses (split at "、" and "。") at random with a fixed seed, so that sentences rarely repeat (repeated
    sentences would hit the tokenizer's cache and flatter every number). One document per blank-line block.
    Tokenizer: a Unigram model (vocab --vocab) trained here with the `tokenizers` library on the sample corpus,
    NFKC normaliser, split after "。", Metaspace; saved and loaded through transformers' AutoTokenizer.
    TOKENIZERS_PARALLELISM=false everywhere, so every measurement is per core.
    Cases, run in turn in each of --repeats rounds (interleaved, so that load from other processes on a shared
    machine hits every case alike); each reports its median wall and CPU time:
      bare-backend     tokenizer.backend_tokenizer.encode_batch_fast(docs, add_special_tokens=False) on the
                       documents already in memory, ids taken out as lists: the floor
      bare-transformers  tokenizer(docs, add_special_tokens=False)["input_ids"]: what most scripts do
      prepare-0        prepare(num_workers=0): the whole pipeline in this one process, one core
      prepare-1        prepare(num_workers=1): one tokenising worker + the main process (reading, packing)
      bare-backend-2proc  the same encoding split over two forked processes (the baseline for prepare-2)
      prepare-2        prepare(num_workers=2): both cores
    For every case: wall time, CPU time (this process + children), MB/s and tokens/s, and tokens/s per CPU-second.
    The overhead ratio is CPU-seconds of a prepare case / CPU-seconds of bare-backend (and prepare-2 / bare-backend-
    2proc: two busy processes on a 2-vCPU VM each run slower, whatever they do).
    Loader: PackedDataset (shuffled, seq_len --seq-len) iterated for --loader-samples samples, bare and through
    DataLoader(batch_size=8, collate_fn=MLMCollator) with span masking.

Second question (--scaling): how does parallel prepare (`--slice I/N`, one output folder, a merge at the end)
scale with the number of worker processes, and is its output the same? The corpus (--mb) is cut into
--scaling-files files, one slice each; for N in --scaling-procs, N processes are started at once, each
`prepare(worker=(i, N), num_workers=0)` (one core each, as one process per core or per node would run), the last
to finish merges. Reported per N: wall time from launch to the merged manifest, tokens/s, tokens/s per process
and per core (min(N, CPUs)), the merge time, the interpreter start-up, and whether every output file is
byte-identical to the one-process run (N=1). Written to prepare_scaling.json / .png beside the main result.

Run
    python benchmarks/bench_prepare.py                 # about 3 minutes on 2 cores
    python benchmarks/bench_prepare.py --mb 4 --repeats 1 --out /tmp/p.json
    python benchmarks/bench_prepare.py --scaling --mb 48    # about 3 minutes on 2 cores

Output: a markdown table on stdout and JSON (--out, default benchmarks/results/cpu-2core/prepare.json) with every
measurement and the environment (versions, CPU count, git commit, command line, UTC date).
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # per-core numbers: no Rayon threads inside encode_batch

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "cpu-2core" / "prepare.json"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_corpus(path: Path, megabytes: float, seed: int) -> int:
    """Write about ``megabytes`` MB of recombined sample text; return the byte count."""
    import re

    from bigbird_ja.data import sample_documents

    clauses = [c for doc in sample_documents() for line in doc.split("\n")[1:]
               for c in re.split(r"(?<=[、。])", line) if c]
    heads = [c for c in clauses if not c.endswith("。")]
    tails = [c for c in clauses if c.endswith("。")]
    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            sentences = []
            for _ in range(rng.randint(4, 40)):
                sentences.append("".join(rng.choice(heads) for _ in range(rng.randint(0, 2))) + rng.choice(tails))
            lines = ["".join(sentences[i:i + 4]) for i in range(0, len(sentences), 4)]
            block = "\n".join(lines) + "\n\n"
            f.write(block)
            written += len(block.encode("utf-8"))
    return written


def build_tokenizer(out: Path, vocab_size: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from bigbird_ja.data import sample_documents

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("。", behavior="merged_with_previous"),
                                                 pre_tokenizers.Metaspace()])
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, unk_token="[UNK]",
                                      max_piece_length=8)
    tok.train_from_iterator(sample_documents(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(str(out))
    return out


def read_documents(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [block.strip("\n") for block in text.split("\n\n") if block.strip()]


def cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # joined pool workers
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def measure_interleaved(cases: dict, repeats: int) -> dict:
    """Run every case once per round, ``repeats`` rounds: load from other processes then hits all cases alike.
    Each case reports the medians of its wall and CPU times."""
    runs = {name: [] for name in cases}
    for round_ in range(repeats):
        for name, fn in cases.items():
            print(f"  round {round_ + 1}/{repeats}: {name} ...", file=sys.stderr, flush=True)
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            tokens = fn()
            runs[name].append({"wall_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - cpu0,
                               "tokens": tokens, "loadavg_1min": os.getloadavg()[0]})
    return {name: {"wall_s": statistics.median(r["wall_s"] for r in rs),
                   "cpu_s": statistics.median(r["cpu_s"] for r in rs), "tokens": rs[0]["tokens"], "runs": rs}
            for name, rs in runs.items()}


def _encode_part(args) -> int:
    tok_json, part = args
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok_json)
    return sum(len(e.ids) for i in range(0, len(part), 256)
               for e in tok.encode_batch_fast(part[i:i + 256], add_special_tokens=False))


def bench_prepare(args, work: Path) -> dict:
    from transformers import AutoTokenizer

    from bigbird_ja.data import prepare

    corpus = work / "corpus.txt"
    size = build_corpus(corpus, args.mb, args.seed)
    tok_dir = build_tokenizer(work / "tok", args.vocab)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    docs = read_documents(corpus)
    backend = tokenizer.backend_tokenizer
    batch = 256

    def bare_backend():
        n = 0
        for i in range(0, len(docs), batch):
            n += sum(len(e.ids) for e in backend.encode_batch_fast(docs[i:i + batch], add_special_tokens=False))
        return n

    def bare_transformers():
        n = 0
        for i in range(0, len(docs), batch):
            n += sum(len(ids) for ids in tokenizer(docs[i:i + batch], add_special_tokens=False)["input_ids"])
        return n

    def run_prepare(workers):
        def fn():
            out = work / f"out-{workers}"
            report = prepare(tok_dir, [corpus], out, seq_len=args.seq_len, num_workers=workers, overwrite=True,
                             progress=False)
            return report.num_document_tokens
        return fn

    def bare_backend_2proc():  # the baseline for two workers: the same encoding split over two processes
        import multiprocessing

        tok_json = backend.to_str()
        with multiprocessing.get_context("fork").Pool(2) as pool:
            return sum(pool.map(_encode_part, [(tok_json, docs[i::2]) for i in range(2)]))

    cases = {"bare-backend": bare_backend, "bare-transformers": bare_transformers}
    if 2 in args.workers:
        cases["bare-backend-2proc"] = bare_backend_2proc
    for w in args.workers:
        cases[f"prepare-{w}"] = run_prepare(w)
    results = measure_interleaved(cases, args.repeats)
    tokens = {r["tokens"] for r in results.values()}
    return {"corpus_bytes": size, "documents": len(docs), "tokens_per_case": sorted(tokens),
            "cases": results, "data_dir": str(work / f"out-{args.workers[0]}"), "tokenizer": tokenizer}


def bench_loader(args, data_dir: Path, tokenizer) -> dict:
    from torch.utils.data import DataLoader

    from bigbird_ja.data import MLMCollator, PackedDataset

    ds = PackedDataset(data_dir)
    n = args.loader_samples
    it = iter(ds)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    bare = n / (time.perf_counter() - t0)
    collator = MLMCollator.from_tokenizer(tokenizer)
    loader = iter(DataLoader(PackedDataset(data_dir), batch_size=8, collate_fn=collator, num_workers=0))
    batches = max(1, n // 8)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    masked = batches * 8 / (time.perf_counter() - t0)
    return {"num_samples": ds.num_samples, "seq_len": ds.seq_len, "samples_per_s": bare,
            "samples_per_s_with_mlm_collator": masked, "measured_samples": n}


def environment(args) -> dict:
    import numpy
    import tokenizers
    import torch
    import transformers

    from envinfo import cpu_model as read_cpu_model, provenance

    cpu_model = read_cpu_model()
    return {
        "device": {"kind": "cpu", "cpu_model": cpu_model, "cpu_count": os.cpu_count(),
                   "usable_cpus": len(os.sched_getaffinity(0)), "platform": platform.platform()},
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__, "numpy": numpy.__version__,
        "bigbird_ja": _version("bigbird-ja"),
        **provenance(),
        "settings": {"mb": args.mb, "vocab": args.vocab, "seq_len": args.seq_len, "repeats": args.repeats,
                     "workers": args.workers, "seed": args.seed, "TOKENIZERS_PARALLELISM": "false"},
    }


def _version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def table(result: dict) -> str:
    cases = result["prepare"]["cases"]
    size = result["prepare"]["corpus_bytes"]
    base = cases["bare-backend"]
    lines = ["| case | wall s | CPU s | MB/s (wall) | tokens/s (wall) | tokens per CPU-s | CPU vs bare-backend |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in cases.items():
        lines.append(f"| {name} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {size / 1e6 / r['wall_s']:.2f} | "
                     f"{r['tokens'] / r['wall_s']:,.0f} | {r['tokens'] / r['cpu_s']:,.0f} | "
                     f"{r['cpu_s'] / base['cpu_s']:.2f}x |")
    loader = result["loader"]
    lines += ["", "| loader | samples/s |", "|---|---:|",
              f"| PackedDataset (shuffled, seq_len {loader['seq_len']}) | {loader['samples_per_s']:,.0f} |",
              f"| + DataLoader(batch 8) + MLMCollator | {loader['samples_per_s_with_mlm_collator']:,.0f} |"]
    return "\n".join(lines)


_SCALING_WORKER = """
import json, sys, time
t0 = time.perf_counter()
from bigbird_ja.data import PrepareOptions, prepare
ready = time.perf_counter()
tok, out, i, n, seq_len, slice_bytes, files = json.loads(sys.argv[1])
r = prepare(tok, files, out, seq_len=seq_len, num_workers=0, progress=False, worker=(i, n),
            options=PrepareOptions(slice_bytes=slice_bytes))
print(json.dumps({"import_s": ready - t0, "seconds": r.seconds, "packed_tokens": r.packed_tokens,
                  "slices_packed": r.slices_packed, "merged": r.merged and not r.note, "done": time.time()}))
"""


def bench_scaling(args, work: Path) -> dict:
    """N worker processes at once on one output folder; see the module docstring (--scaling)."""
    import hashlib

    corpus = work / "corpus.txt"
    size = build_corpus(corpus, args.mb, args.seed)
    tok_dir = build_tokenizer(work / "tok", args.vocab)
    blocks = corpus.read_bytes().split(b"\n\n")
    per_file = -(-len(blocks) // args.scaling_files)
    files = []
    for k in range(args.scaling_files):  # whole documents per file, in order
        path = work / f"part-{k:03d}.txt"
        path.write_bytes(b"\n\n".join(blocks[k * per_file:(k + 1) * per_file]))
        files.append(str(path))
    slice_bytes = max(1, min(os.path.getsize(f) for f in files))  # one file per slice
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs, digests = {}, {}
    for n in args.scaling_procs:
        out = work / f"scaling-{n}"
        print(f"  scaling: {n} worker process(es) ...", file=sys.stderr, flush=True)
        t0, wall0 = time.perf_counter(), time.time()
        procs = [subprocess.Popen([sys.executable, "-c", _SCALING_WORKER,
                                   json.dumps([str(tok_dir), str(out), i, n, args.seq_len, slice_bytes, files])],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(n)]
        outs = [p.communicate() for p in procs]
        wall = time.perf_counter() - t0
        failed = [err[-2000:] for p, (_, err) in zip(procs, outs) if p.returncode != 0]
        if failed:
            runs[n] = {"error": failed}
            continue
        reports = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
        merger = [r for r in reports if r["merged"]]
        digests[n] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}
        tokens = json.loads((out / "manifest.json").read_text())["totals"]["num_document_tokens"]
        cores = min(n, len(os.sched_getaffinity(0)))
        # Packing alone: from the first worker's prepare() call to the last one's return (start-up excluded).
        span = max(r["done"] for r in reports) - min(r["done"] - r["seconds"] for r in reports)
        runs[n] = {"procs": n, "cores_used": cores, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
                   "tokens_per_s_per_proc": tokens / wall / n, "tokens_per_s_per_core": tokens / wall / cores,
                   "packing_s": span, "packing_tokens_per_s": tokens / span,
                   "packing_tokens_per_s_per_core": tokens / span / cores,
                   "max_import_s": max(r["import_s"] for r in reports),
                   "last_done_after_s": max(r["done"] for r in reports) - wall0,
                   "merge_by_worker": len(merger) == 1, "workers": reports}
        shutil.rmtree(out, ignore_errors=True)
    ref = digests.get(min(digests)) if digests else None
    for n, d in digests.items():
        runs[n]["identical_to_1_proc"] = d == ref
    return {"corpus_bytes": size, "files": len(files), "slices": len(files), "seq_len": args.seq_len,
            "runs": {str(n): r for n, r in runs.items()}}


def scaling_table(result: dict) -> str:
    lines = ["| processes | cores | wall s | tokens/s | tokens/s per process | tokens/s per core | start-up s | "
             "packing s | packing tokens/s per core | identical to 1 process |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for n, r in result["runs"].items():
        if "error" in r:
            lines.append(f"| {n} | | failed | | | | | | | |")
            continue
        lines.append(f"| {n} | {r['cores_used']} | {r['wall_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s_per_proc']:,.0f} | {r['tokens_per_s_per_core']:,.0f} | "
                     f"{r['max_import_s']:.1f} | {r['packing_s']:.1f} | {r['packing_tokens_per_s_per_core']:,.0f} | "
                     f"{r['identical_to_1_proc']} |")
    return "\n".join(lines)


def scaling_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"].values() if "error" not in r]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    procs = [r["procs"] for r in runs]
    ax.plot(procs, [r["tokens_per_s"] / 1e3 for r in runs], "o-", label="all processes")
    ax.plot(procs, [r["tokens_per_s_per_core"] / 1e3 for r in runs], "s--", label="per core")
    ax.plot(procs, [r["packing_tokens_per_s_per_core"] / 1e3 for r in runs], "^:", label="per core, start-up excluded")
    ax.set_xlabel("worker processes (--slice I/N), one output folder")
    ax.set_ylabel("k tokens / s (launch to manifest)")
    ax.set_xticks(procs)
    ax.set_title(f"parallel prepare, {result['corpus_bytes'] / 1e6:.0f} MB, "
                 f"{os.cpu_count()} CPUs (shared)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main_scaling(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-scaling-"))
    try:
        result = bench_scaling(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"environment": environment(args), "scaling": result}
    print(scaling_table(result["scaling"]))
    loads = os.getloadavg()
    print(f"1-minute load average at the end: {loads[0]:.1f} on {os.cpu_count()} CPUs (a shared machine)")
    out = args.out.with_name("prepare_scaling.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    scaling_plot(result["scaling"], out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=16.0, help="corpus size in MB (UTF-8)")
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--loader-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--scaling", action="store_true", help="only the second question: parallel prepare")
    parser.add_argument("--scaling-procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--scaling-files", type=int, default=16)
    args = parser.parse_args(argv)
    if args.scaling:
        return main_scaling(args)
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        prep = bench_prepare(args, work)
        tokenizer = prep.pop("tokenizer")
        loader = bench_loader(args, Path(prep.pop("data_dir")), tokenizer)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cases = prep["cases"]
    loads = [run["loadavg_1min"] for r in cases.values() for run in r["runs"]]
    base_cpu = cases["bare-backend"]["cpu_s"]
    ratios = {name: r["cpu_s"] / base_cpu for name, r in cases.items() if name.startswith("prepare")}
    if "prepare-2" in cases and "bare-backend-2proc" in cases:
        ratios["prepare-2 vs bare-backend-2proc"] = cases["prepare-2"]["cpu_s"] / cases["bare-backend-2proc"]["cpu_s"]
    result = {"environment": environment(args), "prepare": prep, "loader": loader,
              "overhead_cpu_ratio_vs_bare_backend": ratios}
    print(table(result))
    print()
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x the CPU time of bare encoding ({'within' if ratio < 1.5 else 'OVER'} the 1.5x "
              f"target)")
    print(f"1-minute load average during the runs: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} CPUs "
          f"(other processes share this machine: compare cases within one run)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
