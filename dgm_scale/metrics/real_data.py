"""The real samples that generated ones are compared with, read from any dataset source.

A source is what `dgm-scale shards build` reads (an image folder, .npy/.npz, builtin:NAME,
shards) or, for the 2-D toys, `builtin:ring8` / `builtin:grid25`. A fixed random subset of
`num` samples (seeded, kept in source order) is split into contiguous per-rank shares, so
gathering the shares in rank order gives the same rows as
one process reading them all. The fingerprint names the data for the feature cache: a shard
set's manifest hash, a folder's file list with sizes and modification times.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dgm_scale.data.datasets import TOY_DATASETS, DataError
from dgm_scale.data.transforms import DECODE_ERRORS, decode_reason, decode_square, fit_square, to_model_range

BUILTIN = "builtin:"


def rank_share(total: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, end) of rank's contiguous share of `total` (the first total % world ranks get one more)."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def data_source_spec(data_cfg) -> str:
    """The training data of a run as a source spec (what `eval.real: auto` means)."""
    if data_cfg.name in ("folder", "shards"):
        if data_cfg.name == "shards" and (data_cfg.mix or "::" in str(data_cfg.path) or
                                          str(data_cfg.path).startswith("pipe:")):
            raise DataError("config key 'eval.real': mixed, multi-part or pipe: shard specs cannot be "
                            "read for evaluation; give one shard directory, .tar or brace pattern")
        return str(data_cfg.path)
    return f"{BUILTIN}{data_cfg.name}"


def source_fingerprint(src: str) -> str:
    """sha256 naming the data behind src (cheap: manifests and file stats, not the pixels)."""
    digest = hashlib.sha256(src.encode())
    path = Path(src).expanduser()
    if src.startswith(BUILTIN) or "{" in src or not path.exists():
        return digest.hexdigest()
    if (path / "manifest.json").is_file():
        digest.update((path / "manifest.json").read_bytes())
        return digest.hexdigest()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{stat.st_size}:"
                      f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _chosen_indices(total: int, num: int, seed: int, exact: bool) -> Tensor:
    """Sorted source indices of the seeded subset of `num` (of at most `num` unless `exact`)."""
    if num > total and exact:
        raise DataError(f"config key 'eval.num_real': {num} real samples asked for, the source has {total}")
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:num].sort().values


def raw_to_image(raw, channels: int, resolution: int) -> np.ndarray:
    """A source's RawSample -> uint8 [R, R] or [R, R, 3] (the training loaders' decode)."""
    from dgm_scale.data.shards.encode import Payload

    data = raw.data
    if isinstance(data, Payload):
        data = np.load(io.BytesIO(data.data)) if data.ext == "npy" else data.data
    if isinstance(data, np.ndarray):
        image = Image.fromarray(data.squeeze(-1) if data.ndim == 3 and data.shape[-1] == 1 else data)
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (resolution, resolution):
            image = fit_square(image, resolution)
        return np.asarray(image)
    return decode_square(data, channels, resolution)


def to_model_space(images: list[np.ndarray]) -> Tensor:
    """uint8 images ([R, R] or [R, R, 3] each) -> float [N, C, R, R] in the models' value range."""
    pixels = torch.from_numpy(np.stack(images)).float().div_(255.0)
    pixels = pixels.unsqueeze(1) if pixels.dim() == 3 else pixels.permute(0, 3, 1, 2)
    return to_model_range(pixels).contiguous()


def _toy_batches(src: str, num: int, seed: int, exact: bool, rank: int, world: int,
                 batch_size: int) -> Iterator[Tensor]:
    from dgm_scale.config.schema import DataConfig
    from dgm_scale.data.datasets import build_toy

    points = build_toy(DataConfig(name=src[len(BUILTIN):], val_fraction=0.0), "train").x
    chosen = _chosen_indices(len(points), num, seed, exact)
    start, end = rank_share(len(chosen), rank, world)
    for lo in range(start, end, batch_size):
        yield points[chosen[lo:min(lo + batch_size, end)]]


def _share(src: str, sample_shape: tuple[int, ...], num: int, seed: int, rank: int, world: int,
           exact: bool) -> Iterator[tuple[np.ndarray, object]]:
    """(uint8 image, RawSample) of this rank's share of the seeded subset of `num` images, in order."""
    from dgm_scale.data.shards.sources import open_source

    if len(sample_shape) != 3:
        raise DataError(f"real data '{src}' holds images; the model's samples have shape {sample_shape}")
    channels, resolution = sample_shape[0], sample_shape[-1]
    source = open_source(src, resolution=resolution, channels=channels)
    total = source.num_samples
    if total is None:  # shards without a manifest: one pass to count (no decoding)
        total = sum(1 for _ in source.samples())
    chosen = _chosen_indices(total, num, seed, exact)
    start, end = rank_share(len(chosen), rank, world)
    wanted = set(chosen[start:end].tolist())
    for index, raw in enumerate(source.samples()):
        if index not in wanted:
            continue
        try:
            yield raw_to_image(raw, channels, resolution), raw
        except DECODE_ERRORS as error:
            raise DataError(f"real data: cannot decode '{raw.origin}': {decode_reason(error)}") from None


def real_batches(src: str, sample_shape: tuple[int, ...], num: int, seed: int = 0, rank: int = 0,
                 world: int = 1, batch_size: int = 256, exact: bool = True) -> Iterator[Tensor]:
    """This rank's share of `num` real samples (all of a smaller source unless `exact`), as
    model-space batches [B, *sample_shape]; DataError names the source or sample at fault."""
    if src.startswith(BUILTIN) and src[len(BUILTIN):] in TOY_DATASETS:
        yield from _toy_batches(src, num, seed, exact, rank, world, batch_size)
        return
    batch: list[np.ndarray] = []
    for image, _ in _share(src, sample_shape, num, seed, rank, world, exact):
        batch.append(image)
        if len(batch) == batch_size:
            yield to_model_space(batch)
            batch = []
    if batch:
        yield to_model_space(batch)


def labelled_real_images(src: str, sample_shape: tuple[int, ...], num: int, seed: int = 0, rank: int = 0,
                         world: int = 1) -> tuple[list[np.ndarray], np.ndarray]:
    """This rank's share of the seeded subset of `num` labelled images of `src` (all of a smaller
    source), chosen and dealt as real_batches does: uint8 images and int64 labels [n]; DataError
    naming the sample when one has no label."""
    images, labels = [], []
    for image, raw in _share(src, sample_shape, num, seed, rank, world, exact=False):
        if raw.label is None:
            raise DataError(f"real data '{src}': sample '{raw.origin}' has no label (class folders, an npz's "
                            "y / labels, shard .cls and builtin datasets have them)")
        images.append(image)
        labels.append(int(raw.label))
    return images, np.array(labels, dtype=np.int64)
