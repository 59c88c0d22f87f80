"""The launch recipes on a real (small) cluster: hosts as network namespaces with their own names and addresses,
SLURM (slurmctld, one slurmd per host, munge) and Open MPI, built and removed by tests/cluster/vcluster.py.

Fast lane (always; 2.5-4 minutes on the shared 2-core VM, see docs/cluster.md): 2 hosts x 2 ranks, the tiny setting of
test_pretrain.py, gloo.
* `sbatch configs/launch/slurm.sbatch` as written (partition, resources, time, output path as sbatch options,
  CONFIG / GPUS_PER_NODE in the environment); after checkpoint 6 a host is lost (all its processes killed, slurmd
  included): SLURM marks it DOWN, ends the job and requeues it (the recipe's --requeue); the host reboots (slurmd
  again) and the requeued job resumes from the newest complete checkpoint and finishes: every sample read exactly
  once over the two attempts, ranks on both hosts.
* The PBS recipe (configs/launch/abci-pbs.sh) run as PBS would run it (PBS_NODEFILE naming the namespace hosts,
  PBS_JOBID, PBS_O_WORKDIR): its real `mpirun` starts the ranks on both hosts through a remote-shell agent that
  enters the host's namespaces; a rank killed mid-step makes the script's retry loop relaunch, which resumes.

Full lane (BIGBIRD_JA_CLUSTER_FULL=1, 7-10.5 minutes): the plain SLURM run over 2 and 4 hosts, a host's link taken
down mid-run, a host's link slowed (2 s latency with tc netem; a 50 kbit/s tbf limit where the kernel has no netem).
benchmarks/bench_cluster.py runs the full lane and keeps what the tests measured.

Skipped, with the reason, when not root or when slurm-wlm / munge / openmpi-bin are missing: a developer's laptop
run skips, never hangs. Every wait is bounded (the SLURM time limit, the collective timeout, the harness's own).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.vcluster import VirtualCluster, missing
from conftest import subprocess_env
from test_pretrain import CKPT_EVERY, GLOBAL_BATCH, REPO, STEPS, TINY, _positions, _sessions
from test_pretrain import tiny_data  # noqa: F401  (a fixture: the data the trainer's own preparation makes)
from test_fault_tolerance import _nothing_half_written

FULL = os.environ.get("BIGBIRD_JA_CLUSTER_FULL") == "1"
full_lane = pytest.mark.skipif(not FULL, reason="cluster full lane: set BIGBIRD_JA_CLUSTER_FULL=1 (docs/cluster.md)")
# benchmarks/bench_cluster.py runs these tests and collects what they measured from this file (JSON lines)
RESULTS = os.environ.get("BIGBIRD_JA_CLUSTER_RESULTS")
WHY_NOT = missing(mpi=True)
needs_cluster = pytest.mark.skipif(WHY_NOT is not None, reason=f"cluster: {WHY_NOT}")

SLURM_RECIPE = REPO / "configs" / "launch" / "slurm.sbatch"
PBS_RECIPE = REPO / "configs" / "launch" / "abci-pbs.sh"
PER_HOST = 2
# micro-batch 2: the global batch of 8 over 4 ranks; the collective timeout bounds every wait on a lost rank
RUN = [*TINY, "--batch.micro_batch_size=2", "--zero.stage=1", "--distributed.timeout_minutes=1"]
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")  # so that the teardown below runs (a timeout sends SIGTERM)

    previous = signal.signal(signal.SIGTERM, interrupted)
    vc = VirtualCluster(tmp_path_factory.mktemp("cluster"), hosts=2, cpus=2, gpus=PER_HOST)
    vc.up()
    try:
        yield vc
    finally:
        vc.down()
        signal.signal(signal.SIGTERM, previous)


def workdir(tmp: Path) -> Path:
    """A submit folder standing in for the repository root the recipes expect (`.venv`, `configs/`); the job's
    files (runs/hostfile.*) land there, not in the checkout."""
    root = tmp / "submit"
    root.mkdir()
    (root / ".venv").symlink_to(Path(sys.prefix))
    (root / "configs").symlink_to(REPO / "configs")
    return root


def pretrain_args(out: Path, data: Path, tok: Path, extra=()) -> list[str]:
    return [f"--run.output_dir={out}", f"--data.dir={data}", f"--data.tokenizer={tok}", *RUN, *extra]


def job_env(**values) -> dict:
    env = dict(subprocess_env(), CONFIG="configs/pretrain/tiny-cpu.yaml", GPUS_PER_NODE=str(PER_HOST), **values)
    env.pop("USER", None)  # as from cron, CI or a container: sbatch passes on the submitter's environment
    return env


def sbatch(cluster: VirtualCluster, root: Path, args: list[str], nodes: int, env: dict) -> str:
    """`sbatch configs/launch/slurm.sbatch ARGS` from the first host, the recipe untouched: only the partition,
    resources, time limit and output path are set, as sbatch options (they override the #SBATCH lines)."""
    options = [f"--nodes={nodes}", "--partition=bbj", f"--gpus-per-node={PER_HOST}", f"--cpus-per-task={PER_HOST}",
               "--time=10", f"--output={root}/slurm-%j.out", f"--chdir={root}"]
    return cluster.run(cluster.names[0], ["sbatch", "--parsable", *options, str(SLURM_RECIPE), *args], env=env,
                       cwd=root).strip().split(";")[0]


class Timeline:
    """Polls the run's metrics.jsonl and a job's state every 0.2 s; keeps when each thing was first seen."""

    def __init__(self, cluster: VirtualCluster, out: Path, job: str | None = None):
        self.cluster, self.out, self.job = cluster, out, job
        self.t0 = time.monotonic()
        self.seen: dict[str, float] = {}

    def now(self) -> float:
        return time.monotonic() - self.t0

    def records(self) -> list[dict]:
        try:
            return [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines() if line]
        except (OSError, ValueError):
            return []

    def train_steps(self) -> list[int]:
        return [r["step"] for r in self.records() if r["event"] == "train"]

    def wait(self, what: str, cond, timeout: float, context=lambda: "", ended=lambda: False) -> float:
        """Seconds from the start until ``cond()``; fails at ``timeout`` or as soon as ``ended()`` says it never
        will (the job is over)."""
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline or ended():
                raise AssertionError(f"not seen within {timeout:.0f} s: {what}\n{context()}")
            time.sleep(0.2)
        self.seen.setdefault(what, self.now())
        return self.seen[what]

    def state(self) -> dict:
        return self.cluster.job(self.job) if self.job else {}

    def job_over(self) -> bool:
        return self.state().get("JobState") in DONE


def record(case: str, **figures) -> None:
    rounded = {k: round(v, 1) if isinstance(v, float) else v for k, v in figures.items()}
    print(f"{case}: {json.dumps(rounded)}")
    if RESULTS:
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(json.dumps({"case": case, **rounded}) + "\n")


def slurm_log(root: Path, tail: int | None = 8000) -> str:
    return "\n".join(p.read_text(errors="replace")[-(tail or 0):] for p in sorted(root.glob("slurm-*.out")))


def every_sample_once(out: Path, world: int, sessions: int) -> None:
    """Steps 1..checkpoint from each session up to its checkpoint, the rest from the last: every stream position
    of STEPS x GLOBAL_BATCH read exactly once (the sample accounting of test_fault_tolerance.py)."""
    per_session = _positions(out, world)
    assert len(per_session) == sessions, f"{len(per_session)} sessions in the sample logs, expected {sessions}"
    starts = [s["start"]["step"] for s in _sessions(out)] + [STEPS]
    stream = [p for k, steps in enumerate(per_session) for s in range(starts[k] + 1, starts[k + 1] + 1)
              for p in steps[s]]
    assert sorted(stream) == list(range(STEPS * GLOBAL_BATCH))


def hosts_of_ranks(out: Path) -> set[str]:
    """Where the ranks ran, from their watchdog heartbeats (on by default over several nodes)."""
    return {json.loads(p.read_text())["host"] for p in (out / "watchdog").glob("rank-*.json")}


# ----------------------------------------------------------------------------------------------------------------
# Fast lane


def test_without_root_or_the_packages_the_cluster_tests_skip_saying_why(monkeypatch):
    import cluster.vcluster as vc

    monkeypatch.setattr(vc.os, "geteuid", lambda: 1000)
    assert "needs root" in vc.missing(mpi=True)
    monkeypatch.setattr(vc.os, "geteuid", lambda: 0)
    monkeypatch.setattr(vc.shutil, "which", lambda prog: None if prog in ("sbatch", "mpirun") else f"/usr/bin/{prog}")
    assert vc.missing(mpi=True) == ("needs the Debian packages openmpi-bin slurm-wlm: apt-get install -y openmpi-bin "
                                    "slurm-wlm")


@pytest.mark.slow
@pytest.mark.distributed
@needs_cluster
@full_lane
@pytest.mark.parametrize("hosts", [2, 4])
def test_the_slurm_recipe_as_written_trains_over_the_hosts_to_the_end(
        cluster, tiny_data, tmp_path, hosts):  # noqa: F811
    """The plain case (the fast lane's host-loss test also runs the recipe to the end, after its requeue)."""
    own = None
    if hosts != len(cluster.names):
        own = VirtualCluster(tmp_path / "cluster", hosts=hosts, cpus=2, gpus=PER_HOST).up()
    vc = own or cluster
    try:
        root, out = workdir(tmp_path), tmp_path / "out"
        job = sbatch(vc, root, pretrain_args(out, *tiny_data, [f"--batch.micro_batch_size={8 // (2 * hosts)}"]),
                     nodes=hosts, env=job_env())
        t = Timeline(vc, out, job)
        first = t.wait("first step", t.train_steps, 240, lambda: f"{t.state()}\n{slurm_log(root)}", t.job_over)
        t.wait("job completed", t.job_over, 240, lambda: slurm_log(root))
        record(f"slurm-{hosts}x{PER_HOST}", sbatch_to_first_step_s=first, sbatch_to_done_s=t.seen["job completed"])
        assert t.state()["JobState"] == "COMPLETED", slurm_log(root)
        (session,) = _sessions(out)
        assert session["start"]["world_size"] == hosts * PER_HOST
        assert sorted(session["train"]) == list(range(1, STEPS + 1))
        every_sample_once(out, hosts * PER_HOST, sessions=1)
        assert hosts_of_ranks(out) == set(vc.names)
        # the recipe's host list and rendezvous host came from SLURM's node list
        assert (root / "runs" / f"hostfile.{job}").read_text() == "".join(f"{h} slots={PER_HOST}\n" for h in vc.names)
    finally:
        if own is not None:
            own.down()


def checkpoint_saved(t: Timeline, step: int):
    return lambda: any(r["event"] == "checkpoint" and r["step"] == step for r in t.records())


def sessions_started(t: Timeline, n: int):
    return lambda: sum(r["event"] == "start" for r in t.records()) >= n


def run_to_checkpoint(cluster: VirtualCluster, tiny_data, tmp_path: Path):
    """sbatch the recipe over 2 hosts and wait for its checkpoint of step CKPT_EVERY: (out folder, timeline, log)."""
    root, out = workdir(tmp_path), tmp_path / "out"
    job = sbatch(cluster, root, pretrain_args(out, *tiny_data), nodes=2, env=job_env())
    t = Timeline(cluster, out, job)
    log = lambda: f"{t.state()}\n{slurm_log(root)}"  # noqa: E731
    t.wait("first step", t.train_steps, 150, log, t.job_over)
    t.wait("checkpoint 6", checkpoint_saved(t, CKPT_EVERY), 150, log, t.job_over)
    return root, out, t, log


@pytest.mark.slow
@pytest.mark.distributed
@needs_cluster
def test_a_host_lost_mid_run_is_requeued_by_slurm_and_the_next_attempt_reads_every_sample_once(
        cluster, tiny_data, tmp_path):  # noqa: F811
    """bbjn1 loses power after the checkpoint of step 6: slurmd, slurmstepd and its ranks SIGKILLed at once. SLURM
    finds the node silent (SlurmdTimeout), ends the job and requeues it (--requeue in the recipe); the host reboots
    (slurmd again, ReturnToService=2) and the requeued job continues from step 6 (--resume auto)."""
    lost = cluster.names[1]
    root, out, t, log = run_to_checkpoint(cluster, tiny_data, tmp_path)
    killed = t.now()
    assert cluster.kill_host(lost), f"nothing ran on {lost}"
    last_before = max(t.train_steps())
    down = t.wait("node down", lambda: cluster.node_states().get(lost, "").startswith("down"), 90, log)
    requeued = t.wait("job requeued", lambda: int(t.state().get("Restarts", 0)) >= 1, 60, log)
    cluster.start_slurmd(lost)  # the host comes back
    cluster.wait_nodes("idle", [lost], 60) if t.state().get("JobState") == "PENDING" else None
    rejoined = t.now()
    resumed = t.wait("resumed", sessions_started(t, 2), 240, log)
    t.wait("job completed", t.job_over, 150, log)
    record("slurm-host-killed", sbatch_to_first_step_s=t.seen["first step"], killed_at_s=killed,
           detected_node_down_s=down - killed, requeued_s=requeued - killed, host_back_s=rejoined - killed,
           resumed_after_kill_s=resumed - killed, resumed_after_host_back_s=resumed - rejoined,
           done_s=t.seen["job completed"] - killed, restarts=t.state().get("Restarts"))
    assert t.state()["JobState"] == "COMPLETED", log()
    assert t.state()["Restarts"] == "1"
    first, second = _sessions(out)
    assert max(first["train"]) < STEPS and last_before < STEPS  # it was lost mid-run
    assert second["start"]["step"] == CKPT_EVERY and max(second["train"]) == STEPS
    every_sample_once(out, 2 * PER_HOST, sessions=2)
    assert hosts_of_ranks(out) == set(cluster.names)
    _nothing_half_written(out / "checkpoints")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000014"
    # the first attempt's output is still there after the requeue (SLURM appends to a requeued job's file)
    assert slurm_log(root, tail=None).count("resolved config (tiny-cpu)") == 2


class Script:
    """A command on a host, its output collected with the time of each line; killed (its process group) after
    ``limit`` s."""

    def __init__(self, cluster: VirtualCluster, host: str, argv: list[str], env: dict, cwd: Path, limit: float):
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cluster.on(host, argv, cwd), env=dict(env, **cluster.env()), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.timer = threading.Timer(limit, self.kill)
        self.timer.start()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.t0, line))

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass

    def wait(self) -> int:
        try:
            code = self.proc.wait()
            self.reader.join(10)
        finally:
            self.timer.cancel()
            self.kill()
        return code

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)

    def when(self, fragment: str) -> float:
        return next(t for t, line in self.lines if fragment in line)


def rank_pid(out: Path, rank: int) -> int:
    return json.loads((out / "watchdog" / f"rank-{rank:05d}.json").read_text())["pid"]


@pytest.mark.slow
@pytest.mark.distributed
@needs_cluster
def test_the_pbs_recipe_launches_with_mpirun_over_the_hosts_and_relaunches_after_a_rank_dies(
        cluster, tiny_data, tmp_path):  # noqa: F811
    """configs/launch/abci-pbs.sh from where PBS hands over: PBS_NODEFILE names each host once per CPU (as PBS
    does), the script makes its hostfile and runs the real `mpirun` (one process per rank on each host, started on
    the other host through tests/cluster/netns-rsh in place of ssh). The harness SIGKILLs rank 3 (on the second
    host) after the checkpoint of step 6: mpirun ends every rank and exits non-zero, the script's retry loop runs it
    again, which resumes from step 6 and finishes; every sample read once."""
    root, out = workdir(tmp_path), tmp_path / "out"
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("".join(f"{h}\n" * 2 for h in cluster.names))
    env = job_env(PBS_NODEFILE=str(nodefile), PBS_JOBID="42.pbs1", PBS_O_WORKDIR=str(root), MAX_RESTARTS="1")
    t = Timeline(cluster, out)
    run = Script(cluster, cluster.names[0], ["bash", str(PBS_RECIPE), *pretrain_args(out, *tiny_data)], env, root,
                 limit=400)
    t.t0 = run.t0
    t.wait("first step", t.train_steps, 200, lambda: run.text[-6000:], lambda: run.proc.poll() is not None)
    t.wait("checkpoint 6", checkpoint_saved(t, CKPT_EVERY), 200, lambda: run.text[-6000:],
           lambda: run.proc.poll() is not None)
    victim_host = json.loads((out / "watchdog" / "rank-00003.json").read_text())["host"]
    os.kill(rank_pid(out, 3), signal.SIGKILL)
    killed = t.now()
    code = run.wait()
    text = run.text
    (tmp_path / "pbs.out").write_text(text)
    assert code == 0, text[-6000:]
    noticed = run.when("attempt 0 failed") - killed
    resumed = run.when(f"resumed from {out / 'checkpoints' / 'step-00000006'} at step 6") - killed
    record("pbs-mpirun-rank-killed", start_to_first_step_s=t.seen["first step"], killed_at_s=killed,
           detected_mpirun_exit_s=noticed, resumed_after_kill_s=resumed, done_s=run.lines[-1][0] - killed)
    assert victim_host == cluster.names[1]  # --map-by ppr:2:node: ranks 2, 3 on the second host
    assert (root / "runs" / "hostfile.42").read_text() == "".join(f"{h} slots={PER_HOST}\n" for h in cluster.names)
    first, second = _sessions(out)
    assert first["start"]["world_size"] == second["start"]["world_size"] == 2 * PER_HOST
    assert max(first["train"]) < STEPS and second["start"]["step"] == CKPT_EVERY
    every_sample_once(out, 2 * PER_HOST, sessions=2)
    assert hosts_of_ranks(out) == set(cluster.names)
    _nothing_half_written(out / "checkpoints")


# ----------------------------------------------------------------------------------------------------------------
# Full lane: network faults


@pytest.mark.slow
@pytest.mark.distributed
@needs_cluster
@full_lane
@pytest.mark.parametrize("fault", ["link-down", "slow-link"])
def test_a_host_cut_off_or_slowed_mid_run_ends_the_attempt_in_bounded_time_and_the_requeue_resumes(
        cluster, tiny_data, tmp_path, fault):  # noqa: F811
    """After the checkpoint of step 6, bbjn1's cable is pulled (both ends of its link down) or its link slowed
    (2 s latency each way with netem, or a 50 kbit/s limit where the kernel has no netem). Whatever notices first
    (SLURM's node ping after SlurmdTimeout, gloo's collective timeout, the watchdog) ends the attempt; the link is
    restored once the job has been requeued or has ended, and the next attempt resumes from the newest complete
    checkpoint, every sample read once."""
    hit_host = cluster.names[1]
    root, out, t, log = run_to_checkpoint(cluster, tiny_data, tmp_path)
    ctld_log = cluster.root / "log" / "slurmctld.log"
    ctld_before = len(ctld_log.read_text())
    hit = t.now()
    applied = "link down" if fault == "link-down" else cluster.slow(hit_host)
    if fault == "link-down":
        cluster.link(hit_host, up=False)
    last_before = max(t.train_steps())
    try:
        ended = t.wait("attempt ended", lambda: int(t.state().get("Restarts", 0)) >= 1 or t.job_over()
                       or sessions_started(t, 2)(), 300, log)
    finally:
        cluster.link(hit_host, up=True) if fault == "link-down" else cluster.unslow(hit_host)
    restored = t.now()
    first_attempt = slurm_log(root, tail=None)
    if t.state().get("JobState") == "PENDING":
        cluster.wait_nodes("idle", [hit_host], 90)
    resumed = t.wait("resumed", sessions_started(t, 2), 240, log, lambda: t.job_over() and not sessions_started(t, 2)())
    t.wait("job completed", t.job_over, 240, log)
    ctld = ctld_log.read_text()[ctld_before:].splitlines()  # what SLURM said from the fault on
    named = [line for line in ctld if hit_host in line and ("not responding" in line or "DOWN" in line)]
    errors = [line.strip() for line in first_attempt.splitlines() if "rank" in line.lower() and (
        "timed out" in line.lower() or "timeout" in line.lower() or "connection" in line.lower())][:3]
    record(f"slurm-{fault}", applied=applied, hit_at_s=hit, steps_before=last_before, detected_s=ended - hit,
           restored_s=restored - hit, resumed_after_restore_s=resumed - restored, resumed_after_hit_s=resumed - hit,
           slurmctld=[line for line in ctld if "bbjn" in line or "requeue" in line.lower()][:4],
           rank_errors=errors, restarts=t.state().get("Restarts"),
           resumed_from_step=_sessions(out)[1]["start"]["step"] if len(_sessions(out)) > 1 else None)
    assert t.state()["JobState"] == "COMPLETED", log()
    first, second = _sessions(out)[:2]
    # from the checkpoint of step 6, or a later one: the ranks SLURM ends get SIGTERM and, when their step can still
    # finish over a slow link, save on it (checkpoint.save_on_sigterm)
    assert max(first["train"]) < STEPS and CKPT_EVERY <= second["start"]["step"] < STEPS
    every_sample_once(out, 2 * PER_HOST, sessions=len(_sessions(out)))
    _nothing_half_written(out / "checkpoints")
    if fault == "link-down":
        assert named, "slurmctld did not name the cut-off host"
