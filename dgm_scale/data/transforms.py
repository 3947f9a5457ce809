"""Small pure image transforms shared by every dataset (PIL + torch only, no torchvision).

Convention: datasets store / load pixels in [0, 1] and hand the model tensors in [-1, 1]
(the range of a tanh generator output).
"""
from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from dgm_scale.core.errors import first_line
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


# What PIL, numpy and libspng (as ValueError) raise on damaged or hostile files: each means
# "this image cannot be used". PIL raises SyntaxError / struct.error / IndexError / EOFError for
# some broken headers and EXIF blocks, zlib.error for broken compressed data, and
# DecompressionBombError (not an OSError) over its pixel limit.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error,
                 Image.DecompressionBombError)
# An image wider than this many times its height (or the reverse) is first cut to that ratio
# around its centre: the crop keeps only the centre square, and resizing the whole strip first
# would take memory in proportion to its length (a 1 x 80,000,000 strip -> 64 x 5e9 pixels).
MAX_ASPECT = 8


def decode_reason(error: BaseException) -> str:
    """Why a decode failed, in one line (PIL names the in-memory file it read: left out)."""
    first = first_line(error)
    return re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", first)


def check_pixels(width: int, height: int) -> None:
    """DecompressionBombError when an image has more pixels than PIL.Image.MAX_IMAGE_PIXELS
    (None: no limit). PIL itself only warns up to twice the limit and then decodes it; here every
    image over the limit is refused before its pixels are allocated, by PIL and libspng alike."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise Image.DecompressionBombError(
            f"{width} x {height} pixels exceed PIL.Image.MAX_IMAGE_PIXELS ({limit}): a decompression bomb?")


def _direct_png(data: bytes, channels: int) -> Optional[np.ndarray]:
    """The PNG's pixels as uint8 [H, W] / [H, W, 3] via libspng when that equals PIL's result."""
    if pyspng is None or not data.startswith(PNG_SIGNATURE) or len(data) < 26:
        return None
    bit_depth, colour_type = data[24], data[25]  # from the IHDR chunk, always first
    if bit_depth != 8 or (colour_type, channels) not in _DIRECT_PNG or any(c in data for c in _PIL_ONLY_CHUNKS):
        return None
    check_pixels(*struct.unpack(">II", data[16:24]))  # libspng has no pixel limit of its own
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
    array = None
    if fast and pyspng is not None:
        data = data if data is not None else Path(source).read_bytes()
        array = _direct_png(data, channels)
    if array is None:
        array = np.asarray(fit_square(open_image(io.BytesIO(data) if data is not None else source, channels), resolution))
    elif array.shape[:2] != (resolution, resolution):
        array = np.asarray(fit_square(Image.fromarray(array), resolution))
    expected = (resolution, resolution) if channels == 1 else (resolution, resolution, 3)
    if array.shape != expected or array.dtype != np.uint8:  # never a batch of the wrong shape
        raise ValueError(f"decoded to {array.dtype} {array.shape}, expected uint8 {expected}")
    return array


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
    """Decode an image file (path or binary file object) to PIL mode L (1 channel) or RGB
    (see `to_channels`); DecompressionBombError above PIL's pixel limit (`check_pixels`)."""
    with warnings.catch_warnings():  # PIL's bomb warning: refused below instead of decoded
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(source)
    with img:
        check_pixels(*img.size)
        img.load()  # decode before the file closes
        # Phone photos store their rotation in EXIF; apply it so "up" is up. In place and no
        # same-mode convert: each copy costs about as much as decoding a 32x32 PNG. Only when the
        # file has EXIF (JPEG/WebP/PNG eXIf, or ImageMagick's PNG text chunk): parsing the empty
        # EXIF of every other image cost ~27 us each, a fifth of a 32x32 PNG's whole decode.
        if "exif" in img.info or "Raw profile type exif" in img.info:
            ImageOps.exif_transpose(img, in_place=True)
        return to_channels(img, channels)


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL image -> mode L (channels=1) or RGB (3), the 8-bit levels kept where they exist:
    16-bit grey scaled to 8 bits (v * 255 / 65535, rounded; PIL's own convert would clip every
    value above 255 to white), transparency composited over black (premultiplied: the colour
    stored under a transparent pixel is arbitrary), palette / CMYK / bilevel by PIL's convert,
    colour to grey by ITU-R 601 luma, grey to colour by repeating it."""
    mode = "L" if channels == 1 else "RGB"
    if img.mode.startswith("I;16") or img.mode == "I":
        levels = np.asarray(img).astype(np.int64).clip(0, 65535)
        img = Image.fromarray(((levels * 255 + 32767) // 65535).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        img = Image.fromarray(((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8))
    return img if img.mode == mode else img.convert(mode)


def fit_square(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` (bicubic), then crop the centre square."""
    width, height = img.size
    if min(width, height) < 1:
        raise ValueError(f"empty image ({width} x {height})")
    if max(width, height) > MAX_ASPECT * min(width, height):
        img = _center_crop_box(img, min(width, MAX_ASPECT * height), min(height, MAX_ASPECT * width))
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
    return _center_crop_box(img, resolution, resolution)


def _center_crop_box(img: Image.Image, width: int, height: int) -> Image.Image:
    """Crop the central width x height box (img is at least that big)."""
    if img.size == (width, height):
        return img  # crop() would copy
    left = (img.width - width) // 2
    top = (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


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
