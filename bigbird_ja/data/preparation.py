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
import hashlib
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
from .format import (
    FORMAT_NAME, FORMAT_VERSION, ISSUES_NAME, MANIFEST_NAME, OWN_FILE, SHARD_STEM, TEMP_FILE, ShardInfo,
    canonical_json, dtype_name, token_dtype,
)
from .sources import (
    JSON_LINE, RAW_TEXT, SKIPPED, STRING, Record, RecordReader, SourceOptions, discover_inputs, read_head,
)

DEFAULT_SHARD_TOKENS = 1 << 29  # 512 Mi tokens: 1 GiB per shard in uint16, a few hundred shards per TB of text


@dataclass(frozen=True)
class PrepareOptions:
    """Everything `prepare` can be told besides its main arguments; recorded in the manifest."""

    source: SourceOptions = field(default_factory=SourceOptions)
    cleaning: CleaningOptions = field(default_factory=CleaningOptions)
    cls_at_start: bool = True  # every sequence starts with [CLS] (a global token for the encoder)
    chunk_bytes: int = 1 << 20  # input bytes per work unit of a worker
    durable: bool = True  # fsync every file and the folder (about 20 ms per shard); off only for throwaway output
    mp_start_method: str = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"

    def __post_init__(self):
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes={self.chunk_bytes}: must be >= 1 (1 MiB is a good value)")
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

    @property
    def num_tokens(self) -> int:
        return self.num_sequences * self.seq_len

    def summary(self) -> str:
        rate = self.num_document_tokens / self.seconds if self.seconds else 0.0
        lines = [
            f"prepared {self.num_documents:,} documents, {self.num_document_tokens:,} document tokens "
            f"({_size(self.num_input_bytes)} in {self.seconds:,.1f} s, {rate:,.0f} tokens/s)",
            f"  {self.num_sequences:,} sequences x {self.seq_len} ({self.dtype}) in {self.num_shards} shard(s) "
            f"at {self.out_dir}: +{self.num_separator_tokens:,} [SEP], +{self.num_cls_tokens:,} [CLS], "
            f"+{self.num_padding_tokens:,} [PAD]",
        ]
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
            overwrite: bool = False, progress: bool = True) -> PrepareReport:
    """Tokenise and pack ``inputs`` into shards of ``seq_len``-token sequences under ``out_dir``.

    tokenizer_dir: a folder written by ``save_pretrained`` (loads with ``AutoTokenizer`` as a fast tokenizer), or
        such a tokenizer object. Needs [SEP] (and [CLS] unless ``options.cls_at_start`` is False) and [PAD].
    inputs: files or folders (see `sources` for formats and the plain-text layout).
    num_workers: tokenising processes (default: the CPUs this process may use); 0 tokenises in this process.
    shard_tokens: tokens per shard, rounded down to whole sequences (default 512 Mi = 1 GiB in uint16).
    overwrite: replace an existing finished output in ``out_dir`` (its manifest is removed first, so a run killed
        while overwriting leaves no readable folder rather than a mix).
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

    tokenizer = load_tokenizer(tokenizer_dir)
    specials = special_token_ids(tokenizer)
    needed = ["sep", "pad"] + (["cls"] if options.cls_at_start else [])
    missing = [name for name in needed if specials[name] is None]
    if missing:
        raise ValueError(f"the tokenizer has no {', '.join(n + '_token' for n in missing)}: packing needs them; "
                         f"set them in its tokenizer_config.json (e.g. sep_token='[SEP]')")
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    fingerprint = tokenizer_fingerprint(tokenizer)
    files = discover_inputs(inputs, options.source.input_format)
    for item in files:  # before any output: a UTF-16 file is refused in milliseconds, not after a long run
        if item.format in ("text", "jsonl"):
            check_head(item.path, read_head(item.path), options.cleaning)

    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    common_meta = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "seq_len": seq_len, "dtype": dtype_name(dtype),
        "vocab_size": vocab_size, "tokenizer_fingerprint": fingerprint, "seed": seed,
    }
    report = PrepareReport(out_dir=str(out), seq_len=seq_len, dtype=dtype_name(dtype))
    writer = _ShardWriter(out, seq_len, dtype, seqs_per_shard, common_meta, options.durable)
    packer = _Packer(writer, seq_len, dtype, specials, options.cls_at_start, report)
    issues_file = None
    pool = None
    started = time.perf_counter()
    try:
        with atomic_open(out / ISSUES_NAME, options.durable) as issues_file:
            log = IssueLog(issues_file, [item.path for item in files],
                           ["row" if item.format in ("parquet", "arrow") else "line" for item in files],
                           options.cleaning.max_logged_kept)
            report.issue_counts, report.issue_examples = log.counts, log.examples
            reader = RecordReader(files, options.source, options.cleaning)
            init_args = (tokenizer.backend_tokenizer.to_str(), specials["unk"], options.cleaning,
                         options.source.text_field)
            if num_workers == 0:
                _init_worker(*init_args, pool_process=False)
                results = ((chunk, _encode_chunk(chunk)) for chunk in _chunks(reader, options.chunk_bytes))
            else:
                ctx = multiprocessing.get_context(options.mp_start_method)
                pool = ctx.Pool(num_workers, initializer=_init_worker, initargs=init_args)
                results = _ordered(pool, _chunks(reader, options.chunk_bytes), 2 * num_workers + 2)
            bar = _progress_bar(files, progress)
            checked = 0  # files [0, checked) passed the invalid-bytes check
            try:
                for chunk, (ids, lengths, reported, issues, unlogged) in results:
                    log.add(issues, unlogged)
                    # Records come in file order: every file before this chunk's last one is complete.
                    checked = _check_invalid_share(files, reader, log, options.cleaning, checked,
                                                   chunk[-1].file_index)
                    packer.add_chunk(chunk, ids, lengths, reported, log)
                    _update_bar(bar, reader.bytes_read, report, started)
            finally:
                if bar is not None:
                    bar.close()
            _check_invalid_share(files, reader, log, options.cleaning, checked, len(files))
            packer.finish(log)
            shards = writer.finish()
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        if report.num_documents == 0:
            raise ValueError(_no_documents_message(files, report, out, options))
        report.num_shards = len(shards)
        report.num_input_bytes = reader.bytes_read
        report.seconds = time.perf_counter() - started
        manifest = dict(common_meta, **{
            "special_token_ids": specials,
            "packing": {"cls_at_start": options.cls_at_start, "separator": "[SEP] after every document",
                        "last_sequence": "padded with [PAD]"},
            "options": _options_json(options),
            "inputs": [{"path": f.path, "format": f.format} for f in files],
            "totals": {
                "num_sequences": report.num_sequences, "num_tokens": report.num_tokens,
                "num_documents": report.num_documents, "num_document_tokens": report.num_document_tokens,
                "num_separator_tokens": report.num_separator_tokens, "num_cls_tokens": report.num_cls_tokens,
                "num_padding_tokens": report.num_padding_tokens, "num_input_bytes": report.num_input_bytes,
            },
            "issues": {kind: report.issue_counts.get(kind, 0) for kind in ISSUE_KINDS},
            "shards": [info.to_json() for info in shards],
        })
        # Last: only now does the folder become readable.
        atomic_write_bytes(out / MANIFEST_NAME, canonical_json(manifest), options.durable)
    except BaseException:
        writer.abort()
        if pool is not None:
            pool.terminate()
            pool.join()
        raise
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


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
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
            raise ValueError(f"output folder {str(out)!r} already holds prepared data: choose another folder or "
                             f"pass overwrite=True / --overwrite")
        os.unlink(out / MANIFEST_NAME)  # first, so that the folder is unreadable until the new run completes
    for name in entries:  # shards of an earlier or killed run, temporary files
        if name != MANIFEST_NAME and (OWN_FILE.match(name) or TEMP_FILE.match(name)):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


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


def _update_bar(bar, bytes_read: int, report: PrepareReport, started: float) -> None:
    if bar is None:
        return
    bar.update(bytes_read - bar.n)
    elapsed = max(time.perf_counter() - started, 1e-9)
    bar.set_postfix_str(f"docs={report.num_documents:,} tokens={report.num_document_tokens:,} "
                        f"{report.num_document_tokens / elapsed:,.0f} tok/s", refresh=False)
