"""Fused block-sparse DeBERTa-v2 disentangled attention: Triton kernels and their launchers.

Shapes: B batch, H heads, Np tokens (padded to whole layout blocks), D head dim, nb layout blocks of
LAYOUT_BLOCK tokens, 2S relative buckets. All tensors are contiguous.

The function (the dense reference in bigbird_ja/attention/reference.py is its specification):
    s[i, j] = q_i . k_j + qp[i, delta(i, j)] + kp[j, delta(i, j)]       (q already scaled)
    p[i, :] = softmax over the key blocks listed for i's block, key_valid[j] only
    out[i]  = sum_j p[i, j] v_j
where qp = q @ pos_key^T and kp = k @ pos_query^T are the per-bucket projections ([B, H, Np, 2S], O(n S)) and
delta(i, j) = rel_table[i - j + table_offset]. No N x N tensor exists anywhere: the relative terms are gathered
inside the kernels, and their gradients are scattered back into d(qp), d(kp) with atomics.

Block lists are CSR: row r = h * nb + block holds columns col_idx[row_ptr[r]:row_ptr[r + 1]]. The forward and
dq kernels read the key blocks of each query block; the dk/dv kernel reads the transposed lists (the query blocks
that attend to each key block), so neither k nor v gradients need atomics.

The kernels hold no autograd: bigbird_ja/attention/triton_backend.py wraps the launchers.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_LAYOUT_BLOCKS = (16, 32, 64, 128)


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (TRITON_INTERPRET=1, read when triton decorates them): then they
    run on CPU tensors, one tile choice instead of autotuning. The one definition; bigbird_ja asks it from here."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------------------------
# Helpers (Triton inlines them)
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _check_tiles(LAYOUT_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # A tile takes its block list from one layout block, and the loops over a listed block step by whole tiles.
    tl.static_assert(LAYOUT_BLOCK % BLOCK_M == 0, "query tiles must not straddle layout blocks")
    tl.static_assert(LAYOUT_BLOCK % BLOCK_N == 0, "key tiles must not straddle layout blocks")


@triton.jit
def _program_tile(ROW_PTR, H, N_PAD, NUM_BLOCKS, HEAD_DIM: tl.constexpr, LAYOUT_BLOCK: tl.constexpr,
                  BLOCK: tl.constexpr):
    """What this program owns: BLOCK rows (queries, or keys for dk/dv) of one batch*head, and their block list.

    Returns bh (batch*head, int64), b (batch), offs [BLOCK] row indices, offs_d [HEAD_DIM], base (where this
    batch*head starts in a [B, H, Np, D] tensor) and [start, end): the rows' layout block's entries of the CSR list.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    row = (bh % H) * NUM_BLOCKS + (pid * BLOCK) // LAYOUT_BLOCK
    start = tl.load(ROW_PTR + row)
    end = tl.load(ROW_PTR + row + 1)
    return bh, bh // H, offs, tl.arange(0, HEAD_DIM), bh * N_PAD * HEAD_DIM, start, end


@triton.jit
def _rows(X, base, offs, offs_d, HEAD_DIM: tl.constexpr):
    """[len(offs), HEAD_DIM] pointers to rows offs of the batch*head at `base` of a [B, H, Np, D] tensor."""
    return X + base + offs[:, None] * HEAD_DIM + offs_d[None, :]


@triton.jit
def _buckets(P, bh, rows, rel, N_PAD, TWO_S):
    """Pointers to P[bh, rows, rel] of a [B, H, Np, 2S] tensor: rows [M, 1] (per query) or [1, N] (per key),
    broadcast against the [M, N] bucket indices rel."""
    return P + bh * N_PAD * TWO_S + rows * TWO_S + rel


@triton.jit
def _scores(q, k, offs_m, offs_n, bh, b, QP, KP, REL_TABLE, KEY_VALID, N_PAD, TWO_S, TABLE_OFFSET,
            HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float32 scores with the relative terms; -inf where the key is padding.

    Also returns the relative-bucket index of every (query, key) pair, which the backward scatters into.
    """
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    if HAS_C2P or HAS_P2C:
        rel = tl.load(REL_TABLE + (offs_m[:, None] - offs_n[None, :] + TABLE_OFFSET))
    else:
        rel = offs_m[:, None] - offs_n[None, :]  # unused
    if HAS_C2P:
        s += tl.load(_buckets(QP, bh, offs_m[:, None], rel, N_PAD, TWO_S)).to(tl.float32)
    if HAS_P2C:
        s += tl.load(_buckets(KP, bh, offs_n[None, :], rel, N_PAD, TWO_S)).to(tl.float32)
    valid = tl.load(KEY_VALID + b * N_PAD + offs_n) != 0
    s = tl.where(valid[None, :], s, float("-inf"))
    return s, rel


@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, N_PAD, dropout_p):
    """[BLOCK_M, BLOCK_N] bool: which probabilities survive dropout. A pure function of (seed, batch*head, query,
    key), so the backward regenerates exactly the forward's mask (Philox, 64-bit counters)."""
    offsets = (bh * N_PAD + offs_m[:, None].to(tl.int64)) * N_PAD + offs_n[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(KEEP, seed, dropout_p, N_PAD, BLOCK: tl.constexpr):
    """Writes the keep mask of one (batch*head, query tile) as int8, for tests of the dropout path."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    for n0 in range(0, N_PAD, BLOCK):
        offs_n = n0 + tl.arange(0, BLOCK)
        keep = _dropout_keep(seed, bh, offs_m, offs_n, N_PAD, dropout_p)
        tl.store(KEEP + (bh * N_PAD + offs_m[:, None]) * N_PAD + offs_n[None, :], keep.to(tl.int8))


# --------------------------------------------------------------------------------------------------------------
# Autotuning: warps and stages (and tile sizes up to the layout block), keyed on what changes the best choice.
# --------------------------------------------------------------------------------------------------------------
# BIGBIRD_JA_AUTOTUNE=suite narrows the space to a few tiles known to suit 16-bit inputs at head dim 64 and layout
# block 64 (the GPU suite's shapes): autotuning compiles every kept configuration one after another on first use,
# for each variant (dtype, dropout), and a lent GPU's time is short. Read when the kernels are decorated (import).
AUTOTUNE_SPACES = ("full", "suite")
SUITE_CONFIGS = ((64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 4, 2))  # (BLOCK_M, BLOCK_N, warps, stages)


def autotune_space() -> str:
    space = os.environ.get("BIGBIRD_JA_AUTOTUNE", "full")
    if space not in AUTOTUNE_SPACES:
        raise ValueError(f"BIGBIRD_JA_AUTOTUNE={space!r}: must be one of {AUTOTUNE_SPACES} (unset: 'full').")
    return space


def _configs(space: str | None = None):
    if (space or autotune_space()) == "suite":
        tiles = SUITE_CONFIGS
    else:
        tiles = [(bm, bn, w, s) for bm in (32, 64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (1, 2, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles]


# Estimated shared memory a configuration may use: pipelined q/k/v/dO tiles. A coarse first cut (it can be off by
# 2x either way between kernels); what a device cannot launch is dropped below from the real figure.
SHARED_MEMORY_BUDGET = 120 * 1024


# (arch, shared memory per block) of the targets whose whole autotuning space the ahead-of-time sweep finds
# within shared memory (A100, H100): nothing to measure there. Elsewhere each candidate is measured (~1 s each).
SPACE_FITS = {(80, 166912), (90, 232448)}


def _cuda_target(q):
    """(arch, largest shared memory per block in bytes) of the NVIDIA GPU holding q; None elsewhere."""
    if q is None or not q.is_cuda or torch.version.hip is not None:
        return None
    props = torch.cuda.get_device_properties(q.device)
    return props.major * 10 + props.minor, props.shared_memory_per_block_optin


def _prune(configs, named_args, kernel=None, **kwargs):
    """Tiles must divide the layout block, fit shared memory for this head dim and dtype, and keep the score tile
    in registers; 8 warps only pay off on large tiles. For `kernel` on a GPU (or TARGET=(arch, limit) ahead of
    time), configurations whose shared memory is over the device's limit are dropped: they would compile only to
    fail at launch (B200 and the 99 KiB parts, sm_86/89/120, cannot launch some; aot.py sweeps the targets)."""
    layout_block = kwargs.get("LAYOUT_BLOCK", named_args.get("LAYOUT_BLOCK"))
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    q = named_args.get("Q")
    dtype = kwargs.get("DTYPE") or (q.dtype if q is not None else torch.float16)
    element_size = torch.empty(0, dtype=dtype).element_size()
    kept = []
    for config in configs:
        bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        if bm > layout_block or bn > layout_block:
            continue
        if element_size == 4 and config.num_stages > 1:
            continue  # float32 is the exactness path, not the speed path: no pipelining (measured up to 3x over)
        # float32 tiles measured up to 2x this estimate (layout conversions through shared memory)
        footprint = (bm + bn) * head_dim * element_size * config.num_stages * (2 if element_size == 4 else 1)
        if footprint > SHARED_MEMORY_BUDGET:
            continue
        # The float32 score tile and its gathered relative terms live in registers: cap the tile area (float32
        # inputs need twice the registers per element of their tiles).
        if bm * bn > (64 * 64 if element_size == 4 else 128 * 64):
            continue
        if config.num_warps == 8 and bm * bn < 64 * 64:
            continue
        kept.append(config)
    target = kwargs.get("TARGET") or _cuda_target(q)
    if kernel is not None and target is not None and tuple(target) not in SPACE_FITS:
        from .aot import shared_memory

        arch, limit = target
        flags = {name.lower(): bool(kwargs.get(name, True)) for name in ("HAS_C2P", "HAS_P2C", "HAS_DROPOUT")}
        kept = [c for c in kept if shared_memory(kernel, arch, dtype, head_dim, layout_block, c.kwargs["BLOCK_M"],
                                                 c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, **flags) <= limit]
    # the fallback (at most 40 KiB on every target the sweep covers) launches everywhere
    return kept or [triton.Config({"BLOCK_M": min(layout_block, 32), "BLOCK_N": min(layout_block, 32)},
                                  num_warps=4, num_stages=1)]


def _autotune(kernel, name, **reset):
    return triton.autotune(_configs(), key=AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": functools.partial(_prune, kernel=name)},
                           **reset)(kernel)


AUTOTUNE_KEY = ["HEAD_DIM", "LAYOUT_BLOCK", "HAS_C2P", "HAS_P2C", "HAS_DROPOUT"]


# --------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed"])
def _fwd_kernel(Q, K, V, QP, KP, REL_TABLE, KEY_VALID, ROW_PTR, COL_IDX, OUT, LSE,
                H, N_PAD, NUM_BLOCKS, TWO_S, TABLE_OFFSET, seed, dropout_p,
                HEAD_DIM: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    _check_tiles(LAYOUT_BLOCK, BLOCK_M, BLOCK_N)
    bh, b, offs_m, offs_d, base, start, end = _program_tile(ROW_PTR, H, N_PAD, NUM_BLOCKS, HEAD_DIM, LAYOUT_BLOCK,
                                                            BLOCK_M)
    q = tl.load(_rows(Q, base, offs_m, offs_d, HEAD_DIM))
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for e in range(start, end):
        key_block = tl.load(COL_IDX + e)
        for n0 in tl.static_range(0, LAYOUT_BLOCK, BLOCK_N):
            offs_n = key_block * LAYOUT_BLOCK + n0 + tl.arange(0, BLOCK_N)
            k = tl.load(_rows(K, base, offs_n, offs_d, HEAD_DIM))
            v = tl.load(_rows(V, base, offs_n, offs_d, HEAD_DIM))
            s, rel = _scores(q, k, offs_m, offs_n, bh, b, QP, KP, REL_TABLE, KEY_VALID, N_PAD, TWO_S, TABLE_OFFSET,
                             HAS_C2P, HAS_P2C, INPUT_PRECISION)
            # Online softmax; a row that has seen only padding keeps m = -inf and contributes nothing.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)  # the denominator counts every probability, dropped or not
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, bh, offs_m, offs_n, N_PAD, dropout_p)
                p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
            m_i = m_new
    has_any = l_i > 0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    tl.store(_rows(OUT, base, offs_m, offs_d, HEAD_DIM), out.to(OUT.dtype.element_ty))
    lse = tl.where(has_any, m_i + tl.log(tl.where(has_any, l_i, 1.0)), 0.0)
    tl.store(LSE + bh * N_PAD + offs_m, lse)


# --------------------------------------------------------------------------------------------------------------
# Backward: dq (+ d qp) over the key lists, dk dv (+ d kp) over the transposed lists
# --------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed"])
def _bwd_dq_kernel(Q, K, V, QP, KP, REL_TABLE, KEY_VALID, ROW_PTR, COL_IDX, DO, LSE, DELTA, DQ, DQP,
                   H, N_PAD, NUM_BLOCKS, TWO_S, TABLE_OFFSET, seed, dropout_p,
                   HEAD_DIM: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, HAS_C2P: tl.constexpr,
                   HAS_P2C: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _check_tiles(LAYOUT_BLOCK, BLOCK_M, BLOCK_N)
    bh, b, offs_m, offs_d, base, start, end = _program_tile(ROW_PTR, H, N_PAD, NUM_BLOCKS, HEAD_DIM, LAYOUT_BLOCK,
                                                            BLOCK_M)
    q = tl.load(_rows(Q, base, offs_m, offs_d, HEAD_DIM))
    do = tl.load(_rows(DO, base, offs_m, offs_d, HEAD_DIM))
    lse = tl.load(LSE + bh * N_PAD + offs_m)
    delta = tl.load(DELTA + bh * N_PAD + offs_m)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for e in range(start, end):
        key_block = tl.load(COL_IDX + e)
        for n0 in tl.static_range(0, LAYOUT_BLOCK, BLOCK_N):
            offs_n = key_block * LAYOUT_BLOCK + n0 + tl.arange(0, BLOCK_N)
            k = tl.load(_rows(K, base, offs_n, offs_d, HEAD_DIM))
            v = tl.load(_rows(V, base, offs_n, offs_d, HEAD_DIM))
            s, rel = _scores(q, k, offs_m, offs_n, bh, b, QP, KP, REL_TABLE, KEY_VALID, N_PAD, TWO_S, TABLE_OFFSET,
                             HAS_C2P, HAS_P2C, INPUT_PRECISION)
            p = tl.exp(s - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION).to(tl.float32)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, bh, offs_m, offs_n, N_PAD, dropout_p)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
            if HAS_C2P:
                # Several keys of one row can share a bucket: accumulate with atomics.
                tl.atomic_add(_buckets(DQP, bh, offs_m[:, None], rel, N_PAD, TWO_S), ds)
    tl.store(_rows(DQ, base, offs_m, offs_d, HEAD_DIM), dq.to(DQ.dtype.element_ty))


@triton.jit(do_not_specialize=["seed"])
def _bwd_dkdv_kernel(Q, K, V, QP, KP, REL_TABLE, KEY_VALID, T_ROW_PTR, T_COL_IDX, DO, LSE, DELTA, DK, DV, DKP,
                     H, N_PAD, NUM_BLOCKS, TWO_S, TABLE_OFFSET, seed, dropout_p,
                     HEAD_DIM: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, HAS_C2P: tl.constexpr,
                     HAS_P2C: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _check_tiles(LAYOUT_BLOCK, BLOCK_M, BLOCK_N)
    bh, b, offs_n, offs_d, base, start, end = _program_tile(T_ROW_PTR, H, N_PAD, NUM_BLOCKS, HEAD_DIM,
                                                            LAYOUT_BLOCK, BLOCK_N)
    k = tl.load(_rows(K, base, offs_n, offs_d, HEAD_DIM))
    v = tl.load(_rows(V, base, offs_n, offs_d, HEAD_DIM))
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for e in range(start, end):
        query_block = tl.load(T_COL_IDX + e)
        for m0 in tl.static_range(0, LAYOUT_BLOCK, BLOCK_M):
            offs_m = query_block * LAYOUT_BLOCK + m0 + tl.arange(0, BLOCK_M)
            q = tl.load(_rows(Q, base, offs_m, offs_d, HEAD_DIM))
            do = tl.load(_rows(DO, base, offs_m, offs_d, HEAD_DIM))
            lse = tl.load(LSE + bh * N_PAD + offs_m)
            delta = tl.load(DELTA + bh * N_PAD + offs_m)
            s, rel = _scores(q, k, offs_m, offs_n, bh, b, QP, KP, REL_TABLE, KEY_VALID, N_PAD, TWO_S, TABLE_OFFSET,
                             HAS_C2P, HAS_P2C, INPUT_PRECISION)
            p = tl.exp(s - lse[:, None])  # [BLOCK_M, BLOCK_N]
            dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION).to(tl.float32)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, bh, offs_m, offs_n, N_PAD, dropout_p)
                dv += tl.dot(tl.trans(tl.where(keep, p / (1.0 - dropout_p), 0.0)).to(do.dtype), do,
                             input_precision=INPUT_PRECISION)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            else:
                dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=INPUT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=INPUT_PRECISION)
            if HAS_P2C:
                tl.atomic_add(_buckets(DKP, bh, offs_n[None, :], rel, N_PAD, TWO_S), ds)
    tl.store(_rows(DK, base, offs_n, offs_d, HEAD_DIM), dk.to(DK.dtype.element_ty))
    tl.store(_rows(DV, base, offs_n, offs_d, HEAD_DIM), dv.to(DV.dtype.element_ty))


_fwd_tuned = _autotune(_fwd_kernel, "forward")
# The backward kernels accumulate with atomics: autotuning would run them repeatedly on the same buffers, so
# the tuner must reset what they add into before every trial.
_dq_tuned = _autotune(_bwd_dq_kernel, "backward_dq", reset_to_zero=["DQP"])
_dkdv_tuned = _autotune(_bwd_dkdv_kernel, "backward_dkdv", reset_to_zero=["DKP"])


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------
def _interpreter_tiles(layout_block: int) -> dict:
    # The interpreter runs every autotune trial in Python: use one tile choice there.
    tile = min(layout_block, 32)
    return {"BLOCK_M": tile, "BLOCK_N": tile}


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for q, k, v of `dtype`: "ieee" for each.

    float32 is the exactness path (held to a float64 reference within twice float32 PyTorch's error): TF32 would
    round its inputs to 10 mantissa bits and miss that budget. 16-bit products are exact in the float32 accumulator
    whatever is asked, and "ieee" is the one setting every Triton backend accepts (AMD's takes "tf32" only on
    gfx942, so asking it of 16-bit inputs failed to compile there).
    """
    return "ieee"


def _dummy(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else torch.empty(1, dtype=like.dtype, device=like.device)


def check_supported(head_dim: int, layout_block: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} is not supported by the Triton kernels (supported: "
                         f"{SUPPORTED_HEAD_DIMS}); use attention_backend='blocked'.")
    if layout_block not in SUPPORTED_LAYOUT_BLOCKS:
        raise ValueError(f"block_size {layout_block} is not supported by the Triton kernels (supported: "
                         f"{SUPPORTED_LAYOUT_BLOCKS}); use attention_backend='blocked'.")


def block_sparse_forward(q, k, v, qp, kp, rel_table, key_valid, row_ptr, col_idx, layout_block: int,
                         dropout_p: float = 0.0, seed: int = 0):
    """out [B, H, Np, D] (q's dtype) and lse [B, H, Np] float32."""
    B, H, Np, D = q.shape
    check_supported(D, layout_block)
    nb = Np // layout_block
    out = torch.empty_like(q)
    lse = torch.empty(B, H, Np, dtype=torch.float32, device=q.device)
    two_s = (qp if qp is not None else kp).shape[-1] if (qp is not None or kp is not None) else 1
    args = (q, k, v, _dummy(qp, q), _dummy(kp, q), rel_table, key_valid, row_ptr, col_idx, out, lse,
            H, Np, nb, two_s, (rel_table.numel() + 1) // 2 - 1, seed, dropout_p)
    consts = dict(HEAD_DIM=D, LAYOUT_BLOCK=layout_block, HAS_C2P=qp is not None, HAS_P2C=kp is not None,
                  HAS_DROPOUT=dropout_p > 0, INPUT_PRECISION=input_precision(q.dtype))
    if interpreting():
        tiles = _interpreter_tiles(layout_block)
        _fwd_kernel[(Np // tiles["BLOCK_M"], B * H)](*args, **consts, **tiles)
    else:
        _fwd_tuned[lambda meta: (Np // meta["BLOCK_M"], B * H)](*args, **consts)
    return out, lse


def block_sparse_backward(do, q, k, v, qp, kp, out, lse, rel_table, key_valid, row_ptr, col_idx, t_row_ptr,
                          t_col_idx, layout_block: int, dropout_p: float = 0.0, seed: int = 0):
    """dq, dk, dv (inputs' dtype) and d qp, d kp (float32, or None)."""
    B, H, Np, D = q.shape
    nb = Np // layout_block
    do = do.contiguous()
    delta = (do.float() * out.float()).sum(-1)  # [B, H, Np]: rowsum(dO * O), the softmax backward's correction
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dqp = torch.zeros(qp.shape, dtype=torch.float32, device=q.device) if qp is not None else None
    dkp = torch.zeros(kp.shape, dtype=torch.float32, device=q.device) if kp is not None else None
    two_s = (qp if qp is not None else kp).shape[-1] if (qp is not None or kp is not None) else 1
    table_offset = (rel_table.numel() + 1) // 2 - 1
    common = (q, k, v, _dummy(qp, q), _dummy(kp, q), rel_table, key_valid)
    sizes = (H, Np, nb, two_s, table_offset, seed, dropout_p)
    consts = dict(HEAD_DIM=D, LAYOUT_BLOCK=layout_block, HAS_C2P=qp is not None, HAS_P2C=kp is not None,
                  HAS_DROPOUT=dropout_p > 0, INPUT_PRECISION=input_precision(q.dtype))
    f32 = torch.empty(1, dtype=torch.float32, device=q.device)
    dq_args = common + (row_ptr, col_idx, do, lse, delta, dq, dqp if dqp is not None else f32) + sizes
    dkdv_args = common + (t_row_ptr, t_col_idx, do, lse, delta, dk, dv, dkp if dkp is not None else f32) + sizes
    if interpreting():
        tiles = _interpreter_tiles(layout_block)
        _bwd_dq_kernel[(Np // tiles["BLOCK_M"], B * H)](*dq_args, **consts, **tiles)
        _bwd_dkdv_kernel[(Np // tiles["BLOCK_N"], B * H)](*dkdv_args, **consts, **tiles)
    else:
        _dq_tuned[lambda meta: (Np // meta["BLOCK_M"], B * H)](*dq_args, **consts)
        _dkdv_tuned[lambda meta: (Np // meta["BLOCK_N"], B * H)](*dkdv_args, **consts)
    return dq, dk, dv, dqp, dkp


def dropout_keep_mask(batch_heads: int, n_pad: int, dropout_p: float, seed: int, device) -> torch.Tensor:
    """[batch*heads, Np, Np] bool: the keep mask the kernels use for (seed, dropout_p). For tests (dense!)."""
    block = 16
    keep = torch.empty(batch_heads, n_pad, n_pad, dtype=torch.int8, device=device)
    _dropout_mask_kernel[(n_pad // block, batch_heads)](keep, seed, dropout_p, n_pad, BLOCK=block)
    return keep.bool()


KERNELS = {"forward": _fwd_kernel, "backward_dq": _bwd_dq_kernel, "backward_dkdv": _bwd_dkdv_kernel}
