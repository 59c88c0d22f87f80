"""Masked-language-model batches for Japanese: span and whole-word masking, reproducible and resumable.

`MLMCollator` turns samples (``{"input_ids": ...}`` dicts from `PackedDataset`, or plain id lists) into
``{"input_ids", "attention_mask", "labels"}``:

* ``mask_rate`` (default 15%) of the maskable tokens of each sequence are chosen; special tokens ([CLS], [SEP],
  [PAD], [MASK], [UNK], ...) are never chosen and padding is excluded from attention.
* Chosen tokens come in SPANS of consecutive units: span lengths are geometric (``p = span_p``, SpanBERT's 0.2)
  clipped to ``max_span``, or always ``max_span`` (``span_length="fixed"``); ``max_span=1`` is BERT's token
  masking. A span never crosses a special token (e.g. the [SEP] between two packed documents).
* Units are tokens, or WORDS when word boundaries are given (``word_boundaries``): a word is a token that starts
  a word plus the tokens that continue it, and is chosen whole or not at all. The boundary source is explicit:
  `WordBoundaries.from_marker` (SentencePiece: a piece starting with "▁" starts a word),
  `WordBoundaries.from_continuation_prefix` (WordPiece: "##" continues one), or per-sample ``word_starts`` in the
  features (e.g. from a morphological analyser). Raw Japanese has no spaces, so SentencePiece emits "▁" only at
  the start of a text or after a space and a "word" can be a whole sentence: words longer than
  ``max_word_tokens`` are therefore masked as tokens. Whole-word masking with "▁" is meaningful for text
  pre-segmented into words (e.g. MeCab ``-Owakati``).
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
    max_span: int = 10  # longest span in units (tokens or words); 1 = single-unit masking
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    max_word_tokens: int = 8  # longer "words" are masked token by token

    def __post_init__(self):
        if not 0.0 <= self.mask_rate <= 1.0:
            raise ValueError(f"mask_rate={self.mask_rate}: must be in [0, 1] (0.15 is BERT's)")
        if self.span_length not in ("geometric", "fixed"):
            raise ValueError(f"span_length={self.span_length!r}: expected 'geometric' or 'fixed'")
        if not 0.0 < self.span_p <= 1.0:
            raise ValueError(f"span_p={self.span_p}: must be in (0, 1] (0.2 is SpanBERT's)")
        if self.max_span < 1:
            raise ValueError(f"max_span={self.max_span}: must be >= 1 (1 masks single tokens or words)")
        if min(self.mask_token_prob, self.random_token_prob) < 0 or \
                self.mask_token_prob + self.random_token_prob > 1.0:
            raise ValueError(f"mask_token_prob={self.mask_token_prob}, random_token_prob={self.random_token_prob}: "
                             f"each must be >= 0 and their sum <= 1 (0.8 and 0.1 are BERT's)")
        if self.max_word_tokens < 1:
            raise ValueError(f"max_word_tokens={self.max_word_tokens}: must be >= 1")


@dataclass(frozen=True)
class WordBoundaries:
    """Which vocabulary ids start a word: ``starts_word[id]``."""

    starts_word: torch.Tensor  # bool [vocab_size]

    @classmethod
    def from_marker(cls, tokenizer, marker: str = "\u2581") -> "WordBoundaries":
        """SentencePiece/Metaspace: a piece that begins with ``marker`` ("▁") starts a word."""
        flags = _vocab_flags(tokenizer, lambda piece: piece.startswith(marker))
        if not flags.any():
            raise ValueError(f"no vocabulary piece starts with {marker!r}: this tokenizer marks no word starts, so "
                             f"whole-word masking would silently become token masking. Pass per-sample "
                             f"'word_starts' (e.g. from a morphological analyser) or no word_boundaries")
        return cls(flags)

    @classmethod
    def from_continuation_prefix(cls, tokenizer, prefix: str = "##") -> "WordBoundaries":
        """WordPiece: every piece that does NOT begin with ``prefix`` starts a word."""
        flags = _vocab_flags(tokenizer, lambda piece: not piece.startswith(prefix))
        if flags.all():
            raise ValueError(f"no vocabulary piece starts with {prefix!r}: every token would be a word of its own. "
                             f"Use the tokenizer's continuation prefix, per-sample 'word_starts', or no "
                             f"word_boundaries")
        return cls(flags)


def _vocab_flags(tokenizer, rule) -> torch.Tensor:
    flags = torch.zeros(len(tokenizer), dtype=torch.bool)
    for piece, index in tokenizer.get_vocab().items():
        if index < len(flags):
            flags[index] = rule(piece)
    return flags


class MLMCollator:
    """Collate samples into an MLM batch (see the module docstring for the masking rules).

    vocab_size, mask_token_id, pad_token_id, special_token_ids: the tokenizer's (`from_tokenizer` reads them).
    """

    def __init__(self, *, vocab_size: int, mask_token_id: int, pad_token_id: int, special_token_ids,
                 options: MaskingOptions | None = None, word_boundaries: WordBoundaries | None = None,
                 seed: int = 0):
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
        if word_boundaries is not None and len(word_boundaries.starts_word) != self.vocab_size:
            raise ValueError(f"word_boundaries covers {len(word_boundaries.starts_word)} ids, the vocabulary has "
                             f"{self.vocab_size}: build it from the same tokenizer")
        self.word_boundaries = word_boundaries
        self._starts_word = None if word_boundaries is None else word_boundaries.starts_word.numpy()
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
        ids, positions, word_starts = self._stack(features)
        batch, length = ids.shape
        labels = np.full_like(ids, IGNORE_INDEX)
        out = ids.copy()
        for row in range(batch):
            if positions is not None and positions[row] is not None:
                gen = torch.Generator().manual_seed(
                    splitmix64(splitmix64(self.seed & (2**64 - 1)) ^ int(positions[row])) & (2**63 - 1))
            else:
                gen = self.generator
            chosen = self.choose(ids[row], gen, None if word_starts is None else word_starts[row])
            self._replace(out[row], labels[row], ids[row], chosen, gen)
        return {"input_ids": torch.from_numpy(out), "attention_mask": torch.from_numpy((ids != self.pad_token_id)
                                                                                        .astype(np.int64)),
                "labels": torch.from_numpy(labels)}

    def _stack(self, features):
        if isinstance(features, dict):  # already collated by DataLoader's default collate
            features = [dict(zip(features, values)) for values in zip(*features.values())]
        rows, positions, word_starts = [], [], []
        for f in features:
            if isinstance(f, dict):
                rows.append(_as_numpy(f["input_ids"], np.int64))
                positions.append(int(f["position"]) if f.get("position") is not None else None)
                word_starts.append(f.get("word_starts"))
            else:
                rows.append(_as_numpy(f, np.int64))
                positions.append(None)
                word_starts.append(None)
        length = max(len(r) for r in rows)
        ids = np.full((len(rows), length), self.pad_token_id, dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        if ids.size and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            raise ValueError(f"token id outside [0, {self.vocab_size}) in the batch: the samples were made with "
                             f"another tokenizer (check_tokenizer tells)")
        starts = None
        if any(w is not None for w in word_starts):
            if not all(w is not None for w in word_starts):
                raise ValueError("word_starts given for some samples of the batch but not all")
            starts = np.zeros(ids.shape, dtype=bool)
            for i, w in enumerate(word_starts):
                w = _as_numpy(w, bool)
                starts[i, :len(w)] = w
        return ids, (positions if any(p is not None for p in positions) else None), starts

    def choose(self, ids, gen: torch.Generator, word_starts=None) -> np.ndarray:
        """A bool mask over ``ids`` of the tokens to predict.

        Spans (anchor unit, length) are drawn in order and applied one after another until the token budget is
        reached; a span stops at a special token, units already chosen are skipped, and the first unit that would
        overshoot the budget ends the selection (under by less than one word). Vectorised: spans come in batches
        and a binary search over how many of them to apply finds where the budget is reached.
        """
        opt = self.options
        ids = _as_numpy(ids, np.int64)
        length = len(ids)
        maskable = ~self.is_special[ids]
        n_maskable = int(maskable.sum())
        if n_maskable == 0 or opt.mask_rate == 0:
            return np.zeros(length, dtype=bool)
        # Stochastic rounding keeps the expected rate exact for short sequences too.
        budget = int(math.floor(opt.mask_rate * n_maskable + float(torch.rand((), generator=gen))))
        if budget == 0:
            return np.zeros(length, dtype=bool)
        starts, lengths = self._units(ids, maskable, None if word_starts is None else _as_numpy(word_starts, bool))
        n_units = len(starts)
        unit_ends = starts + lengths
        # seg_end[u]: first unit after the run of adjacent units holding u (specials separate runs).
        bounds = np.concatenate([np.flatnonzero(unit_ends[:-1] != starts[1:]) + 1, [n_units]])
        seg_end = bounds[np.searchsorted(bounds, np.arange(n_units), side="right")]
        covered = np.zeros(n_units, dtype=bool)
        total = 0
        mean_tokens_per_span = self._mean_span() * (lengths.sum() / n_units)

        def apply(base, a, e, k):
            if k == 0:
                return base
            depth = np.cumsum(np.bincount(a[:k], minlength=n_units + 1) - np.bincount(e[:k], minlength=n_units + 1))
            return base | (depth[:n_units] > 0)

        while total < budget:
            k_all = int(math.ceil(1.5 * (budget - total) / mean_tokens_per_span)) + 4
            anchors = torch.randint(n_units, (k_all,), generator=gen).numpy()
            span_ends = np.minimum(anchors + self._span_lengths(k_all, gen), seg_end[anchors])
            after = apply(covered, anchors, span_ends, k_all)
            after_total = int(lengths[after].sum())
            if after_total <= budget:
                covered, total = after, after_total
                continue
            lo, hi = 0, k_all  # tokens(lo) <= budget < tokens(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if int(lengths[apply(covered, anchors, span_ends, mid)].sum()) <= budget:
                    lo = mid
                else:
                    hi = mid
            covered = apply(covered, anchors, span_ends, lo)
            total = int(lengths[covered].sum())
            for u in range(int(anchors[lo]), int(span_ends[lo])):  # the span that crosses the budget, in part
                if covered[u]:
                    continue
                if total + lengths[u] > budget:
                    break
                covered[u] = True
                total += int(lengths[u])
            break
        marks = np.zeros(length + 1, dtype=np.int64)
        np.add.at(marks, starts[covered], 1)
        np.add.at(marks, unit_ends[covered], -1)
        return np.cumsum(marks[:length]) > 0

    def _units(self, ids, maskable, word_starts) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) of each maskable unit: tokens, or words of at most max_word_tokens tokens."""
        if word_starts is None and self._starts_word is None:
            positions = np.flatnonzero(maskable)
            return positions, np.ones(len(positions), dtype=np.int64)
        if word_starts is None:
            word_starts = self._starts_word[ids]
        maskable_np = maskable
        previous_maskable = np.concatenate([[False], maskable_np[:-1]])
        begins = np.flatnonzero(maskable_np & (word_starts[:len(ids)] | ~previous_maskable))
        # A word ends at the next word start or at the next non-maskable token, whichever comes first.
        barriers = np.sort(np.concatenate([begins, np.flatnonzero(~maskable_np), [len(ids)]]))
        ends = barriers[np.searchsorted(barriers, begins, side="right")]
        lengths = ends - begins
        long_words = lengths > self.options.max_word_tokens
        if long_words.any():  # too long to be a word (e.g. a whole unsegmented sentence): its tokens are units
            tokens = np.concatenate([np.arange(b, e) for b, e in zip(begins[long_words], ends[long_words])])
            begins = np.sort(np.concatenate([begins[~long_words], tokens]))
            barriers = np.sort(np.concatenate([begins, np.flatnonzero(~maskable_np), [len(ids)]]))
            ends = barriers[np.searchsorted(barriers, begins, side="right")]
            lengths = ends - begins
        return begins.astype(np.int64), lengths.astype(np.int64)

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


__all__ = ["IGNORE_INDEX", "MLMCollator", "MaskingOptions", "WordBoundaries"]
