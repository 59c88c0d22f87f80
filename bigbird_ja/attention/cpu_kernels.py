"""CPU kernels in C for what PyTorch ops do slowly: the relative terms of block-sparse scores (csrc/relative_terms.c).

Built on first use with the system's C compiler (about a second: plain C with OpenMP, or pthreads where the compiler
has none; no torch headers), cached per source, compiler and machine under $BIGBIRD_JA_CACHE (default
~/.cache/bigbird_ja) and loaded with ctypes, as DeepSpeed builds its CPU ops. Without a compiler, or with
BIGBIRD_JA_CPU_KERNELS=0, `relative_terms()` returns None and the blocked backend takes its pure-PyTorch reads (the
same function, slower). A failed build is logged once.

A cached library is loaded only when its size and sha256 match the record written beside it after it (a cut-short or
altered library would kill the process with a Bus error or an Illegal instruction inside ctypes, not raise); any
other is rebuilt with a warning. A build that leaves no loadable library is never cached.

The pure-PyTorch reads in blocked.py are this kernel's reference; tests compare both with the dense reference in
float64.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "relative_terms.c"
FLAGS = ["-O3", "-fPIC", "-shared", "-pthread"]
# tried first: with OpenMP the kernel shares torch's thread pool (see the C source); without, it starts pthreads
OPENMP_FLAGS = ["-fopenmp"]
SUFFIXES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}

_lock = threading.Lock()
_loaded: dict = {}  # "library": the RelativeTermsKernel or None, once tried


def cache_dir() -> Path:
    root = os.environ.get("BIGBIRD_JA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "bigbird_ja")
    return Path(root) / "cpu_kernels"


def enabled() -> bool:
    return os.environ.get("BIGBIRD_JA_CPU_KERNELS", "1") != "0"


def _compiler() -> list[str] | None:
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return None if found is None else [found]


def build(source: Path = SOURCE) -> Path:
    """Compile `source` into the cache (unless an intact build is there) and return the shared library's path. The
    library and then its record (`_record_path`) are written to temporary files and renamed, so ranks building at
    once on a shared file system never load half a file, and a library is trusted only once its record is in."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    code = source.read_bytes()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([code, " ".join(compiler).encode(), version.encode(), platform.machine().encode(),
                                     " ".join(FLAGS + OPENMP_FLAGS).encode()])).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    damage = _damage(target)
    if damage is None:
        return target
    if target.exists():
        logger.warning("bigbird_ja: the cached CPU kernel %s %s: rebuilding it", target, damage)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    fd, tmp_record = tempfile.mkstemp(suffix=".json", dir=target.parent)
    os.close(fd)
    try:
        for flags in (FLAGS + OPENMP_FLAGS, FLAGS):  # e.g. Apple's clang has no -fopenmp
            result = subprocess.run([*compiler, *flags, "-o", tmp, str(source)], capture_output=True, text=True)
            if result.returncode == 0:
                break
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed on {source}:\n{result.stderr[-2000:]}")
        _check_loadable(tmp, compiler)
        data = Path(tmp).read_bytes()
        Path(tmp_record).write_text(json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}))
        os.replace(tmp, target)
        os.replace(tmp_record, _record_path(target))  # last: from now on the library is trusted
    finally:
        for leftover in (tmp, tmp_record):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return target


def _record_path(library: Path) -> Path:
    return library.with_name(library.name + ".json")


def _damage(library: Path) -> str | None:
    """None when `library` is whole (its size and sha256 those recorded after its build), else what is wrong."""
    try:
        record = json.loads(_record_path(library).read_text())
        expected_size, expected_sha256 = int(record["size"]), str(record["sha256"])
    except FileNotFoundError:
        return "has no record of its checksum (written by an older version, or its build was cut short)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"has an unreadable record of its checksum ({error})"
    try:
        data = library.read_bytes()
    except OSError as error:
        return f"cannot be read ({error})"
    if len(data) != expected_size:
        return f"is {len(data)} bytes where its build wrote {expected_size} (cut short or overwritten)"
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        return "does not match the sha256 recorded at its build (damaged)"
    return None


def _check_loadable(path: str, compiler: list[str]) -> None:
    """A compiler that exits 0 without writing a library (a wrapper script, a full disk) must not fill the cache."""
    if os.path.getsize(path) == 0:
        raise RuntimeError(f"{' '.join(compiler)} exited 0 but wrote nothing: nothing was cached")
    # Loaded from a copy: a library stays mapped until the process exits, and the file renamed into the cache must
    # not be that mapping (rewritten in place later, e.g. by `cp` over it, it would kill this process with SIGBUS).
    fd, probe = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        shutil.copyfile(path, probe)
        ctypes.CDLL(probe)
    except OSError as error:
        raise RuntimeError(f"{' '.join(compiler)} wrote a library that cannot be loaded ({error}): nothing was "
                           f"cached") from error
    finally:
        os.unlink(probe)


def _require(condition: bool, what: str) -> None:
    # not an assert: the C code trusts these, and asserts vanish under python -O
    if not condition:
        raise ValueError(f"bigbird_ja CPU kernel: {what}")


class RelativeTermsKernel:
    """ctypes bindings of csrc/relative_terms.c (see its header for what the two functions compute)."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        args = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 12 + [ctypes.c_int]
        self._functions = {}
        for direction in ("forward", "backward"):
            for dtype, suffix in SUFFIXES.items():
                fn = getattr(lib, f"bbja_terms_{direction}_{suffix}")
                fn.argtypes, fn.restype = args, ctypes.c_int
                self._functions[direction, dtype] = fn

    @staticmethod
    def _pointer(t: torch.Tensor | None):
        return None if t is None else ctypes.c_void_p(t.data_ptr())

    def _call(self, direction, tiles, q_side, k_side, table, kblocks, H, q_block0, bs, hw):
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
        status = self._functions[direction, tiles.dtype](
            *[self._pointer(t) for t in tensors], self._pointer(table), self._pointer(kblocks_3d),
            P, H, nq, q_block0, K, bs, R, Np, T, hw, kb_sh, kb_sn, torch.get_num_threads())
        if status != 0:
            raise MemoryError("bigbird_ja CPU kernel: out of memory for its thread list")

    def forward(self, qp, kp, out, table, kblocks, *, H, q_block0, bs, hw):
        """out [P, nq, bs, K*bs] (contiguous) = the terms of query blocks q_block0.. against kblocks [h|1, nq|1, K]
        (h: head; size 1: the same for every head or row); qp [P, Np, R] or None, kp [P, T, R] or None."""
        self._call("forward", out, qp, kp, table, kblocks, H, q_block0, bs, hw)

    def backward(self, grad, gqp, gkp, table, kblocks, *, H, q_block0, bs, hw):
        """gqp / gkp (zero-filled or accumulating, contiguous, either None) += the gradient of forward's reads."""
        self._call("backward", grad.contiguous(), gqp, gkp, table, kblocks, H, q_block0, bs, hw)


def relative_terms() -> RelativeTermsKernel | None:
    """The kernel, built and loaded on first call; None where it is disabled or cannot be built (logged once)."""
    if not enabled():
        return None
    if not SOURCE.exists():  # a model folder's flat copy of this module (hub.py) has no csrc/: the PyTorch reads
        return None
    if "library" not in _loaded:
        with _lock:
            if "library" not in _loaded:
                try:
                    _loaded["library"] = RelativeTermsKernel(build())
                except Exception as error:  # no compiler, read-only cache, ...: the PyTorch reads serve instead
                    logger.warning("bigbird_ja: the CPU relative-terms kernel is not available (%s); using the "
                                   "slower pure-PyTorch reads. BIGBIRD_JA_CPU_KERNELS=0 silences this.", error)
                    _loaded["library"] = None
    return _loaded["library"]


def supports(t: torch.Tensor) -> bool:
    """Whether the kernel can take tensors like t (CPU, float32, float64 or bfloat16, not meta)."""
    return t.device.type == "cpu" and t.dtype in SUFFIXES
