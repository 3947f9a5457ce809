"""Plain Python environments (only torch, no dgm_scale) and full disks."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path





# ----------------------------------------------------------------------------- plain environments
def _distribution_closure(names: tuple[str, ...]) -> set[str]:
    """The installed distributions `names` need (their requirements, recursively; extras left out)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen, todo = set(), list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for spec in dist.requires or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def plain_site(folder: Path, packages: tuple[str, ...] = ("torch",)) -> Path:
    """A folder holding links to exactly the installed `packages` and what they require, nothing
    else (no dgm_scale, no lightning): a fresh virtual environment with only those installed, for
    `python -S` with PYTHONPATH set to it (see run_plain)."""
    from importlib import metadata

    folder.mkdir(parents=True, exist_ok=True)
    for name in _distribution_closure(packages):
        dist = metadata.distribution(name)
        for top in {Path(str(entry)).parts[0] for entry in dist.files or []}:
            source = Path(dist.locate_file(top))
            if top.endswith(".dist-info") or top in ("..", "__pycache__") or not source.exists():
                continue
            target = folder / top
            if not target.exists():
                target.symlink_to(source)
    return folder


def run_plain(code: str, site: Path, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`code` in an interpreter that sees only the standard library and `site` (-S: no
    site-packages, no .pth files; -c in a folder without dgm_scale)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------- full disks
@contextlib.contextmanager
def small_tmpfs(directory: Path, size: int):
    """A tmpfs of `size` bytes mounted at `directory` for the block (the tests run as root, as in
    CI); skips the test where mounting is not allowed."""
    import pytest

    directory.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        reason = (mount.stderr.strip().splitlines() or ["not root?"])[0]
        pytest.skip(f"cannot mount a tmpfs at {directory} ({reason}): the full-disk tests need one")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def fill_disk(directory: Path, leave: int = 0) -> Path:
    """A file that takes all the free space of `directory`'s file system but `leave` bytes."""
    stats = os.statvfs(directory)
    filler = directory / "filler"
    with open(filler, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, max(stats.f_bavail * stats.f_frsize - leave, 1))
    return filler
