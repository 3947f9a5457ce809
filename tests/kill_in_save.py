"""Run `dgm-scale` and SIGKILL it half-way through writing its Nth checkpoint (env DGM_TEST_KILL_AT_SAVE).

A deterministic "kill during a checkpoint write" for tests/test_kill_resume.py: the Nth save
writes the first half of its bytes to the (temporary) target, then the process kills itself.
With DGM_TEST_KILL_IN_SHARDS=N instead (trainer.strategy=fsdp, tests/test_fsdp.py), rank 1 is
killed half-way through writing its DCP shard file of the Nth save, before any rank finished.
With trainer.fsdp.async_save=true, DGM_TEST_KILL_IN_ASYNC_SHARDS=N has rank 1's background
writer of the Nth shard folder write half its file, wait until training has gone on to the next
iteration (noted as `trained_while_writing` in the checkpoints folder) and then kill the process;
DGM_TEST_FAIL_IN_SHARDS=N has it raise an OSError instead.
"""
import io
import os
import signal
import sys
import time

import lightning as L
import torch

from dgm_scale.cli import main
from dgm_scale.core.checkpoints import DirectCheckpointIO

KILL_AT = int(os.environ.get("DGM_TEST_KILL_AT_SAVE", 0))
_saves = 0
_save = DirectCheckpointIO.save_checkpoint


def dying_save(self, checkpoint, filepath, storage_options=None) -> None:
    global _saves
    _saves += 1
    if _saves < KILL_AT:
        return _save(self, checkpoint, filepath, storage_options)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    with open(filepath, "wb") as handle:
        handle.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        handle.flush()
        os.fsync(handle.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def dying_shard_write(checkpoint, directory, folder, world_size, *args, **kwargs):
    global _saves
    _saves += 1
    if _saves >= KILL_AT and os.environ.get("RANK") == "1":
        (directory / folder).mkdir(parents=True, exist_ok=True)
        with open(directory / folder / "__1_0.distcp", "wb") as handle:
            handle.write(b"half a shard")
            handle.flush()
            os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return _write_shards(checkpoint, directory, folder, world_size, *args, **kwargs)


class TrainingGoesOn(L.Callback):
    """Counts the training iterations begun."""

    def __init__(self):
        self.begun = 0

    def on_train_batch_start(self, *args) -> None:
        self.begun += 1


def faulty_writer(folder):
    """Rank 1's writer of the Nth shard folder dies or fails half-way (the others are DCP's own)."""
    global _saves
    _saves += 1
    writer, begun_at_save = _shard_writer(folder), going_on.begun
    if _saves != KILL_AT or os.environ.get("RANK") != "1":
        return writer

    def write_data(plan, planner):  # in the background thread
        with open(folder / "__1_0.distcp", "wb") as handle:
            handle.write(b"half a shard")
        if os.environ.get("DGM_TEST_FAIL_IN_SHARDS"):
            raise OSError("injected write failure")
        deadline = time.monotonic() + 60
        while going_on.begun == begun_at_save and time.monotonic() < deadline:
            time.sleep(0.05)
        if going_on.begun > begun_at_save:
            (folder.parent.parent / "trained_while_writing").touch()
        os.kill(os.getpid(), signal.SIGKILL)

    writer.write_data = write_data
    return writer


if os.environ.get("DGM_TEST_KILL_IN_ASYNC_SHARDS") or os.environ.get("DGM_TEST_FAIL_IN_SHARDS"):
    from helpers import with_callback

    from dgm_scale.distributed import dcp_checkpoint

    KILL_AT = int(os.environ.get("DGM_TEST_KILL_IN_ASYNC_SHARDS") or os.environ["DGM_TEST_FAIL_IN_SHARDS"])
    _shard_writer, dcp_checkpoint.shard_writer = dcp_checkpoint.shard_writer, faulty_writer
    going_on = TrainingGoesOn()
    with_callback(going_on)
elif os.environ.get("DGM_TEST_KILL_IN_SHARDS"):
    from dgm_scale.distributed import dcp_checkpoint

    KILL_AT, _write_shards = int(os.environ["DGM_TEST_KILL_IN_SHARDS"]), dcp_checkpoint.write
    dcp_checkpoint.write = dying_shard_write  # the FSDP strategy's shard writer
else:
    DirectCheckpointIO.save_checkpoint = dying_save  # the trainer's checkpoint IO (train.build_trainer)

if __name__ == "__main__":
    sys.exit(main())
