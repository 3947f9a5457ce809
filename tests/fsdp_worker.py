"""Run under torchrun by tests/test_fsdp.py: several small trainings in one launch (a launch costs
seconds of imports), each under `trainer.strategy` ddp and fsdp (or the strategies a case names);
saves rank 0's gathered weights.

    fsdp_worker.py OUT_DIR CASES.json   CASES: [[name, config, [overrides...], (strategies)], ...]

Background checkpoint writes (trainer.fsdp.async_save) start only once training has gone on
(the next iteration's end, or the end of training): a staged copy of the shards that was no
copy would then hold the later weights.
"""
import json
import os
import sys
import threading
from pathlib import Path

import lightning as L
import torch

from ddp_worker import FullParameters
from fsdp_state import full_optimizer_states
from dgm_scale.config import load_config
from dgm_scale.distributed import dcp_checkpoint
from dgm_scale.training import quiet_lightning, train
from helpers import with_callback

class LateWrites(L.Callback):
    """Holds each background shard write back until a training iteration (or the training) ends."""

    def __init__(self):
        self.waiting, self.count = [], 0

    def writer(self, folder):
        writer, progressed = _shard_writer(folder), threading.Event()
        self.waiting.append(progressed)
        write_data = writer.write_data

        def late_write_data(plan, planner):
            if threading.current_thread() is not threading.main_thread():
                self.count += 1
                progressed.wait(timeout=60)
            return write_data(plan, planner)

        writer.write_data = late_write_data
        return writer

    def on_train_batch_end(self, *args) -> None:
        self.release()

    def on_train_end(self, *args) -> None:
        self.release()

    def release(self) -> None:
        for progressed in self.waiting:
            progressed.set()
        self.waiting = []


class OptimizerStates(L.Callback):
    """Every optimizer's state at the end of training, gathered (by parameter name)."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.states = full_optimizer_states(pl_module, trainer.strategy.optimizers)


if __name__ == "__main__":
    out_dir, cases = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    quiet_lightning()
    # One process group for all the trainings (train() ends each by destroying it; creating it
    # again in the same process failed at the third time: gloo "Connection refused").
    destroy = torch.distributed.destroy_process_group
    torch.distributed.destroy_process_group = lambda group=None: group is not None and destroy(group)  # (subgroups go)
    full, optimizers, late = FullParameters(), OptimizerStates(), LateWrites()
    _shard_writer, dcp_checkpoint.shard_writer = dcp_checkpoint.shard_writer, late.writer
    for callback in (full, optimizers, late):
        with_callback(callback)
    for name, config, overrides, *strategies in cases:
        for strategy in (strategies[0] if strategies else ("ddp", "fsdp")):
            late.count = 0
            run = f"{name}-{strategy}"
            result = train(load_config(config, [*overrides, f"trainer.strategy={strategy}", f"run.dir={out_dir / run}"]))
            if os.environ["RANK"] == "0":
                torch.save({"params": full.params, "optimizer_states": optimizers.states, "iterations": result.iterations,
                            "optimizer_types": [type(o).__name__ for o in result.module.trainer.strategy.optimizers],
                            "sharded": sorted({type(p).__name__ for p in result.module.parameters()}),
                            "background_writes": late.count},
                           out_dir / f"{run}.pt")
    destroy()
