"""Small pure image transforms shared by every dataset (PIL + torch only, no torchvision).

Convention: datasets store / load pixels in [0, 1] and hand the model tensors in [-1, 1]
(the range of a tanh generator output).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

PathLike = Union[str, Path]


def to_model_range(x: Tensor) -> Tensor:
    """Map pixels from [0, 1] to the model range [-1, 1] (any shape)."""
    return x * 2.0 - 1.0


def from_model_range(x: Tensor) -> Tensor:
    """Map model outputs from [-1, 1] back to [0, 1], clamped (any shape)."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


def to_8bit(x: Tensor) -> Tensor:
    """Model-range values [-1, 1] -> the nearest of the 256 levels, int64 in [0, 255]."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).long()


def from_8bit(levels: Tensor) -> Tensor:
    """Levels [0, 255] -> model range [-1, 1] (float32): level k is -1 + 2k / 255."""
    return levels.float() / 127.5 - 1.0


def resize_tensor(x: Tensor, size: int) -> Tensor:
    """Bilinearly resize a batch [N, C, H, W] to [N, C, size, size].

    Antialiasing is only switched on when shrinking: it matters for downsampling and would
    just blur when upsampling.
    """
    if x.dim() != 4:
        raise ValueError(f"resize_tensor expects [N, C, H, W], got shape {tuple(x.shape)}")
    height, width = x.shape[-2:]
    if (height, width) == (size, size):
        return x
    shrinking = size < height or size < width
    return F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking
    )


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types libspng decodes to exactly the array PIL gives for `channels` with no
# conversion: 8-bit grey -> 1 channel, 8-bit RGB -> 3. Everything else goes through PIL.
_DIRECT_PNG = {(0, 1), (2, 3)}
# Chunks after which PIL's pixels differ from the raw decode: transparency (tRNS), and EXIF
# (eXIf; ImageMagick's text chunk) which PIL applies as a rotation.
_PIL_ONLY_CHUNKS = (b"tRNS", b"eXIf", b"Raw profile type exif")

try:  # optional (`pip install dgm_scale[fast]`): libspng decodes a small PNG ~5x faster than PIL
    import pyspng
except ImportError:  # pragma: no cover - depends on the environment
    pyspng = None


def _direct_png(data: bytes, channels: int) -> Optional[np.ndarray]:
    """The PNG's pixels as uint8 [H, W] / [H, W, 3] via libspng when that equals PIL's result."""
    if pyspng is None or not data.startswith(PNG_SIGNATURE) or len(data) < 26:
        return None
    bit_depth, colour_type = data[24], data[25]  # from the IHDR chunk, always first
    if bit_depth != 8 or (colour_type, channels) not in _DIRECT_PNG or any(c in data for c in _PIL_ONLY_CHUNKS):
        return None
    try:
        return pyspng.load(data)
    except RuntimeError as err:  # damaged data: the same error kind PIL raises (callers catch ValueError)
        raise ValueError(str(err)) from None


def decode_square(source: Union[PathLike, bytes], channels: int, resolution: int, fast: bool = True) -> np.ndarray:
    """Decode an image (file path or encoded bytes) to uint8 [R, R] (channels=1) or [R, R, 3].

    EXIF rotation applied, shorter side resized to R (PIL bicubic), centre crop. The one decode
    of both the folder dataset and the shard stream. `fast`: 8-bit grey/RGB PNGs without
    transparency or EXIF are decoded by libspng when installed - pixel-identical to PIL's
    (tested), skipping PIL's per-image overhead; all else (and `fast=False`) goes through PIL.
    """
    data = source if isinstance(source, bytes) else None
    if fast and pyspng is not None:
        data = data if data is not None else Path(source).read_bytes()
        array = _direct_png(data, channels)
        if array is not None:
            if array.shape[:2] == (resolution, resolution):
                return array
            return np.asarray(fit_square(Image.fromarray(array), resolution))
    img = open_image(io.BytesIO(data) if data is not None else source, channels)
    return np.asarray(fit_square(img, resolution))


def load_image(path: PathLike, channels: int, resolution: int) -> Tensor:
    """Decode one image file to a float tensor [C, R, R] in [0, 1], C = `channels`.

    The shorter side is resized to `resolution` (PIL bicubic), then the centre
    `resolution` x `resolution` square is cropped, so the aspect ratio is never distorted.
    PIL errors (OSError / ValueError) propagate; the dataset turns them into a DataError.
    """
    array = decode_square(path, channels, resolution)
    x = torch.from_numpy(array.copy()).to(torch.float32).div_(255.0)
    return x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1).contiguous()


def open_image(source: Union[PathLike, BinaryIO], channels: int) -> Image.Image:
    """Decode an image file (path or binary file object) to PIL mode L (1 channel) or RGB."""
    mode = "L" if channels == 1 else "RGB"
    with Image.open(source) as img:
        img.load()  # decode before the file closes
        # Phone photos store their rotation in EXIF; apply it so "up" is up. In place and no
        # same-mode convert: each copy costs about as much as decoding a 32x32 PNG. Only when the
        # file has EXIF (JPEG/WebP/PNG eXIf, or ImageMagick's PNG text chunk): parsing the empty
        # EXIF of every other image cost ~27 us each, a fifth of a 32x32 PNG's whole decode.
        if "exif" in img.info or "Raw profile type exif" in img.info:
            ImageOps.exif_transpose(img, in_place=True)
        return img if img.mode == mode else img.convert(mode)


def fit_square(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` (bicubic), then crop the centre square."""
    return _center_crop(_resize_shorter_side(img, resolution), resolution)


def _resize_shorter_side(img: Image.Image, resolution: int) -> Image.Image:
    """Scale `img` so that min(width, height) == resolution (no-op when it already is)."""
    width, height = img.size
    if min(width, height) == resolution:
        return img
    scale = resolution / min(width, height)
    # max(...) guards against rounding the shorter side below the crop size.
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return img.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Crop the central resolution x resolution square (img is at least that big)."""
    width, height = img.size
    if width == height == resolution:
        return img  # crop() would copy
    left = (width - resolution) // 2
    top = (height - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


_MASK64 = (1 << 64) - 1


def mix64(z: int) -> int:
    """splitmix64's finaliser: a well-mixed 64-bit hash of an integer (cheap, no RNG state)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def keyed_hflip(x: Tensor, epoch_key: int, index: int) -> Tensor:
    """Flip an image [C, H, W] left-right with probability 1/2, decided by (epoch_key, index).

    No RNG state: the same sample in the same epoch flips the same way in any worker, on any
    rank, and after a mid-epoch resume (a global or per-worker RNG restarts at the epoch's
    beginning when a run resumes, so its flips would differ from the uninterrupted run's).
    """
    if mix64(((epoch_key & 0xFFFFFFFF) << 32) | (index & 0xFFFFFFFF)) >> 63:
        return x.flip(-1)
    return x
