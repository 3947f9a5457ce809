"""Run `dgm-scale` and SIGKILL it half-way through writing its Nth checkpoint (env DGM_TEST_KILL_AT_SAVE).

A deterministic "kill during a checkpoint write" for tests/test_kill_resume.py: the Nth save
writes the first half of its bytes to the (temporary) target, then the process kills itself.
"""
import io
import os
import signal
import sys

import torch

from dgm_scale.cli import main
from dgm_scale.core.checkpoints import DirectCheckpointIO

KILL_AT = int(os.environ["DGM_TEST_KILL_AT_SAVE"])
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


DirectCheckpointIO.save_checkpoint = dying_save  # the trainer's checkpoint IO (train.build_trainer)

if __name__ == "__main__":
    sys.exit(main())
