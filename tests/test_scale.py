"""Rehearsal of a large run at CI size: `bigbird-ja pretrain` at 4 ranks started as 2 "nodes" of 2 (two torchrun
invocations on 127.0.0.1, as a two-node job starts them), then resumed from its checkpoint at 3 ranks and at 2:
every training sample is read exactly once across the world-size switches (counted by sample id), the global batch
is kept (the accumulation steps follow the world size), and the loss goes on as in an uninterrupted run.

The rehearsal at 4, 8 and 16 ranks with descriptor, memory, start-up and checkpoint figures is
benchmarks/bench_scale.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _free_port, cli_command, subprocess_env
from test_pretrain import TINY, tiny_data  # noqa: F401  (tiny_data: a fixture, the data the trainer's own preparation makes)

REPO = Path(__file__).resolve().parents[1]
GLOBAL = 12  # divisible by 4, 3, 2 and 1 ranks at micro-batch 1
STEPS_PER_SESSION = 2
ELASTIC = [
    "--model.overrides.hidden_dropout_prob=0.0", "--model.overrides.attention_probs_dropout_prob=0.0",
    f"--batch.global_batch_size={GLOBAL}", "--batch.micro_batch_size=1", "--zero.stage=1",
    f"--checkpoint.every_steps={STEPS_PER_SESSION}", "--checkpoint.keep_last=1", "--eval.every_steps=0",
]


def _args(out: Path, data: Path, tok: Path, steps: int, resume: bool) -> list[str]:
    return ["pretrain", "--config", "configs/pretrain/tiny-cpu.yaml", f"--run.output_dir={out}",
            f"--data.dir={data}", f"--data.tokenizer={tok}", *TINY, *ELASTIC, f"--train.max_steps={steps}",
            *(["--resume", "auto"] if resume else [])]


def two_node_commands(per_node: int, args: list[str]) -> list[list[str]]:
    """Two torchrun invocations, node ranks 0 and 1, meeting at 127.0.0.1 (as two hosts of one job would)."""
    port = _free_port()
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", str(per_node), "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "bigbird_ja.cli", *args] for node in range(2)]


def _run_all(cmds: list[list[str]], timeout: int = 400) -> str:
    procs = [subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for cmd in cmds]
    outputs = []
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, cmd, output in zip(procs, cmds, outputs):
        assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{output[-6000:]}"
    return "\n".join(outputs)


def read_sample_logs(out: Path) -> dict[int, dict]:
    """step -> {"positions": [...], "indices": [...]} over every rank of every session."""
    steps: dict[int, dict] = {}
    for path in sorted(out.glob("samples-rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "step" in record:
                entry = steps.setdefault(record["step"], {"positions": [], "indices": []})
                entry["positions"] += record["positions"]
                entry["indices"] += record["indices"]
    return steps


def read_sessions(out: Path) -> list[dict]:
    sessions = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["event"] == "start":
            sessions.append({"start": record, "train": {}})
        elif record["event"] == "train":
            sessions[-1]["train"][record["step"]] = record["loss"]
    return sessions


@pytest.mark.slow
@pytest.mark.distributed
def test_four_ranks_on_two_nodes_resume_at_three_then_two_reading_every_sample_once(tiny_data, tmp_path):  # noqa: F811
    data_dir, tok = tiny_data
    out, reference = tmp_path / "elastic", tmp_path / "reference"
    worlds = [4, 3, 2]
    total = STEPS_PER_SESSION * len(worlds)
    # 4 ranks as two "nodes" of 2, then 3 and 2 ranks under DeepSpeed's launcher, each from the last checkpoint.
    _run_all(two_node_commands(2, _args(out, data_dir, tok, STEPS_PER_SESSION, resume=False)))
    for k, world in enumerate(worlds[1:], start=2):
        _run_all([cli_command(world, _args(out, data_dir, tok, STEPS_PER_SESSION * k, resume=True))])
    # The same steps without a switch: one process accumulating all 12 micro-batches.
    _run_all([cli_command(1, _args(reference, data_dir, tok, total, resume=False))])

    sessions = read_sessions(out)
    assert [s["start"]["world_size"] for s in sessions] == worlds
    assert [s["start"]["step"] for s in sessions] == [0, 2, 4]
    # The global batch is kept: the accumulation follows the world size.
    assert [s["start"]["global_batch_size"] for s in sessions] == [GLOBAL] * 3
    assert [s["start"]["grad_accum_steps"] for s in sessions] == [GLOBAL // w for w in worlds]
    # Exactly once, counted by sample: every stream position 0..71 read once, each by one rank, and (all within the
    # first epoch) 72 distinct samples: the same ones, step by step, as the run that never changed world size.
    steps = read_sample_logs(out)
    assert sorted(steps) == list(range(1, total + 1))
    positions = [p for s in steps.values() for p in s["positions"]]
    indices = [i for s in steps.values() for i in s["indices"]]
    assert sorted(positions) == list(range(total * GLOBAL))
    assert len(set(indices)) == len(indices) == total * GLOBAL
    ref_steps = read_sample_logs(reference)
    assert all(sorted(steps[s]["indices"]) == sorted(ref_steps[s]["indices"]) for s in steps)
    # The loss goes on from where it stopped: the same as the uninterrupted run at every step (only the order of
    # the sums differs).
    losses = {step: loss for s in sessions for step, loss in s["train"].items()}
    (ref_session,) = read_sessions(reference)
    worst = max(abs(losses[step] - loss) / abs(loss) for step, loss in ref_session["train"].items())
    print(f"losses across 4 -> 3 -> 2 ranks vs one process: largest relative difference {worst:.2e}")
    for step, loss in ref_session["train"].items():
        assert abs(losses[step] - loss) < 1e-5 * abs(loss), (step, losses[step], loss)


def test_cpu_offload_that_cannot_fit_host_memory_is_refused_before_training():
    from bigbird_ja.training.config import load_pretrain_config
    from bigbird_ja.training.preflight import check_offload_host_memory

    def cfg(offload: str):
        return load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml",
                                    ["--zero.stage=2", f"--zero.offload_optimizer={offload}"])

    host = 256 << 30
    # 16 ranks on 2 nodes hold 8/16 of 16 B x 40 G parameters = 320 GB per node: more than 80% of 256 GiB.
    problem = check_offload_host_memory(cfg("cpu"), 16, 2, 40 * 10 ** 9, host_bytes=host)
    assert problem and "8 ranks on this node" in problem and "298.0 GiB" in problem and "more nodes" in problem
    assert check_offload_host_memory(cfg("cpu"), 64, 8, 40 * 10 ** 9, host_bytes=host) is None  # spread wider
    assert check_offload_host_memory(cfg("cpu"), 16, 2, 10 ** 9, host_bytes=host) is None  # a base-size model
    assert check_offload_host_memory(cfg("none"), 16, 2, 40 * 10 ** 9, host_bytes=host) is None
