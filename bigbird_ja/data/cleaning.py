"""Turning raw input bytes into clean text, counting every change with its file and line.

The one cleaning policy of the project: `prepare` cleans the text it packs with it and `train_tokenizer` the text a
tokenizer learns from, so a tokenizer has seen every character exactly as it will meet it in the packed data.

Web-scale Japanese text is full of things a tokenizer should not see or that a crash must not be made of: invalid
UTF-8, NUL and other control characters, lone surrogates (from JSON ``\\ud800`` escapes), full-width ASCII and
half-width katakana, emoji. The policy here is never to crash and never to lose anything silently:

=====================  =======================================================  ==============
kind                   what happens                                             logged
=====================  =======================================================  ==============
invalid_utf8           bytes that are not UTF-8 are dropped (or replaced by     every line
                       U+FFFD with ``invalid_utf8="replace"``)
control_characters     C0/C1 controls except tab and newline, DEL, a BOM or     every line
                       U+FFFE/U+FFFF inside text: removed (CRLF becomes LF)
invalid_unicode        lone surrogates (only JSON escapes can make them):       every line
                       removed
nfkc_normalized        the line changed under NFKC (full-width ASCII to         first N
                       half-width, half-width kana to full-width, ...), kept
                       normalised; ``normalization=None`` turns NFKC off
emoji                  emoji and pictographs: kept as they are, counted         first N
=====================  =======================================================  ==============

Further kinds are counted where they arise (`prepare`: empty documents, unknown tokens, malformed JSON lines; the
tokenizer trainer: empty and long lines). Each is an `Issue`, and `IssueLog` counts them and writes them to a
JSON-lines file (every instance of a loss kind, the first ones of a kept kind).
"""

from __future__ import annotations

import codecs
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal, NamedTuple

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
    """How text is cleaned before tokenisation (recorded in the manifest)."""

    normalization: Literal["NFKC"] | None = "NFKC"
    invalid_utf8: Literal["drop", "replace"] = "drop"
    # Log only the first N instances per chunk of "kept" kinds (their counts stay exact).
    max_logged_kept: int = 1000

    def __post_init__(self):
        if self.normalization not in ("NFKC", None):
            raise ValueError(f"normalization={self.normalization!r}: expected 'NFKC' or None")
        if self.invalid_utf8 not in ("drop", "replace"):
            raise ValueError(f"invalid_utf8={self.invalid_utf8!r}: expected 'drop' (remove the bytes) or "
                             f"'replace' (U+FFFD)")
        if self.max_logged_kept < 0:
            raise ValueError(f"max_logged_kept={self.max_logged_kept}: must be >= 0")


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
    caller's report. ``units`` names each file's ``line`` field ("line", or "row" for Arrow/Parquet); ``actions``
    and ``kept_kinds`` default to this module's kinds, to which a caller adds its own.
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

    def add(self, issues, unlogged: dict | None = None) -> None:
        """Record ``issues``; ``unlogged``: counts of kept kinds beyond a worker's budget (counted, not listed)."""
        for issue in issues:
            kind = issue.kind
            self.counts[kind] = self.counts.get(kind, 0) + issue.count
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
