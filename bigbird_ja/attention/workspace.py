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


def release_workspace() -> None:
    """Free the calling thread's scratch buffers of the no-gradient CPU forward (they are kept between calls)."""
    WORKSPACE.release()


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
