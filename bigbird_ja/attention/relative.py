"""DeBERTa-v2 relative positions: log buckets and the index into the relative embeddings.

For a query at token i and a key at token j the relative embedding row is
    delta(i, j) = clamp(bucket(i - j) + span, 0, 2 * span - 1)
where `bucket` is DeBERTa-v2's log bucketing (identity within +-bucket_size/2, logarithmic beyond, saturating at
`max_position`) and `span` is the number of buckets (or max_relative_positions without buckets). Both the
content-to-position and the position-to-content term read row delta(i, j).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RelativePositionSpec:
    span: int  # relative embeddings have 2 * span rows
    position_buckets: int  # <= 0: no log buckets
    max_relative_positions: int

    @classmethod
    def from_config(cls, config) -> "RelativePositionSpec":
        return cls(config.relative_span, config.position_buckets, config.effective_max_relative_positions)


def log_bucket_position(relative_pos: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """Map signed distances to DeBERTa-v2's log buckets (same float32 arithmetic, so the same integers)."""
    mid = bucket_size // 2
    sign = torch.sign(relative_pos)
    inside = (relative_pos < mid) & (relative_pos > -mid)
    abs_pos = torch.where(inside, torch.full_like(relative_pos, mid - 1), relative_pos.abs())
    ratio = torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid))
    log_pos = torch.ceil(ratio * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, relative_pos.to(log_pos.dtype), log_pos * sign).long()


def relative_delta(distance: torch.Tensor, spec: RelativePositionSpec) -> torch.Tensor:
    """delta for signed distances i - j (int64, any shape, on distance's device)."""
    if spec.position_buckets > 0:
        distance = log_bucket_position(distance, spec.position_buckets, spec.max_relative_positions)
    return (distance + spec.span).clamp(0, 2 * spec.span - 1)


def delta_is_shift(spec: RelativePositionSpec, max_distance: int) -> bool:
    """Whether delta(i, j) = span + (i - j) for every |i - j| <= max_distance (no bucketing, no clamping there):
    then the relative terms of a band of distances are shifted rows of the per-bucket products."""
    if spec.position_buckets > 0:  # log_bucket_position is the identity up to bucket_size // 2
        return max_distance <= spec.position_buckets // 2 and max_distance <= spec.span - 1
    return max_distance <= spec.span - 1


def relative_index_table(seq_len: int, spec: RelativePositionSpec, device=None) -> torch.Tensor:
    """[2 * seq_len - 1] int64: entry (i - j + seq_len - 1) holds delta(i, j)."""
    return relative_delta(torch.arange(-(seq_len - 1), seq_len, dtype=torch.long), spec).to(device)


def relative_index(query_pos: torch.Tensor, key_pos: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """delta(i, j) for broadcastable token positions `query_pos` and `key_pos`."""
    offset = (table.numel() + 1) // 2 - 1
    return table[query_pos - key_pos + offset]
