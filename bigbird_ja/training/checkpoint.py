"""Training checkpoints that are either complete or invisible, and `--resume auto`.

Layout under checkpoint.dir::

    step-00001000/
      engine/engine/...        DeepSpeed's save_checkpoint(<step>/engine, tag="engine"): module, optimizer (ZeRO
                               partitions), scheduler, DeepSpeed counters
      rng/rank-00000.pt ...    each rank's python / numpy / torch / CUDA RNG states
      config.yaml              the resolved run config (loads with load_pretrain_config)
      model/config.json        the resolved model config (vocab_size from the tokenizer)
      tokenizer/               a copy of the tokenizer, so the checkpoint exports on its own
      checkpoint.json          written last: step, trainer state (data cursor, samples, tokens), world size, and
                               every file above with its size
    latest                     "step-00001000", replaced atomically after the rename

Writing: every rank writes into ``.tmp-step-00001000``; after a barrier rank 0 writes checkpoint.json, fsyncs,
renames the folder to ``step-00001000`` (atomic), then replaces ``latest``, then deletes all but the newest
keep_last (each renamed to a hidden name before it is removed). A process killed at any point leaves either a
hidden temporary folder, which nothing reads and the next run deletes, or a complete checkpoint.

Reading: a checkpoint is complete when checkpoint.json parses and every file it lists exists with its size.
`find_latest_complete` returns the newest complete one by step (`latest` is for people and tools).

Resuming at another world size: ZeRO partitions the optimizer state by rank, and DeepSpeed refuses to load it at
another data-parallel size; `convert_to_universal` turns the checkpoint into DeepSpeed's universal format (one file
per parameter and state) once, on rank 0, and the engine loads that.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..common.atomic_io import atomic_write_text, fsync_dir, fsync_tree

FORMAT = "bigbird-ja-pretrain-checkpoint"
VERSION = 1
META = "checkpoint.json"
LATEST = "latest"
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
# Completeness and discovery


def _listing(folder: Path) -> dict[str, int]:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != META:
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
    return files


def check_complete(path: Path) -> str | None:
    """None if ``path`` is a complete checkpoint, else why not."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        return f"{META} is missing (the write did not finish)"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError:
        return f"{META} is not valid JSON"
    if meta.get("format") != FORMAT:
        return f"{META} has format {meta.get('format')!r}, expected {FORMAT!r}"
    for rel, size in meta.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {META} says {size}"
    if not meta.get("files"):
        return f"{META} lists no files"
    return None


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
    """The newest complete checkpoint under ``root``, by step. The `latest` pointer is for people and tools; it is
    not consulted, so a stale pointer or one naming a damaged folder cannot lead a resume astray."""
    for path in reversed(list_checkpoints(Path(root))):
        if check_complete(path) is None:
            return path
    return None


def resolve_resume(spec: str | None, root: Path) -> Path | None:
    """``--resume``: None / "none" (start fresh), "auto" (newest complete under root, or fresh), or a path (a step
    folder, or a checkpoint root whose newest complete checkpoint is taken)."""
    if spec is None or spec == "none":
        return None
    if spec == "auto":
        return find_latest_complete(root)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--resume {spec}: no such checkpoint folder")
    if step_of(path) is None and (path / META).exists() is False:
        latest = find_latest_complete(path)
        if latest is None:
            raise ValueError(f"--resume {spec}: no complete checkpoint in this folder")
        return latest
    problem = check_complete(path)
    if problem:
        raise ValueError(f"--resume {spec}: not a complete checkpoint ({problem}); use --resume auto to take the "
                         f"newest complete one")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Writing


class CheckpointWriter:
    """Saves checkpoints as described in the module docstring. Every rank calls `save`; rank 0 commits."""

    def __init__(self, root: Path, keep_last: int, rank: int, barrier):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.barrier = barrier

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
        # 1. every rank: its ZeRO partition (DeepSpeed barriers inside), its RNG states
        engine.save_checkpoint(str(tmp / ENGINE_DIR), tag=ENGINE_TAG, save_latest=False)
        torch.save(rng_state(), tmp / "rng" / f"rank-{self.rank:05d}.pt")
        self.barrier()
        # 2. rank 0: config, model config, tokenizer, then checkpoint.json last, then the rename and the pointer
        if self.rank == 0:
            (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
            (tmp / "model").mkdir()
            model_config.to_json_file(str(tmp / "model" / "config.json"))
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
            meta = {"format": FORMAT, "version": VERSION, "step": step, "world_size": world_size,
                    "trainer": trainer_state, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "files": _listing(tmp)}
            fsync_tree(tmp)
            atomic_write_text(tmp / META, json.dumps(meta, indent=1, sort_keys=True) + "\n")
            if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it
                doomed = self.root / f"{DELETE_PREFIX}{final.name}-{os.getpid()}"
                os.replace(final, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(self.root)
            atomic_write_text(self.root / LATEST, final.name + "\n")
            self._prune()
        self.barrier()
        self.last_seconds = time.perf_counter() - started
        return final

    def _prune(self) -> None:
        complete = [p for p in list_checkpoints(self.root) if check_complete(p) is None]
        for path in complete[:-self.keep_last]:
            doomed = self.root / f"{DELETE_PREFIX}{path.name}"
            os.replace(path, doomed)  # first out of sight, then deleted: never a half-deleted "complete" folder
            shutil.rmtree(doomed, ignore_errors=True)
            shutil.rmtree(self.root / f"{UNIVERSAL_PREFIX}{path.name}", ignore_errors=True)


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
