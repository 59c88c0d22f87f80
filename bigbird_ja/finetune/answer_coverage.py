"""How many extractive-QA questions a tokenizer lets a token-level model answer exactly.

A QA head predicts a start token and an end token, so it can only return answers whose first character starts a
token and whose last character ends one. `answer_boundary_rate` measures that share over a SQuAD-v1.1-format
file (JSQuAD): the fraction of questions with a gold answer whose start and end fall on token offsets of the
context. It is how the tokenizer's MeCab word boundaries are judged (`bigbird_ja.tokenization`: >99.5% on held-out
JSQuAD articles where a plain unigram model keeps 83-94%).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .jglue import read_squad


@dataclass
class AnswerBoundaryResult:
    """Share of questions with a gold answer whose start and end are token offsets of the context."""

    rate: float
    questions: int
    aligned: int
    failures: list[dict[str, Any]] = field(default_factory=list)  # the first few: id, answer, tokens around it

    def __str__(self) -> str:
        return f"{self.aligned}/{self.questions} questions ({100 * self.rate:.2f}%) keep an exact gold answer"


def answer_boundary_rate(tokenizer, squad_json_path: str | Path, *, titles: Iterable[str] | None = None,
                         max_failures: int = 20) -> AnswerBoundaryResult:
    """Measure, over a SQuAD-v1.1-format file (JSQuAD), how many questions a token-level QA model can answer exactly.

    A question counts when at least one gold answer starts at a token's start offset and ends at a token's end
    offset in its context (tokenized without special tokens). `tokenizer` is a transformers fast tokenizer or a
    folder to load one from; `titles` restricts the measure to those articles (for example held-out ones).
    """
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"answer_boundary_rate needs a fast tokenizer (character offsets); got "
                         f"{type(tokenizer).__name__}. Load it with AutoTokenizer.from_pretrained(folder)")
    wanted = None if titles is None else set(titles)
    questions = aligned = 0
    failures: list[dict[str, Any]] = []
    for article in read_squad(squad_json_path):
        if wanted is not None and article.title not in wanted:
            continue
        for paragraph in article.paragraphs:
            qas = [qa for qa in paragraph.questions if qa.answers]
            if not qas:
                continue
            context = paragraph.context
            offsets = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            starts = {s for s, e in offsets if e > s}
            ends = {e for s, e in offsets if e > s}
            for qa in qas:
                questions += 1
                if any(a["answer_start"] in starts and a["answer_start"] + len(a["text"]) in ends
                       for a in qa.answers):
                    aligned += 1
                elif len(failures) < max_failures:
                    gold = qa.answers[0]
                    lo, hi = gold["answer_start"], gold["answer_start"] + len(gold["text"])
                    near = [context[s:e] for s, e in offsets if e > lo - 4 and s < hi + 4]
                    failures.append({"id": qa.id, "answer": gold["text"], "tokens": near})
    if questions == 0:
        raise ValueError(f"{squad_json_path} has no answered questions"
                         + (f" in the articles {sorted(wanted)[:5]}..." if wanted else ""))
    return AnswerBoundaryResult(rate=aligned / questions, questions=questions, aligned=aligned, failures=failures)


__all__ = ["AnswerBoundaryResult", "answer_boundary_rate"]
