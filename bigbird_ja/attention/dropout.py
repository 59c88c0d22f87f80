"""Attention dropout from a counter-based hash: the keep mask is a pure function of (seed, plane, query token, key
token), computed where it is applied and computed again in the backward, so no mask is drawn, stored or read.

Shapes: B batch, H heads, P = B*H planes (plane = b*H + h), G row groups, R rows per group, C columns per row,
Hk key-position heads (1: the same key positions for every head; H: per head, as with random blocks).

The hash (all arithmetic on unsigned 32-bit words, mod 2**32):

    mix(x)   = x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16   ("lowbias32")
    lane L   in (A, B) with keys k_A = 0x243f6a88, k_B = 0x85a308d3 (two independent 32-bit row states, so two rows
             share a mask with probability 2**-64, not 2**-32)
    s_L      = mix(mix(seed_lo ^ k_L) ^ seed_hi)            seed_lo / seed_hi: the seed's low / high 32 bits
    t_L      = mix(s_L ^ plane)                             once per plane
    u_L      = mix(t_L ^ i)                                 once per row, i = the query token
    hash     = mix(u_A ^ j * (u_B | 1))                     once per element, j = the key token (mod 2**32)
    keep     = hash >= threshold,   threshold = min(floor(p * 2**32 + 1/2), 2**32 - 1)

and the output is probs * keep * (1 / (1 - p)) in probs' dtype (bf16 / fp16: the product in float32, rounded once),
exactly what `probs * keep * scale` gives in PyTorch (a dropped NaN stays NaN, as with F.dropout). Per element: one
multiply by the row's odd key (a bijection of j), one xor and one mix, all of which gcc vectorises.

Two implementations of the hash give the same bits: `keep_bits` below (int64 tensors masked to 32 bits; the spec,
and the path on other devices, for fp16, and without the native library) and csrc/dropout.c (built by `pip install`
into the same `_relative_terms*.so` as the relative terms; loaded with ctypes). `hashed_dropout` reaches either
through one op, torch.ops.bigbird_ja.hashed_dropout, with a fake implementation (torch.compile traces it) and an
autograd formula that applies the op again to the gradient (the op is linear in probs): only the seed, p and the
two small position tensors are kept for the backward. BIGBIRD_JA_CPU_KERNELS=0 selects the PyTorch hash.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .cpu_kernels import check_complete, enabled, library_path, use_torch_threads

MASK32 = 0xFFFFFFFF
MIX1, MIX2 = 0x7FEB352D, 0x846CA68B
LANE_KEYS = (0x243F6A88, 0x85A308D3)
SEED_LIMIT = 2 ** 62
# The PyTorch hash's elements at a time. CPU: below torch's parallel grain (32,768), so its ~20 ops a chunk run
# without a thread barrier each, on int64 temporaries that stay in L2; elsewhere: large, few kernel launches.
CHUNK_ELEMENTS = {"cpu": 1 << 14, "other": 1 << 22}
SOFTMAX_BACKWARD_DTYPES = (torch.float32, torch.float64)  # csrc/dropout.c's fused softmax + dropout backward


@dataclass(frozen=True)
class AttentionDropout:
    """Which probabilities one attention call drops: rate p and the seed of its hash (one seed per call, so layers
    and steps get different masks)."""

    p: float  # 0 < p < 1
    seed: int | torch.Tensor  # 0 <= seed < 2**62; a 0-d int64 CPU tensor when drawn inside torch.compile

    def __post_init__(self):
        if not 0.0 < self.p < 1.0:
            raise ValueError(f"AttentionDropout: p = {self.p} is outside (0, 1); for no dropout pass None instead "
                             f"(AttentionDropout.draw returns None for p = 0 or eval mode)")
        if torch.compiler.is_compiling():  # the seed may be symbolic (capture_scalar_outputs): no guard on it
            return
        if not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"AttentionDropout: seed = {self.seed!r} must be an int in [0, 2**62); draw one with "
                             f"AttentionDropout.draw(p, training)")

    @staticmethod
    def draw(p: float, training: bool) -> AttentionDropout | None:
        """None unless training and p > 0; else a seed drawn from torch's default CPU generator (torch.randint), so
        torch.manual_seed reproduces it and activation checkpointing (which restores the CPU RNG state) replays it."""
        if not training or p == 0.0:
            return None
        seed = torch.randint(0, SEED_LIMIT, (), dtype=torch.int64)
        # compiled: the seed stays a tensor (a graph input of the op), as an int its .item() would break the graph
        return AttentionDropout(float(p), seed if torch.compiler.is_compiling() else int(seed))

    def seed_tensor(self) -> torch.Tensor:
        """The seed as the op takes it: a 0-d int64 CPU tensor (read inside the op, never in the traced graph)."""
        if isinstance(self.seed, torch.Tensor):
            return self.seed
        return torch.tensor(self.seed, dtype=torch.int64)

    @property
    def threshold(self) -> int:
        """keep = hash >= threshold (a 32-bit hash: keeps a fraction 1 - p of the values up to 2**-32)."""
        return min(int(self.p * 2 ** 32 + 0.5), MASK32)

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.p)


def _lowbias32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * MIX1) & MASK32
    x ^= x >> 15
    x = (x * MIX2) & MASK32
    return x ^ (x >> 16)


def _signed(c):
    """c (int or int64 tensor in [0, 2**32)) as the same residue mod 2**32 in [-2**31, 2**31): times any x in
    [0, 2**32) the product stays inside int64 (no signed overflow to rely on), and & MASK32 gives x * c mod 2**32."""
    if isinstance(c, int):
        return c - 2 ** 32 if c >= 2 ** 31 else c
    return c - ((c >> 31) << 32)


MIX1_S, MIX2_S = _signed(MIX1), _signed(MIX2)


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of x (int64 in [0, 2**32)); in place where x is a temporary of the caller's."""
    x ^= x >> 16
    x *= MIX1_S
    x &= MASK32
    x ^= x >> 15
    x *= MIX2_S
    x &= MASK32
    x ^= x >> 16
    return x


def seed_states(seed: int) -> tuple[int, int]:
    """(s_A, s_B): the seed's state in each lane."""
    lo, hi = seed & MASK32, (seed >> 32) & MASK32
    return tuple(_lowbias32_int(_lowbias32_int(lo ^ key) ^ hi) for key in LANE_KEYS)


def row_keys(seed: int, planes: torch.Tensor, query_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u_A, u_B | 1) for planes [...] (int64) broadcast against query_pos [...] (int64): each row's two keys."""
    keys = []
    for s in seed_states(seed):
        t = _lowbias32((planes & MASK32) ^ s)
        keys.append(_lowbias32(t ^ (query_pos & MASK32)))
    return keys[0], keys[1] | 1


def keep_bits(seed: int, threshold: int, planes: torch.Tensor, query_pos: torch.Tensor,
              key_pos: torch.Tensor) -> torch.Tensor:
    """keep (bool) for planes, query_pos and key_pos broadcast together (planes and query_pos name the row, key_pos
    the column: put the column on the last dimension of key_pos only)."""
    a, b = row_keys(seed, planes, query_pos)
    x = (key_pos & MASK32) * _signed(b)  # j * b mod 2**32, once masked
    x &= MASK32
    x ^= a
    return _lowbias32(x) >= threshold


def _check(probs: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor) -> None:
    if probs.dim() != 5 or not probs.is_floating_point():
        raise ValueError(f"hashed_dropout: probs {tuple(probs.shape)} {probs.dtype} must be a floating [B, H, G, R, C] "
                         f"tensor (view dense rows [B, H, rows, Np] as [B, H, 1, rows, Np])")
    B, H, G, R, C = probs.shape
    if query_pos.dtype != torch.int64 or tuple(query_pos.shape) != (G, R):
        raise ValueError(f"hashed_dropout: query_pos {tuple(query_pos.shape)} {query_pos.dtype} must be int64 "
                         f"[G, R] = [{G}, {R}] (the token index of each row of probs)")
    if key_pos.dtype != torch.int64 or key_pos.dim() != 3 or key_pos.shape[0] not in (1, H) \
            or tuple(key_pos.shape[1:]) != (G, C):
        raise ValueError(f"hashed_dropout: key_pos {tuple(key_pos.shape)} {key_pos.dtype} must be int64 [Hk, G, C] "
                         f"with Hk 1 or {H} and [G, C] = [{G}, {C}] (the token index of each column)")
    if not probs.device == query_pos.device == key_pos.device:
        raise ValueError(f"hashed_dropout: probs ({probs.device}), query_pos ({query_pos.device}) and key_pos "
                         f"({key_pos.device}) must be on one device")


def dropout_reference(probs: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor, p: float,
                      seed: int) -> torch.Tensor:
    """The op in PyTorch (the native op's spec): contiguous probs * keep * scale, planes a chunk at a time."""
    drop = AttentionDropout(p, seed)
    B, H, G, R, C = probs.shape
    out = torch.empty(probs.shape, dtype=probs.dtype, device=probs.device)
    if out.numel() == 0:
        return out
    keys = key_pos.unsqueeze(2)  # [Hk, G, 1, C]
    rows = query_pos.unsqueeze(-1)  # [G, R, 1]
    # chunks of about CHUNK_ELEMENTS: several heads of small planes, or a few row groups of one large plane
    chunk = CHUNK_ELEMENTS["cpu" if probs.device.type == "cpu" else "other"]
    heads = max(1, min(H, chunk // max(1, G * R * C)))
    groups = G if heads > 1 else max(1, min(G, chunk // max(1, R * C)))
    for b in range(B):
        for h0 in range(0, H, heads):
            h1 = min(H, h0 + heads)
            planes = torch.arange(b * H + h0, b * H + h1, device=probs.device).view(-1, 1, 1, 1)
            for g0 in range(0, G, groups):
                g = slice(g0, min(G, g0 + groups))
                keep = keep_bits(seed, drop.threshold, planes, rows[g], keys[:, g] if keys.shape[0] == 1
                                 else keys[h0:h1, g])  # [h, g, R, C]
                torch.mul(probs[b, h0:h1, g] * keep, drop.scale, out=out[b, h0:h1, g])
    return out


class _Native:
    """ctypes bindings of csrc/dropout.c's bbja_dropout_{f32,f64,bf16}."""

    SUFFIXES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}

    def __init__(self, path):
        check_complete(path)  # a cut-off library would kill the process with SIGBUS inside dlopen
        lib = ctypes.CDLL(str(path))
        use_torch_threads(lib)  # the same library as the relative terms': one setting
        self.functions = {}
        for dtype, suffix in self.SUFFIXES.items():
            fn = getattr(lib, f"bbja_dropout_{suffix}")
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 11 + [ctypes.c_uint64, ctypes.c_uint32,
                                                                            ctypes.c_double, ctypes.c_int]
            fn.restype = ctypes.c_int
            self.functions[dtype] = fn
        self.backward_functions = {}
        for dtype in SOFTMAX_BACKWARD_DTYPES:
            fn = getattr(lib, f"bbja_softmax_dropout_backward_{self.SUFFIXES[dtype]}")
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6 + [ctypes.c_uint64, ctypes.c_uint32,
                                                                           ctypes.c_double, ctypes.c_int, ctypes.c_int]
            fn.restype = ctypes.c_int
            self.backward_functions[dtype] = fn

    def softmax_backward_(self, grad, probs, query_pos, key_pos, drop):
        """softmax_dropout_backward_ in C (grad, probs contiguous float32 / float64 of one shape)."""
        B, H, G, R, C = grad.shape
        if grad.numel() == 0:
            return grad
        positions, key_heads = (None, None), 1
        if drop is not None:
            query_pos, key_pos = query_pos.contiguous(), key_pos.contiguous()
            positions = ctypes.c_void_p(query_pos.data_ptr()), ctypes.c_void_p(key_pos.data_ptr())
            key_heads = key_pos.shape[0]
        status = self.backward_functions[grad.dtype](
            ctypes.c_void_p(grad.data_ptr()), ctypes.c_void_p(probs.data_ptr()), *positions, B, H, G, R, C,
            key_heads, 0 if drop is None else drop.seed, 0 if drop is None else drop.threshold,
            1.0 if drop is None else drop.scale, drop is not None, torch.get_num_threads())
        if status != 0:
            raise MemoryError("bigbird_ja softmax backward: out of memory for its thread list")
        return grad

    def __call__(self, probs, query_pos, key_pos, p, seed, out=None):
        drop = AttentionDropout(p, seed)
        B, H, G, R, C = probs.shape
        out = torch.empty(probs.shape, dtype=probs.dtype) if out is None else out  # out: contiguous, probs' shape
        if out.numel() == 0:
            return out
        query_pos, key_pos = query_pos.contiguous(), key_pos.contiguous()
        status = self.functions[probs.dtype](
            ctypes.c_void_p(probs.data_ptr()), ctypes.c_void_p(out.data_ptr()),
            ctypes.c_void_p(query_pos.data_ptr()), ctypes.c_void_p(key_pos.data_ptr()),
            B, H, G, R, C, key_pos.shape[0], *probs.stride(), drop.seed, drop.threshold, drop.scale,
            torch.get_num_threads())
        if status != 0:
            raise MemoryError("bigbird_ja hashed dropout: out of memory for its thread list")
        return out


def _load_native() -> tuple[_Native | None, str | None]:
    if not __name__.startswith("bigbird_ja."):  # a model folder's flat copy (hub.py): no library beside it
        return None, None
    path = library_path()
    if path is None:
        return None, "the native library was not built at install"
    try:
        return _Native(path), None
    except (OSError, AttributeError) as error:  # a library from before dropout.c, another platform's build
        return None, f"{path} has no hashed dropout ({error}); reinstall bigbird-ja (pip install -e .)"


NATIVE, _NATIVE_WHY_NOT = _load_native()
if NATIVE is None and _NATIVE_WHY_NOT is not None:
    logging.getLogger(__name__).warning("bigbird_ja: attention dropout takes the slower PyTorch hash: %s.",
                                        _NATIVE_WHY_NOT)


def softmax_dropout_backward_(grad: torch.Tensor, probs: torch.Tensor, query_pos: torch.Tensor | None,
                              key_pos: torch.Tensor | None, drop: AttentionDropout | None) -> torch.Tensor:
    """The backward of `hashed_dropout(softmax(scores), query_pos, key_pos, drop)` (drop None: of the softmax
    alone, and the positions may be None), written into grad: grad [B, H, G, R, C] holds the gradient of the dropped
    probabilities and is overwritten with that of the scores; probs (the softmax's output) has its shape. One pass
    per row on CPU with the native library (float32 / float64, both contiguous); elsewhere the same steps in PyTorch.
    For callers that own grad's buffer (blocked_slots.SlotAttention)."""
    if drop is not None:
        _check(grad, query_pos, key_pos)
    if (native_supports(grad) and grad.dtype in SOFTMAX_BACKWARD_DTYPES and probs.dtype == grad.dtype
            and grad.is_contiguous() and probs.is_contiguous() and probs.shape == grad.shape):
        return NATIVE.softmax_backward_(grad, probs, query_pos, key_pos, drop)
    if drop is not None:
        grad.copy_(dropout_reference(grad, query_pos, key_pos, drop.p, int(drop.seed)))
    dot = torch.linalg.vecdot(grad, probs, dim=-1).unsqueeze(-1)
    return grad.sub_(dot).mul_(probs)


def native_supports(probs: torch.Tensor) -> bool:
    """Whether the native op takes probs now (library loaded and enabled, CPU, float32 / float64 / bfloat16)."""
    return NATIVE is not None and enabled() and probs.device.type == "cpu" and probs.dtype in _Native.SUFFIXES


def _register_op():
    """torch.ops.bigbird_ja.hashed_dropout, on every device (the PyTorch hash where the native one does not run),
    with a fake implementation and its autograd formula. Registered once per process (the name is process-wide)."""
    if hasattr(torch.ops.bigbird_ja, "hashed_dropout"):
        return torch.ops.bigbird_ja.hashed_dropout.default

    @torch.library.custom_op("bigbird_ja::hashed_dropout", mutates_args=())
    def hashed_dropout_op(probs: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor, p: float,
                          seed: torch.Tensor) -> torch.Tensor:
        """Contiguous probs * keep * 1 / (1 - p); see bigbird_ja/attention/dropout.py for keep. seed: 0-d int64
        on the CPU (a tensor, so torch.compile passes a seed drawn in the graph without a graph break)."""
        if native_supports(probs):
            return NATIVE(probs, query_pos, key_pos, p, int(seed))
        return dropout_reference(probs, query_pos, key_pos, p, int(seed))

    @hashed_dropout_op.register_fake
    def _(probs, query_pos, key_pos, p, seed):
        return probs.new_empty(probs.shape)

    def setup_context(ctx, inputs, output):
        _, query_pos, key_pos, ctx.p, seed = inputs
        ctx.save_for_backward(query_pos, key_pos, seed)  # inputs: kept alive, not copied

    def backward(ctx, grad):
        query_pos, key_pos, seed = ctx.saved_tensors
        # linear in probs: the gradient goes through the same mask and scale, regenerated
        return torch.ops.bigbird_ja.hashed_dropout(grad, query_pos, key_pos, ctx.p, seed), None, None, None, None

    hashed_dropout_op.register_autograd(backward, setup_context=setup_context)
    return torch.ops.bigbird_ja.hashed_dropout.default


DROPOUT_OP = _register_op()


def hashed_dropout(probs: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor,
                   drop: AttentionDropout) -> torch.Tensor:
    """probs [B, H, G, R, C] float (fp32/fp64/bf16/fp16; any strides); query_pos int64 [G, R]: token index of each
    row; key_pos int64 [Hk, G, C], Hk in (1, H): token index of each column (head-dependent for random blocks).
    Returns probs * keep / (1 - p) (contiguous), keep[b,h,g,r,c] = the hash's keep bit for (seed, b*H + h,
    query_pos[g,r], key_pos[h|0,g,c]). Differentiable: grad_in = grad_out * keep / (1 - p), keep regenerated.
    Nothing but the seed is saved (and the two position tensors, which the caller holds anyway)."""
    _check(probs, query_pos, key_pos)
    return DROPOUT_OP(probs, query_pos, key_pos, drop.p, drop.seed_tensor())


def _memory_overlaps(out: torch.Tensor, probs: torch.Tensor) -> bool:
    """Whether contiguous `out` and (possibly strided) `probs` touch a common byte: their address ranges meet. Meta
    tensors (the planner's counting runs) have no memory: they never do."""
    if out.numel() == 0 or probs.numel() == 0 or "meta" in (out.device.type, probs.device.type):
        return False
    size = probs.element_size()
    probs_end = probs.data_ptr() + (1 + sum((n - 1) * s for n, s in zip(probs.shape, probs.stride()))) * size
    out_end = out.data_ptr() + out.numel() * out.element_size()
    return probs.data_ptr() < out_end and out.data_ptr() < probs_end


def hashed_dropout_into(out: torch.Tensor, probs: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor,
                        drop: AttentionDropout) -> torch.Tensor:
    """hashed_dropout's values written into `out` (contiguous, probs' shape and dtype; not probs itself), without
    autograd: for callers that own their buffers and their backward (blocked_slots.SlotAttention)."""
    _check(probs, query_pos, key_pos)
    if not (out.is_contiguous() and out.shape == probs.shape and out.dtype == probs.dtype):
        raise ValueError(f"hashed_dropout_into: out {tuple(out.shape)} {out.dtype} must be contiguous, "
                         f"{tuple(probs.shape)} {probs.dtype}")
    if _memory_overlaps(out, probs):
        # the native pass takes its input and output as restrict (not aliased), and the PyTorch one reads probs whole
        raise ValueError("hashed_dropout_into: out shares memory with probs; pass a separate buffer "
                         "(or use hashed_dropout)")
    if native_supports(probs):
        return NATIVE(probs, query_pos, key_pos, drop.p, int(drop.seed), out=out)
    return out.copy_(dropout_reference(probs, query_pos, key_pos, drop.p, int(drop.seed)))


def keep_mask(drop: AttentionDropout, batch: int, heads: int, n: int) -> torch.Tensor:
    """[B, H, n, n] bool: the keep mask over every (query, key) pair of n tokens. Dense: for tests."""
    planes = torch.arange(batch * heads).view(batch, heads, 1, 1)
    positions = torch.arange(n)
    return keep_bits(int(drop.seed), drop.threshold, planes, positions[:, None], positions)


class HashedDropout(torch.nn.Module):
    """nn.Dropout(p) for hidden states [..., rows, features], its keep mask from the same hash as the attention's:
    plane = the index over the leading dims, query token = the row, key token = the feature, a fresh seed per call
    from torch's CPU generator (so torch.manual_seed reproduces it and activation checkpointing replays it). On CPU
    with the native library this is one pass each way and nothing is saved, where torch's dropout draws a Bernoulli
    mask (about 5 ms per [1024, 768] call on 2 cores, against about 0.4 ms for the hash), keeps it and multiplies
    twice. Elsewhere (GPU, fp16, traced graphs, BIGBIRD_JA_CPU_KERNELS=0, no library) it is F.dropout,
    whose generator is the device's own."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"HashedDropout: p = {p} must be in [0, 1] (hidden_dropout_prob)")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if (self.p == 1.0 or x.dim() < 2 or x.numel() == 0 or torch.compiler.is_compiling()
                or not native_supports(x)):
            return F.dropout(x, self.p, True)
        rows, features = x.shape[-2:]
        planes = x.numel() // (rows * features)
        query_pos = torch.arange(rows).view(1, rows)
        key_pos = torch.arange(features).view(1, 1, features)
        drop = AttentionDropout.draw(self.p, True)
        return hashed_dropout(x.reshape(planes, 1, 1, rows, features), query_pos, key_pos, drop).view(x.shape)

    def extra_repr(self) -> str:
        return f"p={self.p}"
