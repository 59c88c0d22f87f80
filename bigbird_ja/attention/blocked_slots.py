"""Sparse rows of a structured layout, read in place: slots [global g | window w | random r] (eager path).

Shapes: B batch, H heads, nr sparse query blocks, bs block size, K = g + w + r key-block slots, D head dim, T rows of
k or v with hw = w // 2 zero blocks on each side (the halo).

The global slots are one matmul per head, the window slots a matmul against an overlapping strided view of the
haloed keys or values, and only the random blocks are copied. `SlotScores` (scores = terms + q.k^T) and
`SlotContext` (probs @ v) are autograd.Functions whose backward passes are the same three products
(`_rows_times_slots`, `_weights_times_slots`, `_weights_t_times_rows`): autograd through the strided views would
allocate and zero a full gradient per view. In float32 and float64 training `SlotAttention` runs SlotScores'
products, the softmax, dropout and SlotContext's products as one node that reuses its score-sized buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .dropout import hashed_dropout_into, softmax_dropout_backward_
from .workspace import ReusePool, Workspace


def select_blocks(x: torch.Tensor, index: torch.Tensor, traced: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, n, bs*D] -> [B, len(index), bs*D]: whole blocks copied (into `out` if given, eager). At batch 1 (eager)
    along dim 0 of a 2-D view, which torch copies row by row (along dim 1 it goes element by element, much slower on
    CPU: benchmarks/README.md); traced graphs take one path for every batch size."""
    if not traced and x.shape[0] == 1:
        return torch.index_select(x[0], 0, index, **({} if out is None else {"out": out[0]})).unsqueeze(0)
    return torch.index_select(x, 1, index, **({} if out is None else {"out": out}))


def fill_masked_tiles(scores: torch.Tensor, valid: torch.Tensor) -> None:
    """scores [B*H*nr, bs, K*bs] of sparse rows: the masked keys of every (query block, slot) tile get the lowest
    score (exp of it minus the row's maximum is 0, as with the softmax's mask), touching only the tiles with a masked
    key (the layout's unused slots and blocks with padding: few). valid [B, H, nr, K, bs]: whether each key of each
    slot is attended."""
    B, H, nr, K, bs = valid.shape
    if scores.is_meta:  # no values to fill (the planner's run on meta), and the tiles are small
        return
    partial = ~valid.all(dim=-1)  # [B, H, nr, K]
    if not bool(partial.any()):
        return
    fill = torch.finfo(scores.dtype).min  # in half precision its own minimum (the float32 one would be -inf)
    b, h, n, slot = partial.nonzero(as_tuple=True)
    tiles = scores.view(B, H, nr, bs, K, bs)
    tiles[b, h, n, :, slot, :] = tiles[b, h, n, :, slot, :].masked_fill_(~valid[b, h, n, slot][:, None, :], fill)


def blocked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The reference's masked softmax (masked scores take the compute dtype's minimum); mask None: the scores are
    masked already, or nothing is. Rows with nothing to attend to are zeroed by the callers, on the (smaller) output.
    When no gradient flows the mask and the softmax are written into `scores` itself (under autograd an in-place
    write into a view costs a score-sized copy in the backward)."""
    compute_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    in_place = not scores.requires_grad and scores.dtype == compute_dtype
    scores = scores.to(compute_dtype)
    if mask is not None:
        fill = torch.finfo(compute_dtype).min
        scores = scores.masked_fill_(~mask, fill) if in_place else torch.where(mask, scores, fill)
    return torch.softmax(scores, dim=-1, out=scores) if in_place else torch.softmax(scores, dim=-1)


@dataclass(frozen=True)
class SlotGeometry:
    """Sparse rows of a structured layout (slots [global g | window w | random r], window slot s of sparse query
    block n = halo block g + n + s), against per-head rows [B*H, T, D] of keys or values with hw zero blocks on each
    side (the halo)."""

    B: int
    H: int
    nr: int
    bs: int
    g: int
    w: int
    K: int
    workspace: Workspace | None = field(default=None, compare=False)  # for the random blocks' copies (no gradient)

    @property
    def r(self) -> int:
        return self.K - self.g - self.w

    def global_rows(self, heads: torch.Tensor) -> torch.Tensor:  # [B*H, g*bs, D]
        hw = self.w // 2
        return heads[:, hw * self.bs:(hw + self.g) * self.bs]

    def window(self, heads: torch.Tensor, bh: int) -> torch.Tensor:
        """Batch row and head bh: [nr, w*bs, D], every window slot: an overlapping strided view, block n starting at
        halo block g + n."""
        bs, D = self.bs, heads.shape[-1]
        first = heads[bh].storage_offset() + self.g * bs * D
        return heads[bh].as_strided((self.nr, self.w * bs, D), (bs * D, D, 1), first)

    def window_slot(self, heads: torch.Tensor, slot: int) -> torch.Tensor:
        """Every batch row and head (heads contiguous): [B*H, nr, bs, D], block n of head bh at halo block g + n +
        slot (a view without overlap)."""
        BH, T, D = heads.shape
        bs = self.bs
        return heads.as_strided((BH, self.nr, bs, D), (T * D, bs * D, D, 1),
                                heads.storage_offset() + (self.g + slot) * bs * D)

    def columns(self, x: torch.Tensor, kind: str, bh: int | None = None) -> torch.Tensor:
        """The columns of one slot kind of x [B*H*nr, bs, K*bs] (of batch row and head bh only, if given)."""
        bs, g, w = self.bs, self.g, self.w
        start, stop = {"global": (0, g), "window": (g, g + w), "random": (g + w, self.K)}[kind]
        if bh is not None:
            x = x[bh * self.nr:(bh + 1) * self.nr]
        return x[..., start * bs:stop * bs]

    def select_random(self, heads: torch.Tensor, rows: torch.Tensor, role: str) -> torch.Tensor:
        """The random blocks, copied: [B*H*nr, r*bs, D] (role: the workspace buffer, if there is a workspace)."""
        BH, _, D = heads.shape
        out = None
        if self.workspace is not None:
            out = self.workspace.empty(role, (self.B, rows.numel(), self.bs * D), heads)
        return select_blocks(heads.view(self.B, -1, self.bs * D), rows, False, out).view(
            BH * self.nr, self.r * self.bs, D)

    def add_random(self, heads: torch.Tensor, rows: torch.Tensor, blocks: torch.Tensor) -> None:
        """heads[random block rows] += blocks ([B*H*nr, r*bs, D]; a block listed twice gets both); the inverse of
        select_random, on the same dims."""
        D = heads.shape[-1]
        flat = heads.view(self.B, -1, self.bs * D)
        blocks = blocks.reshape(self.B, -1, self.bs * D)
        if self.B == 1:
            flat[0].index_add_(0, rows, blocks[0])
        else:
            flat.index_add_(1, rows, blocks)


# The three products of sparse rows with slot blocks (each slot kind read where it lies, only the random blocks
# copied). Forward and backward of scores = q.k^T and of context = probs @ v are all one of these.


def _rows_times_slots(x: torch.Tensor, heads: torch.Tensor, random: torch.Tensor | None, out: torch.Tensor,
                      geo: SlotGeometry, beta: float) -> torch.Tensor:
    """out [B*H*nr, bs, K*bs] = beta * out + x [B*H*nr, bs, D] . (slot rows)^T (beta 0: out's contents ignored, or
    1). The window's and random slots' products of each head go into a small contiguous scratch and are then added
    (or copied) into out's columns: into those strided columns directly torch's CPU baddbmm_ runs one addmm_ per
    block (at 1k tokens, base dims, about a quarter slower)."""
    if beta not in (0.0, 1.0):
        raise ValueError(f"_rows_times_slots: beta {beta} must be 0 or 1")
    BH, nr, bs, w, r = geo.B * geo.H, geo.nr, geo.bs, geo.w, geo.r
    if geo.g:
        geo.columns(out.view(BH, nr * bs, -1), "global").baddbmm_(
            x.reshape(BH, nr * bs, -1), geo.global_rows(heads).transpose(1, 2), beta=beta)
    window = x.new_empty(nr, bs, w * bs)
    chosen = x.new_empty(nr, bs, r * bs) if r else None
    for bh in range(BH):
        rows = slice(bh * nr, (bh + 1) * nr)
        torch.bmm(x[rows], geo.window(heads, bh).transpose(1, 2), out=window)
        _add_or_copy(geo.columns(out, "window", bh), window, beta)
        if r:
            torch.bmm(x[rows], random[rows].transpose(1, 2), out=chosen)
            _add_or_copy(geo.columns(out, "random", bh), chosen, beta)
    return out


def _add_or_copy(out: torch.Tensor, x: torch.Tensor, beta: float) -> None:
    out.add_(x) if beta else out.copy_(x)


def _weights_times_slots(p: torch.Tensor, heads: torch.Tensor, random: torch.Tensor | None,
                         geo: SlotGeometry) -> torch.Tensor:
    """p [B*H*nr, bs, K*bs] @ (slot rows) -> [B*H*nr, bs, D]."""
    BH, nr, bs = geo.B * geo.H, geo.nr, geo.bs
    out = p.new_empty(BH * nr, bs, heads.shape[-1])
    beta = 0.0  # the first product overwrites
    if geo.g:
        out.view(BH, nr * bs, -1).baddbmm_(geo.columns(p.view(BH, nr * bs, -1), "global"),
                                           geo.global_rows(heads), beta=beta)
        beta = 1.0
    for bh in range(BH):
        out[bh * nr:(bh + 1) * nr].baddbmm_(geo.columns(p, "window", bh), geo.window(heads, bh), beta=beta)
    if geo.r:
        out.baddbmm_(geo.columns(p, "random"), random)
    return out


def _weights_t_times_rows(p: torch.Tensor, x: torch.Tensor, heads: torch.Tensor, random_rows: torch.Tensor,
                          geo: SlotGeometry) -> torch.Tensor:
    """The gradient of the slot rows [B*H, T, D] (shaped as `heads`): p^T . x (p [B*H*nr, bs, K*bs], x [B*H*nr, bs,
    D]) added where each slot's block lies, the random slots' share where the copied blocks came from."""
    BH, nr, bs = geo.B * geo.H, geo.nr, geo.bs
    grad_heads = torch.zeros_like(heads)
    if geo.g:
        geo.global_rows(grad_heads).baddbmm_(
            geo.columns(p.view(BH, nr * bs, -1), "global").transpose(1, 2), x.reshape(BH, nr * bs, -1))
    # the window: one product for every head and block, then each slot's share added where its blocks lie (one
    # slot at a time: its blocks are distinct, so the view does not overlap itself)
    window = torch.bmm(geo.columns(p, "window").transpose(1, 2), x).view(BH, nr, geo.w, bs, -1)
    for slot in range(geo.w):
        geo.window_slot(grad_heads, slot).add_(window[:, :, slot])
    if geo.r:
        geo.add_random(grad_heads, random_rows, torch.bmm(geo.columns(p, "random").transpose(1, 2), x))
    return grad_heads


class SlotScores(torch.autograd.Function):
    """scores [B*H*nr, bs, K*bs] = terms + q . k^T for the sparse rows of a structured layout, written into the
    relative terms' buffer when there is one (else a new one), with the masked keys filled in (`fill_masked_tiles`:
    their gradient is the softmax's, zero). q [B*H*nr, bs, D]; k [B*H, T, D] with its halo; random_rows: the random
    blocks' rows of k viewed as [B, H*T/bs, bs*D]; valid [B, H, nr, K, bs]: the attended keys."""

    @staticmethod
    def forward(ctx, q, k, terms, random_rows, valid, geo: SlotGeometry):
        random = geo.select_random(k, random_rows, "random keys") if geo.r else None
        out = q.new_empty(q.shape[0], geo.bs, geo.K * geo.bs) if terms is None else terms
        _rows_times_slots(q, k, random, out, geo, beta=0.0 if terms is None else 1.0)
        fill_masked_tiles(out, valid)
        if terms is not None:
            ctx.mark_dirty(terms)
        ctx.geo = geo
        ctx.save_for_backward(q, k, random, random_rows)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, random, random_rows = ctx.saved_tensors
        geo = ctx.geo
        grad_q = _weights_times_slots(grad, k, random, geo) if ctx.needs_input_grad[0] else None
        grad_k = _weights_t_times_rows(grad, q, k, random_rows, geo) if ctx.needs_input_grad[1] else None
        return grad_q, grad_k, grad if ctx.needs_input_grad[2] else None, None, None, None


class SlotContext(torch.autograd.Function):
    """context [B*H*nr, bs, D] = probs @ v for the sparse rows of a structured layout. probs [B*H*nr, bs, K*bs];
    v [B*H, T, D] with its (zero) halo; random_rows as for SlotScores."""

    @staticmethod
    def forward(ctx, probs, v, random_rows, geo: SlotGeometry):
        random = geo.select_random(v, random_rows, "random values") if geo.r else None
        ctx.geo = geo
        ctx.save_for_backward(probs, v, random, random_rows)
        return _weights_times_slots(probs, v, random, geo)

    @staticmethod
    def backward(ctx, grad):
        probs, v, random, random_rows = ctx.saved_tensors
        geo = ctx.geo
        grad_probs = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_probs = _rows_times_slots(grad, v, random, probs.new_empty(probs.shape), geo, beta=0.0)
        if ctx.needs_input_grad[1]:
            grad_v = _weights_t_times_rows(probs, grad, v, random_rows, geo)
        return grad_probs, grad_v, None, None


SLOT_ATTENTION_DTYPES = (torch.float32, torch.float64)  # the softmax's compute dtypes: it can run in place


class SlotAttention(torch.autograd.Function):
    """context [B*H*nr, bs, D] of the sparse rows of a structured layout, float32 / float64: scores = terms + q.k^T
    (SlotScores' products, into the terms' buffer, masked keys filled), the softmax in place, dropout, probs @ v, as
    one node whose score-sized buffers are reused. The forward keeps the probabilities (in the scores' buffer) and
    drops the dropped ones once they are multiplied; the backward regenerates them from the hash into one buffer,
    which then takes the gradient of the dropped probabilities and, in place, that of the scores
    (`dropout.softmax_dropout_backward_`). Per call three score-sized buffers are taken instead of the six of
    SlotScores, softmax, dropout and SlotContext as separate nodes, and one is kept for the backward instead of two;
    `pool` (eager training, else None) serves them again in later calls: a fresh buffer is mapped, faulted in and
    zeroed by the kernel (at 2k tokens about 16 ms per buffer here, more than the pass over it). terms [B*H*nr, bs,
    K*bs] or None; drop None or the call's dropout, with query_pos [nr, bs] and key_pos [H, nr, K*bs] the tokens of
    the rows and columns. Returns (context, probs); probs (the terms' buffer when given) is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, terms, random_rows, valid, geo: SlotGeometry, drop, query_pos, key_pos,
                pool: ReusePool | None):
        random_k = geo.select_random(k, random_rows, "random keys") if geo.r else None
        shape = (q.shape[0], geo.bs, geo.K * geo.bs)
        scores = _empty(pool, shape, q) if terms is None else terms
        _rows_times_slots(q, k, random_k, scores, geo, beta=0.0 if terms is None else 1.0)
        fill_masked_tiles(scores, valid)
        probs = torch.softmax(scores, dim=-1, out=scores)
        weights = probs if drop is None else _dropped(_empty(pool, shape, q), probs, geo, drop, query_pos, key_pos)
        random_v = geo.select_random(v, random_rows, "random values") if geo.r else None
        out = _weights_times_slots(weights, v, random_v, geo)
        del weights  # back to the pool
        ctx.geo, ctx.drop, ctx.pool = geo, drop, pool
        ctx.save_for_backward(q, k, v, random_k, random_v, random_rows, probs, query_pos, key_pos)
        ctx.set_materialize_grads(False)
        if terms is not None:
            ctx.mark_dirty(terms)
        ctx.mark_non_differentiable(probs)
        return out, probs

    @staticmethod
    @torch.autograd.function.once_differentiable  # native passes and buffers reused in place: no second order
    def backward(ctx, grad, _):
        q, k, v, random_k, random_v, random_rows, probs, query_pos, key_pos = ctx.saved_tensors
        geo, drop = ctx.geo, ctx.drop
        want_q, want_k, want_v, want_terms = ctx.needs_input_grad[:4]
        if grad is None:
            return (None,) * 11
        grad = grad.contiguous()
        buffer = _empty(ctx.pool, probs.shape, probs)
        if drop is not None:  # the dropped probabilities, regenerated
            _dropped(buffer, probs, geo, drop, query_pos, key_pos)
        grad_v = _weights_t_times_rows(probs if drop is None else buffer, grad, v, random_rows, geo) \
            if want_v else None
        grad_q = grad_k = grad_terms = None
        if want_q or want_k or want_terms:
            # the dropped probabilities' gradient into the same buffer, then in place the scores'
            _rows_times_slots(grad, v, random_v, buffer, geo, beta=0.0)
            shape = (geo.B, geo.H, geo.nr, geo.bs, geo.K * geo.bs)
            softmax_dropout_backward_(buffer.view(shape), probs.view(shape), query_pos, key_pos, drop)
            grad_q = _weights_times_slots(buffer, k, random_k, geo) if want_q else None
            grad_k = _weights_t_times_rows(buffer, q, k, random_rows, geo) if want_k else None
            grad_terms = buffer if want_terms else None
        return grad_q, grad_k, grad_v, grad_terms, None, None, None, None, None, None, None


def _empty(pool: ReusePool | None, shape, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(shape) if pool is None else pool.empty(shape, like)


def _dropped(out, probs, geo: SlotGeometry, drop, query_pos, key_pos) -> torch.Tensor:
    """probs [B*H*nr, bs, K*bs] with the call's dropout, written into out (probs' shape)."""
    shape = (geo.B, geo.H, geo.nr, geo.bs, geo.K * geo.bs)
    return hashed_dropout_into(out.view(shape), probs.view(shape), query_pos, key_pos, drop).view(probs.shape)


def _slot_rows(q_s: torch.Tensor, k_heads: torch.Tensor, v_heads: torch.Tensor, terms: torch.Tensor | None,
               random_rows: torch.Tensor, valid: torch.Tensor, geo: SlotGeometry) -> torch.Tensor:
    """The sparse rows' context [B*H*nr, bs, D] without a gradient and without dropout: scores written into
    `terms` (or a new buffer), the softmax in place, then probs @ v; each slot read where it lies (the eager path's
    steps, for the traced graph's `slot_rows` op)."""
    with torch.no_grad():
        probs = blocked_softmax(SlotScores.apply(q_s, k_heads, terms, random_rows, valid, geo), None)  # in place
        return SlotContext.apply(probs.to(v_heads.dtype), v_heads, random_rows, geo)


def _register_slot_rows_op():
    """torch.ops.bigbird_ja.slot_rows: `_slot_rows` as one opaque op, so that torch.compile (inductor) runs the eager
    path's in-place slot products for inference instead of tracing copies of every listed block. No autograd: the
    traced graph takes it only when no gradient is needed and there is no dropout. `terms` is consumed (written
    into): the graph's own buffer, which inductor hands over without a copy."""
    if hasattr(torch.ops.bigbird_ja, "slot_rows"):
        return torch.ops.bigbird_ja.slot_rows.default

    @torch.library.custom_op("bigbird_ja::slot_rows", mutates_args=("terms",))
    def slot_rows_op(q_s: torch.Tensor, k_heads: torch.Tensor, v_heads: torch.Tensor, terms: torch.Tensor | None,
                     random_rows: torch.Tensor, valid: torch.Tensor, batch: int, heads: int, query_blocks: int,
                     block_size: int, global_slots: int, window_slots: int, slots: int) -> torch.Tensor:
        geo = SlotGeometry(batch, heads, query_blocks, block_size, global_slots, window_slots, slots)
        return _slot_rows(q_s, k_heads, v_heads, terms, random_rows, valid, geo)

    @slot_rows_op.register_fake
    def _(q_s, k_heads, v_heads, terms, random_rows, valid, batch, heads, query_blocks, block_size, global_slots,
          window_slots, slots):
        return q_s.new_empty(q_s.shape[0], block_size, v_heads.shape[-1])

    return torch.ops.bigbird_ja.slot_rows.default


SLOT_ROWS_OP = _register_slot_rows_op()


def slot_rows(q_s, k_heads, v_heads, terms, random_rows, valid, geo: SlotGeometry) -> torch.Tensor:
    """The sparse rows' context [B*H*nr, bs, D] for inference (no gradient, no dropout): one op in a traced graph.
    terms [B*H*nr, bs, K*bs] or None is written into."""
    return SLOT_ROWS_OP(q_s, k_heads, v_heads, terms, random_rows, valid, geo.B, geo.H, geo.nr, geo.bs, geo.g,
                        geo.w, geo.K)
