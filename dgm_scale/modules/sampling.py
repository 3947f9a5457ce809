"""Noise keyed to (seed, sample index): sample i of a seeded sequence is the same whichever
batch or rank draws it.

The sequence is cut into blocks of BLOCK samples; block b's noise comes from a CPU generator
seeded with (seed, b), so drawing samples [start, start + num) costs at most two partial blocks
more than the samples themselves, and the result does not depend on the device.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

BLOCK = 1024


def _block_key(seed: int, block: int) -> int:
    return (int(seed) * 1_000_003 + block * 7_919 + 17) % (2**63 - 1)


def keyed_noise(seed: int, start: int, num: int, shape: Sequence[int], uniform: bool = False) -> Tensor:
    """Noise [num, *shape] (float32, CPU) for samples start .. start + num - 1 of sequence `seed`:
    N(0, 1), or U[0, 1) with `uniform`."""
    if num <= 0:
        return torch.zeros(0, *shape)
    draw = torch.rand if uniform else torch.randn
    first, last = start // BLOCK, (start + num - 1) // BLOCK
    blocks = [draw(BLOCK, *shape, generator=torch.Generator().manual_seed(_block_key(seed, block)))
              for block in range(first, last + 1)]
    offset = start - first * BLOCK
    return torch.cat(blocks)[offset:offset + num]
