"""Checkpoint integrity (issue 12): checksums in checkpoint.json, verified on resume, export and before pruning; a
damaged checkpoint is skipped for the next older one, a run whose checkpoints are all damaged is refused, a full
disk is named as such; fine-tuned model folders carry a checksum listing too.

The fast tests write real checkpoints with `CheckpointWriter` from a stand-in engine (DeepSpeed's ZeRO-0 layout:
one module-states file) around a tiny real model and a word-level tokenizer, then damage them the way the issue's
probes did: 64 bytes inverted inside a file (same size), a file cut short, a marker deleted, a full disk; one test
forks two gloo ranks to show that a full disk on one rank stops both. Two slow tests run `bigbird-ja pretrain`
itself (tiny settings of test_pretrain, 8 steps, checkpoints at 4 and 8).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from bigbird_ja.training import checkpoint as ckpt_mod
from bigbird_ja.training.config import load_pretrain_config, to_dict
from conftest import subprocess_env, tiny_config
from test_pretrain import REPO, _command, _run, _sessions, tiny_data  # noqa: F401  (tiny_data: a fixture)

PRESET = REPO / "configs" / "pretrain" / "tiny-cpu.yaml"
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"あいうえおかきくけこ"]
MODEL_STATES = "engine/engine/mp_rank_00_model_states.pt"
RNG = "rng/rank-00000.pt"


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints written by the real writer (no DeepSpeed, no training)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


class _Engine:
    """What `CheckpointWriter.save` asks of a DeepSpeed engine, in ZeRO-0's layout (module and optimizer in one
    file); `fail` is raised after part of the file is written, as a full disk does."""

    def __init__(self, model, fail: BaseException | None = None):
        self.model, self.fail = model, fail

    def save_checkpoint(self, save_dir, tag, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        if self.fail is not None:
            (folder / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 4096)
            raise self.fail
        torch.save({"module": self.model.state_dict()}, folder / "mp_rank_00_model_states.pt")


def _writer(root: Path, keep_last: int = 3) -> ckpt_mod.CheckpointWriter:
    return ckpt_mod.CheckpointWriter(root, keep_last=keep_last, rank=0, barrier=lambda: None)


def _save(writer, model, step: int, engine=None) -> Path:
    cfg = load_pretrain_config(PRESET)
    model_config = model.config
    state = {"step": step, "samples": 8 * step, "tokens": 1024 * step, "data": {"global_position": 8 * step},
             "config": to_dict(cfg), "model_config": model_config.to_dict()}
    return writer.save(engine or _Engine(model), step, trainer_state=state, config_yaml=cfg.to_yaml(),
                       model_config=model_config, tokenizer=_tokenizer(), world_size=1)


def _model(seed: int = 0):
    from bigbird_ja.modeling import BigBirdJaForMaskedLM

    torch.manual_seed(seed)
    return BigBirdJaForMaskedLM(tiny_config(vocab_size=len(WORDS)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A run folder whose checkpoints/ holds steps 4 and 8, written by `CheckpointWriter` (copy it before use)."""
    run = tmp_path_factory.mktemp("saved") / "run"
    writer = _writer(run / "checkpoints")
    for step in (4, 8):
        _save(writer, _model(step), step)
    return run


@pytest.fixture
def run(saved, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(saved, copy)
    return copy


def _damage(path: Path, at: int | None = None, count: int = 64) -> None:
    """Invert ``count`` bytes of a file from ``at`` (default: its middle): damage that keeps the size."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if at is None else at
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _strip_checksums(step: Path) -> None:
    """Make ``step`` look written by the first version: checkpoint.json lists sizes only."""
    meta = json.loads((step / ckpt_mod.META).read_text())
    meta["version"] = 1
    meta["files"] = {rel: entry["size"] if isinstance(entry, dict) else entry for rel, entry in meta["files"].items()}
    (step / ckpt_mod.META).write_text(json.dumps(meta))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_checkpoint_json_lists_the_size_and_sha256_of_every_file(run):
    import hashlib

    step = run / "checkpoints" / "step-00000008"
    files = json.loads((step / ckpt_mod.META).read_text())["files"]
    on_disk = sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file() and p.name != ckpt_mod.META)
    assert sorted(files) == on_disk and MODEL_STATES in files and RNG in files
    for rel, entry in files.items():
        data = (step / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel


def test_resume_skips_a_checkpoint_damaged_at_the_same_size_and_takes_the_older_one(run, capsys):
    """Issue 12, probe 1: the damaged newest checkpoint was loaded (loss 1058.99 instead of 6.97)."""
    root = run / "checkpoints"
    _damage(root / "step-00000008" / MODEL_STATES)
    assert ckpt_mod.resolve_resume("auto", root) == root / "step-00000004"
    warning = capsys.readouterr().err
    assert "step-00000008" in warning and MODEL_STATES in warning and "sha256" in warning


def test_an_explicit_resume_of_a_damaged_checkpoint_is_refused_naming_the_file(run):
    root = run / "checkpoints"
    _damage(root / "step-00000008" / MODEL_STATES)
    with pytest.raises(ValueError, match=rf"step-00000008.*{MODEL_STATES} has sha256 .*--resume auto"):
        ckpt_mod.resolve_resume(str(root / "step-00000008"), root)


def test_export_refuses_a_checkpoint_damaged_at_the_same_size_and_a_run_folder_exports_the_older_one(run, capsys):
    """Issue 12, probe 1: `bigbird-ja export` exported the damaged weights."""
    from bigbird_ja.training.export import export_checkpoint

    root = run / "checkpoints"
    _damage(root / "step-00000008" / MODEL_STATES)
    with pytest.raises(ValueError, match=rf"{MODEL_STATES} has sha256"):
        export_checkpoint(root / "step-00000008", run / "exported")
    assert not (run / "exported").exists()
    report = export_checkpoint(run, run / "exported")
    assert report.checkpoint == str(root / "step-00000004") and report.step == 4
    assert "step-00000008" in capsys.readouterr().err


@pytest.mark.parametrize("older_format", [False, True], ids=["checksummed", "without-checksums"])
def test_a_damaged_rng_file_makes_resume_fall_back_to_the_older_checkpoint(run, capsys, older_format):
    """Issue 12, probe 7: `_pickle.UnpicklingError: invalid load key` at start-up, no fallback. Without checksums
    (a checkpoint of the first version) the damage is found by unpickling every rng file before the engine is built.
    """
    root = run / "checkpoints"
    newest = root / "step-00000008"
    if older_format:
        _strip_checksums(newest)
    _damage(newest / RNG, at=64)  # the pickle's first bytes: "invalid load key"
    assert ckpt_mod.resolve_resume("auto", root) == root / "step-00000004"
    warning = capsys.readouterr().err
    assert "step-00000008" in warning and RNG in warning


def test_a_checkpoint_written_without_checksums_is_accepted_with_a_warning(run, capsys):
    root = run / "checkpoints"
    _strip_checksums(root / "step-00000008")
    assert ckpt_mod.resolve_resume("auto", root) == root / "step-00000008"
    assert "without checksums" in capsys.readouterr().err


def _pretraining(run: Path):
    """A `Pretraining` with only what `choose_checkpoint` reads (one process, no process group)."""
    from bigbird_ja.common.distributed import DistEnv
    from bigbird_ja.training.trainer import Pretraining

    trainer = Pretraining.__new__(Pretraining)
    trainer.cfg = load_pretrain_config(PRESET, [f"--run.output_dir={run}", "--checkpoint.keep_last=3"])
    trainer.env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, backend="gloo")
    trainer.model_config = tiny_config(vocab_size=len(WORDS))
    return trainer


def test_when_every_checkpoint_is_damaged_resume_refuses_listing_each_and_touches_nothing(run):
    """Issue 12, probe 2: `--resume auto` started again from step 0 over them; the older one was recoverable."""
    from bigbird_ja.training.preflight import PreflightError

    root = run / "checkpoints"
    newest = root / "step-00000008" / MODEL_STATES
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short
    (root / "step-00000004" / ckpt_mod.META).unlink()  # only its marker is missing
    before = _snapshot(root)
    with pytest.raises(PreflightError) as caught:
        _pretraining(run).choose_checkpoint("auto")
    message = str(caught.value)
    print(message)
    assert f"step-00000008: {MODEL_STATES} has 1000 bytes" in message
    assert "step-00000004: checkpoint.json is missing" in message
    assert "--resume none" in message and "Not starting from step 0" in message
    assert _snapshot(root) == before


def test_resume_of_a_run_with_a_damaged_newest_checkpoint_chooses_the_older_one_on_every_rank(run, capsys):
    root = run / "checkpoints"
    _damage(root / "step-00000008" / RNG, at=64)
    trainer = _pretraining(run)
    trainer.choose_checkpoint("auto")
    assert trainer.ckpt == str(root / "step-00000004") and trainer.meta["step"] == 4
    assert "skipping step-00000008" in capsys.readouterr().out


def test_an_engine_that_cannot_load_a_verified_checkpoint_stops_the_run_with_the_reason(run):
    """Verification happens before the engine exists; a load that fails after it is not retried on an older
    checkpoint in a possibly half-loaded engine: the run stops, saying why and what to do."""
    from bigbird_ja.training.preflight import PreflightError

    class Engine:
        def load_checkpoint(self, *args, **kwargs):
            raise KeyError("optimizer_state_dict")  # e.g. written by another DeepSpeed version

    class DeepSpeed:
        @staticmethod
        def initialize(**kwargs):
            return Engine(), None, None, None

    trainer = _pretraining(run)
    trainer.choose_checkpoint("auto")
    trainer.model, trainer.deepspeed, trainer.ds_config = _model(), DeepSpeed, {}
    with pytest.raises(PreflightError, match=r"loading .*step-00000008 failed \(KeyError: 'optimizer_state_dict'\)"
                                             r".*--resume <step folder>"):
        trainer.start_engine()


# ----------------------------------------------------------------------------------------------------------------
# Writing: a full disk, and a checkpoint that fails verification right after it was written


def _torch_save_to_a_full_disk(obj, f, *args, **kwargs):
    """torch.save as it fails on a full disk (/dev/full answers every write with ENOSPC): a RuntimeError
    "[enforce fail at inline_container.cc:...] . unexpected pos ..." that says nothing about the disk."""
    _real_torch_save(obj, "/dev/full", *args, **kwargs)


_real_torch_save = torch.save


@pytest.mark.parametrize("where", ["engine-enospc", "torch-unexpected-pos", "tokenizer-enospc"])
def test_a_full_disk_while_saving_says_so_and_leaves_the_earlier_checkpoints_intact(run, monkeypatch, where):
    """Issue 12, probe 8: `[enforce fail at inline_container.cc:672] . unexpected pos ...`, nothing about disk
    space. Every rank's writes (engine, rng) and rank 0's (config, tokenizer, checkpoint.json) are covered."""
    root = run / "checkpoints"
    writer = _writer(root)
    engine = None
    if where == "engine-enospc":
        engine = _Engine(_model(), fail=OSError(errno.ENOSPC, "No space left on device"))
    elif where == "torch-unexpected-pos":
        monkeypatch.setattr(torch, "save", _torch_save_to_a_full_disk)
    else:
        def full(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(type(_tokenizer()), "save_pretrained", full)
    before = _snapshot(root)
    with pytest.raises(OSError, match="disk full") as caught:
        _save(writer, _model(), 12, engine)
    message = str(caught.value)
    print(message)
    assert str(root) in message and re.search(r"had [\d.,]+ [GM]iB free", message) and "--resume auto" in message
    assert caught.value.errno == errno.ENOSPC
    assert _snapshot(root) == before  # earlier checkpoints and `latest` untouched, the temporary folder gone
    assert sorted(p.name for p in root.iterdir()) == ["latest", ckpt_mod.RUN_FILE, "step-00000004", "step-00000008"]


class _RankEngine(_Engine):
    """Each rank writes its own file, as ZeRO partitions are."""

    def __init__(self, model, rank):
        super().__init__(model)
        self.rank = rank

    def save_checkpoint(self, save_dir, tag, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.model.state_dict()}, folder / f"rank_{self.rank}_states.pt")


def _save_on_two_ranks(rank: int, run: str, port: int) -> None:
    """One of two gloo processes saving step 12 into ``run``; rank 1's disk is full. Writes what it raised."""
    import torch.distributed as dist

    from bigbird_ja.common.distributed import all_gather_object, barrier

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if rank == 1:
        torch.save = _torch_save_to_a_full_disk
    writer = ckpt_mod.CheckpointWriter(Path(run) / "checkpoints", keep_last=3, rank=rank, barrier=barrier,
                                       gather=all_gather_object, log=print)
    try:
        _save(writer, _model(), 12, _RankEngine(_model(), rank))
        outcome = "saved"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"
    Path(run, f"rank{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_a_full_disk_on_one_rank_stops_every_rank_with_the_same_message(run):
    """No rank is left waiting at a barrier: every rank learns of the failure and raises; rank 0 cleans up."""
    import torch.multiprocessing as mp

    from conftest import _free_port

    root = run / "checkpoints"
    before = _snapshot(root)
    # forked, not spawned: the children need nothing this process has not imported (seconds, not tens)
    mp.start_processes(_save_on_two_ranks, args=(str(run), _free_port()), nprocs=2, join=True, start_method="fork")
    outcomes = [(run / f"rank{r}.txt").read_text() for r in (0, 1)]
    print("\n".join(outcomes))
    for outcome in outcomes:
        assert outcome.startswith("CheckpointDiskFullError: disk full: writing checkpoint step-00000012")
        assert "failed on rank(s) 1" in outcome and "unexpected pos" in outcome
    assert _snapshot(root) == before


def test_pruning_keeps_the_older_checkpoints_when_the_new_one_fails_verification(run, monkeypatch, capsys):
    """The newest checkpoint is verified (read back from the disk) before any older one is deleted."""
    root = run / "checkpoints"
    real_replace = os.replace

    def replace_then_damage(src, dst):  # the disk returns other bytes than were written
        real_replace(src, dst)
        if Path(dst).name == "step-00000012":
            _damage(Path(dst) / MODEL_STATES)

    monkeypatch.setattr(os, "replace", replace_then_damage)
    _save(_writer(root, keep_last=1), _model(), 12)
    monkeypatch.undo()
    assert [p.name for p in ckpt_mod.list_checkpoints(root)] == ["step-00000004", "step-00000008", "step-00000012"]
    assert (root / "latest").read_text().strip() == "step-00000008"
    err = capsys.readouterr().err
    assert "step-00000012" in err and "failed verification" in err and "kept" in err
    assert ckpt_mod.resolve_resume("auto", root) == root / "step-00000008"


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuned model folders


def test_a_finetuned_model_folder_is_checksummed_and_a_damaged_file_is_a_clear_error(tmp_path):
    from bigbird_ja.finetune import finetune
    from bigbird_ja.finetune.run import evaluate_model

    out = tmp_path / "run"
    finetune("longrange", None, overrides=[
        f"--model.preset={REPO / 'configs' / 'model' / 'tiny-cpu.yaml'}", "--model.overrides.hidden_size=32",
        "--model.overrides.intermediate_size=64", "--model.overrides.num_attention_heads=2",
        "--model.overrides.max_position_embeddings=128", "--model.overrides.block_size=16",
        "--model.overrides.num_global_blocks=1", "--model.overrides.num_random_blocks=1",
        "--synthetic.num_train=16", "--synthetic.num_valid=4", "--synthetic.seq_len=128",
        "--synthetic.min_answer_position=0", "--synthetic.num_keys=4", "--data.max_length=128",
        "--data.doc_stride=64", "--data.max_query_length=32", "--train.max_steps=2", "--train.batch_size=4",
        "--train.progress_bar=false"], output=str(out), verbose=False)
    model, valid = out / "model", out / "data" / "valid.json"
    evaluate_model("longrange", model, valid)  # intact: loads
    _damage(model / "model.safetensors")
    from bigbird_ja.common.checksums import DamagedFolderError

    with pytest.raises(DamagedFolderError, match=r"model.safetensors has sha256 .*checksums.json"):
        evaluate_model("longrange", model, valid)
    listed = json.loads((model / "checksums.json").read_text())["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(listed)


# ----------------------------------------------------------------------------------------------------------------
# Real runs: `bigbird-ja pretrain`, 8 steps, checkpoints at 4 and 8


# the run the slow tests damage and resume: 8 steps, checkpoints at 4 and 8
EIGHT_STEPS = ["--train.max_steps=8", "--checkpoint.every_steps=4", "--eval.every_steps=0", "--log.sample_log=false"]


@pytest.fixture(scope="module")
def eight_steps(tiny_data, tmp_path_factory):  # noqa: F811  (tiny_data is the imported fixture)
    data, tok = tiny_data
    out = tmp_path_factory.mktemp("eight") / "run"
    _run(_command(1, out, data, tok, EIGHT_STEPS))
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


@pytest.mark.slow
def test_a_run_resumed_over_a_damaged_checkpoint_goes_on_from_the_older_one_with_the_same_losses(
        eight_steps, tiny_data, tmp_path):  # noqa: F811
    data, tok = tiny_data
    out = _copy(eight_steps, tmp_path)
    root = out / "checkpoints"
    _damage(root / "step-00000008" / MODEL_STATES)
    output = _run(_command(1, out, data, tok, [*EIGHT_STEPS, "--resume", "auto"]))
    first, resumed = _sessions(out)
    print(f"first run {first['train']}\nresumed {resumed['train']}")
    assert resumed["start"]["step"] == 4
    for step in range(5, 9):  # steps 5-8 again from the older checkpoint, not from the damaged weights
        assert resumed["train"][step] == pytest.approx(first["train"][step], abs=1e-6)
    assert "skipping step-00000008" in output and MODEL_STATES in output
    assert f"resumed from {root / 'step-00000004'} at step 4" in output
    assert ckpt_mod.resolve_resume("auto", root) == root / "step-00000008"  # rewritten, and it verifies


@pytest.mark.slow
def test_a_run_whose_checkpoints_are_all_damaged_is_refused_and_nothing_is_overwritten(
        eight_steps, tiny_data, tmp_path):  # noqa: F811
    data, tok = tiny_data
    out = _copy(eight_steps, tmp_path)
    root = out / "checkpoints"
    newest = root / "step-00000008" / MODEL_STATES
    newest.write_bytes(newest.read_bytes()[:1000])
    (root / "step-00000004" / ckpt_mod.META).unlink()
    before = _snapshot(root)
    cmd = _command(1, out, data, tok, [*EIGHT_STEPS, "--resume", "auto"])
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    print(output[-3000:])
    assert proc.returncode == 2
    assert "step-00000008" in output and "step-00000004: checkpoint.json is missing" in output
    assert _snapshot(root) == before
    assert len(_sessions(out)) == 1  # no second session began
