"""Run `dgm-scale` and SIGKILL it half-way through writing its Nth checkpoint (env DGM_TEST_KILL_AT_SAVE).

A deterministic "kill during a checkpoint write" for tests/test_kill_resume.py: the Nth save
writes the first half of its bytes to the (temporary) target, then the process kills itself.
"""
import io
import os
import signal
import sys

import lightning.fabric.plugins.io.torch_io as torch_io
import torch

from dgm_scale.cli import main

KILL_AT = int(os.environ["DGM_TEST_KILL_AT_SAVE"])
_saves = 0
_atomic_save = torch_io._atomic_save


def dying_save(checkpoint, filepath) -> None:
    global _saves
    _saves += 1
    if _saves < KILL_AT:
        return _atomic_save(checkpoint, filepath)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    with open(filepath, "wb") as handle:
        handle.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        handle.flush()
        os.fsync(handle.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


torch_io._atomic_save = dying_save  # TorchCheckpointIO.save_checkpoint calls it by this name

if __name__ == "__main__":
    sys.exit(main())
