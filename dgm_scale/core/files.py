"""One way to write a file atomically: a temporary file beside it, fsync, then a rename.

A reader (a resumed run, a browser, another rank) sees the old file or the new one, never half
of one, and a crash or an error leaves the old file as it was. Every file the project writes goes
through `atomic_path` (or the helpers built on it).
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


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


@contextmanager
def atomic_path(path: str | Path, unique: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; when the block succeeds it is
    committed (`commit_file`), when it raises the temporary file is removed."""
    tmp = temporary_path(path, unique)
    try:
        yield tmp
        commit_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
