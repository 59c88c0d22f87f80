"""Blocked pure-PyTorch backend: the reference's function with memory linear in N.

Shapes: B batch, H heads, N tokens (Np padded to nb whole blocks), D head dim, bs block size, g global query
blocks, nr = nb - g sparse query blocks, K key-block slots per sparse query block, L = K * bs gathered keys, S
relative span.

Global query blocks are computed densely against all Np keys ([B, H, g*bs, Np], linear in N). Each sparse query
block gathers its K key/value blocks ([B, H, nr, L, D], linear in N). The relative terms never build an N x N
tensor: q.pos_key and k.pos_query are computed once per bucket ([B, H, Np, 2S]) and gathered by delta(i, j).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import BlockLayout
from .reference import masked_softmax
from .relative import RelativePositionSpec, relative_index_table


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, Np, E], index [H, M] -> x[:, h, index[h]] as [B, H, M, E]."""
    heads = torch.arange(x.shape[1], device=x.device)[:, None]
    return x[:, heads, index]


def _gather_rows_at(table_per_row: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """table_per_row [B, H, Np, 2S]; flat_index [H, ...] = row * 2S + column -> [B, H, ...]."""
    B, H, Np, two_s = table_per_row.shape
    out = table_per_row.reshape(B, H, Np * two_s).gather(-1, flat_index.reshape(1, H, -1).expand(B, H, -1))
    return out.view(B, H, *flat_index.shape[1:])


def _add_relative_scores_(scores, qp, kp, query_pos, key_pos, table):
    """scores [B, H, ...] += c2p + p2c for query positions [H, ..., 1] and key positions [H, ..., L].

    Written to keep the number of full-size index tensors small: delta once, then one flat index per term.
    """
    offset = (table.numel() + 1) // 2 - 1
    delta = table[(query_pos + offset) - key_pos]  # [H, ..., L] rows of the relative embeddings
    if qp is not None:
        scores = scores + _gather_rows_at(qp, delta + query_pos * qp.shape[-1])
    if kp is not None:
        scores = scores + _gather_rows_at(kp, delta + key_pos * kp.shape[-1])
    return scores


def blocked_attention(
    q: torch.Tensor,  # [B, H, N, D]
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    key_padding_mask: torch.Tensor | None,  # [B, N] bool
    scale: float,
    pos_key: torch.Tensor | None = None,  # [H, 2S, D]
    pos_query: torch.Tensor | None = None,  # [H, 2S, D]
    rel_spec: RelativePositionSpec | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    B, H, N, D = q.shape
    bs, nb, g = layout.block_size, layout.num_blocks, layout.num_global_blocks
    Np, dev = nb * bs, q.device
    pad = Np - N
    # Fold the scale into q and pos_query once ([B, H, N, D]) instead of into every score.
    q = q * scale
    if pos_query is not None:
        pos_query = pos_query * scale
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    if key_padding_mask is None:
        key_valid = torch.ones(B, N, dtype=torch.bool, device=dev)
    else:
        key_valid = key_padding_mask.bool()
    key_valid = F.pad(key_valid, (0, pad), value=False)  # [B, Np]

    qp = kp = table = None
    if pos_key is not None or pos_query is not None:
        table = relative_index_table(Np, rel_spec, dev)
        if pos_key is not None:
            qp = q @ pos_key.transpose(-1, -2).unsqueeze(0)  # [B, H, Np, 2S]
        if pos_query is not None:
            kp = k @ pos_query.transpose(-1, -2).unsqueeze(0)  # [B, H, Np, 2S]
    positions = torch.arange(Np, device=dev)
    outputs = []

    # Global query blocks: every key.
    if g > 0:
        gq = g * bs
        scores = q[:, :, :gq] @ k.transpose(-1, -2)  # [B, H, gq, Np]
        if table is not None:
            scores = _add_relative_scores_(scores, qp, kp, positions[:gq].view(1, gq, 1).expand(H, gq, 1),
                                           positions.view(1, 1, Np).expand(H, 1, Np), table)
        probs = masked_softmax(scores, key_valid[:, None, None, :])
        probs = F.dropout(probs, dropout_p, training).to(v.dtype)
        outputs.append(probs @ v)  # [B, H, gq, D]

    # Sparse query blocks: their K listed key blocks.
    nr = nb - g
    if nr > 0:
        K = layout.key_blocks.shape[-1]
        L = K * bs
        key_blocks = layout.key_blocks.to(dev)  # [H, nr, K]
        key_pos = (key_blocks[..., None] * bs + torch.arange(bs, device=dev)).view(H, nr, L)  # [H, nr, L]
        slot_valid = layout.key_valid.to(dev).repeat_interleave(bs, dim=-1)  # [H, nr, L]
        k_g = _gather_rows(k, key_pos.view(H, nr * L)).view(B, H, nr, L, D)
        v_g = _gather_rows(v, key_pos.view(H, nr * L)).view(B, H, nr, L, D)
        q_s = q[:, :, g * bs:].view(B, H, nr, bs, D)
        scores = torch.einsum("bhrqd,bhrkd->bhrqk", q_s, k_g)  # [B, H, nr, bs, L]
        if table is not None:
            query_pos = positions[g * bs:].view(1, nr, bs, 1).expand(H, nr, bs, 1)
            scores = _add_relative_scores_(scores, qp, kp, query_pos, key_pos[:, :, None, :], table)
        mask = slot_valid[None] & key_valid[:, key_pos]  # [B, H, nr, L]
        probs = masked_softmax(scores, mask[:, :, :, None, :])
        probs = F.dropout(probs, dropout_p, training).to(v.dtype)
        out = torch.einsum("bhrqk,bhrkd->bhrqd", probs, v_g)
        outputs.append(out.reshape(B, H, nr * bs, D))

    return torch.cat(outputs, dim=2)[:, :, :N]
