"""`prepare`: text in, packed fixed-length token sequences out (see `format` for the files it writes).

Pipeline, in constant memory:

1. `sources.RecordReader` streams documents (or bounded pieces of huge ones) from text, JSON lines, Parquet and
   saved `datasets` folders, in input order.
2. Records are grouped into chunks of about ``chunk_bytes``; a pool of ``num_workers`` processes decodes, cleans
   (`cleaning`) and tokenises each chunk with the tokenizer's Rust backend. At most ``2 * num_workers + 2`` chunks
   are in flight and results are taken in submission order, so the output does not depend on the number of workers
   or on timing: the same input and options give byte-identical files.
3. The main process packs the ids: every non-empty document is followed by [SEP]; the stream is cut into sequences
   of ``seq_len`` tokens, each starting with [CLS] (``cls_at_start``); a document longer than a sequence simply
   continues in the next one. The last sequence is padded with [PAD] (counted; nothing is dropped).
4. Sequences go to shards of about ``shard_tokens`` tokens, each written through a temporary file, fsync'ed and
   renamed; the manifest is written last (see `format`).

Steps 1-4 run per SLICE of the inputs (whole consecutive files, about ``slice_bytes`` of them, see `plan_slices`):
each slice is packed as if it were the whole input into its own folder, finished by a checksummed ``slice.json``,
and a merge links the slices' shards into one data set (`format`, "Slices"). So prepare runs in parallel across
processes and nodes (``worker=(i, n)``, ``--slice I/N`` or ``--slice auto`` under srun / torchrun / mpirun: each
worker packs a disjoint set of slices into the same output folder on a shared file system, the last to finish
merges), resumes after a crash without redoing finished slices (run the same command again), and writes the same
bytes whatever the number of workers, nodes or pool processes. Workers sharing a folder must be started with the same
settings (each slice.json records them by name): a worker or ``--merge`` that finds slices finished with others stops
with an error naming each differing option, rather than waiting for slices that would never merge.

Input problems are never silent: `cleaning` lists what is removed, normalised or skipped; each instance goes to
``issues.jsonl`` with its file and line, the counts to the manifest and the returned report. A few are fatal,
because packing on would give a silently wrong data set; the run then stops before the manifest is written:

* a file in another encoding than ``options.cleaning.encoding`` (UTF-8 by default): refused before it is read when
  its first bytes are certainly UTF-16/32, or once read when more than ``cleaning.max_invalid_fraction`` (1%) of
  its lines hold invalid bytes; the message names the file, what it looks like and ``--encoding``;
* input without a single document after cleaning: the error names the inputs (``issues.jsonl`` says why).

``seed`` does not change the packed order (documents stay in input order, so the output can be checked against the
input); it is recorded in the manifest as the default shuffle seed of the loader (`dataset.PackedDataset`).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import heapq
import itertools
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .cleaning import (
    ACTIONS, ISSUE_KINDS, KEPT_KINDS, CleaningOptions, Issue, IssueLog, check_head, clean_text, decode_utf8,
    invalid_share_error, invalid_share_exceeded, log_kept,
)
from .fingerprint import load_tokenizer, special_token_ids, tokenizer_fingerprint
from ..common.atomic_io import atomic_open, atomic_write_bytes, fsync_dir, temp_path
from ..common.checksums import check_listing, file_entry
from .format import (
    FORMAT_NAME, FORMAT_VERSION, ISSUES_NAME, MANIFEST_NAME, OWN_FILE, SHARD_STEM, SLICE_MANIFEST, SLICE_STEM,
    SLICES_DIR, TEMP_FILE, ShardInfo, canonical_json, dtype_name, read_manifest, token_dtype,
)
from .sources import (
    JSON_LINE, RAW_TEXT, SKIPPED, STRING, InputFile, Record, RecordReader, SourceOptions, discover_inputs,
    disk_bytes, read_head,
)

DEFAULT_SHARD_TOKENS = 1 << 29  # 512 Mi tokens: 1 GiB per shard in uint16, a few hundred shards per TB of text
# 1 GiB of input (~350 M tokens of Japanese): a few hundred slices for a 48 G-token corpus, enough to keep dozens
# of nodes busy; each costs one padded sequence (under 0.001% of its tokens) and one partial shard.
DEFAULT_SLICE_BYTES = 1 << 30
MERGE_CLAIM = ".merging"  # a folder in slices/: the worker that creates it merges


@dataclass(frozen=True)
class PrepareOptions:
    """Everything `prepare` can be told besides its main arguments; recorded in the manifest."""

    source: SourceOptions = field(default_factory=SourceOptions)
    cleaning: CleaningOptions = field(default_factory=CleaningOptions)
    cls_at_start: bool = True  # every sequence starts with [CLS] (a global token for the encoder)
    chunk_bytes: int = 1 << 20  # input bytes per work unit of a worker
    slice_bytes: int = DEFAULT_SLICE_BYTES  # whole input files per slice (on disk): the unit of parallel, resumed work
    durable: bool = True  # fsync every file and the folder (about 20 ms per shard); off only for throwaway output
    mp_start_method: str = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"

    def __post_init__(self):
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes={self.chunk_bytes}: must be >= 1 (1 MiB is a good value)")
        if self.slice_bytes < 1:
            raise ValueError(f"slice_bytes={self.slice_bytes}: must be >= 1 (default {DEFAULT_SLICE_BYTES})")
        if self.mp_start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(f"mp_start_method={self.mp_start_method!r}: this platform offers "
                             f"{multiprocessing.get_all_start_methods()}")


@dataclass
class PrepareReport:
    """What `prepare` wrote and what it found in the input."""

    out_dir: str
    seq_len: int
    dtype: str
    num_documents: int = 0
    num_document_tokens: int = 0
    num_separator_tokens: int = 0
    num_cls_tokens: int = 0
    num_padding_tokens: int = 0
    num_sequences: int = 0
    num_shards: int = 0
    num_input_bytes: int = 0
    seconds: float = 0.0
    issue_counts: dict = field(default_factory=dict)
    issue_examples: dict = field(default_factory=dict)  # kind -> first locations "file:line"
    num_slices: int = 0  # slices of the whole input
    packed_tokens: int = 0  # document tokens this call tokenised (not those of resumed slices)
    slices_packed: int = 0  # by this call
    slices_resumed: int = 0  # this call's slices found finished by an earlier (killed) run
    merged: bool = False  # the data set is complete (manifest written)
    waiting_for: list = field(default_factory=list)  # a worker's report: slices other workers have not finished
    note: str = ""

    @property
    def num_tokens(self) -> int:
        return self.num_sequences * self.seq_len

    def summary(self) -> str:
        rate = self.packed_tokens / self.seconds if self.seconds else 0.0
        if not self.merged and self.note:
            return f"packed {self.slices_packed} slice(s) ({self.slices_resumed} already finished): {self.note}"
        if not self.merged:
            return (f"packed {self.slices_packed} slice(s) ({self.slices_resumed} already finished) in "
                    f"{self.seconds:,.1f} s, {rate:,.0f} tokens/s; {len(self.waiting_for)} of {self.num_slices} "
                    f"slices are still being packed by other workers ({_short_list(self.waiting_for)}): the last "
                    f"worker to finish merges, or run the same command with --merge instead of --slice")
        lines = [
            f"prepared {self.num_documents:,} documents, {self.num_document_tokens:,} document tokens "
            f"({_size(self.num_input_bytes)}; tokenised here: {self.packed_tokens:,} in {self.seconds:,.1f} s, "
            f"{rate:,.0f} tokens/s)",
            f"  {self.num_sequences:,} sequences x {self.seq_len} ({self.dtype}) in {self.num_shards} shard(s) "
            f"at {self.out_dir}: +{self.num_separator_tokens:,} [SEP], +{self.num_cls_tokens:,} [CLS], "
            f"+{self.num_padding_tokens:,} [PAD]",
        ]
        if self.note or self.num_slices > 1:
            lines.append(f"  {self.num_slices} slice(s): {self.slices_packed} packed by this process, "
                         f"{self.slices_resumed} resumed" + (f" ({self.note})" if self.note else ""))
        if not any(self.issue_counts.values()):
            lines.append("  input issues: none")
        for kind in ISSUE_KINDS:
            if self.issue_counts.get(kind):
                where = ", ".join(self.issue_examples.get(kind, [])[:3])
                lines.append(f"  {kind}: {self.issue_counts[kind]:,} ({ACTIONS[kind]}), e.g. {where}")
        if any(self.issue_counts.values()):
            lines.append(f"  every logged issue: {os.path.join(self.out_dir, ISSUES_NAME)}")
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return ""


# ----------------------------------------------------------------------------------------------------------------
# Workers: decode, clean and tokenise one chunk of records.

_worker_state: dict = {}


def _init_worker(tokenizer_json: str, unk_id: int | None, cleaning: CleaningOptions, text_field: str,
                 pool_process: bool = True) -> None:
    from tokenizers import Tokenizer

    if pool_process:  # one worker per core: the Rust tokenizer must not start its own thread pool on top
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()  # transformers leaves call-time settings on the backend; ids must not depend on them
    tokenizer.no_padding()
    _worker_state.update(tokenizer=tokenizer, unk_id=unk_id, cleaning=cleaning, text_field=text_field)


def _encode_chunk(records: list[Record]) -> tuple:
    """-> (ids uint32, per-record token counts, per-record 'already reported' flags, issues, unlogged counts)."""
    st = _worker_state
    options: CleaningOptions = st["cleaning"]
    issues: list = []
    kept_budget = {kind: options.max_logged_kept for kind in KEPT_KINDS}
    texts: list[str] = []
    slots: list[int] = []  # record index of each text
    reported = np.zeros(len(records), dtype=bool)
    for i, record in enumerate(records):
        file_index, line = record.file_index, record.line
        if record.kind == SKIPPED:
            issues.append(Issue(record.payload, file_index, line, 1))
            reported[i] = True
            continue
        if record.kind == RAW_TEXT:
            text = decode_utf8(record.payload, options, file_index, line, True, issues)
            text = clean_text(text, options, file_index, line, True, issues, kept_budget)
        elif record.kind == JSON_LINE:
            text = _json_text(record.payload, options, file_index, line, issues, st["text_field"])
            if text is None:
                reported[i] = True
                continue
            text = clean_text(text, options, file_index, line, False, issues, kept_budget)
        elif record.kind == STRING:
            text = clean_text(record.payload, options, file_index, line, False, issues, kept_budget)
        else:  # pragma: no cover - a reader bug, not bad input
            raise AssertionError(f"unknown record kind {record.kind}")
        if text.strip():
            texts.append(text)
            slots.append(i)
    lengths = np.zeros(len(records), dtype=np.int64)
    tokenizer = st["tokenizer"]
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    id_lists = [enc.ids for enc in encode(texts, add_special_tokens=False)] if texts else []
    for slot, ids in zip(slots, id_lists):
        lengths[slot] = len(ids)
    ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.uint32, count=int(lengths.sum()))
    unk = st["unk_id"]
    if unk is not None and len(ids):
        for slot, id_list in zip(slots, id_lists):
            n = id_list.count(unk)
            if n:
                log_kept(Issue("unknown_tokens", records[slot].file_index, records[slot].line, n), issues,
                         kept_budget)
    return ids, lengths, reported, issues, kept_budget.get("_unlogged", {})


def _json_text(payload: bytes, options: CleaningOptions, file_index: int, line: int, issues: list,
               text_field: str) -> str | None:
    raw = decode_utf8(payload, options, file_index, line, False, issues)
    try:
        obj = json.loads(raw)
    except ValueError:
        issues.append(Issue("invalid_json", file_index, line, 1))
        return None
    value = obj.get(text_field) if isinstance(obj, dict) else None
    if not isinstance(value, str):
        issues.append(Issue("missing_text_field", file_index, line, 1))
        return None
    return value


# ----------------------------------------------------------------------------------------------------------------
# Shard writer


class _ShardWriter:
    """Streams sequences into shards of ``seqs_per_shard`` rows; each shard's files appear atomically."""

    def __init__(self, out_dir: Path, seq_len: int, dtype: np.dtype, seqs_per_shard: int, common_meta: dict,
                 durable: bool = True):
        self.out_dir = out_dir
        self.durable = durable
        self.seq_len = seq_len
        self.dtype = dtype
        self.seqs_per_shard = seqs_per_shard
        self.common_meta = common_meta
        self.shards: list[ShardInfo] = []
        self.doc_starts: collections.deque = collections.deque()  # global token offsets, ascending
        self._file = None
        self._tmp: Path | None = None
        self._rows = 0  # rows in the open shard
        self._hash = None
        self.total_rows = 0

    def add_document_start(self, global_token: int) -> None:
        self.doc_starts.append(global_token)

    def write_rows(self, rows: np.ndarray) -> None:
        """Append [n, seq_len] rows (already in the shard dtype)."""
        start = 0
        while start < len(rows):
            if self._file is None:
                self._open()
            take = min(len(rows) - start, self.seqs_per_shard - self._rows)
            data = rows[start:start + take].tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._rows += take
            self.total_rows += take
            start += take
            if self._rows == self.seqs_per_shard:
                self._close_shard()

    def finish(self) -> list[ShardInfo]:
        if self._file is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            if self._tmp is not None and self._tmp.exists():
                self._tmp.unlink()

    def _name(self, suffix: str) -> str:
        return SHARD_STEM.format(index=len(self.shards)) + suffix

    def _open(self) -> None:
        self._tmp = temp_path(self.out_dir / self._name(".bin"))
        self._file = open(self._tmp, "wb", buffering=1 << 22)
        self._hash = hashlib.sha256()
        self._rows = 0

    def _close_shard(self) -> None:
        index = len(self.shards)
        self._file.flush()
        if self.durable:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        first_token = (self.total_rows - self._rows) * self.seq_len
        end_token = self.total_rows * self.seq_len
        starts = []
        while self.doc_starts and self.doc_starts[0] < end_token:
            starts.append(self.doc_starts.popleft() - first_token)
        info = ShardInfo(index=index, tokens_file=self._name(".bin"), index_file=self._name(".idx"),
                         meta_file=self._name(".json"), num_sequences=self._rows,
                         num_tokens=self._rows * self.seq_len, num_documents=len(starts),
                         tokens_sha256=self._hash.hexdigest())
        atomic_write_bytes(self.out_dir / info.index_file, np.asarray(starts, dtype="<u8").tobytes(), self.durable)
        meta = dict(self.common_meta, **info.to_json())
        atomic_write_bytes(self.out_dir / info.meta_file, canonical_json(meta), self.durable)
        os.replace(self._tmp, self.out_dir / info.tokens_file)  # the token file last: its name means "complete"
        if self.durable:
            fsync_dir(self.out_dir)
        self._tmp = None
        self.shards.append(info)


# ----------------------------------------------------------------------------------------------------------------
# prepare


def prepare(tokenizer_dir, inputs, out_dir, seq_len: int = 4096, seed: int = 0, num_workers: int | None = None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, *, options: PrepareOptions | None = None,
            overwrite: bool = False, progress: bool = True, worker: tuple[int, int] | None = None,
            merge_only: bool = False) -> PrepareReport:
    """Tokenise and pack ``inputs`` into shards of ``seq_len``-token sequences under ``out_dir``.

    tokenizer_dir: a folder written by ``save_pretrained`` (loads with ``AutoTokenizer`` as a fast tokenizer), or
        such a tokenizer object. Needs [SEP] (and [CLS] unless ``options.cls_at_start`` is False) and [PAD].
    inputs: files or folders (see `sources` for formats and the plain-text layout).
    num_workers: tokenising processes (default: the CPUs this process may use); 0 tokenises in this process.
    shard_tokens: tokens per shard, rounded down to whole sequences (default 512 Mi = 1 GiB in uint16).
    overwrite: replace an existing finished output in ``out_dir`` (its manifest is removed first, so a run killed
        while overwriting leaves no readable folder rather than a mix).
    worker: ``(i, n)``: be worker i of n processes (on any nodes) sharing ``out_dir``: pack only this worker's
        slices (see `assign_slices`); the worker that finds every slice finished merges. None: one process packs
        every slice and merges. The output is the same either way.
    merge_only: pack nothing; merge the finished slices (an error lists unfinished ones).
    A run killed at any point is resumed by the same call: finished slices are kept, the rest redone.
    Returns a `PrepareReport`; see its ``summary()``.
    """
    options = options or PrepareOptions()
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: must be >= 2 (a [CLS] and a token; 4096 for the base model)")
    if num_workers is None:
        num_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers}: must be >= 0 (0 tokenises in the calling process)")
    seqs_per_shard = shard_tokens // seq_len
    if seqs_per_shard < 1:
        raise ValueError(f"shard_tokens={shard_tokens} is smaller than one sequence of seq_len={seq_len}: use at "
                         f"least {seq_len} (default {DEFAULT_SHARD_TOKENS})")
    if worker is not None:
        index, count = worker
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"worker {index}/{count}: need 0 <= I < N (e.g. --slice 0/4 ... --slice 3/4)")
        if overwrite:
            raise ValueError("overwrite with several workers would let one worker delete what another wrote: "
                             "delete the output folder first (or run one process with --overwrite)")
    if merge_only and worker is not None:
        raise ValueError("merge_only merges what the workers wrote: pass no worker with it")

    tokenizer = load_tokenizer(tokenizer_dir)
    specials = special_token_ids(tokenizer)
    needed = ["sep", "pad"] + (["cls"] if options.cls_at_start else [])
    missing = [name for name in needed if specials[name] is None]
    if missing:
        raise ValueError(f"the tokenizer has no {', '.join(n + '_token' for n in missing)}: packing needs them; "
                         f"set them in its tokenizer_config.json (e.g. sep_token='[SEP]')")
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    files = discover_inputs(inputs, options.source.input_format)
    slices = plan_slices(files, options.slice_bytes)
    mine = slices if worker is None else [slices[i] for i in assign_slices(slices, worker[1])[worker[0]]]
    if merge_only:
        mine = []
    for s in mine:  # before any output: a UTF-16 file is refused in milliseconds, not after a long run
        for item in files[s.start:s.stop]:
            if item.format in ("text", "jsonl"):
                check_head(item.path, read_head(item.path), options.cleaning)

    common_meta = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "seq_len": seq_len, "dtype": dtype_name(dtype),
        "vocab_size": vocab_size, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "seed": seed,
    }
    run = _Run(Path(out_dir), files, specials, common_meta, options, seqs_per_shard, dtype)
    keys = [run.key(s) for s in slices]
    report = PrepareReport(out_dir=str(run.out), seq_len=seq_len, dtype=dtype_name(dtype), num_slices=len(slices))
    if _prepare_out_dir(run.out, overwrite, keys, resumable=worker is not None or merge_only):
        return _report_of_manifest(report, read_manifest(run.out), "already complete")

    # Workers with other settings would pack slices that never merge with these: refuse before any work (and
    # after it, for one started at the same time). A one-process run packs every slice itself, so it has no peers.
    if worker is not None or merge_only:
        run.refuse_other_settings({s.index for s in mine}, merging=merge_only)
    started = time.perf_counter()
    todo = [s for s in mine if run.finished_slice(s, keys[s.index]) is None]
    report.slices_resumed = len(mine) - len(todo)
    pool = None
    bar = _progress_bar([f for s in todo for f in files[s.start:s.stop]], progress and bool(todo))
    try:
        if todo:
            init_args = (tokenizer.backend_tokenizer.to_str(), specials["unk"], options.cleaning,
                         options.source.text_field)
            if num_workers == 0:
                _init_worker(*init_args, pool_process=False)
            else:
                ctx = multiprocessing.get_context(options.mp_start_method)
                pool = ctx.Pool(num_workers, initializer=_init_worker, initargs=init_args)
        done_bytes = 0
        for s in todo:
            done_bytes += run.pack_slice(s, keys[s.index], pool, num_workers, bar, done_bytes, started, report)
            report.slices_packed += 1
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        raise
    finally:
        if bar is not None:
            bar.close()

    # The merge: by one process after its slices, by the worker that finds every slice finished, or on request.
    if worker is not None:
        run.refuse_other_settings({s.index for s in mine}, merging=False)
    manifests = [run.finished_slice(s, keys[s.index]) for s in slices]
    unfinished = [s.index for s, m in zip(slices, manifests) if m is None]
    if unfinished:
        if (run.out / MANIFEST_NAME).is_file():  # another worker merged meanwhile (and removed the slices)
            return _report_of_manifest(report, read_manifest(run.out), "merged by another worker")
        if merge_only:
            # finished under another key with these settings: packed before their input files changed, or damaged
            stale = [i for i in unfinished if (run.folder(slices[i]) / SLICE_MANIFEST).is_file()]
            waiting = [i for i in unfinished if i not in stale]
            why = ([f"slices {_short_list(waiting)} of {len(slices)} are not finished"] if waiting else []) + (
                [f"slices {_short_list(stale)} of {len(slices)} were finished under another key (their input "
                 f"files changed since, or their files are damaged)"] if stale else [])
            raise ValueError(f"cannot merge {str(run.out)!r}: {' and '.join(why)}: run (or re-run) the workers that "
                             f"pack them (`bigbird-ja prepare --slice I/N ...` with the same arguments), then "
                             f"--merge again")
        report.seconds = time.perf_counter() - started
        report.waiting_for = unfinished
        return report
    # One merger at a time: two workers finishing together would otherwise clean up each other's files. mkdir is
    # atomic on every shared file system; a merge killed half-way leaves the claim, which --merge (and a
    # one-process run) take over.
    claim = run.out / SLICES_DIR / MERGE_CLAIM
    if worker is None:
        shutil.rmtree(claim, ignore_errors=True)
    try:
        claim.mkdir()
    except FileExistsError:
        report.seconds = time.perf_counter() - started
        report.note = (f"every slice is finished and another worker is merging ({claim} exists); if no worker is "
                       f"left running, that merge was killed: run the same command with --merge instead of --slice")
        return report
    except FileNotFoundError:  # slices/ is gone: a merge has just finished
        pass
    if (run.out / MANIFEST_NAME).is_file():  # we were too late: that merge finished (and removed the slices)
        shutil.rmtree(claim, ignore_errors=True)
        return _report_of_manifest(report, read_manifest(run.out), "merged by another worker")
    run.merge(slices, manifests, report)
    report.seconds = time.perf_counter() - started
    return report


def _short_list(items: list[int]) -> str:
    return str(items[:10])[:-1] + (f", ... ({len(items)} in all)]" if len(items) > 10 else "]")


# ----------------------------------------------------------------------------------------------------------------
# Slices: the unit of parallel and resumable work (see `format`, "Slices")


@dataclass(frozen=True)
class Slice:
    """Input files ``[start, stop)``: packed on their own into ``slices/slice-<index>``."""

    index: int
    start: int
    stop: int
    num_bytes: int  # on disk, for load balancing


def plan_slices(files: list[InputFile], slice_bytes: int) -> list[Slice]:
    """Consecutive whole files, a slice closed once it holds >= ``slice_bytes`` on disk. Depends on the inputs
    and ``slice_bytes`` only (never on how many workers run), which is what makes the output independent of them.
    A file larger than ``slice_bytes`` is a slice of its own: split such a file to spread it over nodes."""
    slices: list[Slice] = []
    start, size = 0, 0
    for i, item in enumerate(files):
        size += disk_bytes(item)
        if size >= slice_bytes:
            slices.append(Slice(len(slices), start, i + 1, size))
            start, size = i + 1, 0
    if start < len(files):
        slices.append(Slice(len(slices), start, len(files), size))
    return slices


def assign_slices(slices: list[Slice], num_workers: int) -> list[list[int]]:
    """Slice indices per worker: largest slice first to the least-loaded worker (ties: the lower worker). The same
    for every worker that computes it, so the workers need no communication."""
    loads = [(0, w) for w in range(num_workers)]
    heapq.heapify(loads)
    assigned: list[list[int]] = [[] for _ in range(num_workers)]
    for s in sorted(slices, key=lambda s: (-s.num_bytes, s.index)):
        load, w = heapq.heappop(loads)
        assigned[w].append(s.index)
        heapq.heappush(loads, (load + s.num_bytes, w))
    return [sorted(a) for a in assigned]


# Launchers' variables for "which worker am I": torchrun / deepspeed, srun (inside a job step), Open MPI, MPICH.
_WORKER_ENV = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"),
               ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"))


def worker_from_env(env=None) -> tuple[int, int]:
    """``(i, n)`` from the launcher that started this process (see `_WORKER_ENV`)."""
    env = os.environ if env is None else env
    for rank, size in _WORKER_ENV:
        if rank.startswith("SLURM") and not ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
            continue  # the batch script itself (not an srun task) also sees SLURM_PROCID=0
        if rank in env and size in env:
            return int(env[rank]), int(env[size])
    raise ValueError("--slice auto: no launcher told this process its worker number (RANK/WORLD_SIZE of torchrun, "
                     "SLURM_PROCID/SLURM_NTASKS of srun, OMPI_COMM_WORLD_RANK/SIZE, PMI_RANK/SIZE): start it with "
                     "srun / torchrun / mpirun, or pass --slice I/N")


def parse_worker(text: str) -> tuple[int, int]:
    """``"I/N"`` or ``"auto"`` (see `worker_from_env`) -> (i, n)."""
    if text == "auto":
        return worker_from_env()
    head, _, tail = text.partition("/")
    if not (head.isdigit() and tail.isdigit()) or not 0 <= int(head) < int(tail):
        raise ValueError(f"--slice {text!r}: expected I/N with 0 <= I < N (worker I of N, e.g. 0/8), or 'auto'")
    return int(head), int(tail)


class _Run:
    """What every slice of one prepare run shares, and the work on slice folders."""

    def __init__(self, out: Path, files: list[InputFile], specials: dict, common_meta: dict,
                 options: PrepareOptions, seqs_per_shard: int, dtype: np.dtype):
        self.out = out
        self.files = files
        self.specials = specials
        self.common_meta = common_meta
        self.options = options
        self.seqs_per_shard = seqs_per_shard
        self.dtype = dtype

    def folder(self, s: Slice) -> Path:
        return self.out / SLICES_DIR / SLICE_STEM.format(index=s.index)

    def key(self, s: Slice) -> str:
        """A digest of everything that decides the slice's bytes: settings, tokenizer, its files and their sizes."""
        what = {"meta": self.common_meta, "specials": self.specials, "options": _options_json(self.options),
                "seqs_per_shard": self.seqs_per_shard, "files": [s.start, s.stop],
                "inputs": [{"path": f.path, "format": f.format, "bytes": disk_bytes(f)}
                           for f in self.files[s.start:s.stop]]}
        return "sha256:" + hashlib.sha256(canonical_json(what)).hexdigest()

    def settings(self) -> dict:
        """What the key holds besides a slice's own files, flat and by name: the settings every worker sharing the
        folder must agree on (recorded in each slice.json, compared by `refuse_other_settings`)."""
        flat = {**self.common_meta, "special_token_ids": self.specials, "seqs_per_shard": self.seqs_per_shard,
                "inputs": [f.path for f in self.files]}
        for name, value in _options_json(self.options).items():
            flat.update({f"{name}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {name: value})
        return json.loads(canonical_json(flat))  # as read back from a slice.json (lists, not tuples)

    def refuse_other_settings(self, mine: set[int], merging: bool) -> None:
        """Raise naming each differing option when a slice folder (but ``mine``: this worker packs those again)
        holds a slice finished with other settings: its key never matches ours, so the folder would never merge."""
        ours, found = self.settings(), {}
        for folder in sorted((self.out / SLICES_DIR).glob("*")):  # any plan's slices: --slice-bytes may differ
            index = folder.name.rpartition("-")[2]
            if not (index.isdigit() and folder.name == SLICE_STEM.format(index=int(index))) or int(index) in mine:
                continue
            with contextlib.suppress(OSError, ValueError):
                theirs = json.loads((folder / SLICE_MANIFEST).read_bytes()).get("settings")
                if isinstance(theirs, dict) and theirs != ours:
                    found.setdefault(_describe_differences(theirs, ours), []).append(int(index))
        if found:
            who = "this merge" if merging else "this worker"
            groups = "; ".join(f"slices {_short_list(indices)} were finished by workers started with {theirs}, "
                               f"while {who} has {here}" for (theirs, here), indices in found.items())
            raise ValueError(
                f"{'cannot merge' if merging else 'output folder'} {str(self.out)!r}: {groups}. Workers "
                f"sharing --out (and --merge) must be started with the same settings, or their slices never merge: "
                f"use the same value everywhere (a worker started again with it packs its slices again), or start "
                f"the folder again (delete it before starting the workers, or pack it in one process with "
                f"--overwrite)")

    def _stats(self, s: Slice) -> list:
        # Not part of the key (nor of the output): an input rewritten since the slice was packed is packed again.
        return [os.stat(f.path).st_mtime_ns for f in self.files[s.start:s.stop]]

    def finished_slice(self, s: Slice, key: str) -> dict | None:
        """The slice's manifest if it is finished, for this key and intact (sizes of every file, checksums of the
        small ones; shard tokens are checked by size, their sha256 is in the manifest for `checksums`)."""
        folder = self.folder(s)
        try:
            manifest = json.loads((folder / SLICE_MANIFEST).read_bytes())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get("key") != key or \
                manifest.get("input_mtimes") != self._stats(s):
            return None
        if check_listing(folder, manifest.get("files", {}), SLICE_MANIFEST):
            return None
        return manifest

    def pack_slice(self, s: Slice, key: str, pool, num_workers: int, bar, done_bytes: int, started: float,
                   total: PrepareReport) -> int:
        """Pack the slice into its folder, slice.json last; returns the input bytes read."""
        folder = self.folder(s)
        if folder.exists():  # an unfinished or stale attempt
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        options, files = self.options, self.files
        report = PrepareReport(out_dir=str(folder), seq_len=self.common_meta["seq_len"],
                               dtype=self.common_meta["dtype"])
        writer = _ShardWriter(folder, report.seq_len, self.dtype, self.seqs_per_shard, self.common_meta,
                              options.durable)
        packer = _Packer(writer, report.seq_len, self.dtype, self.specials, options.cls_at_start, report)
        try:
            with atomic_open(folder / ISSUES_NAME, options.durable) as issues_file:
                log = IssueLog(issues_file, [item.path for item in files],
                               ["row" if item.format in ("parquet", "arrow") else "line" for item in files],
                               options.cleaning.max_logged_kept)
                report.issue_counts, report.issue_examples = log.counts, log.examples
                reader = RecordReader(files, options.source, options.cleaning, s.start, s.stop)
                chunks = _chunks(reader, options.chunk_bytes)
                results = (((chunk, _encode_chunk(chunk)) for chunk in chunks) if num_workers == 0 else
                           _ordered(pool, chunks, 2 * num_workers + 2))
                checked = s.start  # files [s.start, checked) passed the invalid-bytes check
                for chunk, (ids, lengths, reported, issues, unlogged) in results:
                    log.add(issues, unlogged)
                    # Records come in file order: every file before this chunk's last one is complete.
                    checked = _check_invalid_share(files, reader, log, options.cleaning, checked,
                                                   chunk[-1].file_index)
                    packer.add_chunk(chunk, ids, lengths, reported, log)
                    _update_bar(bar, done_bytes + reader.bytes_read, total.packed_tokens +
                                report.num_document_tokens, started)
                _check_invalid_share(files, reader, log, options.cleaning, checked, s.stop)
                packer.finish(log)
                shards = writer.finish()
        except BaseException:
            writer.abort()
            raise
        total.packed_tokens += report.num_document_tokens
        listed = {info.index_file: file_entry(folder / info.index_file) for info in shards}
        listed.update({info.meta_file: file_entry(folder / info.meta_file) for info in shards})
        listed.update({info.tokens_file: info.num_tokens * self.dtype.itemsize for info in shards})
        listed[ISSUES_NAME] = file_entry(folder / ISSUES_NAME)
        manifest = {
            "format": FORMAT_NAME + "-slice", "key": key, "settings": self.settings(), "index": s.index,
            "files": listed, "input_files": [s.start, s.stop], "input_mtimes": self._stats(s),
            "totals": _totals(report, reader.bytes_read), "shards": [info.to_json() for info in shards],
            "issues": report.issue_counts, "issue_examples": report.issue_examples,
        }
        atomic_write_bytes(folder / SLICE_MANIFEST, canonical_json(manifest), options.durable)  # last: finished
        return reader.bytes_read

    def merge(self, slices: list[Slice], manifests: list[dict], report: PrepareReport) -> None:
        """Link every slice's shards into one flat, globally numbered data set; the manifest last, then remove
        the slices. Idempotent: a merge killed half-way is simply run again."""
        out, durable = self.out, self.options.durable
        stale = [p for p in out.iterdir() if p.name not in (MANIFEST_NAME, SLICES_DIR)
                 and (OWN_FILE.match(p.name) or TEMP_FILE.match(p.name))
                 and not p.name.endswith(f".tmp-{os.getpid()}")]
        for path in stale:  # shards of an earlier attempt of this merge, or of an older layout
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        shards: list[ShardInfo] = []
        for s, m in zip(slices, manifests):
            folder = self.folder(s)
            for local in m["shards"]:
                g = len(shards)
                info = ShardInfo(index=g, tokens_file=SHARD_STEM.format(index=g) + ".bin",
                                 index_file=SHARD_STEM.format(index=g) + ".idx",
                                 meta_file=SHARD_STEM.format(index=g) + ".json",
                                 num_sequences=local["num_sequences"], num_tokens=local["num_tokens"],
                                 num_documents=local["num_documents"], tokens_sha256=local["tokens_sha256"])
                _link(folder / local["index_file"], out / info.index_file, durable)
                atomic_write_bytes(out / info.meta_file, canonical_json(dict(self.common_meta, **info.to_json())),
                                   durable)
                _link(folder / local["tokens_file"], out / info.tokens_file, durable)  # last, as in the writer
                shards.append(info)
        with atomic_open(out / ISSUES_NAME, durable) as f:
            for s in slices:
                with open(self.folder(s) / ISSUES_NAME, "rb") as part:
                    shutil.copyfileobj(part, f)
        for m in manifests:
            for key in _TOTAL_KEYS:
                setattr(report, key, getattr(report, key) + m["totals"][key])
            for kind, n in m["issues"].items():
                report.issue_counts[kind] = report.issue_counts.get(kind, 0) + n
            for kind, where in m["issue_examples"].items():
                report.issue_examples[kind] = (report.issue_examples.get(kind, []) + where)[:20]
        if report.num_documents == 0:
            raise ValueError(_no_documents_message(self.files, report, out, self.options))
        report.num_shards = len(shards)
        report.merged = True
        manifest = dict(self.common_meta, **{
            "special_token_ids": self.specials,
            "packing": {"cls_at_start": self.options.cls_at_start, "separator": "[SEP] after every document",
                        "last_sequence": "padded with [PAD]"},
            "options": _options_json(self.options),
            "inputs": [{"path": f.path, "format": f.format} for f in self.files],
            "slices": [{"index": s.index, "input_files": [s.start, s.stop], "key": m["key"],
                        "num_shards": len(m["shards"])} for s, m in zip(slices, manifests)],
            "totals": _totals(report, report.num_input_bytes),
            "issues": {kind: report.issue_counts.get(kind, 0) for kind in ISSUE_KINDS},
            "shards": [info.to_json() for info in shards],
        })
        # Last: only now does the folder become readable.
        atomic_write_bytes(out / MANIFEST_NAME, canonical_json(manifest), durable)
        shutil.rmtree(out / SLICES_DIR, ignore_errors=True)  # hard links: the shards stay
        if durable:
            fsync_dir(out)


# The command-line spelling of the settings in `_Run.settings` (the others are fields of PrepareOptions), and the
# settings that follow from another (not named again when that one differs).
_SETTING_NAMES = {
    "seq_len": "--seq-len", "seed": "--seed", "tokenizer_fingerprint": "--tokenizer (fingerprint)",
    "vocab_size": "--tokenizer (vocabulary size)", "special_token_ids": "--tokenizer (special token ids)",
    "seqs_per_shard": "sequences per shard (--shard-tokens / --seq-len)", "inputs": "--input",
    "source.input_format": "--format", "source.text_field": "--text-field", "cleaning.normalization": "--normalization",
    "cleaning.encoding": "--encoding", "slice_bytes": "--slice-bytes",
}
_DERIVED_SETTINGS = {"seqs_per_shard": "seq_len", "dtype": "vocab_size", "vocab_size": "tokenizer_fingerprint",
                     "special_token_ids": "tokenizer_fingerprint"}


def _describe_differences(theirs: dict, ours: dict) -> tuple[str, str]:
    """("--seq-len 64, --normalization NFKC", "--seq-len 128, --normalization none"): each differing setting."""
    differing = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    differing = [k for k in differing if _DERIVED_SETTINGS.get(k) not in differing] or differing

    def value(v) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(map(str, v[:3])) + (f", ... ({len(v)} in all)" if len(v) > 3 else "") + "]"
        return "none" if v is None else str(v)

    def named(settings: dict) -> str:
        return ", ".join(f"{_SETTING_NAMES.get(k, 'PrepareOptions ' + k)} {value(settings.get(k))}" for k in differing)

    return named(theirs), named(ours)


_TOTAL_KEYS = ("num_sequences", "num_documents", "num_document_tokens", "num_separator_tokens", "num_cls_tokens",
               "num_padding_tokens", "num_input_bytes")


def _totals(report: PrepareReport, input_bytes: int) -> dict:
    return {
        "num_sequences": report.num_sequences, "num_tokens": report.num_tokens,
        "num_documents": report.num_documents, "num_document_tokens": report.num_document_tokens,
        "num_separator_tokens": report.num_separator_tokens, "num_cls_tokens": report.num_cls_tokens,
        "num_padding_tokens": report.num_padding_tokens, "num_input_bytes": input_bytes,
    }


def _link(src: Path, dst: Path, durable: bool) -> None:
    """``dst`` becomes ``src``'s bytes atomically: a hard link (no copy; a shard is GBs), a copy where the file
    system has no hard links."""
    tmp = temp_path(dst)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except FileNotFoundError:
        raise
    except OSError:
        shutil.copyfile(src, tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    os.replace(tmp, dst)


def _report_of_manifest(report: PrepareReport, manifest: dict, how: str) -> PrepareReport:
    totals = manifest["totals"]
    for key in _TOTAL_KEYS:
        setattr(report, key, totals[key])
    report.num_shards = len(manifest["shards"])
    report.issue_counts = dict(manifest.get("issues", {}))
    report.merged = True
    report.note = how
    return report


def _check_invalid_share(files, reader: RecordReader, log: IssueLog, cleaning: CleaningOptions, start: int,
                         stop: int) -> int:
    """Refuse the first of files [start, stop) with too many lines of invalid bytes; returns the new ``checked``."""
    for index in range(start, stop):
        bad, lines = log.invalid_lines.get(index, 0), reader.content_lines[index]
        if invalid_share_exceeded(bad, lines, cleaning):
            raise invalid_share_error(files[index].path, bad, lines, cleaning, read_head(files[index].path))
    return max(start, stop)


def _no_documents_message(files, report: PrepareReport, out: Path, options: PrepareOptions) -> str:
    names = [f.path for f in files[:5]] + ([f"... ({len(files) - 5} more)"] if len(files) > 5 else [])
    found = {kind: n for kind, n in report.issue_counts.items() if n}
    why = (f"; what was found: {found} (every instance in {str(out / ISSUES_NAME)!r})" if found else
           " (the files hold only blank lines)")
    return (f"no documents in {names}: after cleaning, nothing was left to pack{why}. No manifest was written "
            f"(the folder is no data set). Give input with text: plain-text documents separated by blank lines, or "
            f"JSON lines / Parquet with the text in the field {options.source.text_field!r} (--text-field)")


def _prepare_out_dir(out: Path, overwrite: bool, keys: list[str], resumable: bool) -> bool:
    """Make ``out`` ready; True when it already holds the finished output of these slices (``resumable`` runs:
    a worker or a merge started after the merge is done has nothing to do)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} exists and is not a folder: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    entries = sorted(p.name for p in out.iterdir())
    foreign = [name for name in entries if not OWN_FILE.match(name)]
    if foreign:
        raise ValueError(f"output folder {str(out)!r} holds files prepare did not write ({foreign[:5]}): choose an "
                         f"empty or new folder")
    if MANIFEST_NAME in entries:
        if not overwrite:
            if resumable:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    if [s["key"] for s in read_manifest(out).get("slices", [])] == keys:
                        return True
            raise ValueError(f"output folder {str(out)!r} already holds prepared data: choose another folder or "
                             f"pass overwrite=True / --overwrite")
        os.unlink(out / MANIFEST_NAME)  # first, so that the folder is unreadable until the new run completes
    if overwrite:
        for name in entries:  # shards and slices of an earlier or killed run, temporary files
            path = out / name
            if name != MANIFEST_NAME and path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    # Without overwrite, finished slices of a killed run are kept (resumed); the merge removes the rest.
    return False


def _options_json(options: PrepareOptions) -> dict:
    data = asdict(options)
    for how in ("mp_start_method", "durable"):  # how, not what: must not change the bytes of the output
        data.pop(how)
    # A guard, not a setting of what is packed; and the encoding only when it is not the default UTF-8, so the
    # manifests of UTF-8 input stay byte-identical to those written before the option existed.
    data["cleaning"].pop("max_invalid_fraction")
    if options.cleaning.is_utf8:
        data["cleaning"].pop("encoding")
    return data


def _chunks(reader, chunk_bytes: int):
    """Group records into work units of about ``chunk_bytes`` payload bytes (fixed by the input alone)."""
    chunk, size = [], 0
    for record in reader:
        chunk.append(record)
        size += len(record.payload) + 64
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _ordered(pool, chunks, max_in_flight: int):
    """Like pool.imap, but never more than ``max_in_flight`` chunks read ahead (imap reads its input to the end)."""
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append((chunk, pool.apply_async(_encode_chunk, (chunk,))))
        if len(pending) >= max_in_flight:
            done_chunk, result = pending.popleft()
            yield done_chunk, result.get()
    while pending:
        done_chunk, result = pending.popleft()
        yield done_chunk, result.get()


class _Packer:
    """Turns per-record ids into [SEP]-terminated documents and fixed-length rows."""

    def __init__(self, writer: _ShardWriter, seq_len: int, dtype, specials: dict, cls_at_start: bool,
                 report: PrepareReport):
        self.writer = writer
        self.seq_len = seq_len
        self.dtype = dtype
        self.limit = np.iinfo(dtype).max
        self.cls = specials["cls"]
        self.sep = specials["sep"]
        self.pad = specials["pad"]
        self.cls_at_start = cls_at_start
        self.body = seq_len - 1 if cls_at_start else seq_len  # stream tokens per row
        self.report = report
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.stream_pos = 0  # stream tokens emitted so far ([SEP] included, [CLS]/[PAD] not)
        self.doc_tokens = 0  # tokens of the current document so far
        self.doc_loc = None  # (file_index, line) where the current document starts
        self.doc_split = False
        self.doc_reported = False
        self.in_doc = False
        self._sep = np.array([self.sep], dtype=np.uint32)

    def add_chunk(self, records, ids: np.ndarray, lengths: np.ndarray, reported: np.ndarray, log) -> None:
        if len(ids) and int(ids.max()) > self.limit:
            raise ValueError(f"token id {int(ids.max())} does not fit {np.dtype(self.dtype).name}: the tokenizer "
                             f"emits ids beyond len(tokenizer); fix its added tokens")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        pieces = []
        added = 0  # tokens in `pieces`
        for i, record in enumerate(records):
            if record.new_document:
                sep = self._end_document(log)
                pieces.extend(sep)
                added += len(sep)
                self.in_doc = True
                self.doc_loc = (record.file_index, record.line)
                self.doc_split = False
                self.doc_reported = False
            else:
                self.doc_split = True
            self.doc_reported |= bool(reported[i])
            n = int(lengths[i])
            if n:
                if self.doc_tokens == 0:
                    self.writer.add_document_start(self._global_token(self.stream_pos + added))
                    self.report.num_documents += 1
                self.doc_tokens += n
                self.report.num_document_tokens += n
                pieces.append(ids[offsets[i]:offsets[i + 1]])
                added += n
        self._emit(pieces)

    def finish(self, log) -> None:
        self._emit(self._end_document(log))
        if self.pending_len:  # the last, partial sequence: pad it rather than drop tokens
            tail = np.concatenate(self.pending)
            pad = self.body - len(tail)
            self.report.num_padding_tokens += pad
            self._write(np.concatenate([tail, np.full(pad, self.pad, dtype=np.uint32)])[None, :])
            self.pending, self.pending_len = [], 0

    def _end_document(self, log) -> list:
        if not self.in_doc:
            return []
        self.in_doc = False
        if self.doc_split:
            log.add([Issue("long_document_split", *self.doc_loc, 1)])
        if self.doc_tokens == 0:
            if not self.doc_reported:
                log.add([Issue("empty_document", *self.doc_loc, 1)])
            return []
        self.doc_tokens = 0
        self.report.num_separator_tokens += 1
        return [self._sep]

    def _global_token(self, stream_pos: int) -> int:
        row, col = divmod(stream_pos, self.body)
        return row * self.seq_len + col + (1 if self.cls_at_start else 0)

    def _emit(self, pieces: list) -> None:
        for piece in pieces:
            self.pending.append(piece)
            self.pending_len += len(piece)
            self.stream_pos += len(piece)
        if self.pending_len < self.body:
            return
        stream = np.concatenate(self.pending)
        n_rows = len(stream) // self.body
        self._write(stream[:n_rows * self.body].reshape(n_rows, self.body))
        rest = stream[n_rows * self.body:]
        self.pending, self.pending_len = ([rest], len(rest)) if len(rest) else ([], 0)

    def _write(self, body_rows: np.ndarray) -> None:
        n_rows = len(body_rows)
        rows = np.empty((n_rows, self.seq_len), dtype=self.dtype)
        if self.cls_at_start:
            rows[:, 0] = self.cls
            rows[:, 1:] = body_rows
            self.report.num_cls_tokens += n_rows
        else:
            rows[:] = body_rows
        self.report.num_sequences += n_rows
        self.writer.write_rows(rows)


def _progress_bar(files, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    sizes = [f.size for f in files]
    total = sum(sizes) if all(s is not None for s in sizes) else None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare", mininterval=0.5,
                dynamic_ncols=True)


def _update_bar(bar, bytes_read: int, tokens: int, started: float) -> None:
    if bar is None:
        return
    bar.update(bytes_read - bar.n)
    elapsed = max(time.perf_counter() - started, 1e-9)
    bar.set_postfix_str(f"tokens={tokens:,} {tokens / elapsed:,.0f} tok/s", refresh=False)
