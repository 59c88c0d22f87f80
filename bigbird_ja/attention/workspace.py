"""Scratch buffers the blocked backend's no-gradient CPU forward may reuse between calls (opt-in).

torch's CPU allocator is malloc: tensors over glibc's mmap threshold are mapped, faulted in and zeroed afresh on every
call, and refilling kept pages is cheaper (benchmarks/README.md has the figures). Kept memory is traded for that
speed, so it is off unless BIGBIRD_JA_CPU_WORKSPACE=1; `release_workspace()` frees the calling thread's buffers.
"""

from __future__ import annotations

import math
import os
import threading

import torch


class Workspace:
    """One buffer per role, per thread, device and dtype, grown to the largest request up to `max_bytes` (larger
    requests get fresh tensors). Everything taken from here is dead when the op returns (its output is a fresh
    tensor), and threads never share a buffer."""

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


WORKSPACE = Workspace()


def release_workspace() -> None:
    """Free the calling thread's scratch buffers of the no-gradient CPU forward (they are kept between calls)."""
    WORKSPACE.release()


def workspace_for(x: torch.Tensor, traced: bool) -> Workspace | None:
    """The workspace for this call, or None: only where no autograd graph can hold a buffer (it may be reused), eager
    on CPU, and switched on."""
    if torch.is_grad_enabled() or traced or x.device.type != "cpu" or not Workspace.enabled():
        return None
    return WORKSPACE
