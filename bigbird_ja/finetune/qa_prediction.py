"""From start/end logits of every window to one answer per question, in the exact characters of the context.

For each question, over all of its windows: the `n_best` highest start and end logits among the document tokens
of a window are paired (start <= end, at most `max_answer_tokens` tokens), scored start + end, and the best pair of
all windows wins (transformers' run_qa post-processing, without a null answer: JSQuAD is SQuAD v1.1). A document
token appears in several windows where they overlap; each window's logits are its own votes. The winning tokens
are mapped back to `context[offsets[first].start : ends[last]]`, a slice of the original context string (ends
extended over characters NFKC absorbed; see `qa_features`). A question whose windows hold no document token (an
empty context) gets the empty answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .documents import QAExample
from .qa_features import DocumentTokens, QAFeature


@dataclass
class SpanPrediction:
    text: str
    start: int  # character offsets in the context
    end: int
    score: float


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, lo: int, hi: int, n_best: int,
              max_answer_tokens: int) -> tuple[int, int, float] | None:
    """Best (start, end, score) with lo <= start <= end < hi and end - start < max_answer_tokens, or None."""
    if hi <= lo:
        return None
    starts = lo + np.argsort(start_logits[lo:hi])[::-1][:n_best]
    ends = lo + np.argsort(end_logits[lo:hi])[::-1][:n_best]
    best = None
    for s in starts:
        for e in ends:
            if e < s or e - s + 1 > max_answer_tokens:
                continue
            score = float(start_logits[s] + end_logits[e])
            if best is None or score > best[2]:
                best = (int(s), int(e), score)
    return best


def predict_answers(examples: list[QAExample], features: list[QAFeature], docs: dict[str, DocumentTokens],
                    start_logits, end_logits, *, n_best: int = 20, max_answer_tokens: int = 30
                    ) -> dict[str, SpanPrediction]:
    """Question id -> best span over all windows of its document.

    start_logits / end_logits: one 1-D array per feature (at least as long as its input_ids; padding beyond is
    ignored), in the order of `features`.
    """
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise ValueError(f"got logits for {len(start_logits)}/{len(end_logits)} features, expected {len(features)}")
    if n_best < 1 or max_answer_tokens < 1:
        raise ValueError(f"n_best={n_best} and max_answer_tokens={max_answer_tokens} must be >= 1")
    best: dict[int, tuple[float, int, int]] = {}  # example index -> (score, first doc token, last doc token)
    for feature, s_logits, e_logits in zip(features, start_logits, end_logits):
        s_logits = np.asarray(s_logits, dtype=np.float64)
        e_logits = np.asarray(e_logits, dtype=np.float64)
        lo = feature.context_start
        found = best_span(s_logits, e_logits, lo, lo + feature.num_context_tokens, n_best, max_answer_tokens)
        if found is None:
            continue
        s, e, score = found
        current = best.get(feature.example_index)
        if current is None or score > current[0]:
            shift = feature.doc_token_start - lo
            best[feature.example_index] = (score, s + shift, e + shift)
    out: dict[str, SpanPrediction] = {}
    for index, example in enumerate(examples):
        if index not in best:
            out[example.id] = SpanPrediction("", 0, 0, float("-inf"))
            continue
        score, first, last = best[index]
        start, end = docs[example.document_id].span_text(first, last)
        out[example.id] = SpanPrediction(example.context[start:end], start, end, score)
    return out


__all__ = ["SpanPrediction", "best_span", "predict_answers"]
