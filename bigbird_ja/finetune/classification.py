"""Inputs of the sentence(-pair) and multiple-choice tasks.

* Sentence pairs (JNLI, JSTS) become `[CLS] sentence1 [SEP] sentence2 [SEP]`, single sentences (MARC-ja)
  `[CLS] sentence [SEP]`, through the tokenizer's own template, truncated to `max_length` (longest first).
* A multiple-choice question (JCommonsenseQA) becomes one pair per choice, `[CLS] question [SEP] choice [SEP]`
  (as in JGLUE's run_swag patch); the model scores each from its first token and the choices compete in one
  softmax.

Labels: class index (classification), float (regression) or choice index; None (unlabelled data) is kept as such.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .jglue import ChoiceExample, TextExample


@dataclass
class EncodedExample:
    """Token ids of one example: a flat list, or one list per choice."""

    input_ids: list[int] | list[list[int]]
    token_type_ids: list[int] | list[list[int]]
    label: int | float | None


def encode_text_examples(examples: list[TextExample], tokenizer, max_length: int) -> list[EncodedExample]:
    firsts = [e.text_a for e in examples]
    pairs = all(e.text_b is not None for e in examples)
    if not pairs and any(e.text_b is not None for e in examples):
        raise ValueError("the examples mix single sentences and sentence pairs; one task is one or the other")
    enc = tokenizer(firsts, [e.text_b for e in examples] if pairs else None, truncation=True, max_length=max_length,
                    return_token_type_ids=True)
    return [EncodedExample(ids, types, e.label)
            for ids, types, e in zip(enc["input_ids"], enc["token_type_ids"], examples)]


def encode_choice_examples(examples: list[ChoiceExample], tokenizer, max_length: int) -> list[EncodedExample]:
    num_choices = {len(e.choices) for e in examples}
    if len(num_choices) > 1:
        raise ValueError(f"every question needs the same number of choices; got {sorted(num_choices)}")
    firsts = [e.question for e in examples for _ in e.choices]
    seconds = [c for e in examples for c in e.choices]
    enc = tokenizer(firsts, seconds, truncation=True, max_length=max_length, return_token_type_ids=True)
    out, i = [], 0
    for e in examples:
        n = len(e.choices)
        out.append(EncodedExample(enc["input_ids"][i:i + n], enc["token_type_ids"][i:i + n], e.label))
        i += n
    return out


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, N] ids padded to the longest and the attention mask (1 = token)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask


class ClassificationCollator:
    """Batches of `EncodedExample`s: [B, N] (or [B, C, N] for multiple choice) + labels when all are labelled."""

    def __init__(self, pad_id: int, regression: bool = False):
        self.pad_id = pad_id
        self.regression = regression

    def __call__(self, batch: list[EncodedExample]) -> dict[str, torch.Tensor]:
        choices = isinstance(batch[0].input_ids[0], list)
        if choices:
            C = len(batch[0].input_ids)
            flat_ids = [seq for e in batch for seq in e.input_ids]
            flat_types = [seq for e in batch for seq in e.token_type_ids]
            ids, mask = pad_batch(flat_ids, self.pad_id)
            types, _ = pad_batch(flat_types, 0)
            out = {"input_ids": ids.view(len(batch), C, -1), "attention_mask": mask.view(len(batch), C, -1),
                   "token_type_ids": types.view(len(batch), C, -1)}
        else:
            ids, mask = pad_batch([e.input_ids for e in batch], self.pad_id)
            types, _ = pad_batch([e.token_type_ids for e in batch], 0)
            out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        if all(e.label is not None for e in batch):
            dtype = torch.float if self.regression else torch.long
            out["labels"] = torch.tensor([e.label for e in batch], dtype=dtype)
        return out


__all__ = ["ClassificationCollator", "EncodedExample", "encode_choice_examples", "encode_text_examples",
           "pad_batch"]
