"""Dead and hung ranks: heartbeats, a watchdog that ends a hung run, crash stacks.

What torch.distributed and the launchers provide is used as it is: every collective fails after
distributed.timeout_minutes (`init_process_group`); a rank that exits or is killed makes the launcher stop the
others (torchrun, the deepspeed launcher, mpirun, srun --kill-on-bad-exit) and name it (torchrun's "Root Cause",
mpirun's and srun's summaries); torchrun --max-restarts and SLURM --requeue start the job again, and `--resume auto`
continues from the newest complete checkpoint; torch's flight recorder keeps each rank's recent collectives
(`bigbird_ja.common.distributed.flight_recorder`). What they lack is the glue below.

* Heartbeats. Each rank's watchdog thread rewrites <run.output_dir>/watchdog/rank-NNNNN.json every
  heartbeat_seconds: the phase it is in (a training step, an evaluation, a checkpoint), of which step, since when,
  its pid and host. The file of a stopped or dead rank stops changing.
* `Watchdog`. A phase that lasts longer than factor x the median of its recent durations (and min_seconds) is hung:
  the thread writes this rank's Python stacks (every thread) and its flight-recorder record to the watchdog folder,
  names the ranks that made no progress (from their heartbeats; on this host also whether the process is stopped,
  in uninterruptible I/O or gone) and ends its process; the launcher then stops the rest. A SIGSTOPped rank cannot
  write its own stack: the other ranks' stacks and "rank k made no progress since step s" are what can be said.
  Time the process itself spent stopped (a suspended job) counts against no phase.
* `Watchdog.explain_failure`: when a collective fails on a rank that survived (a peer died), the same heartbeats
  name the ranks on this host that are gone.
* `enable_crash_stacks`: a rank killed by SIGSEGV, SIGBUS (a shard truncated while it was mapped) or SIGABRT prints
  every thread's Python stack to stderr (faulthandler).

The faults that rehearse all this for real ($BIGBIRD_JA_FAULT) are injected by `bigbird_ja.training.faults`.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import json
import os
import pickle
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..common.atomic_io import atomic_open, atomic_write_bytes, atomic_write_text

EXIT_HUNG = 3  # the exit status of a rank the watchdog ended (any non-zero status makes a launcher restart or stop)
MIN_DURATIONS = 3  # a phase is timed once this many of its durations are known
MAX_LISTED = 20  # ranks named one by one in a report; the rest are counted


def heartbeat_path(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rank-{rank:05d}.json"


def process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` on this host (R running, S sleeping, D uninterruptible I/O, T stopped,
    t traced, Z dead and not yet reaped), or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[0]  # the name, in parentheses, may hold spaces


_STATES = {None: "its process is gone (killed or crashed: its log, or the launcher's summary, says how)",
           "Z": "its process is gone (killed or crashed: its log, or the launcher's summary, says how)",
           "T": "its process is stopped (SIGSTOP, or a job-control stop)", "t": "its process is held by a debugger",
           "D": "its process is waiting on uninterruptible I/O (a file system or device that does not answer)"}


def phase_label(name: str | None, step: int | None) -> str:
    """What a rank was doing: a phase of ``step``; with no phase, ``step`` is the last step it finished."""
    if name is None:
        return f"after training step {step}" if step else "before its first step"
    return {"step": f"training step {step}", "eval": f"the evaluation after step {step}",
            "checkpoint": f"the checkpoint of step {step}"}[name]


def _describe_process(record: dict) -> str:
    if record.get("host") != socket.gethostname():
        return f"on host {record.get('host')}"
    state = process_state(int(record["pid"]))
    return _STATES.get(state, f"its process is alive (state {state}) but its loop does not advance")


@dataclass
class _Phase:
    name: str  # "step", "eval" or "checkpoint"
    step: int  # the step being trained, or the one just trained that is evaluated or saved
    started: float  # monotonic
    started_wall: float


class Watchdog:
    """See the module docstring. ``folder``: the run's watchdog folder (shared by all ranks). ``detect``: end the
    process on a hung phase (off: heartbeats only). ``on_hang(message)``: called before the process ends (rank 0
    records it in metrics.jsonl). ``clock`` and ``exit`` are for tests."""

    def __init__(self, folder: Path, rank: int, world_size: int, *, detect: bool, factor: float = 10.0,
                 min_seconds: float = 300.0, window: int = 50, heartbeat_seconds: float = 10.0, on_hang=None,
                 clock=time.monotonic, exit=os._exit):
        self.folder, self.rank, self.world_size, self.detect = Path(folder), rank, world_size, detect
        self.factor, self.min_seconds, self.heartbeat_seconds = factor, min_seconds, heartbeat_seconds
        self.on_hang, self.clock, self.exit = on_hang, clock, exit
        # how often the thread wakes: fine enough to notice a hang soon after min_seconds, and a stopped process
        self.poll = max(0.05, min(heartbeat_seconds, min_seconds / 20))
        self.durations: dict[str, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=window))
        self.current: _Phase | None = None
        self.completed = 0  # phases finished: the progress a heartbeat reports
        self.last_step: int | None = None  # the last training step finished
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_wake = self._last_beat = clock()

    @classmethod
    def from_config(cls, section, env, folder: Path, on_hang=None) -> "Watchdog | None":
        """The run's watchdog (a `config.WatchdogSection`), or None: off when watchdog.enabled is false, and for
        one process unless it is true. Hang detection: enabled true, or null on more than one node."""
        if section.enabled is False or (env.world_size == 1 and not section.enabled):
            return None
        detect = bool(section.enabled) or (section.enabled is None and env.num_nodes > 1)
        return cls(folder, env.rank, env.world_size, detect=detect, factor=section.factor,
                   min_seconds=section.min_seconds, window=section.window,
                   heartbeat_seconds=section.heartbeat_seconds, on_hang=on_hang)

    # -- the main thread's side -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str, step: int):
        """Time the block as one ``name`` phase of ``step``; a block that raises adds no duration."""
        with self._lock:
            self.current = _Phase(name, step, self.clock(), time.time())
        finished = False
        try:
            yield
            finished = True
        finally:
            with self._lock:
                if finished:
                    self.durations[name].append(self.clock() - self.current.started)
                    self.completed += 1
                    if name == "step":
                        self.last_step = step
                self.current = None

    def limit(self, name: str) -> float | None:
        """How long a ``name`` phase may take (None: not timed yet)."""
        recent = self.durations.get(name)
        if recent is None or len(recent) < MIN_DURATIONS:
            return None
        return max(self.min_seconds, self.factor * statistics.median(recent))

    def start(self) -> "Watchdog":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.beat()
        self._thread = threading.Thread(target=self._run, name="bigbird-ja-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- the thread ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        self._last_wake = self._last_beat = self.clock()
        while not self._stop.wait(self.poll):
            if self.tick(self.clock()):
                return

    def tick(self, now: float) -> bool:
        """One wake of the thread at ``now``: heartbeat when due, then the hang check; True when it fired."""
        # Woken far later than asked: this process was stopped (SIGSTOP, a suspended job) or starved; that time is
        # not the phase's, or a job resumed after a suspension would end itself.
        late = now - self._last_wake - self.poll
        if late > max(2 * self.poll, 1.0):
            with self._lock:
                if self.current is not None:
                    self.current.started += late
        self._last_wake = now
        if now - self._last_beat >= self.heartbeat_seconds:
            self.beat()
            self._last_beat = now
        if self.detect:
            hung = self.check(now)
            if hung is not None:
                self.fire(*hung)
                return True
        return False

    def beat(self) -> None:
        """Rewrite this rank's heartbeat file (atomically: a reader sees the old one or the new one)."""
        with self._lock:
            phase = self.current
            record = {"rank": self.rank, "pid": self.pid, "host": self.host, "time": time.time(),
                      "completed": self.completed, "phase": phase.name if phase else None,
                      "step": phase.step if phase else self.last_step,
                      "since": phase.started_wall if phase else None}
        with contextlib.suppress(OSError):  # a heartbeat that cannot be written is no reason to stop training
            atomic_write_text(heartbeat_path(self.folder, self.rank), json.dumps(record) + "\n", durable=False)

    def check(self, now: float) -> tuple[_Phase, float, float] | None:
        """(the phase, how long it has run, its limit) when the current phase is past its limit, else None."""
        with self._lock:
            phase = self.current
            if phase is None:
                return None
            limit = self.limit(phase.name)
            elapsed = now - phase.started
        return (phase, elapsed, limit) if limit is not None and elapsed > limit else None

    def fire(self, phase: _Phase, elapsed: float, limit: float) -> None:
        """Write what can be known, say it, and end this process (`EXIT_HUNG`)."""
        median = statistics.median(self.durations[phase.name])
        what = (f"{phase_label(phase.name, phase.step)} has run for {elapsed:.1f} s, more than watchdog.factor="
                f"{self.factor:g} x its median {median:.3g} s and watchdog.min_seconds={self.min_seconds:g}")
        stacks = self.folder / f"stacks-rank-{self.rank:05d}.txt"
        with contextlib.suppress(OSError):
            with atomic_open(stacks, durable=False) as f:  # faulthandler writes to the file's descriptor
                f.write(f"rank {self.rank} (pid {self.pid} on {self.host}), {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                        f"{what}\n\n".encode("utf-8"))
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        collective = dump_collectives(self.folder / f"fr_trace_rank_{self.rank}")
        lines = [f"[rank {self.rank}] watchdog: {what}; ending this rank (exit status {EXIT_HUNG}) rather than "
                 f"wait distributed.timeout_minutes. Its Python stacks: {stacks}"]
        if collective:
            lines.append(f"[rank {self.rank}] watchdog: this rank is in {collective} (flight record: "
                         f"{self.folder}/fr_trace_rank_{self.rank}; `torchfrtrace {self.folder}` compares ranks)")
        if self._reports_for_all():
            lines += [f"[rank {self.rank}] watchdog: {line}" for line in self.describe_ranks(phase)]
        message = "\n".join(lines)
        print(message, file=sys.stderr, flush=True)
        if self.on_hang is not None:
            with contextlib.suppress(Exception):
                self.on_hang(message)
        self.exit(EXIT_HUNG)

    # -- reading the heartbeats ------------------------------------------------------------------------------------
    def read(self, rank: int) -> dict | None:
        try:
            return json.loads(heartbeat_path(self.folder, rank).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _stale(self, record: dict | None, now: float) -> bool:
        return record is None or now - record["time"] > 3 * self.heartbeat_seconds

    def _reports_for_all(self) -> bool:
        """Whether this rank reads every heartbeat: rank 0, or the first rank whose lower ranks are all silent (so
        one rank, not thousands, reads the whole folder)."""
        now = time.time()
        return all(self._stale(self.read(k), now) for k in range(self.rank))

    def describe_ranks(self, mine: _Phase) -> list[str]:
        """One line per rank that differs from this one: silent ones (made no progress), then ones in another
        phase; a final line when every other rank is where this one is."""
        now = time.time()
        silent, elsewhere, missing = [], [], []
        for k in range(self.world_size):
            if k == self.rank:
                continue
            record = self.read(k)
            if record is None:
                missing.append(k)
            elif self._stale(record, now):
                silent.append(f"rank {k} (pid {record['pid']}) made no progress since its last heartbeat "
                              f"{now - record['time']:.0f} s ago, in {phase_label(record['phase'], record['step'])} "
                              f"(this rank: {phase_label(mine.name, mine.step)}); {_describe_process(record)}")
            elif (record["phase"], record["step"]) != (mine.name, mine.step):
                elsewhere.append(f"rank {k} is alive, in {phase_label(record['phase'], record['step'])} for "
                                 f"{now - (record['since'] or now):.0f} s ({_describe_process(record)})")
        lines = silent[:MAX_LISTED] + elsewhere[:MAX_LISTED]
        hidden = len(silent) + len(elsewhere) - len(lines)
        if hidden > 0:
            lines.append(f"... and {hidden} more rank(s) (heartbeats in {self.folder})")
        if missing:
            lines.append(f"no heartbeat from rank(s) {_ranges(missing)} (never reached the loop)")
        if not silent and not elsewhere and not missing:
            lines.append(f"every rank is alive and in {phase_label(mine.name, mine.step)}: a collective that does "
                         f"not complete (the network, or ranks that called different collectives: compare the flight "
                         f"records with `torchfrtrace {self.folder}`)")
        return lines

    def explain_failure(self, wait: float = 1.0) -> list[str]:
        """After a collective failed on this rank: the ranks on this host whose processes are gone or stopped (a
        dead rank on another host is named by the launcher's summary and its own log). A killed peer's sockets
        close while it is still exiting, so its state is looked at for up to ``wait`` seconds."""
        records = [r for k in range(self.world_size) if k != self.rank
                   for r in [self.read(k)] if r is not None and r.get("host") == self.host]
        deadline = time.monotonic() + wait
        while True:
            lines = []
            for record in records:
                state = process_state(int(record["pid"]))
                if state in (None, "Z", "T", "t"):
                    lines.append(f"rank {record['rank']} (pid {record['pid']}, last seen in "
                                 f"{phase_label(record['phase'], record['step'])}): {_STATES[state]}")
            if lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)


def _ranges(ranks: list[int]) -> str:
    parts, start = [], None
    for i, k in enumerate(ranks):
        start = k if start is None else start
        if i + 1 == len(ranks) or ranks[i + 1] != k + 1:
            parts.append(str(start) if start == k else f"{start}-{k}")
            start = None
    return ", ".join(parts)


def dump_collectives(path: Path) -> str | None:
    """Write this rank's flight record (torch's pickled format, what `torchfrtrace` reads) to ``path`` and describe
    its newest collective ("gloo:all_reduce #57 (sizes [[1024]]), not completed"); None when torch keeps no record
    (TORCH_FR_BUFFER_SIZE=0, no process group) or cannot dump it."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace  # torch's own dump, as its timeout handler writes

        raw = _dump_fr_trace(includeCollectives=True, includeStackTraces=True, onlyActive=False)
        entries = pickle.loads(raw).get("entries", [])
        atomic_write_bytes(path, raw, durable=False)
    except Exception:  # a private API: whatever changes in it must not stop the report
        return None
    if not entries:
        return None
    entry = next((e for e in reversed(entries) if not e.get("retired", True)), entries[-1])
    done = "completed" if entry.get("retired") else "not completed"
    return (f"{entry.get('profiling_name')} #{entry.get('collective_seq_id')} (sizes {entry.get('input_sizes')}), "
            f"{done}")


def enable_crash_stacks() -> None:
    """faulthandler on: a fatal signal (SIGSEGV, SIGBUS, SIGFPE, SIGABRT, SIGILL) prints every thread's Python stack
    to stderr before the process dies."""
    if not faulthandler.is_enabled():
        faulthandler.enable(file=sys.stderr, all_threads=True)
