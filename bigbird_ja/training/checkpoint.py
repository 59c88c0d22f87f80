"""Training checkpoints that are either complete or invisible, verified before they are used, and `--resume auto`.

Layout under checkpoint.dir::

    step-00001000/
      engine/engine/...        DeepSpeed's save_checkpoint(<step>/engine, tag="engine"): module, optimizer (ZeRO
                               partitions), scheduler, DeepSpeed counters
      rng/rank-00000.pt ...    each rank's python / numpy / torch / CUDA RNG states
      config.yaml              the resolved run config (loads with load_pretrain_config)
      model/config.json        the resolved model config (vocab_size from the tokenizer)
      tokenizer/               a copy of the tokenizer, so the checkpoint exports on its own
      checkpoint.json          written last: step, trainer state (data cursor, samples, tokens), world size, and
                               every file above with its size and sha256
    latest                     "step-00001000", replaced atomically after the rename and the read-back
    run.json                   the run's identity (see "Runs" below), written before its first checkpoint's rename

Writing: every rank writes into ``.tmp-step-00001000``; the ranks then checksum the files between them (rank r takes
every world-size-th file), rank 0 writes checkpoint.json, fsyncs, renames the folder to ``step-00001000``
(atomic), reads every file back from the storage and checks it against checkpoint.json, then replaces ``latest``,
then deletes all but the newest keep_last (each renamed to a hidden name before it is removed). A process killed at
any point leaves either a hidden temporary folder, which nothing reads and the next run deletes, or a complete
checkpoint. A checkpoint that fails the read-back is reported and deletes nothing (``latest`` stays on the one
before). A write that fails (a full disk above all) removes the temporary folder on every rank's word and raises
`CheckpointDiskFullError` (or the error itself) on every rank: the earlier checkpoints and ``latest`` are untouched.

Reading (`verify_checkpoint`): a checkpoint is usable when checkpoint.json parses, every file it lists exists with
its size and sha256, and every rank's rng file unpickles. It is checked on rank 0 before the engine is built, so a
damaged checkpoint is skipped, never half-loaded. `--resume auto` (`choose_resume`) takes the newest usable
checkpoint of this run (see "Runs") by step, naming each newer one it skipped and why; when step folders exist and
none of this run's is usable it refuses, listing each, rather than start from step 0 over them. `latest` is for people and tools. Checkpoints of
the first format (sizes, no checksums) are accepted with a warning: their sizes and rng files are checked, the
contents of the weights cannot be.

Runs: every run has an identity, a random id drawn when it starts afresh (or forks) and kept across resumes and
world-size changes; run.json in the checkpoint folder holds it and every checkpoint.json records it ("run"). A step
folder is this run's when its checkpoint.json records this run's id (or it is one of the first format this run took
over, `RunIdentity.adopted`) and the step its name says. `--resume auto`, `export` of a run folder and pruning
consider only this run's checkpoints; any other step folder (another run's copied in, one renamed, one whose
checkpoint.json is gone) is named and left as it is: never resumed, exported, pruned or overwritten (the trainer
refuses to start a run that would write its checkpoint over one). Resuming another run's checkpoint needs its path
(`--resume PATH`): a fork, a new run that records where it came from (``forked_from``) and writes into a folder
holding no other run's checkpoints. Checkpoints written before identities existed (format versions 1 and 2) are
taken over, with a warning, by the run that first resumes them in their folder.

Resuming at another world size: ZeRO partitions the optimizer state by rank, and DeepSpeed refuses to load it at
another data-parallel size; `convert_to_universal` turns the checkpoint into DeepSpeed's universal format (one file
per parameter and state) once, on rank 0, and the engine loads that.
"""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..common.atomic_io import atomic_write_text, fsync_dir, fsync_tree
from ..common.checksums import check_file, file_sha256, files_under, listing

FORMAT = "bigbird-ja-pretrain-checkpoint"
# 3: the run's identity ("run"); 2: every file with its size and sha256; 1: sizes only. 1 and 2 are still read (see
# `verify_checkpoint`, and `identify_run` for their run)
VERSION = 3
META = "checkpoint.json"
LATEST = "latest"
RUN_FILE = "run.json"
RUN_FORMAT = "bigbird-ja-pretrain-run"
ENGINE_DIR = "engine"
ENGINE_TAG = "engine"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
DELETE_PREFIX = ".delete-"
UNIVERSAL_PREFIX = ".universal-"


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def step_of(path: Path) -> int | None:
    name = Path(path).name
    if not name.startswith(STEP_PREFIX) or not name[len(STEP_PREFIX):].isdigit():
        return None
    return int(name[len(STEP_PREFIX):])


# ----------------------------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Completeness, verification and discovery


class CheckpointError(ValueError):
    """No checkpoint can be used where one was asked for; the message lists what is wrong with each and the way on."""


class CheckpointDiskFullError(OSError):
    """Writing a checkpoint failed for want of disk space; the message names the folder and the free space."""


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def _listing(folder: Path) -> dict[str, int]:
    """Every file's size (the first format's listing; the writer now records `checksums.listing`)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != META:
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
    return files


def _size(entry) -> int:
    return entry if isinstance(entry, int) else entry.get("size")


def check_complete(path: Path) -> str | None:
    """None if ``path`` is a complete checkpoint (marker, format, every listed file at its size), else why not.
    Cheap: no file is read; `verify_checkpoint` reads them."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        return (f"{META} is missing (the write did not finish, or the folder was copied or edited without it; the "
                f"marker is written last)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError:
        return f"{META} is not valid JSON"
    if meta.get("format") != FORMAT:
        return f"{META} has format {meta.get('format')!r}, expected {FORMAT!r}"
    for rel, entry in meta.get("files", {}).items():
        problem = check_file(path, rel, _size(entry), META)  # the size alone: no file is read here
        if problem:
            return problem
    if not meta.get("files"):
        return f"{META} lists no files"
    return None


@dataclass
class Verification:
    """What `verify_checkpoint` found: ``problem`` (why it cannot be used; None: usable) and ``warning`` (usable,
    but checked less than fully)."""

    problem: str | None = None
    warning: str | None = None


def _has_checksums(entry) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("sha256"), str)


def verify_checkpoint(path: Path, *, from_disk: bool = False) -> Verification:
    """Whether checkpoint ``path`` can be resumed from or exported: `check_complete`, then every file against its
    sha256 (stopping at the first that differs), then every rank's rng file unpickled.

    The rng files are the first thing a resumed rank unpickles; loading them here, on rank 0 before any engine
    exists, means that a bad one makes the checkpoint skipped rather than the run crash. A checkpoint of the first
    format (sizes only) cannot have its weights checked: it is usable, with a warning saying so.
    ``from_disk``: read what the storage holds, not the page cache (the writer's read-back; see `file_sha256`).
    """
    path = Path(path)
    problem = check_complete(path)
    if problem:
        return Verification(problem)
    meta = json.loads((path / META).read_text(encoding="utf-8"))
    files = meta["files"]
    checksummed = all(_has_checksums(entry) for entry in files.values())
    if checksummed:
        for rel, entry in files.items():
            problem = check_file(path, rel, entry, META, from_disk=from_disk)
            if problem:
                return Verification(problem)
    for rel in files:
        if rel.startswith("rng/"):
            try:
                state = torch.load(path / rel, map_location="cpu", weights_only=False)
                missing = {"python", "numpy", "torch"} - set(state)
            except Exception as err:  # any unpickling failure means the same: this file cannot be restored
                return Verification(f"{rel} does not load ({type(err).__name__}: {str(err)[:200]})")
            if missing:
                return Verification(f"{rel} holds no {sorted(missing)} RNG state")
    if checksummed:
        return Verification()
    return Verification(warning=f"{path.name} was written without checksums (checkpoint format version "
                                f"{meta.get('version')}): its file sizes and rng files are checked, the contents of "
                                f"its weights cannot be")


def read_meta(path: Path) -> dict:
    problem = check_complete(path)
    if problem:
        raise ValueError(f"checkpoint {str(path)!r} is not complete: {problem}")
    return json.loads((Path(path) / META).read_text(encoding="utf-8"))


def list_checkpoints(root: Path) -> list[Path]:
    """Step folders under ``root`` (complete or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def find_latest_complete(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, by step, checking sizes only (`newest_usable` verifies). The
    `latest` pointer is not consulted, so a stale pointer or one naming a damaged folder cannot lead astray."""
    for path in reversed(list_checkpoints(Path(root))):
        if check_complete(path) is None:
            return path
    return None


def newest_usable(root: Path, log=warn, among: list[Path] | None = None) -> tuple[Path | None, list[tuple[str, str]]]:
    """(the newest checkpoint under ``root`` (of ``among``, default all its step folders) that `verify_checkpoint`
    passes, or None; the newer ones it skipped, as (name, problem)). Each skipped one, and a usable one's warning,
    goes to ``log``; with none usable the caller decides (`unusable_message` lists them)."""
    rejected = []
    for path in reversed(list_checkpoints(Path(root)) if among is None else among):
        verdict = verify_checkpoint(path)
        if verdict.problem is None:
            for name, problem in rejected:
                log(f"skipping {name}: {problem}; {path.name} is the newest checkpoint that verifies")
            if verdict.warning:
                log(verdict.warning)
            return path, rejected
        rejected.append((path.name, verdict.problem))
    return None, rejected


def unusable_message(root: Path, rejected: list[tuple[str, str]]) -> str:
    """Every step folder under ``root`` and why it cannot be used, one a line."""
    lines = "\n".join(f"    {name}: {problem}" for name, problem in rejected)
    return f"no usable checkpoint in {str(root)!r}; its {len(rejected)} step folder(s):\n{lines}"


def checked_step_folder(path: Path, log, what: str, advice: str) -> Path:
    """``path`` if it verifies (a warning, e.g. no checksums, goes to ``log``); else a `CheckpointError`:
    "<what>: <problem>. <advice>"."""
    verdict = verify_checkpoint(path)
    if verdict.problem:
        raise CheckpointError(f"{what}: {verdict.problem}. {advice}")
    if verdict.warning:
        log(verdict.warning)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Runs: which run a checkpoint belongs to


@dataclass
class RunIdentity:
    """The run that the checkpoints written from now on belong to (run.json; see "Runs" in the module docstring).

    run_id: random, drawn when a run starts afresh or forks; kept across resumes and world-size changes.
    forked_from: {"run_id", "step", "checkpoint"} of the checkpoint a fork started from (run_id None: one written
        before identities); None for a run that started from step 0.
    adopted: step folders written before identities that this run took over, by name, each with the sha256 of its
        checkpoint.json (a folder of the same name copied in later is not the run's).
    """

    run_id: str
    forked_from: dict | None = None
    adopted: dict[str, str] = field(default_factory=dict)

    @classmethod
    def new(cls, forked_from: dict | None = None, adopted: dict[str, str] | None = None) -> "RunIdentity":
        # the OS's randomness, not `random`/torch: drawing an id must not move the training RNG streams
        return cls(secrets.token_hex(8), forked_from, dict(adopted or {}))

    def to_dict(self) -> dict:
        return {"format": RUN_FORMAT, "run_id": self.run_id, "forked_from": self.forked_from,
                "adopted": self.adopted}

    @classmethod
    def from_dict(cls, data: dict) -> "RunIdentity":
        return cls(str(data["run_id"]), data.get("forked_from"), dict(data.get("adopted") or {}))

    def record(self) -> dict:
        """What every checkpoint.json of the run carries."""
        return {"id": self.run_id, "forked_from": self.forked_from}


def _json_or_none(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_run(root: Path, log=warn) -> RunIdentity | None:
    """The identity in ``root``/run.json, or None (none there; an unreadable one is reported to ``log``)."""
    path = Path(root) / RUN_FILE
    if not path.exists():
        return None
    data = _json_or_none(path)
    if data is None or data.get("format") != RUN_FORMAT or not isinstance(data.get("run_id"), str):
        log(f"{path} is not a valid run file: this run's identity is taken from its checkpoints instead")
        return None
    return RunIdentity.from_dict(data)


def write_run(root: Path, identity: RunIdentity) -> None:
    atomic_write_text(Path(root) / RUN_FILE, json.dumps(identity.to_dict(), indent=1, sort_keys=True) + "\n")


def run_of(meta: dict) -> str | None:
    """The run id a checkpoint.json records (None: written before identities)."""
    run = meta.get("run")
    return run.get("id") if isinstance(run, dict) else None


def whose(path: Path, identity: RunIdentity) -> str | None:
    """None if step folder ``path`` is a checkpoint of run ``identity`` under its own step's name; else why not.
    Reads checkpoint.json only (`verify_checkpoint` checks the files)."""
    path = Path(path)
    meta = _json_or_none(path / META)
    if meta is None:
        return f"{check_complete(path) or META + ' is not valid JSON'}; whose checkpoint it is cannot be told"
    step, run_id = meta.get("step"), run_of(meta)
    if run_id is not None and run_id != identity.run_id:
        return f"a checkpoint of another run, {run_id} (its step {step}), not of this run, {identity.run_id}"
    if step != step_of(path):
        what = "this run's checkpoint" if run_id is not None else "a checkpoint"
        return f"its {META} records step {step}, not the {step_of(path)} of its name: {what} copied or renamed"
    if run_id is None and identity.adopted.get(path.name) != file_sha256(path / META):
        return (f"written before checkpoints recorded their run (format version {meta.get('version')}), and not "
                f"one this run ({identity.run_id}) took over: copied in from another run?")
    return None


def survey(root: Path, identity: RunIdentity | None) -> tuple[list[Path], list[tuple[str, str]]]:
    """(this run's step folders under ``root``, oldest first; every other one as (name, why it is not this run's))."""
    ours, others = [], []
    for path in list_checkpoints(root):
        why = whose(path, identity) if identity is not None else "no run's checkpoint"
        if why is None:
            ours.append(path)
        else:
            others.append((path.name, why))
    return ours, others


def identify_run(root: Path, log=warn, prefer: Path | None = None) -> RunIdentity | None:
    """The identity of the run whose checkpoints are under ``root``: its run.json; without one (checkpoints written
    before identities, or the file lost), told from the checkpoints themselves; None when there are none.

    Without run.json: checkpoints of the first formats only are taken over by a new identity (`RunIdentity.adopted`),
    with a warning; checkpoints of one run make it that run; of several runs, the run of ``prefer`` (a checkpoint
    named with --resume) if it is one of them, else a `CheckpointError` listing them."""
    root = Path(root)
    found = read_run(root, log)
    if found is not None:
        return found
    folders = list_checkpoints(root)
    if not folders:
        return None
    recorded = {p: meta for p in folders if (meta := _json_or_none(p / META)) is not None}  # where it reads
    runs: dict[str, list[str]] = {}
    for path, meta in recorded.items():
        if run_of(meta) is not None:
            runs.setdefault(run_of(meta), []).append(path.name)

    def identity_of(run_id: str) -> RunIdentity:
        newest = max((p for p, m in recorded.items() if run_of(m) == run_id), key=step_of)
        return RunIdentity(run_id, recorded[newest]["run"].get("forked_from"))

    preferred = recorded.get(root / prefer.name) if prefer is not None else None  # ``prefer`` is in root
    if preferred is not None and run_of(preferred) is not None:
        return identity_of(run_of(preferred))
    if not runs:
        legacy = [p for p, meta in recorded.items() if meta.get("step") == step_of(p)]
        if legacy:
            log(f"the checkpoints in {str(root)!r} ({', '.join(p.name for p in legacy)}) were written before "
                f"checkpoints recorded their run: taking them as this run's (checkpoints written from now on record "
                f"it in {RUN_FILE})")
        return RunIdentity.new(adopted={p.name: file_sha256(p / META) for p in legacy})
    if len(runs) == 1:
        (run_id,) = runs
        log(f"{str(root)!r} has no {RUN_FILE}; its checkpoints are of one run, {run_id}: taking it as this run")
        return identity_of(run_id)
    listed = "; ".join(f"run {run_id}: {', '.join(names)}" for run_id, names in runs.items())
    raise CheckpointError(
        f"{str(root)!r} holds checkpoints of {len(runs)} runs ({listed}) and no {RUN_FILE} says which is this one. "
        f"Name the checkpoint to go on from with --resume <step folder> (the other runs' are left as they are), or "
        f"move the other runs' step folders out of it")


@dataclass
class Resume:
    """What `choose_resume` decided: the checkpoint to load (None: start at step 0), the run the checkpoints
    written from now on belong to, and whether that run is a fork of the checkpoint's."""

    path: Path | None
    identity: RunIdentity
    forked: bool = False


def newest_of_run(root: Path, identity: RunIdentity | None, log=warn) -> tuple[Path | None, list[tuple[str, str]]]:
    """(the newest checkpoint of run ``identity`` under ``root`` that verifies, or None; every step folder that
    cannot be used, as (name, why), in step order). With one chosen, each other run's step folder is named to
    ``log``, as are the newer ones of this run skipped (`newest_usable`)."""
    ours, others = survey(root, identity)
    chosen, rejected = newest_usable(root, log, among=ours)
    if chosen is not None:
        for name, why in others:
            log(f"{name} in {str(root)!r} is not this run's checkpoint: {why}. It is not resumed, exported or "
                f"pruned, and left as it is")
    return chosen, sorted(rejected + others, key=lambda item: step_of(Path(item[0])))


def fork_or_continue(path: Path, root: Path, spec: str, log=warn) -> Resume:
    """Resuming the verified checkpoint ``path`` (named with --resume ``spec``) into checkpoint folder ``root``:
    the run in ``root`` going on (back) from its own checkpoint, or a fork of another run's, which needs a folder
    holding no other step folder (its checkpoints and the other run's must not overwrite or prune each other)."""
    path, root = Path(path), Path(root)
    meta = read_meta(path)
    if step_of(path) is not None and meta["step"] != step_of(path):  # named: taken, at the step it records
        log(f"{path.name} records step {meta['step']}, not the {step_of(path)} of its name: resuming at step "
            f"{meta['step']}")
    inside = path.parent.resolve() == root.resolve()
    run = identify_run(root, log, prefer=path if inside else None)
    theirs = run_of(meta)
    adopted = inside and run is not None and run.adopted.get(path.name) == file_sha256(path / META)
    if run is not None and (theirs == run.run_id or adopted):
        return Resume(path, run)
    others = [p.name for p in list_checkpoints(root) if p.resolve() != path.resolve()]
    if others:
        whose_run = f"run {theirs}" if theirs else "a run of the format before identities"
        this_run = f"run {run.run_id}" if run is not None else "checkpoints"
        raise CheckpointError(
            f"--resume {spec}: {path.name} is a checkpoint of {whose_run} (step {meta['step']}), not of the run in "
            f"{str(root)!r} ({this_run}: {', '.join(others)}). Resuming it starts a fork, a new run that writes its "
            f"own checkpoints: give it a folder of its own (--run.output_dir=<new folder>, or "
            f"--checkpoint.dir=<new folder>) so that neither run's checkpoints are overwritten or pruned by the other")
    forked_from = {"run_id": theirs, "step": meta["step"], "checkpoint": str(path.resolve())}
    adopted = {path.name: file_sha256(path / META)} if inside else {}  # its own starting point, copied in by the user
    return Resume(path, RunIdentity.new(forked_from=forked_from, adopted=adopted), forked=True)


def foreign_in_the_way(root: Path, identity: RunIdentity, saves_at) -> list[tuple[str, str]]:
    """The step folders under ``root`` that are not run ``identity``'s and sit where it will save (``saves_at(step)``
    is True), as (name, why): the writer would have to refuse there, after the steps before it were trained."""
    return [(path.name, why) for path in list_checkpoints(root)
            if saves_at(step_of(path)) and (why := whose(path, identity)) is not None]


def resolve_resume(spec: str | None, root: Path, log=warn) -> Path | None:
    """The checkpoint `choose_resume` takes (None: start at step 0)."""
    return choose_resume(spec, root, log).path


def choose_resume(spec: str | None, root: Path, log=warn) -> Resume:
    """``--resume`` into checkpoint folder ``root``: None / "none" (start fresh, a new run), "auto" (the newest
    checkpoint of the run in root that verifies, or fresh when root holds no step folders), or a path: a step folder
    (verified), or a checkpoint folder (its run's newest, as auto). A checkpoint named by path that is not of the run
    in root is forked (`fork_or_continue`). Skipped checkpoints, other runs' step folders and warnings go to ``log``.

    Raises `CheckpointError` when step folders exist but none of this run's is usable: starting from step 0 would
    overwrite them, and an older one may be recoverable by hand."""
    if spec is None or spec == "none":
        return Resume(None, RunIdentity.new())
    root = Path(root)
    path = root if spec == "auto" else Path(spec)
    if spec != "auto":
        if not path.exists():
            raise FileNotFoundError(f"--resume {spec}: no such checkpoint folder")
        if step_of(path) is not None or (path / META).exists():
            checked_step_folder(path, log, f"--resume {spec}: not a complete checkpoint, or a damaged one",
                                "Use --resume auto to take the newest one that verifies, or name another step folder")
            return fork_or_continue(path, root, spec, log)
    run = identify_run(path, log)
    chosen, rejected = newest_of_run(path, run, log)
    if chosen is None and rejected:
        raise CheckpointError(
            f"{unusable_message(path, rejected)}\nNot starting from step 0 over them: that would overwrite them, and "
            f"one may be recoverable. To start afresh, move them away (mv {path} {path}.damaged) or pass --resume "
            f"none with a new run.output_dir / checkpoint.dir; to resume one you have repaired, or another run's, "
            f"pass --resume <its step folder>")
    if chosen is None and spec != "auto":
        raise CheckpointError(f"--resume {spec}: no checkpoint (step-NNNNNNNN folder) in this folder")
    if chosen is None:
        return Resume(None, RunIdentity.new())
    if path.resolve() != root.resolve():  # another folder's checkpoint: this run goes on from it or forks it
        return fork_or_continue(chosen, root, spec, log)
    return Resume(chosen, run)


# ----------------------------------------------------------------------------------------------------------------
# Writing


DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # EFBIG: past the file-size limit (ulimit -f)
# torch's zip writer reports a failed write without its errno: "unexpected pos" (the file stopped growing) or
# "failed writing file" / "file write failed"; on a full disk these are what one sees
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large", "unexpected pos",
                   "failed writing file", "file write failed")


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or what it was raised from) is a write refused for want of space."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(err) for text in DISK_FULL_TEXTS):
            return True
        err = err.__cause__ or err.__context__
    return False


def _amount(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


class CheckpointWriter:
    """Saves checkpoints as described in the module docstring. Every rank calls `save`; rank 0 commits.

    barrier: waits for every rank. gather(obj) -> every rank's obj, in rank order (default: one process).
    log: where rank 0 reports a checkpoint that failed its read-back (default: stderr).
    identity: the run the checkpoints belong to (rank 0 records it; `choose_resume` decides it); default: the one in
        root's run.json, else a new one.
    """

    def __init__(self, root: Path, keep_last: int, rank: int, barrier, gather=None, log=None,
                 identity: RunIdentity | None = None):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.barrier = barrier
        self.gather = gather or (lambda obj: [obj])
        self.log = log or warn
        self.identity = identity
        self.failed_readback: set[str] = set()  # written this session, then read back wrong: never counted as kept

    def remove_stale(self) -> list[str]:
        """Rank 0, at start: delete what killed runs left: temporary and half-deleted folders (a killed universal
        conversion's included) and universal copies whose checkpoint is gone."""
        removed = []
        if self.rank == 0 and self.root.is_dir():
            steps = {p.name for p in list_checkpoints(self.root)}
            for path in self.root.iterdir():
                orphan = path.name.startswith(UNIVERSAL_PREFIX) and path.name[len(UNIVERSAL_PREFIX):] not in steps
                if path.name.startswith((TMP_PREFIX, DELETE_PREFIX)) or orphan:
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                    removed.append(path.name)
        self.barrier()
        return removed

    def save(self, engine, step: int, *, trainer_state: dict, config_yaml: str, model_config, tokenizer,
             world_size: int) -> Path:
        final = self.root / step_name(step)
        tmp = self.root / f"{TMP_PREFIX}{step_name(step)}"
        started = time.perf_counter()
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)
        self.barrier()

        # 1. every rank: its ZeRO partition (DeepSpeed barriers inside), its RNG states; then every rank learns
        #    whether all succeeded (a rank that raised alone would leave the others waiting at the next barrier)
        def write_own():
            engine.save_checkpoint(str(tmp / ENGINE_DIR), tag=ENGINE_TAG, save_latest=False)
            torch.save(rng_state(), tmp / "rng" / f"rank-{self.rank:05d}.pt")

        world = self._all_or_none(self._attempt(write_own), final, tmp)

        # 2. every rank: the checksums of every world-th file (the ranks read the checkpoint between them)
        hashed = {}

        def hash_share():
            names = files_under(tmp)
            hashed.update(listing(tmp, names[self.rank::world]))

        outcome = self._attempt(hash_share)
        shares = self.gather((outcome[0] if outcome else None, hashed))
        if any(problem for problem, _ in shares):
            self._all_or_none(outcome, final, tmp, known=[problem for problem, _ in shares])

        # 3. rank 0: config, model config, tokenizer, checkpoint.json last, the rename, the read-back, `latest`,
        #    pruning; the other ranks wait for its outcome
        commit = None
        if self.rank == 0:
            merged = {rel: entry for _, part in shares for rel, entry in part.items()}
            commit = self._attempt(lambda: self._commit(tmp, final, merged, step=step, world_size=world_size,
                                                        trainer_state=trainer_state, config_yaml=config_yaml,
                                                        model_config=model_config, tokenizer=tokenizer))
        self._all_or_none(commit, final, tmp)
        self.last_seconds = time.perf_counter() - started
        return final

    def _commit(self, tmp: Path, final: Path, hashed: dict, *, step, world_size, trainer_state, config_yaml,
                model_config, tokenizer) -> None:
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        (tmp / "model").mkdir()
        model_config.to_json_file(str(tmp / "model" / "config.json"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        # what the other ranks hashed, plus rank 0's own files and any a rank's listing missed
        names = files_under(tmp, exclude=(META,))
        files = {rel: hashed[rel] if rel in hashed else listing(tmp, [rel])[rel] for rel in names}
        if self.identity is None:
            self.identity = read_run(self.root, self.log) or RunIdentity.new()
        meta = {"format": FORMAT, "version": VERSION, "step": step, "world_size": world_size,
                "run": self.identity.record(), "trainer": trainer_state,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
        fsync_tree(tmp)
        atomic_write_text(tmp / META, json.dumps(meta, indent=1, sort_keys=True) + "\n")
        if final.exists():
            why = whose(final, self.identity)
            if why is not None:  # another run's (or nobody's we can tell): never overwritten
                raise CheckpointError(
                    f"not overwriting {str(final)!r} with this run's checkpoint of step {step}: {why}. It is left as "
                    f"it is; move it out of {str(self.root)!r}, then continue with --resume auto")
            # this run's checkpoint of the same step from an earlier attempt: replace it
            doomed = self.root / f"{DELETE_PREFIX}{final.name}-{os.getpid()}"
            os.replace(final, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        if read_run(self.root, self.log) != self.identity:  # first: no step folder of this run without its run file
            write_run(self.root, self.identity)
        os.replace(tmp, final)
        fsync_dir(self.root)
        # read back from the storage (not the page cache) before anything older is deleted
        verdict = verify_checkpoint(final, from_disk=True)
        if verdict.problem:
            self.failed_readback.add(final.name)
            kept = [p.name for p in list_checkpoints(self.root) if p != final]
            pointer = self.root / LATEST
            latest = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else "nothing"
            self.log(f"checkpoint {final.name} failed verification right after it was written ({verdict.problem}): "
                     f"the storage under {str(self.root)!r} returned other bytes than were written. Nothing was "
                     f"deleted: the older checkpoints are kept ({', '.join(kept) or 'none'}) and `latest` still "
                     f"names {latest}; --resume auto skips {final.name}. Check the disk (dmesg, SMART, the file "
                     f"system's health) before trusting more checkpoints on it")
            return
        atomic_write_text(self.root / LATEST, final.name + "\n")
        self._prune(final)

    def _attempt(self, work) -> tuple[dict, BaseException] | None:
        """None if ``work()`` succeeds, else (what every rank needs to know, the error)."""
        try:
            work()
        except Exception as err:  # reported to every rank, then raised on every rank (`_all_or_none`)
            probe = self.root if self.root.exists() else self.root.parent
            file_limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            return {"rank": self.rank, "error": f"{type(err).__name__}: {err}", "disk_full": is_disk_full(err),
                    "free": shutil.disk_usage(probe).free,
                    "file_limit": None if file_limit == resource.RLIM_INFINITY else file_limit}, err
        return None

    def _all_or_none(self, outcome, final: Path, tmp: Path, known: list | None = None) -> int:
        """Every rank's ``outcome`` of the same phase (gathered, unless ``known``); returns the world size if none
        failed. Otherwise rank 0 removes the temporary folder and every rank raises: `CheckpointDiskFullError`
        when a rank ran out of space, else this rank's own error (or one naming the rank that failed)."""
        problems = known if known is not None else self.gather(outcome[0] if outcome else None)
        failed = [p for p in problems if p]
        if not failed:
            return len(problems)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space it took; nothing reads it
        own = outcome[1] if outcome else None
        full = [p for p in failed if p["disk_full"]]
        if full:
            pointer = self.root / LATEST
            latest = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
            newest = find_latest_complete(self.root)
            size = f"; the newest checkpoint, {newest.name}, takes {_amount(_tree_bytes(newest))}" if newest else ""
            kept = (f"the earlier checkpoints and `latest` ({latest}) are intact" if latest else
                    "no earlier checkpoint was touched")
            limited = [p for p in full if p.get("file_limit") is not None]
            if limited:  # room on the disk, but not for this process: a file-size limit
                size += (f"; rank(s) {', '.join(str(p['rank']) for p in limited)} may write no file larger than "
                         f"{_amount(limited[0]['file_limit'])} (RLIMIT_FSIZE, `ulimit -f`): raise it in the job "
                         f"script")
            error = CheckpointDiskFullError(
                f"disk full: writing checkpoint {final.name} under {str(self.root)!r} failed on rank(s) "
                f"{', '.join(str(p['rank']) for p in full)} ({full[0]['error'][:300]}); the file system had "
                f"{_amount(min(p['free'] for p in full))} free{size}. Its temporary folder is removed and {kept}. "
                f"Free space or point checkpoint.dir at a larger disk (or lower checkpoint.keep_last), then continue "
                f"with --resume auto")
            error.errno = errno.ENOSPC
            raise error from own
        if own is not None:
            raise own
        first = failed[0]
        raise RuntimeError(f"checkpoint {final.name}: rank {first['rank']} failed writing it ({first['error']}); its "
                           f"temporary folder is removed, the earlier checkpoints are intact")

    def _prune(self, newest: Path) -> None:
        """Keep ``newest`` (just verified) and the keep_last - 1 complete checkpoints of this run before it. Newer
        step folders (ones a resume skipped as damaged), ones that failed their read-back and other runs' are not
        this run's to count or delete: `--resume auto` names them until the run overwrites its own or the user
        moves them."""
        older = [p for p in list_checkpoints(self.root) if step_of(p) < step_of(newest)
                 and p.name not in self.failed_readback and check_complete(p) is None
                 and whose(p, self.identity) is None]
        doomed_names = [p.name for p in older[:max(0, len(older) - (self.keep_last - 1))]]
        for name in doomed_names:
            doomed = self.root / f"{DELETE_PREFIX}{name}"
            os.replace(self.root / name, doomed)  # first out of sight, then deleted: never a half-deleted one
            shutil.rmtree(doomed, ignore_errors=True)
            shutil.rmtree(self.root / f"{UNIVERSAL_PREFIX}{name}", ignore_errors=True)
        if any(name in self.identity.adopted for name in doomed_names):  # a later folder of that name is not one
            for name in doomed_names:
                self.identity.adopted.pop(name, None)
            write_run(self.root, self.identity)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def engine_load_dir(path: Path) -> Path:
    return Path(path) / ENGINE_DIR


def universal_dir(path: Path) -> Path:
    path = Path(path)
    return path.parent / f"{UNIVERSAL_PREFIX}{path.name}"


def convert_to_universal(path: Path) -> Path:
    """DeepSpeed's universal form of checkpoint ``path`` (rank 0 only; done once, kept beside it until pruned).

    Returns the folder to pass to ``engine.load_checkpoint(folder, tag=ENGINE_TAG)``.
    """
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    out = universal_dir(path)
    done = out / ENGINE_TAG / "zero"
    if done.is_dir() and (out / "complete").is_file():
        return out
    # named like the writer's temporary folders, so `remove_stale` deletes what a killed conversion leaves
    tmp = out.with_name(f"{TMP_PREFIX}{out.name.lstrip('.')}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(engine_load_dir(path) / ENGINE_TAG),
                              output_folder=str(tmp / ENGINE_TAG), num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
    (tmp / "complete").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_rng(path: Path, rank: int) -> dict | None:
    f = Path(path) / "rng" / f"rank-{rank:05d}.pt"
    if not f.is_file():
        return None
    return torch.load(f, map_location="cpu", weights_only=False)
