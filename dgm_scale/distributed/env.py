"""The launcher contract, read in this one place: which process am I, and which run is this?

torchrun sets RANK / TORCHELASTIC_RUN_ID, SLURM sets SLURM_PROCID / SLURM_JOB_ID /
SLURM_RESTART_COUNT, a W&B sweep agent WANDB_SWEEP_ID / WANDB_RUN_ID, and Lightning's own process
launcher passes its environment to the processes it starts (we add DGM_SCALE_RUN_DIR there, so
they join rank 0's run directory).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

RUN_DIR_VARIABLE = "DGM_SCALE_RUN_DIR"

# The rendezvous of the launch a process belongs to, and the run it joined: never a child launch's.
# An inherited MASTER_PORT that this process still listens on (Lightning puts a free port into
# os.environ and keeps its store open) made every rank of a child launch fail with EADDRINUSE.
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                    "GROUP_RANK", "NODE_RANK", "TORCHELASTIC_RUN_ID", RUN_DIR_VARIABLE)


def without_launch(environ: Mapping[str, str]) -> Dict[str, str]:
    """`environ` for starting a new launch (torchrun, sbatch) from this process: its own launch's
    variables left out."""
    return {key: value for key, value in environ.items() if key not in LAUNCH_VARIABLES}


@dataclass(frozen=True)
class LaunchEnv:
    global_rank: int
    run_id: Optional[str]  # shared by every process of one launch; None for a local single launch
    run_dir: Optional[str]  # set by rank 0 for the processes Lightning starts itself
    requeued: bool  # a SLURM job started again after `scontrol requeue` (preemption, USR1)
    world_size: int = 1  # processes of the launch (torchrun / SLURM); 1 when launched alone
    slurm_job: Optional[str] = None  # what `scontrol requeue` takes (JOB, or ARRAYJOB_TASK); None outside SLURM


def launch_env() -> LaunchEnv:
    env = os.environ
    # LOCAL_RANK alone: a process started by Lightning's own launcher on this machine.
    rank = env.get("RANK") or env.get("SLURM_PROCID") or env.get("LOCAL_RANK") or "0"
    run_id = env.get("SLURM_JOB_ID") or env.get("TORCHELASTIC_RUN_ID")
    if run_id == "none":  # torchrun without an explicit --rdzv-id
        run_id = None
    if run_id is None and env.get("WANDB_SWEEP_ID") and env.get("WANDB_RUN_ID"):
        run_id = env["WANDB_RUN_ID"]  # a W&B sweep agent's run: runs/<name>-<its run id>
    requeued = int(env.get("SLURM_RESTART_COUNT") or 0) > 0
    world_size = int(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or 1)
    slurm_job = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        slurm_job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return LaunchEnv(int(rank), run_id, env.get(RUN_DIR_VARIABLE), requeued, world_size, slurm_job)


def share_run_dir(run_dir: str) -> None:
    """Let processes started later by this one (Lightning's launcher) write into the same run."""
    os.environ[RUN_DIR_VARIABLE] = run_dir
