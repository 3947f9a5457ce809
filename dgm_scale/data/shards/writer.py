"""`build_shards(SRC, OUT, options)`: encode a source into tar shards plus a manifest.

Safety: each shard is written to `OUT/.<shard>.tmp`, fsynced, then renamed; the manifest is
written last and atomically, so a directory with a manifest is always a finished set. An OUT
that already holds a manifest (or shards of the same name) is refused unless `overwrite`.
With `overwrite` of a finished set, the new set is built in `OUT/.<name>.staging/` while the
old one stays whole and usable; only after the build succeeded are the new shards renamed into
place (the old manifest removed first, the new one written last) and the old shards that the new
set does not reuse deleted. A failed or interrupted rebuild leaves the old set as it was (it
needs room for both sets while it runs).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import Counter
from contextlib import closing, suppress
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Union

from tqdm import tqdm

from dgm_scale.core.files import commit_file, disk_full_named, temporary_path

from ..datasets import DataError
from .encode import Encoded, EncodeOptions, RawSample, encode_sample
from .layout import (ENCODINGS, add_member, archive_bytes, format_key, is_shard_of,
                     member_bytes, open_writer, sample_members, shard_name)
from .manifest import (FORMAT, MANIFEST_NAME, ImageStats, label_stats, read_manifest,
                       sha256_file, write_manifest)
from .sources import Source, open_source

log = logging.getLogger(__name__)

DEFAULT_SAMPLES_PER_SHARD = 10_000
WINDOW = 512  # samples handed to the pool at once; two windows in flight bound the memory
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class BuildOptions:
    """How to build. A shard closes at `samples_per_shard` samples or before its file would
    exceed `bytes_per_shard` (whichever comes first; a single larger sample gets a shard of
    its own); with neither, 10,000 samples per shard."""

    name: Optional[str] = None  # shard-set name; default: the source's stem
    samples_per_shard: Optional[int] = None
    bytes_per_shard: Optional[int] = None
    encoding: Optional[str] = None  # png | jpg | webp | npy; None: png (re-shard: keep)
    channels: Optional[int] = None  # 1 | 3; None: the source's (image files: RGB)
    resolution: Optional[int] = None  # resize shorter side + centre crop to R x R
    quality: int = 95  # jpg / webp quality
    workers: int = 1  # encoding processes; the output is identical for any value
    overwrite: bool = False
    progress: bool = True  # tqdm bar on stderr (only when stderr is a terminal)

    def encode_options(self) -> EncodeOptions:
        return EncodeOptions(self.encoding, self.channels, self.resolution, self.quality)


@dataclass
class BuildResult:
    out: Path
    manifest: Dict[str, Any]
    seconds: float

    def summary(self) -> str:
        m = self.manifest
        size = sum(s["bytes"] for s in m["shards"])
        return (f"wrote {m['num_samples']} samples in {plural(len(m['shards']), 'shard')} "
                f"({format_bytes(size)}, {m['encoding']}) to {self.out} in {self.seconds:.1f} s\n"
                f"  manifest: {self.out / MANIFEST_NAME}")


def build_shards(src: str, out: Union[str, Path], options: BuildOptions = BuildOptions()) -> BuildResult:
    """Read SRC, write OUT/<name>-000000.tar ... and OUT/manifest.json; DataError on failure
    (then no manifest is written)."""
    start = time.perf_counter()
    _check_options(options)
    source = open_source(str(src), options.resolution, options.channels)
    name = _check_name(options.name or source.name)
    out = Path(out).expanduser()
    stale = _prepare_out(out, name, options.overwrite, source.shard_files)
    # Replacing a finished set: build beside it, so that a failed build leaves it untouched.
    replacing = (out / MANIFEST_NAME).exists()
    stage = out / f".{name}.staging" if replacing else out
    if replacing:
        shutil.rmtree(stage, ignore_errors=True)  # left by an interrupted rebuild
        stage.mkdir()
    sink = ShardSink(stage, name, options.samples_per_shard, options.bytes_per_shard)
    try:
        manifest = _write_all(source, name, options, sink)
    except BaseException as err:
        sink.abort()
        if replacing:
            shutil.rmtree(stage, ignore_errors=True)
            note = f"build stopped; the shard set in '{out}' is unchanged"
        else:
            note = (f"build stopped, no manifest written; '{out}' holds {len(sink.entries)} "
                    "finished shard(s) of an incomplete set")
        if isinstance(err, (DataError, OSError)):
            raise DataError(f"{err} -- {note}") from err
        log.error(note)
        raise
    if replacing:
        _move_into_place(stage, out, [entry["name"] for entry in manifest["shards"]])
    write_manifest(out, manifest)  # last: its presence means "finished"
    _remove_stale(out, stale, {s["name"] for s in manifest["shards"]})
    if replacing:
        stage.rmdir()
    return BuildResult(out, manifest, time.perf_counter() - start)


def _move_into_place(stage: Path, out: Path, names: Sequence[str]) -> None:
    """Rename the staged shards into OUT (same file system: no copies). The old manifest goes
    first: from then on OUT no longer claims a finished set until the new manifest is written."""
    (out / MANIFEST_NAME).unlink()
    for name in names:
        os.replace(stage / name, out / name)


def _write_all(source: Source, name: str, options: BuildOptions, sink: "ShardSink") -> Dict[str, Any]:
    """Stream every sample through the encoders into the sink; return the manifest."""
    stats, counts, exts = ImageStats(), Counter(), set()
    show = options.progress and sys.stderr.isatty()
    encoded = encode_stream(source.samples(), options.encode_options(), options.workers)
    # closing(): on any error the pool is shut down now, not whenever the generator is freed.
    with closing(encoded), tqdm(total=source.num_samples, unit="img", desc=name,
                                disable=not show) as bar:
        for index, sample in enumerate(encoded):
            sink.add(format_key(index), sample)
            stats.add(sample.shape)
            exts.add(sample.ext)
            if sample.label is not None:
                counts[sample.label] += 1
            bar.update()
    entries = sink.finish()
    total = sum(e["num_samples"] for e in entries)
    if total == 0:
        raise DataError(f"SRC '{source.description}': holds no samples")
    if source.num_samples is not None and total != source.num_samples:
        raise DataError(f"SRC '{source.description}': read {total} samples, its manifest "
                        f"says {source.num_samples}")
    return {"format": FORMAT, "name": name, "source": source.description, "num_samples": total,
            "encoding": ",".join(sorted(exts)), "shards": entries, "image": stats.to_json(),
            "labels": label_stats(counts, source.num_classes, source.class_names)}


def encode_stream(samples: Iterable[RawSample], opts: EncodeOptions, workers: int) -> Iterator[Encoded]:
    """Encoded samples in source order, by `workers` processes (1 = in this process)."""
    work = partial(encode_sample, opts=opts)
    if workers <= 1:
        yield from map(work, samples)
        return
    # imap keeps the order. Two windows in flight: the pool never idles at a window
    # boundary, and a huge source is never queued whole in memory.
    with multiprocessing.Pool(workers) as pool:
        previous: Optional[Iterator[Encoded]] = None
        for window in _windows(iter(samples), WINDOW):
            current = pool.imap(work, window, chunksize=max(1, WINDOW // (4 * workers)))
            if previous is not None:
                yield from previous
            previous = current
        if previous is not None:
            yield from previous


def _windows(items: Iterator[Any], size: int) -> Iterator[List[Any]]:
    """Consecutive lists of up to `size` items."""
    while window := list(islice(items, size)):
        yield window


# ----------------------------------------------------------------------------- shard files
class ShardSink:
    """Appends samples to the current shard, rolling over at the count / byte limit."""

    def __init__(self, out: Path, name: str, max_samples: Optional[int], max_bytes: Optional[int]):
        self.out, self.name = out, name
        self.max_samples = max_samples or (None if max_bytes else DEFAULT_SAMPLES_PER_SHARD)
        self.max_bytes = max_bytes
        self.entries: List[Dict[str, Any]] = []  # finished shards, manifest entries
        self._file: Optional[BinaryIO] = None
        self._tar = None
        self._count = self._members = 0

    @property
    def _final(self) -> Path:
        return self.out / shard_name(self.name, len(self.entries))

    def add(self, key: str, sample: Encoded) -> None:
        """Write one sample (image member, then label member)."""
        members = sample_members(key, sample.ext, sample.data, sample.label)
        size = sum(member_bytes(len(data)) for _, data in members)
        if self._tar is not None and self._full(size):
            self._close_shard()
        with disk_full_named(self._final):
            if self._tar is None:
                self._file = open(temporary_path(self._final), "wb")
                self._tar = open_writer(self._file)
                self._count = self._members = 0
            for member, data in members:
                add_member(self._tar, member, data)
        self._count += 1
        self._members += size

    def _full(self, next_size: int) -> bool:
        """Would the next sample break a limit of the current (non-empty) shard?"""
        if self.max_samples and self._count >= self.max_samples:
            return True
        return bool(self.max_bytes) and archive_bytes(self._members + next_size) > self.max_bytes

    def _close_shard(self) -> None:
        """Finish the tar, fsync, rename into place, and record its manifest entry."""
        with disk_full_named(self._final):
            self._tar.close()
            self._file.close()
            final = commit_file(temporary_path(self._final), self._final)
        self._tar = self._file = None
        self.entries.append({"name": final.name, "num_samples": self._count,
                             "bytes": final.stat().st_size, "sha256": sha256_file(final)})

    def finish(self) -> List[Dict[str, Any]]:
        """Close the last shard; the manifest entries of all shards."""
        if self._tar is not None:
            self._close_shard()
        return self.entries

    def abort(self) -> None:
        """Drop the shard being written (finished shards stay)."""
        if self._file is not None:
            with suppress(OSError):  # flushing the dropped file's buffer fails again on a full disk
                self._file.close()
            temporary_path(self._final).unlink(missing_ok=True)
            self._tar = self._file = None


# ----------------------------------------------------------------------------- checks
def _check_options(o: BuildOptions) -> None:
    """Ranges of every option, named by its command-line flag."""
    spp, bps = o.samples_per_shard, o.bytes_per_shard
    checks = [
        ("--samples-per-shard", spp, spp is None or spp >= 1, ">= 1"),
        ("--bytes-per-shard", bps, bps is None or bps >= 1, "> 0"),
        ("--encoding", o.encoding, o.encoding in (None,) + ENCODINGS, f"one of {ENCODINGS}"),
        ("--channels", o.channels, o.channels in (None, 1, 3), "1 or 3"),
        ("--resolution", o.resolution, o.resolution is None or o.resolution >= 1, ">= 1"),
        ("--quality", o.quality, 1 <= o.quality <= 100, "in 1..100"),
        ("--workers", o.workers, o.workers >= 1, ">= 1"),
    ]
    for flag, value, ok, rule in checks:
        if not ok:
            raise DataError(f"{flag} must be {rule}, got {value!r}")


def _check_name(name: str) -> str:
    """A set name is used in file names: letters, digits, '.', '_', '-'; no leading dot."""
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name):
        raise DataError(f"--name '{name}': use letters, digits, '.', '_' and '-' only")
    return name


def _prepare_out(out: Path, name: str, overwrite: bool, inputs: Sequence[Path]) -> Set[Path]:
    """Create OUT or refuse to touch it; return the old shard files that overwrite replaces."""
    if out.exists() and not out.is_dir():
        raise DataError(f"OUT '{out}' exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if any(p.resolve().parent == out.resolve() for p in inputs):
        raise DataError(f"OUT '{out}' holds the SRC shards: re-shard into another directory")
    manifest = out / MANIFEST_NAME
    old = {p for p in out.iterdir() if is_shard_of(name, p.name)}
    if manifest.exists():
        if not overwrite:
            raise DataError(f"OUT '{out}' already holds a shard set ({MANIFEST_NAME}); "
                            "pass --overwrite to replace it")
        old |= _listed_shards(out)
    elif old and not overwrite:
        raise DataError(f"OUT '{out}' holds {len(old)} '{name}-*.tar' shards but no manifest "
                        "(an unfinished build?); pass --overwrite to replace them")
    return old


def _listed_shards(out: Path) -> Set[Path]:
    """Shard files named by OUT's current manifest (none if it is unreadable)."""
    try:
        return {out / s["name"] for s in read_manifest(out)["shards"]}
    except DataError:
        return set()


def _remove_stale(out: Path, old: Set[Path], new_names: Set[str]) -> None:
    """After a successful overwrite: delete old shards the new set did not rewrite."""
    for path in sorted(old):
        if path.name not in new_names and path.exists():
            path.unlink()
            log.info("removed stale shard %s", path)


# ----------------------------------------------------------------------------- sizes
def parse_size(text: str, flag: str = "--bytes-per-shard") -> int:
    """'64MB' -> 64_000_000, '1GiB' -> 2**30, '4096' -> 4096 (KB/MB/GB/TB powers of 1000,
    KiB/MiB/GiB/TiB powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if unit not in SIZE_UNITS:
        raise DataError(f"{flag}: cannot read size '{text}' (examples: 500000, 64MB, 1GiB)")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def format_bytes(size: float) -> str:
    """1234567 -> '1.2 MB' (powers of 1000, as parse_size reads them)."""
    if size < 1000:
        return f"{size:.0f} B"
    for unit in ("KB", "MB", "GB"):
        size /= 1000
        if size < 1000:
            return f"{size:.1f} {unit}"
    size /= 1000
    return f"{size:.1f} TB"


def plural(n: int, word: str) -> str:
    """plural(1, 'shard') -> '1 shard', plural(4, 'shard') -> '4 shards'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
