"""Parallel and restartable `prepare`: slices of the inputs packed by several workers (processes or nodes) into one
folder, merged into the same bytes as a one-process run; a killed worker or merge resumes without redoing finished
slices."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bigbird_ja import cli
from bigbird_ja.data import PackedDataset, PrepareOptions, prepare, read_manifest, sample_documents
from bigbird_ja.data.cleaning import CleaningOptions
from bigbird_ja.data.format import check_shard_files
from bigbird_ja.data.preparation import Slice, assign_slices, parse_worker, plan_slices, worker_from_env
from bigbird_ja.data.sources import discover_inputs
from test_data import _train_tokenizer

SLICE_BYTES = 11000  # the sample corpus in 7 files of ~6 kB: 4 slices of 2 files (the last of 1)
ARGS = dict(seq_len=64, seed=5, shard_tokens=64 * 6, progress=False)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return _train_tokenizer(tmp_path_factory.mktemp("tok"), 1200)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("corpus")
    docs = sample_documents()
    paths = []
    for i in range(7):
        path = root / f"part-{i}.txt"
        path.write_text("\n\n".join(docs[i * 7:(i + 1) * 7]) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def _options(**kw) -> PrepareOptions:
    return PrepareOptions(slice_bytes=SLICE_BYTES, durable=False, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tok_dir, inputs) -> Path:
    out = tmp_path_factory.mktemp("ref") / "one"
    report = prepare(tok_dir, inputs, out, num_workers=0, options=_options(), **ARGS)
    assert report.merged and report.num_slices == 4 and report.slices_packed == 4
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_slices_are_defined_by_the_inputs_and_workers_share_them_out(inputs):
    files = discover_inputs(inputs)
    slices = plan_slices(files, SLICE_BYTES)
    assert [(s.start, s.stop) for s in slices] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert plan_slices(files, 1) == [Slice(i, i, i + 1, os.path.getsize(inputs[i])) for i in range(7)]
    for n in (1, 2, 3, 8):
        shares = assign_slices(slices, n)
        assert sorted(i for share in shares for i in share) == [0, 1, 2, 3]  # disjoint, complete
    sized = [Slice(i, i, i + 1, size) for i, size in enumerate([10, 1, 1, 1, 9, 8])]
    assert assign_slices(sized, 2) == [[0, 1, 2, 3], [4, 5]]  # largest first to the least loaded: 13, 17


def test_worker_numbers_come_from_the_launcher_or_are_refused_clearly(monkeypatch):
    assert parse_worker("2/5") == (2, 5)
    for bad in ("5/5", "x/2", "1", "-1/2"):
        with pytest.raises(ValueError, match="I/N"):
            parse_worker(bad)
    assert worker_from_env({"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    assert worker_from_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}) == (1, 4)
    assert worker_from_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}) == (0, 2)
    with pytest.raises(ValueError, match="srun"):  # a batch script (no job step) is not a worker
        worker_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"})


def test_one_process_output_is_a_normal_data_set_with_no_work_files_left(reference, inputs):
    assert sorted(_files(reference)) == sorted(
        ["manifest.json", "issues.jsonl"] + [f"shard-{i:05d}.{ext}" for i in range(len(read_manifest(reference)
                                                                                      ["shards"]))
                                             for ext in ("bin", "idx", "json")])
    manifest = read_manifest(reference)
    assert [s["input_files"] for s in manifest["slices"]] == [[0, 2], [2, 4], [4, 6], [6, 7]]
    check_shard_files(reference, manifest, checksums=True)
    assert PackedDataset(reference, verify_checksums=True).num_samples == manifest["totals"]["num_sequences"]
    assert manifest["totals"]["num_documents"] == 49


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_any_number_of_workers_writes_the_same_bytes_as_one_process(tmp_path, tok_dir, inputs, reference, workers):
    out = tmp_path / "par"
    reports = [prepare(tok_dir, inputs, out, num_workers=1 if i % 2 else 0, options=_options(),
                       worker=(i, workers), **ARGS) for i in range(workers)]
    # The first worker to find every slice finished merges (with 5 workers for 4 slices, worker 3); a worker
    # after it finds the data set complete.
    assert [r.merged and not r.note for r in reports].count(True) == 1
    assert [r.merged for r in reports] == [False] * min(workers - 1, 3) + [True] * max(1, workers - 3)
    assert reports[0].waiting_for  # its report says which slices others still pack
    assert sum(r.slices_packed for r in reports) == 4
    assert _files(out) == _files(reference)


@pytest.mark.slow  # four interpreter start-ups: 10-40 s on 2 busy cores
def test_workers_started_by_a_launcher_in_parallel_then_merge(tmp_path, tok_dir, inputs, reference):
    """Two real processes at once, told their number the way torchrun / srun tell it (RANK / WORLD_SIZE)."""
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "bigbird_ja.cli", "prepare", "--tokenizer", str(tok_dir), "--input",
           *map(str, inputs), "--out", str(out), "--seq-len", "64", "--seed", "5", "--shard-tokens", str(64 * 6),
           "--slice-bytes", str(SLICE_BYTES), "--num-workers", "0", "--no-progress"]
    procs = [subprocess.Popen(cmd + ["--slice", "auto"], env=dict(os.environ, RANK=str(r), WORLD_SIZE="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    if not (out / "manifest.json").exists():  # both finished before either saw the other's slices done
        assert subprocess.run(cmd + ["--merge"], capture_output=True, timeout=180).returncode == 0
    # The manifest holds the durable option nowhere, so the CLI's durable output equals the reference's bytes.
    assert _files(out) == _files(reference)
    # A worker of a requeued job finds the finished data set and has nothing to do.
    again = subprocess.run(cmd + ["--slice", "1/2"], capture_output=True, text=True, timeout=180)
    assert again.returncode == 0 and "already complete" in again.stdout, again


def test_a_killed_worker_resumes_without_redoing_finished_slices(tmp_path, tok_dir, inputs, reference):
    out = tmp_path / "killed"
    # Worker 0 of 2 packs slices 0 and 3 (the largest, then the smallest); it is killed inside slice 3.
    assert assign_slices(plan_slices(discover_inputs(inputs), SLICE_BYTES), 2) == [[0, 3], [1, 2]]
    script = textwrap.dedent(f"""
        import os, signal
        from bigbird_ja.data import preparation as m
        original = m._ShardWriter.write_rows
        def write_rows(self, rows):
            original(self, rows)
            if "slice-00003" in str(self.out_dir) and self.shards:
                os.kill(os.getpid(), signal.SIGKILL)
        m._ShardWriter.write_rows = write_rows
        m.prepare({str(tok_dir)!r}, {list(map(str, inputs))!r}, {str(out)!r}, num_workers=0,
                  options=m.PrepareOptions(slice_bytes={SLICE_BYTES}, durable=False), worker=(0, 2),
                  seq_len=64, seed=5, shard_tokens=64 * 6, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    first = out / "slices" / "slice-00000"
    assert (first / "slice.json").is_file() and not (out / "slices" / "slice-00003" / "slice.json").exists()
    stamp = (first / "slice.json").stat().st_mtime_ns
    report = prepare(tok_dir, inputs, out, num_workers=0, options=_options(), worker=(0, 2), **ARGS)
    assert (report.slices_resumed, report.slices_packed, report.merged) == (1, 1, False)
    assert (first / "slice.json").stat().st_mtime_ns == stamp  # not redone
    with pytest.raises(ValueError, match=r"slices \[1, 2\] of 4 are not finished"):
        prepare(tok_dir, inputs, out, options=_options(), merge_only=True, **ARGS)
    assert prepare(tok_dir, inputs, out, num_workers=0, options=_options(), worker=(1, 2), **ARGS).merged
    assert _files(out) == _files(reference)


def test_a_damaged_or_stale_slice_is_packed_again(tmp_path, tok_dir, inputs, reference):
    out = tmp_path / "damaged"
    prepare(tok_dir, inputs, out, num_workers=0, options=_options(), worker=(0, 2), **ARGS)
    damaged = out / "slices" / "slice-00000" / "shard-00000.idx"
    damaged.write_bytes(damaged.read_bytes()[:-8])  # cut short: its slice is no longer finished
    report = prepare(tok_dir, inputs, out, num_workers=0, options=_options(), worker=(0, 2), **ARGS)
    assert (report.slices_resumed, report.slices_packed) == (1, 1)
    # Another seed changes every slice's key (and so their shards' metadata): all are packed again.
    report = prepare(tok_dir, inputs, out, num_workers=0, options=_options(), worker=(0, 2),
                     **dict(ARGS, seed=6))
    assert (report.slices_resumed, report.slices_packed) == (0, 2)
    prepare(tok_dir, inputs, out, num_workers=0, options=_options(), worker=(0, 2), **ARGS)
    prepare(tok_dir, inputs, out, num_workers=0, options=_options(), worker=(1, 2), **ARGS)
    assert _files(out) == _files(reference)


def test_a_merge_killed_half_way_is_run_again(tmp_path, tok_dir, inputs, reference, monkeypatch):
    from bigbird_ja.data import preparation as m

    out = tmp_path / "merge"
    prepare(tok_dir, inputs, out, num_workers=0, options=_options(), worker=(0, 2), **ARGS)
    calls = {"n": 0}
    original = m._link

    def failing_link(src, dst, durable):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("killed in the merge (simulated)")
        original(src, dst, durable)

    monkeypatch.setattr(m, "_link", failing_link)
    with pytest.raises(OSError, match="simulated"):
        prepare(tok_dir, inputs, out, num_workers=0, options=_options(), worker=(1, 2), **ARGS)
    assert not (out / "manifest.json").exists() and (out / "shard-00000.bin").exists()
    with pytest.raises(FileNotFoundError, match="not a finished"):
        PackedDataset(out)
    monkeypatch.setattr(m, "_link", original)
    # The killed merge still holds its claim: a worker (of a requeued job) does not merge beside it ...
    report = prepare(tok_dir, inputs, out, num_workers=0, options=_options(), worker=(0, 2), **ARGS)
    assert not report.merged and "--merge" in report.summary() and report.slices_resumed == 2
    # ... --merge takes it over.
    report = prepare(tok_dir, inputs, out, options=_options(), merge_only=True, **ARGS)
    assert report.merged and report.slices_packed == 0
    assert _files(out) == _files(reference)


def test_cli_refuses_overwrite_with_several_workers(tmp_path, tok_dir, inputs, capsys):
    code = cli.main(["prepare", "--tokenizer", str(tok_dir), "--input", str(inputs[0]), "--out", str(tmp_path / "o"),
                     "--slice", "0/2", "--overwrite", "--no-progress"])
    assert code == 2 and "delete the output folder first" in capsys.readouterr().err


# Workers sharing --out with other settings would never merge (each slice's key differs): each used to exit 0
# saying the other slices are "still being packed". A worker or a merge meeting slices finished with other settings
# is refused, naming each differing option with both values and the fix.
OTHER_SETTINGS = {  # option: (the other worker's prepare arguments, the folder's value, the other value)
    "--seq-len": (dict(seq_len=128), "64", "128"),
    "--normalization": (dict(options=_options(cleaning=CleaningOptions(normalization=None))), "NFKC", "none"),
    "--slice-bytes": (dict(options=PrepareOptions(slice_bytes=3000, durable=False)), "11000", "3000"),
}


@pytest.mark.parametrize("option", list(OTHER_SETTINGS))
def test_a_worker_started_with_other_settings_is_refused_naming_them(tmp_path, tok_dir, inputs, reference, option):
    other, folder_value, other_value = OTHER_SETTINGS[option]
    out = tmp_path / "mixed"
    assert not prepare(tok_dir, inputs, out, num_workers=0, options=_options(), worker=(0, 2), **ARGS).merged
    finished = _files(out / "slices" / "slice-00000")
    with pytest.raises(ValueError) as error:
        prepare(tok_dir, inputs, out, num_workers=0, worker=(1, 2), **{**ARGS, "options": _options(), **other})
    message = str(error.value)
    print(message)
    assert f"{option} {folder_value}" in message and f"{option} {other_value}" in message, message
    assert "--overwrite" in message and "same" in message
    # Refused before it packed or removed anything: a worker with the folder's settings completes the data set.
    assert _files(out / "slices" / "slice-00000") == finished
    assert prepare(tok_dir, inputs, out, num_workers=0, options=_options(), worker=(1, 2), **ARGS).merged
    assert _files(out) == _files(reference)


def test_merge_names_the_slices_finished_with_other_settings(tmp_path, tok_dir, inputs, reference):
    """Two workers started at once with different --seq-len: neither saw the other's slices finished at its start.
    (Made here by packing each worker's slices into a folder of its own and moving one worker's into the other's.)"""
    out, elsewhere = tmp_path / "mixed", tmp_path / "elsewhere"
    prepare(tok_dir, inputs, out, num_workers=0, options=_options(), worker=(0, 2), **ARGS)
    prepare(tok_dir, inputs, elsewhere, num_workers=0, options=_options(), worker=(1, 2), **dict(ARGS, seq_len=128))
    for name in ("slice-00001", "slice-00002"):
        (elsewhere / "slices" / name).rename(out / "slices" / name)
    with pytest.raises(ValueError) as error:
        prepare(tok_dir, inputs, out, options=_options(), merge_only=True, **ARGS)
    message = str(error.value)
    print(message)
    assert "slices [1, 2]" in message and "--seq-len 128" in message and "--seq-len 64" in message, message
    assert "not finished" not in message
    # The worker of the slices at 64 is refused as well (it would wait for ever) ...
    with pytest.raises(ValueError, match=r"--seq-len 128"):
        prepare(tok_dir, inputs, out, num_workers=0, options=_options(), worker=(0, 2), **ARGS)
    # ... and the fix it names works: the other worker again with the same --seq-len packs its slices again.
    assert prepare(tok_dir, inputs, out, num_workers=0, options=_options(), worker=(1, 2), **ARGS).merged
    assert _files(out) == _files(reference)


def test_cli_worker_with_other_settings_exits_with_the_message(tmp_path, tok_dir, inputs, capsys):
    common = ["prepare", "--tokenizer", str(tok_dir), "--input", *map(str, inputs), "--out", str(tmp_path / "o"),
              "--seed", "5", "--shard-tokens", str(64 * 6), "--slice-bytes", str(SLICE_BYTES), "--num-workers", "0",
              "--no-progress"]
    assert cli.main(common + ["--seq-len", "64", "--slice", "0/2"]) == 0
    capsys.readouterr()
    code = cli.main(common + ["--seq-len", "64", "--normalization", "none", "--slice", "1/2"])
    err = capsys.readouterr().err
    assert code == 2 and "--normalization NFKC" in err and "--normalization none" in err, err


def test_a_worker_that_meets_other_settings_only_at_its_end_is_refused(tmp_path, tok_dir, inputs, monkeypatch):
    """Started together, neither worker sees the other's slices at its start; the one to finish second must not
    report the folder as waiting for slices that will never merge."""
    from bigbird_ja.data import preparation as m

    out, elsewhere = tmp_path / "mixed", tmp_path / "elsewhere"
    prepare(tok_dir, inputs, elsewhere, num_workers=0, options=_options(), worker=(0, 2), **ARGS)
    original = m._Run.pack_slice

    def pack_while_the_other_worker_finishes(self, s, *args):
        read = original(self, s, *args)
        for name in ("slice-00000", "slice-00003"):  # the other worker (--seq-len 64) finishes meanwhile
            if (elsewhere / "slices" / name).exists():
                (elsewhere / "slices" / name).rename(out / "slices" / name)
        return read

    monkeypatch.setattr(m._Run, "pack_slice", pack_while_the_other_worker_finishes)
    with pytest.raises(ValueError, match=r"slices \[0, 3\] were finished by workers started with --seq-len 64, "
                                         r"while this worker has --seq-len 128"):
        prepare(tok_dir, inputs, out, num_workers=0, options=_options(), worker=(1, 2), **dict(ARGS, seq_len=128))
