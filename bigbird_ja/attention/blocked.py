"""Blocked pure-PyTorch backend: reference_attention's function on the layout's blocks, memory linear in N.

Shapes: B batch, H heads, N tokens (Np padded to nb whole blocks), D head dim, bs block size, g global query
blocks, nr = nb - g sparse query blocks, K = g + w + r key-block slots per sparse query block (w window, r random),
hw = w // 2, T = Np + 2 * hw * bs rows of k with its zero halo.

`blocked_attention` takes reference.py's steps on the listed blocks only:
  1. pad to whole blocks (`_pad`): the scale folded into q and pos_query once; k with hw zero blocks on each side
  2. the relative terms c2p + p2c of every listed score (`blocked_terms`: the native op on CPU, else PyTorch reads)
  3. scores = terms + q.k, the masked softmax, dropout and probabilities @ v, per kind of row:
       dense rows   query blocks against all Np keys under the layout's block mask (`_dense_rows`): the global query
                    blocks always, and every query block when that costs no more (`_dense_is_cheaper`: short inputs)
       sparse rows  each sparse query block against its K listed key blocks, [B, H, nr, bs, K*bs] (`_sparse_rows`)
Two paths take these steps, fixed once per call (`_Path`):
  eager   structured layouts read the global and window slots where they lie (`blocked_slots`), the terms' buffer
          takes the scores in place (float32/float64: and the softmax, scores to context being one node,
          `SlotAttention`), and a mask is skipped where the values show it masks nothing (CPU).
  traced  export, ONNX, torch.compile: plain ops that autograd differentiates, every listed block copied (indexed
          into the matmul shapes, the mask added to the terms), branches on shapes only (a symbolic number of blocks
          always takes sparse rows). torch.compile without a gradient or dropout (inference) runs the eager sparse
          rows as one opaque op instead (`blocked_slots.slot_rows`): inductor's copies of every listed block cost
          more than it saves elsewhere (benchmarks/README.md, compile section).
Dropout: one `AttentionDropout` per call; every probability is kept or dropped by a hash of (seed, b*H + h, query
token, key token) (`dropout.hashed_dropout`), so dense and sparse rows apply one [B, H, N, N] mask, the backward
regenerates it, and activation checkpointing (which restores the RNG) replays it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .blocked_slots import (SLOT_ATTENTION_DTYPES, SlotAttention, SlotContext, SlotGeometry, SlotScores,
                            blocked_softmax, select_blocks, slot_rows)
from .blocked_terms import read_relative_terms
from .cpu_kernels import relative_terms as relative_terms_kernel
from .cpu_kernels import supports as kernel_supports
from .dropout import AttentionDropout, hashed_dropout
from .layout import BlockLayout
from .relative import RelativePositionSpec
from .workspace import ReusePool, Workspace, pool_for, workspace_for

# Dense rows cost less per score than sparse rows (one large matmul, no block copies or gathers): the dense path is
# taken while its block pairs are at most this multiple of the sparse path's (benchmarks/README.md: how it was set).
DENSE_MARGIN = 1.25


def _dense_is_cheaper(num_blocks, num_global: int, slots: int) -> bool:
    """Whether every query block against every key block costs no more than the sparse path."""
    if isinstance(num_blocks, torch.SymInt) or torch.compiler.is_compiling():
        return False  # traced (export, ONNX, torch.compile): one path, no guard on the length
    sparse = num_global * num_blocks + (num_blocks - num_global) * slots  # block pairs per head
    return num_blocks * num_blocks <= DENSE_MARGIN * sparse


@dataclass(frozen=True)
class _Path:
    """How one call computes the function, from shapes and the layout alone (never from tensor values)."""

    traced: bool  # export, ONNX, torch.compile
    dense: bool  # every query block against every key block
    window: int  # window slots whose terms are read as bands, and eagerly whose keys are read in place (0: none)
    workspace: Workspace | None  # scratch buffers (no-gradient eager CPU, inside a model forward or kept)
    needs_grad: bool  # a gradient flows to some input
    pool: ReusePool | None  # large buffers reused between steps (eager CPU training)

    @classmethod
    def choose(cls, q: torch.Tensor, layout: BlockLayout, *inputs: torch.Tensor | None) -> "_Path":
        nb, g = layout.num_blocks, layout.num_global_blocks
        traced = isinstance(nb, torch.SymInt) or torch.compiler.is_compiling()
        dense = nb == g or _dense_is_cheaper(nb, g, layout.key_blocks.shape[-1])
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, *inputs))
        return cls(traced, dense, 0 if dense else layout.num_window_blocks, workspace_for(q, traced), needs_grad,
                   pool_for(q, traced) if needs_grad else None)

    @property
    def slots_in_place(self) -> bool:
        return self.window > 0 and not self.traced

    @property
    def slots_op(self) -> bool:
        """Traced inference outside export (torch.compile): the in-place slot reads as one opaque op (`slot_rows`);
        export and ONNX keep plain ops."""
        return self.window > 0 and self.traced and not self.needs_grad and not torch.compiler.is_exporting()


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
    """reference_attention's function on `layout`'s blocks: the same steps, on the listed blocks only."""
    N = q.shape[2]
    path = _Path.choose(q, layout, k, v, pos_key, pos_query)
    drop = AttentionDropout.draw(dropout_p, training)  # one seed for every row of this call
    # 1. whole blocks
    q, k, v, k_halo, key_valid = _pad(q, k, v, key_padding_mask, scale, layout.block_size * layout.num_blocks,
                                      path.window // 2 * layout.block_size)
    pos_query = None if pos_query is None else pos_query * scale
    # 2. the relative terms of every listed score
    op = None if torch.compiler.is_exporting() or not kernel_supports(q) else relative_terms_kernel()
    dense_terms, sparse_terms = read_relative_terms(q, k_halo, pos_key, pos_query, rel_spec, layout, path.dense,
                                                    path.window, path.traced, path.workspace, op, path.pool)
    # 3. scores, masked softmax, dropout, probabilities @ v: every query block against every key block (short
    #    inputs) ...
    if path.dense:
        out = _dense_rows(q, k, v, dense_terms, q.shape[2], _dense_mask(layout, key_valid), drop, path.traced)
        return out[:, :, :N]
    # ... or the global query blocks against every key and the sparse ones against their K listed key blocks
    outputs = []
    if layout.num_global_blocks > 0:
        every_key = key_padding_mask is None and N == q.shape[2]  # known from shapes alone: no branch on values
        outputs.append(_global_rows(q, k, v, dense_terms, key_valid, layout, every_key, drop, path))
    outputs.append(_sparse_rows(q, k_halo, v, sparse_terms, key_valid, layout, drop, path))
    return torch.cat(outputs, dim=2)[:, :, :N]


def _pad(q, k, v, key_padding_mask, scale: float, Np: int, halo: int):
    """q (scaled), k, v [B, H, Np, D]; k_halo [B, H, T, D], k with `halo` zero rows on each side (the window's p2c
    band reads the rows of blocks r - hw .. r + hw; k is a view of it); key_valid [B, Np] (padding False)."""
    B, H, N, D = q.shape
    q = F.pad(q * scale, (0, 0, 0, Np - N))
    v = F.pad(v, (0, 0, 0, Np - N))
    k_halo = F.pad(k, (0, 0, halo, halo + Np - N))
    k = k_halo[:, :, halo:halo + Np]
    key_valid = torch.ones(B, N, dtype=torch.bool, device=q.device) if key_padding_mask is None \
        else key_padding_mask.bool()
    return q, k, v, k_halo, F.pad(key_valid, (0, Np - N), value=False)


def _dense_mask(layout: BlockLayout, key_valid: torch.Tensor) -> torch.Tensor:
    """[B, H, nb, 1, Np]: whether each query block attends each key (the layout's block mask and the padding)."""
    H, nb, g, bs = layout.num_heads, layout.num_blocks, layout.num_global_blocks, layout.block_size
    B, dev = key_valid.shape[0], key_valid.device
    key_blocks = layout.key_blocks.to(dev)
    listed = (key_blocks[..., None] == torch.arange(nb, device=dev)) & layout.key_valid.to(dev)[..., None]
    block_mask = torch.cat([torch.ones(H, g, nb, dtype=torch.bool, device=dev), listed.any(dim=2)], dim=1)
    return (block_mask[None, :, :, None, :, None] & key_valid.view(B, 1, 1, 1, nb, bs)).view(B, H, nb, 1, nb * bs)


def _sparse_positions(key_blocks: torch.Tensor, g: int, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of the sparse rows' scores: query_pos [nr, bs] (row a of sparse query block n is token (g + n) * bs
    + a) and key_pos [H, nr, K*bs] (column s * bs + c is token key_blocks[h, n, s] * bs + c: the slot order of the
    scores, every path)."""
    H, nr, K = key_blocks.shape
    query_pos = torch.arange(g * bs, (g + nr) * bs, device=key_blocks.device).view(nr, bs)
    key_pos = (key_blocks[..., None] * bs + torch.arange(bs, device=key_blocks.device)).view(H, nr, K * bs)
    return query_pos, key_pos


def _sparse_dropout(probs: torch.Tensor, drop: AttentionDropout | None, key_blocks: torch.Tensor,
                    g: int) -> torch.Tensor:
    """probs [B, H, nr, bs, K*bs] with the call's dropout (`_sparse_positions`)."""
    if drop is None:
        return probs
    return hashed_dropout(probs, *_sparse_positions(key_blocks, g, probs.shape[3]), drop)


def _scores(terms: torch.Tensor | None, queries: torch.Tensor, keys: torch.Tensor, traced: bool) -> torch.Tensor:
    """terms + queries . keys^T as one (batched) matmul: [n, r, D] x [n, c, D] -> [n, r, c]; eagerly the terms'
    buffer (this call's own) is written in place."""
    if terms is None:
        return queries @ keys.transpose(1, 2)
    if traced:
        return torch.baddbmm(terms, queries, keys.transpose(1, 2))
    return terms.baddbmm_(queries, keys.transpose(1, 2))


def _dense_rows(q, k, v, terms, rows: int, mask: torch.Tensor | None, drop: AttentionDropout | None,
                traced: bool) -> torch.Tensor:
    """Queries [0, rows) of q [B, H, Np, D] against every key; mask [B|1, H|1, m, 1, Np] per query block (None: every
    key) -> [B, H, rows, D]."""
    B, H, Np, D = k.shape
    m = 1 if mask is None else mask.shape[2]
    scores = _scores(terms, q[:, :, :rows].reshape(B * H, rows, D), k.reshape(B * H, Np, D), traced)
    probs = blocked_softmax(scores.view(B, H, m, rows // m, Np), mask)
    if drop is not None:  # rows 0.. against keys 0..: the tokens themselves
        tokens = torch.arange(Np, device=q.device)
        probs = hashed_dropout(probs.view(B, H, 1, rows, Np), tokens[None, :rows], tokens.view(1, 1, Np), drop)
    out = probs.to(v.dtype).view(B, H, rows, Np) @ v
    if mask is None:
        return out
    return (out.view(B, H, m, rows // m, D) * mask.any(dim=-1, keepdim=True)).view(B, H, rows, D)


def _global_rows(q, k, v, terms, key_valid, layout: BlockLayout, every_key: bool, drop, path: _Path):
    """The g global query blocks against every key: [B, H, g*bs, D]; every_key: nothing is padded."""
    B, Np = key_valid.shape
    if not every_key and not path.traced and q.device.type == "cpu":  # eager CPU (no device sync): an all-ones
        every_key = bool(key_valid.all())  # attention mask costs no masking pass, forward or backward
    mask = None if every_key else key_valid.view(B, 1, 1, 1, Np)
    return _dense_rows(q, k, v, terms, layout.num_global_blocks * layout.block_size, mask, drop, path.traced)


def _sparse_rows(q, k_halo, v, terms, key_valid, layout: BlockLayout, drop, path: _Path) -> torch.Tensor:
    """The sparse query blocks against their K listed key blocks: [B, H, nr*bs, D]. Structured layouts, eagerly, read
    the global and window blocks where they lie (`SlotScores`, `SlotContext`); otherwise every listed block is
    copied."""
    B, H, Np, D = q.shape
    bs, nb, g, dev = layout.block_size, layout.num_blocks, layout.num_global_blocks, q.device
    nr, K, hw = nb - g, layout.key_blocks.shape[-1], path.window // 2
    key_blocks = layout.key_blocks.to(dev)  # [H, nr, K]
    q_s = q[:, :, g * bs:].reshape(B * H * nr, bs, D)
    valid = key_valid.view(B, nb, bs)[:, key_blocks] & layout.key_valid.to(dev)[None, :, :, :, None]
    mask = valid.view(B, H, nr, 1, K * bs)  # attended: the slot is valid in the layout and its key is not padding
    heads = torch.arange(H, device=dev)[:, None, None]
    if path.slots_in_place or (path.slots_op and drop is None):
        geometry = SlotGeometry(B, H, nr, bs, g, path.window, K, path.workspace)  # traced: no workspace
        k_rows = (heads * (nb + 2 * hw) + key_blocks[..., g + path.window:] + hw).view(-1)  # random blocks' halo rows
        if path.slots_in_place and q.dtype in SLOT_ATTENTION_DTYPES:  # one node, buffers reused in place
            v_halo = F.pad(v, (0, 0, hw * bs, hw * bs))
            positions = (None, None) if drop is None else _sparse_positions(key_blocks, g, bs)
            out, _ = SlotAttention.apply(q_s, k_halo.reshape(B * H, -1, D), v_halo.reshape(B * H, -1, D), terms,
                                         k_rows, valid, geometry, drop, *positions, path.pool)
        elif path.slots_in_place:  # half precision: the softmax in float32, out of place
            scores = SlotScores.apply(q_s, k_halo.reshape(B * H, -1, D), terms, k_rows, valid, geometry)  # masked
            probs = _sparse_dropout(blocked_softmax(scores.view(B, H, nr, bs, K * bs), None), drop, key_blocks, g)
            v_halo = F.pad(v, (0, 0, hw * bs, hw * bs))
            out = SlotContext.apply(probs.to(v.dtype).view(B * H * nr, bs, K * bs), v_halo.reshape(B * H, -1, D),
                                    k_rows, geometry)
        else:  # traced inference (torch.compile): the eager steps as one opaque op, no block copied but the random
            v_halo = F.pad(v, (0, 0, hw * bs, hw * bs))
            out = slot_rows(q_s, k_halo.reshape(B * H, -1, D), v_halo.reshape(B * H, -1, D), terms, k_rows, valid,
                            geometry)
        out = out.view(B, H, nr, bs, D)
    elif path.traced:
        # Every tensor made directly in its matmul shape [B*H*nr, ...]: k and v blocks indexed straight into it, the
        # mask added once to the terms (a matmul input). Reshaping [B, H, nr, ...] there would merge the symbolic nr,
        # which costs inductor a copy with index arithmetic per element, and a mask inside the softmax is recomputed
        # in each of its passes (benchmarks/README.md, compile section). The indices [B*H*nr, 1 | 1 | K*bs] are
        # broadcast by adding zeros: export guards on reshaping an expanded view, ONNX refuses // and % by a size.
        zeros = torch.zeros(B, H, nr, 1, dtype=torch.long, device=dev)
        batch = (torch.arange(B, device=dev).view(B, 1, 1, 1) + zeros).view(B * H * nr, 1)
        head = (heads.view(1, H, 1, 1) + zeros).view(B * H * nr, 1)
        token = ((key_blocks[..., None] * bs + torch.arange(bs, device=dev)).view(1, H, nr, K * bs) + zeros).view(
            B * H * nr, K * bs)
        flat_mask = mask.view(B * H * nr, 1, K * bs)
        if terms is not None:  # the lowest score added: exp(lowest - max) is 0, as with the reference's fill
            fill = torch.finfo(terms.dtype).min
            terms = terms + torch.zeros((), dtype=terms.dtype, device=dev).masked_fill(~flat_mask, fill)
        scores = _scores(terms, q_s, k_halo[batch, head, token + hw * bs], True)  # keys [B*H*nr, K*bs, D]
        probs = blocked_softmax(scores, None if terms is not None else flat_mask)
        if drop is not None:
            probs = _sparse_dropout(probs.view(B, H, nr, bs, K * bs), drop, key_blocks, g).view(B * H * nr, bs, -1)
        out = (probs.to(v.dtype) @ v[batch, head, token]).view(B, H, nr, bs, D)
    else:  # eager, a layout without the slot order (num_window_blocks 0): every listed block copied
        rows = (heads * (nb + 2 * hw) + key_blocks + hw).view(-1)
        k_slots = select_blocks(k_halo.reshape(B, H * (nb + 2 * hw), bs * D), rows, False).view(
            B * H * nr, K * bs, D)
        scores = _scores(terms, q_s, k_slots, False).view(B, H, nr, bs, K * bs)
        del k_slots
        probs = _sparse_dropout(blocked_softmax(scores, mask), drop, key_blocks, g)
        v_slots = select_blocks(v.reshape(B, H * nb, bs * D), (heads * nb + key_blocks).view(-1), False).view(
            B, H, nr, K * bs, D)
        out = probs.to(v.dtype) @ v_slots
    attends = mask.any(dim=-1, keepdim=True)  # [B, H, nr, bs, 1]: rows with something to attend to
    if path.traced or dev.type != "cpu" or not bool(attends.all()):  # eager CPU: no pass where every row attends
        out = out * attends  # [B, H, nr, bs, D]
    return out.view(B, H, nr * bs, D)
