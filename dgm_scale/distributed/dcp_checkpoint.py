"""FSDP checkpoints through torch.distributed.checkpoint (DCP): every rank writes its own shards.

The layout mirrors the DeepSpeed one (zero_checkpoint.py):

    checkpoints/last.ckpt                 loops, callbacks, config, data position (rank 0); no
                                          weights: it names its shard folder ({"dcp_shards":
                                          {"dir": "dcp/<token>", "world_size": W}})
    checkpoints/dcp/<token>/__0_0.distcp  rank 0's shards of the weights (EMA included) and of
    checkpoints/dcp/<token>/__1_0.distcp  every optimizer's state (keyed by parameter name)
    checkpoints/dcp/<token>/.metadata     written last, once every rank's file is complete

Atomic as a whole: the folder is new for every save, and the checkpoint that names it is
written (atomically, by rank 0) only after every rank finished its files (dcp_saves.py: at once,
or with trainer.fsdp.async_save while training goes on, committed at the next save). A run
killed at any moment keeps its previous checkpoint and the folder that one names; folders no
checkpoint names are deleted at the next save. DCP reshards on load: each rank reads the slices
its own sharding needs, so a checkpoint of W processes resumes on any number.
`dgm-scale checkpoint to-plain` (`to_plain`) folds the shards into one ordinary checkpoint (full
weights, optimizer states in torch's own format) that `dgm-scale sample` / `export` and other
strategies read; `load_module` folds the weights of a sharded one itself.
"""
from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from dgm_scale.core.files import torch_save_atomic
from dgm_scale.distributed.zero_checkpoint import prune_shards

DCP_SHARDS = "dcp_shards"  # a checkpoint's key: where its shard folder is
FOLDER = "dcp"


def shard_writer(folder: Path):
    """The DCP storage writer of a shard folder (tests put a slow or failing one in its place)."""
    from torch.distributed.checkpoint import FileSystemWriter

    return FileSystemWriter(folder)


def write(checkpoint: Dict[str, Any], directory: Path, folder: str, world_size: int,
          background: bool = False, group: Optional[Any] = None) -> Future:
    """Collective: write this rank's shards of `checkpoint`'s weights and optimizer states into
    `directory/folder`; `checkpoint` keeps only the name of that folder in their place. Returns
    the write's future: done on return, or (`background`) done once the shards, copied to CPU
    memory before this returns, are written by a thread of `dcp.async_save`, whose collectives
    go through `group`."""
    import torch.distributed.checkpoint as dcp

    state: Dict[str, Any] = {"state_dict": checkpoint["state_dict"]}
    if "optimizer_states" in checkpoint:
        state["optimizer_states"] = {str(i): s for i, s in enumerate(checkpoint["optimizer_states"])}
    writer = shard_writer(directory / folder)
    if background:
        future = dcp.async_save(state, storage_writer=writer, process_group=group)
    else:
        future = Future()
        try:
            dcp.save(state, storage_writer=writer)
            future.set_result(None)
        except (Exception, dcp.CheckpointException) as error:  # (a BaseException) DCP raises it on every rank
            future.set_exception(error)
    name_folder(checkpoint, folder, world_size)
    return future


def name_folder(checkpoint: Dict[str, Any], folder: str, world_size: int) -> None:
    """`checkpoint` without its weights and optimizer states: the name of their shard folder instead."""
    info = {"dir": folder, "world_size": world_size}
    checkpoint["state_dict"] = {}
    checkpoint[DCP_SHARDS] = info
    if "optimizer_states" in checkpoint:  # a placeholder no other strategy could take for its own
        checkpoint["optimizer_states"] = [{DCP_SHARDS: info} for _ in checkpoint["optimizer_states"]]


def shard_folder(checkpoint: Dict[str, Any], directory: Optional[Path]) -> Path:
    """The complete shard folder a checkpoint names (a one-line error when it is not there)."""
    info = checkpoint.get(DCP_SHARDS)
    if not isinstance(info, dict) or directory is None:
        raise ValueError("this checkpoint holds no FSDP (DCP) shards: it was written under another strategy; "
                         "resume it with that one, or start a new run from its weights")
    folder = directory / info["dir"]
    if not (folder / ".metadata").is_file():
        raise FileNotFoundError(f"DCP shard folder '{folder}' of the checkpoints in '{directory}' is missing or incomplete")
    return folder


def read_into(state: Dict[str, Any], checkpoint: Dict[str, Any], directory: Optional[Path]) -> None:
    """Collective: fill `state` (this rank's shards, as templates) in place from the checkpoint's
    folder; DCP reads the slices this rank's sharding needs, whatever world size wrote them."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=shard_folder(checkpoint, directory))


def read_full(folder: Path, keys: Optional[set] = None) -> Dict[str, Any]:
    """Everything (or the top-level `keys`) of a shard folder as full, plain tensors, in this
    process alone, without a collective even inside a process group (as torch's own
    `dcp_to_torch_save` reads one)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    full: Dict[str, Any] = {}
    _load_state_dict(full, storage_reader=FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(keys=keys),
                     no_dist=True)
    return full


def indexed_optimizer_state(by_name: Dict[str, Any]) -> Dict[str, Any]:
    """An optimizer state keyed by parameter name (DCP's) in torch's own format: parameters
    numbered in the order of the param groups, as `Optimizer.state_dict()` numbers them."""
    index_of: Dict[str, int] = {}
    groups: List[Dict[str, Any]] = []
    for group in by_name["param_groups"]:
        names = list(group["params"])
        index_of.update({name: len(index_of) + i for i, name in enumerate(names)})
        groups.append({**group, "params": [index_of[name] for name in names]})
    return {"state": {index_of[name]: value for name, value in by_name.get("state", {}).items()},
            "param_groups": groups}


def fold(checkpoint: Dict[str, Any], directory: Path, optimizers: bool = True) -> Dict[str, Any]:
    """`checkpoint` (a sharded one, read from `directory`) with its shards folded in: full
    weights, and (`optimizers`) the optimizer states in torch's format."""
    full = read_full(shard_folder(checkpoint, directory), None if optimizers else {"state_dict"})
    folded = {key: value for key, value in checkpoint.items() if key != DCP_SHARDS}
    folded["state_dict"] = full["state_dict"]
    if optimizers and "optimizer_states" in full:
        by_index = full["optimizer_states"]
        folded["optimizer_states"] = [indexed_optimizer_state(by_index[str(i)]) for i in range(len(by_index))]
    return folded


def is_sharded(checkpoint: Dict[str, Any]) -> bool:
    return isinstance(checkpoint.get(DCP_SHARDS), dict)


def to_plain(sharded: Path, out: Path) -> Path:
    """One ordinary checkpoint file from a sharded FSDP one (see the module docstring)."""
    checkpoint = torch.load(sharded, map_location="cpu", weights_only=True)
    if not is_sharded(checkpoint):
        raise ValueError(f"'{sharded}' is not a sharded FSDP checkpoint")
    return torch_save_atomic(fold(checkpoint, sharded.parent), out)


def prune(directory: Path, keep: List[str] = ()) -> List[Path]:
    """Delete the shard folders in `directory/dcp` no checkpoint there names (`keep`: being written)."""
    return prune_shards(directory, keep, FOLDER, DCP_SHARDS)
