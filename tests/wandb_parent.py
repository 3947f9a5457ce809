"""A process that uses W&B and then trains in child processes, which inherit its WANDB_SERVICE
(like a notebook, a sweep driver or a shell that submits SLURM jobs): the first training is
killed (-9) after its first checkpoint, the second resumes it for 4 more iterations. Prints the
iteration it resumed from and the second's exit status.

    python tests/wandb_parent.py RUN_DIR [key=value ...]
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import wandb

ROOT = Path(__file__).resolve().parents[1]

run_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
parent_run = wandb.init(mode="offline", project="parent", dir=str(run_dir.parent))
assert os.environ.get("WANDB_SERVICE"), "wandb no longer shares its service through WANDB_SERVICE"
train = [sys.executable, "-m", "dgm_scale", "train", "configs/nsgan.yaml", *overrides, f"run.dir={run_dir}"]
first = subprocess.Popen(train + ["trainer.max_steps=100000"], cwd=ROOT)
while not (run_dir / "checkpoints" / "last.ckpt").exists() and first.poll() is None:
    time.sleep(0.2)
time.sleep(1.0)  # into its W&B logging past the checkpoint
first.kill()
first.wait()
# nsgan: 2 optimizer steps (D, G) per iteration; Lightning's global_step counts optimizer steps
resumed_from = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] // 2
print(f"resumed from iteration {resumed_from}")
second = subprocess.run(train + ["resume=auto", f"trainer.max_steps={resumed_from + 4}"], cwd=ROOT,
                        capture_output=True, text=True)
sys.stderr.write(second.stderr[-3000:])
print(f"resumed training exit status: {second.returncode}")
parent_run.finish()
