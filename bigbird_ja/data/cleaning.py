"""Turning raw input bytes into clean text, counting every change with its file and line.

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

Further kinds are counted where they arise (`prepare`): empty documents, unknown tokens, malformed JSON lines.
Each issue is ``(kind, file_index, line, count)``: ``line`` is the 1-based line of a text or JSON-lines file or the
0-based row of an Arrow/Parquet data set; ``count`` is how many characters, byte sequences or tokens on that line.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

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
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ufffe\uffff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Emoji and pictographs (counted, not removed): the emoji blocks, dingbats and misc symbols, regional indicators,
# variation selector 16 and the zero-width joiner that glue emoji sequences.
_EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\uFE0F\u200D\U000E0020-\U000E007F]")

Issue = tuple  # (kind: str, file_index: int, line: int, count: int)


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
            issues.append(("invalid_utf8", file_index, line + offset, _BAD_BYTES.count))
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
                    _log_kept(("nfkc_normalized", file_index, line + offset, 1), issues, kept_budget)
        else:
            _log_kept(("nfkc_normalized", file_index, line, 1), issues, kept_budget)
        text = unicodedata.normalize(options.normalization, text)
    if _EMOJI.search(text) is not None:
        _count_by_line(_EMOJI, text, "emoji", file_index, line, multiline, issues, kept_budget)
    return text


def _log_kept(issue: Issue, issues: list, kept_budget: dict) -> None:
    """Log a kept-kind issue while the budget lasts; beyond it, add its count to an unlogged tally."""
    kind = issue[0]
    if kept_budget.get(kind, 0) > 0:
        kept_budget[kind] -= 1
        issues.append(issue)
    else:
        unlogged = kept_budget.setdefault("_unlogged", {})
        unlogged[kind] = unlogged.get(kind, 0) + issue[3]


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
        issue = (kind, file_index, at, n)
        if kept_budget is None:
            issues.append(issue)
        else:
            _log_kept(issue, issues, kept_budget)
