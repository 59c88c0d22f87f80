"""Turning raw input bytes into clean text, counting every change with its file and line.

The one cleaning policy of the project: `prepare` cleans the text it packs with it and `train_tokenizer` the text a
tokenizer learns from, so a tokenizer has seen every character exactly as it will meet it in the packed data.

Web-scale Japanese text is full of things a tokenizer should not see or that a crash must not be made of: invalid
UTF-8, NUL and other control characters, lone surrogates (from JSON ``\\ud800`` escapes), full-width ASCII and
half-width katakana, emoji. The policy here is never to crash and never to lose anything silently:

=====================  =======================================================  ==============
kind                   what happens                                             logged
=====================  =======================================================  ==============
invalid_utf8           bytes that are not UTF-8 (not valid in ``encoding``      every line
                       when one is given) are dropped (or replaced by U+FFFD
                       with ``invalid_utf8="replace"``)
control_characters     C0/C1 controls except tab and newline, DEL, a BOM or     every line
                       U+FFFE/U+FFFF inside text: removed (CRLF becomes LF)
invalid_unicode        lone surrogates (only JSON escapes can make them):       every line
                       removed
nfkc_normalized        the line changed under NFKC (full-width ASCII to         first N
                       half-width, half-width kana to full-width, ...), kept
                       normalised; ``normalization=None`` turns NFKC off
emoji                  emoji and pictographs: kept as they are, counted         first N
=====================  =======================================================  ==============

Encodings. Input is UTF-8 unless ``CleaningOptions.encoding`` (``--encoding``) says otherwise; a UTF-8 byte-order
mark at the start of a file is dropped. Input in another encoding is never read as UTF-8 and packed as mojibake:

* a file whose first bytes are certainly something else (a UTF-16/UTF-32 byte-order mark, or NUL bytes in the
  pattern of UTF-16/32 text) is refused before it is read (`check_head`);
* a file more than ``max_invalid_fraction`` (default 1%) of whose lines hold invalid bytes is refused once read
  (`invalid_share_error`): a wrong encoding shows as invalid bytes on most lines, a damaged UTF-8 file on a few.
  The message says what the file looks like (UTF-16 LE/BE, a legacy Japanese encoding that decodes it, or "not
  UTF-8") and names the fix: ``--encoding``, or a higher ``--max-invalid-fraction`` for damaged bytes.

With an explicit encoding, `utf8_stream` decodes the file and hands the readers UTF-8 bytes; bytes invalid in that
encoding become the byte 0xFF (never valid UTF-8), so they are counted and dropped per line exactly as invalid UTF-8
is. Everything after decoding (the table above) is the same for every encoding.

Further kinds are counted where they arise (`prepare`: empty documents, unknown tokens, malformed JSON lines; the
tokenizer trainer: empty and long lines). Each is an `Issue`, and `IssueLog` counts them and writes them to a
JSON-lines file (every instance of a loss kind, the first ones of a kept kind).
"""

from __future__ import annotations

import codecs
import io
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

# Kinds whose instances are all logged (something was removed or skipped) and kinds only sampled (text was kept,
# perhaps normalised): on a real corpus nearly every line holds a full-width parenthesis that NFKC rewrites.
LOSS_KINDS = ("invalid_utf8", "control_characters", "invalid_unicode", "empty_document", "invalid_json",
              "missing_text_field", "line_too_long")
KEPT_KINDS = ("nfkc_normalized", "emoji", "unknown_tokens", "long_document_split")
ISSUE_KINDS = LOSS_KINDS + KEPT_KINDS

ACTIONS = {
    "invalid_utf8": "invalid bytes dropped", "control_characters": "removed", "invalid_unicode": "removed",
    "empty_document": "document skipped", "invalid_json": "line skipped", "missing_text_field": "record skipped",
    "line_too_long": "line skipped", "nfkc_normalized": "normalised (NFKC)", "emoji": "kept",
    "unknown_tokens": "kept as the unknown token",
    "long_document_split": "tokenised in pieces (ids may differ at the cuts)",
}

# C0 controls except \t and \n, DEL, C1 controls, BOM/ZWNBSP inside text, the noncharacters U+FFFE/U+FFFF.
# A tab is kept, not made a space, for training and packing alike: the tokenizer itself (NFKC, then " " -> "▁")
# keeps tabs, so fine-tuning and inference text reaches it with them; a tokenizer trained on text whose tabs had
# been made spaces has never seen one and spells each as the byte piece <0x09>.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ufffe\uffff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Emoji and pictographs (counted, not removed): the emoji blocks, dingbats and misc symbols, regional indicators,
# variation selector 16 and the zero-width joiner that glue emoji sequences.
_EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\uFE0F\u200D\U000E0020-\U000E007F]")


class Issue(NamedTuple):
    """``count`` instances of ``kind`` (characters, byte sequences, tokens; 1 for a whole line or document)."""

    kind: str
    file_index: int  # index into the run's input files
    line: int  # 1-based line of a text or JSON-lines file, or 0-based row of an Arrow/Parquet data set
    count: int


@dataclass(frozen=True)
class CleaningOptions:
    """How text is decoded and cleaned before tokenisation (recorded in the manifest, but for
    ``max_invalid_fraction``, a guard, and ``encoding`` when it is UTF-8)."""

    normalization: Literal["NFKC"] | None = "NFKC"
    invalid_utf8: Literal["drop", "replace"] = "drop"
    # Log only the first N instances per chunk of "kept" kinds (their counts stay exact).
    max_logged_kept: int = 1000
    # The encoding of the input files: "utf-8", or e.g. "utf-16", "cp932" (Windows Shift-JIS), "euc-jp", "latin-1",
    # decoded explicitly (`utf8_stream`) before the same cleaning.
    encoding: str = "utf-8"
    # A file with invalid bytes on more than this share of its lines (those holding more than whitespace) is
    # refused: that many means a wrong encoding, not a few damaged bytes. 1% lets a web crawl's rare broken line
    # through and stops any file in another encoding (which breaks nearly every line with non-ASCII text).
    max_invalid_fraction: float = 0.01

    def __post_init__(self):
        if self.normalization not in ("NFKC", None):
            raise ValueError(f"normalization={self.normalization!r}: expected 'NFKC' or None")
        if self.invalid_utf8 not in ("drop", "replace"):
            raise ValueError(f"invalid_utf8={self.invalid_utf8!r}: expected 'drop' (remove the bytes) or "
                             f"'replace' (U+FFFD)")
        if self.max_logged_kept < 0:
            raise ValueError(f"max_logged_kept={self.max_logged_kept}: must be >= 0")
        try:
            known = codecs.lookup(self.encoding)
        except (LookupError, TypeError):
            known = None
        if known is None or not getattr(known, "_is_text_encoding", True):
            raise ValueError(f"encoding={self.encoding!r} is not a text encoding Python knows: use e.g. 'utf-8' "
                             f"(the default), 'utf-16', 'cp932' (Windows Shift-JIS), 'shift_jis', 'euc-jp' or "
                             f"'latin-1'")
        if not 0.0 <= self.max_invalid_fraction <= 1.0:
            raise ValueError(f"max_invalid_fraction={self.max_invalid_fraction}: must be between 0 (refuse any "
                             f"invalid byte) and 1 (refuse nothing); the default is 0.01")

    @property
    def is_utf8(self) -> bool:
        return codecs.lookup(self.encoding).name == "utf-8"


class _BadBytes:
    """A codecs error handler that counts invalid byte sequences instead of raising."""

    def __init__(self):
        self.count = 0
        self.replacement = ""

    def __call__(self, err: UnicodeDecodeError):
        self.count += 1
        return self.replacement, err.end


_BAD_BYTES = _BadBytes()
codecs.register_error("bigbird_ja_count", _BAD_BYTES)


def _mark_bad_bytes(err):
    # Decoding another encoding: an invalid sequence becomes U+DCFF; encoding that to UTF-8 (this handler again)
    # gives the byte 0xFF, which `decode_utf8` then counts and drops like any invalid UTF-8.
    if isinstance(err, UnicodeDecodeError):
        return "\udcff", err.end
    if isinstance(err, UnicodeEncodeError):
        return b"\xff" * (err.end - err.start), err.end
    raise err


codecs.register_error("bigbird_ja_mark", _mark_bad_bytes)


# ----------------------------------------------------------------------------------------------------------------
# Encodings: refusing input that is not in the encoding it is read with, decoding the one that is named


HEAD_BYTES = 1 << 16  # how much of a file `check_head` and the error messages look at


class EncodingError(ValueError):
    """An input file that is not in the encoding it is read with (UTF-8 unless ``encoding`` says otherwise)."""


class EncodingGuess(NamedTuple):
    description: str  # "UTF-16 LE (byte-order mark FF FE)"
    encoding: str  # what to pass as --encoding
    certain: bool  # a byte-order mark or an unmistakable NUL pattern (refused before reading); else a hint only


_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32 LE", "utf-32"), (codecs.BOM_UTF32_BE, "UTF-32 BE", "utf-32"),
         (codecs.BOM_UTF16_LE, "UTF-16 LE", "utf-16"), (codecs.BOM_UTF16_BE, "UTF-16 BE", "utf-16"))


def sniff_encoding(head: bytes) -> EncodingGuess | None:
    """UTF-16 or UTF-32 recognised in the first bytes of a file, by byte-order mark or by where its NULs are.

    UTF-16 text puts a NUL beside every ASCII character (after it in LE, before it in BE); UTF-32 two or three NULs
    in every 4 bytes. UTF-8 text has no NULs except as stray control characters (removed by cleaning), so a NUL
    pattern is certain only when NULs are at least 10% of the bytes, or follow most newlines (Japanese UTF-16,
    whose only ASCII may be the newlines); fewer make it a hint for the message of `invalid_share_error`.
    """
    for bom, name, encoding in _BOMS:  # UTF-32 LE first: its mark starts with UTF-16 LE's
        if head.startswith(bom):
            return EncodingGuess(f"{name} (byte-order mark {bom.hex(' ').upper()})", encoding, True)
    nuls = head.count(0)
    if nuls < 2:
        return None
    units = len(head) // 4
    if units >= 2:
        zeros = [head[i:units * 4:4].count(0) for i in range(4)]
        if min(zeros[2], zeros[3]) >= 0.9 * units and zeros[0] < 0.5 * units:
            return EncodingGuess("UTF-32 LE (NUL bytes in the pattern of UTF-32 text)", "utf-32-le", True)
        if min(zeros[0], zeros[1]) >= 0.9 * units and zeros[3] < 0.5 * units:
            return EncodingGuess("UTF-32 BE (NUL bytes in the pattern of UTF-32 text)", "utf-32-be", True)
    even, odd = head[0::2].count(0), head[1::2].count(0)
    if max(even, odd) >= 0.9 * nuls and (nuls >= 8 or nuls >= 0.1 * len(head)):
        order, where = ("LE", "odd") if odd > even else ("BE", "even")
        return EncodingGuess(f"UTF-16 {order} (NUL bytes at {where} offsets, as UTF-16 text without a byte-order "
                             f"mark has them)", f"utf-16-{order.lower()}", nuls >= 4 and nuls >= 0.1 * len(head))
    # Japanese UTF-16 has few ASCII characters, but its newlines are 0A 00 (LE) or 00 0A (BE) at even offsets;
    # in UTF-8 text a NUL after most newlines does not happen.
    units = np.frombuffer(head, dtype=np.uint8, count=len(head) // 2 * 2).reshape(-1, 2)
    le = int(((units[:, 0] == 10) & (units[:, 1] == 0)).sum())
    be = int(((units[:, 0] == 0) & (units[:, 1] == 10)).sum())
    for order, hits, other in (("LE", le, be), ("BE", be, le)):
        if hits >= 4 and other <= 0.1 * hits and hits >= 0.5 * head.count(b"\n"):
            return EncodingGuess(f"UTF-16 {order} (its newlines are {'0A 00' if order == 'LE' else '00 0A'}, as in "
                                 f"UTF-16 text without a byte-order mark)", f"utf-16-{order.lower()}", True)
    return None


HEAD_MIN_LINES = 20  # `check_head` judges the share of invalid lines only on at least this many


def check_head(path: str, head: bytes, options: CleaningOptions) -> None:
    """Refuse, before it is read, a file read as UTF-8 whose first bytes are certainly UTF-16 or UTF-32 (see
    `sniff_encoding`), or whose first lines are mostly invalid UTF-8 (more than half of at least `HEAD_MIN_LINES`
    lines, and more than ``max_invalid_fraction`` allows): a wrong encoding is then found in milliseconds, not after
    the whole file was read. The exact share over the whole file is checked as it is read."""
    if not options.is_utf8:
        return
    guess = sniff_encoding(head)
    if guess is not None and guess.certain:
        raise EncodingError(
            f"input {path!r} looks like {guess.description}, not UTF-8: read as UTF-8 its text would be mojibake. "
            f"Pass --encoding {guess.encoding} (CleaningOptions(encoding={guess.encoding!r})), or convert it first "
            f"(iconv -f {guess.encoding} -t utf-8)")
    complete = head if len(head) < HEAD_BYTES else head[:head.rfind(b"\n") + 1]  # no line cut off at the end
    lines = [line for line in complete.split(b"\n") if line.strip()]
    bad = sum(1 for line in lines if not _is_utf8(line))
    if len(lines) >= HEAD_MIN_LINES and bad > 0.5 * len(lines) and invalid_share_exceeded(bad, len(lines), options):
        partial = len(head) == HEAD_BYTES  # else the head is the whole file
        raise invalid_share_error(path, bad, len(lines), options, head, scope=" of its first" if partial else "")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _decodes_as(head: bytes, encoding: str) -> bool:
    """``head`` (perhaps cut inside a character) decodes strictly in ``encoding`` and is not plain ASCII."""
    if head.isascii():
        return False
    try:
        codecs.getincrementaldecoder(encoding)().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def encoding_advice(head: bytes, options: CleaningOptions) -> str:
    """What a file refused for invalid bytes looks like and which --encoding to try (from its first bytes)."""
    current = codecs.lookup(options.encoding).name
    guess = sniff_encoding(head)
    if guess is not None and codecs.lookup(guess.encoding).name != current:
        return f"it looks like {guess.description}: pass --encoding {guess.encoding}"
    if current != "utf-8" and _decodes_as(head, "utf-8"):
        return f"it is UTF-8, not {options.encoding}: leave out --encoding (UTF-8 is the default)"
    if current == "utf-8":
        # Damaged UTF-8 still holds many valid multi-byte characters; text in another encoding almost none.
        text = head.decode("utf-8", "replace")
        bad = text.count("\ufffd")
        good = sum(1 for c in text if c > "\x7f") - bad
        if good >= 4 * bad:
            return (f"its first {len(head):,} bytes are mostly UTF-8 ({good:,} characters beyond ASCII decode, "
                    f"{bad:,} byte sequences do not), so the file looks damaged rather than in another encoding")
    label = "not UTF-8" if current == "utf-8" else f"not {options.encoding}"
    # EUC-JP first: Shift-JIS bytes fail it at once, while EUC-JP text often passes as cp932 too.
    for candidate, name in (("euc_jp", "euc-jp"), ("cp932", "cp932")):
        if candidate != current and _decodes_as(head, candidate):
            return f"it is {label} and decodes as {name}: pass --encoding {name} if that is its encoding"
    return (f"it is {label}: pass --encoding with the file's encoding (e.g. cp932 for Windows Shift-JIS, euc-jp, "
            f"utf-16, latin-1)")


def invalid_share_exceeded(invalid_lines: int, lines: int, options: CleaningOptions) -> bool:
    """More than ``options.max_invalid_fraction`` of the ``lines`` holding text had invalid bytes."""
    return invalid_lines > options.max_invalid_fraction * lines


def invalid_share_error(path: str, invalid_lines: int, lines: int, options: CleaningOptions, head: bytes,
                        scope: str = "") -> EncodingError:
    """The error refusing ``path`` (see `invalid_share_exceeded`); ``head``: its first bytes, for the advice;
    ``scope``: which lines were counted (" of its first": of the first lines only), all by default."""
    encoding = "UTF-8" if options.is_utf8 else options.encoding
    return EncodingError(
        f"input {path!r}: {invalid_lines:,}{scope or ' of'} {lines:,} lines ({invalid_lines / max(lines, 1):.1%}) "
        f"hold bytes that are not valid {encoding}, more than max_invalid_fraction="
        f"{options.max_invalid_fraction:.1%} allows, so the file is refused; {encoding_advice(head, options)}. If "
        f"the encoding is right and those bytes are damaged, raise --max-invalid-fraction "
        f"(CleaningOptions.max_invalid_fraction) to read the file with them dropped")


class _Utf8Stream:
    """A binary file in another encoding, read as UTF-8 bytes: ``readline(limit)`` and line iteration, as a binary
    file offers them. Lines end at "\\n" only (a lone "\\r" stays inside its line, as in UTF-8 input)."""

    def __init__(self, raw, encoding: str):
        self._text = io.TextIOWrapper(raw, encoding=encoding, errors="bigbird_ja_mark", newline="\n")
        self._pending = b""

    def readline(self, limit: int = -1) -> bytes:
        while True:
            end = self._pending.find(b"\n") + 1
            if end and (limit < 0 or end <= limit):
                line, self._pending = self._pending[:end], self._pending[end:]
                return line
            if 0 <= limit <= len(self._pending):
                line, self._pending = self._pending[:limit], self._pending[limit:]
                return line
            more = self._text.readline(limit if limit > 0 else -1)
            if not more:
                line, self._pending = self._pending, b""
                return line
            self._pending += more.encode("utf-8", "bigbird_ja_mark")

    def __iter__(self):
        while line := self.readline():
            yield line

    def close(self) -> None:
        self._text.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def utf8_stream(raw, options: CleaningOptions):
    """``raw`` (a binary file) as UTF-8 bytes: itself for UTF-8 input, else decoded from ``options.encoding``."""
    return raw if options.is_utf8 else _Utf8Stream(raw, options.encoding)


def decode_utf8(data: bytes, options: CleaningOptions, file_index: int, line: int, multiline: bool,
                issues: list) -> str:
    """UTF-8 text of ``data``; invalid byte sequences dropped or replaced and logged per line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    _BAD_BYTES.replacement = "\ufffd" if options.invalid_utf8 == "replace" else ""
    parts = data.split(b"\n") if multiline else [data]
    out = []
    for offset, part in enumerate(parts):
        _BAD_BYTES.count = 0
        out.append(part.decode("utf-8", errors="bigbird_ja_count"))
        if _BAD_BYTES.count:
            issues.append(Issue("invalid_utf8", file_index, line + offset, _BAD_BYTES.count))
    return "\n".join(out)


def clean_text(text: str, options: CleaningOptions, file_index: int, line: int, multiline: bool,
               issues: list, kept_budget: dict) -> str:
    """Remove control characters and lone surrogates, apply NFKC, count emoji; append issues.

    ``multiline``: ``text`` holds consecutive lines of a file starting at ``line`` (so each issue gets its own
    line); otherwise every issue is reported at ``line`` (a JSON record or a data set row).
    ``kept_budget``: remaining log entries per kept kind (decremented here).
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    for kind, pattern in (("control_characters", _CONTROL), ("invalid_unicode", _SURROGATE)):
        if pattern.search(text) is not None:
            _count_by_line(pattern, text, kind, file_index, line, multiline, issues, None)
            text = pattern.sub("", text)
    if options.normalization and not unicodedata.is_normalized(options.normalization, text):
        if multiline:
            for offset, part in enumerate(text.split("\n")):
                if not unicodedata.is_normalized(options.normalization, part):
                    log_kept(Issue("nfkc_normalized", file_index, line + offset, 1), issues, kept_budget)
        else:
            log_kept(Issue("nfkc_normalized", file_index, line, 1), issues, kept_budget)
        text = unicodedata.normalize(options.normalization, text)
    if _EMOJI.search(text) is not None:
        _count_by_line(_EMOJI, text, "emoji", file_index, line, multiline, issues, kept_budget)
    return text


def log_kept(issue: Issue, issues: list, kept_budget: dict) -> None:
    """Log a kept-kind issue while the budget lasts; beyond it, add its count to an unlogged tally."""
    kind = issue.kind
    if kept_budget.get(kind, 0) > 0:
        kept_budget[kind] -= 1
        issues.append(issue)
    else:
        unlogged = kept_budget.setdefault("_unlogged", {})
        unlogged[kind] = unlogged.get(kind, 0) + issue.count


def _count_by_line(pattern: re.Pattern, text: str, kind: str, file_index: int, line: int, multiline: bool,
                   issues: list, kept_budget: dict | None) -> None:
    counts: dict[int, int] = {}
    if multiline:
        newline_pos = 0
        newlines = 0
        for match in pattern.finditer(text):
            pos = match.start()
            newlines += text.count("\n", newline_pos, pos)
            newline_pos = pos
            counts[line + newlines] = counts.get(line + newlines, 0) + 1
    else:
        counts[line] = sum(1 for _ in pattern.finditer(text))
    for at, n in counts.items():
        issue = Issue(kind, file_index, at, n)
        if kept_budget is None:
            issues.append(issue)
        else:
            log_kept(issue, issues, kept_budget)


class IssueLog:
    """Counts every issue and writes it, with its file and line, to a JSON-lines file opened for binary writing:
    every instance of a loss kind, the first ``max_logged_kept`` of each kept kind (the counts stay exact).

    ``counts`` (kind -> total count) and ``examples`` (kind -> the first 20 locations, "file:line") feed the
    caller's report; ``invalid_lines`` (file index -> lines with invalid bytes) the `invalid_share_exceeded`
    check. ``units`` names each file's ``line`` field ("line", or "row" for Arrow/Parquet); ``actions`` and
    ``kept_kinds`` default to this module's kinds, to which a caller adds its own.
    """

    def __init__(self, f, paths: list[str], units: list[str], max_logged_kept: int,
                 actions: dict[str, str] = ACTIONS, kept_kinds: tuple[str, ...] = KEPT_KINDS):
        self.f = f
        self.paths = paths
        self.units = units
        self.actions = actions
        self.max_logged_kept = max_logged_kept
        self.kept_left = {kind: max_logged_kept for kind in kept_kinds}
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.invalid_lines: dict[int, int] = {}  # file index -> lines with invalid bytes (one issue a line)

    def add(self, issues, unlogged: dict | None = None) -> None:
        """Record ``issues``; ``unlogged``: counts of kept kinds beyond a worker's budget (counted, not listed)."""
        for issue in issues:
            kind = issue.kind
            self.counts[kind] = self.counts.get(kind, 0) + issue.count
            if kind == "invalid_utf8":
                self.invalid_lines[issue.file_index] = self.invalid_lines.get(issue.file_index, 0) + 1
            if kind in self.kept_left:
                if self.kept_left[kind] <= 0:
                    continue
                self.kept_left[kind] -= 1
            path = self.paths[issue.file_index]
            examples = self.examples.setdefault(kind, [])
            if len(examples) < 20:
                examples.append(f"{path}:{issue.line}")
            record = {"kind": kind, "file": path, self.units[issue.file_index]: issue.line, "count": issue.count,
                      "action": self.actions[kind]}
            self.f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        for kind, count in (unlogged or {}).items():
            self.counts[kind] = self.counts.get(kind, 0) + count
