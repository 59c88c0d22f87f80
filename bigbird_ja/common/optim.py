"""AdamW parameter groups and seeding, as pretraining and fine-tuning both use them."""

from __future__ import annotations

import random

import numpy as np
import torch


def parameter_groups(model: torch.nn.Module, weight_decay: float, no_decay_names: tuple[str, ...] = ()) -> list[dict]:
    """AdamW groups: weight decay on matrices and embeddings, none on biases and LayerNorm weights (1-D) nor on
    parameters whose name contains one of `no_decay_names`."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            exempt = param.dim() < 2 or any(part in name for part in no_decay_names)
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators (CUDA's too, through torch.manual_seed)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of one data-parallel rank's dropout stream: a function of (seed, step, rank), different per rank,
    so ranks do not draw identical dropout masks; ``step`` gives a resumed run at another world size fresh streams."""
    return seed * 1_000_003 + step * 7919 + rank + 1
