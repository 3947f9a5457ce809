"""Turning one source sample into the bytes of its image member (runs in pool workers).

Everything here is a module-level function or a plain dataclass so that it pickles into
multiprocessing workers; the result depends only on the sample and the options, which is
what makes the shards identical for any number of workers.
"""
from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image

from ..datasets import DataError
from ..transforms import DECODE_ERRORS, decode_reason, fit_square, open_image
from .layout import ENCODINGS

Shape = Tuple[int, int, int]  # (H, W, C)
PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
PIL_CHANNELS = {"L": 1, "RGB": 3}


@dataclass(frozen=True)
class Payload:
    """An already-encoded image member read from an existing shard ('jpeg' read as 'jpg')."""

    ext: str
    data: bytes


@dataclass(frozen=True)
class RawSample:
    """One source sample: pixels (uint8 H x W [x C]), an image file, or a shard payload."""

    data: Union[np.ndarray, Path, Payload]
    label: Optional[int]
    origin: str  # what to name in an error message (a path, 'x.npz[12]', ...)


@dataclass(frozen=True)
class EncodeOptions:
    """Per-sample build options. encoding None = keep a shard payload's own format (png
    for any other source); channels None = keep the source's (image files become RGB)."""

    encoding: Optional[str] = None
    channels: Optional[int] = None
    resolution: Optional[int] = None
    quality: int = 95  # jpg / webp


@dataclass(frozen=True)
class Encoded:
    """The image member of one sample, ready to go into a tar."""

    ext: str
    data: bytes
    label: Optional[int]
    shape: Shape


def encode_sample(sample: RawSample, opts: EncodeOptions) -> Encoded:
    """Encode one sample; DataError names the sample when it cannot be decoded."""
    try:
        if isinstance(sample.data, Payload):
            kept = _keep_payload(sample.data, opts)
            if kept is not None:
                return Encoded(kept[0], sample.data.data, sample.label, kept[1])
        pixels = _transform(_decode(sample.data, opts.channels), opts)
    except DECODE_ERRORS as err:
        # ValueError includes DataError (a bad array inside a payload): name the sample too.
        raise DataError(f"cannot decode '{sample.origin}': {decode_reason(err)}") from None
    ext = opts.encoding or _default_ext(sample.data)
    return Encoded(ext, encode_pixels(pixels, ext, opts.quality), sample.label, pixels.shape)


def encode_pixels(pixels: np.ndarray, ext: str, quality: int = 95) -> bytes:
    """uint8 H x W x C (C = 1 or 3) -> bytes of a png / jpg / webp file or an npy array."""
    buffer = BytesIO()
    if ext == "npy":
        np.save(buffer, np.ascontiguousarray(pixels), allow_pickle=False)
        return buffer.getvalue()
    img = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    # Fixed encoder settings: the same pixels must always give the same bytes.
    kwargs = {"quality": quality} if ext in ("jpg", "webp") else {"compress_level": 6}
    img.save(buffer, format=PIL_FORMATS[ext], **kwargs)
    return buffer.getvalue()


def decode_payload(ext: str, data: bytes, channels: Optional[int] = None) -> np.ndarray:
    """Bytes of an image member -> uint8 H x W x C (npy arrays are returned as stored)."""
    if ext == "npy":
        return _as_hwc(np.load(BytesIO(data), allow_pickle=False), f".{ext} payload")
    return _pil_to_hwc(open_image(BytesIO(data), channels or _pil_default_channels(data)))


# ----------------------------------------------------------------------------- internals
def _default_ext(data: Union[np.ndarray, Path, Payload]) -> str:
    """Without --encoding: a re-encoded shard payload keeps its format, all else is png."""
    if isinstance(data, Payload) and data.ext in ENCODINGS:
        return data.ext
    return "png"


def _keep_payload(payload: Payload, opts: EncodeOptions) -> Optional[Tuple[str, Shape]]:
    """(ext, shape) when the payload can be copied byte for byte, else None (re-encode)."""
    ext = payload.ext
    if ext not in ENCODINGS or opts.encoding not in (None, ext):
        return None
    shape = _payload_shape(ext, payload.data)
    if shape is None or (opts.channels or shape[2]) != shape[2]:
        return None
    if opts.resolution and (shape[0], shape[1]) != (opts.resolution, opts.resolution):
        return None
    return ext, shape


def _payload_shape(ext: str, data: bytes) -> Optional[Shape]:
    """(H, W, C) of a payload (images: from the header alone); None unless uint8 grey/RGB."""
    if ext == "npy":
        array = np.load(BytesIO(data), allow_pickle=False)  # small: one image
        ok = array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] in (1, 3)
        return array.shape if ok else None  # type: ignore[return-value]
    with Image.open(BytesIO(data)) as img:
        # EXIF rotation would change the decoded shape: re-encode such images.
        rotated = img.getexif().get(0x0112, 1) != 1
        if img.mode not in PIL_CHANNELS or rotated:
            return None
        return img.height, img.width, PIL_CHANNELS[img.mode]


def _decode(data: Union[np.ndarray, Path, Payload], channels: Optional[int]) -> np.ndarray:
    """Any sample data -> uint8 H x W x C."""
    if isinstance(data, Payload):
        return decode_payload(data.ext, data.data, channels)
    if isinstance(data, Path):
        # Image files default to RGB, as torchvision's ImageFolder loader does.
        return _pil_to_hwc(open_image(data, channels or 3))
    return _as_hwc(data, "array")


def _transform(pixels: np.ndarray, opts: EncodeOptions) -> np.ndarray:
    """Apply --channels and --resolution (shorter side resize + centre crop, via PIL)."""
    channels = opts.channels or pixels.shape[2]
    if channels == pixels.shape[2] and not opts.resolution:
        return pixels
    img = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    img = img.convert("L" if channels == 1 else "RGB")
    if opts.resolution:
        img = fit_square(img, opts.resolution)
    return _pil_to_hwc(img)


def _pil_to_hwc(img: Image.Image) -> np.ndarray:
    """A mode L / RGB PIL image -> uint8 H x W x C."""
    array = np.asarray(img, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _pil_default_channels(data: bytes) -> int:
    """Keep greyscale payloads grey; everything else (RGBA, palette, ...) becomes RGB."""
    with Image.open(BytesIO(data)) as img:
        return 1 if img.mode in ("L", "1", "I", "I;16") else 3


def _as_hwc(array: np.ndarray, what: str) -> np.ndarray:
    """Check a uint8 H x W or H x W x C (C = 1 or 3) array; return it as H x W x C."""
    if array.dtype != np.uint8:
        raise DataError(f"{what} must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise DataError(f"{what} must be H x W or H x W x C with C in (1, 3), "
                        f"got shape {tuple(array.shape)}")
    return np.ascontiguousarray(array)
