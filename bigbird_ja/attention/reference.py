"""Dense reference of the attention op: O(N^2) memory, the specification every backend is tested against.

Shapes: B batch, H heads, N tokens, D head dim, S relative span (relative embeddings have 2S rows).

For query i and key j of head h (delta from `relative.py`, s = 1 / sqrt(D * (1 + number of relative terms))):

    score[i, j] = s * ( q_i . k_j                      content-to-content
                      + q_i . pos_key[delta(i, j)]     content-to-position (c2p)
                      + k_j . pos_query[delta(i, j)] ) position-to-content (p2c)

    p[i, :] = softmax over the keys j with layout_mask[h, i, j] and key_padding_mask[b, j]
    out[i]  = sum_j p[i, j] v_j          (a query with no attendable key gets 0)

This is transformers' DeBERTa-v2 disentangled attention restricted to the BigBird layout.
"""

from __future__ import annotations

import torch

from .relative import RelativePositionSpec, relative_index, relative_index_table


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where `mask` is True, computed in at least float32.

    Masked scores take the compute dtype's own minimum (never -inf), so no overflow and no NaN; rows with nothing
    to attend to come out as zeros.
    """
    compute_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    scores = scores.to(compute_dtype).masked_fill(~mask, torch.finfo(compute_dtype).min)
    probs = torch.softmax(scores, dim=-1)
    return probs * mask.any(dim=-1, keepdim=True)


def reference_attention(
    q: torch.Tensor,  # [B, H, N, D]
    k: torch.Tensor,  # [B, H, N, D]
    v: torch.Tensor,  # [B, H, N, D]
    layout_mask: torch.Tensor,  # [H, N, N] bool
    key_padding_mask: torch.Tensor | None,  # [B, N] bool, True = real token
    scale: float,
    pos_key: torch.Tensor | None = None,  # [H, 2S, D], enables c2p
    pos_query: torch.Tensor | None = None,  # [H, 2S, D], enables p2c
    rel_spec: RelativePositionSpec | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout_mask: torch.Tensor | None = None,  # [B, H, N, N] bool: given, the kept probabilities (to check a
) -> torch.Tensor:                              # backend's own dropout); otherwise torch's dropout draws them
    B, H, N, D = q.shape
    scores = q @ k.transpose(-1, -2)  # [B, H, N, N]
    if pos_key is not None or pos_query is not None:
        table = relative_index_table(N, rel_spec, q.device)
        pos = torch.arange(N, device=q.device)
        delta = relative_index(pos[:, None], pos[None, :], table)  # [N, N]
        if pos_key is not None:
            c2p = q @ pos_key.transpose(-1, -2).unsqueeze(0)  # [B, H, N, 2S]
            scores = scores + c2p.gather(-1, delta.expand(B, H, N, N))
        if pos_query is not None:
            p2c = k @ pos_query.transpose(-1, -2).unsqueeze(0)  # [B, H, N(key), 2S]
            scores = scores + p2c.gather(-1, delta.t().expand(B, H, N, N)).transpose(-1, -2)
    mask = layout_mask.to(q.device).unsqueeze(0)  # [1, H, N, N]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].bool()
    probs = masked_softmax(scores * scale, mask)
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1 - dropout_p)
    else:
        probs = torch.nn.functional.dropout(probs, dropout_p, training)
    return probs.to(v.dtype) @ v
