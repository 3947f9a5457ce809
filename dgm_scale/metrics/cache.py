"""On-disk cache of real-data features, keyed by everything that determines them.

The key is the sha256 of the canonical JSON (sorted keys, no spaces) of `key_parts`: the dataset
manifest hash, the extractor name and weights hash, the sample count, the resolution, ... The file
holds the key parts next to the features and is written atomically (temporary file in the same
folder, then os.replace), so a reader sees the old file or the new one, never half of one; ranks
writing the same entry at once are safe too. An unreadable or mismatched file is recomputed with a
warning and rewritten.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dgm_scale.core.files import torch_save_atomic


def cache_key(key_parts: dict[str, Any]) -> str:
    """sha256 hex digest of the canonical JSON of key_parts (raises TypeError if not JSON-able)."""
    canonical = json.dumps(key_parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def canonical(key_parts: dict[str, Any]) -> dict[str, Any]:
    """key_parts as JSON reads them back (tuples -> lists), the form stored in the cache file."""
    return json.loads(json.dumps(key_parts, sort_keys=True))


def cache_path(key_parts: dict[str, Any], cache_dir: Path) -> Path:
    return Path(cache_dir) / f"real-features-{cache_key(key_parts)}.pt"


def _load(path: Path, key_parts: dict[str, Any]) -> Tensor | None:
    """The cached features [N, D], or None (with a warning) when the file is unusable."""
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(entry, dict) or not isinstance(entry.get("features"), Tensor):
            raise TypeError("not a feature cache entry")
        if entry.get("key_parts") != canonical(key_parts):
            raise ValueError("key parts differ from the requested ones")
        return entry["features"]
    except Exception as error:  # noqa: BLE001 - any unreadable cache means "recompute"
        warnings.warn(f"feature cache {path} is unusable ({error!r}); recomputing", RuntimeWarning)
        return None


def _save_atomic(path: Path, entry: dict[str, Any]) -> None:
    torch_save_atomic(entry, path, unique=True)  # ranks / runs may write the same entry at once


def load_cached(key_parts: dict[str, Any], cache_dir: Path) -> Tensor | None:
    """The cached features [N, D] for key_parts, or None (absent, or unusable: warned)."""
    path = cache_path(key_parts, cache_dir)
    return _load(path, key_parts) if path.is_file() else None


def save_cached(key_parts: dict[str, Any], features: Tensor, cache_dir: Path) -> Path:
    """Store features [N, D] under key_parts (atomically); returns the file."""
    path = cache_path(key_parts, cache_dir)
    _save_atomic(path, {"key_parts": canonical(key_parts), "features": features.detach().cpu()})
    return path


def cached_real_features(key_parts: dict[str, Any], compute: Callable[[], Tensor],
                         cache_dir: Path) -> Tensor:
    """Features [N, D] from the cache entry for key_parts, or from compute() (then cached)."""
    features = load_cached(key_parts, cache_dir)
    if features is None:
        features = compute().detach().cpu()
        save_cached(key_parts, features, cache_dir)
    return features
