"""Dead ranks, hung ranks and faults in the middle of a run (`bigbird_ja.training.watchdog`, the collective timeout).

The process tests run the real entry point under the real launchers (torchrun, the deepspeed launcher) on gloo, with
the tiny setting of test_pretrain.py, and fail a rank for real: $BIGBIRD_JA_FAULT makes it SIGKILL or SIGSTOP itself
in the middle of a step, or lose its room to write; the harness deletes or truncates shards as the run goes. Every
run is bounded (the collective timeout is 1 minute, the harness kills what outlives its limit), so a regression
fails instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from bigbird_ja.common.distributed import DistEnv
from bigbird_ja.data.format import CorruptDataError
from bigbird_ja.training import checkpoint as ckpt_mod
from bigbird_ja.training.config import WatchdogSection, load_pretrain_config
from bigbird_ja.training.faults import FaultInjection
from bigbird_ja.training.watchdog import EXIT_HUNG, Watchdog, heartbeat_path, process_state
from conftest import _deepspeed_launcher, _free_port, subprocess_env
from test_pretrain import CKPT_EVERY, GLOBAL_BATCH, REPO, STEPS, TINY, _positions, _sessions
from test_pretrain import tiny_data  # noqa: F401  (a fixture: the data the trainer's own preparation makes)

TIMEOUT = ["--distributed.timeout_minutes=1"]  # the bound on any wait for a lost rank in these runs


# ----------------------------------------------------------------------------------------------------------------
# The collective timeout


def test_the_configured_collective_timeout_reaches_the_process_group(monkeypatch, tmp_path):
    import deepspeed

    from bigbird_ja.common import distributed
    from bigbird_ja.training import trainer

    seen = {}

    class Started(Exception):
        pass

    def init_distributed(**kwargs):
        seen.update(kwargs)
        raise Started

    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    for name in ("TORCH_FR_BUFFER_SIZE", "TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DUMP_ON_TIMEOUT"):
        monkeypatch.setenv(name, "")  # remembered, so that what the code sets is undone after the test
        monkeypatch.delenv(name)
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    cfg = load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml",
                               [f"--run.output_dir={tmp_path}", "--distributed.timeout_minutes=7"])
    with pytest.raises(Started):
        trainer.pretrain(cfg)
    assert seen["timeout"] == timedelta(minutes=7) and seen["dist_backend"] == "gloo"
    # torch's flight recorder is on, its NCCL dumps going to the run's watchdog folder
    assert os.environ["TORCH_FR_BUFFER_SIZE"] == "2000"
    assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "watchdog" / "nccl_trace_rank_")
    assert load_pretrain_config(None, {}).distributed.timeout_minutes == 30  # the default for large jobs
    seen.clear()
    with pytest.raises(Started):
        distributed.init_process_group(False)  # no timeout given: DeepSpeed's default
    assert "timeout" not in seen and seen["dist_backend"] == "gloo"


@pytest.mark.parametrize("restarts, shared, refused", [("1", "True", True), ("1", "False", False),
                                                      ("0", "True", False)])
def test_torchrun_restarts_with_a_store_shared_between_attempts_are_refused(restarts, shared, refused):
    from bigbird_ja.common.distributed import check_elastic_restarts

    environ = {"TORCHELASTIC_MAX_RESTARTS": restarts, "TORCHELASTIC_USE_AGENT_STORE": shared}
    if refused:
        with pytest.raises(ValueError, match="Export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun"):
            check_elastic_restarts(environ)
    else:
        check_elastic_restarts(environ)


# ----------------------------------------------------------------------------------------------------------------
# The watchdog, in one process


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _watchdog(folder: Path, rank=0, world=1, **kw) -> tuple[Watchdog, _Clock, list]:
    clock, exits = _Clock(), []
    options = dict(detect=True, factor=10, min_seconds=5, window=5, heartbeat_seconds=1)
    options.update(kw)
    return Watchdog(folder, rank, world, clock=clock, exit=exits.append, **options), clock, exits


def _advance(dog: Watchdog, clock: _Clock, seconds: float) -> bool:
    """Let ``seconds`` pass as the thread sees them, waking every poll interval; True if the watchdog fired."""
    end = clock.now + seconds
    while clock.now < end - 1e-9:
        clock.now = min(end, clock.now + dog.poll)
        if dog.tick(clock.now):
            return True
    return False


def _steps(dog: Watchdog, clock: _Clock, seconds: list[float], first: int = 1) -> None:
    for i, duration in enumerate(seconds):
        with dog.phase("step", first + i):
            assert not _advance(dog, clock, duration)


def test_a_phase_is_hung_past_factor_times_its_median_and_never_before_min_seconds(tmp_path):
    dog, clock, exits = _watchdog(tmp_path)
    assert dog.limit("step") is None
    _steps(dog, clock, [50.0, 0.2, 0.3])  # a slow first step (compilation) does not move the median much
    assert dog.limit("step") == 5  # 10 x 0.3 s = 3 s is below min_seconds
    _steps(dog, clock, [1.0, 1.0], first=4)
    assert dog.limit("step") == 10  # 10 x the median of (50, 0.2, 0.3, 1, 1)
    assert dog.limit("checkpoint") is None  # each phase has its own durations: a first checkpoint is not timed
    with dog.phase("step", 6):
        assert not _advance(dog, clock, 9.9)
        assert _advance(dog, clock, 0.3)
    assert exits == [EXIT_HUNG]


def test_time_the_process_spent_stopped_counts_against_no_phase(tmp_path):
    dog, clock, exits = _watchdog(tmp_path)
    _steps(dog, clock, [0.3, 0.3, 0.3])  # limit: min_seconds, 5 s
    with dog.phase("step", 4):
        assert not _advance(dog, clock, 0.5)
        clock.now += 3600  # the whole job was suspended for an hour (no wake), then continued
        assert not dog.tick(clock.now)
        assert not _advance(dog, clock, 4.0) and exits == []  # 4.5 s (+ one poll interval) of its own time
        assert _advance(dog, clock, 1.0)  # past min_seconds


def _child(stopped: bool) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    if stopped:
        os.kill(child.pid, signal.SIGSTOP)
    return child


def _heartbeat(folder: Path, rank: int, pid: int, age: float, phase="step", step=8) -> None:
    now = time.time()
    record = {"rank": rank, "pid": pid, "host": socket.gethostname(), "time": now - age, "completed": 7,
              "phase": phase, "step": step, "since": now - age - 0.1}
    heartbeat_path(folder, rank).write_text(json.dumps(record))


def test_the_watchdog_writes_its_stacks_and_names_the_stopped_and_the_dead_rank(tmp_path, capsys):
    stopped, dead = _child(stopped=True), _child(stopped=False)
    dead.kill()
    dead.wait()
    try:
        dog, clock, exits = _watchdog(tmp_path, rank=0, world=4)
        dog.beat()  # (the thread is not started: the test's clock drives `tick`)
        _heartbeat(tmp_path, 1, stopped.pid, age=30, step=7)
        _heartbeat(tmp_path, 2, dead.pid, age=30)
        _heartbeat(tmp_path, 3, os.getpid(), age=0)  # alive, in the same phase as rank 0
        _steps(dog, clock, [1.0, 1.0, 1.0], first=5)
        with dog.phase("step", 8):
            assert not _advance(dog, clock, 9.9)
            assert _advance(dog, clock, 0.3)
    finally:
        stopped.kill()
        stopped.wait()
    err = capsys.readouterr().err
    print(err)
    assert exits == [EXIT_HUNG]
    assert re.search(r"training step 8 has run for 10\.\d s, more than watchdog.factor=10 x its median 1 s", err)
    assert f"rank 1 (pid {stopped.pid}) made no progress since its last heartbeat 30 s ago, in training step 7" in err
    assert "its process is stopped (SIGSTOP" in err
    assert f"rank 2 (pid {dead.pid})" in err and "its process is gone" in err
    assert "rank 3" not in err  # where this rank is: nothing to say
    stacks = (tmp_path / "stacks-rank-00000.txt").read_text()
    assert "training step 8 has run for" in stacks and "test_fault_tolerance.py" in stacks
    assert json.loads(heartbeat_path(tmp_path, 0).read_text())["pid"] == os.getpid()


def test_only_rank_zero_reads_every_heartbeat_unless_it_is_the_silent_one(tmp_path):
    dog, _, _ = _watchdog(tmp_path, rank=2, world=3)
    _heartbeat(tmp_path, 0, os.getpid(), age=0)
    assert not dog._reports_for_all()
    _heartbeat(tmp_path, 0, os.getpid(), age=60)
    _heartbeat(tmp_path, 1, os.getpid(), age=60)
    assert dog._reports_for_all()


@pytest.mark.parametrize("enabled, world, local, runs, detects", [
    (None, 1, 1, False, False), (None, 8, 8, True, False), (None, 16, 8, True, True),
    (False, 16, 8, False, False), (True, 1, 1, True, True), (True, 8, 8, True, True),
])
def test_the_watchdog_is_on_by_default_for_runs_over_several_nodes(tmp_path, enabled, world, local, runs, detects):
    env = DistEnv(rank=0, world_size=world, local_rank=0, local_world_size=local, backend="gloo")
    dog = Watchdog.from_config(WatchdogSection(enabled=enabled), env, tmp_path)
    assert (dog is not None) == runs and (dog is not None and dog.detect) == detects


def test_a_fault_to_inject_is_read_from_the_environment_and_typos_are_refused():
    assert FaultInjection.from_env({}) is None
    fault = FaultInjection.from_env({"BIGBIRD_JA_FAULT": "kill:rank=1:step=8"})
    assert fault == FaultInjection("kill", rank=1, step=8, attempt=0)
    for text in ("kil:rank=1:step=8", "kill:rank=1", "kill:rank=1:step=8:atempt=1", "stop:rank=x:step=1"):
        with pytest.raises(ValueError, match="BIGBIRD_JA_FAULT=.*expected ACTION:rank=R:step=S"):
            FaultInjection.from_env({"BIGBIRD_JA_FAULT": text})


# ----------------------------------------------------------------------------------------------------------------
# Shards that change under a running reader


def test_a_shard_deleted_or_cut_short_after_the_start_is_named_when_it_is_next_read(tiny_data, tmp_path):  # noqa: F811
    from bigbird_ja.data import PackedDataset

    data = tmp_path / "data"
    shutil.copytree(tiny_data[0], data)
    dataset = PackedDataset(data, shuffle=False, max_open_shards=1)
    dataset.sample(0)  # shard 0 mapped; shards 1 and 2 not yet
    (data / "shard-00001.bin").unlink()
    with pytest.raises(CorruptDataError, match=r"shard '.*shard-00001.bin' is gone: it was there when the run "
                                               r"started.*--resume auto"):
        dataset.sample(16)
    os.truncate(data / "shard-00002.bin", 1000)
    with pytest.raises(CorruptDataError, match=r"shard '.*shard-00002.bin' holds 1,000 bytes, its manifest 4,096: "
                                               r"it was cut short"):
        dataset.sample(32)
    assert dataset.sample(0).shape == (128,)  # the others still read


# ----------------------------------------------------------------------------------------------------------------
# Real runs


class _Launch:
    """A launcher command run in its own session; its output read line by line with the time each line came.
    ``on_line(launch, line)`` may act on the run (delete a shard, kill a stopped rank). Killed after ``limit``."""

    def __init__(self, cmd, *, fault: str | None = None, limit: float = 240, on_line=None):
        env = subprocess_env()
        if fault:
            env["BIGBIRD_JA_FAULT"] = fault
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        timer = threading.Timer(limit, lambda: os.killpg(self.proc.pid, signal.SIGKILL))
        timer.start()
        self.lines: list[tuple[float, str]] = []
        try:
            for line in self.proc.stdout:
                self.lines.append((time.monotonic() - self.started, line))
                if on_line is not None:
                    on_line(self, line)
            self.returncode = self.proc.wait()
        finally:
            timer.cancel()
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.ended = time.monotonic() - self.started
        assert self.ended < limit, f"killed after {limit} s:\n{self.text[-6000:]}"

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)

    def when(self, fragment: str) -> float:
        """Seconds from the launch to the first line holding ``fragment``."""
        return next(t for t, line in self.lines if fragment in line)


def _pretrain_args(out: Path, data: Path, tok: Path, extra=()) -> list[str]:
    return ["pretrain", "--config", "configs/pretrain/tiny-cpu.yaml", f"--run.output_dir={out}",
            f"--data.dir={data}", f"--data.tokenizer={tok}", *TINY, *TIMEOUT, *extra]


def _torchrun(nprocs: int, args: list[str], max_restarts: int = 0) -> list[str]:
    # a fresh rendezvous store per attempt, as the launch recipes ask for (`check_elastic_restarts`)
    return ["env", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", sys.executable, "-m", "torch.distributed.run",
            "--standalone", f"--nproc-per-node={nprocs}", f"--max-restarts={max_restarts}", "-m", "bigbird_ja.cli",
            *args]


def _deepspeed(nprocs: int, args: list[str]) -> list[str]:
    return [*_deepspeed_launcher(), "--num_gpus", str(nprocs), "--master_port", str(_free_port()), "--module",
            "bigbird_ja.cli", *args]


def _nothing_half_written(root: Path) -> None:
    """What --resume auto sees: complete, verified step folders only (a temporary one is hidden and removed at the
    next start)."""
    for path in ckpt_mod.list_checkpoints(root):
        assert ckpt_mod.verify_checkpoint(path).problem is None, path


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_killed_mid_step_is_restarted_by_torchrun_and_resumes_from_its_checkpoint(
        tiny_data, tmp_path):  # noqa: F811
    """Rank 1 SIGKILLs itself in the middle of step 8 of the first attempt; torchrun stops rank 0 and starts both
    again (--max-restarts=1), and --resume auto continues from step 6: every sample read exactly once."""
    out = tmp_path / "killed"
    run = _Launch(_torchrun(2, _pretrain_args(out, *tiny_data, ["--zero.stage=1", "--resume", "auto"]),
                            max_restarts=1), fault="kill:rank=1:step=8")
    text = run.text
    assert run.returncode == 0, text[-6000:]
    killed_at = run.when("BIGBIRD_JA_FAULT: kill in the middle of step 8")
    noticed = run.when("failed (exitcode: -9) local_rank: 1")  # torchrun names the rank that died
    restarted = run.when(f"resumed from {out / 'checkpoints' / 'step-00000006'} at step 6")
    print(f"rank 1 killed at {killed_at:.1f} s; torchrun stopped the group {noticed - killed_at:.2f} s later; the "
          f"restarted run resumed {restarted - killed_at:.1f} s after the kill; whole run {run.ended:.1f} s")
    assert noticed - killed_at < 60  # distributed.timeout_minutes: the bound; gloo and torchrun take well under 1 s
    assert "[rank 0] rank 1 (pid" in text and "its process is gone" in text  # the survivor names it too
    first, second = _sessions(out)
    assert max(first["train"]) == 7 and first["checkpoints"] == [CKPT_EVERY]
    assert second["start"]["step"] == CKPT_EVERY and sorted(second["train"]) == list(range(7, STEPS + 1))
    killed_pos, resumed_pos = _positions(out, 2)
    stream = [p for s in range(1, CKPT_EVERY + 1) for p in killed_pos[s]] + \
        [p for s in range(CKPT_EVERY + 1, STEPS + 1) for p in resumed_pos[s]]
    assert sorted(stream) == list(range(STEPS * GLOBAL_BATCH))
    root = out / "checkpoints"
    _nothing_half_written(root)
    assert [p.name for p in root.iterdir()] and not [p for p in root.iterdir() if p.name.startswith(".")]
    assert (root / "latest").read_text().strip() == "step-00000014"


@pytest.mark.slow
@pytest.mark.distributed
def test_rank_zero_killed_mid_step_ends_every_rank_under_the_deepspeed_launcher(tiny_data, tmp_path):  # noqa: F811
    """No restart here: rank 1 names rank 0 and the deepspeed launcher stops it (rank 0 hosted the rendezvous store
    here, so nothing of the group outlives it); the checkpoint of step 6 is what --resume auto takes."""
    out = tmp_path / "rank0"
    run = _Launch(_deepspeed(2, _pretrain_args(out, *tiny_data, ["--zero.stage=2"])), fault="kill:rank=0:step=8")
    text = run.text
    assert run.returncode != 0
    killed_at = run.when("BIGBIRD_JA_FAULT: kill in the middle of step 8")
    print(f"rank 0 killed at {killed_at:.1f} s; the launcher exited {run.ended - killed_at:.2f} s later")
    assert run.ended - killed_at < 60  # distributed.timeout_minutes: the bound
    assert "rank 0 (pid" in text and "its process is gone" in text
    root = out / "checkpoints"
    _nothing_half_written(root)
    assert ckpt_mod.resolve_resume("auto", root) == root / "step-00000006"


@pytest.mark.slow
@pytest.mark.distributed
def test_a_stopped_rank_is_found_by_the_watchdog_which_ends_the_job(tiny_data, tmp_path):  # noqa: F811
    """Rank 1 SIGSTOPs itself in the middle of step 8. Rank 0's watchdog notices the step running far past its
    median, writes its stacks and flight record, names rank 1 and exits; torchrun stops the rest (a stopped rank
    ignores SIGTERM: torchrun SIGKILLs it 30 s later, which the harness does at once to save the wait)."""
    out = tmp_path / "hung"
    folder = out / "watchdog"

    def kill_the_stopped_rank(launch, line):
        if "rank 1 (pid" in line and "made no progress" in line:
            rank0 = json.loads(heartbeat_path(folder, 0).read_text())["pid"]
            deadline = time.monotonic() + 10
            while process_state(rank0) not in (None, "Z") and time.monotonic() < deadline:
                time.sleep(0.05)  # rank 0 exits first, so that torchrun's summary shows its exit status
            os.kill(json.loads(heartbeat_path(folder, 1).read_text())["pid"], signal.SIGKILL)

    run = _Launch(_torchrun(2, _pretrain_args(out, *tiny_data, [
        "--zero.stage=1", "--watchdog.enabled=true", "--watchdog.min_seconds=3", "--watchdog.heartbeat_seconds=0.5"])),
        fault="stop:rank=1:step=8", on_line=kill_the_stopped_rank)
    text = run.text
    assert run.returncode != 0
    stopped_at = run.when("BIGBIRD_JA_FAULT: stop in the middle of step 8")
    found = run.when("[rank 0] watchdog: training step 8 has run for")
    print(f"rank 1 stopped at {stopped_at:.1f} s; rank 0's watchdog ended it {found - stopped_at:.1f} s later; "
          f"the launcher exited at {run.ended:.1f} s")
    assert found - stopped_at < 30
    assert f"exitcode  : {EXIT_HUNG}" in text  # torchrun's summary: rank 0 ended by its watchdog
    assert "made no progress since its last heartbeat" in text and "its process is stopped (SIGSTOP" in text
    assert "this rank is in gloo:" in text and "not completed" in text  # the collective, from the flight record
    stacks = (folder / "stacks-rank-00000.txt").read_text()
    assert "train_step" in stacks and "all_reduce" in stacks
    assert (folder / "fr_trace_rank_0").stat().st_size > 0
    end = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["reason"] == "hung"
    _nothing_half_written(out / "checkpoints")


def _after_checkpoint(step: int, action):
    def on_line(launch, line):
        if f"saved checkpoint {ckpt_mod.step_name(step)}" in line:
            action()
    return on_line


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["deleted-shard", "full-disk"])
def test_a_fault_in_the_middle_of_a_run_stops_it_cleanly_naming_the_file(tiny_data, tmp_path, fault):  # noqa: F811
    """After the checkpoint of step 6: a training shard is deleted (shards are re-mapped one at a time here; a
    shard cut short takes the same path, see the test above), or the process may no longer write files over 64 KiB
    (the checkpoint of step 12 does not fit). Each stops the run with exit status 2 and a message naming the file;
    step 6 stays the newest complete checkpoint."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data[0], data)
    out = tmp_path / "run"
    delete = _after_checkpoint(CKPT_EVERY, lambda: (data / "shard-00002.bin").unlink())
    run = _Launch([sys.executable, "-m", "bigbird_ja.cli", *_pretrain_args(
        out, data, tiny_data[1], ["--data.max_open_shards=1", "--train.max_steps=40"])],
        fault="fill-disk:rank=0:step=7:bytes=65536" if fault == "full-disk" else None,
        on_line=delete if fault == "deleted-shard" else None)
    text = run.text
    print(text[-1500:])
    assert run.returncode == 2, text[-6000:]
    expected = {
        "deleted-shard": f"error: shard '{data / 'shard-00002.bin'}' is gone: it was there when the run started",
        "full-disk": f"error: disk full: writing checkpoint step-00000012 under '{out / 'checkpoints'}'",
    }[fault]
    assert expected in text
    if fault == "full-disk":
        assert "may write no file larger than 0.1 MiB (RLIMIT_FSIZE" in text
    root = out / "checkpoints"
    _nothing_half_written(root)
    # run.json: the run's identity (written at its first step)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "run.json", "step-00000006"]
    assert (root / "latest").read_text().strip() == "step-00000006"
    end = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["reason"] == "error"
