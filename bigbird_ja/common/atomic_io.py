"""Atomic, durable file writes: the one home for them (checkpoints, data shards, manifests, run outputs).

A file is written to a hidden temporary name beside it (``.NAME.tmp-PID``), flushed, fsync'ed and renamed over the
final name with ``os.replace`` (atomic on POSIX), then the folder is fsync'ed, so a reader sees the old file or the
new one, never a part, and a power cut cannot leave the new name pointing at unwritten data. ``durable=False``
skips the fsyncs (the rename stays atomic for a killed process); tests and throwaway outputs use it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator


def _fsync(path: str | os.PathLike) -> None:
    with contextlib.suppress(OSError):  # best effort: some file systems refuse fsync on a read-only descriptor
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries: a rename is only durable once the directory entry is on disk."""
    _fsync(path)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under ``folder``, then every folder (before a folder is renamed into place)."""
    folder = Path(folder)
    entries = list(folder.rglob("*"))
    for path in entries:
        if path.is_file():
            _fsync(path)
    for sub in [folder, *[p for p in entries if p.is_dir()]]:
        _fsync(sub)


def temp_path(path: str | os.PathLike) -> Path:
    """The hidden temporary name ``path`` is written under before its rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, durable: bool = True) -> Iterator[IO[bytes]]:
    """Write ``path`` (binary) through a temporary file; it appears under its name only if the block completes."""
    path = Path(path)
    tmp = temp_path(path)
    f = open(tmp, "wb")
    try:
        yield f
        f.flush()
        if durable:
            os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        f.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    with atomic_open(path, durable) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, durable: bool = True) -> None:
    """UTF-8 text through `atomic_open`: readers see the old file or the new one."""
    atomic_write_bytes(path, text.encode("utf-8"), durable)
