"""Exact, one-shot gathering of per-rank feature rows, for uneven shares (and the two other
collectives evaluations use: this process's rank, rank 0's value on every rank).

Every rank calls `all_gather_features` once, whatever its row count (zero included), so no rank
waits on a collective another rank skipped: first the row counts are all-gathered, then the rows,
padded to the largest share, in a single all_gather; padding is trimmed afterwards. The result is
rank 0's rows, then rank 1's, ..., identical on every rank and bit-exact (no reduction happens).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_object(value: Any) -> Any:
    """rank 0's value on every rank (any picklable object)."""
    if rank_and_world()[1] == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_features(local: Tensor) -> Tensor:
    """local [n_rank, ...] on each rank -> [sum of n_rank, ...] in rank order (identity without a group).

    Trailing dimensions and dtype must agree across ranks. The tensors stay on `local.device`
    (a CUDA device under NCCL, the CPU under gloo).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    world = dist.get_world_size()
    count = torch.tensor([local.shape[0]], dtype=torch.long, device=local.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[:local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([rows[:size] for rows, size in zip(gathered, sizes)])
