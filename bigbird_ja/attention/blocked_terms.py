"""The relative terms of the blocked backend's scores: c2p(i, j) + p2c(i, j) of every score the layout lists.

Shapes: B batch, H heads, Np padded tokens, bs block size, nb blocks, g global blocks, nr = nb - g sparse query
blocks, K key-block slots, w window slots (hw = w // 2), S relative span, T = Np + 2 * hw * bs rows of k with its halo.

c2p(i, j) = q_i . pos_key[delta(i, j)] and p2c(i, j) = k_j . pos_query[delta(i, j)] are read from per-bucket
products computed once (qp = q . pos_key^T with its columns reversed, kp = k . pos_query^T; `_Relative`):
  band    the window slots of structured layouts: where delta is a plain shift of i - j (`delta_is_shift`, the
          default settings) every tile is a strided view of those products (no index); otherwise of products with
          just the window's (w + 1) * bs distances (`_window_sources`).
  gather  dense rows and the other slots, at indices built per block distance (`_Relative.slot_index`).
`_TermReads` says where every term is read. Eagerly `_RelativeTerms` writes all terms into one buffer per kind of
row (the score matmul then adds q.k into it in place) and its backward scatters into one zero-filled gradient per
product: autograd through the reads would zero a full product per gather and per view, then sum them. Traced graphs
take the same reads as plain ops (`_TermReads.assemble`). On CPU the native op (`cpu_kernels`) replaces all of this
with one pass each way (`_kernel_terms`); these reads are its reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .cpu_kernels import relative_terms_backward_into, relative_terms_into
from .layout import BlockLayout
from .relative import RelativePositionSpec, delta_is_shift, relative_delta, relative_index_table
from .workspace import ReusePool, Workspace


def read_relative_terms(q, k_halo, pos_key, pos_query, spec: RelativePositionSpec, layout: BlockLayout, dense: bool,
                   w: int, traced: bool, workspace: Workspace | None, op=None, pool: ReusePool | None = None):
    """The c2p + p2c terms of every listed score: (dense rows [B*H, rows, Np] or None, sparse rows [B*H*nr, bs, K*bs]
    or None); rows = Np if `dense`, else the g * bs global rows. op: the native op, or None for the PyTorch reads;
    w: window slots read as bands (0: every slot is gathered); pool: eager training's (the products, the native
    terms and their gradients come from it)."""
    if pos_key is None and pos_query is None:
        return None, None
    B, H, Np, _ = q.shape
    bs, g = layout.block_size, layout.num_global_blocks
    rel = _Relative(q, k_halo, pos_key, pos_query, spec, w // 2, bs, workspace, pool if op is not None else None)
    key_blocks = None if dense else layout.key_blocks.to(q.device)  # [H, nr, K]
    if op is not None:
        return _kernel_terms(op, rel.qp, rel.kp, rel.table, key_blocks, B, H, Np, bs, w // 2, Np if dense else g * bs,
                             traced, workspace, pool)
    reads, band_c2p, band_p2c = _term_reads(rel, q, k_halo, key_blocks, g, w, workspace)
    if traced:  # plain ops, differentiated by autograd
        return reads.assemble(rel.qp, rel.kp, band_c2p if band_c2p is not None else rel.qp,
                              band_p2c if band_p2c is not None else rel.kp)
    return _RelativeTerms.apply(rel.qp, rel.kp, band_c2p, band_p2c, reads)


def _term_reads(rel, q, k_halo, key_blocks, g: int, w: int, workspace):
    """Where every term is read (`_TermReads`), and the window band's own products (None: it reads qp / kp)."""
    B, H, Np, _ = q.shape
    bs = rel.bs
    nb = Np // bs
    nr = nb - g
    K = 0 if key_blocks is None else key_blocks.shape[-1]
    reads = _TermReads(B, H, Np, bs, g, w, K, rel.two_s, workspace=workspace)
    reads.dense_rows = Np if key_blocks is None else g * bs
    if reads.dense_rows:
        reads.dense = rel.dense_index(reads.dense_rows, Np)
    band_c2p = band_p2c = None
    if key_blocks is None:
        return reads, band_c2p, band_p2c
    query_blocks = torch.arange(g, nb, device=q.device)
    if w == 0:
        reads.gathers.append((0, K * bs, *rel.slot_index(query_blocks, key_blocks, nb, "slots")))
        return reads, band_c2p, band_p2c
    # [global | window | random]: the global slots are blocks 0..g-1 for every head and row
    if g > 0:
        reads.gathers.append((0, g * bs, *rel.slot_index(
            query_blocks, torch.arange(g, device=q.device).expand(1, nr, g), nb, "global")))
    band_c2p, band_p2c, reads.band = _window_sources(rel, q[:, :, g * bs:].view(B, H, nr, bs, -1), k_halo, g, w)
    reads.band_position = len(reads.gathers)
    if K > g + w:
        reads.gathers.append(((g + w) * bs, (K - g - w) * bs,
                              *rel.slot_index(query_blocks, key_blocks[..., g + w:], nb, "random")))
    return reads, band_c2p, band_p2c


def _band(x: torch.Tensor, tiles: int, tile_step: int, shape: tuple[int, int], strides: tuple[int, int],
          first: int) -> torch.Tensor:
    """A strided view of x [B, H, rows, R] (a matmul's fresh output: contiguous, from the start of its storage):
    [B, H, tiles, *shape], where element (n, a, b) is element first + n * tile_step + a * strides[0] + b * strides[1]
    of x's [rows * R] plane. (Not x.storage_offset() + first: asking for the offset breaks a torch.compile graph.)"""
    B, H, rows, R = x.shape
    return x.as_strided((B, H, tiles, *shape), (H * rows * R, rows * R, tile_step, *strides), first)


class _PooledProduct(torch.autograd.Function):
    """x [B, H, n, D] @ y [H, D, m] -> [B, H, n + 2 * halo, m] into a buffer of eager training's pool, with `halo`
    rows of zeros at each end (the products of k's zero halo rows, written rather than multiplied); matmul's
    gradients."""

    @staticmethod
    def forward(ctx, x, y, pool: ReusePool, halo: int = 0):
        B, H, n, D = x.shape
        out = pool.empty((B, H, n + 2 * halo, y.shape[-1]), x)
        _product_into(out, x, y, halo)
        ctx.halo = halo
        ctx.save_for_backward(x, y)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        if ctx.halo:
            grad = grad[:, :, ctx.halo:grad.shape[2] - ctx.halo]
        grad_x = grad @ y.transpose(-1, -2).unsqueeze(0) if ctx.needs_input_grad[0] else None
        grad_y = (x.transpose(-1, -2) @ grad).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_y, None, None


def _product_into(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, halo: int) -> torch.Tensor:
    """out [B, H, n + 2 * halo, m] (contiguous) = x [B, H, n, D] @ y [H, D, m] between `halo` zero rows at each end;
    one batched matmul straight into out's rows."""
    B, H, n, D = x.shape
    m = y.shape[-1]
    if halo:
        out[:, :, :halo].zero_()
        out[:, :, n + halo:].zero_()
    y = y if B == 1 else y.unsqueeze(0).expand(B, -1, -1, -1).reshape(B * H, D, m)
    torch.bmm(x.reshape(B * H, n, D), y, out=out.view(B * H, n + 2 * halo, m)[:, halo:n + halo])
    return out


def _product(x: torch.Tensor, y: torch.Tensor, workspace: Workspace | None, role: str,
             pool: ReusePool | None = None, halo: int = 0) -> torch.Tensor:
    """x [B, H, n, D] @ y [H, D, m] -> [B, H, n, m], into a workspace buffer (no gradient) or a pooled one (eager
    training) when one is given. halo: x's first and last `halo` rows are constant zeros (k's halo, padding); with a
    buffer their products are written as zeros, not computed, and pass no gradient back to them."""
    if pool is not None:
        return _PooledProduct.apply(x[:, :, halo:x.shape[2] - halo], y, pool, halo)
    if workspace is None:
        return x @ y.unsqueeze(0)
    B, H, n, D = x.shape
    out = workspace.empty(role, (B * H, n, y.shape[-1]), x).view(B, H, n, -1)
    return _product_into(out, x[:, :, halo:n - halo], y, halo)


class _Relative:
    """The per-bucket products and where the relative terms of each row read them.

    qp [B, H, Np, 2S]: column c holds q . pos_key[2S - 1 - c] (reversed, so that along a window tile's key axis the
    column rises); kp [B, H, T, 2S]: row hw*bs + j holds k_j . pos_query (the halo rows are zeros). Indices into
    them: c2p at (row i, column 2S - 1 - delta), p2c at flat element (hw*bs + j) * 2S + delta of kp's [T * 2S]
    plane, so p2c's index is the key row's offset + 2S - 1 minus c2p's (one index is built per read)."""

    def __init__(self, q, k_halo, pos_key, pos_query, spec: RelativePositionSpec, hw: int, bs: int,
                 workspace: Workspace | None = None, pool: ReusePool | None = None):
        self.spec, self.hw, self.bs, self.workspace = spec, hw, bs, workspace
        self._columns = None
        self.two_s = 2 * spec.span
        self.qp = None if pos_key is None else _product(q, pos_key.flip(1).transpose(-1, -2), workspace, "qp", pool)
        self.kp = None if pos_query is None else _product(k_halo, pos_query.transpose(-1, -2), workspace, "kp",
                                                          pool, halo=hw * bs)
        self.pos_key, self.pos_query = pos_key, pos_query
        Np = q.shape[2]
        self.table = relative_index_table(Np, spec, q.device)  # [2Np - 1]: delta at distance d is entry d + Np - 1

    def delta(self, distance: torch.Tensor) -> torch.Tensor:
        """delta of distances in [-(Np - 1), Np - 1]."""
        return self.table[distance + (self.table.numel() - 1) // 2]

    def dense_index(self, rows: int, Np: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [0, rows) against all Np keys (the same for every head): c2p columns [rows, Np] and p2c flat
        offsets [rows * Np]."""
        positions = torch.arange(Np, device=self.table.device)
        c2p = (self.two_s - 1) - self.delta(positions[:rows, None] - positions[None, :])
        p2c = (positions + self.hw * self.bs) * self.two_s + (self.two_s - 1) - c2p
        return c2p, p2c.view(-1)

    def block_columns(self, nb: int) -> torch.Tensor:
        """c2p columns of one tile per block distance e = query block - key block + nb - 1: [2nb - 1, bs(a), bs(b)].
        Built once per call."""
        if self._columns is None:
            a = torch.arange(self.bs, device=self.table.device)
            blocks = torch.arange(-(nb - 1), nb, device=a.device) * self.bs
            self._columns = (self.two_s - 1) - self.delta(blocks[:, None, None] + a[None, :, None] - a[None, None, :])
        return self._columns

    def slot_index(self, query_blocks, key_blocks, nb: int, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse query blocks against M of their key blocks each: query_blocks [nr], key_blocks [h, nr, M] (h = 1:
        the same for every head) -> c2p columns [h, nr, bs, M*bs] and p2c flat offsets [h, nr*bs*M*bs], in the
        scores' order (query row a, then slot, then key b); in workspace buffers named after `role` if there is a
        workspace."""
        bs, two_s = self.bs, self.two_s
        h, nr, M = key_blocks.shape
        columns = self.block_columns(nb)
        shape = (h, nr, bs, M, bs)
        c2p_out = p2c_out = None
        if self.workspace is not None:
            c2p_out = self.workspace.empty(role + " c2p index", shape, columns)
            p2c_out = self.workspace.empty(role + " p2c index", shape, columns)
        e = query_blocks[:, None] - key_blocks + (nb - 1)  # [h, nr, M]
        # whole tiles copied (into p2c's buffer, overwritten below), then put in the scores' order: faster than one
        # gather or indexing op in that order
        tiles = torch.index_select(columns, 0, e.reshape(-1), out=None if p2c_out is None else p2c_out.view(
            h * nr * M, bs, bs)).view(h, nr, M, bs, bs)
        c2p = tiles.permute(0, 1, 3, 2, 4)  # [h, nr, bs(a), M, bs(b)]
        c2p = c2p.contiguous() if c2p_out is None else c2p_out.copy_(c2p)
        key_row = ((key_blocks + self.hw) * bs)[:, :, None, :, None] + torch.arange(bs, device=e.device)  # of key b
        p2c = torch.sub(key_row * two_s + (two_s - 1), c2p, out=p2c_out)
        return c2p.view(h, nr, bs, M * bs), p2c.view(h, -1)


@dataclass
class _TermReads:
    """Where every relative term of the scores is read (built per call from shapes and the layout).

    dense rows  queries [0, dense_rows) against all Np keys: [B, H, dense_rows, Np]
    sparse rows [B, H, nr, bs, K*bs] in slot order: `gathers` (first column, width, c2p index, p2c index) for
                the slots read at indices, and the window's band (`band`: (c2p zero column, c2p first row, p2c zero
                column), see _window_sources) read as strided views of qp/kp or of the window's own products."""

    B: int
    H: int
    Np: int
    bs: int
    g: int
    w: int
    K: int
    two_s: int
    dense_rows: int = 0
    dense: tuple | None = None
    gathers: list = field(default_factory=list)
    band: tuple | None = None
    band_position: int = 0  # the band's place among the gathered parts (in column order)
    workspace: Workspace | None = None  # where the forward's buffers come from (no-gradient CPU calls), else fresh

    def indices(self) -> list[torch.Tensor]:
        """Every index tensor, in a fixed order (dense rows' pair, then each gathered part's pair)."""
        pairs = ([self.dense] if self.dense is not None else []) + [part[2:] for part in self.gathers]
        return [index for pair in pairs for index in pair]

    def with_indices(self, indices) -> "_TermReads":
        """A copy with the index tensors of `indices()` replaced (None: dropped while they are saved elsewhere)."""
        indices = list(indices)
        dense = None if self.dense is None else (indices.pop(0), indices.pop(0))
        gathers = [(start, width, indices.pop(0), indices.pop(0)) for start, width, _, _ in self.gathers]
        return dataclasses.replace(self, dense=dense, gathers=gathers)

    @property
    def nr(self) -> int:
        return self.Np // self.bs - self.g

    @property
    def hw(self) -> int:
        return self.w // 2

    # -- the three kinds of read, as views or gathers (shared by both ways of assembling the terms) -------------

    def dense_c2p(self, qp, out=None) -> torch.Tensor:  # [B, H, rows, Np]
        B, H, rows = self.B, self.H, self.dense_rows
        return torch.gather(qp[:, :, :rows], -1, self.dense[0].expand(B, H, rows, self.Np), out=out)

    def dense_p2c(self, kp, out=None) -> torch.Tensor:  # [B, H, rows, Np]; out: [B, H, rows * Np]
        B, H = self.B, self.H
        return torch.gather(kp.view(B, H, -1), -1, self.dense[1].expand(B, H, -1), out=out).view(
            B, H, self.dense_rows, self.Np)

    def c2p_gather(self, qp, index, out=None) -> torch.Tensor:  # [B, H, nr, bs, width]
        B, H, nr, bs = self.B, self.H, self.nr, self.bs
        return torch.gather(qp[:, :, self.g * bs:].view(B, H, nr, bs, -1), -1,
                            index.unsqueeze(0).expand(B, H, -1, -1, -1), out=out)

    def p2c_gather(self, kp, index, out=None) -> torch.Tensor:  # [B, H, nr, bs, width]; out: [B, H, nr*bs*width]
        B, H = self.B, self.H
        return torch.gather(kp.view(B, H, -1), -1, index.unsqueeze(0).expand(B, H, -1), out=out).view(
            B, H, self.nr, self.bs, -1)

    def c2p_band(self, src) -> torch.Tensor:  # [B, H, nr, bs, w*bs]
        R, bs = src.shape[-1], self.bs
        zero, row0, _ = self.band
        return _band(src, self.nr, bs * R, (bs, self.w * bs), (R - 1, 1), row0 * R + zero - self.hw * bs)

    def p2c_band(self, src, slot: int) -> torch.Tensor:  # [B, H, nr, bs, bs]
        R, bs = src.shape[-1], self.bs
        first = (self.g + slot) * bs * R + self.band[2] + (self.hw - slot) * bs
        return _band(src, self.nr, bs * R, (bs, bs), (1, R - 1), first)

    # -- traced graphs: plain differentiable ops -------------------------------------------------------------------

    def assemble(self, qp, kp, band_c2p, band_p2c) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        B, H, Np, rows = self.B, self.H, self.Np, self.dense_rows
        dense = sparse = None
        if rows:
            terms = 0 if qp is None else self.dense_c2p(qp)
            dense = (terms if kp is None else terms + self.dense_p2c(kp)).view(B * H, rows, Np)
        if self.nr and (self.gathers or self.band):
            pieces = []
            for start, _, c2p_index, p2c_index in self.gathers:
                term = 0 if qp is None else self.c2p_gather(qp, c2p_index)
                pieces.append(term if kp is None else term + self.p2c_gather(kp, p2c_index))
            if self.band is not None:
                term = 0 if band_c2p is None else self.c2p_band(band_c2p)
                if band_p2c is not None:
                    term = term + torch.cat([self.p2c_band(band_p2c, s) for s in range(self.w)], dim=-1)
                pieces.insert(self.band_position, term)
            sparse = torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]
            sparse = sparse.reshape(B * H * self.nr, self.bs, -1)
        return dense, sparse

    # -- eager: one output buffer per kind of row, one gradient buffer per source (_RelativeTerms) ------------------

    def read_into(self, qp, kp, band_c2p, band_p2c) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward: dense [B*H, rows, Np] and sparse [B*H*nr, bs, K*bs] terms written in place (empty tensors
        where there are none); band_c2p / band_p2c: the products the band reads (qp / kp, or their own)."""
        B, H, Np, rows, nr, bs = self.B, self.H, self.Np, self.dense_rows, self.nr, self.bs
        src = qp if qp is not None else kp

        def p2c_into(out, term):  # the p2c term onto the c2p term already there, or alone
            return out.copy_(term) if qp is None else out.add_(term)

        def scratch(numel: int) -> torch.Tensor | None:  # where a p2c gather goes before it is added: [B, H, n]
            return None if self.workspace is None else self.workspace.empty("p2c", (B, H, numel // (B * H)), src)

        # 3-D, as the score matmul (baddbmm_) writes them in place: in-place writes into views would cost copies
        dense_3d = self._empty("dense terms", (B * H, rows, Np if rows else 0), src)
        if rows:
            dense = dense_3d.view(B, H, rows, Np)
            if qp is not None:
                self.dense_c2p(qp, out=dense)
            if kp is not None:
                p2c_into(dense, self.dense_p2c(kp, out=scratch(dense.numel())))
        sparse_3d = self._empty("sparse terms", (B * H * nr, bs, self.K * bs if (self.gathers or self.band) else 0),
                                src)
        sparse = sparse_3d.view(B, H, nr, bs, sparse_3d.shape[-1])
        for start, width, c2p_index, p2c_index in self.gathers:
            out = sparse[..., start:start + width]
            if qp is not None:
                self.c2p_gather(qp, c2p_index, out=out)
            if kp is not None:
                p2c_into(out, self.p2c_gather(kp, p2c_index, out=scratch(out.numel())))
        if self.band is not None:  # the band's c2p comes from qp whenever qp exists (its own product or qp)
            out = sparse[..., self.g * bs:(self.g + self.w) * bs]
            if band_c2p is not None:
                out.copy_(self.c2p_band(band_c2p))
            if band_p2c is not None:
                for s in range(self.w):
                    p2c_into(out[..., s * bs:(s + 1) * bs], self.p2c_band(band_p2c, s))
        return dense_3d, sparse_3d

    def _empty(self, role: str, shape, like: torch.Tensor) -> torch.Tensor:
        return like.new_empty(shape) if self.workspace is None else self.workspace.empty(role, shape, like)

    def scatter_grads(self, grad_dense, grad_sparse, gqp, gkp, grad_band_c2p, grad_band_p2c) -> None:
        """The backward: adds the terms' gradients into the zero-filled gradients of qp, kp and the products the
        band reads (qp and kp themselves, or the window's own products); None: not wanted."""
        B, H, Np, rows, nr, bs = self.B, self.H, self.Np, self.dense_rows, self.nr, self.bs
        if rows and grad_dense is not None:
            grad_dense = grad_dense.view(B, H, rows, Np)
            c2p_index, p2c_index = self.dense
            if gqp is not None:
                gqp[:, :, :rows].scatter_add_(-1, c2p_index.expand(B, H, rows, Np), grad_dense)
            if gkp is not None:
                gkp.view(B, H, -1).scatter_add_(-1, p2c_index.expand(B, H, -1), grad_dense.reshape(B, H, -1))
        if grad_sparse is None or not (self.gathers or self.band):
            return
        grad_sparse = grad_sparse.view(B, H, nr, bs, -1)
        for start, width, c2p_index, p2c_index in self.gathers:
            grad = grad_sparse[..., start:start + width]
            if gqp is not None:
                gqp[:, :, self.g * bs:].view(B, H, nr, bs, -1).scatter_add_(
                    -1, c2p_index.unsqueeze(0).expand(B, H, -1, -1, -1), grad)
            if gkp is not None:
                gkp.view(B, H, -1).scatter_add_(-1, p2c_index.unsqueeze(0).expand(B, H, -1), grad.reshape(B, H, -1))
        if self.band is not None:
            grad = grad_sparse[..., self.g * bs:(self.g + self.w) * bs]
            if grad_band_c2p is not None:
                self.c2p_band(grad_band_c2p).add_(grad)  # the band's elements are distinct: no overlap
            if grad_band_p2c is not None:
                for s in range(self.w):
                    self.p2c_band(grad_band_p2c, s).add_(grad[..., s * bs:(s + 1) * bs])


def _kernel_terms(op, qp, kp, table, key_blocks, B: int, H: int, Np: int, bs: int, hw: int, dense_rows: int,
                  traced: bool, workspace: Workspace | None = None, pool: ReusePool | None = None):
    """Every relative term from the native op (`cpu_kernels`): the dense rows [B*H, dense_rows, Np] against every key
    block, and the sparse rows [B*H*nr, bs, K*bs] against their listed key_blocks [H, nr, K] (None: no sparse rows).
    qp [B, H, Np, R], kp [B, H, T, R] (either None). With a workspace (eager, no gradient) the kernel writes into its
    buffers (a fresh tensor of this size is mapped and faulted in on every call); eagerly with a gradient both kinds
    of row are one autograd node (`_KernelTerms`); otherwise (traced graphs, no workspace) each calls the op."""
    qp3 = None if qp is None else qp.reshape(B * H, Np, qp.shape[-1])
    kp3 = None if kp is None else kp.reshape(B * H, kp.shape[2], kp.shape[-1])
    side = qp3 if qp3 is not None else kp3
    segments = []  # (role, kblocks, query blocks, first query block) of each kind of row
    if dense_rows:
        segments.append(("dense terms", torch.arange(Np // bs, device=table.device).view(1, 1, -1), dense_rows // bs,
                         0))
    if key_blocks is not None:
        segments.append(("sparse terms", key_blocks, key_blocks.shape[1], Np // bs - key_blocks.shape[1]))
    if workspace is not None:  # never when traced (workspace_for)
        terms = [relative_terms_into(workspace.empty(role, (B * H * nq, bs, kblocks.shape[-1] * bs), side), qp3, kp3,
                                     table, kblocks, H, nq, q_block0, bs, hw)
                 for role, kblocks, nq, q_block0 in segments]
    elif not traced and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (qp3, kp3)):
        terms = _KernelTerms.apply(qp3, kp3, table, tuple(segment[1:] for segment in segments), H, bs, hw, pool)
    else:
        terms = [op(qp3, kp3, table, kblocks, H, nq, q_block0, bs, hw) for _, kblocks, nq, q_block0 in segments]
    terms = list(terms)
    dense = terms.pop(0).view(B * H, dense_rows, Np) if dense_rows else None
    sparse = terms.pop(0) if key_blocks is not None else None  # [B*H*nr, bs, K*bs]
    return dense, sparse


class _KernelTerms(torch.autograd.Function):
    """The native kernel's terms of every kind of row (segments: (kblocks, query blocks, first query block) each) as
    one autograd node, eager with a gradient: its backward adds every kind's gradient into one gradient per product
    (zeroed plane by plane by the first kind's kernel call), where an op call per kind would fill one each and
    autograd would then sum them (at 1k tokens and base dims that was a fifth of the kernel's backward time). The
    op's own autograd formula serves traced graphs."""

    @staticmethod
    def forward(ctx, qp3, kp3, table, segments, H: int, bs: int, hw: int, pool: ReusePool | None = None):
        side = qp3 if qp3 is not None else kp3
        empty = side.new_empty if pool is None else lambda *shape: pool.empty(shape, side)
        terms = [relative_terms_into(empty(side.shape[0] * nq, bs, kblocks.shape[-1] * bs), qp3, kp3, table,
                                     kblocks, H, nq, q_block0, bs, hw) for kblocks, nq, q_block0 in segments]
        ctx.pool = pool
        ctx.save_for_backward(table, *[kblocks for kblocks, _, _ in segments])
        ctx.rows = [(nq, q_block0) for _, nq, q_block0 in segments]
        ctx.args = (H, bs, hw)
        ctx.shapes = [None if t is None else (t.shape, t.dtype) for t in (qp3, kp3)]
        ctx.set_materialize_grads(False)  # a kind of row without a gradient is skipped, not run on zeros
        return tuple(terms)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the native kernel's backward: no second order
    def backward(ctx, *grads):
        none = (None,) * 6
        if all(grad is None for grad in grads):
            # reachable: autograd runs the node when every output's gradient is undefined (a later node returned None)
            return (None, None) + none
        table, *kblocks = ctx.saved_tensors
        H, bs, hw = ctx.args
        gqp, gkp = [(torch.empty(shape[0], dtype=shape[1]) if ctx.pool is None
                     else ctx.pool.empty(shape[0], torch.empty(0, dtype=shape[1])))
                    if shape is not None and needed else None
                    for shape, needed in zip(ctx.shapes, ctx.needs_input_grad[:2])]
        if gqp is not None or gkp is not None:
            first = True  # the first kind of row's call zeroes the gradients (on the kernel's threads), the rest add
            for grad, blocks, (nq, q_block0) in zip(grads, kblocks, ctx.rows):
                if grad is not None:
                    relative_terms_backward_into(grad, gqp, gkp, table, blocks, H, nq, q_block0, bs, hw, zero=first)
                    first = False
        return (gqp, gkp) + none


class _RelativeTerms(torch.autograd.Function):
    """The relative terms of every score ([B*H, rows, Np] dense rows, [B*H*nr, bs, K*bs] sparse rows) with a
    backward that scatters into one zero-filled gradient per product: autograd's own would allocate and zero a full
    product per read (each gather, each strided view) and then sum them.

    band_c2p / band_p2c: the window's own products, or None where the band reads qp / kp themselves."""

    @staticmethod
    def forward(ctx, qp, kp, band_c2p, band_p2c, reads: _TermReads):
        # the indices through save_for_backward, so that saved-tensor hooks (the planner's count, offloading) see them
        indices = reads.indices()
        ctx.save_for_backward(*indices)
        ctx.reads = reads.with_indices([None] * len(indices))
        ctx.own_band = (band_c2p is not None, band_p2c is not None)
        ctx.shapes = [None if t is None else (t.shape, t.dtype, t.device) for t in (qp, kp, band_c2p, band_p2c)]
        return reads.read_into(qp, kp, band_c2p if band_c2p is not None else qp,
                               band_p2c if band_p2c is not None else kp)

    @staticmethod
    def backward(ctx, grad_dense, grad_sparse):
        grads = [torch.zeros(shape[0], dtype=shape[1], device=shape[2]) if shape is not None and needed else None
                 for shape, needed in zip(ctx.shapes, ctx.needs_input_grad)]
        gqp, gkp, own_c2p, own_p2c = grads
        reads = ctx.reads.with_indices(ctx.saved_tensors)
        reads.scatter_grads(grad_dense, grad_sparse, gqp, gkp, own_c2p if ctx.own_band[0] else gqp,
                            own_p2c if ctx.own_band[1] else gkp)
        return gqp, gkp, own_c2p, own_p2c, None


def _window_sources(rel: _Relative, q_s: torch.Tensor, k_halo: torch.Tensor, g: int, w: int):
    """What the window slots of the sparse query blocks read their relative terms from: (c2p product or None for
    qp itself, p2c product or None for kp itself, (c2p zero column, c2p first row, p2c zero column)).

    Window slot s of sparse query block g + n is block g + n - hw + s, so query a and key b of the tile are
    d = i - j = (hw - s) * bs + a - b apart, |d| <= dmax = (hw + 1) * bs - 1. c2p is read from a product whose
    columns fall as d rises (column c0 - d), p2c from one whose columns rise with d (column c0 + d) and whose rows are
    the halo's keys."""
    B, H, nr, bs, _ = q_s.shape
    hw, spec = w // 2, rel.spec
    dmax = (hw + 1) * bs - 1
    if delta_is_shift(spec, dmax):  # delta = S + d: the per-bucket products already hold the band
        return None, None, (spec.span - 1, g * bs, spec.span)  # qp column 2S - 1 - delta = S - 1 - d
    # products with just the window's distances: column t is distance dmax - t (c2p) or t - dmax (p2c)
    columns = torch.arange((w + 1) * bs, device=q_s.device)
    c2p = p2c = None
    if rel.qp is not None:
        rows = rel.pos_key[:, relative_delta(dmax - columns, spec)]  # [H, (w+1)*bs, D]
        c2p = q_s.reshape(B, H, nr * bs, -1) @ rows.transpose(-1, -2).unsqueeze(0)
    if rel.kp is not None:
        rows = rel.pos_query[:, relative_delta(columns - dmax, spec)]
        p2c = k_halo @ rows.transpose(-1, -2).unsqueeze(0)  # [B, H, T, (w+1)*bs]
    return c2p, p2c, (dmax, 0, dmax)
