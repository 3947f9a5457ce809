"""DeepSpeed ZeRO optimizer state in checkpoints: one file per rank, written in parallel.

ZeRO-1/2 split each optimizer's state (fp32 master weights, Adam moments, loss scaler) over the
ranks. Gathering every partition onto every rank to write one file would hold the whole state
on every rank at checkpoint time - what ZeRO exists to avoid - and serialise it through rank 0.
Instead every rank writes its own partition:

    checkpoints/last.ckpt                     weights, loops, callbacks (rank 0; loads with
                                              weights_only=True, without DeepSpeed: load_module)
    checkpoints/zero/<token>/rank00001-opt0.pt  rank 1's partition of optimizer 0 (D's: opt1)

The checkpoint names its shard folder (`{"zero_shards": {"dir": "zero/<token>", "world_size": W}}`
in its optimizer states). The shards are written first (each atomically), then - once every rank
is done (a barrier) - the checkpoint itself, atomically: a checkpoint that exists is complete, and
a run killed mid-save keeps the previous checkpoint and the shards it names. Shard folders no
checkpoint names any more are deleted at the next save. A resumed run on the same world size reads
only its own rank's files; on another, each rank reads the old files its new partition overlaps
(zero_reshard.py). `dgm-scale checkpoint to-plain` folds the shards into one file (the
older format with every partition embedded), e.g. to copy a checkpoint elsewhere.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch

from dgm_scale.core.errors import first_line
from dgm_scale.core.files import torch_save_atomic

ZERO_SHARDS = "zero_shards"  # a checkpoint's optimizer state: where its per-rank files are
ZERO_PARTITIONS = "zero_partitions"  # the older format: every rank's partition embedded as bytes
SHARD_FOLDER = "zero"


def shard_path(checkpoint_dir: Path, folder: str, rank: int, optimizer_index: int) -> Path:
    return checkpoint_dir / folder / f"rank{rank:05d}-opt{optimizer_index}.pt"


def write_shard(state: Dict[str, Any], checkpoint_dir: Path, folder: str, rank: int, optimizer_index: int) -> Path:
    """This rank's partition of one optimizer (it holds DeepSpeed objects: see load_partition)."""
    return torch_save_atomic(state, shard_path(checkpoint_dir, folder, rank, optimizer_index))


def _deepspeed_classes() -> List[type]:
    """The DeepSpeed classes a ZeRO-1/2 partition pickles besides tensors (its stage, the
    fragment addresses, the loss scaler): plain records, safe to rebuild."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def load_partition(source: Any, name: str) -> Dict[str, Any]:
    """A ZeRO partition from a file or buffer, unpickled with weights_only (only tensors, plain
    containers and the DeepSpeed records above: a crafted file cannot run code); `name` (a path)
    is what a one-line error names."""
    import pickle

    try:
        with torch.serialization.safe_globals(_deepspeed_classes()):
            return torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ValueError(f"ZeRO partition '{name}' does not load: {first_line(error)}") from None


def read_shard(checkpoint_dir: Path, folder: str, rank: int, optimizer_index: int) -> Dict[str, Any]:
    path = shard_path(checkpoint_dir, folder, rank, optimizer_index)
    if not path.is_file():
        raise FileNotFoundError(f"ZeRO shard '{path}' of checkpoint folder '{checkpoint_dir}' is missing")
    return load_partition(path, str(path))


def shards_of(checkpoint: Path) -> Optional[dict]:
    """The {"dir", "world_size"} a checkpoint file names, or None (not sharded / unreadable)."""
    try:
        states = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("optimizer_states", [])
    except Exception:  # noqa: BLE001 - a half-written or foreign file names nothing
        return None
    return next((state[ZERO_SHARDS] for state in states if isinstance(state, dict) and ZERO_SHARDS in state), None)


def prune_shards(checkpoint_dir: Path, keep: Iterable[str] = ()) -> List[Path]:
    """Delete the shard folders in `checkpoint_dir/zero` that no checkpoint file there names
    (`keep`: folders being written now); returns the deleted ones."""
    root = checkpoint_dir / SHARD_FOLDER
    if not root.is_dir():
        return []
    named = {info["dir"] for path in checkpoint_dir.glob("*.ckpt") if (info := shards_of(path)) is not None}
    named |= set(keep)
    doomed = [folder for folder in root.iterdir() if f"{SHARD_FOLDER}/{folder.name}" not in named]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


def to_plain(sharded: Path, out: Path) -> Path:
    """One self-contained file from a sharded checkpoint: the shards embedded (ZERO_PARTITIONS)."""
    checkpoint = torch.load(sharded, map_location="cpu", weights_only=True)
    states = checkpoint.get("optimizer_states", [])
    if not states or not all(isinstance(s, dict) and ZERO_SHARDS in s for s in states):
        raise ValueError(f"'{sharded}' is not a sharded DeepSpeed checkpoint")
    folder, world = states[0][ZERO_SHARDS]["dir"], int(states[0][ZERO_SHARDS]["world_size"])
    plain_states = []
    for index in range(len(states)):
        parts = []
        for rank in range(world):
            buffer = io.BytesIO()
            torch.save(read_shard(sharded.parent, folder, rank, index), buffer)
            parts.append(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
        plain_states.append({ZERO_PARTITIONS: parts})
    checkpoint["optimizer_states"] = plain_states
    return torch_save_atomic(checkpoint, out)
