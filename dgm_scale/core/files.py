"""One way to write a file atomically: a temporary file beside it, fsync, then a rename.

A reader (a resumed run, a browser, another rank) sees the old file or the new one, never half
of one, and a crash or an error leaves the old file as it was. Every file the project writes goes
through `atomic_path` (or the helpers built on it); the few that grow by appending (metrics.csv,
eval/metrics.jsonl) through `appending`. A full disk (or quota) during any of them is a one-line
DiskFullError naming the file, with the file as it was before.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Optional

from dgm_scale.core.errors import DiskFullError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (not possible on every platform / file system)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_file(tmp: str | Path, path: str | Path) -> Path:
    """fsync `tmp`, rename it onto `path`, fsync the folder; returns `path`."""
    tmp, path = Path(tmp), Path(path)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def temporary_path(path: str | Path, unique: bool = False) -> Path:
    """The hidden temporary name `path` is written under, in its folder (created if missing).

    By default `.NAME.tmp`: a process killed mid-write leaves at most that one file, which the
    next write replaces (checkpoints can be large). `unique=True` gives a fresh name instead, for
    files several processes may write at once (shared caches)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not unique:
        return path.with_name(f".{path.name}.tmp")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def disk_full_errno(error: Optional[BaseException]) -> Optional[int]:
    """ENOSPC / EDQUOT when a full disk caused `error`: it, or an error it was raised while
    handling (torch.save turns the OSError of its write into a RuntimeError); else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return error.errno
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def disk_full_named(path: str | Path) -> Iterator[None]:
    """A full disk (or quota) inside the block becomes a one-line DiskFullError naming `path`: the
    OSError of a write() names no file, and the user must learn which file system to free."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        code = disk_full_errno(error)
        if code is None:
            raise
        raise DiskFullError(f"disk full while writing '{path}' ({os.strerror(code)}); its previous "
                            "version is kept: free space, then run again") from error


@contextmanager
def atomic_path(path: str | Path, unique: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; when the block succeeds it is
    committed (`commit_file`), when it raises the temporary file is removed (on a full disk: a
    DiskFullError naming `path`)."""
    with disk_full_named(path):
        tmp = temporary_path(path, unique)
        try:
            yield tmp
            commit_file(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


@contextmanager
def appending(path: str | Path) -> Iterator[Path]:
    """A block that appends to `path` (or creates it): when the block fails, `path` is cut back to
    its length before the block (or removed), so a reader never meets a torn last line; on a full
    disk the error is a DiskFullError naming `path`."""
    path = Path(path)
    before = path.stat().st_size if path.is_file() else None
    with disk_full_named(path):
        try:
            yield path
        except BaseException:
            if before is None:
                path.unlink(missing_ok=True)
            else:
                os.truncate(path, before)  # shrinking needs no space
            raise


def append_text(path: str | Path, text: str) -> Path:
    """Append `text` (UTF-8) to `path`, whole or not at all (see appending)."""
    with appending(path), open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb", unique: bool = False, **kwargs: Any) -> Iterator[IO]:
    """`open(path, mode)` that only replaces `path` when the block succeeds (see atomic_path)."""
    with atomic_path(path, unique) as tmp:
        with open(tmp, mode, **kwargs) as handle:
            yield handle


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Text (UTF-8), atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """JSON (indented, sorted keys), atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_png_atomic(image: Any, path: str | Path) -> Path:
    """A PIL image as PNG, atomically."""
    with atomic_open(path, "wb") as handle:
        image.save(handle, format="PNG")
    return Path(path)


def torch_save_atomic(obj: Any, path: str | Path, unique: bool = False) -> Path:
    """`torch.save(obj)`, atomically."""
    import torch

    with atomic_open(path, "wb", unique) as handle:
        torch.save(obj, handle)
    return Path(path)
