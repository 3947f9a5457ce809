"""Dataset registry: `DATASETS[name](cfg, split)` builds a map-style dataset of (x, label).

Every item is `(x, label)`: x float32 in [-1, 1], shape (C, R, R) for images or (2,) for the
2-D toy mixtures; label an int64 scalar tensor (0 when the data has no labels). A dataset of
files that may be unreadable (the image folder) adds a third element, `replaced` (int64 0 / 1:
see ImageFolderDataset), which the training loop counts. Each dataset exposes `num_classes`
(0 = unlabelled). Adding a dataset = one builder function + one line in `DATASETS`; the data
module only ever calls `build_dataset`.
"""
from __future__ import annotations

import logging
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dgm_scale.core.errors import DataError

from .transforms import DECODE_ERRORS, decode_reason, keyed_hflip, load_image, resize_tensor, to_model_range

TOY_DATASETS = ("ring8", "grid25")
# Streamed from tar shards by the data module (data/shards/), not built by this registry.
STREAM_DATASETS = ("shards",)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
SPLITS = ("train", "val")
# The train/val split must not move when the run seed changes, or "val" would leak into train.
SPLIT_SEED = 1234
TOY_SEEDS = {"train": 0, "val": 1}
# Unreadable image files: how many files an item may try (its own, then stand-ins) before the
# folder is declared unreadable, and how many skips each process logs (the rest are counted).
MAX_TRIES = 64
LOG_FIRST = 10

Item = Tuple[Tensor, ...]  # (x, label) or (x, label, replaced)
log = logging.getLogger("dgm_scale.data")


# ----------------------------------------------------------------------------- datasets
def item_key(key) -> Tuple[int, int]:
    """(index, epoch key) from what a loader asks for: an index, or (index, epoch key) from a
    ResumableDistributedSampler over a dataset with `keyed_items` (random flips keyed to the
    run seed and epoch; a plain index flips as in epoch key 0)."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)


class InMemoryDataset(Dataset):
    """Pre-computed samples x [N, ...] in [-1, 1] with int64 labels [N]."""

    def __init__(self, x: Tensor, labels: Tensor, num_classes: int, hflip: bool = False):
        self.x, self.labels, self.num_classes = x, labels, num_classes
        self.hflip = hflip and x.dim() == 4  # flipping only makes sense for images
        self.keyed_items = self.hflip  # the sampler then hands over (index, epoch key): see item_key

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, key) -> Item:
        index, epoch_key = item_key(key)
        x = self.x[index]
        return (keyed_hflip(x, epoch_key, index) if self.hflip else x), self.labels[index]


class ImageFolderDataset(Dataset):
    """Image files decoded lazily: item = ([C, R, R] in [-1, 1], label, replaced).

    `samples` is the list of (path, label); `classes` the sorted class-folder names
    (empty when the images sit directly in the root, all labelled 0).

    An unreadable file (empty, truncated, not an image, over PIL's pixel limit, ...) is skipped:
    its item is the first readable file of a fixed sequence of stand-ins (`stand_ins`), with that
    file's label, and `replaced` = 1 so that the training loop counts the skip
    (data/skipped_bad_image). Batches keep their size and the epoch its length, so the rank
    split and a mid-epoch resume are untouched; the stand-in is seen twice in that epoch.
    `strict`: a one-line DataError naming the file instead.
    """

    def __init__(
        self,
        samples: Sequence[Tuple[Path, int]],
        classes: Sequence[str],
        channels: int,
        resolution: int,
        hflip: bool = False,
        strict: bool = False,
    ):
        self.samples, self.classes = list(samples), list(classes)
        self.channels, self.resolution, self.hflip = channels, resolution, hflip
        self.strict = strict
        self.keyed_items = hflip  # the sampler then hands over (index, epoch key): see item_key
        self.num_classes = len(self.classes)
        self.stride = golden_stride(len(self.samples))
        self._unreadable: set = set()  # indices found unreadable by this process (not decoded again)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> Item:
        index, epoch_key = item_key(key)
        x, label, replaced = self._first_readable(index)
        if self.hflip:
            x = keyed_hflip(x, epoch_key, index)
        return to_model_range(x), torch.tensor(label, dtype=torch.int64), torch.tensor(int(replaced))

    def stand_ins(self, index: int) -> List[int]:
        """The files tried for item `index`: itself, then steps of ~0.618 n (coprime with n) away,
        so a run of bad files (a broken class folder, sorted together) is left at once."""
        tries = min(len(self.samples), MAX_TRIES)
        return [(index + k * self.stride) % len(self.samples) for k in range(tries)]

    def _first_readable(self, index: int) -> Tuple[Tensor, int, bool]:
        """(pixels [C, R, R] in [0, 1], label, whether item `index`'s own file was unreadable)."""
        for candidate in self.stand_ins(index):
            if candidate in self._unreadable:
                continue
            path, label = self.samples[candidate]
            try:
                return load_image(path, self.channels, self.resolution), label, candidate != index
            except DECODE_ERRORS as err:
                self._skip(candidate, err)
        raise DataError(f"cannot decode image '{self.samples[index][0]}' nor any of the {len(self.stand_ins(index)) - 1} "
                        "images tried in its place: does data.path hold images?")

    def _skip(self, index: int, err: Exception) -> None:
        """Remember an unreadable file; in strict mode stop with a DataError naming it."""
        path, reason = self.samples[index][0], decode_reason(err)
        if self.strict:
            raise DataError(f"cannot decode image '{path}': {reason} (data.strict=true)") from None
        self._unreadable.add(index)
        if len(self._unreadable) <= LOG_FIRST:
            log.warning("skipped unreadable image '%s': %s", path, reason)


def golden_stride(n: int) -> int:
    """The integer nearest n / golden ratio that is coprime with n (so k * stride mod n visits
    every index before repeating); 1 for n <= 2."""
    stride = max(1, round(n * 0.6180339887))
    while math.gcd(stride, n) != 1:
        stride += 1
    return stride


class KeptSubset(Dataset):
    """The items `indices` of a dataset, as a dataset (its labels, classes and keyed items kept)."""

    def __init__(self, dataset: Dataset, indices: Tensor):
        self.dataset, self.indices = dataset, indices.tolist()
        self.num_classes = getattr(dataset, "num_classes", 0)
        self.keyed_items = getattr(dataset, "keyed_items", False)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key) -> Item:
        index, epoch_key = item_key(key)
        inner = self.indices[index]
        return self.dataset[(inner, epoch_key) if self.keyed_items else inner]


def kept_subset(dataset: Dataset, fraction: float) -> Dataset:
    """`data.subset`: a fixed fraction of a training split (a seed-independent choice, so every
    run of a study trains on the same images); the whole dataset for 1."""
    if fraction >= 1.0:
        return dataset
    keep = max(1, round(len(dataset) * fraction))
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SPLIT_SEED + 1))[:keep]
    return KeptSubset(dataset, chosen.sort().values)


# ----------------------------------------------------------------------------- helpers
def fixed_split(n: int, val_fraction: float, split: str) -> Tensor:
    """Sorted indices of `split` under a seed-independent permutation of range(n).

    val gets round(n * val_fraction) items (0 -> empty), train the rest.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = round(n * val_fraction)
    chosen = perm[:n_val] if split == "val" else perm[n_val:]
    return chosen.sort().values


def toy_centers(name: str) -> Tensor:
    """Mixture means [K, 2]: ring8 = 8 points on a radius-2 circle, grid25 = 5x5 grid."""
    if name == "ring8":
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        return (2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)).float()
    if name == "grid25":
        coords = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0])
        xs, ys = torch.meshgrid(coords, coords, indexing="ij")
        return torch.stack([xs.flatten(), ys.flatten()], dim=1)
    raise DataError(f"config key 'data.name': '{name}' is not a toy dataset {TOY_DATASETS}")


def list_images(root: Path) -> List[Path]:
    """Image files under root (recursive, case-insensitive extension), sorted."""
    suffixes = {"." + ext for ext in IMAGE_EXTENSIONS}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def scan_image_folder(root: Path) -> Tuple[List[Tuple[Path, int]], List[str]]:
    """(samples, classes) for an image folder; class = top-level sub-folder holding images.

    With class folders present, loose images in the root are ignored (they have no class),
    as torchvision's ImageFolder does.
    """
    files = list_images(root)
    classes = sorted({p.relative_to(root).parts[0] for p in files if p.parent != root})
    if not classes:
        return [(p, 0) for p in files], []
    index = {name: i for i, name in enumerate(classes)}
    samples = [(p, index[p.relative_to(root).parts[0]]) for p in files if p.parent != root]
    return samples, classes


# ----------------------------------------------------------------------------- builders
@lru_cache(maxsize=4)
def _digits_tensors(resolution: int, channels: int) -> Tuple[Tensor, Tensor]:
    """All 1,797 sklearn digits as ([N, C, R, R] in [-1, 1], int64 labels [N]); cached."""
    from sklearn.datasets import load_digits  # local: sklearn import costs ~1 s

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    # Clamp: interpolation must not push pixels outside [0, 1] before the range map.
    x = resize_tensor(x, resolution).clamp(0.0, 1.0)
    if channels == 3:
        x = x.repeat(1, 3, 1, 1)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    return to_model_range(x).contiguous(), labels


def build_digits(cfg: Any, split: str) -> Dataset:
    """scikit-learn's offline 8x8 digits, resized to cfg.resolution (10 classes)."""
    x, labels = _digits_tensors(int(cfg.resolution), int(cfg.channels))
    idx = fixed_split(x.shape[0], float(cfg.val_fraction), split)
    return InMemoryDataset(x[idx], labels[idx], num_classes=10, hflip=bool(cfg.hflip))


def build_toy(cfg: Any, split: str) -> Dataset:
    """2-D Gaussian mixture: centers[k] + toy_std * N(0, I), k uniform; label = k.

    Deterministic: train uses generator seed 0 (toy_samples points), val seed 1
    (max(1, round(toy_samples * val_fraction)) points).
    """
    centers = toy_centers(cfg.name)
    n = int(cfg.toy_samples)
    if split == "val":
        n = max(1, round(n * float(cfg.val_fraction)))
    gen = torch.Generator().manual_seed(TOY_SEEDS[split])
    k = torch.randint(centers.shape[0], (n,), generator=gen)
    noise = torch.randn(n, 2, generator=gen)
    x = centers[k] + float(cfg.toy_std) * noise
    return InMemoryDataset(x, k.to(torch.int64), num_classes=centers.shape[0])


def build_folder(cfg: Any, split: str) -> Dataset:
    """Images under cfg.path (recursive); top-level sub-folders are classes."""
    if not cfg.path:
        raise DataError("config key 'data.path': must be set when data.name=folder")
    root = Path(str(cfg.path)).expanduser()
    if not root.is_dir():
        raise DataError(f"config key 'data.path': directory '{cfg.path}' does not exist")
    samples, classes = scan_image_folder(root)
    if not samples:
        exts = ", ".join(IMAGE_EXTENSIONS)
        raise DataError(f"config key 'data.path': no images ({exts}) under '{cfg.path}'")
    idx = fixed_split(len(samples), float(cfg.val_fraction), split)
    chosen = [samples[i] for i in idx.tolist()]
    return ImageFolderDataset(chosen, classes, int(cfg.channels), int(cfg.resolution), hflip=bool(cfg.hflip),
                              strict=bool(cfg.strict))


def build_text(cfg: Any, split: str) -> Dataset:
    """Byte windows of a text corpus (see text.py)."""
    from .text import build_text as build

    return build(cfg, split)


DATASETS: Dict[str, Callable[[Any, str], Dataset]] = {
    "digits": build_digits,
    "ring8": build_toy,
    "grid25": build_toy,
    "folder": build_folder,
    "text": build_text,
}


def _validate(cfg: Any, split: str) -> None:
    """Value ranges are checked once, in `dgm_scale.config.validate`; here only the lookup."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    if cfg.name not in DATASETS:
        raise DataError(f"config key 'data.name': unknown dataset '{cfg.name}' "
                        f"(choose from {', '.join(DATASETS)})")


def build_dataset(cfg: Any, split: str) -> Dataset:
    """Build the `split` ("train" | "val") dataset described by a DataConfig."""
    _validate(cfg, split)
    return DATASETS[cfg.name](cfg, split)
