"""Samples inside shards: grouping tar members by key, reading a shard with fault handling,
decoding a sample, and assembling decoded samples into a batch.

Layout (webdataset's convention, so img2dataset and plain `tar` shards read as they are): a
member `dir/000123.png` belongs to sample key `dir/000123` with extension `png` (the key ends at
the first dot of the base name); consecutive members with one key form a sample. The image is
the first of `jpg jpeg png webp npy` present, the label comes from `cls` (ASCII int), else from
an integer "label" / "cls" / "class" field of `json`, else 0. Other members are skipped unread.
"""
from __future__ import annotations

import io
import json
import logging
from functools import lru_cache
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..datasets import DataError
from ..transforms import DECODE_ERRORS, decode_reason, decode_square, fit_square, to_channels, to_model_range
from .urls import Shard, open_shard
from .tario import TarError, TarReader

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "npy")
LABEL_EXTS = ("cls", "json")
WANTED_EXTS = frozenset(IMAGE_EXTS + LABEL_EXTS)
JSON_LABEL_FIELDS = ("label", "cls", "class")
FAULT_KINDS = ("bad_shard", "bad_image", "missing_image", "bad_label")
LOG_FIRST = 10  # faults of one kind logged per worker and epoch; the rest are only counted

log = logging.getLogger("dgm_scale.data.shards")

Members = Dict[str, bytes]
# An item: (key, members or None when not loaded, shard URL). None = skipped on resume or lost
# to a damaged shard (counted where it happened).
Item = Tuple[str, Optional[Members], str]


class SampleOrderError(TarError):
    """A key reappears after other keys: the shard does not keep each sample's files together
    (e.g. written by `tar` without `--sort=name`), so samples would be torn apart."""


class SampleFault(Exception):
    """A sample that cannot be used; `kind` is one of FAULT_KINDS."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


class FaultCounter:
    """Counts skipped data by kind; logs the first few; raises DataError when strict."""

    def __init__(self, strict: bool, counts: Optional[Dict[str, int]] = None):
        self.strict = strict
        self.counts = {kind: 0 for kind in FAULT_KINDS}
        self.counts.update(counts or {})
        self.muted = False  # while replaying already-delivered samples on resume

    def add(self, kind: str, shard: str, key: Optional[str], detail: str) -> None:
        where = f"shard '{shard}'" + (f" sample '{key}'" if key else "")
        if self.strict:
            raise DataError(f"{where}: {kind.replace('_', ' ')}: {detail} (data.strict=true)")
        if self.muted:
            return
        self.counts[kind] += 1
        if self.counts[kind] <= LOG_FIRST:
            log.warning("skipped %s: %s: %s", kind.replace("_", " "), where, detail)


# ----------------------------------------------------------------------------- grouping
def split_name(name: str) -> Optional[Tuple[str, str]]:
    """'dir/000012.png' -> ('dir/000012', 'png'); None for names without an extension or
    hidden files (macOS '._x' companions)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None
    return name[:dot], name[dot + 1:].lower()


def read_samples(reader: TarReader,
                 keep: Callable[[int], bool]) -> Iterator[Tuple[str, Optional[Members]]]:
    """(key, members) per sample in archive order; members None (data skipped unread) where
    `keep(index within the shard)` is False. A sample is emitted once the next key starts or
    the archive ends, so after a cut the sample in progress (perhaps incomplete) is dropped."""
    key: Optional[str] = None
    members: Optional[Members] = None
    index, seen = -1, set()  # keys of this shard only: memory bounded by the shard size
    while (member := reader.next_member()) is not None:
        parts = split_name(member[0])
        if parts is None:
            continue
        if parts[0] != key:
            if key is not None:
                yield key, members
            if parts[0] in seen:
                raise SampleOrderError(
                    f"the files of sample '{parts[0]}' are not adjacent in the tar (write it "
                    "with `tar --sort=name` or from a sorted file list)")
            seen.add(parts[0])
            key, index = parts[0], index + 1
            members = {} if keep(index) else None
        if members is not None and parts[1] in WANTED_EXTS:
            members[parts[1]] = reader.read_data()
    if key is not None:
        yield key, members


def count_samples(url: str) -> int:
    """Samples in a shard, reading headers only (seeks past the data of local files)."""
    with open_shard(url) as stream:
        return sum(1 for _ in read_samples(TarReader(stream, url), lambda i: False))


def _keep_all(index: int) -> bool:
    return True


def shard_items(shard: Shard, faults: FaultCounter,
                keep: Callable[[int], bool] = _keep_all) -> Iterator[Item]:
    """Items of one shard. A damaged shard (open / read / pipe failure, or a sample count that
    differs from the manifest's) is one `bad_shard` fault; its readable samples are kept. With a
    manifest count the shard always yields exactly that many items (missing ones as None), so
    the item stream has the same shape whether a shard is damaged, read or skipped on resume."""
    expected = shard.num_samples
    produced = 0
    try:
        with open_shard(shard.url) as stream:
            for key, members in read_samples(TarReader(stream, shard.url), keep):
                if expected is not None and produced == expected:
                    raise TarError(f"more samples than the manifest's {expected}")
                produced += 1
                yield key, members, shard.url
    except (TarError, OSError) as err:
        faults.add("bad_shard", shard.url, None, str(err))
    else:
        if expected is not None and produced != expected:
            faults.add("bad_shard", shard.url, None,
                       f"{produced} samples, the manifest says {expected} (truncated?)")
    for _ in range(produced, expected or 0):
        yield "", None, shard.url


# ----------------------------------------------------------------------------- decoding
@lru_cache(maxsize=64)
def _npy_header(header: bytes) -> Tuple[Tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a .npy header (magic included); cached because
    numpy parses it with `ast.literal_eval`, ~100 us, several times a 32x32 image's read."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


def load_npy(data: bytes) -> np.ndarray:
    """A .npy payload -> array (read-only view of `data`); ValueError when malformed."""
    if data[:6] != b"\x93NUMPY" or len(data) < 12:
        raise ValueError("not a .npy payload")
    start = 10 if data[6] == 1 else 12
    end = start + int.from_bytes(data[8:start], "little")
    shape, fortran, dtype = _npy_header(data[:end])
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    array = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=end)
    return array.reshape(shape, order="F" if fortran else "C")


def _decode_npy(data: bytes, channels: int, resolution: int) -> np.ndarray:
    """uint8 array [H, W] or [H, W, C] (C in 1-4: grey, grey + alpha, RGB, RGBA) -> uint8
    [R, R(, 3)] like an image file (the same channel conversion: `transforms.to_channels`)."""
    array = load_npy(data)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and not 1 <= array.shape[2] <= 4):
        raise ValueError(f"npy must be uint8 [H, W(, C)] with C in 1-4, got {array.dtype} {array.shape}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    wanted = (resolution, resolution) if channels == 1 else (resolution, resolution, 3)
    if array.shape == wanted:  # already what the PIL path would return (all steps no-ops)
        return array
    img = to_channels(Image.fromarray(array), channels)
    return np.asarray(fit_square(img, resolution))


def decode_image(members: Members, channels: int, resolution: int) -> np.ndarray:
    """The sample's image as uint8 [R, R] (channels=1) or [R, R, 3]; SampleFault if missing
    or undecodable. Same decode as the folder dataset: EXIF rotation, shorter side resized to
    R (bicubic), centre crop (`transforms.decode_square`)."""
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        raise SampleFault("missing_image", f"no image member ({', '.join(IMAGE_EXTS)})")
    data = members[ext]
    try:
        if ext == "npy":
            return _decode_npy(data, channels, resolution)
        return decode_square(data, channels, resolution)
    except DECODE_ERRORS as err:
        raise SampleFault("bad_image", f"cannot decode .{ext}: {decode_reason(err)}") from None


def decode_label(members: Members) -> int:
    """Integer class label: `cls`, else an int field of `json`, else 0 (unlabelled)."""
    try:
        if "cls" in members:
            return int(members["cls"].decode("ascii").strip())
        if "json" in members:
            meta = json.loads(members["json"])
            for name in JSON_LABEL_FIELDS:
                if isinstance(meta, dict) and isinstance(meta.get(name), int):
                    return int(meta[name])
    except (ValueError, UnicodeDecodeError) as err:
        raise SampleFault("bad_label", f"unreadable label: {err}") from None
    return 0


# uint8 -> model range, computed with the shared convention (bit-identical to the per-sample
# to_model_range(x / 255) of the folder dataset).
_TO_MODEL_RANGE = to_model_range(torch.arange(256, dtype=torch.float32) / 255.0).numpy()


def make_batch(images: Sequence[np.ndarray], labels: Sequence[int],
               flip_seed: Optional[int]) -> Tuple[Tensor, Tensor]:
    """uint8 images [R, R(, C)] -> (x [B, C, R, R] float32 in [-1, 1], labels [B] int64).

    One table lookup per batch (layout change, conversion and range map in a single pass)
    instead of per-sample tensor ops and a collate, which cost as much as decoding a small
    PNG. With `flip_seed`, each image is mirrored left-right with probability 1/2 from a
    generator seeded with it (reproducible).
    """
    stacked = np.stack(images)  # [B, R, R] or [B, R, R, C], uint8
    if stacked.ndim == 3:
        stacked = stacked[..., None]
    x = torch.from_numpy(np.take(_TO_MODEL_RANGE, stacked.transpose(0, 3, 1, 2)))
    if flip_seed is not None:
        flip = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(flip_seed)) < 0.5
        x[flip] = x[flip].flip(-1)
    return x, torch.tensor(list(labels), dtype=torch.int64)


def decode_into(item: Item, channels: int, resolution: int, faults: FaultCounter,
                images: List[np.ndarray], labels: List[int], keys: List[str]) -> bool:
    """Decode one loaded item and append it to the batch lists (True), or count its fault (False)."""
    key, members, shard = item
    try:
        image = decode_image(members, channels, resolution)
        label = decode_label(members)
    except SampleFault as fault:
        faults.add(fault.kind, shard, key, str(fault))
        return False
    images.append(image)
    labels.append(label)
    keys.append(key)
    return True
