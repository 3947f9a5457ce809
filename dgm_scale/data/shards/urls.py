"""Where shards come from: URL specs -> `Shard` lists, manifests, and opening one shard.

Spec grammar (`expand_urls`), parts joined by `::`:

* `path/to/x.tar`                    one local file (`file://` prefix allowed)
* `path/to/dir`                      every `*.tar` in it, sorted; with `manifest.json`, the
                                     manifest's shard list (and per-shard sample counts)
* `data-{000000..000127}.tar`        brace ranges (zero padding kept) and `{a,b}` lists
* `pipe:CMD`                         the stdout of a shell command, e.g.
                                     `pipe:aws s3 cp s3://bucket/x-{0000..0099}.tar -`;
                                     a non-zero exit status is a bad shard naming the URL

Everything that can be checked before training is checked in `expand_urls` (`DataError`, one
line naming the path): empty specs, missing files or directories, empty expansions, a pipe
command that fails before producing a tar header (probe of the first pipe URL).
"""
from __future__ import annotations

import itertools
import re
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, List, Optional

from ..datasets import DataError
from .manifest import MANIFEST_NAME, read_manifest
from .tario import BLOCK

PIPE = "pipe:"
READ_BUFFER = 1 << 20  # large buffers: fewer syscalls per small member
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


@dataclass(frozen=True)
class Shard:
    """One tar: its URL (path or `pipe:CMD`) and, when a manifest says so, its sample count."""

    url: str
    num_samples: Optional[int] = None

    @property
    def is_pipe(self) -> bool:
        return self.url.startswith(PIPE)


# ----------------------------------------------------------------------------- braces
def _brace_options(body: str) -> List[str]:
    """'000..003' -> ['000', ..., '003'] (width of the first bound kept); 'a,b' -> ['a', 'b']."""
    match = _RANGE.match(body)
    if not match:
        return body.split(",")
    lo, hi = int(match.group(1)), int(match.group(2))
    width = len(match.group(1)) if match.group(1).startswith("0") else 0
    step = 1 if hi >= lo else -1
    return [f"{i:0{width}d}" for i in range(lo, hi + step, step)]


def expand_braces(pattern: str) -> List[str]:
    """All strings of a brace pattern, in order: 'x-{0..1}{a,b}' -> x-0a, x-0b, x-1a, x-1b."""
    parts = _BRACE.split(pattern)  # literal, body, literal, body, ..., literal
    literals, bodies = parts[0::2], parts[1::2]
    out = []
    for choice in itertools.product(*(_brace_options(b) for b in bodies)):
        out.append("".join(itertools.chain.from_iterable(zip(literals, choice + ("",)))))
    return out


# ----------------------------------------------------------------------------- manifests
def read_manifest_counts(path: Path) -> Dict[str, int]:
    """{shard file name: num_samples} from a `manifest.json` (validated by `read_manifest`)."""
    return {str(shard["name"]): int(shard["num_samples"]) for shard in read_manifest(path)["shards"]}


def _manifest_for(directory: Path, cache: Dict[Path, Dict[str, int]]) -> Dict[str, int]:
    if directory not in cache:
        path = directory / MANIFEST_NAME
        cache[directory] = read_manifest_counts(path) if path.is_file() else {}
    return cache[directory]


def _directory_shards(directory: Path, cache: Dict[Path, Dict[str, int]]) -> List[Shard]:
    counts = _manifest_for(directory, cache)
    if counts:
        missing = [n for n in counts if not (directory / n).is_file()]
        if missing:
            raise DataError(f"shard '{directory / missing[0]}' listed in the manifest is missing")
        return [Shard(str(directory / n), c) for n, c in counts.items()]
    return [Shard(str(p)) for p in sorted(directory.glob("*.tar"))]


def _local_shards(url: str, cache: Dict[Path, Dict[str, int]]) -> List[Shard]:
    path = Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()
    if path.is_dir():
        shards = _directory_shards(path, cache)
        if not shards:
            raise DataError(f"data path '{url}': directory holds no *.tar shards")
        return shards
    if not path.is_file():
        raise DataError(f"shard '{url}' does not exist")
    return [Shard(str(path), _manifest_for(path.parent, cache).get(path.name))]


def expand_urls(spec: str, probe_pipes: bool = True) -> List[Shard]:
    """The shard list of a spec (see module docstring); DataError when it is empty or broken."""
    parts = [p.strip() for p in str(spec or "").split("::") if p.strip()]
    if not parts:
        raise DataError(f"data path '{spec}': no shards given")
    cache: Dict[Path, Dict[str, int]] = {}
    shards: List[Shard] = []
    for part in parts:
        for url in expand_braces(part):
            shards += [Shard(url)] if url.startswith(PIPE) else _local_shards(url, cache)
    pipes = [s for s in shards if s.is_pipe]
    if probe_pipes and pipes:
        probe_pipe(pipes[0].url)
    return shards


# ----------------------------------------------------------------------------- opening
def probe_pipe(url: str, timeout: float = 60.0) -> None:
    """Run a pipe URL until its first tar header arrives; DataError naming it otherwise."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(url[len(PIPE):], shell=True, stdout=subprocess.PIPE, stderr=err)
        try:
            head = proc.stdout.read(BLOCK)
            status = proc.poll() if len(head) == BLOCK else proc.wait(timeout)
        finally:
            _stop(proc)
        if len(head) != BLOCK or status not in (None, 0):
            raise DataError(f"pipe '{url}': produced no tar data ({_exit_reason(status, err)})")


def _exit_reason(status: Optional[int], err_file) -> str:
    err_file.seek(0)
    lines = err_file.read().decode("utf-8", "replace").strip().splitlines()
    tail = f": {lines[-1]}" if lines else ""
    return f"exit status {status}{tail}"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.stdout.close()
    proc.wait()


class PipeError(OSError):
    """A `pipe:` command exited with a non-zero status."""


@contextmanager
def open_shard(url: str) -> Iterator[BinaryIO]:
    """A buffered binary stream of one shard. For `pipe:` URLs the command's exit status is
    checked once the caller has read the archive (PipeError naming the URL); a caller that
    stops early gets the process killed instead."""
    if not url.startswith(PIPE):
        path = url[len("file://"):] if url.startswith("file://") else url
        with open(path, "rb", buffering=READ_BUFFER) as stream:
            yield stream
        return
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(url[len(PIPE):], shell=True, stdout=subprocess.PIPE,
                                stderr=err, bufsize=READ_BUFFER)
        try:
            yield proc.stdout
            while proc.stdout.read(READ_BUFFER):  # drain the record padding: no SIGPIPE
                pass
            if proc.wait() != 0:
                raise PipeError(f"pipe '{url}': {_exit_reason(proc.returncode, err)}")
        finally:
            _stop(proc)
