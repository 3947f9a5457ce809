"""Run under torchrun by tests/test_fsdp.py: several small trainings in one launch (a launch costs
seconds of imports), each under `trainer.strategy` ddp and fsdp; saves rank 0's gathered weights.

    fsdp_worker.py OUT_DIR CASES.json   CASES: [[name, config, [overrides...]], ...]
"""
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch

from ddp_worker import FullParameters
from fsdp_state import full_optimizer_states
from dgm_scale.config import load_config
from dgm_scale.training import quiet_lightning, train
from helpers import with_callback

class OptimizerStates(L.Callback):
    """Every optimizer's state at the end of training, gathered (by parameter name)."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.states = full_optimizer_states(pl_module, trainer.strategy.optimizers)


if __name__ == "__main__":
    out_dir, cases = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    quiet_lightning()
    # One process group for all the trainings (train() ends each by destroying it; creating it
    # again in the same process failed at the third time: gloo "Connection refused").
    destroy, torch.distributed.destroy_process_group = torch.distributed.destroy_process_group, lambda: None
    full, optimizers = FullParameters(), OptimizerStates()
    with_callback(full)
    with_callback(optimizers)
    for name, config, overrides in cases:
        for strategy in ("ddp", "fsdp"):
            run = f"{name}-{strategy}"
            result = train(load_config(config, [*overrides, f"trainer.strategy={strategy}", f"run.dir={out_dir / run}"]))
            if os.environ["RANK"] == "0":
                torch.save({"params": full.params, "optimizer_states": optimizers.states, "iterations": result.iterations,
                            "optimizer_types": [type(o).__name__ for o in result.module.trainer.strategy.optimizers],
                            "sharded": sorted({type(p).__name__ for p in result.module.parameters()})},
                           out_dir / f"{run}.pt")
    destroy()
