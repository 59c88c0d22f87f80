"""Japanese tokenizer: train a SentencePiece unigram model and save it as a transformers fast tokenizer.

What `train_tokenizer` builds, and why:

* A SentencePiece **unigram** model over NFKC-normalised text with **byte fallback**: a character outside the
  vocabulary becomes its UTF-8 bytes (`<0xE3>`...), so no input ever maps to [UNK] and `decode(encode(x))` gives
  back NFKC(x) exactly.
* **Pieces never cross word boundaries.** Extractive QA can only return answers whose start and end are token
  offsets; a plain unigram model learns pieces that glue words together (noun + particle, name + suffix) and
  loses the answers that end inside them (on held-out JSQuAD articles only 83-94% of questions keep an exactly
  recoverable gold answer, fewer the larger the vocabulary). So the training text is first split into
  words by MeCab (fugashi + unidic-lite) and the words are joined with a delimiter that SentencePiece's
  `pretokenization_delimiter` treats as a hard boundary: no learned piece spans two words. Inference needs no
  analyser (pieces are simply never longer than a word), and >99.5% of JSQuAD questions keep an exact answer.
* **Whitespace is its own token.** A space becomes "▁" (SentencePiece's escape) and is always a piece of its own,
  never glued to the next word as "▁word": a word after a space then starts exactly at its first character, which
  is where QA answers start. There is no dummy prefix (Japanese text does not start with a space) and runs of
  spaces are kept, so nothing is lost in the round trip.
* Special tokens of a DeBERTa-style encoder at fixed ids: [PAD]=0 (the model config's `pad_token_id` default),
  [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then the 256 byte pieces <0x00>..<0xFF> (ids 5..260), then learned pieces.
* The saved folder loads with `transformers.AutoTokenizer.from_pretrained(out_dir)` as a **fast** tokenizer
  (tokenizer.json, class `TokenizersBackend`) that keeps byte fallback and returns character offsets into the
  ORIGINAL string (`return_offsets_mapping=True`). The `tokenizers` pipeline is built here from the trained pieces
  and scores rather than by transformers' DeBERTa-v2 converter, which drops byte fallback. Single sequences become
  `[CLS] A [SEP]`, pairs `[CLS] A [SEP] B [SEP]` (token_type_ids 0 then 1). The SentencePiece files are saved too
  (`sentencepiece.model`, `.vocab`); on any text they give the same ids as the fast tokenizer, except where the
  text contains a special token's literal ("[SEP]"), which the fast tokenizer matches as that token.
* **Streaming, bounded memory.** Input files are read line by line; at most `input_sentence_size` cleaned lines
  are kept (uniform reservoir sample) and only those are segmented and handed to the trainer as an iterator.
* **Cleaned as `prepare` cleans.** Every line is decoded and cleaned by `bigbird_ja.data.cleaning`, the policy
  `prepare` applies to the text it packs (invalid UTF-8 bytes dropped, control characters and U+FFFE/U+FFFF
  removed, tabs kept, NFKC, emoji kept), so the tokenizer learns each character as it will meet it in the packed
  data. Empty lines are skipped and long lines split. Bad input is never silent: every case is counted and
  located by file and line in the returned report, in `training_report.json` (counts and the first locations per
  kind) and in `input_issues.jsonl` (the format of prepare's issues.jsonl: every instance where text was lost, the
  first ones of the kinds that keep it). As in `prepare`, a file in another encoding is refused rather than
  learnt from as mojibake (a UTF-16/32 byte-order mark or NUL pattern before reading, more than
  `max_invalid_fraction` of its lines with invalid bytes once read): name its encoding with `encoding`
  (``--encoding``). Input without a single usable line is an error.

Known limits. Round trip: a literal "▁" (U+2581) in the input decodes as a space, as in SentencePiece. Offsets:
where NFKC composes several original characters into one (half-width "ｶﾞ" -> "ガ", "e" + U+0301 -> "é"), the
`tokenizers` alignment gives the composed character the span of its first source character only, so the absorbed
mark belongs to no token ("ｶﾞｷﾞ" -> ガ (0, 1), ギ (2, 3)); extend a span's end to the next token's start to cover
it. Every other character, NFKC-changed or not, maps exactly (one character that NFKC expands, such as "㌔" ->
"キロ", gives each of its pieces that character's span).

The QA property is measured by `bigbird_ja.finetune.answer_coverage.answer_boundary_rate` (on JSQuAD).

MeCab (fugashi, unidic-lite) and sentencepiece are training-time dependencies only: `pip install
'bigbird-ja[tokenizer]'`. Loading and using a trained tokenizer needs only transformers/tokenizers.
"""

from __future__ import annotations

import codecs
import json
import os
import random
import re
import shutil
import time
import uuid
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .data.cleaning import (
    ACTIONS, HEAD_BYTES, KEPT_KINDS, CleaningOptions, Issue, IssueLog, check_head, clean_text, decode_utf8,
    invalid_share_error, invalid_share_exceeded, utf8_stream,
)

# Ids are fixed by the trainer options below; tests and model configs rely on them.
SPECIAL_TOKENS: dict[str, int] = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)
NUM_BYTE_PIECES = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + NUM_BYTE_PIECES + 1
PRETOKENIZERS = ("mecab", "none")

SPM_PREFIX = "sentencepiece"
REPORT_FILE = "training_report.json"
ISSUES_FILE = "input_issues.jsonl"
_OUTPUT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", f"{SPM_PREFIX}.model",
                 f"{SPM_PREFIX}.vocab", REPORT_FILE, ISSUES_FILE)

INSTALL_HINT = "pip install 'bigbird-ja[tokenizer]'"

# Word delimiter for SentencePiece's pretokenization_delimiter. It is a control character (U+001F), so cleaning
# removes it from the text and it can never be confused with content; NFKC leaves it alone.
_WORD_DELIMITER = "\x1f"
# Lines longer than this are split (at sentence ends where possible) so SentencePiece never skips one for length.
_MAX_SENTENCE_CHARS = 2048
# UTF-8 needs at most 4 bytes a character, plus one delimiter byte per word: a chunk never exceeds this many bytes.
_MAX_SENTENCE_BYTES = 5 * _MAX_SENTENCE_CHARS
_SENTENCE_END = re.compile(r"(?<=[。！？!?．.])")
# A literal that spells a byte piece ("<0x41>") must not be read as that piece: the "<" is cut off first.
_BYTE_PIECE_LITERAL = r"<(?=0x[0-9A-F]{2}>)"
# Score given to control, unknown and byte pieces in the fast model, so any ordinary segmentation of text wins over
# them (SentencePiece never matches them against text; byte fallback still finds byte pieces by name).
_UNMATCHABLE_SCORE = -1.0e4


# ----------------------------------------------------------------------------------------------------------------
# Report

# The trainer's own issue kinds, logged beside those of `cleaning` (same log, same file format).
_LINE_ACTIONS = {
    "empty_line": "line skipped",
    "long_line_split": f"split at sentence ends into pieces of <= {_MAX_SENTENCE_CHARS} characters",
    "replacement_character": "kept (U+FFFD: text lost before the file was written)",
    "segmentation_fallback": "kept, split at whitespace only (MeCab's words did not align with the text)",
}
_ISSUE_ACTIONS = {**ACTIONS, **_LINE_ACTIONS}
_KEPT_KINDS = KEPT_KINDS + ("long_line_split", "replacement_character", "segmentation_fallback")


@dataclass
class TokenizerTrainingReport:
    """What `train_tokenizer` read, dropped, changed and produced. Saved as training_report.json."""

    out_dir: str
    vocab_size: int
    requested_vocab_size: int
    shrunk: bool
    pretokenize: str
    special_tokens: dict[str, int]
    files: list[dict[str, Any]] = field(default_factory=list)  # per file: path, lines, lines_used
    lines_read: int = 0
    lines_used: int = 0
    lines_skipped: int = 0
    sentences: int = 0  # cleaned lines (after splitting long ones) offered to the sampler
    sentences_sampled: int = 0  # kept by the input_sentence_size cap and given to the trainer
    characters_sampled: int = 0
    issue_counts: dict[str, int] = field(default_factory=dict)  # per kind: characters, byte sequences or lines
    issue_examples: dict[str, list[str]] = field(default_factory=dict)  # per kind: the first "file:line"
    issues_file: str = ISSUES_FILE  # in out_dir, one JSON object a line (see `cleaning.IssueLog`)
    seconds: float = 0.0

    def summary(self, max_examples: int = 5) -> str:
        lines = [
            f"trained a {self.vocab_size}-piece unigram tokenizer (pretokenize={self.pretokenize}"
            + (f", shrunk from {self.requested_vocab_size}" if self.shrunk else "") + f") in {self.seconds:.1f} s",
            f"  input: {self.lines_read} lines in {len(self.files)} file(s), {self.lines_used} used, "
            f"{self.lines_skipped} skipped; {self.sentences_sampled} of {self.sentences} sentences "
            f"({self.characters_sampled} characters) sampled for training",
            "  special tokens: " + ", ".join(f"{tok}={idx}" for tok, idx in self.special_tokens.items())
            + f", byte pieces <0x00>..<0xFF> = {len(self.special_tokens)}..{len(self.special_tokens) + 255}",
        ]
        if not self.issue_counts:
            lines.append("  input issues: none")
        for kind, count in sorted(self.issue_counts.items()):
            where = ", ".join(self.issue_examples.get(kind, [])[:max_examples])
            lines.append(f"  {kind}: {count} ({_ISSUE_ACTIONS[kind]})" + (f", e.g. {where}" if where else ""))
        if self.issue_counts:
            lines.append(f"  every logged issue: {Path(self.out_dir) / self.issues_file}")
        lines.append(f"  wrote {self.out_dir}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Reading and cleaning


def _split_long(text: str, limit: int) -> list[str]:
    """Pieces of at most `limit` characters, cut after sentence ends where possible."""
    chunks: list[str] = []
    current = ""
    for part in _SENTENCE_END.split(text):
        while len(part) > limit:  # no sentence end close enough: cut hard
            if current:
                chunks.append(current)
                current = ""
            chunks.append(part[:limit])
            part = part[limit:]
        if len(current) + len(part) > limit:
            chunks.append(current)
            current = ""
        current += part
    if current:
        chunks.append(current)
    return [c for c in chunks if c.strip()]


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(HEAD_BYTES)


def _read_sentences(paths: list[Path], log: IssueLog, stats: list[dict[str, Any]],
                    options: CleaningOptions | None = None) -> Iterator[tuple[str, int, int]]:
    """(sentence, file index, line number) for every usable line of every file, read lazily.

    Each line is cleaned as `prepare` cleans the text it packs (`cleaning`, with prepare's default options and
    ``options.encoding``); a file with more than ``options.max_invalid_fraction`` of its lines holding invalid bytes
    is refused (`cleaning.invalid_share_error`) once read.
    """
    options = options or CleaningOptions()
    kept_budget = {kind: log.max_logged_kept for kind in KEPT_KINDS}
    for file_idx, path in enumerate(paths):
        entry = {"path": str(path), "lines": 0, "lines_used": 0}
        stats.append(entry)
        content_lines = 0  # lines holding more than whitespace: the share of invalid ones is checked
        with utf8_stream(open(path, "rb"), options) as handle:
            for line_no, raw in enumerate(handle, start=1):
                entry["lines"] = line_no
                if line_no == 1 and raw.startswith(codecs.BOM_UTF8):  # encoding metadata, as prepare reads it
                    raw = raw[len(codecs.BOM_UTF8):]
                raw = raw.rstrip(b"\n")
                if raw.endswith(b"\r"):  # a Windows line end, not content
                    raw = raw[:-1]
                if raw.strip():
                    content_lines += 1
                issues: list[Issue] = []
                text = decode_utf8(raw, options, file_idx, line_no, False, issues)
                text = clean_text(text, options, file_idx, line_no, False, issues, kept_budget)
                chunks = []
                if not text.strip():
                    issues.append(Issue("empty_line", file_idx, line_no, 1))
                else:
                    entry["lines_used"] += 1
                    if "\ufffd" in text:
                        issues.append(Issue("replacement_character", file_idx, line_no, text.count("\ufffd")))
                    chunks = [text]
                    if len(text) > _MAX_SENTENCE_CHARS:
                        chunks = _split_long(text, _MAX_SENTENCE_CHARS)
                        issues.append(Issue("long_line_split", file_idx, line_no, 1))
                log.add(issues, kept_budget.pop("_unlogged", None))
                for chunk in chunks:
                    yield chunk, file_idx, line_no
        bad = log.invalid_lines.get(file_idx, 0)
        if invalid_share_exceeded(bad, content_lines, options):
            raise invalid_share_error(str(path), bad, content_lines, options, _read_head(path))


class _Reservoir:
    """A uniform sample of at most `cap` sentences (all of them if cap <= 0), with where each came from."""

    def __init__(self, cap: int, seed: int):
        self.cap = cap
        self.seen = 0
        self.sentences: list[str] = []
        self.files = array("I")
        self.lines = array("Q")
        self._rng = random.Random(seed)

    def offer(self, sentence: str, file_idx: int, line_no: int) -> None:
        self.seen += 1
        if self.cap <= 0 or len(self.sentences) < self.cap:
            self.sentences.append(sentence)
            self.files.append(file_idx)
            self.lines.append(line_no)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.cap:
            self.sentences[slot] = sentence
            self.files[slot] = file_idx
            self.lines[slot] = line_no


# ----------------------------------------------------------------------------------------------------------------
# Word segmentation (training time only)


def _import_or_explain(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{what} needs the '{module}' package, which is not installed ({err}); install the "
                          f"tokenizer training extras with: {INSTALL_HINT}") from err


class MecabSegmenter:
    """Splits text into MeCab words (fugashi + unidic-lite); whitespace runs are units of their own.

    `units(text)` returns pieces whose concatenation is exactly `text`, so joining them with the delimiter only
    adds boundaries and never changes the content.
    """

    def __init__(self):
        fugashi = _import_or_explain("fugashi", "pretokenize='mecab'")
        unidic_lite = _import_or_explain("unidic_lite", "pretokenize='mecab'")
        dicdir = Path(unidic_lite.DICDIR)
        # Name the dictionary explicitly: a bare Tagger() prefers the full `unidic` package, which may be
        # installed without its (separately downloaded) dictionary.
        self._tagger = fugashi.Tagger(f'-r "{dicdir / "mecabrc"}" -d "{dicdir}"')

    def units(self, text: str) -> list[str] | None:
        units: list[str] = []
        pos = 0
        for word in self._tagger(text):
            surface = word.surface
            start = text.find(surface, pos)
            if start < 0 or (start > pos and text[pos:start].strip()):
                return None  # the analyser changed the text: no alignment, caller falls back
            if start > pos:
                units.append(text[pos:start])
            units.append(surface)
            pos = start + len(surface)
        if pos < len(text):
            if text[pos:].strip():
                return None
            units.append(text[pos:])
        # Whitespace glued to a word (MeCab keeps none, but be exact) is split off so "▁" stays its own piece.
        out: list[str] = []
        for unit in units:
            out += [u for u in re.split(r"(\s+)", unit) if u]
        return out


def _training_iterator(reservoir: _Reservoir, segmenter: MecabSegmenter | None,
                       log: IssueLog | None) -> Iterator[str]:
    """The sentences handed to SentencePiece; with a segmenter, words are joined by the delimiter.

    Whitespace is always a unit of its own, so even without MeCab no piece glues "▁" to a word.
    """
    for i, sentence in enumerate(reservoir.sentences):
        units = segmenter.units(sentence) if segmenter is not None else None
        if units is None:
            if segmenter is not None and log is not None:
                log.add([Issue("segmentation_fallback", reservoir.files[i], int(reservoir.lines[i]), 1)])
            units = [u for u in re.split(r"(\s+)", sentence) if u]
        yield _WORD_DELIMITER.join(units)


# ----------------------------------------------------------------------------------------------------------------
# Training


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


class VocabSizeError(ValueError):
    """The requested vocabulary size does not fit the corpus; `limit` is the size that works."""

    def __init__(self, message: str, limit: int):
        super().__init__(message)
        self.limit = limit


def _train_spm(sentences: Iterator[str], model_prefix: Path, vocab_size: int, *, characters: int,
               character_coverage: float, num_threads: int, seed: int, extra: dict[str, Any]) -> None:
    spm = _import_or_explain("sentencepiece", "train_tokenizer")
    options: dict[str, Any] = dict(
        sentence_iterator=sentences,
        model_prefix=str(model_prefix),
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        normalization_rule_name="nfkc",
        add_dummy_prefix=False,  # Japanese text has no leading space to model
        remove_extra_whitespaces=False,  # keep every space: exact round trip and offsets
        byte_fallback=True,
        split_by_whitespace=True,
        pad_id=PAD_ID, pad_piece="[PAD]",
        unk_id=UNK_ID, unk_piece="[UNK]",
        bos_id=CLS_ID, bos_piece="[CLS]",
        eos_id=SEP_ID, eos_piece="[SEP]",
        control_symbols=["[MASK]"],  # the next free id: 4
        input_sentence_size=0,  # sampling happened while reading
        max_sentence_length=_MAX_SENTENCE_BYTES,
        hard_vocab_limit=True,  # a vocabulary the corpus cannot fill is an error, handled by the caller
        num_threads=num_threads,
        minloglevel=2,
        # The word delimiter is always set: whitespace-only units separate "▁" from words even without MeCab.
        pretokenization_delimiter=_WORD_DELIMITER,
    )
    if characters > 2**30:  # the default suffix array indexes with 32-bit integers
        options["train_extremely_large_corpus"] = True
    options.update(extra)
    spm.set_random_generator_seed(seed)  # seed-sentence sampling and EM ties: reproducible runs
    try:
        spm.SentencePieceTrainer.train(**options)
    except RuntimeError as err:
        message = str(err)
        if match := _TOO_HIGH.search(message):
            limit = int(match.group(2))
            raise VocabSizeError(
                f"vocab_size={vocab_size} is larger than this corpus supports: the largest vocabulary size that "
                f"works is {limit}. Use --vocab-size {limit} (or less), give more text, or pass --shrink-vocab "
                f"(shrink_vocab=True) to train with {limit}.", limit) from err
        if match := _TOO_LOW.search(message):
            needed = int(match.group(2))
            raise VocabSizeError(
                f"vocab_size={vocab_size} is smaller than this corpus needs: its characters (at "
                f"character_coverage={character_coverage}) plus {MIN_VOCAB_SIZE - 1} special and byte pieces need "
                f"at least {needed}. Use --vocab-size {needed} or more, or lower character_coverage.",
                needed) from err
        raise


def _piece_table(model_file: Path) -> list[tuple[str, float]]:
    """(piece, score) by id, read through the SentencePiece runtime (no protobuf needed)."""
    spm = _import_or_explain("sentencepiece", "train_tokenizer")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    table = []
    for idx in range(sp.get_piece_size()):
        special = sp.is_control(idx) or sp.is_unknown(idx) or sp.is_byte(idx)
        table.append((sp.id_to_piece(idx), _UNMATCHABLE_SCORE if special else sp.get_score(idx)))
    for token, idx in SPECIAL_TOKENS.items():
        if table[idx][0] != token:
            raise RuntimeError(f"SentencePiece put {table[idx][0]!r} at id {idx}, where {token} belongs; "
                               f"the trainer options no longer produce the documented ids")
    return table


def build_fast_tokenizer(pieces: list[tuple[str, float]]):
    """A `tokenizers.Tokenizer` that tokenizes like the trained SentencePiece model, with byte fallback.

    normalizer NFKC (alignments kept, so offsets point into the original string) -> pre-tokenizer: cut the "<" of
    byte-piece literals, then Metaspace (" " -> "▁", split before each "▁", no prefix) -> Unigram(byte_fallback)
    -> [CLS]/[SEP] template. The decoder undoes "▁" and joins byte pieces back into characters.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=UNK_ID, byte_fallback=True))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_BYTE_PIECE_LITERAL), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
    ])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)],
    )
    tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS])
    return tokenizer


def save_fast_tokenizer(pieces: list[tuple[str, float]], out_dir: str | Path, model_max_length: int = 4096):
    """Write tokenizer.json + tokenizer_config.json loadable by AutoTokenizer; returns the transformers tokenizer."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    hf = TokenizersBackend(
        tokenizer_object=build_fast_tokenizer(pieces),
        pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        bos_token="[CLS]", eos_token="[SEP]",  # DeBERTa's convention
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # decoding must give the text back as it was
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    hf.save_pretrained(str(out_dir))
    return hf


# Not `prepare`'s folder check: a tokenizer folder may be shared (a checkpoint holds one), so with overwrite only
# the tokenizer's own files are replaced (`_move_into`) where prepare refuses any file it did not write.
def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file; give a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"out_dir {out_dir} exists and is not empty; choose a new folder or pass "
                              f"overwrite=True (--overwrite) to replace the tokenizer files in it")


def train_tokenizer(
    input_files: str | Path | Iterable[str | Path],
    out_dir: str | Path,
    vocab_size: int = 32000,
    *,
    pretokenize: str | None = "mecab",
    shrink_vocab: bool = False,
    input_sentence_size: int = 2_000_000,
    character_coverage: float = 0.9995,
    model_max_length: int = 4096,
    seed: int = 0,
    num_threads: int | None = None,
    overwrite: bool = False,
    max_issue_examples: int = 100,
    spm_options: dict[str, Any] | None = None,
    encoding: str = "utf-8",
    max_invalid_fraction: float = CleaningOptions.max_invalid_fraction,
) -> TokenizerTrainingReport:
    """Train the Japanese unigram tokenizer on text files (one sentence or paragraph a line), UTF-8 by default.

    Args:
        input_files: text files; read lazily, one line at a time.
        out_dir: folder for tokenizer.json, tokenizer_config.json, sentencepiece.model/.vocab,
            training_report.json and input_issues.jsonl (created; must be new or empty unless `overwrite`).
        vocab_size: total pieces including the 5 special tokens and 256 byte pieces.
        pretokenize: "mecab" (words from MeCab bound the pieces; needs fugashi + unidic-lite at training time
            only) or "none" (a plain unigram model; pieces may cross words, only whitespace bounds them).
        shrink_vocab: if the corpus cannot fill `vocab_size` pieces, train with the largest size that works
            instead of raising `VocabSizeError`.
        input_sentence_size: cap on the sentences given to the trainer (uniform sample; bounds memory). <= 0
            keeps every sentence.
        character_coverage: share of characters the alphabet must cover; rarer ones fall back to bytes.
        model_max_length: saved in tokenizer_config.json (the model's maximum length).
        max_issue_examples: input_issues.jsonl lists the first this many instances of each kind that keeps the
            text (NFKC, emoji, ...); their counts and every instance of a kind that loses text are complete.
        spm_options: further SentencePieceTrainer options, applied last (for example `split_digits=True`).
        encoding: the files' encoding ("utf-8", or e.g. "utf-16", "cp932", "euc-jp", "latin-1"), as `prepare`'s
            ``CleaningOptions.encoding``. Read as UTF-8, a file that is certainly UTF-16/32 is refused at once.
        max_invalid_fraction: refuse a file with invalid bytes on more than this share of its non-blank lines
            (default 1%: a wrong encoding, not a few damaged bytes).

    Returns the `TokenizerTrainingReport` (also saved as training_report.json).
    """
    started = time.perf_counter()
    paths = [Path(input_files)] if isinstance(input_files, (str, Path)) else [Path(p) for p in input_files]
    if not paths:
        raise ValueError("input_files is empty; give at least one UTF-8 text file")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} does not exist or is not a file")
    cleaning = CleaningOptions(encoding=encoding, max_invalid_fraction=max_invalid_fraction)
    for path in paths:  # before anything is read or trained: a UTF-16 file is refused at once
        check_head(str(path), _read_head(path), cleaning)
    pretokenize = "none" if pretokenize is None else str(pretokenize)
    if pretokenize not in PRETOKENIZERS:
        raise ValueError(f"pretokenize={pretokenize!r} is not one of {PRETOKENIZERS}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for learned pieces: {len(SPECIAL_TOKENS)} special "
                         f"tokens and {NUM_BYTE_PIECES} byte pieces come first; use at least {MIN_VOCAB_SIZE} "
                         f"(in practice thousands)")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    # Fail before reading a large corpus if the analyser or trainer is missing.
    segmenter = MecabSegmenter() if pretokenize == "mecab" else None
    _import_or_explain("sentencepiece", "train_tokenizer")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Staged beside out_dir and moved into place at the end: a failed run leaves no half-written tokenizer.
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        with open(staging / ISSUES_FILE, "wb") as issues_file:
            log = IssueLog(issues_file, [str(p) for p in paths], ["line"] * len(paths), max_issue_examples,
                           actions=_ISSUE_ACTIONS, kept_kinds=_KEPT_KINDS)
            file_stats: list[dict[str, Any]] = []
            reservoir = _Reservoir(input_sentence_size, seed)
            for sentence, file_idx, line_no in _read_sentences(paths, log, file_stats, cleaning):
                reservoir.offer(sentence, file_idx, line_no)
            if not reservoir.sentences:
                raise ValueError(f"no usable text in {[str(p) for p in paths]}: every line was empty or invalid "
                                 f"({dict(log.counts)}); give text, one sentence or paragraph a line (UTF-8, or "
                                 f"name its encoding with --encoding)")

            characters = sum(map(len, reservoir.sentences))
            final_size = vocab_size
            for attempt in range(3):  # the limit SentencePiece names can itself move a little on retraining
                # Segmentation issues are logged during the first pass only: a retrain sees the same sample.
                sentences = _training_iterator(reservoir, segmenter, log if attempt == 0 else None)
                try:
                    _train_spm(sentences, staging / SPM_PREFIX, final_size, characters=characters,
                               character_coverage=character_coverage,
                               num_threads=num_threads or os.cpu_count() or 1, seed=seed,
                               extra=dict(spm_options or {}))
                    break
                except VocabSizeError as err:
                    if not shrink_vocab or err.limit >= final_size:
                        raise
                    final_size = err.limit
            else:
                raise RuntimeError(f"SentencePiece could not train at the vocabulary size it named ({final_size})")

        pieces = _piece_table(staging / f"{SPM_PREFIX}.model")
        save_fast_tokenizer(pieces, staging, model_max_length=model_max_length)

        used = sum(entry["lines_used"] for entry in file_stats)
        read = sum(entry["lines"] for entry in file_stats)
        report = TokenizerTrainingReport(
            out_dir=str(out_dir), vocab_size=len(pieces), requested_vocab_size=vocab_size,
            shrunk=len(pieces) != vocab_size, pretokenize=pretokenize, special_tokens=dict(SPECIAL_TOKENS),
            files=file_stats, lines_read=read, lines_used=used, lines_skipped=read - used,
            sentences=reservoir.seen, sentences_sampled=len(reservoir.sentences),
            characters_sampled=characters, issue_counts=dict(sorted(log.counts.items())),
            issue_examples=log.examples, seconds=round(time.perf_counter() - started, 2),
        )
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=2) + "\n",
                                           encoding="utf-8")
        _move_into(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _move_into(staging: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    for name in _OUTPUT_FILES:  # replace our files only; anything else in the folder is left alone
        if (out_dir / name).exists():
            (out_dir / name).unlink()
    for item in staging.iterdir():
        os.replace(item, out_dir / item.name)


__all__ = [
    "SPECIAL_TOKENS", "TokenizerTrainingReport", "VocabSizeError", "MecabSegmenter", "build_fast_tokenizer",
    "save_fast_tokenizer", "train_tokenizer",
]
