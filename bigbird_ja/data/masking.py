"""Masked-language-model batches for Japanese: span masking, reproducible and resumable.

`MLMCollator` turns samples (``{"input_ids": ...}`` dicts from `PackedDataset`, or plain id lists) into
``{"input_ids", "attention_mask", "labels"}``:

* ``mask_rate`` (default 15%) of the maskable tokens of each sequence are chosen; special tokens ([CLS], [SEP],
  [PAD], [MASK], [UNK], ...) are never chosen and padding is excluded from attention.
* Chosen tokens come in SPANS of consecutive tokens: span lengths are geometric (``p = span_p``, SpanBERT's 0.2)
  clipped to ``max_span``, or always ``max_span`` (``span_length="fixed"``); ``max_span=1`` is BERT's token
  masking. A span never crosses a special token (e.g. the [SEP] between two packed documents).
* Each chosen token becomes [MASK] with probability ``mask_token_prob`` (0.8), a random non-special token with
  ``random_token_prob`` (0.1), and stays itself otherwise; ``labels`` hold the original id there, -100 elsewhere.

Randomness never touches torch's global RNG. A sample that carries a ``position`` (as `PackedDataset` yields: its
unique place in the training stream) is masked with a generator seeded from ``(seed, position)``: the masks are a
function of the data stream, identical after a resume and at any world size, and differ between epochs (dynamic
masking). Samples without one use the collator's own generator (seeded once from ``seed``; save and restore it with
`state_dict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .dataset import splitmix64

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MaskingOptions:
    """What and how much to mask."""

    mask_rate: float = 0.15
    span_length: Literal["geometric", "fixed"] = "geometric"
    span_p: float = 0.2  # geometric parameter: mean span 1/p before clipping
    max_span: int = 10  # longest span in tokens; 1 = single-token masking
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1

    def __post_init__(self):
        if not 0.0 < self.mask_rate <= 1.0:
            raise ValueError(f"mask_rate={self.mask_rate}: must be in (0, 1] (0.15 is BERT's); at 0 nothing is "
                             f"predicted and the MLM loss is undefined (NaN)")
        if self.span_length not in ("geometric", "fixed"):
            raise ValueError(f"span_length={self.span_length!r}: expected 'geometric' or 'fixed'")
        if not 0.0 < self.span_p <= 1.0:
            raise ValueError(f"span_p={self.span_p}: must be in (0, 1] (0.2 is SpanBERT's)")
        if self.max_span < 1:
            raise ValueError(f"max_span={self.max_span}: must be >= 1 (1 masks single tokens)")
        if min(self.mask_token_prob, self.random_token_prob) < 0 or \
                self.mask_token_prob + self.random_token_prob > 1.0:
            raise ValueError(f"mask_token_prob={self.mask_token_prob}, random_token_prob={self.random_token_prob}: "
                             f"each must be >= 0 and their sum <= 1 (0.8 and 0.1 are BERT's)")


class MLMCollator:
    """Collate samples into an MLM batch (see the module docstring for the masking rules).

    vocab_size, mask_token_id, pad_token_id, special_token_ids: the tokenizer's (`from_tokenizer` reads them).
    """

    def __init__(self, *, vocab_size: int, mask_token_id: int, pad_token_id: int, special_token_ids,
                 options: MaskingOptions | None = None, seed: int = 0):
        self.options = options or MaskingOptions()
        self.vocab_size = int(vocab_size)
        self.mask_token_id = int(mask_token_id)
        self.pad_token_id = int(pad_token_id)
        special = {int(i) for i in special_token_ids if i is not None} | {self.mask_token_id, self.pad_token_id}
        if max(special) >= self.vocab_size:
            raise ValueError(f"special token id {max(special)} >= vocab_size={self.vocab_size}")
        # numpy for the per-batch array work: it runs in the trainer's main process, where torch's intra-op
        # thread pool makes small ops stall for milliseconds when the cores are busy (measured: 0.4 ms -> 16 ms).
        self.is_special = np.zeros(self.vocab_size, dtype=bool)
        self.is_special[sorted(special)] = True
        self.random_candidates = np.flatnonzero(~self.is_special)
        if len(self.random_candidates) == 0:
            raise ValueError("every vocabulary id is special: no token to substitute at random")
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    @classmethod
    def from_tokenizer(cls, tokenizer, **kwargs) -> "MLMCollator":
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a mask_token and a pad_token for MLM: set them in its "
                             "tokenizer_config.json (e.g. mask_token='[MASK]', pad_token='[PAD]')")
        return cls(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
                   pad_token_id=tokenizer.pad_token_id, special_token_ids=tokenizer.all_special_ids, **kwargs)

    # -- resume (only for samples without a position) -------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])

    # -- collation ---------------------------------------------------------------------------------------------
    def __call__(self, features) -> dict:
        ids, positions = self._stack(features)
        batch, length = ids.shape
        labels = np.full_like(ids, IGNORE_INDEX)
        out = ids.copy()
        for row in range(batch):
            if positions is not None and positions[row] is not None:
                gen = torch.Generator().manual_seed(
                    splitmix64(splitmix64(self.seed & (2**64 - 1)) ^ int(positions[row])) & (2**63 - 1))
            else:
                gen = self.generator
            chosen = self.choose(ids[row], gen)
            self._replace(out[row], labels[row], ids[row], chosen, gen)
        return {"input_ids": torch.from_numpy(out), "attention_mask": torch.from_numpy((ids != self.pad_token_id)
                                                                                        .astype(np.int64)),
                "labels": torch.from_numpy(labels)}

    def _stack(self, features):
        if isinstance(features, dict):  # already collated by DataLoader's default collate
            features = [dict(zip(features, values)) for values in zip(*features.values())]
        rows, positions = [], []
        for f in features:
            if isinstance(f, dict):
                rows.append(_as_numpy(f["input_ids"], np.int64))
                positions.append(int(f["position"]) if f.get("position") is not None else None)
            else:
                rows.append(_as_numpy(f, np.int64))
                positions.append(None)
        length = max(len(r) for r in rows)
        ids = np.full((len(rows), length), self.pad_token_id, dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        if ids.size and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) >= self.vocab_size else int(ids.min())
            raise ValueError(f"token id {bad} outside [0, {self.vocab_size}) in the batch: the ids are corrupt or "
                             f"were made with another tokenizer (`bigbird_ja.data.check_tokenizer` compares the "
                             f"fingerprints; `bigbird-ja prepare` again if they match)")
        return ids, (positions if any(p is not None for p in positions) else None)

    def choose(self, ids, gen: torch.Generator) -> np.ndarray:
        """A bool mask over ``ids`` of the tokens to predict.

        Spans (anchor token, length) are drawn over the maskable tokens in order and applied one after another
        until the token budget is reached; a span stops at a special token, tokens already chosen are skipped, and
        the span that reaches the budget is cut there. Vectorised: spans come in batches and a binary search over
        how many of them to apply finds where the budget is reached.
        """
        opt = self.options
        ids = _as_numpy(ids, np.int64)
        length = len(ids)
        maskable = ~self.is_special[ids]
        n_maskable = int(maskable.sum())
        if n_maskable == 0:
            return np.zeros(length, dtype=bool)
        # Stochastic rounding keeps the expected rate exact, except that every sequence predicts at least one token:
        # a batch with no target has an undefined (NaN) loss.
        budget = max(1, int(math.floor(opt.mask_rate * n_maskable + float(torch.rand((), generator=gen)))))
        positions = np.flatnonzero(maskable)  # spans are drawn over indices u into these
        # seg_end[u]: first index after the run of adjacent maskable tokens holding u (specials separate runs).
        bounds = np.concatenate([np.flatnonzero(positions[:-1] + 1 != positions[1:]) + 1, [n_maskable]])
        seg_end = bounds[np.searchsorted(bounds, np.arange(n_maskable), side="right")]
        covered = np.zeros(n_maskable, dtype=bool)
        total = 0
        mean_span = self._mean_span()

        def apply(base, a, e, k):
            if k == 0:
                return base
            depth = np.cumsum(np.bincount(a[:k], minlength=n_maskable + 1)
                              - np.bincount(e[:k], minlength=n_maskable + 1))
            return base | (depth[:n_maskable] > 0)

        while total < budget:
            k_all = int(math.ceil(1.5 * (budget - total) / mean_span)) + 4
            anchors = torch.randint(n_maskable, (k_all,), generator=gen).numpy()
            span_ends = np.minimum(anchors + self._span_lengths(k_all, gen), seg_end[anchors])
            after = apply(covered, anchors, span_ends, k_all)
            after_total = int(after.sum())
            if after_total <= budget:
                covered, total = after, after_total
                continue
            lo, hi = 0, k_all  # tokens(lo) <= budget < tokens(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if int(apply(covered, anchors, span_ends, mid).sum()) <= budget:
                    lo = mid
                else:
                    hi = mid
            covered = apply(covered, anchors, span_ends, lo)
            total = int(covered.sum())
            for u in range(int(anchors[lo]), int(span_ends[lo])):  # the span that crosses the budget, in part
                if total >= budget:
                    break
                if not covered[u]:
                    covered[u] = True
                    total += 1
            break
        chosen = np.zeros(length, dtype=bool)
        chosen[positions[covered]] = True
        return chosen

    def _mean_span(self) -> float:
        opt = self.options
        if opt.span_length == "fixed" or opt.max_span == 1:
            return float(opt.max_span)
        return (1 - (1 - opt.span_p) ** opt.max_span) / opt.span_p  # E[min(Geometric(p), max_span)]

    def _span_lengths(self, n: int, gen: torch.Generator) -> np.ndarray:
        opt = self.options
        if opt.span_length == "fixed" or opt.max_span == 1 or opt.span_p >= 1.0:
            return np.full(n, opt.max_span if opt.span_length == "fixed" else 1, dtype=np.int64)
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        lengths = 1 + torch.floor(torch.log1p(-u) / math.log1p(-opt.span_p))
        return lengths.clamp_(max=opt.max_span).long().numpy()

    def _replace(self, out_row: np.ndarray, label_row: np.ndarray, ids_row: np.ndarray, chosen: np.ndarray,
                 gen: torch.Generator) -> None:
        opt = self.options
        if not chosen.any():
            return
        label_row[chosen] = ids_row[chosen]
        r = torch.rand(len(ids_row), generator=gen).numpy()
        to_mask = chosen & (r < opt.mask_token_prob)
        to_random = chosen & (r >= opt.mask_token_prob) & (r < opt.mask_token_prob + opt.random_token_prob)
        out_row[to_mask] = self.mask_token_id
        n_random = int(to_random.sum())
        if n_random:
            picks = torch.randint(len(self.random_candidates), (n_random,), generator=gen).numpy()
            out_row[to_random] = self.random_candidates[picks]


def _as_numpy(values, dtype) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.numpy().astype(dtype, copy=False)
    return np.asarray(values, dtype=dtype)


__all__ = ["IGNORE_INDEX", "MLMCollator", "MaskingOptions"]
