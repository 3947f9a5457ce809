"""Small pure image transforms shared by every dataset (PIL + torch only, no torchvision).

Convention: datasets store / load pixels in [0, 1] and hand the model tensors in [-1, 1]
(the range of a tanh generator output).
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Union

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


def load_image(path: PathLike, channels: int, resolution: int) -> Tensor:
    """Decode one image file to a float tensor [C, R, R] in [0, 1], C = `channels`.

    The shorter side is resized to `resolution` (PIL bicubic), then the centre
    `resolution` x `resolution` square is cropped, so the aspect ratio is never distorted.
    PIL errors (OSError / ValueError) propagate; the dataset turns them into a DataError.
    """
    img = fit_square(open_image(path, channels), resolution)
    array = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(array.copy()).to(torch.float32).div_(255.0)
    return x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1).contiguous()


def open_image(source: Union[PathLike, BinaryIO], channels: int) -> Image.Image:
    """Decode an image file (path or binary file object) to PIL mode L (1 channel) or RGB."""
    mode = "L" if channels == 1 else "RGB"
    with Image.open(source) as img:
        img.load()  # decode before the file closes
        # Phone photos store their rotation in EXIF; apply it so "up" is up. In place and no
        # same-mode convert: each copy costs about as much as decoding a 32x32 PNG.
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


def random_hflip(x: Tensor) -> Tensor:
    """Flip an image [C, H, W] left-right with probability 0.5.

    Uses torch's global RNG (not Python's `random`) so that Lightning's
    `seed_everything(workers=True)` makes the flips reproducible in every worker.
    """
    if torch.rand(()) < 0.5:
        return x.flip(-1)
    return x
