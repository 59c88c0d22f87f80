"""Scratch buffers the blocked backend's no-gradient CPU forward reuses.

torch's CPU allocator is malloc: tensors over glibc's mmap threshold are mapped, faulted in and zeroed afresh on every
call, and refilling kept pages is cheaper (benchmarks/README.md has the figures). How long buffers are kept is
BIGBIRD_JA_CPU_WORKSPACE:
  unset / "forward"  for one model forward (`workspace_scope`, opened by the encoder): every layer after the first
                     reuses the first one's buffers, and they are freed when the forward returns (a server's resident
                     memory goes back to where it was)
  "1" / "keep"       between calls too, until `release_workspace()` in the thread that ran them (fastest; holds up to
                     a few hundred MiB per thread at 4k tokens)
  "0" / "off"        never: fresh tensors only
With a gradient (eager training) the large buffers come from `ReusePool` instead, kept between steps and reused
once free, unless "0" / "off".
"""

from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager

import torch


class Workspace:
    """One buffer per role, per thread, device and dtype, grown to the largest request up to `max_bytes` (larger
    requests get fresh tensors). Everything taken from here is dead when the op returns (its output is a fresh
    tensor), and threads never share a buffer."""

    max_bytes = 128 << 20  # bounds each kept buffer (at base dims every one is kept up to 4k tokens)

    @staticmethod
    def mode() -> str:
        """"forward", "keep" or "off" (BIGBIRD_JA_CPU_WORKSPACE; an unknown value is refused by name)."""
        value = os.environ.get("BIGBIRD_JA_CPU_WORKSPACE", "forward").strip().lower()
        modes = {"": "forward", "forward": "forward", "1": "keep", "keep": "keep", "0": "off", "off": "off"}
        if value not in modes:
            raise ValueError(f"BIGBIRD_JA_CPU_WORKSPACE={value!r}: use forward (the default), keep (or 1) or off "
                             "(or 0)")
        return modes[value]

    def depth(self) -> int:
        return getattr(self._local, "depth", 0)

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


WORKSPACE = Workspace()


_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)  # torch's count of a storage's holders (None: not told)


def _storage_holders(t: torch.Tensor) -> int:
    """How many tensors (views, saved tensors, the pool's own) hold t's storage."""
    return _USE_COUNT(t.untyped_storage()._cdata) - 1  # less the storage object made to ask


class ReusePool:
    """The large buffers of eager CPU training (the relative products and terms, the scores, their gradients), kept
    between steps and handed out again once nothing else holds them, as torch's CUDA caching allocator does on a GPU:
    on CPU every fresh tensor over glibc's mmap threshold (32 MiB) is mapped, faulted in and zeroed by the kernel,
    which at 2k tokens cost more than the kernels' own work on it (docs/performance.md). A buffer is free when its
    storage has no holder but the pool (torch's storage use count: no view, no saved tensor, no gradient in flight).
    Per thread; a request takes a free buffer of its dtype with between 1 and 1.25 times its elements (lengths that
    vary a little share them), else a new one is made and kept, up to `max_bytes` kept in all (free ones are dropped
    first, the least recently used first; beyond that, fresh tensors). Switched off with BIGBIRD_JA_CPU_WORKSPACE=0;
    `release_workspace()` frees the calling thread's."""

    min_bytes = 4 << 20  # below this malloc's heap serves the tensor again without the kernel's help
    max_bytes = 8 << 30

    def __init__(self):
        self._local = threading.local()

    def _state(self) -> "_ThreadBuffers":
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _ThreadBuffers()
        return state

    def _buffers(self) -> list[torch.Tensor]:  # least recently used first
        return self._state().buffers

    def kept_bytes(self) -> int:
        """The calling thread's buffers' bytes, free or held."""
        return self._state().kept_bytes

    def empty(self, shape, like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        nbytes = numel * like.element_size()
        if nbytes < self.min_bytes or like.device.type != "cpu":
            return like.new_empty(shape)
        state = self._state()
        buffers = state.buffers
        best = None  # its index in buffers
        for i, buffer in enumerate(buffers):
            if (buffer.dtype == like.dtype and numel <= buffer.numel() <= numel * 5 // 4
                    and (best is None or buffer.numel() < buffers[best].numel()) and _storage_holders(buffer) == 1):
                best = i
        if best is not None:
            buffer = buffers.pop(best)
        else:
            i = 0
            while state.kept_bytes + nbytes > self.max_bytes and i < len(buffers):  # drop free ones, oldest first
                if _storage_holders(buffers[i]) == 1:
                    state.kept_bytes -= _nbytes(buffers.pop(i))
                else:
                    i += 1
            if state.kept_bytes + nbytes > self.max_bytes:
                return like.new_empty(shape)
            with torch.inference_mode(False):
                buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
            state.kept_bytes += nbytes
        buffers.append(buffer)
        # a tensor of its own on the buffer's storage, not a view: autograd.Functions return these as outputs
        return torch.empty(0, dtype=like.dtype, device=like.device).set_(buffer.untyped_storage(), 0, tuple(shape))

    def release(self) -> None:
        self._local.__dict__.pop("state", None)


class _ThreadBuffers:
    """One thread's kept buffers (least recently used first) and their bytes, counted as they come and go."""

    __slots__ = ("buffers", "kept_bytes")

    def __init__(self):
        self.buffers: list[torch.Tensor] = []
        self.kept_bytes = 0


def _nbytes(buffer: torch.Tensor) -> int:
    return buffer.numel() * buffer.element_size()


POOL = ReusePool()


def pool_for(x: torch.Tensor, traced: bool) -> ReusePool | None:
    """The training pool for this call, or None: eager on CPU with a gradient (the workspace serves calls without
    one), unless BIGBIRD_JA_CPU_WORKSPACE=0 or torch does not count a storage's holders."""
    if not torch.is_grad_enabled() or traced or x.device.type != "cpu" or _USE_COUNT is None:
        return None
    return None if Workspace.mode() == "off" else POOL


def release_workspace() -> None:
    """Free the calling thread's kept buffers: the no-gradient CPU forward's scratch (kept between calls with
    BIGBIRD_JA_CPU_WORKSPACE=keep) and the training pool's."""
    WORKSPACE.release()
    POOL.release()


@contextmanager
def workspace_scope():
    """One model forward: the workspace serves the calls inside it and, unless kept ("keep"), is freed when the
    outermost scope of this thread closes."""
    local = WORKSPACE._local
    if WORKSPACE.depth() == 0:
        local.mode = Workspace.mode()  # read once per forward, not once per attention call
    local.depth = WORKSPACE.depth() + 1
    try:
        yield
    finally:
        local.depth -= 1
        if local.depth == 0 and local.mode != "keep":
            WORKSPACE.release()


def workspace_for(x: torch.Tensor, traced: bool) -> Workspace | None:
    """The workspace for this call, or None: only where no autograd graph can hold a buffer (it may be reused), eager
    on CPU, and switched on (inside a model forward, or kept between calls)."""
    if torch.is_grad_enabled() or traced or x.device.type != "cpu":
        return None
    inside = WORKSPACE.depth() > 0
    mode = WORKSPACE._local.mode if inside else Workspace.mode()
    if mode == "keep" or (mode == "forward" and inside):
        return WORKSPACE
    return None
