"""`inspect_shards(OUT)`: summarise a shard set and check every shard against its manifest.

A shard is bad when it is missing, has another size than recorded (truncated or grown),
another sha256, cannot be read as a tar to the end, or holds another number of samples (or
keys that are not the expected global indices). Counting really reads the tar: a tar cut
exactly between two samples still parses, only the count shows it.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

from .tario import TarError
from .layout import format_key, iter_tar_samples
from .manifest import read_manifest, sha256_file
from .writer import format_bytes, plural


@dataclass
class InspectReport:
    """The manifest, whether shards were verified, and (shard name, problems) per bad shard."""

    out: Path
    manifest: Dict[str, Any]
    verified: bool
    bad: List[Tuple[str, List[str]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    def text(self) -> str:
        """Human-readable summary, then the verification verdict."""
        lines = summary_lines(self.out, self.manifest)
        n = len(self.manifest["shards"])
        if not self.verified:
            lines.append("not verified (--no-verify)")
        elif self.ok:
            lines.append(f"verified: all {n} shards match the manifest "
                         "(size, sha256, readable, sample count)")
        else:
            lines += [f"BAD {name}: {'; '.join(problems)}" for name, problems in self.bad]
            lines.append(f"{len(self.bad)} of {n} shards failed verification")
        return "\n".join(lines)


def inspect_shards(out: Union[str, Path], verify: bool = True) -> InspectReport:
    """Read OUT's manifest (DataError if absent/invalid) and, with `verify`, check each shard."""
    out = Path(out).expanduser()
    manifest = read_manifest(out)
    report = InspectReport(out, manifest, verify)
    if verify:
        offset = 0
        for entry in manifest["shards"]:
            problems = check_shard(out / entry["name"], entry, offset)
            if problems:
                report.bad.append((entry["name"], problems))
            offset += entry["num_samples"]
    return report


def check_shard(path: Path, entry: Dict[str, Any], first_index: int) -> List[str]:
    """Problems of one shard against its manifest entry (empty list = good)."""
    if not path.is_file():
        return ["missing"]
    problems = []
    size = path.stat().st_size
    if size < entry["bytes"]:
        problems.append(f"truncated: {size} of {entry['bytes']} bytes")
    elif size > entry["bytes"]:
        problems.append(f"size {size} bytes, manifest says {entry['bytes']}")
    elif sha256_file(path) != entry["sha256"]:
        problems.append("checksum mismatch (sha256)")
    problems += _check_samples(path, entry["num_samples"], first_index)
    return problems


def _check_samples(path: Path, expected: int, first_index: int) -> List[str]:
    """Read the tar to the end: sample count and keys (global indices from first_index)."""
    count, wrong_key = 0, None
    try:
        for key, _ in iter_tar_samples(path):
            if wrong_key is None and key != format_key(first_index + count):
                wrong_key = f"sample {count} has key '{key}', expected '{format_key(first_index + count)}'"
            count += 1
    except (TarError, tarfile.TarError, EOFError, OSError) as err:
        return [f"unreadable tar after {count} samples ({err})"]
    problems = [] if count == expected else [f"count mismatch: manifest {expected}, tar {count}"]
    return problems + ([wrong_key] if wrong_key else [])


def summary_lines(out: Path, m: Dict[str, Any]) -> List[str]:
    """What a shard set holds, from its manifest alone."""
    counts = [s["num_samples"] for s in m["shards"]]
    size = sum(s["bytes"] for s in m["shards"])
    img, labels = m["image"], m["labels"]
    shape = _range(img.get("min_height"), img.get("max_height")) + " x " + \
        _range(img.get("min_width"), img.get("max_width"))
    classes = "none (unlabelled)"
    if labels["num_classes"]:
        per = labels.get("counts") or [0]
        classes = f"{labels['num_classes']} ({_range(min(per), max(per))} samples per class)"
    return [
        f"shard set '{m['name']}' in {out} ({m['format']}, source {m.get('source', '?')})",
        f"  samples   {m['num_samples']} in {plural(len(counts), 'shard')} "
        f"({_range(min(counts), max(counts))} per shard)",
        f"  encoding  {m['encoding']}",
        f"  images    {shape} pixels, channels {img.get('channels')}",
        f"  classes   {classes}",
        f"  size      {format_bytes(size)} ({format_bytes(size / max(m['num_samples'], 1))} "
        "per sample)",
    ]


def _range(low: Any, high: Any) -> str:
    """'16' when low == high, else '12..40'."""
    return f"{low}" if low == high else f"{low}..{high}"
