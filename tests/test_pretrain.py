"""`bigbird-ja pretrain` / `export`: config loading, DeepSpeed JSON, checkpoints, and real runs on CPU (gloo).

The process tests share one tiny setting: a 64-wide, 2-layer model on 128-token sequences packed from the bundled
corpus (109 sequences: 6 training shards of 16 and a held-out shard of 13), global batch 8, 14 steps (one epoch is
12 steps, so the runs cross an epoch boundary). The one-process run prepares the data itself (tokenizer included),
as the README's main job does; the two-process runs (deepspeed launcher, ZeRO-1/2/3) use the same data made by the
same function in-process. The ZeRO-2 run is the uninterrupted reference for the kill-and-resume, world-size-change
and export tests. Nothing is downloaded. Subprocesses run with one thread each (see `_env`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from bigbird_ja.training import checkpoint as ckpt_mod
from conftest import cli_command, subprocess_env
from bigbird_ja.training.config import (
    BatchPlan, ConfigError, deepspeed_config, load_pretrain_config, parse_overrides, resolve_batch,
)

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))
# The world size each preset is written for (its header names the hardware).
PRESET_WORLD = {"tiny-cpu": 1, "base-4096-1node": 8, "base-4096-multinode": 256, "large-4096-multinode": 512}

STEPS, CKPT_EVERY, GLOBAL_BATCH = 14, 6, 8
TINY = [
    "--model.overrides.hidden_size=64", "--model.overrides.intermediate_size=128",
    "--model.overrides.num_hidden_layers=2", "--model.overrides.num_attention_heads=4",
    "--model.overrides.max_position_embeddings=128", "--model.overrides.position_buckets=32",
    "--model.overrides.block_size=16", "--model.overrides.num_global_blocks=1",
    "--model.overrides.num_random_blocks=1",
    "--prepare.seq_len=128", "--prepare.shard_tokens=2048", "--data.eval_shards=1",
    f"--batch.global_batch_size={GLOBAL_BATCH}", "--batch.micro_batch_size=4",
    f"--train.max_steps={STEPS}", "--optim.warmup_steps=2", "--optim.lr=2e-3",
    f"--checkpoint.every_steps={CKPT_EVERY}", "--checkpoint.keep_last=2",
    "--eval.every_steps=7", "--eval.samples=8", "--log.every_steps=1", "--log.sample_log=true",
    "--log.progress_bar=false", "--log.tensorboard=false",
]


# ----------------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_parses_and_gives_a_deepspeed_config(preset):
    from deepspeed.runtime.config import DeepSpeedConfig

    from bigbird_ja.training.trainer import resolve_model_config

    text = preset.read_text(encoding="utf-8")
    assert text.startswith("#") and "Hardware" in text.split("\n\n")[0], "the header must name the hardware"
    cfg = load_pretrain_config(preset)
    world = PRESET_WORLD[preset.stem]
    plan = resolve_batch(cfg.batch, world)
    assert plan.global_batch_size == cfg.batch.global_batch_size
    ds = deepspeed_config(cfg, plan, cuda=True)
    json.dumps(ds)
    # DeepSpeed parses the same settings (it sees one process here: fold the world size into the accumulation).
    one = deepspeed_config(cfg, BatchPlan(plan.micro_batch_size, plan.grad_accum_steps * world, 1), cuda=True)
    parsed = DeepSpeedConfig(one)
    assert parsed.zero_optimization_stage == cfg.zero.stage
    assert parsed.train_batch_size == cfg.batch.global_batch_size
    assert parsed.gradient_clipping == cfg.optim.grad_clip
    model = resolve_model_config(cfg, vocab_size=32000, seq_len=cfg.prepare.seq_len)
    assert model.max_position_embeddings >= cfg.prepare.seq_len


def test_every_field_of_every_section_is_documented_in_its_section():
    """Each section's docstring has a `field: meaning` line per field, so the documentation cannot drift."""
    import dataclasses
    import re
    import typing

    from bigbird_ja.training.config import PretrainConfig

    for name, section in typing.get_type_hints(PretrainConfig).items():
        undocumented = [f.name for f in dataclasses.fields(section)
                        if not re.search(rf"^\s*{f.name}:", section.__doc__ or "", re.M)]
        assert not undocumented, f"{section.__name__} ({name}) does not document {undocumented}"


def test_unknown_keys_are_errors_that_list_the_valid_ones(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) \['max_step'\]; valid keys are .*'max_steps'"):
        load_pretrain_config(path)
    path.write_text("trian: {}\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['trian'\].*'train'"):
        load_pretrain_config(path)
    with pytest.raises(ConfigError, match=r"zero: unknown key\(s\) \['stages'\]"):
        load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml", ["--zero.stages=2"])


def test_overrides_are_typed_and_checked_by_the_same_code():
    preset = REPO / "configs/pretrain/tiny-cpu.yaml"
    cfg = load_pretrain_config(preset, ["--train.max_steps=7", "--optim.lr", "3e-4", "--optim.betas=[0.8,0.9]",
                                        "--zero.reduce_bucket_size=5e8", "--model.overrides.hidden_size=64",
                                        "--checkpoint.dir=null"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.zero.reduce_bucket_size == 500_000_000 and isinstance(cfg.zero.reduce_bucket_size, int)
    assert cfg.model.overrides["hidden_size"] == 64
    assert cfg.model.overrides["max_position_embeddings"] == 256  # the preset's other overrides stay
    assert cfg.checkpoint.dir is None
    with pytest.raises(ConfigError, match=r"train.max_steps: expected an integer, got 'many'"):
        load_pretrain_config(preset, ["--train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"train.precision: 'fp16' is not one of \['bf16', 'fp32'\]"):
        load_pretrain_config(preset, ["--train.precision=fp16"])
    with pytest.raises(ConfigError, match=r"zero.stage=4: must be 0, 1, 2 or 3"):
        load_pretrain_config(preset, ["--zero.stage=4"])
    with pytest.raises(ConfigError, match=r"expected --section.key=value"):
        parse_overrides(["--max_steps=3"])
    # the resolved config saved with a run loads back to the same config
    assert load_pretrain_config(None, __import__("yaml").safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("micro, accum, glob, world, message", [
    (4, None, 10, 2, r"global_batch_size=10 is not a multiple of micro_batch_size=4 x world_size=2 = 8.*Use "
                     r"global_batch_size=8 or 16"),
    (4, 3, 16, 2, r"global_batch_size=16 != micro_batch_size=4 x grad_accum_steps=3 x world_size=2 = 24"),
    (8, None, 4, 1, r"global_batch_size=4 is not a multiple of micro_batch_size=8 x world_size=1 = 8.*Use "
                    r"global_batch_size=8 or 16"),
])
def test_batch_identity_errors_name_the_numbers_and_the_fix(micro, accum, glob, world, message):
    from bigbird_ja.training.config import BatchSection

    with pytest.raises(ConfigError, match=message):
        resolve_batch(BatchSection(micro_batch_size=micro, global_batch_size=glob, grad_accum_steps=accum), world)


def test_batch_identity_derives_the_accumulation_for_any_world_size():
    from bigbird_ja.training.config import BatchSection

    batch = BatchSection(micro_batch_size=4, global_batch_size=64)
    assert [resolve_batch(batch, w).grad_accum_steps for w in (1, 2, 4, 16)] == [16, 8, 4, 1]


def test_deepspeed_json_is_generated_from_the_config():
    cfg = load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml", [
        "--zero.stage=3", "--train.precision=bf16", "--optim.schedule=cosine", "--optim.min_lr_ratio=0.1",
        "--optim.grad_clip=0.5", "--batch.micro_batch_size=2", "--batch.global_batch_size=16"])
    ds = deepspeed_config(cfg, resolve_batch(cfg.batch, 2), cuda=True)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (16, 2, 4)
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and "stage3_prefetch_bucket_size" in ds["zero_optimization"]
    assert "allgather_bucket_size" not in ds["zero_optimization"] and "offload_optimizer" not in ds["zero_optimization"]
    adam = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW" and adam["torch_adam"] and adam["fused"]  # nothing to JIT-compile
    assert ds["scheduler"]["type"] == "WarmupCosineLR" and ds["scheduler"]["params"]["cos_min_ratio"] == 0.1
    cpu = deepspeed_config(cfg, resolve_batch(cfg.batch, 2), cuda=False)
    assert "fused" not in cpu["optimizer"]["params"]
    off = load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml", ["--zero.stage=2",
                                                                         "--zero.offload_optimizer=cpu"])
    assert deepspeed_config(off, resolve_batch(off.batch, 1), cuda=True)["zero_optimization"]["offload_optimizer"] \
        == {"device": "cpu", "pin_memory": True}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint discovery and preflight (no training)


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    """A folder laid out like a checkpoint; `complete` writes its checkpoint.json."""
    path = root / ckpt_mod.step_name(step)
    (path / "engine" / "engine").mkdir(parents=True)
    (path / "engine" / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    if complete:
        meta = {"format": ckpt_mod.FORMAT, "version": 1, "step": step, "world_size": 1, "trainer": {},
                "files": ckpt_mod._listing(path)}
        (path / ckpt_mod.META).write_text(json.dumps(meta))
    return path


def test_resume_auto_never_picks_an_interrupted_or_damaged_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    good = _fake_checkpoint(root, 6)
    _fake_checkpoint(root, 3)
    _fake_checkpoint(root, 12, complete=False)  # killed before checkpoint.json: the rename never happened here,
    (root / ".tmp-step-00000018" / "engine").mkdir(parents=True)  # ... and what a kill mid-write really leaves
    truncated = _fake_checkpoint(root, 9)
    (truncated / "engine" / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    (root / "latest").write_text("step-00000012\n")  # a pointer to the damaged one is not followed
    assert ckpt_mod.check_complete(truncated).startswith("engine/engine/mp_rank_00_model_states.pt has 10 bytes")
    assert ckpt_mod.resolve_resume("auto", root) == good
    assert ckpt_mod.resolve_resume("none", root) is None
    assert ckpt_mod.resolve_resume(str(root), root) == good
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt_mod.resolve_resume(str(root / "step-00000012"), root)
    assert ckpt_mod.resolve_resume("auto", tmp_path / "nothing-here") is None


def test_preflight_reports_missing_shards_tokenizer_mismatch_files_and_disk(tiny_data, tmp_path):
    from bigbird_ja.data.fingerprint import load_tokenizer
    from bigbird_ja.training.preflight import raise_open_file_limit, run_preflight

    data, tok = tiny_data
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    cfg = load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml", [
        f"--data.dir={copy}", f"--data.tokenizer={tok}", f"--run.output_dir={tmp_path / 'run'}"])
    tokenizer = load_tokenizer(tok)
    ok = run_preflight(cfg, rank=0, world_size=2, num_nodes=1, tokenizer=tokenizer, num_params=10_000)
    assert ok.problems == [] and ok.manifest is not None

    (copy / "shard-00002.bin").unlink()
    other = load_tokenizer(tok)
    other.add_tokens(["新しい語"])
    bad = run_preflight(cfg, rank=0, world_size=2, num_nodes=1, tokenizer=other, num_params=10 ** 15)
    text = "\n".join(bad.problems)
    assert "shard-00002.bin' listed in the manifest is missing" in text
    shutil.copy(data / "shard-00002.bin", copy / "shard-00002.bin")
    bad = run_preflight(cfg, rank=0, world_size=2, num_nodes=1, tokenizer=other, num_params=10 ** 15)
    text = "\n".join(bad.problems)
    assert "tokenizer fingerprint" in text and "disk: checkpoints under" in text

    soft, hard, problem = raise_open_file_limit(10 ** 9)
    assert problem is not None and "ulimit -n 1000000000" in problem and soft == hard  # soft raised to hard

    offload = load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml", [
        f"--data.dir={copy}", f"--data.tokenizer={tok}", "--zero.stage=2", "--zero.offload_optimizer=cpu"])
    warned = run_preflight(offload, rank=0, world_size=16, num_nodes=2, tokenizer=tokenizer)
    assert any("offload" in w for w in warned.warnings)


def test_the_open_file_error_names_the_peers_not_the_descriptor_estimate():
    """Regression: the message said "sockets to <descriptor estimate> peers" instead of the world size."""
    from bigbird_ja.training.preflight import raise_open_file_limit

    _, _, problem = raise_open_file_limit(10 ** 9, raise_soft=False, world_size=64)
    assert "sockets to 64 peers" in problem and "1000000000 peers" not in problem


def test_the_disk_check_counts_checkpoints_already_there(tmp_path):
    """One disk check (`check_checkpoint_disk`), run by the trainer and by `run_preflight`: with keep_last
    checkpoints on disk already only one more is needed at the peak."""
    from bigbird_ja.training.preflight import check_checkpoint_disk, checkpoint_bytes

    cfg = load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml", [
        f"--run.output_dir={tmp_path / 'run'}", "--checkpoint.keep_last=2"])
    free = shutil.disk_usage(tmp_path).free
    params = int(free / checkpoint_bytes(1, cfg) / 2)  # one checkpoint: about half the free space
    problem, size = check_checkpoint_disk(cfg, params)
    assert problem is not None and "disk: checkpoints under" in problem  # keep_last + 1 = 3 new ones do not fit
    for step in (1, 2, 3):
        _fake_checkpoint(cfg.checkpoint_dir, step)
    assert check_checkpoint_disk(cfg, params) == (None, size)  # none more needed beyond keep_last + 1


def test_a_killed_universal_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    """Regression: the conversion's temporary folder (a full copy of weights and optimizer state) was named so that
    neither `remove_stale` nor pruning ever deleted it."""
    from deepspeed.checkpoint import ds_to_universal

    root = tmp_path / "checkpoints"
    step = _fake_checkpoint(root, 4)

    def killed(args):  # the converter dies half-way through writing its output
        out = Path(args.output_folder)
        out.mkdir(parents=True)
        (out / "mp_rank_00_model_states.pt").write_bytes(b"y" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(ds_to_universal, "main", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt_mod.convert_to_universal(step)
    assert len(list(root.iterdir())) == 2  # the step folder and the conversion's leftover
    ckpt_mod.CheckpointWriter(root, keep_last=2, rank=0, barrier=lambda: None).remove_stale()
    assert sorted(p.name for p in root.iterdir()) == [step.name]
    # a finished conversion whose checkpoint has been deleted goes too
    (root / f"{ckpt_mod.UNIVERSAL_PREFIX}step-00000002" / "engine").mkdir(parents=True)
    ckpt_mod.CheckpointWriter(root, keep_last=2, rank=0, barrier=lambda: None).remove_stale()
    assert sorted(p.name for p in root.iterdir()) == [step.name]


def test_grad_norm_of_a_module_without_gradients_is_unknown_not_zero():
    """Regression: a module holding no gradients (DeepSpeed keeps them in its own buffers under ZeRO) gave a norm of
    0.0, which read as a real value and kept the trainer from asking DeepSpeed for its norm."""
    from bigbird_ja.training.trainer import module_grad_norm

    layer = torch.nn.Linear(3, 2)
    assert module_grad_norm(layer) is None
    layer(torch.ones(1, 3)).sum().backward()
    expected = torch.cat([layer.weight.grad.flatten(), layer.bias.grad]).norm()
    assert module_grad_norm(layer) == pytest.approx(float(expected))


def test_flops_count_the_sparse_pattern():
    from bigbird_ja import BigBirdJaConfig
    from bigbird_ja.training.flops import forward_flops_per_sequence, peak_tflops

    base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=512, position_buckets=16, block_size=16)
    sparse = BigBirdJaConfig(**base, num_window_blocks=3, num_global_blocks=1, num_random_blocks=1)
    full = BigBirdJaConfig(**base, attention_type="full")
    N, D, bs, r = 512, 8, 16, 2
    dense_part = N * 2 * (4 * 32 * 32 + 2 * 32 * 64) + N * 2 * (32 * 32 + 32 * 100)
    assert forward_flops_per_sequence(full, N) == dense_part + 4 * 32 * 32 * bs * bs * D * 2 * (2 + r)
    nb = N // bs  # sparse: global row sees all; others see 1 global + 3 window + 1 random (2 at the ends)
    pairs = 4 * (nb + (nb - 1) * 5 - 2)  # the first sparse row's left window block is the global one
    assert forward_flops_per_sequence(sparse, N) == dense_part + pairs * bs * bs * D * 2 * (2 + r)
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0 and peak_tflops(None, "bf16") is None


# ----------------------------------------------------------------------------------------------------------------
# Real runs


def _command(nprocs: int, out: Path, data: Path, tok: Path, extra=()) -> list[str]:
    args = ["pretrain", "--config", "configs/pretrain/tiny-cpu.yaml", f"--run.output_dir={out}",
            f"--data.dir={data}", f"--data.tokenizer={tok}", *TINY, *extra]
    return cli_command(nprocs, args)


def _run(cmd, timeout=300) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-6000:]}"
    return output


def _sessions(out: Path) -> list[dict]:
    """metrics.jsonl split at each start: [{start, train: {step: loss}, eval: {step: loss}, checkpoints}]"""
    sessions = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["event"] == "start":
            sessions.append({"start": record, "train": {}, "eval": {}, "checkpoints": []})
        elif record["event"] == "train":
            sessions[-1]["train"][record["step"]] = record["loss"]
        elif record["event"] == "eval":
            sessions[-1]["eval"][record["step"]] = (record["eval_loss"], record["eval_samples"])
        elif record["event"] == "checkpoint":
            sessions[-1]["checkpoints"].append(record["step"])
    return sessions


def _positions(out: Path, world: int) -> list[dict[int, list[int]]]:
    """Per session, step -> stream positions read by all ranks in that step."""
    per_rank = []
    for rank in range(world):
        sessions = []
        for line in (out / f"samples-rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "start" in record:
                sessions.append({})
            else:
                sessions[-1][record["step"]] = record["positions"]
        per_rank.append(sessions)
    merged = []
    for s in range(len(per_rank[0])):
        steps = {}
        for sessions in per_rank:
            for step, pos in sessions[s].items():
                steps.setdefault(step, []).extend(pos)
        merged.append(steps)
    return merged


def _falls(losses: dict[int, float]) -> tuple[float, float]:
    steps = sorted(losses)
    first = sum(losses[s] for s in steps[:3]) / 3
    last = sum(losses[s] for s in steps[-3:]) / 3
    return first, last


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory):
    """The tiny preset as one process, building its own tokenizer and data from the bundled corpus."""
    root = tmp_path_factory.mktemp("one")
    out, data, tok = root / "run", root / "data", root / "tokenizer"
    output = _run(_command(1, out, data, tok))
    return out, data, tok, output


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The same data the one-process run builds for itself (the trainer's own preparation step), made in-process."""
    from bigbird_ja.training.trainer import ensure_data

    root = tmp_path_factory.mktemp("data")
    data, tok = root / "data", root / "tokenizer"
    cfg = load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml", [f"--data.dir={data}",
                                                                         f"--data.tokenizer={tok}", *TINY])
    ensure_data(cfg, log=lambda text: None)
    return data, tok


_TWO = {}


def _two_process_run(stage: int, tmp_root: Path, data: Path, tok: Path) -> Path:
    if stage not in _TWO:
        out = tmp_root / f"zero{stage}"
        extra = ["--train.activation_checkpointing=true"] if stage == 3 else []
        _run(_command(2, out, data, tok, [f"--zero.stage={stage}", *extra]))
        _TWO[stage] = out
    return _TWO[stage]


@pytest.fixture(scope="session")
def two_root(tmp_path_factory):
    return tmp_path_factory.mktemp("two")


@pytest.mark.slow
def test_one_process_run_prepares_its_data_and_the_loss_falls(one_process_run):
    out, data, tok, output = one_process_run
    assert (tok / "tokenizer.json").is_file() and (data / "manifest.json").is_file()
    assert "prepared 50 documents" in output
    (session,) = _sessions(out)
    first, last = _falls(session["train"])
    print(f"one process: loss {first:.4f} -> {last:.4f}")
    assert last < first - 0.3
    assert sorted(session["train"]) == list(range(1, STEPS + 1))
    assert session["checkpoints"] == [6, 12, 14]
    assert [p.name for p in ckpt_mod.list_checkpoints(out / "checkpoints")] == ["step-00000012", "step-00000014"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000014"
    assert (out / "config.yaml").is_file() and (out / "ds_config.json").is_file()
    assert load_pretrain_config(out / "checkpoints" / "step-00000014" / "config.yaml").train.max_steps == STEPS


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_processes_under_the_deepspeed_launcher_loss_falls(stage, two_root, tiny_data):
    out = _two_process_run(stage, two_root, *tiny_data)
    (session,) = _sessions(out)
    first, last = _falls(session["train"])
    print(f"ZeRO-{stage}, 2 processes: loss {first:.4f} -> {last:.4f}")
    assert last < first - 0.3
    assert session["start"]["world_size"] == 2 and session["start"]["grad_accum_steps"] == 1
    (positions,) = _positions(out, 2)
    stream = sorted(p for step in positions.values() for p in step)
    assert stream == list(range(STEPS * GLOBAL_BATCH))  # every position once, over an epoch boundary


def _kill_after_checkpoint(cmd, step: int, timeout=300) -> str:
    """Start ``cmd`` and SIGKILL its whole process group as soon as checkpoint ``step`` is reported saved."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if f"saved checkpoint {ckpt_mod.step_name(step)}" in line:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines)
    assert f"saved checkpoint {ckpt_mod.step_name(step)}" in text, text[-6000:]
    return text


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkill_after_a_checkpoint_then_resume_auto_repeats_the_same_losses(two_root, tiny_data, tmp_path):
    data, tok = tiny_data
    reference = _two_process_run(2, two_root, data, tok)
    (ref,) = _sessions(reference)
    out = tmp_path / "killed"
    cmd = _command(2, out, data, tok, ["--zero.stage=2", "--resume", "auto"])
    _kill_after_checkpoint(cmd, CKPT_EVERY)
    root = out / "checkpoints"
    resumed_from = ckpt_mod.find_latest_complete(root)
    k = ckpt_mod.step_of(resumed_from)
    print(f"SIGKILL after checkpoint step {CKPT_EVERY}; newest complete checkpoint: step {k}")
    assert CKPT_EVERY <= k < STEPS
    # what a later kill in the middle of a write leaves, and a checkpoint whose copy was cut short
    (root / ".tmp-step-00000099" / "engine").mkdir(parents=True)
    damaged = root / "step-00000013"
    shutil.copytree(resumed_from, damaged)
    (damaged / ckpt_mod.META).unlink()

    output = _run(cmd)
    assert f"resumed from {resumed_from} at step {k}" in output
    assert not (root / ".tmp-step-00000099").exists()
    killed, resumed = _sessions(out)
    assert resumed["start"]["step"] == k and resumed["start"]["data_cursor"] == k * GLOBAL_BATCH
    for step in range(k + 1, STEPS + 1):
        print(f"step {step}: uninterrupted {ref['train'][step]:.9f}, resumed {resumed['train'][step]:.9f}")
        assert abs(resumed["train"][step] - ref["train"][step]) <= 1e-6
    assert resumed["eval"][STEPS] == pytest.approx(ref["eval"][STEPS], abs=1e-6)
    # the data cursor: the steps up to k of the killed run and k+1.. of the resumed one read every position once
    killed_pos, resumed_pos = _positions(out, 2)
    (ref_pos,) = _positions(reference, 2)
    stream = [p for s in range(1, k + 1) for p in killed_pos[s]] + [p for s in range(k + 1, STEPS + 1)
                                                                      for p in resumed_pos[s]]
    assert sorted(stream) == list(range(STEPS * GLOBAL_BATCH))
    assert all(sorted(resumed_pos[s]) == sorted(ref_pos[s]) for s in range(k + 1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_of_a_two_process_checkpoint_in_one_process_reads_every_remaining_sample_once(two_root, tiny_data,
                                                                                            tmp_path):
    data, tok = tiny_data
    reference = _two_process_run(2, two_root, data, tok)
    out = tmp_path / "resized"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step-00000012", out / "checkpoints" / "step-00000012")
    # continue to 20 steps: 8 more, one process accumulating 2 micro-batches for the same global batch
    output = _run(_command(1, out, data, tok, ["--zero.stage=2", "--train.max_steps=20", "--resume", "auto"]))
    assert "universal format for world size 1" in output
    (session,) = _sessions(out)
    assert session["start"]["step"] == 12 and session["start"]["grad_accum_steps"] == 2
    (positions,) = _positions(out, 1)
    assert sorted(positions) == list(range(13, 21))
    after = sorted(p for pos in positions.values() for p in pos)
    assert after == list(range(12 * GLOBAL_BATCH, 20 * GLOBAL_BATCH))  # the rest of epoch 1, then epoch 2 begins
    losses = session["train"]
    assert all(loss == loss and loss < 7.0 for loss in losses.values())  # trained weights go on (fresh: ~7.2)
    (reference_session,) = _sessions(reference)
    assert session["eval"][20][1] == reference_session["eval"][STEPS][1]  # the same held-out samples at world 1


@pytest.mark.slow
@pytest.mark.distributed
def test_export_loads_with_automodel_and_gives_the_engines_eval_loss(two_root, tiny_data, tmp_path):
    import bigbird_ja  # noqa: F401  registers the Auto classes
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from bigbird_ja.cli import main
    from bigbird_ja.data import MLMCollator, PackedDataset, read_manifest
    from bigbird_ja.training.trainer import eval_batches, mlm_loss_sums

    data, tok = tiny_data
    reference = _two_process_run(2, two_root, data, tok)
    out = tmp_path / "exported"
    assert main(["export", str(reference), str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForMaskedLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    # the engine's last evaluation: the first `samples` positions of the held-out shard, masks from their positions
    (session,) = _sessions(reference)
    engine_loss, samples = session["eval"][STEPS]
    cfg = load_pretrain_config(reference / "config.yaml")
    n = len(read_manifest(data)["shards"])
    held_out = PackedDataset(data, shuffle=False, num_epochs=1, shards=[n - 1], rank=0, world_size=1)
    collator = MLMCollator.from_tokenizer(tokenizer, options=cfg.masking.options(), seed=cfg.masking.seed)
    with torch.no_grad():
        total, count = mlm_loss_sums(lambda b: model(**b).loss, eval_batches(held_out, collator, samples, 1), "cpu")
    print(f"engine eval loss {engine_loss:.8f}, exported model {total / count:.8f} on {samples} samples")
    assert total / count == pytest.approx(engine_loss, rel=1e-5)


@pytest.mark.slow
def test_bf16_without_zero_logs_deepspeeds_grad_norm(tiny_data, tmp_path):
    """bf16 without ZeRO: the logged norm is DeepSpeed's own (the one it clips with), never a norm over nothing."""
    data, tok = tiny_data
    out = tmp_path / "bf16"
    _run(_command(1, out, data, tok, ["--train.precision=bf16", "--zero.stage=0", "--train.max_steps=3",
                                      "--eval.every_steps=0", "--log.sample_log=false"]))
    norms = [json.loads(line)["grad_norm"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    print(f"bf16, ZeRO 0: grad norms {norms}")
    assert len(norms) == 3 and all(norm is not None and norm > 0 for norm in norms)


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_stops(tiny_data, tmp_path):
    data, tok = tiny_data
    out = tmp_path / "preempted"
    cmd = _command(1, out, data, tok, ["--train.max_steps=500", "--checkpoint.every_steps=0"])
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 3/500"):
                proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, "".join(lines)[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    (session,) = _sessions(out)
    stopped = max(session["train"])
    assert 3 <= stopped < 500 and session["checkpoints"] == [stopped]
    assert f"stopped by SIGTERM after step {stopped}" in "".join(lines)
    assert ckpt_mod.find_latest_complete(out / "checkpoints") == out / "checkpoints" / ckpt_mod.step_name(stopped)


@pytest.mark.parametrize("variables, expected", [
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "5",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"},
     ("openmpi", "5", "16", "5", "8")),
    ({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "1"},
     ("pmi", "3", "4", "1", None)),
    ({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
      "SLURM_TASKS_PER_NODE": "8(x2)", "MASTER_ADDR": "node0", "MASTER_PORT": "1"}, ("slurm", "9", "16", "1", "8")),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "16"}, ("single", "0", "1", "0", "1")),  # the batch script, not a step
])
def test_one_entry_point_reads_every_launcher(monkeypatch, variables, expected):
    from bigbird_ja.common.distributed import fill_env_from_launcher

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        # set, then delete: monkeypatch then removes what fill_env_from_launcher writes (a plain delenv of an unset
        # variable records nothing, and WORLD_SIZE=16 leaked into later tests of the same process)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    for name in [k for k in os.environ if k.startswith(("OMPI_", "PMI_", "SLURM_", "MPI_LOCAL"))]:
        monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert fill_env_from_launcher() == expected[0]
    got = tuple(os.environ.get(v) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    assert got == expected[1:]


def test_a_cuda_process_takes_the_device_of_the_local_rank_its_launcher_names(monkeypatch):
    """Regression: pretraining chose its GPU from LOCAL_RANK before mpirun's / srun's variables were mapped onto it,
    so every process of a node under mpirun took GPU 0."""
    import deepspeed
    import torch.distributed as dist

    from bigbird_ja.common.distributed import init_process_group

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name in [k for k in os.environ if k.startswith(("OMPI_", "PMI_", "SLURM_", "MPI_LOCAL"))]:
        monkeypatch.delenv(name)
    for name, value in {"OMPI_COMM_WORLD_RANK": "13", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "5",
                        "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    devices, started = [], []
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: started.append((kwargs, list(devices))))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 13)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 16)
    env = init_process_group(cuda=True)
    assert devices == [5] and started[0][1] == [5]  # the device is chosen before the group starts
    assert started[0][0]["dist_backend"] == "nccl" and (env.rank, env.local_rank, env.num_nodes) == (13, 5, 2)


def test_a_launcher_without_a_rendezvous_address_is_a_clear_error(monkeypatch):
    from bigbird_ja.common.distributed import fill_env_from_launcher

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")
    with pytest.raises(ValueError, match="export MASTER_ADDR=<first host>"):
        fill_env_from_launcher()


# ----------------------------------------------------------------------------------------------------------------
# Numerical guards, honest exits, dry runs, changed settings on resume


@pytest.mark.parametrize("override, message", [
    ("--optim.lr=.inf", "optim.lr: inf is not a finite number"),
    ("--optim.lr=.nan", "optim.lr: nan is not a finite number"),
    ("--masking.mask_rate=0", "mask_rate=0.0: must be in \\(0, 1\\]"),
])
def test_settings_that_make_every_loss_nan_are_config_errors(override, message):
    """Regression: both were accepted and every step logged `loss nan`, then NaN weights were saved."""
    with pytest.raises(ConfigError, match=message):
        load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml", [override])


def test_every_sequence_predicts_at_least_one_token_at_a_tiny_mask_rate(tiny_data):
    """A rate whose expected count rounds to 0 would leave batches without targets (a NaN loss)."""
    from bigbird_ja.data import MaskingOptions, MLMCollator, PackedDataset
    from bigbird_ja.data.fingerprint import load_tokenizer

    data, tok = tiny_data
    collator = MLMCollator.from_tokenizer(load_tokenizer(tok), options=MaskingOptions(mask_rate=1e-4), seed=0)
    samples = [sample for _, sample in zip(range(16), PackedDataset(data, shuffle=False))]
    labels = collator(samples)["labels"]
    assert ((labels != -100).sum(dim=1) >= 1).all()


def test_out_of_memory_is_named_with_what_to_change():
    from bigbird_ja.training.trainer import TrainingStopped, out_of_memory_error

    cfg = load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml")
    for err in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")):
        named = out_of_memory_error(err, cfg, 7, 256, "runs/x/checkpoints/step-00000004")
        assert isinstance(named, TrainingStopped)
        assert "out of memory in step 7" in str(named) and "batch.micro_batch_size" in str(named)
        assert "step-00000004" in str(named)
    assert out_of_memory_error(RuntimeError("NCCL error"), cfg, 7, 256, None) is None


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_before_anything_is_saved(tiny_data, tmp_path):
    """Regression: a diverging run logged `loss nan` at every step, saved NaN weights as a complete checkpoint and
    exited 0 with an `end` record that said max_steps."""
    data, tok = tiny_data
    out = tmp_path / "diverged"
    cmd = _command(1, out, data, tok, ["--optim.lr=1e30", "--optim.warmup_steps=1", "--train.max_steps=8",
                                       "--checkpoint.every_steps=2", "--eval.every_steps=0", "--log.sample_log=false"])
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-4000:]
    assert "is not finite on at least one rank; nothing from this step was saved" in output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    end = records[-1]
    print(f"stopped: {end}")
    assert end["event"] == "end" and end["reason"] == "error" and "not finite" in end["error"]
    saved = [ckpt_mod.step_of(p) for p in ckpt_mod.list_checkpoints(out / "checkpoints")]
    assert all(step < end["step"] for step in saved)  # the non-finite step was not saved
    for path in ckpt_mod.list_checkpoints(out / "checkpoints"):
        state = torch.load(next(path.glob("engine/engine/mp_rank_00_model_states.pt")), weights_only=False)
        assert all(torch.isfinite(t).all() for t in state["module"].values())


@pytest.mark.slow
def test_dry_run_writes_nothing_even_when_the_data_is_still_to_be_made(tmp_path):
    """Regression: --dry-run trained a tokenizer and packed the data when the preset listed prepare.inputs."""
    out, data, tok = tmp_path / "run", tmp_path / "data", tmp_path / "tokenizer"
    output = _run(_command(1, out, data, tok, ["--dry-run"]))
    assert "dry run:" in output and "would first train a tokenizer" in output and "deepspeed config:" in output
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_changed_lr_takes_effect_at_the_first_resumed_step(tiny_data, tmp_path):
    """Regression: the first step after a resume ran at the checkpoint's learning rate, whatever optim.lr said."""
    data, tok = tiny_data
    short = ["--train.max_steps=8", "--checkpoint.every_steps=6", "--eval.every_steps=0", "--log.sample_log=false"]
    reference = tmp_path / "reference"
    _run(_command(1, reference, data, tok, short))
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())
           if r["event"] == "train"}
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step-00000006", resumed / "checkpoints" / "step-00000006")
    output = _run(_command(1, resumed, data, tok, [*short, "--optim.lr=4e-3", "--resume", "auto"]))
    assert "resumed with changed settings, in effect from step 7: optim.lr: 0.002 -> 0.004" in output
    new = {r["step"]: r["lr"] for r in map(json.loads, (resumed / "metrics.jsonl").read_text().splitlines())
           if r["event"] == "train"}
    print(f"lr at steps 7, 8: before {lrs[7]:.3e}, {lrs[8]:.3e}; resumed at twice the peak {new[7]:.3e}, {new[8]:.3e}")
    assert new[7] == pytest.approx(2 * lrs[7]) and new[8] == pytest.approx(2 * lrs[8])
