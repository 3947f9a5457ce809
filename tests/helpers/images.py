"""Image files (PNG chunks, bombs) and sample grids."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import torch
from PIL import Image

from dgm_scale.data.transforms import to_8bit



# ----------------------------------------------------------------------------- image files
def encode_image(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    """The bytes of `image` saved as `fmt` (PIL's save options, e.g. exif=..., transparency=...)."""
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def random_rgb(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_file(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (for what PIL does not write, e.g. 16-bit colour); `rows`: the
    scanlines, each after its filter byte."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def bomb_png(side: int) -> bytes:
    """An 8-bit grey side x side PNG of zeros: ~0.1% of the side**2 bytes it decodes to
    (deflated 100 rows at a time, never holding the whole image)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    packer, rows = zlib.compressobj(6), bytes((side + 1) * 100)
    data = b"".join(packer.compress(rows[:(side + 1) * min(100, side - done)]) for done in range(0, side, 100))
    data += packer.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- sample grids
def grid_cells(grid: np.ndarray, num: int, nrow: int, size: int = 8, padding: int = 2) -> np.ndarray:
    """The images [num, size, size] tiled in a grey grid (2 px padding, nrow columns), as
    `dgm-scale sample` and `dgm-scale serve` tile them (at native resolution)."""
    step = size + padding
    return np.stack([grid[padding + (i // nrow) * step:][:size, padding + (i % nrow) * step:][:, :size]
                     for i in range(num)])


def grey_8bit(samples: torch.Tensor) -> np.ndarray:
    """Model-range grey images [N, 1, H, W] -> the uint8 [N, H, W] they are saved and served as."""
    return to_8bit(samples)[:, 0].to(torch.uint8).numpy()
