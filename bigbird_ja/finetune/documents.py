"""QA examples (`bigbird_ja.qa.examples`) from SQuAD-format data: long documents (every paragraph of an article) or
single paragraphs.

Long-document JSQuAD: the paragraphs of one article are joined, in file order, with `separator` between them (a
newline: paragraph contexts never contain one) into one context; each answer's offset is shifted by the length of
the text before its paragraph. JSQuAD contexts read "title [SEP] paragraph"; they are kept verbatim (1,309 of the
v1.3 valid answers are the title inside that prefix, and stay where they are). The paragraph-level task (the
original JSQuAD) is the same code with one paragraph per document (`long_document=False`).

Every answer is checked: `context[start:start + len(text)] == text`. A mismatch is never dropped silently: with
`on_mismatch="error"` (the default) building stops with a message listing the mismatches by question id; with
"skip" the bad answer is left out of the training labels and listed in the report, while its text still counts
as a gold answer for the metric (the metric compares texts, not offsets). An answer whose text is not a string or
whose answer_start is not an integer ("0") is a `DataFormatError` naming the question id, never a mismatch to skip.
Empty contexts are reported by article and paragraph; in a long document they add nothing (no separator), as a
paragraph their questions are kept and their answers, which cannot match, are mismatches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import median

from ..qa.examples import Answer, QAExample
from .jglue import DataFormatError, SquadArticle

ON_MISMATCH = ("error", "skip")


@dataclass
class OffsetMismatch:
    id: str
    document_id: str
    text: str
    answer_start: int  # as given in the file (relative to its paragraph)
    found: str  # what the paragraph holds at that offset

    def __str__(self) -> str:
        return (f"{self.id}: answer {self.text!r} at {self.answer_start} but the context has {self.found!r} "
                f"there ({self.document_id})")


@dataclass
class DocumentReport:
    """What `build_qa_examples` built and what it found wrong."""

    long_document: bool
    documents: int = 0
    paragraphs: int = 0
    questions: int = 0
    answers_checked: int = 0
    mismatches: list[OffsetMismatch] = field(default_factory=list)
    empty_contexts: list[str] = field(default_factory=list)  # "title / paragraph k (n questions)"
    unanswered: list[str] = field(default_factory=list)  # question ids with no answer in the file
    document_chars: list[int] = field(default_factory=list)

    def summary(self, max_examples: int = 5) -> str:
        kind = "long documents (paragraphs of an article joined)" if self.long_document else "paragraphs"
        lines = [f"{self.questions} questions over {self.documents} {kind} from {self.paragraphs} paragraphs; "
                 f"{self.answers_checked} answer offsets checked"]
        if self.document_chars:
            lines.append(f"  document length: median {median(self.document_chars):.0f}, max "
                         f"{max(self.document_chars)} characters")
        for name, items in (("offset mismatches", self.mismatches), ("empty contexts", self.empty_contexts),
                            ("questions without answers", self.unanswered)):
            if items:
                lines.append(f"  {name}: {len(items)}")
                lines += [f"    {item}" for item in items[:max_examples]]
                if len(items) > max_examples:
                    lines.append(f"    ... and {len(items) - max_examples} more")
        return "\n".join(lines)


def build_qa_examples(articles: list[SquadArticle], *, long_document: bool = True, separator: str = "\n",
                      on_mismatch: str = "error") -> tuple[list[QAExample], DocumentReport]:
    """QA examples, one per question, over long documents (`long_document`) or single paragraphs.

    Returns the examples in file order and a `DocumentReport`. Raises `DataFormatError` listing every offset
    mismatch by id when `on_mismatch="error"`.
    """
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(f"on_mismatch={on_mismatch!r} is not one of {ON_MISMATCH}")
    report = DocumentReport(long_document=long_document)
    examples: list[QAExample] = []
    seen_ids: set[str] = set()

    def add_document(doc_id: str, parts: list[tuple[int, object]]) -> None:
        """parts: (offset of the paragraph in the document, paragraph), for the paragraphs of one document."""
        context = separator.join(p.context for _, p in parts if p.context)
        report.documents += 1
        report.document_chars.append(len(context))
        for offset, paragraph in parts:
            for q in paragraph.questions:
                if q.id in seen_ids:
                    raise DataFormatError(f"question id {q.id!r} appears twice; ids must be unique")
                seen_ids.add(q.id)
                report.questions += 1
                if not q.answers:
                    report.unanswered.append(q.id)
                checked = []
                for raw in q.answers:
                    text, start = raw["text"], raw["answer_start"]
                    # A type error is the file's format, not an offset that misses: never a "mismatch" to skip.
                    for name, value in (("text", text), ("answer_start", start)):
                        kind = str if name == "text" else int
                        if not isinstance(value, kind) or isinstance(value, bool):
                            raise DataFormatError(
                                f"question id {q.id!r} ({doc_id}): {name} is {value!r} ({type(value).__name__}), "
                                f"expected {'a string' if kind is str else 'an integer character offset'}")
                    report.answers_checked += 1
                    found = paragraph.context[start:start + len(text)] if start >= 0 else ""
                    if start < 0 or found != text:
                        report.mismatches.append(OffsetMismatch(q.id, doc_id, text, start, found))
                        continue
                    answer = Answer(text, offset + start)
                    assert context[answer.start:answer.end] == text  # the shift is exact by construction
                    if answer not in checked:
                        checked.append(answer)
                examples.append(QAExample(id=q.id, question=q.question, context=context, document_id=doc_id,
                                          answers=checked, gold_texts=[a["text"] for a in q.answers]))

    for a_idx, article in enumerate(articles):
        report.paragraphs += len(article.paragraphs)
        for p_idx, paragraph in enumerate(article.paragraphs):
            if not paragraph.context:
                report.empty_contexts.append(f"{article.title} / paragraph {p_idx} "
                                             f"({len(paragraph.questions)} questions)")
        if long_document:
            parts, offset = [], 0
            for paragraph in article.paragraphs:
                if not paragraph.context and not paragraph.questions:
                    continue
                if paragraph.context:
                    if parts and any(p.context for _, p in parts):
                        offset += len(separator)
                    parts.append((offset, paragraph))
                    offset += len(paragraph.context)
                else:  # an empty paragraph with questions: they join the document; their answers cannot match
                    parts.append((offset, paragraph))
            add_document(f"{article.title}#{a_idx}", parts)
        else:
            for p_idx, paragraph in enumerate(article.paragraphs):
                add_document(f"{article.title}#{a_idx}/p{p_idx}", [(0, paragraph)])

    if report.mismatches and on_mismatch == "error":
        raise DataFormatError(
            f"{len(report.mismatches)} answer(s) do not match their context at the given offset:\n"
            + "\n".join(f"  {m}" for m in report.mismatches[:20])
            + (f"\n  ... and {len(report.mismatches) - 20} more" if len(report.mismatches) > 20 else "")
            + "\nFix the offsets, or pass on_mismatch='skip' (--data.on_mismatch=skip) to train without those "
              "answers (they are reported and still count as gold texts for the metric).")
    return examples, report


__all__ = ["DocumentReport", "ON_MISMATCH", "OffsetMismatch", "build_qa_examples"]
