"""A question about a context and its gold answers: what windowing, span ranking and the data readers share.

A context may be a whole document of any length; questions about the same document share one `context` string
(and `document_id`), so the document is tokenized once. Answers are character spans of that string, checked
against it by whoever builds the example (fine-tuning's reader of SQuAD-format files; the pipeline asks with none).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    """A gold answer whose offsets were checked against its context."""

    text: str
    start: int  # character offset in the (document) context

    @property
    def end(self) -> int:
        return self.start + len(self.text)


@dataclass
class QAExample:
    """One question about one document. Questions of the same document share the same `context` string."""

    id: str
    question: str
    context: str
    document_id: str
    answers: list[Answer]  # checked answers (training labels); may be empty
    gold_texts: list[str]  # every gold text of the file, checked or not (the metric's golds)


__all__ = ["Answer", "QAExample"]
