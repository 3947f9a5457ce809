"""`OUT/manifest.json`: what a shard set holds, written last and atomically by the writer.

Format (all keys always present):

    {"format": "dgm_scale.shards/1",
     "name": "digits", "source": "builtin:digits",
     "num_samples": 1797, "encoding": "png",
     "shards": [{"name": "digits-000000.tar", "num_samples": 1000,
                 "bytes": 1126400, "sha256": "<64 hex>"}, ...],
     "image": {"channels": 1, "min_height": 16, "max_height": 16, "min_width": 16,
               "max_width": 16, "mean_height": 16.0, "mean_width": 16.0},
     "labels": {"num_classes": 10, "names": null, "counts": [178, ...]}}

Samples are numbered in shard order: shard i holds the global indices that follow those of
shards 0..i-1. `names` lists the class names when the source has them (class folders),
else null. An unlabelled set has num_classes 0, names null, counts []. `encoding` is one
of png | jpg | webp | npy (comma-joined only when a re-shard kept mixed payloads);
`channels` is an int (a sorted list only for such a mixed re-shard).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from dgm_scale.core.files import atomic_open

from ..datasets import DataError

FORMAT = "dgm_scale.shards/1"
MANIFEST_NAME = "manifest.json"
TOP_KEYS = ("format", "name", "num_samples", "encoding", "shards", "image", "labels")
SHARD_KEYS = {"name": str, "num_samples": int, "bytes": int, "sha256": str}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- statistics
@dataclass
class ImageStats:
    """Running shape statistics of the written images."""

    count: int = 0
    channels: set = field(default_factory=set)
    heights: List[int] = field(default_factory=lambda: [1 << 62, 0, 0])  # min, max, sum
    widths: List[int] = field(default_factory=lambda: [1 << 62, 0, 0])

    def add(self, shape: Tuple[int, int, int]) -> None:
        """Record one image of shape (H, W, C)."""
        height, width, channels = shape
        self.count += 1
        self.channels.add(int(channels))
        for acc, value in ((self.heights, height), (self.widths, width)):
            acc[0], acc[1], acc[2] = min(acc[0], value), max(acc[1], value), acc[2] + value

    def to_json(self) -> Dict[str, Any]:
        chans = sorted(self.channels)
        n = max(self.count, 1)
        return {
            "channels": chans[0] if len(chans) == 1 else chans,
            "min_height": self.heights[0], "max_height": self.heights[1],
            "min_width": self.widths[0], "max_width": self.widths[1],
            "mean_height": round(self.heights[2] / n, 3),
            "mean_width": round(self.widths[2] / n, 3),
        }


def label_stats(counts: Counter, num_classes: int, names: Optional[Sequence[str]]) -> Dict[str, Any]:
    """The manifest's "labels" entry; num_classes grows to cover every label seen."""
    if not counts:
        return {"num_classes": 0, "names": None, "counts": []}
    num_classes = max(num_classes, max(counts) + 1)
    names = list(names) if names and len(names) == num_classes else None
    return {"num_classes": num_classes, "names": names,
            "counts": [counts.get(i, 0) for i in range(num_classes)]}


# ----------------------------------------------------------------------------- read / write
def manifest_path(path_or_dir: Union[str, Path]) -> Path:
    """OUT/manifest.json for a shard directory; a path to a .json file is used as is."""
    path = Path(path_or_dir).expanduser()
    return path if path.suffix == ".json" else path / MANIFEST_NAME


def write_manifest(out_dir: Path, manifest: Dict[str, Any]) -> Path:
    """Write OUT/manifest.json atomically (core.files.atomic_open)."""
    validate_manifest(manifest, out_dir / MANIFEST_NAME)
    final = out_dir / MANIFEST_NAME
    with atomic_open(final, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
        handle.write("\n")
    return final


def read_manifest(path_or_dir: Union[str, Path]) -> Dict[str, Any]:
    """Load and validate a shard set's manifest (a directory or its manifest.json).

    Raises DataError naming the file when it is missing, not JSON, or malformed.
    """
    path = manifest_path(path_or_dir)
    if not path.is_file():
        raise DataError(f"no shard manifest '{path}' (not a shard directory, or its build "
                        "did not finish)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read shard manifest '{path}': {err}") from None
    validate_manifest(manifest, path)
    return manifest


def validate_manifest(manifest: Any, path: Path) -> None:
    """Check the structure `read_manifest` promises; DataError names the first problem."""
    def bad(problem: str) -> DataError:
        return DataError(f"shard manifest '{path}': {problem}")

    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    missing = [k for k in TOP_KEYS if k not in manifest]
    if missing:
        raise bad(f"missing keys {missing}")
    if manifest["format"] != FORMAT:
        raise bad(f"format '{manifest['format']}' is not '{FORMAT}'")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not shards:
        raise bad("'shards' must be a non-empty list")
    for i, shard in enumerate(shards):
        _check_shard_entry(shard, i, bad)
    total = sum(s["num_samples"] for s in shards)
    if total != manifest["num_samples"]:
        raise bad(f"num_samples {manifest['num_samples']} != sum over shards {total}")
    labels = manifest["labels"]
    if not isinstance(labels, dict) or not isinstance(labels.get("num_classes"), int):
        raise bad("'labels' must hold an int 'num_classes'")


def _check_shard_entry(shard: Any, i: int, bad) -> None:
    """One entry of "shards": typed keys, a plain file name, a 64-hex sha256."""
    if not isinstance(shard, dict):
        raise bad(f"shards[{i}] is not an object")
    for key, kind in SHARD_KEYS.items():
        if not isinstance(shard.get(key), kind) or isinstance(shard.get(key), bool):
            raise bad(f"shards[{i}].{key} must be {kind.__name__}")
    # A name with a path separator could point outside the directory.
    if Path(shard["name"]).name != shard["name"] or shard["name"] in (".", ".."):
        raise bad(f"shards[{i}].name '{shard['name']}' is not a plain file name")
    if shard["num_samples"] < 0 or shard["bytes"] < 0:
        raise bad(f"shards[{i}] has a negative count")
    if not re.fullmatch(r"[0-9a-f]{64}", shard["sha256"]):
        raise bad(f"shards[{i}].sha256 is not 64 lowercase hex digits")
