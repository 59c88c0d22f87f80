"""Blocked pure-PyTorch backend: the reference's function with memory linear in N.

Shapes: B batch, H heads, N tokens (Np padded to nb whole blocks), D head dim, bs block size, g global query
blocks, nr = nb - g sparse query blocks, K = g + w + r key-block slots per sparse query block (w window, r random),
S relative span (2S relative embeddings), hw = w // 2, T = Np + 2 * hw * bs rows of k with its zero halo.

`blocked_attention` takes reference.py's steps on the listed blocks only, eager and traced alike:
  1. pad to whole blocks (the scale folded into q and pos_query once, k with its halo)
  2. the relative terms of every listed score (`_relative_terms`: the native op, or the PyTorch reads)
  3. scores = terms + q.k, the masked softmax and probabilities @ v, per kind of row (`_dense_rows`, `_sparse_rows`)
Eager and traced differ only inside those steps: traced graphs (export, ONNX, torch.compile) take plain ops that
autograd differentiates, and branch only on shapes.

Two ways to compute the same function, chosen from shapes alone (`_dense_is_cheaper`):
  dense rows   query blocks against all Np keys with the layout's block mask: the global query blocks always, and
               every query block when the layout lists about as many blocks as there are (short inputs).
  sparse rows  each sparse query block against its K key blocks ([B, H, nr, bs, K*bs]). Structured layouts
               (slots [global | window | random]), eagerly: the global slots are one matmul per head, the window
               slots a matmul against an overlapping strided view of the haloed keys and values, and only the
               random blocks are copied (`_SlotScores`, `_SlotContext`: autograd.Functions whose backward passes are
               the same three products, `_rows_times_slots`, `_weights_times_slots`, `_weights_t_times_rows`).
               Traced graphs and layouts without slot order copy every listed block (index_select of whole [bs, D]
               blocks, never of single tokens) and leave the gradients to autograd.

Relative terms: c2p(i, j) = q_i . pos_key[delta(i, j)], p2c(i, j) = k_j . pos_query[delta(i, j)]. q.pos_key^T and
k.pos_query^T are computed once per bucket ([B, H, Np, 2S], the pos_key rows in reverse order, see below) and read
at delta(i, j) in one of two ways:
  band   the window slots of a sparse query block (structured layouts). There delta depends on i - j alone; when it is
         a plain shift of i - j (`delta_is_shift`: true for the default block size, window and buckets) the [bs, w*bs]
         tile of c2p (and each [bs, bs] tile of p2c) is a strided view of those products (a Toeplitz band), so the
         window needs no index and no gather. Otherwise q and k are multiplied with the (w + 1) * bs rows of pos_key
         and pos_query the window's distances use, laid out the same way.
  gather dense rows and the other slots (global and random blocks), at indices built in the scores' order in one
         indexing op from per-block-distance tables ([bs, 2nb - 1, bs]): one index for all heads where the blocks
         are the same for every head (dense rows, global slots), [H, nr, bs, r*bs] for the random slots; p2c's
         index is derived from c2p's (`_Relative`).
On CPU in float32, float64 and bfloat16 (eager and torch.compile) the native op `torch.ops.bigbird_ja.relative_terms`
(`cpu_kernels`, built at install) computes every term from the delta table and the block numbers in one pass, and
scatters the gradients in one pass back (`_kernel_terms`): no index tensors, no bands. The PyTorch reads do the same
everywhere else (export and ONNX, float16, other devices, an install without the library, BIGBIRD_JA_CPU_KERNELS=0)
and are its reference. `_TermReads` says where every term of a row is read. Eagerly, `_RelativeTerms` (an
autograd.Function) writes all terms of the dense and of the sparse rows into one buffer each, the score matmul adds
q.k into that buffer in place (baddbmm_), and its backward scatters the terms' gradients into one zero-filled
gradient per product. (Autograd
through the reads would zero a full product per gather and per strided view and then sum them, and every in-place
update of a view costs a score-sized copy in its backward: this is most of the backward's saving.) Traced graphs
take the same reads as plain ops (`_TermReads.assemble`) and leave the gradients to autograd.

Masks: the sparse rows of structured layouts (eager) fill only the tiles with a masked key (`_fill_masked_tiles`:
the layout's unused slots and blocks with padding), the global rows take no mask when nothing is padded (known
from the shapes, or eagerly on CPU from an all-ones mask), and without gradients the softmax overwrites its scores.
Tensors the rest of the op does not need (products, indices) are dropped as soon as the terms are read: the op's
peak memory, and the pages a fresh heap must fault in, shrink.
With BIGBIRD_JA_CPU_WORKSPACE=1, the no-gradient eager CPU forward takes its largest scratch tensors (products,
terms, p2c reads, random blocks) from a per-thread workspace kept between calls (`_Workspace`; `release_workspace()`
frees it); off by default, so a server's memory returns to what it was after each forward.

Export: everything below branches only on Python ints (shapes and the layout's and spec's static fields), never on
tensor values; a symbolic number of blocks always takes the sparse path.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .cpu_kernels import relative_terms as relative_terms_kernel
from .cpu_kernels import supports as kernel_supports
from .layout import BlockLayout
from .relative import RelativePositionSpec, delta_is_shift, relative_delta, relative_index_table

# Dense rows cost less per score than sparse rows (one large matmul, no block copies or gathers): the dense path is
# taken while its block pairs are at most this multiple of the sparse path's (benchmarks/README.md: how it was set).
DENSE_MARGIN = 1.25


def _dense_is_cheaper(num_blocks, num_global: int, slots: int) -> bool:
    """Whether every query block against every key block costs no more than the sparse path."""
    if isinstance(num_blocks, torch.SymInt) or torch.compiler.is_compiling():
        return False  # traced (export, ONNX, torch.compile): one path, no guard on the length
    sparse = num_global * num_blocks + (num_blocks - num_global) * slots  # block pairs per head
    return num_blocks * num_blocks <= DENSE_MARGIN * sparse


def _select_blocks(x: torch.Tensor, index: torch.Tensor, traced: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, n, bs*D] -> [B, len(index), bs*D]: whole blocks copied (into `out` if given, eager). At batch 1 (eager)
    along dim 0 of a 2-D view, which torch copies row by row (index_select along dim 1 goes element by element: ~9x
    slower on CPU); traced graphs take one path for every batch size."""
    if not traced and x.shape[0] == 1:
        return torch.index_select(x[0], 0, index, **({} if out is None else {"out": out[0]})).unsqueeze(0)
    return torch.index_select(x, 1, index, **({} if out is None else {"out": out}))


def _softmax(scores: torch.Tensor, mask: torch.Tensor | None, dropout_p: float, training: bool) -> torch.Tensor:
    """The reference's masked softmax (masked scores take the compute dtype's minimum) and dropout; mask None: the
    scores are masked already, or nothing is. Rows with nothing to attend to are zeroed by the callers, on the
    (smaller) output. When no gradient flows the mask and the softmax are written into `scores` itself (under
    autograd an in-place write into a view costs a score-sized copy in the backward)."""
    compute_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    in_place = not scores.requires_grad and scores.dtype == compute_dtype
    scores = scores.to(compute_dtype)
    if mask is not None:
        fill = torch.finfo(compute_dtype).min
        scores = scores.masked_fill_(~mask, fill) if in_place else torch.where(mask, scores, fill)
    # in place: saves a score-sized buffer (the CPU kernel reads each row before writing it)
    probs = torch.softmax(scores, dim=-1, out=scores) if in_place else torch.softmax(scores, dim=-1)
    return F.dropout(probs, dropout_p, training)


def _fill_masked_tiles(scores: torch.Tensor, valid: torch.Tensor) -> None:
    """scores [B*H*nr, bs, K*bs] of sparse rows: the masked keys of every (query block, slot) tile get the lowest
    score (exp of it minus the row's maximum is 0, as with `_softmax`'s mask), touching only the tiles with a masked
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


def _band(x: torch.Tensor, tiles: int, tile_step: int, shape: tuple[int, int], strides: tuple[int, int],
          first: int) -> torch.Tensor:
    """A strided view of x [B, H, rows, R] (a matmul's fresh output: contiguous, from the start of its storage):
    [B, H, tiles, *shape], where element (n, a, b) is element first + n * tile_step + a * strides[0] + b * strides[1]
    of x's [rows * R] plane. (Not x.storage_offset() + first: asking for the offset breaks a torch.compile graph.)"""
    B, H, rows, R = x.shape
    return x.as_strided((B, H, tiles, *shape), (H * rows * R, rows * R, tile_step, *strides), first)


class _Workspace:
    """Scratch buffers that the no-gradient forward on CPU reuses from call to call: one per role, per thread, device
    and dtype, grown to the largest request up to `max_bytes` (larger requests get fresh tensors).

    Why: torch's CPU allocator is malloc. Tensors over glibc's mmap threshold (at most 32 MiB) are mapped fresh and
    faulted in, zeroed by the kernel, on every call, and smaller ones do the same whenever the heap's top is trimmed
    between layers; refilling kept pages is cheaper (benchmarks/README.md). Everything taken from here is dead when
    the op returns (its output is a fresh tensor), and threads never share a buffer. `release_workspace()` frees them.
    Kept memory is traded for that speed, so it is opt-in: BIGBIRD_JA_CPU_WORKSPACE=1."""

    max_bytes = 128 << 20  # bounds each kept buffer (at base dims every one is kept up to 4k tokens)

    @staticmethod
    def enabled() -> bool:
        return os.environ.get("BIGBIRD_JA_CPU_WORKSPACE", "0") not in ("", "0")

    def __init__(self):
        self._local = threading.local()

    def empty(self, role: str, shape, like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        if numel * like.element_size() > self.max_bytes:
            return like.new_empty(shape)
        buffers = self._local.__dict__.setdefault("buffers", {})
        key = (role, like.device, like.dtype)
        buffer = buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffers.pop(key, None)  # free the smaller one first
            with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
                buffer = buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel].view(shape)

    def release(self) -> None:
        self._local.__dict__.pop("buffers", None)


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free the calling thread's scratch buffers of the no-gradient CPU forward (they are kept between calls)."""
    _WORKSPACE.release()


def _product(x: torch.Tensor, y: torch.Tensor, workspace: _Workspace | None, role: str) -> torch.Tensor:
    """x [B, H, n, D] @ y [H, D, m] -> [B, H, n, m], into a workspace buffer when one is given."""
    if workspace is None:
        return x @ y.unsqueeze(0)
    B, H, n, D = x.shape
    m = y.shape[-1]
    out = workspace.empty(role, (B * H, n, m), x)
    y = y if B == 1 else y.unsqueeze(0).expand(B, -1, -1, -1).reshape(B * H, D, m)
    return torch.bmm(x.reshape(B * H, n, D), y, out=out).view(B, H, n, m)


class _Relative:
    """The per-bucket products and where the relative terms of each row read them.

    qp [B, H, Np, 2S]: column c holds q . pos_key[2S - 1 - c] (reversed, so that along a window tile's key axis the
    column rises); kp [B, H, T, 2S]: row hw*bs + j holds k_j . pos_query (the halo rows are zeros). Indices into
    them: c2p at (row i, column 2S - 1 - delta), p2c at flat element (hw*bs + j) * 2S + delta of kp's [T * 2S]
    plane, so p2c's index is the key row's offset + 2S - 1 minus c2p's (one index is built per read)."""

    def __init__(self, q, k_halo, pos_key, pos_query, spec: RelativePositionSpec, hw: int, bs: int,
                 workspace: _Workspace | None = None):
        self.spec, self.hw, self.bs, self.workspace = spec, hw, bs, workspace
        self._columns = None
        self.two_s = 2 * spec.span
        self.qp = None if pos_key is None else _product(q, pos_key.flip(1).transpose(-1, -2), workspace, "qp")
        self.kp = None if pos_query is None else _product(k_halo, pos_query.transpose(-1, -2), workspace, "kp")
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
    workspace: _Workspace | None = None  # where the forward's buffers come from (no-gradient CPU calls), else fresh

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


def _kernel_terms(op, qp, kp, table, key_blocks, B: int, H: int, Np: int, bs: int, hw: int, dense_rows: int):
    """Every relative term from the native op (`cpu_kernels`): the dense rows [B*H, dense_rows, Np] against every key
    block, and the sparse rows [B*H*nr, bs, K*bs] against their listed key_blocks [H, nr, K] (None: no sparse rows).
    qp [B, H, Np, R], kp [B, H, T, R] (either None)."""
    qp3 = None if qp is None else qp.reshape(B * H, Np, qp.shape[-1])
    kp3 = None if kp is None else kp.reshape(B * H, kp.shape[2], kp.shape[-1])
    dense = sparse = None
    if dense_rows:
        every_block = torch.arange(Np // bs, device=table.device).view(1, 1, -1)
        dense = op(qp3, kp3, table, every_block, H, dense_rows // bs, 0, bs, hw).view(B * H, dense_rows, Np)
    if key_blocks is not None:
        nr = key_blocks.shape[1]
        sparse = op(qp3, kp3, table, key_blocks, H, nr, Np // bs - nr, bs, hw)  # [B*H*nr, bs, K*bs]
    return dense, sparse


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


def _scores(terms: torch.Tensor | None, queries: torch.Tensor, keys: torch.Tensor, traced: bool) -> torch.Tensor:
    """terms + queries . keys^T as one (batched) matmul: [n, r, D] x [n, c, D] -> [n, r, c]; eagerly the terms'
    buffer (this call's own) is written in place."""
    if terms is None:
        return queries @ keys.transpose(1, 2)
    if traced:
        return torch.baddbmm(terms, queries, keys.transpose(1, 2))
    return terms.baddbmm_(queries, keys.transpose(1, 2))


def _dense_rows(q, k, v, terms, rows: int, mask: torch.Tensor | None, dropout_p: float, training: bool,
                traced: bool) -> torch.Tensor:
    """Queries [0, rows) of q [B, H, Np, D] against every key; mask [B|1, H|1, m, 1, Np] per query block (None: every
    key) -> [B, H, rows, D]."""
    B, H, Np, D = k.shape
    scores = _scores(terms, q[:, :, :rows].reshape(B * H, rows, D), k.reshape(B * H, Np, D), traced)
    if mask is None:
        probs = _softmax(scores.view(B, H, rows, Np), None, dropout_p, training)
        return probs.to(v.dtype) @ v
    m = mask.shape[2]
    probs = _softmax(scores.view(B, H, m, rows // m, Np), mask, dropout_p, training)
    out = (probs.to(v.dtype).view(B, H, rows, Np) @ v).view(B, H, m, rows // m, D)
    return (out * mask.any(dim=-1, keepdim=True)).view(B, H, rows, D)


def _relative_terms(q, k_halo, pos_key, pos_query, spec, layout: BlockLayout, dense: bool, w: int, traced: bool,
                    workspace: _Workspace | None):
    """The c2p + p2c terms of every score the layout lists: (dense rows [B*H, rows, Np] or None, sparse rows
    [B*H*nr, bs, K*bs] or None). The native op on CPU (eager and compiled, not exported), else the PyTorch reads."""
    if pos_key is None and pos_query is None:
        return None, None
    B, H, Np, _ = q.shape
    bs, nb, g = layout.block_size, layout.num_blocks, layout.num_global_blocks
    nr, K, hw = nb - g, layout.key_blocks.shape[-1], w // 2
    key_blocks = layout.key_blocks.to(q.device)  # [H, nr, K]
    rel = _Relative(q, k_halo, pos_key, pos_query, spec, hw, bs, workspace)
    op = None if torch.compiler.is_exporting() or not kernel_supports(q) else relative_terms_kernel()
    if op is not None:
        return _kernel_terms(op, rel.qp, rel.kp, rel.table, None if dense else key_blocks, B, H, Np, bs, hw,
                             Np if dense else g * bs)
    reads = _TermReads(B, H, Np, bs, g, w, K, rel.two_s, workspace=workspace)
    reads.dense_rows = Np if dense else g * bs
    if reads.dense_rows:
        reads.dense = rel.dense_index(reads.dense_rows, Np)
    band_c2p = band_p2c = None
    if not dense:
        query_blocks = torch.arange(g, nb, device=q.device)
        if w > 0:  # [global | window | random]: the global slots are blocks 0..g-1 for every head and row
            if g > 0:
                reads.gathers.append((0, g * bs, *rel.slot_index(
                    query_blocks, torch.arange(g, device=q.device).expand(1, nr, g), nb, "global")))
            q_s = q[:, :, g * bs:].view(B, H, nr, bs, -1)
            band_c2p, band_p2c, reads.band = _window_sources(rel, q_s, k_halo, g, w)
            reads.band_position = len(reads.gathers)
            if K > g + w:
                reads.gathers.append(((g + w) * bs, (K - g - w) * bs,
                                      *rel.slot_index(query_blocks, key_blocks[..., g + w:], nb, "random")))
        else:
            reads.gathers.append((0, K * bs, *rel.slot_index(query_blocks, key_blocks, nb, "slots")))
    if traced:  # plain ops, differentiated by autograd (a graph of the custom function's pieces)
        return reads.assemble(rel.qp, rel.kp, band_c2p if band_c2p is not None else rel.qp,
                              band_p2c if band_p2c is not None else rel.kp)
    return _RelativeTerms.apply(rel.qp, rel.kp, band_c2p, band_p2c, reads)


def _sparse_rows(q, k_halo, v, terms, key_valid, layout: BlockLayout, w: int, dropout_p: float, training: bool,
                 traced: bool, workspace: _Workspace | None) -> torch.Tensor:
    """The sparse query blocks against their K listed key blocks: [B, H, nr*bs, D]. Structured layouts, eagerly, read
    the global and window blocks in place (`_SlotScores`, `_SlotContext`); otherwise every listed block is copied."""
    B, H, Np, D = q.shape
    bs, nb, g = layout.block_size, layout.num_blocks, layout.num_global_blocks
    nr, K, hw, dev = nb - g, layout.key_blocks.shape[-1], w // 2, q.device
    key_blocks = layout.key_blocks.to(dev)  # [H, nr, K]
    q_s = q[:, :, g * bs:].reshape(B * H * nr, bs, D)
    valid = key_valid.view(B, nb, bs)[:, key_blocks] & layout.key_valid.to(dev)[None, :, :, :, None]
    mask = valid.view(B, H, nr, 1, K * bs)  # attended: the slot is valid in the layout and its key is not padding
    if w > 0 and not traced:
        geometry = _SlotGeometry(B, H, nr, bs, g, w, K, workspace)
        heads = torch.arange(H, device=dev)[:, None, None]
        k_rows = (heads * (nb + 2 * hw) + key_blocks[..., g + w:] + hw).view(-1)  # random blocks in the halo rows
        scores = _SlotScores.apply(q_s, k_halo.reshape(B * H, -1, D), terms, k_rows, valid, geometry)  # masked
        probs = _softmax(scores.view(B, H, nr, bs, K * bs), None, dropout_p, training)
        v_halo = F.pad(v, (0, 0, hw * bs, hw * bs))
        out = _SlotContext.apply(probs.to(v.dtype).view(B * H * nr, bs, K * bs), v_halo.reshape(B * H, -1, D),
                                 k_rows, geometry).view(B, H, nr, bs, D)
    else:
        rows = (torch.arange(H, device=dev)[:, None, None] * (nb + 2 * hw) + key_blocks + hw).view(-1)
        k_slots = _select_blocks(k_halo.reshape(B, H * (nb + 2 * hw), bs * D), rows, traced).view(
            B * H * nr, K * bs, D)
        scores = _scores(terms, q_s, k_slots, traced).view(B, H, nr, bs, K * bs)
        del k_slots
        probs = _softmax(scores, mask, dropout_p, training)
        v_rows = (torch.arange(H, device=dev)[:, None, None] * nb + key_blocks).view(-1)
        v_slots = _select_blocks(v.reshape(B, H * nb, bs * D), v_rows, traced).view(B, H, nr, K * bs, D)
        out = probs.to(v.dtype) @ v_slots
    attends = mask.any(dim=-1, keepdim=True)  # [B, H, nr, bs, 1]: rows with something to attend to
    if traced or dev.type != "cpu" or not bool(attends.all()):  # eager CPU: no pass where every row attends
        out = out * attends  # [B, H, nr, bs, D]
    return out.view(B, H, nr * bs, D)


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
    B, H, N, D = q.shape
    bs, nb, g = layout.block_size, layout.num_blocks, layout.num_global_blocks
    Np, dev = nb * bs, q.device
    traced = isinstance(nb, torch.SymInt) or torch.compiler.is_compiling()
    dense = nb == g or _dense_is_cheaper(nb, g, layout.key_blocks.shape[-1])
    w = 0 if dense else layout.num_window_blocks  # window slots read as bands (0: every slot is gathered)
    hw = w // 2
    # no autograd graph can hold the scratch buffers: they may be reused (_Workspace, opt-in)
    workspace = _WORKSPACE if (not torch.is_grad_enabled() and not traced and dev.type == "cpu"
                               and _WORKSPACE.enabled()) else None

    # 1. whole blocks: the scale folded into q and pos_query once instead of into every score; k with hw zero blocks
    #    on each side (the window's p2c band reads the rows of blocks r - hw .. r + hw)
    q = F.pad(q * scale, (0, 0, 0, Np - N))  # [B, H, Np, D]
    pos_query = None if pos_query is None else pos_query * scale
    v = F.pad(v, (0, 0, 0, Np - N))
    k_halo = F.pad(k, (0, 0, hw * bs, hw * bs + Np - N))  # [B, H, T, D]
    k = k_halo[:, :, hw * bs:hw * bs + Np]
    key_valid = torch.ones(B, N, dtype=torch.bool, device=dev) if key_padding_mask is None else key_padding_mask.bool()
    key_valid = F.pad(key_valid, (0, Np - N), value=False)  # [B, Np]

    # 2. the relative terms (c2p + p2c) of every listed score
    dense_terms, sparse_terms = _relative_terms(q, k_halo, pos_key, pos_query, rel_spec, layout, dense, w, traced,
                                                workspace)

    # 3. scores = terms + q.k, masked softmax, probabilities @ v: every query block against every key block under
    #    the layout's block mask (short inputs) ...
    if dense:
        key_blocks = layout.key_blocks.to(dev)
        listed = (key_blocks[..., None] == torch.arange(nb, device=dev)) & layout.key_valid.to(dev)[..., None]
        block_mask = torch.cat([torch.ones(H, g, nb, dtype=torch.bool, device=dev), listed.any(dim=2)], dim=1)
        mask = block_mask[None, :, :, None, :, None] & key_valid.view(B, 1, 1, 1, nb, bs)  # [B, H, nb, 1, nb, bs]
        out = _dense_rows(q, k, v, dense_terms, Np, mask.view(B, H, nb, 1, Np), dropout_p, training, traced)
        return out[:, :, :N]
    # ... or the global query blocks against every key and the sparse ones against their K listed key blocks
    outputs = []
    if g > 0:
        every_key = key_padding_mask is None and N == Np  # known from shapes alone: no branch on values
        if not every_key and not traced and dev.type == "cpu":  # eager CPU (no device sync): an all-ones
            every_key = bool(key_valid.all())  # attention mask costs no masking pass, forward or backward
        outputs.append(_dense_rows(q, k, v, dense_terms, g * bs, None if every_key else key_valid.view(B, 1, 1, 1, Np),
                                   dropout_p, training, traced))
    outputs.append(_sparse_rows(q, k_halo, v, sparse_terms, key_valid, layout, w, dropout_p, training, traced,
                                workspace))
    return torch.cat(outputs, dim=2)[:, :, :N]


@dataclass(frozen=True)
class _SlotGeometry:
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
    workspace: _Workspace | None = field(default=None, compare=False)  # for the random blocks' copies (no gradient)

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
        return _select_blocks(heads.view(self.B, -1, self.bs * D), rows, False, out).view(
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
                      geo: _SlotGeometry, beta: float) -> torch.Tensor:
    """out [B*H*nr, bs, K*bs] = beta * out + x [B*H*nr, bs, D] . (slot rows)^T (beta 0: out's contents ignored)."""
    BH, nr, bs = geo.B * geo.H, geo.nr, geo.bs
    if geo.g:
        geo.columns(out.view(BH, nr * bs, -1), "global").baddbmm_(
            x.reshape(BH, nr * bs, -1), geo.global_rows(heads).transpose(1, 2), beta=beta)
    for bh in range(BH):
        geo.columns(out, "window", bh).baddbmm_(x[bh * nr:(bh + 1) * nr], geo.window(heads, bh).transpose(1, 2),
                                                beta=beta)
    if geo.r:
        geo.columns(out, "random").baddbmm_(x, random.transpose(1, 2), beta=beta)
    return out


def _weights_times_slots(p: torch.Tensor, heads: torch.Tensor, random: torch.Tensor | None,
                         geo: _SlotGeometry) -> torch.Tensor:
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
                          geo: _SlotGeometry) -> torch.Tensor:
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


class _SlotScores(torch.autograd.Function):
    """scores [B*H*nr, bs, K*bs] = terms + q . k^T for the sparse rows of a structured layout, written into the
    relative terms' buffer when there is one (else a new one), with the masked keys filled in (`_fill_masked_tiles`:
    their gradient is the softmax's, zero). q [B*H*nr, bs, D]; k [B*H, T, D] with its halo; random_rows: the random
    blocks' rows of k viewed as [B, H*T/bs, bs*D]; valid [B, H, nr, K, bs]: the attended keys."""

    @staticmethod
    def forward(ctx, q, k, terms, random_rows, valid, geo: _SlotGeometry):
        random = geo.select_random(k, random_rows, "random keys") if geo.r else None
        out = q.new_empty(q.shape[0], geo.bs, geo.K * geo.bs) if terms is None else terms
        _rows_times_slots(q, k, random, out, geo, beta=0.0 if terms is None else 1.0)
        _fill_masked_tiles(out, valid)
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


class _SlotContext(torch.autograd.Function):
    """context [B*H*nr, bs, D] = probs @ v for the sparse rows of a structured layout. probs [B*H*nr, bs, K*bs];
    v [B*H, T, D] with its (zero) halo; random_rows as for _SlotScores."""

    @staticmethod
    def forward(ctx, probs, v, random_rows, geo: _SlotGeometry):
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
