"""ZeRO-1/2 partitions written by W processes, re-cut for W' processes at load time (no offline pass).

Layout (DeepSpeed's stage_1_and_2.py, per optimizer param group): the group's parameters are
flattened into one tensor, padded at its END to a multiple of (alignment x W) and cut into W
equal partitions; rank j holds [j S, (j + 1) S) with S = padded length / W. Its checkpoint holds
that slice of the fp32 master weights without the end padding (`single_partition_of_fp32_groups`)
and the base optimizer's state for it (Adam's exp_avg / exp_avg_sq, padded, as the torch state
dict of its one flat parameter per group). The layout inside the flat tensor (per-parameter
alignment padding) does not depend on W; the end padding does, and only the end padding.

So a new rank r of W' (partition length S', from its own freshly built engine) needs the
elements [r S', (r + 1) S') of the concatenation of the old pieces: it reads only the old
partitions that overlap that range (each rank holds about one old partition at a time, never
the whole state) and zero-fills what lies past the data (its new end padding). The result is a
partition in the ordinary (rigid) format for this rank, which the engine's own load_state_dict
takes. Round-robin gradient partitioning reorders parameters by W: refused (one line).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch

FP32_GROUPS = "single_partition_of_fp32_groups"
BASE_STATE = "base_optimizer_state"
GROUP_PADDINGS = "group_paddings"
PARTITION_COUNT = "partition_count"


def _old_length(first: Dict[str, Any], group: int) -> int:
    """S: every old partition's padded length (rank 0's piece plus its padding)."""
    return int(first[FP32_GROUPS][group].numel()) + int(first[GROUP_PADDINGS][group])


def overlapping_ranks(old_length: int, old_world: int, new_length: int, rank: int) -> range:
    """The old ranks whose partitions [j S, (j+1) S) overlap [rank S', (rank+1) S')."""
    start, stop = rank * new_length, (rank + 1) * new_length
    return range(min(start // old_length, old_world), min(-(-stop // old_length), old_world))


def _slice(pieces: Dict[int, torch.Tensor], old_length: int, rank: int, new_length: int) -> torch.Tensor:
    """[rank S', (rank+1) S') of the concatenated old pieces ({old rank: unpadded piece}), zero-filled."""
    out = None
    start = rank * new_length
    for j, piece in sorted(pieces.items()):
        lo, hi = max(start, j * old_length), min(start + new_length, j * old_length + piece.numel())
        if out is None:
            out = torch.zeros(new_length, dtype=piece.dtype)
        if lo < hi:
            out[lo - start:hi - start] = piece[lo - j * old_length:hi - j * old_length]
    return out if out is not None else torch.zeros(new_length)


def _lean(state: Dict[str, Any], group: int) -> Dict[str, torch.Tensor]:
    """A partition's flat per-group tensors without its end padding: fp32 weights and the
    optimizer's partitioned state (tensors as long as the padded partition)."""
    length = int(state[FP32_GROUPS][group].numel())
    padded = length + int(state[GROUP_PADDINGS][group])
    base = state[BASE_STATE]["state"][group]
    lean = {key: value.reshape(-1)[:length] for key, value in base.items()
            if torch.is_tensor(value) and value.dim() > 0 and value.numel() == padded}
    lean[FP32_GROUPS] = state[FP32_GROUPS][group].reshape(-1)
    return lean


def repartition(read: Callable[[int], Dict[str, Any]], old_world: int, rank: int, new_world: int,
                new_lengths: List[int], new_paddings: List[int], name: str) -> Dict[str, Any]:
    """This rank's ZeRO partition for the new world size, in the format its engine loads.

    read(j): old rank j's saved partition; new_lengths / new_paddings: per param group, this
    rank's padded partition length and end padding in the new engine (`name` for errors).
    """
    first = read(0)
    if not isinstance(first.get(BASE_STATE), dict) or "state" not in first[BASE_STATE]:
        raise ValueError(f"{name}: written with zero_optimization.elastic_checkpoint=true, which only "
                         f"resumes on its own world size ({old_world}); re-partitioning needs the default format")
    cache: Dict[int, Dict[str, Any]] = {0: first}
    out = dict(first)
    fp32_groups: List[torch.Tensor] = []
    base = {"state": {}, "param_groups": first[BASE_STATE]["param_groups"]}
    for group, new_length in enumerate(new_lengths):
        old_length = _old_length(first, group)
        ranks = overlapping_ranks(old_length, old_world, new_length, rank)
        for j in ranks:
            if j not in cache:
                cache[j] = read(j)
        leans = {j: _lean(cache[j], group) for j in ranks}
        keys = list(_lean(first, group))
        cut = {key: _slice({j: lean[key] for j, lean in leans.items()}, old_length, rank, new_length) for key in keys}
        fp32_groups.append(cut.pop(FP32_GROUPS))
        # Scalars (Adam's step) are the same on every rank: rank 0's.
        base["state"][group] = {**first[BASE_STATE]["state"][group], **cut}
        for j in list(cache):  # keep at most the partitions the next group may need again
            if j not in ranks and j != 0:
                del cache[j]
    out[FP32_GROUPS], out[BASE_STATE] = fp32_groups, base
    out[GROUP_PADDINGS], out[PARTITION_COUNT] = list(new_paddings), [new_world] * len(new_lengths)
    return out
