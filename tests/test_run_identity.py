"""Which run a checkpoint belongs to (issue 25, case 1), the packed length a run trains at (case 7), and `export`
onto a file (case 9).

Case 1: a checkpoint of another run copied into a run's checkpoints/ under a higher step name was resumed by
`--resume auto` (which then overwrote and pruned the run's own checkpoints) and exported by `bigbird-ja export`. Now
every checkpoint records its run's identity (checkpoints/run.json holds the run's); `--resume auto`, `export` and
pruning take only this run's checkpoints whose recorded step matches their folder name, and name the others, which
are left as they are. Naming another run's checkpoint (`--resume PATH`) forks it into a folder of its own.

The fast tests write real checkpoints with `CheckpointWriter` (the helpers of test_checkpoint_integrity: a stand-in
engine in ZeRO-0's layout around a tiny model); one slow test runs `bigbird-ja pretrain` / `export` as the issue did.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from bigbird_ja.training import checkpoint as ckpt_mod
from bigbird_ja.training.config import load_pretrain_config
from conftest import subprocess_env, tiny_config
from test_checkpoint_integrity import (
    EIGHT_STEPS, MODEL_STATES, PRESET, WORDS, _model, _save, _snapshot, _strip_checksums, _writer,
    eight_steps,  # noqa: F401  (a fixture: the 8-step run the slow tests copy)
)
from test_pretrain import REPO, _command, _run, _sessions, tiny_data  # noqa: F401  (tiny_data: a fixture)

STEP = ckpt_mod.step_name


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """Two runs written by `CheckpointWriter`: a/checkpoints holds steps 15 and 20, b/checkpoints step 10 (each
    step's weights from `_model(step)`). Copy before use."""
    base = tmp_path_factory.mktemp("runs")
    for name, steps in (("a", (15, 20)), ("b", (10,))):
        writer = _writer(base / name / "checkpoints")
        for step in steps:
            _save(writer, _model(step), step)
    return base


@pytest.fixture
def runs(written, tmp_path) -> tuple[Path, Path]:
    """(a's checkpoints, b's checkpoints), fresh copies."""
    shutil.copytree(written, tmp_path / "runs")
    return tmp_path / "runs" / "a" / "checkpoints", tmp_path / "runs" / "b" / "checkpoints"


def _run_id(step_folder: Path) -> str | None:
    return (json.loads((step_folder / ckpt_mod.META).read_text()).get("run") or {}).get("id")


def _folder_run_id(root: Path) -> str:
    return json.loads((root / ckpt_mod.RUN_FILE).read_text())["run_id"]


def _copy_in(source: Path, root: Path, step: int) -> Path:
    """``source`` copied into ``root`` under the name of ``step`` (what the issue did with `cp -r`)."""
    target = root / STEP(step)
    shutil.copytree(source, target)
    return target


def _as_previous_format(step_folder: Path, step: int | None = None) -> None:
    """Make ``step_folder`` look written before identities (format version 2: no "run"); ``step``: the step its
    checkpoint.json records (checkpoint.json is not in its own listing: it still verifies)."""
    meta = json.loads((step_folder / ckpt_mod.META).read_text())
    meta.pop("run", None)
    meta["version"] = 2
    meta["step"] = meta["step"] if step is None else step
    (step_folder / ckpt_mod.META).write_text(json.dumps(meta))


def _weights(step_folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(step_folder / MODEL_STATES, map_location="cpu", weights_only=False)["module"]


# ----------------------------------------------------------------------------------------------------------------
# Case 1: identity recorded, and another run's checkpoint never taken, pruned or overwritten


def test_every_checkpoint_records_the_identity_of_its_run_and_the_run_folder_names_it(runs):
    a, b = runs
    assert _run_id(a / STEP(15)) == _run_id(a / STEP(20)) == _folder_run_id(a)
    assert _run_id(b / STEP(10)) == _folder_run_id(b) != _folder_run_id(a)
    assert json.loads((a / STEP(20) / ckpt_mod.META).read_text())["version"] == ckpt_mod.VERSION


def test_resume_auto_ignores_another_runs_checkpoint_copied_in_under_a_higher_step_name(runs, capsys):
    """Issue 25, case 1: "resumed from step-00000700 at step 10"."""
    a, b = runs
    _copy_in(b / STEP(10), a, 700)
    chosen = ckpt_mod.resolve_resume("auto", a)
    err = capsys.readouterr().err
    print(err)
    assert chosen == a / STEP(20)
    assert STEP(700) in err and "another run" in err and _run_id(b / STEP(10)) in err


def test_resume_auto_ignores_a_checkpoint_whose_recorded_step_is_not_its_name(runs, capsys):
    a, _ = runs
    _copy_in(a / STEP(15), a, 90)  # this run's own checkpoint, renamed
    assert ckpt_mod.resolve_resume("auto", a) == a / STEP(20)
    err = capsys.readouterr().err
    assert STEP(90) in err and "records step 15" in err


def test_export_of_a_run_folder_exports_this_runs_newest_checkpoint_not_the_copied_one(runs, tmp_path, capsys):
    """Issue 25, case 1: `bigbird-ja export A` exported B's weights."""
    from bigbird_ja.training.export import export_checkpoint

    a, b = runs
    _copy_in(b / STEP(10), a, 700)
    report = export_checkpoint(a.parent, tmp_path / "exported")
    assert report.step == 20 and report.checkpoint == str(a / STEP(20))
    assert STEP(700) in capsys.readouterr().err
    from bigbird_ja.modeling import BigBirdJaForMaskedLM

    exported = BigBirdJaForMaskedLM.from_pretrained(tmp_path / "exported").state_dict()
    expected = _weights(a / STEP(20))
    assert all(torch.equal(exported[k], expected[k].float()) for k in expected)


def test_saving_and_pruning_leave_another_runs_checkpoints_untouched(runs):
    """Before: the run overwrote b's copy at its own step and pruned b's older copy with its own old ones."""
    a, b = runs
    older = _copy_in(b / STEP(10), a, 5)
    in_the_way = _copy_in(b / STEP(10), a, 25)
    theirs = {p.name: _snapshot(p) for p in (older, in_the_way)}
    writer = _writer(a, keep_last=1)
    with pytest.raises(ckpt_mod.CheckpointError, match=rf"not overwriting .*{STEP(25)}.*another run"):
        _save(writer, _model(25), 25)
    _save(writer, _model(30), 30)
    assert [p.name for p in ckpt_mod.list_checkpoints(a)] == [STEP(5), STEP(25), STEP(30)]
    assert {p.name: _snapshot(p) for p in (older, in_the_way)} == theirs


def test_naming_another_runs_checkpoint_forks_it_into_a_folder_of_its_own(runs, tmp_path, capsys):
    a, b = runs
    b_id = _run_id(b / STEP(10))
    # into a's folder, which holds a's checkpoints: refused, nothing touched
    copied = _copy_in(b / STEP(10), a, 700)
    before = _snapshot(a)
    with pytest.raises(ckpt_mod.CheckpointError, match=r"fork.*--run.output_dir") as caught:
        ckpt_mod.choose_resume(str(copied), a)
    print(caught.value)
    assert STEP(15) in str(caught.value) and b_id in str(caught.value)
    assert _snapshot(a) == before
    # into a new folder: a fork, a new identity that records where it came from
    fork_root = tmp_path / "fork" / "checkpoints"
    resume = ckpt_mod.choose_resume(str(b / STEP(10)), fork_root)
    assert resume.path == b / STEP(10) and resume.forked
    assert resume.identity.run_id != b_id
    assert resume.identity.forked_from["run_id"] == b_id and resume.identity.forked_from["step"] == 10
    writer = ckpt_mod.CheckpointWriter(fork_root, keep_last=2, rank=0, barrier=lambda: None,
                                       identity=resume.identity)
    _save(writer, _model(11), 11)
    assert _folder_run_id(fork_root) == _run_id(fork_root / STEP(11)) == resume.identity.run_id
    meta = json.loads((fork_root / STEP(11) / ckpt_mod.META).read_text())
    assert meta["run"]["forked_from"]["run_id"] == b_id
    assert ckpt_mod.resolve_resume("auto", fork_root) == fork_root / STEP(11)
    # a's own older checkpoint, named: the same run going back, not a fork
    back = ckpt_mod.choose_resume(str(a / STEP(15)), a)
    assert not back.forked and back.identity.run_id == _folder_run_id(a)


def test_checkpoints_written_before_run_identities_resume_with_a_warning_and_stay_the_runs(runs, capsys):
    a, b = runs
    for step_folder in ckpt_mod.list_checkpoints(a):  # as the previous format wrote them: no run, no run.json
        _as_previous_format(step_folder)
    (a / "run.json").unlink(missing_ok=True)
    resume = ckpt_mod.choose_resume("auto", a)
    assert resume.path == a / STEP(20) and not resume.forked
    assert "before checkpoints recorded their run" in capsys.readouterr().err
    writer = ckpt_mod.CheckpointWriter(a, keep_last=2, rank=0, barrier=lambda: None, identity=resume.identity)
    _save(writer, _model(25), 25)  # the older one it took over is pruned like its own
    assert [p.name for p in ckpt_mod.list_checkpoints(a)] == [STEP(20), STEP(25)]
    assert set(json.loads((a / ckpt_mod.RUN_FILE).read_text())["adopted"]) == {STEP(20)}
    # one of the previous formats copied in (under its own step) after the run took its identity is not the run's
    legacy = _copy_in(b / STEP(10), a, 700)
    _as_previous_format(legacy, step=700)
    _strip_checksums(legacy)
    assert ckpt_mod.resolve_resume("auto", a) == a / STEP(25)
    err = capsys.readouterr().err
    print(err)
    assert STEP(700) in err and "not one this run" in err


def test_a_folder_with_two_runs_checkpoints_and_no_run_file_is_refused_naming_both(runs):
    a, b = runs
    _copy_in(b / STEP(10), a, 700)
    (a / "run.json").unlink(missing_ok=True)
    with pytest.raises(ckpt_mod.CheckpointError, match=r"2 runs") as caught:
        ckpt_mod.resolve_resume("auto", a)
    message = str(caught.value)
    print(message)
    assert _run_id(a / STEP(20)) in message and _run_id(b / STEP(10)) in message and "--resume" in message
    assert ckpt_mod.resolve_resume(str(a / STEP(20)), a) == a / STEP(20)  # named: that run goes on


def _pretraining(out: Path, *overrides: str):
    """A `Pretraining` with only what `choose_checkpoint` reads (one process, no process group)."""
    from bigbird_ja.common.distributed import DistEnv
    from bigbird_ja.training.trainer import Pretraining

    trainer = Pretraining.__new__(Pretraining)
    trainer.cfg = load_pretrain_config(PRESET, [f"--run.output_dir={out}", *overrides])
    trainer.env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, backend="gloo")
    trainer.model_config = tiny_config(vocab_size=len(WORDS))
    return trainer


@pytest.mark.parametrize("every, refused", [(100, True), (300, False)])
def test_a_run_that_would_write_its_checkpoint_over_another_runs_is_refused_at_the_start(runs, every, refused,
                                                                                       capsys):
    """Refused before any step when the schedule saves at that step (every 100 steps: 700 is one), rather than
    failing there; otherwise the other run's checkpoint is named and the run goes on from its own newest."""
    from bigbird_ja.training.preflight import PreflightError

    a, b = runs
    _copy_in(b / STEP(10), a, 700)
    before = _snapshot(a)
    trainer = _pretraining(a.parent, "--train.max_steps=1000", f"--checkpoint.every_steps={every}")
    if refused:
        with pytest.raises(PreflightError, match=rf"{STEP(700)}.*another run") as caught:
            trainer.choose_checkpoint("auto")
        print(caught.value)
        assert "move" in str(caught.value)
    else:
        trainer.choose_checkpoint("auto")
        assert trainer.ckpt == str(a / STEP(20)) and trainer.writer.identity.run_id == _folder_run_id(a)
        assert STEP(700) in capsys.readouterr().out
    assert _snapshot(a) == before


# ----------------------------------------------------------------------------------------------------------------
# Case 7: the packed length is the data's; a config or checkpoint that says otherwise is refused


def _data_trainer(data: Path, tok: Path, out: Path, *overrides: str):
    from bigbird_ja.common.distributed import DistEnv
    from bigbird_ja.training.trainer import Pretraining
    from test_pretrain import TINY

    trainer = Pretraining.__new__(Pretraining)  # only what the data phases read (no threads set, no engine)
    trainer.cfg = load_pretrain_config(REPO / "configs/pretrain/tiny-cpu.yaml", [
        f"--run.output_dir={out}", f"--data.dir={data}", f"--data.tokenizer={tok}", *TINY, *overrides])
    trainer.env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, backend="gloo")
    return trainer


def test_a_prepare_seq_len_other_than_the_datas_packed_length_is_refused_naming_both(tiny_data, tmp_path):  # noqa: F811
    """Issue 25, case 7: `--prepare.seq_len 256` on data packed at 128 trained at 128 and saved 256 in config.yaml."""
    from bigbird_ja.training.preflight import PreflightError

    data, tok = tiny_data
    trainer = _data_trainer(data, tok, tmp_path / "run", "--prepare.seq_len=256")
    with pytest.raises(PreflightError) as caught:
        trainer.prepare_data()
    message = str(caught.value)
    print(message)
    assert "prepare.seq_len=256" in message and "128" in message and str(data) in message
    assert not (tmp_path / "run").exists()
    _data_trainer(data, tok, tmp_path / "run", "--prepare.seq_len=128").prepare_data()  # the data's: fine


# ----------------------------------------------------------------------------------------------------------------
# Case 9: export onto a file


def test_export_onto_an_existing_file_is_a_one_line_error_naming_it(runs, tmp_path, capsys):
    """Issue 25, case 9: a NotADirectoryError traceback."""
    from bigbird_ja.cli import main

    a, _ = runs
    target = tmp_path / "some-file"
    target.write_text("keep me\n")
    assert main(["export", str(a / STEP(20)), str(target)]) == 2
    err = capsys.readouterr().err
    print(err)
    assert err.count("\n") == 1 and str(target) in err and "is a file" in err
    assert target.read_text() == "keep me\n"
    assert main(["export", str(a / STEP(20)), str(target / "inside")]) == 2  # a file on the way to it
    assert str(target) in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# The reproduction, with `bigbird-ja pretrain` and `export`


@pytest.mark.slow
def test_another_runs_checkpoint_copied_in_is_named_and_left_and_the_run_goes_on_from_its_own(
        eight_steps, tiny_data, tmp_path):  # noqa: F811
    data, tok = tiny_data
    a = tmp_path / "a"
    shutil.copytree(eight_steps, a)
    b = tmp_path / "b"  # the same data, another seed and lr, 4 steps
    _run(_command(1, b, data, tok, ["--train.max_steps=4", "--checkpoint.every_steps=4", "--eval.every_steps=0",
                                    "--log.sample_log=false", "--run.seed=7", "--optim.lr=5e-3"]))
    root = a / "checkpoints"
    _copy_in(b / "checkpoints" / STEP(4), root, 700)
    own = {p.name: _snapshot(p) for p in ckpt_mod.list_checkpoints(root)}

    # --resume auto, further than before: the run goes on from its own step 8 and prunes only its own
    output = _run(_command(1, a, data, tok, [*EIGHT_STEPS, "--train.max_steps=12", "--resume", "auto"]))
    print(output[-3000:])
    assert f"resumed from {root / STEP(8)} at step 8" in output
    assert STEP(700) in output and "another run" in output
    assert _sessions(a)[-1]["start"]["step"] == 8
    assert [p.name for p in ckpt_mod.list_checkpoints(root)] == [STEP(8), STEP(12), STEP(700)]  # keep_last=2
    assert _snapshot(root / STEP(700)) == own[STEP(700)] and _snapshot(root / STEP(8)) == own[STEP(8)]
    # the identity is kept across the resume, and the session says whose it is
    assert _run_id(root / STEP(12)) == _run_id(root / STEP(8)) == _folder_run_id(root)
    assert _sessions(a)[-1]["start"]["run_id"] == _folder_run_id(root)

    # export of the run folder: its own newest, not the copy
    proc = subprocess.run(["bigbird-ja", "export", str(a), str(tmp_path / "exported")], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    print(proc.stdout + proc.stderr)
    assert proc.returncode == 0 and f"exported {root / STEP(12)} (step 12" in proc.stdout

    # the copy named explicitly: a fork, into a folder of its own
    fork = tmp_path / "fork"
    output = _run(_command(1, fork, data, tok, [*EIGHT_STEPS, "--resume", str(root / STEP(700))]))
    print(output[-2000:])
    assert f"resumed from {root / STEP(700)} at step 4" in output and "fork" in output
    run_file = json.loads((fork / "checkpoints" / ckpt_mod.RUN_FILE).read_text())
    assert run_file["forked_from"]["run_id"] == _run_id(b / "checkpoints" / STEP(4))
    assert run_file["forked_from"]["step"] == 4
