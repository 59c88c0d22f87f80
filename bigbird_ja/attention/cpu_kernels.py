"""The relative terms of block-sparse scores on CPU as one torch op: `torch.ops.bigbird_ja.relative_terms`.

Shapes: P planes (batch row x head), H heads, Np padded tokens, R = 2S relative buckets, T rows of kp (with its
halo), bs block size, nq query blocks, K key-block slots per query block, hw halo blocks.

The native part, csrc/relative_terms.c (plain C, no torch headers), is built by `pip install` (setup.py) into this
folder as `_relative_terms*.so` and loaded with ctypes; nothing is compiled or written at run time. Its two entry
points are registered as torch ops with fake implementations, and the backward one as the forward's autograd formula,
so torch.compile and torch.export see each as a single op. The C code splits its work over torch.get_num_threads()
threads while the calling thread waits in ctypes (which releases the GIL): torch's own OpenMP team where torch runs
on OpenMP (`use_torch_threads`: the runtime's entry points are handed to the library at load; it links none of its
own), else pthreads of its own (csrc/threads.c).

Where the library is absent (no C compiler at install, BIGBIRD_JA_NO_NATIVE=1 at install, a model folder's
remote-code copy) or switched off (BIGBIRD_JA_CPU_KERNELS=0), `relative_terms()` returns None and blocked.py takes its
pure-PyTorch reads, which are this op's reference; which path is active is logged once, at import.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
import os
import struct
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

NATIVE_STEM = "_relative_terms"  # setup.py's Extension "bigbird_ja.attention._relative_terms"
SUFFIXES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}


def library_path() -> Path | None:
    """The library `pip install` built beside this file (any of this Python's extension suffixes), or None."""
    folder = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (folder / (NATIVE_STEM + suffix)).is_file():
            return folder / (NATIVE_STEM + suffix)
    return None


def enabled() -> bool:
    return os.environ.get("BIGBIRD_JA_CPU_KERNELS", "1") != "0"


def _require(condition: bool, what: str) -> None:
    # not an assert: the C code trusts these, and asserts vanish under python -O
    if not condition:
        raise ValueError(f"bigbird_ja CPU kernel: {what}")


def check_complete(path: Path) -> None:
    """Raise OSError unless the ELF file at `path` holds every byte its headers point to. The dynamic loader maps a
    cut-off library (a full disk during the install, a partial copy) without complaint, and the process then dies with
    SIGBUS on the first page past the end: no Python error, nothing to catch. Other formats are left to the loader."""
    data = path.read_bytes()
    if sys.platform.startswith("linux") and data[:4] != b"\x7fELF":
        raise OSError(f"not an ELF shared library ({len(data)} bytes)")
    if data[:4] != b"\x7fELF" or len(data) < 64 or data[4] != 2:  # not a 64-bit ELF: the loader checks it
        return
    order = "<" if data[5] == 1 else ">"
    phoff, shoff = struct.unpack_from(order + "QQ", data, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", data, 54)
    needed = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    if needed <= len(data):
        for n in range(phnum):
            offset, filesz = struct.unpack_from(order + "Q16xQ", data, phoff + n * phentsize + 8)
            needed = max(needed, offset + filesz)
    if needed > len(data):
        raise OSError(f"the file is cut off: {len(data)} bytes, its headers need {needed}")


THREADS_ENV = "BIGBIRD_JA_CPU_THREADS"  # "torch" (default): torch's OpenMP team where there is one; "pthreads"
OPENMP_ENTRY_POINTS = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")


def torch_openmp_entry_points() -> tuple[ctypes.c_void_p, ...] | None:
    """The entry points (OPENMP_ENTRY_POINTS) of the OpenMP runtime torch's intra-op pool runs on, or None where torch
    is not on OpenMP or they are not in the process's global symbols (Linux wheels load their libgomp globally;
    Intel's and LLVM's runtimes export the same GNU entry points)."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        process = ctypes.CDLL(None)
        return tuple(ctypes.cast(getattr(process, name), ctypes.c_void_p) for name in OPENMP_ENTRY_POINTS)
    except (AttributeError, OSError, TypeError):  # not exported globally; no process handle (Windows)
        return None


def use_torch_threads(lib) -> bool:
    """Make the native library run its shares on torch's own OpenMP team (True) or on pthreads of its own (False:
    torch not on OpenMP, or BIGBIRD_JA_CPU_THREADS=pthreads). Threads of its own share the cores with torch's workers,
    which spin for a while after each torch op: right after a matmul a kernel call took 2.4x its idle time on 2 cores
    (benchmarks/bench_kernel_threads.py). One library, one setting: the relative terms and the dropout share it."""
    lib.bbja_use_openmp.argtypes = [ctypes.c_void_p] * 3
    lib.bbja_use_openmp.restype = ctypes.c_int
    points = None if os.environ.get(THREADS_ENV, "torch") == "pthreads" else torch_openmp_entry_points()
    return bool(lib.bbja_use_openmp(*(points or (None, None, None))))


class RelativeTermsKernel:
    """ctypes bindings of csrc/relative_terms.c (see its header for what the two functions compute)."""

    def __init__(self, path: Path):
        self.path = path
        check_complete(path)
        lib = ctypes.CDLL(str(path))
        self.uses_torch_threads = use_torch_threads(lib)
        args = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 12
        self._functions = {}
        for direction in ("forward", "backward"):
            for dtype, suffix in SUFFIXES.items():
                fn = getattr(lib, f"bbja_terms_{direction}_{suffix}")
                # the backward's extra int: zero the gradients first; the last: the number of threads
                fn.argtypes = args + [ctypes.c_int] * (2 if direction == "backward" else 1)
                fn.restype = ctypes.c_int
                self._functions[direction, dtype] = fn

    @staticmethod
    def _pointer(t: torch.Tensor | None):
        return None if t is None else ctypes.c_void_p(t.data_ptr())

    def _call(self, direction, tiles, q_side, k_side, table, kblocks, H, q_block0, bs, hw, zero=False):
        """tiles [P, nq, bs, K*bs]: the terms (forward: written) or their gradient (backward: read); q_side [P, Np, R]
        and k_side [P, T, R]: qp / kp (forward: read) or their gradients (backward: accumulated), either None."""
        side = q_side if q_side is not None else k_side
        _require(side is not None, "qp and kp (or their gradients) both None: nothing to read or write")
        for t in (tiles, q_side, k_side):
            _require(t is None or (t.is_contiguous() and t.dtype == tiles.dtype and t.device.type == "cpu"),
                     "qp, kp and the terms (or their gradients): contiguous CPU tensors of one dtype")
        kblocks_3d = kblocks if kblocks.dim() == 3 else kblocks.view(1, *kblocks.shape)
        _require(kblocks_3d.stride(-1) == 1 and table.is_contiguous() and table.dtype == kblocks.dtype == torch.int64
                 and table.device.type == kblocks.device.type == "cpu",
                 "table and kblocks: int64 on CPU, rows contiguous")
        kb_sh = kblocks_3d.stride(0) if kblocks_3d.shape[0] > 1 else 0
        kb_sn = kblocks_3d.stride(1) if kblocks_3d.shape[1] > 1 else 0
        # every bound the C code relies on (it reads and writes where these say, unchecked)
        P, nq, K = tiles.shape[0], tiles.shape[1], tiles.shape[-1] // bs
        Np, R = table.numel() // 2 + 1, side.shape[-1]
        T = 0 if k_side is None else k_side.shape[-2]
        nb = Np // bs
        _require(Np % bs == 0 and tiles.dim() == 4 and tuple(tiles.shape) == (P, nq, bs, K * bs) and P % H == 0,
                 f"tiles {tuple(tiles.shape)}: [B*H, query blocks, {bs}, K*{bs}] with H = {H}")
        _require(0 <= q_block0 and q_block0 + nq <= nb, f"query blocks {q_block0}..{q_block0 + nq} of {nb}")
        _require(kblocks_3d.shape[0] in (1, H) and kblocks_3d.shape[1] in (1, nq) and kblocks_3d.shape[2] == K,
                 f"kblocks {tuple(kblocks.shape)} for {H} heads, {nq} query blocks, {K} slots")
        _require(kblocks.numel() == 0 or (int(kblocks.min()) >= 0 and int(kblocks.max()) < nb),
                 f"key blocks outside 0..{nb - 1}")
        _require(int(table.min()) >= 0 and int(table.max()) < R, f"deltas outside 0..{R - 1}")
        _require(q_side is None or tuple(q_side.shape) == (P, Np, R), f"qp: [{P}, {Np}, {R}]")
        _require(k_side is None or (k_side.dim() == 3 and k_side.shape[0] == P and k_side.shape[2] == R
                                    and T >= (nb + 2 * hw) * bs), f"kp: [{P}, >= {(nb + 2 * hw) * bs}, {R}]")
        # the C functions take (qp, kp, out) forward and (grad, gqp, gkp) backward
        tensors = (q_side, k_side, tiles) if direction == "forward" else (tiles, q_side, k_side)
        flags = () if direction == "forward" else (int(zero),)
        status = self._functions[direction, tiles.dtype](
            *[self._pointer(t) for t in tensors], self._pointer(table), self._pointer(kblocks_3d),
            P, H, nq, q_block0, K, bs, R, Np, T, hw, kb_sh, kb_sn, *flags, torch.get_num_threads())
        if status != 0:
            raise MemoryError("bigbird_ja CPU kernel: out of memory for its thread list")

    def forward(self, qp, kp, out, table, kblocks, *, H, q_block0, bs, hw):
        """out [P, nq, bs, K*bs] (contiguous) = the terms of query blocks q_block0.. against kblocks [h|1, nq|1, K]
        (h: head; size 1: the same for every head or row); qp [P, Np, R] or None, kp [P, T, R] or None."""
        self._call("forward", out, qp, kp, table, kblocks, H, q_block0, bs, hw)

    def backward(self, grad, gqp, gkp, table, kblocks, *, H, q_block0, bs, hw, zero=False):
        """gqp / gkp (contiguous, either None) += the gradient of forward's reads; zero: their contents are
        ignored (overwritten: each plane zeroed by the thread that then adds into it)."""
        self._call("backward", grad.contiguous(), gqp, gkp, table, kblocks, H, q_block0, bs, hw, zero)


def _register_ops(kernel: RelativeTermsKernel):
    """torch.ops.bigbird_ja.relative_terms and its backward, with fake (shape-only) implementations; the backward
    is the forward's autograd formula. Registered once per process (the names are process-wide)."""
    if hasattr(torch.ops.bigbird_ja, "relative_terms"):
        return torch.ops.bigbird_ja.relative_terms.default

    @torch.library.custom_op("bigbird_ja::relative_terms", mutates_args=(), device_types="cpu")
    def relative_terms_op(qp: torch.Tensor | None, kp: torch.Tensor | None, table: torch.Tensor,
                          kblocks: torch.Tensor, H: int, nq: int, q_block0: int, bs: int, hw: int) -> torch.Tensor:
        """terms [P*nq, bs, K*bs] of query blocks q_block0.. (row n of plane p: p*nq + n) against kblocks
        [H|1, nq|1, K]; qp [P, Np, R] or None, kp [P, T, R] or None; table [2Np - 1]: delta at distance d is entry
        d + Np - 1."""
        side = qp if qp is not None else kp
        out = side.new_empty(side.shape[0] * nq, bs, kblocks.shape[-1] * bs)
        return _forward_into(kernel, out, qp, kp, table, kblocks, H, nq, q_block0, bs, hw)

    @relative_terms_op.register_fake
    def _(qp, kp, table, kblocks, H, nq, q_block0, bs, hw):
        side = qp if qp is not None else kp
        return side.new_empty(side.shape[0] * nq, bs, kblocks.shape[-1] * bs)

    @torch.library.custom_op("bigbird_ja::relative_terms_backward", mutates_args=(), device_types="cpu")
    def relative_terms_backward_op(grad: torch.Tensor, table: torch.Tensor, kblocks: torch.Tensor, H: int,
                                   nq: int, q_block0: int, bs: int, hw: int, Np: int, T: int, R: int, want_qp: bool,
                                   want_kp: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients of qp [P, Np, R] and kp [P, T, R] (empty where not wanted) from the terms' grad [P*nq, bs,
        K*bs]."""
        gqp, gkp = _backward_buffers(grad, nq, Np, T, R, want_qp, want_kp, torch.empty)
        _backward_into(kernel, grad, gqp if want_qp else None, gkp if want_kp else None, table, kblocks, H, nq,
                       q_block0, bs, hw, zero=True)
        return gqp, gkp

    @relative_terms_backward_op.register_fake
    def _(grad, table, kblocks, H, nq, q_block0, bs, hw, Np, T, R, want_qp, want_kp):
        return _backward_buffers(grad, nq, Np, T, R, want_qp, want_kp, torch.empty)

    def setup_context(ctx, inputs, output):
        qp, kp, table, kblocks, H, nq, q_block0, bs, hw = inputs
        side = qp if qp is not None else kp
        ctx.save_for_backward(table, kblocks)
        ctx.args = (H, nq, q_block0, bs, hw, table.shape[0] // 2 + 1, 0 if kp is None else kp.shape[1], side.shape[-1])
        ctx.present = (qp is not None, kp is not None)

    def backward(ctx, grad):
        table, kblocks = ctx.saved_tensors
        want_qp = ctx.present[0] and ctx.needs_input_grad[0]
        want_kp = ctx.present[1] and ctx.needs_input_grad[1]
        gqp, gkp = torch.ops.bigbird_ja.relative_terms_backward(grad, table, kblocks, *ctx.args, want_qp, want_kp)
        return gqp if want_qp else None, gkp if want_kp else None, None, None, None, None, None, None, None

    relative_terms_op.register_autograd(backward, setup_context=setup_context)
    return torch.ops.bigbird_ja.relative_terms.default


def _forward_into(kernel, out, qp, kp, table, kblocks, H, nq, q_block0, bs, hw):
    side = qp if qp is not None else kp
    P, K = side.shape[0], kblocks.shape[-1]
    kernel.forward(None if qp is None else qp.contiguous(), None if kp is None else kp.contiguous(),
                   out.view(P, nq, bs, K * bs), table.contiguous(), kblocks.contiguous(), H=H, q_block0=q_block0,
                   bs=bs, hw=hw)
    return out


def relative_terms_into(out, qp, kp, table, kblocks, H: int, nq: int, q_block0: int, bs: int, hw: int):
    """The op's forward written into `out` (contiguous [P*nq, bs, K*bs]; eager, no gradient: a workspace buffer
    instead of a freshly mapped tensor)."""
    return _forward_into(KERNEL, out, qp, kp, table, kblocks, H, nq, q_block0, bs, hw)


def _backward_into(kernel, grad, gqp, gkp, table, kblocks, H, nq, q_block0, bs, hw, zero=False):
    P = grad.shape[0] // nq
    kernel.backward(grad.contiguous().view(P, nq, bs, grad.shape[-1]), gqp, gkp, table.contiguous(),
                    kblocks.contiguous(), H=H, q_block0=q_block0, bs=bs, hw=hw, zero=zero)


def relative_terms_backward_into(grad, gqp, gkp, table, kblocks, H: int, nq: int, q_block0: int, bs: int, hw: int,
                                 zero: bool = False):
    """The op's backward added into gqp [P, Np, R] and gkp [P, T, R] (contiguous, either None) from the terms'
    gradient [P*nq, bs, K*bs]: for callers that sum several calls' gradients. zero: the first call, into fresh
    buffers (their contents ignored)."""
    _backward_into(KERNEL, grad, gqp, gkp, table, kblocks, H, nq, q_block0, bs, hw, zero)


def _backward_buffers(grad, nq, Np, T, R, want_qp, want_kp, make):
    P = grad.shape[0] // nq
    return (make(P if want_qp else 0, Np, R, dtype=grad.dtype, device=grad.device),
            make(P if want_kp else 0, T, R, dtype=grad.dtype, device=grad.device))


def _load() -> tuple[RelativeTermsKernel | None, str | None]:
    """(the kernel, None) where the library is here and loads; (None, why not) otherwise (why None: not expected)."""
    if not __name__.startswith("bigbird_ja."):  # a model folder's flat copy (hub.py): no library beside it
        return None, None
    path = library_path()
    if path is None:
        return None, ("it was not built at install (no C compiler then, or BIGBIRD_JA_NO_NATIVE=1); reinstall with "
                      "a C compiler on the PATH (pip install -e . in a checkout) for the fast one")
    try:
        return RelativeTermsKernel(path), None
    except (OSError, AttributeError) as error:  # not loadable here (another platform's build, a damaged file)
        return None, f"{path} does not load ({error}); reinstall bigbird-ja with a C compiler on the PATH"


KERNEL, _WHY_NOT = _load()
OP = None if KERNEL is None else _register_ops(KERNEL)
if OP is not None:
    logger.info("bigbird_ja: CPU attention reads its relative terms with the native op (%s, on %s)", KERNEL.path,
                "torch's OpenMP threads" if KERNEL.uses_torch_threads else "threads of its own")
elif _WHY_NOT is not None:
    logger.warning("bigbird_ja: CPU attention takes the slower pure-PyTorch reads of its relative terms: the native "
                   "op is absent, %s.", _WHY_NOT)


def relative_terms():
    """torch.ops.bigbird_ja.relative_terms.default, or None where the library is absent or BIGBIRD_JA_CPU_KERNELS=0."""
    return OP if enabled() else None


def supports(t: torch.Tensor) -> bool:
    """Whether the op can take tensors like t (CPU, float32, float64 or bfloat16, not meta)."""
    return t.device.type == "cpu" and t.dtype in SUFFIXES
