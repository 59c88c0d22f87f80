"""Blocked pure-PyTorch backend: the reference's function with memory linear in N.

Shapes: B batch, H heads, N tokens (Np padded to nb whole blocks), D head dim, bs block size, g global query
blocks, nr = nb - g sparse query blocks, K = g + w + r key-block slots per sparse query block (w window, r random),
S relative span (2S relative embeddings), hw = w // 2, T = Np + 2 * hw * bs rows of k with its zero halo.

Two ways to compute the same function, chosen from shapes alone (`_dense_is_cheaper`):
  dense rows   query blocks against all Np keys with the layout's block mask: the global query blocks always, and
               every query block when the layout lists about as many blocks as there are (short inputs).
  sparse rows  each sparse query block against its K key blocks ([B, H, nr, bs, K*bs]), gathered block by block
               (index_select of whole [bs, D] blocks, never of single tokens).

Relative terms: c2p(i, j) = q_i . pos_key[delta(i, j)], p2c(i, j) = k_j . pos_query[delta(i, j)]. q.pos_key^T and
k.pos_query^T are computed once per bucket ([B, H, Np, 2S], the pos_key rows in reverse order, see below) and read
at delta(i, j) in one of two ways:
  band   the window slots of a sparse query block (structured layouts). There delta depends on i - j alone; when it is
         a plain shift of i - j (`delta_is_shift`: true for the default block size, window and buckets) the [bs, w*bs]
         tile of c2p (and each [bs, bs] tile of p2c) is a strided view of those products (a Toeplitz band), so the
         window needs no index and no gather. Otherwise q and k are multiplied with the (w + 1) * bs rows of pos_key
         and pos_query the window's distances use, laid out the same way.
  gather dense rows and the other slots (global and random blocks), at indices assembled from per-block-distance
         tiles ([2nb - 1, bs, bs], index_select of whole tiles): one index for all heads where the blocks are the
         same for every head (dense rows, global slots), [H, nr, bs, r*bs] for the random slots.
All relative terms of a row are assembled first and added by the score matmul itself (baddbmm), so no score-sized
tensor is modified in place (in-place updates of views cost a score-sized copy each in the backward pass).

Export: everything below branches only on Python ints (shapes and the layout's and spec's static fields), never on
tensor values; a symbolic number of blocks always takes the sparse path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import BlockLayout
from .relative import RelativePositionSpec, delta_is_shift, relative_delta, relative_index_table

# Dense rows cost less per score than sparse rows (one large matmul, no block copies or gathers): the dense path is
# taken while its block pairs are at most this multiple of the sparse path's. Measured with the op alone at base
# dims on the 2-core CPU (n = 384..1024, block 64, 2 global + 3 window + 3 random): dense is faster up to a ratio of
# about 1.2 forward and 1.4 forward+backward, i.e. up to 640 tokens with those settings.
DENSE_MARGIN = 1.25


def _dense_is_cheaper(num_blocks, num_global: int, slots: int) -> bool:
    """Whether every query block against every key block costs no more than the sparse path."""
    if isinstance(num_blocks, torch.SymInt) or torch.compiler.is_compiling():
        return False  # traced (export, ONNX, torch.compile): one path, no guard on the length
    sparse = num_global * num_blocks + (num_blocks - num_global) * slots  # block pairs per head
    return num_blocks * num_blocks <= DENSE_MARGIN * sparse


def _softmax(scores: torch.Tensor, mask: torch.Tensor, dropout_p: float, training: bool) -> torch.Tensor:
    """The reference's masked softmax (masked scores take the compute dtype's minimum) and dropout, writing into
    `scores` where it can. Rows with nothing to attend to are zeroed by the callers, on the (smaller) output."""
    compute_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    scores = scores.to(compute_dtype).masked_fill_(~mask, torch.finfo(compute_dtype).min)
    return F.dropout(torch.softmax(scores, dim=-1), dropout_p, training)


def _band(x: torch.Tensor, tiles: int, tile_step: int, shape: tuple[int, int], strides: tuple[int, int],
          first: int) -> torch.Tensor:
    """A strided view of x [B, H, rows, R] (a matmul's fresh output: contiguous, from the start of its storage):
    [B, H, tiles, *shape], where element (n, a, b) is element first + n * tile_step + a * strides[0] + b * strides[1]
    of x's [rows * R] plane. (Not x.storage_offset() + first: asking for the offset breaks a torch.compile graph.)"""
    B, H, rows, R = x.shape
    return x.as_strided((B, H, tiles, *shape), (H * rows * R, rows * R, tile_step, *strides), first)


class _Relative:
    """The per-bucket products and how to read them at delta(i, j).

    qp [B, H, Np, 2S]: column c holds q . pos_key[2S - 1 - c] (reversed, so that along a window tile's key axis the
    column rises); kp [B, H, T, 2S]: row hw*bs + j holds k_j . pos_query (the halo rows are zeros)."""

    def __init__(self, q, k_halo, pos_key, pos_query, spec: RelativePositionSpec, hw: int, bs: int):
        self.spec, self.hw, self.bs = spec, hw, bs
        self.two_s = 2 * spec.span
        self.qp = None if pos_key is None else q @ pos_key.flip(1).transpose(-1, -2).unsqueeze(0)
        self.kp = None if pos_query is None else k_halo @ pos_query.transpose(-1, -2).unsqueeze(0)
        self.pos_key, self.pos_query = pos_key, pos_query
        Np = q.shape[2]
        self.table = relative_index_table(Np, spec, q.device)  # [2Np - 1]: delta at distance d is entry d + Np - 1

    def delta(self, distance: torch.Tensor) -> torch.Tensor:
        """delta of distances in [-(Np - 1), Np - 1]."""
        return self.table[distance + (self.table.numel() - 1) // 2]

    def dense(self, rows: int, Np: int) -> torch.Tensor:
        """c2p + p2c of queries [0, rows) against all Np keys: [B, H, rows, Np]; the index is the same per head."""
        B, H = (self.qp if self.qp is not None else self.kp).shape[:2]
        positions = torch.arange(Np, device=self.table.device)
        delta = self.delta(positions[:rows, None] - positions[None, :])  # [rows, Np]
        term = 0
        if self.qp is not None:
            term = self.qp[:, :, :rows].gather(-1, (self.two_s - 1 - delta).expand(B, H, rows, Np))
        if self.kp is not None:
            flat = delta + (positions + self.hw * self.bs) * self.two_s  # row of key j, column delta
            term = term + self.kp.view(B, H, -1).gather(-1, flat.view(1, 1, -1).expand(B, H, -1)).view(B, H, rows, Np)
        return term

    def block_tables(self, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Index tiles per block distance e = query block - key block + nb - 1 ([2nb - 1, bs(query a), bs(key b)]):
        the column of qp and the flat [T * 2S] offset within kp's key block of delta(a - b + (e - nb + 1) * bs)."""
        bs, dev = self.bs, self.table.device
        a = torch.arange(bs, device=dev)
        distance = (torch.arange(-(nb - 1), nb, device=dev) * bs)[:, None, None] + (a[:, None] - a[None, :])
        delta = self.delta(distance)
        return self.two_s - 1 - delta, delta + (a + self.hw * bs) * self.two_s

    def slots(self, qp_blocks, tables, query_blocks, key_blocks, nb: int) -> torch.Tensor:
        """c2p + p2c of every sparse query block against M of its key blocks: qp_blocks [B, H, nr, bs, 2S],
        query_blocks [nr], key_blocks [H|1, nr, M] (1: the same for every head) -> [B, H, nr, bs, M*bs]."""
        B, H = (self.qp if self.qp is not None else self.kp).shape[:2]
        h, nr, M = key_blocks.shape
        bs = self.bs
        distance_row = (query_blocks[:, None] - key_blocks + nb - 1).view(-1)

        def query_major(index):  # [h*nr*M, bs(a), bs(b)] -> [1, h, nr, bs(a), M*bs(b)]
            return index.view(h, nr, M, bs, bs).transpose(2, 3).reshape(1, h, nr, bs, M * bs)

        term = 0
        if self.qp is not None:
            index = query_major(tables[0].index_select(0, distance_row))
            term = qp_blocks.gather(-1, index.expand(B, H, nr, bs, M * bs))
        if self.kp is not None:
            offset = (key_blocks * (bs * self.two_s)).view(-1, 1, 1)  # first flat element of the key block's rows
            flat = query_major(tables[1].index_select(0, distance_row) + offset).view(1, h, -1)
            term = term + self.kp.view(B, H, -1).gather(-1, flat.expand(B, H, -1)).view(B, H, nr, bs, M * bs)
        return term


def _window_band(rel: _Relative, q_s: torch.Tensor, k_halo: torch.Tensor, g: int, w: int) -> torch.Tensor:
    """c2p + p2c of the window slots of every sparse query block: [B, H, nr, bs, w*bs].

    Window slot s of sparse query block g + n is block g + n - hw + s, so query a and key b of the tile are
    d = i - j = (hw - s) * bs + a - b apart, |d| <= dmax = (hw + 1) * bs - 1. c2p is read from a product whose
    columns fall as d rises (column c0 - d), p2c from one whose columns rise with d (column c0 + d) and whose rows are
    the halo's keys."""
    B, H, nr, bs, _ = q_s.shape
    hw, spec = w // 2, rel.spec
    dmax = (hw + 1) * bs - 1
    if delta_is_shift(spec, dmax):  # delta = S + d: the per-bucket products already hold the band
        c2p, c2p_zero, c2p_row0 = rel.qp, spec.span - 1, g * bs  # qp column 2S - 1 - delta = S - 1 - d
        p2c, p2c_zero = rel.kp, spec.span
    else:  # products with just the window's distances: column t is distance dmax - t (c2p) or t - dmax (p2c)
        columns = torch.arange((w + 1) * bs, device=q_s.device)
        c2p = p2c = None
        if rel.qp is not None:
            rows = rel.pos_key[:, relative_delta(dmax - columns, spec)]  # [H, (w+1)*bs, D]
            c2p = q_s.reshape(B, H, nr * bs, -1) @ rows.transpose(-1, -2).unsqueeze(0)
        if rel.kp is not None:
            rows = rel.pos_query[:, relative_delta(columns - dmax, spec)]
            p2c = k_halo @ rows.transpose(-1, -2).unsqueeze(0)  # [B, H, T, (w+1)*bs]
        c2p_zero, c2p_row0, p2c_zero = dmax, 0, dmax
    band = 0
    if p2c is not None:
        R = p2c.shape[-1]
        band = torch.cat([_band(p2c, nr, bs * R, (bs, bs), (1, R - 1), (g + s) * bs * R + p2c_zero + (hw - s) * bs)
                          for s in range(w)], dim=-1)
    if c2p is not None:
        R = c2p.shape[-1]
        band = band + _band(c2p, nr, bs * R, (bs, w * bs), (R - 1, 1), c2p_row0 * R + c2p_zero - hw * bs)
    return band


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
    K = layout.key_blocks.shape[-1]
    nr = nb - g
    dense = nr == 0 or _dense_is_cheaper(nb, g, K)
    w = 0 if dense else layout.num_window_blocks  # window slots read as bands (0: every slot is gathered)
    hw = w // 2
    # Fold the scale into q and pos_query once ([B, H, N, D]) instead of into every score.
    q = F.pad(q * scale, (0, 0, 0, Np - N))  # [B, H, Np, D]
    if pos_query is not None:
        pos_query = pos_query * scale
    v = F.pad(v, (0, 0, 0, Np - N))
    # k with hw zero blocks on each side: the window's p2c band reads the rows of blocks r - hw .. r + hw.
    k_halo = F.pad(k, (0, 0, hw * bs, hw * bs + Np - N))  # [B, H, T, D]
    k = k_halo[:, :, hw * bs:hw * bs + Np]
    if key_padding_mask is None:
        key_valid = torch.ones(B, N, dtype=torch.bool, device=dev)
    else:
        key_valid = key_padding_mask.bool()
    key_valid = F.pad(key_valid, (0, Np - N), value=False)  # [B, Np]
    rel = None
    if pos_key is not None or pos_query is not None:
        rel = _Relative(q, k_halo, pos_key, pos_query, rel_spec, hw, bs)

    def dense_rows(rows: int, mask: torch.Tensor) -> torch.Tensor:
        """Queries [0, rows) against every key; mask [B|1, H|1, m, 1, Np] per query block -> [B, H, rows, D]."""
        if rel is None:
            scores = q[:, :, :rows] @ k.transpose(-1, -2)  # [B, H, rows, Np]
        else:  # relative terms + q.k in one matmul
            scores = torch.baddbmm(rel.dense(rows, Np).view(B * H, rows, Np), q[:, :, :rows].reshape(B * H, rows, D),
                                   k.reshape(B * H, Np, D).transpose(1, 2)).view(B, H, rows, Np)
        m = mask.shape[2]
        probs = _softmax(scores.view(B, H, m, rows // m, Np), mask, dropout_p, training)
        out = (probs.to(v.dtype).view(B, H, rows, Np) @ v).view(B, H, m, rows // m, D)
        return (out * mask.any(dim=-1, keepdim=True)).view(B, H, rows, D)

    if dense:
        # Every query block against every key block under the layout's block mask (global rows attend everything).
        listed = (layout.key_blocks.to(dev)[..., None] == torch.arange(nb, device=dev)) \
            & layout.key_valid.to(dev)[..., None]  # [H, nr, K, nb]
        block_mask = torch.cat([torch.ones(H, g, nb, dtype=torch.bool, device=dev), listed.any(dim=2)], dim=1)
        mask = block_mask[None, :, :, None, :, None] & key_valid.view(B, 1, 1, 1, nb, bs)  # [B, H, nb, 1, nb, bs]
        return dense_rows(Np, mask.view(B, H, nb, 1, Np))[:, :, :N]

    outputs = []
    if g > 0:  # global query blocks: every key
        outputs.append(dense_rows(g * bs, key_valid.view(B, 1, 1, 1, Np)))

    # Sparse query blocks against their K listed key blocks.
    key_blocks = layout.key_blocks.to(dev)  # [H, nr, K]
    rows = (torch.arange(H, device=dev)[:, None, None] * (nb + 2 * hw) + key_blocks + hw).view(-1)
    k_slots = k_halo.reshape(B, H * (nb + 2 * hw), bs * D).index_select(1, rows).view(B, H, nr, K * bs, D)
    q_s = q[:, :, g * bs:].view(B, H, nr, bs, D)
    if rel is None:
        scores = q_s @ k_slots.transpose(-1, -2)  # [B, H, nr, bs, K*bs]
    else:
        # The relative terms of every slot in slot order, then scores = terms + q.k in one matmul.
        query_blocks = torch.arange(g, nb, device=dev)
        qp_blocks = None if rel.qp is None else rel.qp[:, :, g * bs:].view(B, H, nr, bs, -1)
        tables = rel.block_tables(nb)
        if w > 0:  # [global | window | random]: the global slots are blocks 0..g-1 for every head and row
            parts = []
            if g > 0:
                parts.append(rel.slots(qp_blocks, tables, query_blocks, torch.arange(g, device=dev).expand(1, nr, g),
                                       nb))
            parts.append(_window_band(rel, q_s, k_halo, g, w))
            if K > g + w:
                parts.append(rel.slots(qp_blocks, tables, query_blocks, key_blocks[..., g + w:], nb))
            terms = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        else:
            terms = rel.slots(qp_blocks, tables, query_blocks, key_blocks, nb)
        scores = torch.baddbmm(terms.view(B * H * nr, bs, K * bs), q_s.reshape(B * H * nr, bs, D),
                               k_slots.view(B * H * nr, K * bs, D).transpose(1, 2)).view(B, H, nr, bs, K * bs)
    del k_slots

    # Attended: the slot is valid in the layout and its key is not padding.
    valid = key_valid.view(B, nb, bs)[:, key_blocks] & layout.key_valid.to(dev)[None, :, :, :, None]
    mask = valid.view(B, H, nr, 1, K * bs)
    probs = _softmax(scores, mask, dropout_p, training)
    v_rows = (torch.arange(H, device=dev)[:, None, None] * nb + key_blocks).view(-1)
    v_slots = v.reshape(B, H * nb, bs * D).index_select(1, v_rows).view(B, H, nr, K * bs, D)
    out = (probs.to(v.dtype) @ v_slots) * mask.any(dim=-1, keepdim=True)  # [B, H, nr, bs, D]
    outputs.append(out.view(B, H, nr * bs, D))
    return torch.cat(outputs, dim=2)[:, :, :N]
