"""Turn samples into PNG files with PIL only (no torchvision): image grids and 2-D scatter plots."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor


def tile(pixels: np.ndarray, nrow: Optional[int] = None, padding: int = 2) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] into one uint8 image [H', W', C] (nrow columns, square by
    default; black padding)."""
    num, height, width, channels = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(num))
    ncol = math.ceil(num / nrow)
    canvas = np.zeros((ncol * (height + padding) + padding, nrow * (width + padding) + padding, channels), np.uint8)
    for index in range(num):
        top = padding + (index // nrow) * (height + padding)
        left = padding + (index % nrow) * (width + padding)
        canvas[top:top + height, left:left + width] = pixels[index]
    return canvas


def image_grid(images: Tensor, nrow: Optional[int] = None, padding: int = 2, scale: int = 1) -> Image.Image:
    """Tile images [N, C, H, W] in [-1, 1] into one PIL image (nrow columns, square by default)."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    canvas = tile(pixels.transpose(0, 2, 3, 1), nrow, padding)
    grid = Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas)
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    return grid


def scatter_plot(points: Tensor, size: int = 512, extent: float = 5.0,
                 reference: Optional[Tensor] = None) -> Image.Image:
    """Draw 2-D points [N, 2] in [-extent, extent]^2 (reference points, e.g. mode centres, in red)."""
    canvas = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(canvas)

    def to_pixels(xy: Tensor) -> np.ndarray:
        return ((xy.detach().float().cpu().numpy() + extent) / (2 * extent) * (size - 1))

    for x, y in to_pixels(points):
        draw.point((float(x), size - 1 - float(y)), fill=(20, 60, 160))
    if reference is not None:
        for x, y in to_pixels(reference):
            draw.ellipse((x - 4, size - 1 - y - 4, x + 4, size - 1 - y + 4), outline=(200, 0, 0), width=2)
    return canvas


def samples_to_image(samples: Tensor, reference: Optional[Tensor] = None) -> Image.Image:
    """An image grid for image samples [N, C, H, W]; a scatter plot for 2-D points [N, 2]."""
    if samples.dim() == 4:
        # Small images (digits are 16 px) are enlarged so that a person can read the grid.
        return image_grid(samples, scale=max(1, 64 // samples.shape[-1]))
    return scatter_plot(samples, reference=reference)


def samples_to_text(samples: Tensor) -> list[str]:
    """Text samples [N, L] of byte values -> N strings (invalid UTF-8 replaced)."""
    return [bytes(row.clamp(0, 255).to(torch.uint8).tolist()).decode("utf-8", errors="replace") for row in samples]
