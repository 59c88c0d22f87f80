"""Extractive-QA features: the question first, then windows of the document (fine-tuning and the pipeline).

Each feature is `[CLS] question [SEP] document tokens [SEP]` (token types 0, then 1, as the tokenizer's pair
template makes them). The question comes first so that it falls in the model's global blocks, which every block
attends to. A document longer than one window is cut into overlapping windows: each holds
`capacity = max_length - len(question) - 3` document tokens and the next starts `capacity - doc_stride` tokens
later (`doc_stride` is the overlap, as in transformers' QA examples), the last one ending at the document's end.
`truncate=True` keeps only the first window: what a model that sees `max_length` tokens and no more is given.

Documents and questions are tokenized once each (not once per question-document pair) with character offsets
into the original text. Byte pieces get their own character's span: byte fallback spells a run of characters
outside the vocabulary (emoji, control characters, rare kanji) as one piece per UTF-8 byte, and `tokenizers` gives
every piece the span of the whole run, so one piece of a run of 300 emoji "was" 300 characters; each piece is
given the span of the character its byte belongs to (where the pieces' bytes are the run's own: NFKC left it
unchanged). Token ends are extended over characters that belong to no token: where NFKC composes several
characters into one (half-width "ｶﾞ" -> "ガ"), the tokenizer gives the composed character the span of its first
source character only; a token's end is moved to the next token's start across such a gap (never across
whitespace, which a word-level tokenizer leaves between tokens). Answer positions come from these offsets: the
answer starts in the token holding its first character and ends in the token holding its last; when those tokens
start and end exactly at the answer, the gold answer is recoverable from the tokens.

Training labels: a window holding the whole answer points at its tokens; a window without it points at [CLS]
(position 0; transformers' run_qa practice) or is dropped (`windows_without_answer="drop"`). A question whose
answer lies in no window at all (an answer longer than a window) is reported by id.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from .examples import QAExample

WINDOWS_WITHOUT_ANSWER = ("cls", "drop")
_NON_SPACE = re.compile(r"\S*")
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")  # SentencePiece's byte-fallback pieces


@dataclass
class DocumentTokens:
    """A context tokenized once: ids, character spans and extended ends (see the module docstring)."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    ends: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    def span_text(self, first: int, last: int) -> tuple[int, int]:
        """Character span [start, end) of tokens first..last (inclusive) in the context."""
        return self.offsets[first][0], self.ends[last]


@dataclass
class QAFeature:
    """One window of one question. Positions index `input_ids`."""

    example_index: int
    input_ids: list[int]
    token_type_ids: list[int]
    context_start: int  # position of the window's first document token
    doc_token_start: int  # index of that token in the document's tokens
    num_context_tokens: int
    start_position: int = 0  # training label ([CLS] = 0)
    end_position: int = 0


@dataclass
class FeatureReport:
    questions: int = 0
    features: int = 0
    documents: int = 0
    longest_document_tokens: int = 0
    documents_over_one_window: int = 0
    max_windows: int = 0
    truncated_questions: list[str] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)  # training: no checked answer
    answer_in_no_window: list[str] = field(default_factory=list)  # training: every window points at [CLS]
    inexact_answers: list[str] = field(default_factory=list)  # answer boundary inside a token
    windows_with_answer: int = 0
    windows_dropped: int = 0

    def summary(self, max_examples: int = 5) -> str:
        lines = [f"{self.features} features for {self.questions} questions over {self.documents} documents "
                 f"(longest {self.longest_document_tokens} tokens; {self.documents_over_one_window} need more "
                 f"than one window, at most {self.max_windows})"]
        if self.windows_with_answer or self.windows_dropped:
            lines.append(f"  training windows holding the answer: {self.windows_with_answer}; windows without it "
                         + (f"dropped: {self.windows_dropped}" if self.windows_dropped else "point at [CLS]"))
        for name, ids in (("questions cut to max_query_length", self.truncated_questions),
                          ("questions without a checked answer (not trained on)", self.unlabelled),
                          ("questions whose answer is in no window", self.answer_in_no_window),
                          ("answers whose boundary falls inside a token", self.inexact_answers)):
            if ids:
                more = f" ... and {len(ids) - max_examples} more" if len(ids) > max_examples else ""
                lines.append(f"  {name}: {len(ids)} ({', '.join(ids[:max_examples])}{more})")
        return "\n".join(lines)


def tokenize_document(tokenizer, context: str) -> DocumentTokens:
    """Token ids and character spans of `context` (no special tokens), ends extended over absorbed characters."""
    if not context:
        return DocumentTokens([], [], [])
    # The `tokenizers` pipeline directly: the same ids and offsets as tokenizer(context, add_special_tokens=False),
    # without transformers' warning about documents longer than model_max_length (they are windowed here).
    enc = _backend(tokenizer).encode(context, add_special_tokens=False)
    ids = list(enc.ids)
    offsets = _byte_piece_spans(context, enc.tokens, [tuple(span) for span in enc.offsets])
    ends = [end for _, end in offsets]
    # Walk backwards keeping the start of the next token that begins after the current one (tokens that share a
    # span, such as the byte pieces of one character, all look past each other to it). A gap up to it is made of
    # characters no token covers; the token's end moves over its non-space part.
    next_start = len(context)
    for i in range(len(offsets) - 1, -1, -1):
        start, end = offsets[i]
        if end > start and next_start > end:
            ends[i] = _NON_SPACE.match(context, end, next_start).end()
        if i == 0 or offsets[i - 1][0] < start:
            next_start = start
    return DocumentTokens(ids, offsets, ends)


def _byte_piece_spans(context: str, tokens: list[str], offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`offsets` with each run of byte pieces that shares one span of several characters split into the span of
    each piece's own character, where the pieces' bytes are exactly that span's UTF-8 (else it stays as it is)."""
    out = list(offsets)
    i = 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and offsets[j] == offsets[i] and _BYTE_PIECE.fullmatch(tokens[j]):
            j += 1
        start, end = offsets[i]
        if j - i > 1 and end - start > 1 and \
                bytes(int(t[3:5], 16) for t in tokens[i:j]) == context[start:end].encode("utf-8"):
            k = i
            for position in range(start, end):
                width = len(context[position].encode("utf-8"))  # this character's bytes: as many pieces
                out[k:k + width] = [(position, position + 1)] * width
                k += width
        i = max(j, i + 1)
    return out


def window_starts(num_tokens: int, capacity: int, doc_stride: int, truncate: bool = False) -> list[int]:
    """First document token of each window: windows of `capacity` tokens overlapping by `doc_stride`."""
    if capacity < 1:
        raise ValueError(f"a window holds {capacity} document tokens; raise data.max_length or lower "
                         f"data.max_query_length")
    if not truncate and not 0 <= doc_stride < capacity:
        raise ValueError(f"data.doc_stride={doc_stride} must be in [0, {capacity}) (the document tokens a window "
                         f"holds with the longest question); lower data.doc_stride or raise data.max_length")
    starts = [0]
    while not truncate and starts[-1] + capacity < num_tokens:
        starts.append(starts[-1] + capacity - doc_stride)
    return starts


def answer_token_span(doc: DocumentTokens, start_char: int, end_char: int) -> tuple[int, int, bool] | None:
    """(first token, last token, exact) of the characters [start_char, end_char); None if no token covers them.

    exact: the tokens start at start_char and (with extended ends) end at end_char.
    """
    if not doc.ids or end_char <= start_char:
        return None
    starts = [s for s, _ in doc.offsets]
    # first token whose extended end is past start_char
    first = None
    for i in range(max(0, bisect.bisect_right(starts, start_char) - 1), len(starts)):
        if doc.ends[i] > start_char and doc.ends[i] > doc.offsets[i][0]:
            first = i
            break
    if first is None:
        return None
    # the same character may be shared by several tokens (bytes of one character): start at the first of them
    while first > 0 and doc.offsets[first - 1] == doc.offsets[first]:
        first -= 1
    last = bisect.bisect_left(starts, end_char) - 1  # last token starting before end_char
    if last < first:
        return None
    exact = doc.offsets[first][0] == start_char and doc.ends[last] == end_char
    return first, last, exact


def _backend(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"QA features need a fast tokenizer (character offsets); got {type(tokenizer).__name__}. "
                         f"Load it with AutoTokenizer.from_pretrained(folder) from a folder with tokenizer.json")
    return backend


def _question_ids(tokenizer, question: str) -> list[int]:
    return list(_backend(tokenizer).encode(question, add_special_tokens=False).ids)


def build_qa_features(examples: list[QAExample], tokenizer, *, max_length: int = 4096, doc_stride: int = 512,
                      max_query_length: int = 128, training: bool = False, windows_without_answer: str = "cls",
                      truncate: bool = False) -> tuple[list[QAFeature], dict[str, DocumentTokens], FeatureReport]:
    """Windowed features of `examples`, the tokenized documents (by document id) and a report.

    training: label each window (see the module docstring); questions without a checked answer are skipped and
    reported. Evaluation features carry no labels and cover every question.
    """
    if windows_without_answer not in WINDOWS_WITHOUT_ANSWER:
        raise ValueError(f"windows_without_answer={windows_without_answer!r} is not one of {WINDOWS_WITHOUT_ANSWER}")
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise ValueError(f"the tokenizer has no [CLS]/[SEP] tokens (cls_token_id={cls_id}, sep_token_id={sep_id}); "
                         f"QA features are [CLS] question [SEP] document [SEP]")
    if max_query_length < 1 or max_length < max_query_length + 4:
        raise ValueError(f"data.max_length={max_length} must exceed data.max_query_length={max_query_length} + 3 "
                         f"special tokens, leaving room for the document")
    # Checked once for the longest question, so that no question gets a stride it cannot honour.
    window_starts(0, max_length - max_query_length - 3, doc_stride, truncate)

    report = FeatureReport()
    docs: dict[str, DocumentTokens] = {}
    features: list[QAFeature] = []
    for index, example in enumerate(examples):
        report.questions += 1
        doc = docs.get(example.document_id)
        if doc is None:
            doc = docs[example.document_id] = tokenize_document(tokenizer, example.context)
        q_ids = _question_ids(tokenizer, example.question)
        if len(q_ids) > max_query_length:
            report.truncated_questions.append(example.id)
            q_ids = q_ids[:max_query_length]
        capacity = max_length - len(q_ids) - 3
        starts = window_starts(len(doc), capacity, doc_stride, truncate)

        label = None
        if training:
            if not example.answers:
                report.unlabelled.append(example.id)
                continue
            answer = example.answers[0]
            label = answer_token_span(doc, answer.start, answer.end)
            if label is None:
                report.unlabelled.append(example.id)
                continue
            if not label[2]:
                report.inexact_answers.append(example.id)

        head = [cls_id] + q_ids + [sep_id]
        answered = False
        for start in starts:
            chunk = doc.ids[start:start + capacity]
            feature = QAFeature(example_index=index, input_ids=head + chunk + [sep_id],
                                token_type_ids=[0] * len(head) + [1] * (len(chunk) + 1),
                                context_start=len(head), doc_token_start=start, num_context_tokens=len(chunk))
            if label is not None:
                first, last, _ = label
                if start <= first and last < start + len(chunk):
                    feature.start_position = len(head) + first - start
                    feature.end_position = len(head) + last - start
                    answered = True
                    report.windows_with_answer += 1
                elif windows_without_answer == "drop":
                    report.windows_dropped += 1
                    continue
            features.append(feature)
        if label is not None and not answered:
            report.answer_in_no_window.append(example.id)
    report.features = len(features)
    report.documents = len(docs)
    if docs:
        lengths = [len(d) for d in docs.values()]
        report.longest_document_tokens = max(lengths)
        capacity = max_length - 3 - 1  # a one-token question: the most a window can hold
        report.documents_over_one_window = sum(n > capacity for n in lengths)
    counts: dict[int, int] = {}
    for f in features:
        counts[f.example_index] = counts.get(f.example_index, 0) + 1
    report.max_windows = max(counts.values(), default=0)
    return features, docs, report


__all__ = ["DocumentTokens", "FeatureReport", "QAFeature", "WINDOWS_WITHOUT_ANSWER", "answer_token_span",
           "build_qa_features", "tokenize_document", "window_starts"]
