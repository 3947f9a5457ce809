"""What `shards build SRC` can read: `open_source(SRC)` -> a `Source` of RawSamples in order.

SRC may be
- an image folder (recursive; top-level sub-folders are the classes, as for data.name=folder;
  images directly in the root with no class folders -> unlabelled);
- a `.npy` file: uint8 array (N, H, W) or (N, H, W, C), C in (1, 3); unlabelled;
- a `.npz` file: the images under `x`, `images` or `samples` (same rules), optional integer labels
  (N,) >= 0 under `y` or `labels`;
- `builtin:NAME`, an image dataset of the registry (`builtin:digits`), built with the
  DataConfig defaults unless --resolution / --channels say otherwise;
- existing shards (re-shard): a directory with a manifest.json or *.tar files, one `.tar`,
  or a brace pattern `dir/x-{000000..000009}.tar`. Image members and `.cls` labels are
  kept (other members are dropped); samples are renumbered in reading order.
Anything else, or a source without samples, raises DataError naming SRC.
"""
from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np
import torch

from ..datasets import DATASETS, IMAGE_EXTENSIONS, DataError, scan_image_folder
from ..transforms import from_model_range
from .encode import Payload, RawSample
from .tario import TarError
from .layout import LABEL_EXT, READ_IMAGE_EXTS, SHARD_RE, iter_tar_samples
from dgm_scale.core.errors import first_line
from .manifest import MANIFEST_NAME, read_manifest

NPZ_IMAGE_KEYS = ("x", "images", "samples")  # samples: `dgm-scale sample --format npz`
NPZ_LABEL_KEYS = ("y", "labels")
BUILTIN_PREFIX = "builtin:"


@dataclass
class Source:
    """An opened SRC. `samples()` yields RawSamples in their final order (one pass)."""

    name: str  # default shard-set name (the source's stem)
    description: str  # SRC as given, recorded in the manifest
    samples: Callable[[], Iterator[RawSample]]
    num_samples: Optional[int]  # None when unknown until read (shards without a manifest)
    num_classes: int = 0
    class_names: Optional[List[str]] = None
    shard_files: Sequence[Path] = ()  # re-shard inputs: must not be overwritten


def open_source(src: str, resolution: Optional[int] = None,
                channels: Optional[int] = None) -> Source:
    """Recognise SRC (see the module docstring) and open it; DataError if unusable."""
    if src.startswith(BUILTIN_PREFIX):
        return _builtin_source(src, resolution, channels)
    if "{" in src:
        return _shard_source(src, _expand_pattern(src), None)
    path = Path(src).expanduser()
    if not path.exists():
        raise DataError(f"SRC '{src}': no such file or directory")
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            manifest = read_manifest(path)
            files = [path / s["name"] for s in manifest["shards"]]
            return _shard_source(src, files, manifest)
        tars = sorted(path.glob("*.tar"))
        return _shard_source(src, tars, None) if tars else _folder_source(src, path)
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        return _array_source(src, path)
    if suffix == ".tar":
        return _shard_source(src, [path], None)
    raise DataError(f"SRC '{src}': not an image folder, .npy, .npz, .tar, shard directory "
                    f"or builtin:NAME")


# ----------------------------------------------------------------------------- folders
def _folder_source(src: str, root: Path) -> Source:
    """Image files under root; class folders -> labels (unlabelled without them)."""
    files, classes = scan_image_folder(root)
    if not files:
        raise DataError(f"SRC '{src}': no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
    labelled = bool(classes)

    def samples() -> Iterator[RawSample]:
        for path, label in files:
            yield RawSample(path, label if labelled else None, str(path))

    return Source(root.resolve().name, src, samples, len(files), len(classes), classes or None)


# ----------------------------------------------------------------------------- arrays
def _array_source(src: str, path: Path) -> Source:
    """A .npy image array, or a .npz with images (+ optional labels)."""
    try:
        if path.suffix.lower() == ".npy":
            # mmap: a large array is read one image at a time, not loaded whole.
            images, labels = np.load(path, mmap_mode="r", allow_pickle=False), None
        else:
            with np.load(path, allow_pickle=False) as npz:
                images = npz[_npz_key(src, npz.files, NPZ_IMAGE_KEYS, required=True)]
                label_key = _npz_key(src, npz.files, NPZ_LABEL_KEYS, required=False)
                labels = npz[label_key] if label_key else None
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"SRC '{src}': cannot read: {first_line(err)}") from None
    _check_images(src, images)
    if labels is not None:
        _check_labels(src, labels, len(images))

    def samples() -> Iterator[RawSample]:
        for i in range(len(images)):
            label = int(labels[i]) if labels is not None else None
            yield RawSample(np.array(images[i]), label, f"{src}[{i}]")

    num_classes = int(labels.max()) + 1 if labels is not None else 0
    return Source(path.stem, src, samples, len(images), num_classes)


def _npz_key(src: str, files: List[str], names: Sequence[str], required: bool) -> Optional[str]:
    """The one array name of `names` present in the npz (ambiguity is an error)."""
    found = [n for n in names if n in files]
    if len(found) > 1:
        raise DataError(f"SRC '{src}': holds both {found}; keep one")
    if not found and required:
        raise DataError(f"SRC '{src}': no image array named {' or '.join(names)} "
                        f"(arrays: {', '.join(files) or 'none'})")
    return found[0] if found else None


def _check_images(src: str, images: np.ndarray) -> None:
    """uint8 (N, H, W) or (N, H, W, C) with C in (1, 3) and N >= 1."""
    if images.dtype != np.uint8:
        raise DataError(f"SRC '{src}': images must be uint8 (got {images.dtype}); "
                        "convert with (x * 255).round().astype(np.uint8)")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise DataError(f"SRC '{src}': images must be (N, H, W) or (N, H, W, C) with C in "
                        f"(1, 3), got shape {images.shape}")
    if images.shape[0] == 0:
        raise DataError(f"SRC '{src}': holds no images")


def _check_labels(src: str, labels: np.ndarray, n: int) -> None:
    """Integer (N,) labels >= 0."""
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"SRC '{src}': labels must be integers of shape ({n},), "
                        f"got {labels.dtype} {labels.shape}")
    if labels.min() < 0:
        raise DataError(f"SRC '{src}': labels must be >= 0, found {int(labels.min())}")


# ----------------------------------------------------------------------------- builtin
def _builtin_source(src: str, resolution: Optional[int], channels: Optional[int]) -> Source:
    """An image dataset of the registry, all of it (no val split), pixels as uint8."""
    from dgm_scale.config.schema import DataConfig

    name = src[len(BUILTIN_PREFIX):]
    if name == "folder":
        raise DataError(f"SRC '{src}': give the image folder's path as SRC instead")
    if name not in DATASETS:
        raise DataError(f"SRC '{src}': unknown dataset (choose from "
                        f"{', '.join(BUILTIN_PREFIX + n for n in DATASETS if n != 'folder')})")
    cfg = DataConfig(name=name, val_fraction=0.0, hflip=False)
    cfg.resolution = resolution or cfg.resolution
    cfg.channels = channels or cfg.channels
    dataset = DATASETS[name](cfg, "train")
    if len(dataset) == 0 or dataset[0][0].dim() != 3:
        raise DataError(f"SRC '{src}': not an image dataset")

    def samples() -> Iterator[RawSample]:
        for i in range(len(dataset)):
            x, label = dataset[i]
            pixels = (from_model_range(x) * 255).round().to(torch.uint8)
            yield RawSample(pixels.permute(1, 2, 0).numpy(), _label(dataset, label), f"{src}[{i}]")

    return Source(name, src, samples, len(dataset), int(dataset.num_classes))


def _label(dataset, label) -> Optional[int]:
    """The item's label, or None for an unlabelled dataset (num_classes 0)."""
    return int(label) if dataset.num_classes > 0 else None


# ----------------------------------------------------------------------------- shards
def _expand_pattern(src: str) -> List[Path]:
    """Brace-expand a shard pattern; every file must exist."""
    from braceexpand import braceexpand

    paths = [Path(p).expanduser() for p in braceexpand(src)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"SRC '{src}': no shard file '{missing[0]}'"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return paths


def _shard_source(src: str, files: List[Path], manifest: Optional[dict]) -> Source:
    """Existing shards, read in the given order; a manifest supplies count and class names."""
    if not files:
        raise DataError(f"SRC '{src}': no shard files")
    if manifest:
        name, labels = manifest["name"], manifest["labels"]
        num_samples, num_classes, names = manifest["num_samples"], labels["num_classes"], labels.get("names")
    else:
        name = _set_name(files[0])
        num_samples, num_classes, names = None, 0, None

    def samples() -> Iterator[RawSample]:
        for path in files:
            yield from _read_shard(path)

    return Source(name, src, samples, num_samples, num_classes, names, tuple(files))


def _set_name(path: Path) -> str:
    """'x-000003.tar' -> 'x'; any other file name -> its stem."""
    match = re.fullmatch(r"(.+)" + SHARD_RE, path.name)
    return match.group(1) if match else path.stem


def _read_shard(path: Path) -> Iterator[RawSample]:
    """RawSamples of one tar; DataError names the shard (and key) when it is damaged."""
    try:
        for key, fields in iter_tar_samples(path):
            yield _shard_sample(path, key, fields)
    except (TarError, tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"cannot read shard '{path}': {err}") from None


def _shard_sample(path: Path, key: str, fields: dict) -> RawSample:
    """One grouped tar sample -> RawSample (first image member found, optional .cls)."""
    origin = f"{path}:{key}"
    ext = next((e for e in READ_IMAGE_EXTS if e in fields), None)
    if ext is None:
        raise DataError(f"shard sample '{origin}' has no image member "
                        f"({', '.join(READ_IMAGE_EXTS)}); members: {sorted(fields)}")
    label = None
    if LABEL_EXT in fields:
        text = fields[LABEL_EXT].decode("ascii", "replace").strip()
        if not text.isdigit():
            raise DataError(f"shard sample '{origin}': .cls '{text[:20]}' is not a label >= 0")
        label = int(text)
    payload = Payload("jpg" if ext == "jpeg" else ext, fields[ext])
    return RawSample(payload, label, origin)
