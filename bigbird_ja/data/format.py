"""The on-disk format of packed pretraining data (written through `bigbird_ja.common.atomic_io`).

Why a format of our own: a 4,096-token encoder pretrained on hundreds of GPUs needs fixed-length samples that every
rank can read at random, without parsing, from a handful of large files. So a prepared data folder is:

    DATA/
      manifest.json        written LAST; the only file a loader trusts. Lists every shard with its size and sha256.
      shard-00000.bin      token ids, raw little-endian uint16 (vocab <= 65,536) or uint32, shape
                           [num_sequences, seq_len] row-major, no header: np.memmap / mmap it and index rows.
      shard-00000.idx      uint64 little-endian: the offset (in tokens, within this shard) of the first token of
                           every document that starts in this shard, ascending.
      shard-00000.json     this shard's metadata (counts, dtype, seq_len, tokenizer fingerprint, seed, sha256).
      issues.jsonl         every input problem found (file, line or row, kind, action), one JSON object a line.
      slices/              only while prepare runs (see below); removed once the manifest is written.

The manifest and the per-shard ``shard-*.json`` say the same things twice on purpose: `check_shard_files` (run by
the loader and by pretraining's preflight) compares them, and each shard's size with its counts, so a folder whose
manifest was edited, or whose shards come from several runs, is refused as corrupt or mixed (re-run prepare) rather
than read with the wrong sequence length. It reads only metadata; the loader checks the ids of every sample it reads
against the vocabulary (an id outside it is corruption: `CorruptDataError`), and ``checksums`` hashes the shards.

**Slices** (parallel and restartable prepare). The inputs are cut into SLICES of whole consecutive input files
(about ``slice_bytes`` of input each, so they are defined by the inputs alone, never by the number of workers).
Each slice is packed on its own, as if it were the whole input (its last sequence padded), into
``slices/slice-NNNNN/`` with its own ``shard-*`` files, ``issues.jsonl`` and, written last, ``slice.json``: the
slice's shards, totals, a key of everything that determines its bytes, the settings behind that key by name (what
every worker sharing the folder must agree on), and the size and sha256 of its files. A
slice folder with a valid ``slice.json`` is finished and is never redone. The MERGE (the worker that finishes the
last slice, or ``prepare --merge``) hard-links the slices' shards into the flat layout above in slice order,
numbering them globally, rewrites each small ``shard-*.json`` with its global index, concatenates the issue logs,
writes the manifest, and removes ``slices/``. A one-process run goes through the same slices and the same merge,
so any number of workers on any number of nodes gives byte-identical output.

Every file is written atomically (`bigbird_ja.common.atomic_io`: a hidden temporary name, fsync, rename). The manifest is renamed into
place after all shards, so a run killed at any point leaves either no ``manifest.json`` (the loader refuses the
folder) or a complete data set; never a partial shard that a loader would read. Temporary files of a killed run are
removed by the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common.checksums import file_sha256

FORMAT_NAME = "bigbird-ja-packed"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ISSUES_NAME = "issues.jsonl"
SHARD_STEM = "shard-{index:05d}"
# Files a prepare run may leave in its output folder; anything else there means the folder is not ours.
OWN_FILE = re.compile(r"^(manifest\.json|issues\.jsonl|slices|shard-\d{5,}\.(bin|idx|json)|\..+\.tmp-\d+)$")
SLICES_DIR = "slices"  # the work folder of parallel / restartable prepare (see "Slices" above)
SLICE_STEM = "slice-{index:05d}"
SLICE_MANIFEST = "slice.json"  # written last in a slice folder: the slice is finished
TEMP_FILE = re.compile(r"^\..+\.tmp-\d+$")

UINT16_VOCAB_LIMIT = 1 << 16


class CorruptDataError(ValueError):
    """A prepared folder whose files disagree with each other or hold ids outside the vocabulary: corrupt, or
    mixed from different prepare runs. The fix is never another tokenizer: copy the folder again or re-run prepare."""


# What every shard-*.json repeats from the manifest (the shard's own entry, `ShardInfo`, is compared too).
SHARED_KEYS = ("format", "format_version", "seq_len", "dtype", "vocab_size", "tokenizer_fingerprint", "seed")
_REQUIRED_KEYS = {"seq_len": int, "dtype": str, "vocab_size": int, "tokenizer_fingerprint": str, "seed": int,
                  "special_token_ids": dict, "shards": list}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (halves disk and page cache), else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size}: must be positive")
    if vocab_size > 1 << 32:
        raise ValueError(f"vocab_size={vocab_size}: more than 2**32 ids do not fit the uint32 token format")
    return np.dtype("<u2") if vocab_size <= UINT16_VOCAB_LIMIT else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    return {np.dtype("<u2"): "uint16", np.dtype("<u4"): "uint32"}[np.dtype(dtype)]


def dtype_from_name(name: str) -> np.dtype:
    table = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
    if name not in table:
        raise ValueError(f"token dtype {name!r} in the manifest: expected one of {sorted(table)}; the folder was "
                         f"written by another tool or a newer bigbird-ja")
    return table[name]


def canonical_json(obj) -> bytes:
    """Sorted keys, fixed separators, UTF-8, trailing newline: the same object always gives the same bytes."""
    return (json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=1) + "\n").encode("utf-8")


@dataclass(frozen=True)
class ShardInfo:
    """One shard as listed in the manifest."""

    index: int
    tokens_file: str
    index_file: str
    meta_file: str
    num_sequences: int
    num_tokens: int
    num_documents: int
    tokens_sha256: str

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, obj: dict) -> "ShardInfo":
        return cls(**{key: obj[key] for key in cls.__dataclass_fields__})


# ----------------------------------------------------------------------------------------------------------------
# Reading


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a finished prepare run, validated; an error explains what is wrong and what to do."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {str(data_dir)!r} does not exist: run `bigbird-ja prepare --out "
                                f"{data_dir} ...` first")
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: {str(data_dir)!r} is not a finished `bigbird-ja prepare` output (a run "
            f"that was killed or failed leaves no manifest, so its shards are never read); re-run prepare into it")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        manifest = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); re-run prepare") from None
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{str(path)!r} has format {manifest.get('format')!r}, expected {FORMAT_NAME!r}: not a "
                         f"bigbird-ja data folder")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has format_version {version!r}; this bigbird-ja reads version "
                         f"{FORMAT_VERSION}: re-run prepare with this version, or install the version that wrote it")
    for key, kind in _REQUIRED_KEYS.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CorruptDataError(f"{str(path)!r}: {key} is {value!r} ({type(value).__name__}), expected "
                                   f"{kind.__name__}: the manifest is corrupt or was edited; re-run prepare")
    if manifest["seq_len"] < 2 or manifest["vocab_size"] < 1:
        raise CorruptDataError(f"{str(path)!r}: seq_len={manifest['seq_len']}, vocab_size={manifest['vocab_size']} "
                               f"cannot be: the manifest is corrupt or was edited; re-run prepare")
    manifest["_sha256"] = hashlib.sha256(raw).hexdigest()
    return manifest


def shard_infos(manifest: dict) -> list[ShardInfo]:
    try:
        return [ShardInfo.from_json(obj) for obj in manifest["shards"]]
    except (KeyError, TypeError) as err:
        raise CorruptDataError(f"a shard entry of the manifest lacks {err} or is not an object: the manifest is "
                               f"corrupt or was edited; re-run prepare") from None


_MIXED = "the data is corrupt or mixed from different prepare runs (a file edited, or copied in from another folder)"


def check_shard_files(data_dir: str | os.PathLike, manifest: dict, checksums: bool = False) -> None:
    """Every shard the manifest lists exists, agrees with it and has the size its counts give (and, with
    ``checksums``, the right sha256). Reads each shard's small ``.json`` and sizes, never its tokens (but for
    ``checksums``); a disagreement is a `CorruptDataError` naming the file and both values."""
    data_dir = Path(data_dir)
    manifest_path = str(data_dir / MANIFEST_NAME)
    itemsize = dtype_from_name(manifest["dtype"]).itemsize
    seq_len = int(manifest["seq_len"])
    infos = shard_infos(manifest)
    totals = manifest.get("totals", {})
    for key in ("num_sequences", "num_tokens"):
        listed = sum(getattr(info, key) for info in infos)
        if key in totals and totals[key] != listed:
            raise CorruptDataError(f"{manifest_path!r}: totals.{key}={totals[key]} but its shards add up to "
                                   f"{listed}: {_MIXED}; re-run prepare into a new folder")
    for info in infos:
        if info.num_tokens != info.num_sequences * seq_len:
            raise CorruptDataError(
                f"{manifest_path!r}: shard {info.index} has num_tokens={info.num_tokens}, but num_sequences="
                f"{info.num_sequences} x seq_len={seq_len} = {info.num_sequences * seq_len}: {_MIXED}; re-run "
                f"prepare into a new folder")
        _check_shard_meta(data_dir, manifest, info)
        path = data_dir / info.tokens_file
        expected = info.num_sequences * seq_len * itemsize
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise FileNotFoundError(f"shard {str(path)!r} listed in the manifest is missing: the folder was "
                                    f"copied incompletely; copy it again or re-run prepare") from None
        if size != expected:
            raise CorruptDataError(f"shard {str(path)!r} has {size} bytes, the manifest says {info.num_sequences} "
                                   f"sequences x {seq_len} tokens x {itemsize} B = {expected}: the file is truncated "
                                   f"or from another run; copy it again or re-run prepare")
        index_path = data_dir / info.index_file
        try:
            index_size = index_path.stat().st_size
        except FileNotFoundError:
            raise FileNotFoundError(f"{str(index_path)!r} listed in the manifest is missing: the folder was copied "
                                    f"incompletely; copy it again or re-run prepare") from None
        if index_size != 8 * info.num_documents:
            raise CorruptDataError(f"{str(index_path)!r} has {index_size} bytes, the manifest says "
                                   f"{info.num_documents} documents x 8 B = {8 * info.num_documents}: {_MIXED}; "
                                   f"copy it again or re-run prepare")
        if checksums:
            digest = file_sha256(path)
            if digest != info.tokens_sha256:
                raise CorruptDataError(f"shard {str(path)!r} has sha256 {digest}, the manifest says "
                                       f"{info.tokens_sha256}: the file is corrupt; copy it again or re-run prepare")


def _check_shard_meta(data_dir: Path, manifest: dict, info: ShardInfo) -> None:
    """The shard's own ``.json`` says what the manifest says about it (see `SHARED_KEYS`)."""
    path = data_dir / info.meta_file
    try:
        meta = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(path)!r} listed in the manifest is missing: the folder was copied "
                                f"incompletely; copy it again or re-run prepare") from None
    except ValueError as err:
        raise CorruptDataError(f"{str(path)!r} is not valid JSON ({err}): {_MIXED}; re-run prepare") from None
    expected = {key: manifest.get(key) for key in SHARED_KEYS}
    expected.update(info.to_json())
    for key, value in expected.items():
        if not isinstance(meta, dict) or meta.get(key) != value:
            found = meta.get(key) if isinstance(meta, dict) else meta
            raise CorruptDataError(
                f"{str(path)!r} says {key}={found!r}, the manifest {str(data_dir / MANIFEST_NAME)!r} says "
                f"{key}={value!r}: {_MIXED}; re-run prepare into a new folder (or copy the whole folder again)")


def read_document_starts(data_dir: str | os.PathLike, info: ShardInfo) -> np.ndarray:
    """Offsets (tokens, within the shard) where documents start: the shard's ``.idx`` file."""
    return np.fromfile(Path(data_dir) / info.index_file, dtype="<u8")
