"""Sample dumps: `dgm-scale sample CKPT --num N --out-dir DIR [--format png|npz]`.

Every family's samples, for other tools: one file per sample (`DIR/000000.png`; text:
`DIR/000000.txt`) or one `DIR/samples.npz` with `samples` (uint8 [N, H, W, C] images, uint8
[N, L] text bytes, float32 [N, 2] points) and, for conditional models, `labels` [N]. The work is
cut into global batches of `--batch-size` samples and under torchrun each process takes every
W-th batch: a batch holds the same samples whatever the number of processes, and sample i depends
only on (seed, i), so the files are the same as one process writes (tested byte for byte).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dgm_scale.core.errors import ConfigError
from dgm_scale.core.files import write_bytes_atomic
from dgm_scale.data.transforms import to_8bit
from dgm_scale.metrics.gather import rank_and_world

FORMATS = ("png", "npz")


def as_array(samples: torch.Tensor, modality: str) -> np.ndarray:
    """Samples in the model's range -> what the files hold (uint8 images HWC / text bytes, float points)."""
    if modality == "images":
        return to_8bit(samples).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if modality == "text":
        return samples.clamp(0, 255).to(torch.uint8).cpu().numpy()
    return samples.float().cpu().numpy()


def png_bytes(array: np.ndarray) -> bytes:
    """One uint8 image [H, W, C] (C = 1 or 3) as PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def dump_samples(module, num: int, seed: int, out_dir: Path, fmt: str = "png", batch_size: int = 256,
                 labels: Optional[torch.Tensor] = None, progress: bool = True, **options) -> Path:
    """Write `num` samples of `module` to `out_dir` (see the module docstring); every process of
    a torchrun launch calls it. Returns the directory (png) or the .npz file."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format '{fmt}' is not one of {', '.join(FORMATS)}")
    if fmt == "png" and module.modality == "points":
        raise ConfigError("--format png is for images and text; 2-D points are written with --format npz")
    rank, world = rank_and_world()
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = list(range(0, num, batch_size))[rank::world]
    parts, part_labels = [], []
    for lo in tqdm(batches, desc="sample", unit="batch", disable=not progress or rank != 0):
        hi = min(num, lo + batch_size)
        batch_labels = labels[lo:hi] if labels is not None else module.default_labels(hi - lo, start=lo)
        array = as_array(module.sample_batch(hi - lo, seed, lo, batch_labels, **options), module.modality)
        if fmt == "png":
            suffix = "txt" if module.modality == "text" else "png"
            for offset, row in enumerate(array):
                data = row.tobytes() if suffix == "txt" else png_bytes(row)  # text: the sampled bytes as they are
                write_bytes_atomic(out_dir / f"{lo + offset:06d}.{suffix}", data)
        else:
            parts.append((lo, array))
            part_labels.append(None if batch_labels is None else batch_labels.cpu().numpy())
    if fmt == "png":
        _barrier(world)
        return out_dir
    return _write_npz(out_dir, parts, part_labels, rank, world)


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def npz_bytes(samples: np.ndarray, labels: Optional[np.ndarray] = None) -> bytes:
    """The .npz file's bytes: `samples`, and `labels` (int64) for conditional models."""
    arrays = {"samples": samples}
    if labels is not None:
        arrays["labels"] = np.asarray(labels).astype(np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _write_npz(out_dir: Path, parts, part_labels, rank: int, world: int) -> Path:
    """Each rank's batches reach rank 0 (gathered as objects: the arrays are what is written
    anyway), which writes the file in sample order, atomically."""
    mine = [(lo, array, labels) for (lo, array), labels in zip(parts, part_labels)]
    gathered = [None] * world if rank == 0 else None
    if world > 1:
        torch.distributed.gather_object(mine, gathered, dst=0)
    else:
        gathered = [mine]
    path = out_dir / "samples.npz"
    if rank == 0:
        ordered = sorted((item for rank_items in gathered for item in rank_items), key=lambda item: item[0])
        labels = None if not ordered or ordered[0][2] is None else np.concatenate([lab for _, _, lab in ordered])
        write_bytes_atomic(path, npz_bytes(np.concatenate([array for _, array, _ in ordered]), labels))
    _barrier(world)
    return path
