"""Faults injected into a pretraining run on purpose, to rehearse dead, hung and full-disk ranks for real.

The loop knows nothing of faults: `Pretraining` has one `fault_hook` (None unless installed) that it calls at the
two points where a fault can strike, and `pretrain` installs the one $BIGBIRD_JA_FAULT describes, when set (the
README's rehearsals and tests/test_fault_tolerance.py set it). A test may install any other callable instead.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

FaultPoint = Literal["step_start", "after_forward"]
# ``hook(point, rank, step)``: "step_start" before step ``step`` reads its first batch; "after_forward" after the
# forward pass of its first micro-batch, before the gradients are exchanged
FaultHook = Callable[[FaultPoint, int, int], None]

FAULT_ENV = "BIGBIRD_JA_FAULT"
FAULT_ACTIONS = ("kill", "stop", "fill-disk")


@dataclass(frozen=True)
class FaultInjection:
    """One fault, from $BIGBIRD_JA_FAULT="ACTION:rank=R:step=S[:attempt=A][:bytes=N]"; a `FaultHook`:

    kill: rank R SIGKILLs itself in the middle of step S (after the forward pass of its first micro-batch, before
        the gradients are exchanged). stop: the same with SIGSTOP (a hung rank).
    fill-disk: at the start of step S rank R may no longer write files beyond N bytes (RLIMIT_FSIZE): the next
        checkpoint runs out of room as on a full disk.
    attempt: only in that attempt of an elastic launcher (TORCHELASTIC_RESTART_COUNT, 0 when unset; default 0), so
        an automatic restart runs clean.
    """

    action: str
    rank: int
    step: int
    attempt: int = 0
    bytes: int = 65536

    @classmethod
    def from_env(cls, environ=os.environ) -> "FaultInjection | None":
        text = environ.get(FAULT_ENV)
        if not text:
            return None
        action, *fields = text.split(":")
        try:
            values = {key: int(value) for key, value in (f.split("=", 1) for f in fields)}
            fault = cls(action, **values)
        except (TypeError, ValueError):
            fault = None
        if fault is None or action not in FAULT_ACTIONS:
            raise ValueError(f"{FAULT_ENV}={text!r}: expected ACTION:rank=R:step=S[:attempt=A][:bytes=N] with ACTION "
                             f"one of {list(FAULT_ACTIONS)}")
        return fault

    def __call__(self, point: FaultPoint, rank: int, step: int) -> None:
        if point == "step_start":
            self.at_step_start(rank, step)
        elif point == "after_forward":
            self.mid_step(rank, step)

    def due(self, rank: int, step: int) -> bool:
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        return (rank, step, attempt) == (self.rank, self.step, self.attempt)

    def at_step_start(self, rank: int, step: int) -> None:
        if self.action == "fill-disk" and self.due(rank, step):
            print(f"[rank {rank}] {FAULT_ENV}: files limited to {self.bytes} bytes from step {step}", file=sys.stderr,
                  flush=True)
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    def mid_step(self, rank: int, step: int) -> None:
        if self.action in ("kill", "stop") and self.due(rank, step):
            print(f"[rank {rank}] {FAULT_ENV}: {self.action} in the middle of step {step}", file=sys.stderr,
                  flush=True)
            os.kill(os.getpid(), signal.SIGKILL if self.action == "kill" else signal.SIGSTOP)
