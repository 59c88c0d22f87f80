"""Metrics of the JGLUE tasks.

JSQuAD, exactly as JGLUE defines it (the JGLUE fine-tuning patch to transformers' `squad_metrics.py`):

* normalise an answer by lower-casing, then stripping trailing "。" (`str.rstrip("。")`, in place of the English
  article removal), then collapsing whitespace (`" ".join(text.split())`); punctuation is kept;
* exact match: the normalised strings are equal;
* F1 over characters: the normalised strings as lists of characters (a space included), precision and recall of
  their multiset overlap; when either is empty, F1 is 1 if both are, else 0;
* gold answers whose normalised text is empty are ignored (all empty: the gold is ""); a question scores the max
  over its gold answers; the metric is the mean over questions, x 100.

A question without a prediction scores 0 and counts in the total (the official SQuAD v1.1 script's rule); which ids
are missing or unknown is reported by `evaluation.evaluate_qa_predictions`, not here.

Classification and regression: accuracy; Pearson and Spearman correlation (JSTS), ties ranked by their mean rank.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence


def normalize_answer(text: str) -> str:
    """JGLUE's JSQuAD normalisation: lower-case, strip trailing "。", collapse whitespace (in that order)."""
    return " ".join(text.lower().rstrip("。").split())


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Character-level F1 of the normalised strings (multiset overlap)."""
    pred_chars = list(normalize_answer(prediction))
    gold_chars = list(normalize_answer(gold))
    if not pred_chars or not gold_chars:
        return float(pred_chars == gold_chars)
    same = sum((Counter(pred_chars) & Counter(gold_chars)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_chars)
    recall = same / len(gold_chars)
    return 2 * precision * recall / (precision + recall)


def _usable_golds(golds: Iterable[str]) -> list[str]:
    kept = [g for g in golds if normalize_answer(g)]
    return kept or [""]


def question_scores(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one question: the max over its gold answers, each in [0, 1]."""
    golds = _usable_golds(golds)
    return (max(exact_match_score(prediction, g) for g in golds), max(f1_score(prediction, g) for g in golds))


def squad_scores(predictions: Mapping[str, str], golds: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """{"exact_match", "f1", "total"} over every question of `golds` (id -> gold texts); x 100.

    A question absent from `predictions` scores 0; predictions for ids not in `golds` are ignored.
    """
    if not golds:
        raise ValueError("no gold questions to score; the gold file holds no answered question")
    em = f1 = 0.0
    for qid, answers in golds.items():
        if qid in predictions:
            q_em, q_f1 = question_scores(predictions[qid], answers)
            em += q_em
            f1 += q_f1
    total = len(golds)
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1 / total, "total": total}


# ----------------------------------------------------------------------------------------------------------------
# Classification and regression


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"accuracy needs as many predictions as labels (> 0); got {len(predictions)} and "
                         f"{len(labels)}")
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; nan when either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"pearson needs two equally long sequences of >= 2 values; got {len(x)} and {len(y)}")
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of their ranks (as scipy.stats.rankdata)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson of the ranks (ties get mean ranks)."""
    return pearson(_ranks(x), _ranks(y))


__all__ = [
    "accuracy", "exact_match_score", "f1_score", "normalize_answer", "pearson", "question_scores", "spearman",
    "squad_scores",
]
