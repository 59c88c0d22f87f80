"""From start/end logits of every window to one answer per question, in the exact characters of the context.

For each question, over all of its windows: the `n_best` highest start and end logits among the document tokens
of a window are paired (start <= end, at most `max_answer_tokens` tokens), scored start + end, and the best pair of
all windows wins (transformers' run_qa post-processing, without a null answer: JSQuAD is SQuAD v1.1). A document
token appears in several windows where they overlap; each window's logits are its own votes. The winning tokens
are mapped back to `context[offsets[first].start : ends[last]]`, a slice of the original context string (ends
extended over characters NFKC absorbed; see `features`). A question whose windows hold no document token (an
empty context) gets the empty answer.

`rank_answers` ranks the answers of one question (its `top_k` best distinct spans); `predict_answers` takes the
first of each question of a file (`bigbird-ja evaluate`), and the long-document QA pipeline (`bigbird_ja.pipelines`)
asks it for `top_k`: one implementation for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .examples import QAExample
from .features import DocumentTokens, QAFeature


@dataclass
class SpanPrediction:
    text: str
    start: int  # character offsets in the context
    end: int
    score: float


def span_candidates(start_logits: np.ndarray, end_logits: np.ndarray, lo: int, hi: int, n_best: int,
                    max_answer_tokens: int) -> list[tuple[int, int, float]]:
    """Every (start, end, score) with lo <= start <= end < hi and end - start < max_answer_tokens that pairs one of
    the n_best highest start logits with one of the n_best highest end logits; best first (equal scores keep the
    order in which they were found: starts by rank, then ends by rank)."""
    if hi <= lo:
        return []
    starts = lo + np.argsort(start_logits[lo:hi])[::-1][:n_best]
    ends = lo + np.argsort(end_logits[lo:hi])[::-1][:n_best]
    found = []
    for s in starts:
        for e in ends:
            if e < s or e - s + 1 > max_answer_tokens:
                continue
            found.append((int(s), int(e), float(start_logits[s] + end_logits[e])))
    found.sort(key=lambda candidate: -candidate[2])  # stable: ties stay in the order found
    return found


def rank_answers(example: QAExample, doc: DocumentTokens | None, features: list[QAFeature], start_logits,
                 end_logits, *, n_best: int = 20, max_answer_tokens: int = 30, top_k: int = 1,
                 max_answer_chars: int | None = None) -> list[SpanPrediction]:
    """The `top_k` best distinct answers (character spans) to one question over all of its windows, best first.

    features: the windows of `example` in order, with one 1-D logit array each (padding beyond a window's
    input_ids is ignored). doc: the example's document tokens. Equal scores keep the earlier window (and, within a
    window, the order of `span_candidates`), so top_k=1 is `predict_answers`' choice. A span that several
    overlapping windows propose is listed once, with its best score. max_answer_chars: a span longer than this in
    characters is no candidate (None: no such bound; `bigbird-ja evaluate` sets none). No candidate at all (an empty
    context): one empty answer scored -inf.
    """
    if n_best < 1 or max_answer_tokens < 1 or top_k < 1 or (max_answer_chars is not None and max_answer_chars < 1):
        raise ValueError(f"n_best={n_best}, max_answer_tokens={max_answer_tokens}, top_k={top_k} and "
                         f"max_answer_chars={max_answer_chars} must be >= 1")
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise ValueError(f"got logits for {len(start_logits)}/{len(end_logits)} features, expected {len(features)}")
    ranked: list[tuple[float, int, int]] = []  # (score, start character, end character)
    for feature, s_logits, e_logits in zip(features, start_logits, end_logits):
        s_logits = np.asarray(s_logits, dtype=np.float64)
        e_logits = np.asarray(e_logits, dtype=np.float64)
        lo = feature.context_start
        shift = feature.doc_token_start - lo
        spans: set[tuple[int, int]] = set()
        # A window's top_k distinct spans hold every span of the overall top_k that this window scores best.
        for s, e, score in span_candidates(s_logits, e_logits, lo, lo + feature.num_context_tokens, n_best,
                                           max_answer_tokens):
            span = doc.span_text(s + shift, e + shift)
            if max_answer_chars is not None and span[1] - span[0] > max_answer_chars:
                continue
            if span not in spans:
                spans.add(span)
                ranked.append((score, *span))
                if len(spans) == top_k:
                    break
    ranked.sort(key=lambda candidate: -candidate[0])  # stable: ties keep the earlier window
    out: list[SpanPrediction] = []
    seen: set[tuple[int, int]] = set()
    for score, start, end in ranked:
        if (start, end) not in seen:
            seen.add((start, end))
            out.append(SpanPrediction(example.context[start:end], start, end, score))
            if len(out) == top_k:
                break
    return out or [SpanPrediction("", 0, 0, float("-inf"))]


def predict_answers(examples: list[QAExample], features: list[QAFeature], docs: dict[str, DocumentTokens],
                    start_logits, end_logits, *, n_best: int = 20, max_answer_tokens: int = 30
                    ) -> dict[str, SpanPrediction]:
    """Question id -> best span over all windows of its document (`rank_answers` with top_k=1).

    start_logits / end_logits: one 1-D array per feature (at least as long as its input_ids; padding beyond is
    ignored), in the order of `features`.
    """
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise ValueError(f"got logits for {len(start_logits)}/{len(end_logits)} features, expected {len(features)}")
    if n_best < 1 or max_answer_tokens < 1:
        raise ValueError(f"n_best={n_best} and max_answer_tokens={max_answer_tokens} must be >= 1")
    windows: dict[int, list[int]] = {}  # example index -> its features, in order
    for row, feature in enumerate(features):
        windows.setdefault(feature.example_index, []).append(row)
    out: dict[str, SpanPrediction] = {}
    for index, example in enumerate(examples):
        rows = windows.get(index, [])
        out[example.id] = rank_answers(
            example, docs.get(example.document_id), [features[r] for r in rows], [start_logits[r] for r in rows],
            [end_logits[r] for r in rows], n_best=n_best, max_answer_tokens=max_answer_tokens)[0]
    return out


__all__ = ["SpanPrediction", "predict_answers", "rank_answers", "span_candidates"]
