"""Run `dgm-scale` and SIGKILL it half-way through writing its Nth checkpoint (env DGM_TEST_KILL_AT_SAVE).

A deterministic "kill during a checkpoint write" for tests/test_kill_resume.py: the Nth save
writes the first half of its bytes to the (temporary) target, then the process kills itself.
With DGM_TEST_KILL_IN_SHARDS=N instead (trainer.strategy=fsdp, tests/test_fsdp.py), rank 1 is
killed half-way through writing its DCP shard file of the Nth save, before any rank finished.
"""
import io
import os
import signal
import sys

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


def dying_shard_write(checkpoint, directory, folder, world_size) -> None:
    global _saves
    _saves += 1
    if _saves >= KILL_AT and os.environ.get("RANK") == "1":
        (directory / folder).mkdir(parents=True, exist_ok=True)
        with open(directory / folder / "__1_0.distcp", "wb") as handle:
            handle.write(b"half a shard")
            handle.flush()
            os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return _write_shards(checkpoint, directory, folder, world_size)


if os.environ.get("DGM_TEST_KILL_IN_SHARDS"):
    from dgm_scale.distributed import dcp_checkpoint

    KILL_AT, _write_shards = int(os.environ["DGM_TEST_KILL_IN_SHARDS"]), dcp_checkpoint.write
    dcp_checkpoint.write = dying_shard_write  # the FSDP strategy's shard writer
else:
    DirectCheckpointIO.save_checkpoint = dying_save  # the trainer's checkpoint IO (train.build_trainer)

if __name__ == "__main__":
    sys.exit(main())
