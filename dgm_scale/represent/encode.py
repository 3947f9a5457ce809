"""`dgm-scale encode CKPT --data SRC --out FILE.npz`: what a trained model makes of real data.

FILE.npz (plain numpy arrays, no pickles) holds one row per readable sample of SRC, in the
source's order:
- one float32 array [N, D] per feature of the family's `encode_features` (the first is the
  model's representation): the VAE's `mu` and `logvar` (its posterior), a GAN's `features` (the
  discriminator's penultimate layer), the autoregressive model's `hidden` (its top layer's state
  after reading the image), a diffusion model's `latent` (the ODE-inverted noise);
- `labels` int64 [N], when the source has labels (class folders, an npz's `y` / `labels`, a
  shard's `.cls`, builtin datasets), and `class_names` str [K] when it names the classes;
- `keys` str [N], when the samples have names: a folder's file paths (relative to the folder),
  a shard sample's key.
SRC is any source the project reads as real data (an image folder, .npy / .npz, shards,
`builtin:NAME`); images are decoded and resized to the model's resolution and channels as
evaluation reads them (`raw_to_image`).

Under torchrun the processes split the work: the samples are cut into global batches of
`batch_size`, process r encodes batches r, r + W, ..., and rank 0 writes the rows in source
order, so the file equals what one process writes (tested). An image that cannot be decoded is
skipped and reported (`Encoded.skipped`), and so is the rest of a damaged shard (an unreadable
tar, a sample without an image or with a bad `.cls` label); `strict` stops instead with a
DataError naming it.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dgm_scale.core.errors import ConfigError, DataError, first_line
from dgm_scale.metrics.gather import rank_and_world

#: a sample the encoder could not use: (index in the source's order, name, reason)
Skip = tuple[int, str, str]
#: how the reason of a damaged shard's entry starts (its remaining samples are skipped)
DAMAGED_SHARD = "damaged shard, the rest of it is skipped: "


@dataclass
class Encoded:
    """Encoded rows in source order: features name -> float32 [N, D], labels int64 [N] or None,
    keys str [N] or None, pixels float32 [N, C*H*W] in [-1, 1] (only when asked for)."""

    features: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    keys: np.ndarray | None = None
    class_names: list[str] | None = None
    pixels: np.ndarray | None = None
    skipped: list[Skip] = field(default_factory=list)

    def arrays(self) -> dict[str, np.ndarray]:
        """What the .npz holds (see the module docstring)."""
        arrays = dict(self.features)
        optional = {"labels": self.labels, "keys": self.keys,
                    "class_names": None if self.class_names is None else np.array(self.class_names, dtype=str)}
        arrays.update({name: value for name, value in optional.items() if value is not None})
        return arrays


# ----------------------------------------------------------------------------- reading
def _key(raw, src: str, shard: Path | None) -> str | None:
    """A sample's name: a folder file's path relative to SRC, a shard sample's key, else None."""
    if shard is not None:
        return raw.origin[len(str(shard)) + 1:]
    if isinstance(raw.data, Path):
        try:
            return raw.data.relative_to(Path(src).expanduser()).as_posix()
        except ValueError:
            return str(raw.data)
    return None


def read_source(source, src: str, strict: bool) -> Iterator[tuple[object | None, str | None, str | None]]:
    """(RawSample, key, None) per sample in order, or (None, name, reason) where a damaged shard
    ends early (its other shards are still read; with `strict` a DataError instead)."""
    from dgm_scale.data.shards.sources import open_source

    if not source.shard_files:
        for raw in source.samples():
            yield raw, _key(raw, src, None), None
        return
    for shard in source.shard_files:  # one at a time: a damaged shard does not end the others
        try:
            for raw in open_source(str(shard)).samples():
                yield raw, _key(raw, src, shard), None
        except DataError as error:
            if strict:
                raise DataError(f"{error} (--strict)") from None
            yield None, str(shard), f"{DAMAGED_SHARD}{error}"


def decode(raw, channels: int, resolution: int) -> tuple[np.ndarray | None, str | None]:
    """(uint8 image [R, R] or [R, R, 3], None), or (None, reason) when it cannot be decoded."""
    from dgm_scale.data.shards.samples import DECODE_ERRORS
    from dgm_scale.metrics.real_data import raw_to_image

    try:
        return raw_to_image(raw, channels, resolution), None
    except DECODE_ERRORS as error:
        text = first_line(error)
        return None, f"cannot decode: {re.sub(r' <_io.[A-Za-z]+ object at 0x[0-9a-f]+>', '', text)}"  # PIL's buffer


# ----------------------------------------------------------------------------- encoding
@dataclass
class Part:
    """One encoded global batch: source indices [b], features {name: [b, D]}, labels, keys, pixels."""

    indices: list[int]
    features: dict[str, np.ndarray]
    labels: list[int | None]
    keys: list[str | None]
    pixels: np.ndarray | None


def encode_batch(module, images: list[np.ndarray], labels: list[int | None], keep_pixels: bool) -> tuple:
    """uint8 images -> ({name: float32 [b, D]}, pixels float32 [b, C*H*W] or None)."""
    from dgm_scale.metrics.probe_metric import encode_images
    from dgm_scale.metrics.real_data import to_model_space

    x = to_model_space(images)
    y = torch.tensor(labels, dtype=torch.long) if all(label is not None for label in labels) else None
    arrays = {name: value.numpy() for name, value in encode_images(module, x, y).items()}
    return arrays, (x.flatten(1).numpy() if keep_pixels else None)


def encode_rank(module, src: str, batch_size: int, strict: bool, keep_pixels: bool, rank: int, world: int):
    """This rank's Parts (global batches rank, rank + world, ...), skips and source; stops at its
    first unreadable image under `strict` (the caller raises once all ranks have reported)."""
    from dgm_scale.data.shards.sources import open_source

    channels, resolution = module.sample_shape[0], module.sample_shape[-1]
    source = open_source(src, resolution=resolution, channels=channels)
    parts: list[Part] = []
    skipped: list[Skip] = []
    pending: list = []  # (index, image, label, key) of the current global batch

    def flush() -> None:
        if pending:
            indices, images, labels, keys = (list(column) for column in zip(*pending))
            features, pixels = encode_batch(module, images, labels, keep_pixels)
            parts.append(Part(indices, features, labels, keys, pixels))
            pending.clear()

    for index, (raw, key, reason) in enumerate(read_source(source, src, strict)):
        if raw is None:  # a damaged shard: every rank sees it; rank 0 reports it
            skipped += [(index, key, reason)] if rank == 0 else []
            continue
        if index % batch_size == 0:
            flush()
        if (index // batch_size) % world != rank:
            continue
        image, reason = decode(raw, channels, resolution)
        if image is None:
            skipped.append((index, raw.origin, reason))
            if strict:
                break
            continue
        pending.append((index, image, raw.label, key))
    flush()
    return parts, skipped, source


def gather(parts: list[Part], skipped: list[Skip], rank: int, world: int):
    """Every rank's skips on every rank; every rank's parts on rank 0 (None elsewhere)."""
    if world == 1:
        return parts, skipped
    all_skipped: list = [None] * world
    torch.distributed.all_gather_object(all_skipped, skipped)
    all_parts: list | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object(parts, all_parts, dst=0)
    merged = [part for rank_parts in all_parts for part in rank_parts] if rank == 0 else None
    return merged, [skip for rank_skips in all_skipped for skip in rank_skips]


def assemble(parts: list[Part], skipped: list[Skip], class_names, keep_pixels: bool) -> Encoded:
    """Parts in source order -> one Encoded (labels / keys only when every row has one)."""
    parts = sorted(parts, key=lambda part: part.indices[0])
    if not parts:
        raise DataError("no sample of the source could be read")
    features = {name: np.concatenate([part.features[name] for part in parts]).astype(np.float32)
                for name in parts[0].features}
    labels = [label for part in parts for label in part.labels]
    keys = [key for part in parts for key in part.keys]
    return Encoded(features,
                   np.array(labels, dtype=np.int64) if all(v is not None for v in labels) else None,
                   np.array(keys, dtype=str) if all(v is not None for v in keys) else None,
                   list(class_names) if class_names else None,
                   np.concatenate([part.pixels for part in parts]) if keep_pixels else None,
                   sorted(skipped))


def encode_source(module, src: str, batch_size: int = 256, strict: bool = False,
                  keep_pixels: bool = False) -> Encoded | None:
    """Encode every readable sample of `src` with `module` (see the module docstring); every
    process of a torchrun launch calls it. Returns the Encoded rows on rank 0, None elsewhere."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if module.modality != "images":
        raise ConfigError(f"encode reads images; this model's data is {module.modality}")
    rank, world = rank_and_world()
    parts, skipped, source = encode_rank(module, src, batch_size, strict, keep_pixels, rank, world)
    parts, skipped = gather(parts, skipped, rank, world)
    if strict and skipped:
        _, name, reason = min(skipped)
        raise DataError(f"unreadable sample '{name}': {reason} (--strict)")
    return assemble(parts, skipped, source.class_names, keep_pixels) if rank == 0 else None


def npz_bytes(encoded: Encoded) -> bytes:
    """The .npz file's bytes (uncompressed)."""
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **encoded.arrays())
    return buffer.getvalue()


def skipped_line(skipped: list[Skip], limit: int = 10) -> str | None:
    """'skipped 1 unreadable sample: NAME (reason)' (the first `limit` named), None if none."""
    if not skipped:
        return None
    shards = sum(reason.startswith(DAMAGED_SHARD) for _, _, reason in skipped)
    samples = len(skipped) - shards
    counts = ([f"{samples} unreadable sample{'s' if samples > 1 else ''}"] if samples else []) + \
        ([f"the rest of {shards} damaged shard{'s' if shards > 1 else ''}"] if shards else [])
    named = ", ".join(f"{name} ({reason})" for _, name, reason in skipped[:limit])
    more = f", and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return f"skipped {' and '.join(counts)}: {named}{more}"


def model_device(device: str | None = None) -> torch.device:
    """`device`, else this process's GPU (under torchrun: its local one), else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def encode_checkpoint(checkpoint: str | Path, src: str, out: str | Path, batch_size: int = 256,
                      strict: bool = False, device: str | None = None, trust_code: bool = False) -> Encoded | None:
    """Encode `src` with the model of `checkpoint` and write `out` (.npz, atomically, by rank 0).
    Under torchrun every process calls it and they split the work; returns the rows on rank 0."""
    from dgm_scale.core.files import write_bytes_atomic
    from dgm_scale.modules import load_module
    from dgm_scale.score import init_distributed_from_env

    joined = torch.distributed.is_available() and not torch.distributed.is_initialized()
    init_distributed_from_env()
    try:
        module = load_module(checkpoint, trust_code=trust_code).to(model_device(device))
        encoded = encode_source(module, src, batch_size, strict)
        if encoded is not None:
            write_bytes_atomic(out, npz_bytes(encoded))
        if rank_and_world()[1] > 1:
            torch.distributed.barrier()
    finally:  # a group this call joined is left before the process exits (gloo aborted otherwise, seen)
        if joined and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return encoded
