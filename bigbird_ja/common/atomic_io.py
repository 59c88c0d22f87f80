"""Atomic, durable file writes: the one home for them (checkpoints, data shards, manifests, run outputs).

A file is written to a hidden temporary name beside it (``.NAME.tmp-PID``), flushed, fsync'ed and renamed over the
final name with ``os.replace`` (atomic on POSIX), then the folder is fsync'ed, so a reader sees the old file or the
new one, never a part, and a power cut cannot leave the new name pointing at unwritten data. ``durable=False``
skips the fsyncs (the rename stays atomic for a killed process); tests and throwaway outputs use it. An error about
the path (a missing or read-only folder, a folder where the file should be) names the caller's path and the fix,
not the temporary name.
"""

from __future__ import annotations

import contextlib
import errno
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


def _about_target(err: OSError, path: Path) -> OSError:
    """``err``, raised on the temporary file, as an error about ``path`` (the file the caller named) that says what
    to do; the same class (a read-only file system: PermissionError) and errno, so callers that look at either
    still can. Errors that are not about the path (a full disk) are returned as they are."""
    folder = str(path.parent)
    problems = {
        errno.ENOENT: (FileNotFoundError, f"its folder {folder!r} does not exist (create it first, or write "
                                          f"somewhere else)"),
        errno.ENOTDIR: (NotADirectoryError, f"a part of {folder!r} is a file, not a folder (write somewhere else)"),
        errno.EACCES: (PermissionError, f"no permission to write in the folder {folder!r} (write somewhere else, or "
                                        f"change its permissions)"),
        errno.EROFS: (PermissionError, f"the folder {folder!r} is on a read-only file system (write somewhere "
                                       f"else)"),
        errno.EISDIR: (IsADirectoryError, "that is a folder (give a file name, e.g. one inside it)"),
    }
    problems[errno.EPERM] = problems[errno.EACCES]
    if err.errno not in problems:
        return err
    cls, what = problems[err.errno]
    about = cls(f"cannot write {str(path)!r}: {what}")
    about.errno = err.errno
    return about


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, durable: bool = True) -> Iterator[IO[bytes]]:
    """Write ``path`` (binary) through a temporary file; it appears under its name only if the block completes.
    Errors about the path name ``path``, never the temporary file."""
    path = Path(path)
    if path.name in ("", ".", ".."):  # "", ".", "/", "..": a folder
        raise _about_target(IsADirectoryError(errno.EISDIR, "Is a directory"), path)
    tmp = temp_path(path)
    try:
        f = open(tmp, "wb")
    except OSError as err:
        raise _about_target(err, path) from None
    try:
        yield f
        f.flush()
        if durable:
            os.fsync(f.fileno())
        f.close()
        try:
            os.replace(tmp, path)
        except OSError as err:
            raise _about_target(err, path) from None
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
