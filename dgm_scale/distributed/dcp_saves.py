"""FSDP checkpoint saves: DCP shard folders written at once or in the background, and the
checkpoint files that name them, written only once every rank's shards are complete.

trainer.fsdp.async_save=false: every rank writes its shards (`dcp.save`), then rank 0 writes the
checkpoint file naming their folder; the save returns when both are done.

trainer.fsdp.async_save=true: `dcp.async_save` copies this rank's shards into CPU memory (all that
training waits for) and writes them from a thread. That thread's collectives (DCP plans the write
together and gathers every rank's result) go through a gloo process group of their own, so they
never meet training's on the default group. The checkpoint file naming the folder is held back
(a snapshot of it, taken at the save) and written by rank 0 when the save is finished: at the
next save (at most one is in flight: a save first finishes the previous one), and at the end of
fit - a signal's stop included - never by a poll in the training loop. DCP writes the folder's
`.metadata` only after gathering every rank's write result, and its future completes after that
on every rank: a finished, error-free save is complete on all ranks. A write that failed on a
rank fails on all (DCP hands its error to every rank; the ranks also agree at the point where it
is finished), which raises a one-line error naming the folder there; the checkpoints before it
are kept. A kill -9 meanwhile leaves the previous checkpoint files and the folders they name;
a folder no checkpoint names (half written, or abandoned after an error) is deleted when the
next save is finished. A save of the same training state as the one in flight (iter_N.ckpt and
last.ckpt of one iteration, a signal's checkpoint) names that folder instead of writing another.
"""
from __future__ import annotations

import copy
import secrets
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Hashable, List, Optional, Tuple

from dgm_scale.core.errors import CheckpointWriteError, DiskFullError, described
from dgm_scale.core.files import atomic_path, disk_full_errno
from dgm_scale.distributed import dcp_checkpoint


@dataclass
class _Save:
    directory: Path  # the checkpoints' folder
    folder: str  # its shard folder, "dcp/<token>"
    state: Hashable  # the training state it holds (ShardSaves.save's `state`)
    future: Future  # this rank's write
    files: List[Tuple[Dict[str, Any], Path]] = field(default_factory=list)  # (rank 0) checkpoints naming it


class ShardSaves:
    """The saves of one FSDP strategy (see the module docstring); `strategy` gives the rank, the
    collectives and `write_checkpoint_file(checkpoint, path)` (rank 0's plain write)."""

    def __init__(self, strategy: Any, background: bool):
        self.strategy, self.background = strategy, background
        self.pending: Optional[_Save] = None
        self.directories: set = set()  # where this run saved: pruned at the end
        self._group: Optional[Any] = None

    def save(self, checkpoint: Dict[str, Any], path: Path, state: Hashable) -> None:
        """Collective: `checkpoint` to `path` (rank 0) and its shards to a new folder beside it;
        `state` identifies the training state (equal: the same weights and optimizer states)."""
        path.parent.mkdir(parents=True, exist_ok=True)  # there at once, as for a file written now
        pending = self.pending
        if pending is not None and (pending.state, pending.directory) == (state, path.parent):
            dcp_checkpoint.name_folder(checkpoint, pending.folder, self.strategy.world_size)
        else:
            self.finish()
            folder = f"{dcp_checkpoint.FOLDER}/{self.strategy.broadcast(secrets.token_hex(8), src=0)}"
            future = dcp_checkpoint.write(checkpoint, path.parent, folder, self.strategy.world_size,
                                          background=self.background, group=self._checkpoint_group())
            pending = self.pending = _Save(path.parent, folder, state, future)
        if self.strategy.is_global_zero:  # a snapshot: callbacks' and EMAs' states change in place
            pending.files.append((copy.deepcopy(checkpoint) if self.background else checkpoint, path))
        if not self.background:
            self.finish()

    def finish(self) -> None:
        """Collective: wait for the save in flight; once every rank's shards are written, rank 0
        writes the checkpoint files naming them. A failed write: a one-line error naming the folder."""
        save, self.pending = self.pending, None
        if save is None:
            return
        error = save.future.exception()  # waits for this rank's write
        if self.strategy.reduce_boolean_decision(error is not None, all=False):
            raise write_failed(save.directory / save.folder, error)
        self._commit(save)

    def abandon(self) -> None:
        """After an error, where the other ranks may not be (no collective): wait for this rank's
        write; rank 0 names its folder only if the write finished on every rank without error."""
        save, self.pending = self.pending, None
        if save is not None and save.future.exception() is None:
            self._commit(save)

    def _commit(self, save: _Save) -> None:
        if not self.strategy.is_global_zero:
            return
        dcp_checkpoint.prune(save.directory, keep=[save.folder])
        for checkpoint, path in save.files:
            with atomic_path(path) as tmp:
                self.strategy.write_checkpoint_file(checkpoint, tmp)
        self.directories.add(save.directory)

    def _checkpoint_group(self) -> Optional[Any]:
        """The background writes' own process group (created at the first, by every rank)."""
        import torch.distributed as dist

        if self.background and self._group is None and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        return self._group

    def close(self, prune: bool = True) -> None:
        """Rank 0 deletes (`prune`) the shard folders no checkpoint names; the writes' group is released."""
        import torch.distributed as dist

        if prune and self.strategy.is_global_zero:
            for directory in self.directories:
                dcp_checkpoint.prune(directory)
        if self._group is not None and dist.is_initialized():
            dist.destroy_process_group(self._group)
        self._group = None


def write_failed(folder: Path, error: Optional[BaseException]) -> Exception:
    """The one-line error of a shard folder not written completely (`error`: this rank's, if any)."""
    failures = getattr(error, "failures", None)  # DCP's CheckpointException: {rank: (error, traceback)}
    if failures:
        rank, (cause, _) = next(iter(failures.items()))
        reason = f"rank {rank}: {described(cause)}"
    else:
        cause, reason = error, described(error) if error is not None else "on another rank"
    message = f"checkpoint shard folder '{folder}' was not written completely ({reason}); the checkpoints before it are kept"
    return DiskFullError(message) if disk_full_errno(cause) else CheckpointWriteError(message)
