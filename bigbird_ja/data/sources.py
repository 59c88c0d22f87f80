"""Streaming the input documents of `prepare` in constant memory, whatever their format and size.

Formats (chosen by extension, or for all inputs with ``input_format``):

* plain text (``.txt``, ``.text``, also ``.gz``): ONE DOCUMENT PER BLANK-LINE-SEPARATED BLOCK. Lines inside a block
  are joined by their newlines (the last line's terminator is dropped); a line holding only whitespace ends the
  block. (A file with one document per line
  is read correctly by putting a blank line between lines, e.g. ``sed G``.) The bundled sample corpus uses this
  layout.
* JSON lines (``.jsonl``, ``.ndjson``, also ``.gz``): one JSON object per line, the text in ``text_field``.
  Blank lines are ignored.
* Parquet files (``.parquet``): column ``text_field``, read in record batches.
* a `datasets` data set saved with ``save_to_disk`` (a folder with ``state.json``): column ``text_field``, read
  through its memory-mapped Arrow files. Pass a split folder (``DIR/train``) for a ``DatasetDict``.
* any other folder: every file above inside it, recursively, in sorted order.

Nothing is ever read whole. Text files are read with bounded ``readline(piece_bytes)``, so a single document (or
line) larger than memory arrives as consecutive PIECES of at most ``piece_bytes`` bytes, cut preferably after a
newline, then after "。", then after a space, and never inside a UTF-8 character; `prepare` tokenises pieces
separately and packs them back to back as one document. A JSON line longer than ``max_json_line_bytes`` cannot be
parsed in pieces: it is skipped in bounded reads and counted (``line_too_long``). Strings from Arrow/Parquet are
cut into pieces of at most ``piece_bytes`` characters the same way.

Text and JSON-lines files are UTF-8 unless ``CleaningOptions.encoding`` names another encoding; then they are decoded
here (`cleaning.utf8_stream`) and reach the workers as UTF-8 bytes (``bytes_read`` then counts those bytes). A UTF-8
byte-order mark at the start of a file is dropped. ``content_lines`` counts, per file, the lines that hold more than
whitespace: the denominator of the invalid-line share `prepare` refuses a file over (see `cleaning`).

Each document, piece or skipped line is a `Record` (a named tuple: cheap to pickle to the workers).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

from .cleaning import HEAD_BYTES, CleaningOptions, utf8_stream

RAW_TEXT, JSON_LINE, STRING, SKIPPED = 0, 1, 2, 3
FORMATS = ("text", "jsonl", "parquet", "arrow")
_EXTENSIONS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_JA_FULL_STOP = "。".encode("utf-8")


class Record(NamedTuple):
    """One document, one piece of a long document, or a line that could not be read."""

    file_index: int  # index into the run's input files
    line: int  # where it starts: 1-based line of a text or JSON-lines file, 0-based row of Arrow/Parquet
    kind: int  # what `payload` is: RAW_TEXT, JSON_LINE, STRING or SKIPPED
    payload: bytes | str  # bytes of consecutive lines or of a JSON line, a str, or the issue kind of a skip
    new_document: bool  # False for the later pieces of a long document


@dataclass(frozen=True)
class SourceOptions:
    """How inputs are found and read."""

    input_format: str = "auto"  # "auto" (by extension) or one of FORMATS for every input
    text_field: str = "text"  # JSON lines / Arrow / Parquet column holding the document
    piece_bytes: int = 1 << 20  # longest piece of one document handed to the tokenizer at once
    max_json_line_bytes: int = 64 << 20  # a JSON line longer than this is skipped (it cannot be parsed in pieces)
    batch_rows: int = 1024  # Arrow/Parquet rows read at once

    def __post_init__(self):
        if self.input_format not in ("auto",) + FORMATS:
            raise ValueError(f"input_format={self.input_format!r}: expected 'auto' or one of {FORMATS}")
        if self.piece_bytes < 64:
            raise ValueError(f"piece_bytes={self.piece_bytes}: must be >= 64 (1 MiB is a good value)")
        if self.max_json_line_bytes < self.piece_bytes:
            raise ValueError(f"max_json_line_bytes={self.max_json_line_bytes} < piece_bytes={self.piece_bytes}: "
                             f"raise max_json_line_bytes")
        if not self.text_field:
            raise ValueError("text_field is empty: name the field/column that holds the text (default 'text')")


@dataclass(frozen=True)
class InputFile:
    """One input: a file or a saved data set folder."""

    path: str
    format: str
    size: int | None  # bytes on disk when a progress bar can use them (uncompressed files), else None


def discover_inputs(inputs, input_format: str = "auto") -> list[InputFile]:
    """Expand folders, detect formats; errors name the path and what to pass instead."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[InputFile] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"input {str(raw)!r} does not exist")
        if path.is_dir():
            if (path / "dataset_dict.json").is_file():
                splits = sorted(p.name for p in path.iterdir() if p.is_dir())
                raise ValueError(f"input {str(raw)!r} is a DatasetDict with splits {splits}: pass one split "
                                 f"folder, e.g. {str(path / (splits[0] if splits else 'train'))!r}")
            if (path / "state.json").is_file():
                found.append(InputFile(str(raw), "arrow", None))
                continue
            members = sorted(p for p in path.rglob("*") if p.is_file() and _format_of(p, "auto", strict=False))
            if not members:
                raise ValueError(f"input folder {str(raw)!r} holds no .txt/.jsonl/.ndjson/.parquet files (nor is "
                                 f"it a data set saved with save_to_disk)")
            found.extend(InputFile(str(p), _format_of(p, input_format), _plain_size(p)) for p in members)
        else:
            found.append(InputFile(str(raw), _format_of(path, input_format), _plain_size(path)))
    if not found:
        raise ValueError("no inputs given: pass at least one file or folder")
    return found


def _format_of(path: Path, input_format: str, strict: bool = True) -> str | None:
    if input_format != "auto":
        return input_format
    suffixes = path.suffixes
    ext = suffixes[-2] if len(suffixes) >= 2 and suffixes[-1] == ".gz" else (suffixes[-1] if suffixes else "")
    fmt = _EXTENSIONS.get(ext.lower())
    if fmt == "parquet" and path.suffix == ".gz":
        fmt = None
    if fmt is None and strict:
        raise ValueError(f"input {str(path)!r}: cannot tell its format from the extension {ext!r}; name it .txt "
                         f"(blank-line-separated documents), .jsonl or .parquet, or pass input_format / --format")
    return fmt


def _plain_size(path: Path) -> int | None:
    return None if path.suffix == ".gz" else path.stat().st_size


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb", buffering=1 << 20)


def read_head(path: str) -> bytes:
    """The first bytes of a text or JSON-lines input (decompressed), for the encoding checks of `cleaning`."""
    with _open_binary(path) as f:
        return f.read(HEAD_BYTES)


def cut_point(data: bytes) -> int:
    """Where to cut a piece of a long document: after a newline, "。" or space in its second half, else at the
    last complete UTF-8 character. Never 0 for non-empty data."""
    half = len(data) // 2
    for sep in (b"\n", _JA_FULL_STOP, b" "):
        pos = data.rfind(sep, half)
        if pos >= 0:
            return pos + len(sep)
    return utf8_boundary(data)


def utf8_boundary(data: bytes) -> int:
    """The largest cut <= len(data) that does not split a UTF-8 character (invalid bytes count as characters)."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        byte = data[n - back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        if byte >= 0xC0:
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return n - back if need > back and n - back > 0 else n
        return n
    return n


def _last_piece(buf: list[bytes]) -> bytes:
    # A document is its lines joined by newlines: the terminator of its last line is not part of it.
    data = b"".join(buf)
    if data.endswith(b"\n"):
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
    return data


def split_string(text: str, limit: int) -> list[str]:
    """Cut a long str into pieces of at most ``limit`` characters at newlines, "。" or spaces where possible."""
    pieces = []
    start = 0
    while len(text) - start > limit:
        end = start + limit
        cut = -1
        for sep in ("\n", "。", " "):
            pos = text.rfind(sep, start + limit // 2, end)
            if pos >= 0:
                cut = pos + 1
                break
        if cut < 0:
            cut = end
            if "\udc00" <= text[cut - 1] <= "\udfff" or "\ud800" <= text[cut - 1] <= "\udbff":
                cut -= 1  # keep a surrogate pair from JSON escapes together
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def disk_bytes(item: InputFile) -> int:
    """Bytes ``item`` takes on disk (compressed files as they are; a saved data set: all its files): what
    `prepare` cuts its inputs into slices by, known before anything is read."""
    path = Path(item.path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


class RecordReader:
    """Iterate over the records of inputs ``files[start:stop]`` (all by default) in order; ``bytes_read`` grows as
    input is consumed. Records carry the index into ``files``, whatever ``start``."""

    def __init__(self, files: list[InputFile], options: SourceOptions, cleaning: CleaningOptions | None = None,
                 start: int = 0, stop: int | None = None):
        self.files = files
        self.options = options
        self.cleaning = cleaning or CleaningOptions()
        self.start, self.stop = start, len(files) if stop is None else stop
        self.bytes_read = 0
        self.content_lines = [0] * len(files)  # per text / JSON-lines file: lines holding more than whitespace

    def __iter__(self) -> Iterator[Record]:
        for index in range(self.start, self.stop):
            item = self.files[index]
            reader = {"text": self._text, "jsonl": self._jsonl, "parquet": self._parquet,
                      "arrow": self._arrow}[item.format]
            yield from reader(index, item.path)

    # -- text ------------------------------------------------------------------------------------------------
    def _text(self, index: int, path: str) -> Iterator[Record]:
        limit = self.options.piece_bytes
        buf: list[bytes] = []
        buf_len = 0
        buf_line = 0
        new_doc = True
        line = 0
        at_line_start = True
        first = True
        with utf8_stream(_open_binary(path), self.cleaning) as f:
            while True:
                chunk = f.readline(limit)
                if not chunk:
                    break
                self.bytes_read += len(chunk)
                if first:
                    first = False
                    if chunk.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM is encoding metadata, not text
                        chunk = chunk[3:]
                if at_line_start:
                    line += 1
                    blank = not chunk.strip()
                    if blank and chunk.endswith(b"\n"):  # a blank line ends the document
                        if buf:
                            yield Record(index, buf_line, RAW_TEXT, _last_piece(buf), new_doc)
                            buf, buf_len = [], 0
                        new_doc = True
                        continue
                    self.content_lines[index] += not blank
                at_line_start = chunk.endswith(b"\n")
                if not buf:
                    buf_line = line
                buf.append(chunk)
                buf_len += len(chunk)
                if buf_len >= limit:  # a long document: hand over a piece, keep the tail for the next one
                    data = b"".join(buf)
                    cut = cut_point(data)
                    yield Record(index, buf_line, RAW_TEXT, data[:cut], new_doc)
                    new_doc = False
                    buf_line += data.count(b"\n", 0, cut)
                    rest = data[cut:]
                    buf, buf_len = ([rest], len(rest)) if rest else ([], 0)
        if buf:
            yield Record(index, buf_line, RAW_TEXT, _last_piece(buf), new_doc)

    # -- JSON lines ------------------------------------------------------------------------------------------
    def _jsonl(self, index: int, path: str) -> Iterator[Record]:
        limit = self.options.max_json_line_bytes
        line = 0
        with utf8_stream(_open_binary(path), self.cleaning) as f:
            while True:
                chunk = f.readline(limit)
                if not chunk:
                    break
                line += 1
                self.bytes_read += len(chunk)
                if len(chunk) == limit and not chunk.endswith(b"\n"):
                    while True:  # skip the rest of the line in bounded reads
                        more = f.readline(limit)
                        self.bytes_read += len(more)
                        if not more or more.endswith(b"\n"):
                            break
                    yield Record(index, line, SKIPPED, "line_too_long", True)
                    continue
                if line == 1 and chunk.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM, not part of the first record
                    chunk = chunk[3:]
                if not chunk.strip():
                    continue
                self.content_lines[index] += 1
                yield Record(index, line, JSON_LINE, chunk, True)

    # -- Arrow / Parquet -------------------------------------------------------------------------------------
    def _parquet(self, index: int, path: str) -> Iterator[Record]:
        import pyarrow.parquet as pq

        field = self.options.text_field
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if field not in names:
            raise ValueError(f"Parquet file {path!r} has no column {field!r} (columns: {names}): pass the text "
                             f"column as text_field / --text-field")
        batches = (batch.column(0) for batch in pf.iter_batches(batch_size=self.options.batch_rows,
                                                                 columns=[field]))
        yield from self._rows(index, batches)

    def _arrow(self, index: int, path: str) -> Iterator[Record]:
        import datasets

        field = self.options.text_field
        ds = datasets.load_from_disk(path)
        if not isinstance(ds, datasets.Dataset):
            raise ValueError(f"input {path!r} is a {type(ds).__name__}: pass one split folder")
        if field not in ds.column_names:
            raise ValueError(f"data set {path!r} has no column {field!r} (columns: {ds.column_names}): pass the "
                             f"text column as text_field / --text-field")
        table_iter = ds.select_columns([field]).with_format("arrow").iter(batch_size=self.options.batch_rows)
        yield from self._rows(index, (table.column(field) for table in table_iter))

    def _rows(self, index: int, columns) -> Iterator[Record]:
        limit = self.options.piece_bytes
        row = 0
        for column in columns:
            for value in column.to_pylist():
                if not isinstance(value, str):
                    yield Record(index, row, SKIPPED, "missing_text_field", True)
                else:
                    self.bytes_read += len(value)
                    if len(value) <= limit:
                        yield Record(index, row, STRING, value, True)
                    else:
                        for k, piece in enumerate(split_string(value, limit)):
                            yield Record(index, row, STRING, piece, k == 0)
                row += 1
