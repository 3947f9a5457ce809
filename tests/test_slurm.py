"""SLURM for real: a local cluster runs launch/slurm/train.sbatch with 2 ranks; USR1 (or TERM,
with run.requeue_on=[USR1,TERM]) makes the job checkpoint and requeue; the requeued job resumes
from that checkpoint and finishes, and its W&B run (offline) continues the stopped job's."""
import csv
import getpass
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import offline_runs, records_of, wandb_logged_iterations
from dgm_scale.distributed.env import without_launch
from dgm_scale.tracking.loggers import WANDB_RUN_ID_FILE

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "launch" / "slurm" / "local_cluster.sh"
TINY = ["tracking.wandb.mode=offline", "eval.every=0", "eval.at_end=false", "data.resolution=8", "data.batch_size=8", "model.generator.width=4", "model.discriminator.width=4",
        "model.latent_dim=8", "trainer.log_every=1", "trainer.progress_bar=false", "trainer.accelerator=cpu",
        "run.sample_every=100", "run.checkpoint_every=100", "run.num_samples=4"]
ITERATIONS = 200  # enough to stop after 30 and resume; each one costs both parts time


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm-state")
    started = subprocess.run(["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True, timeout=300)
    if started.returncode == 3:
        pytest.skip(f"no local SLURM cluster here: {started.stderr.strip()}")
    assert started.returncode == 0, started.stderr
    yield
    # Stopping the daemons leaves a job's processes running (slurmstepd is not their child):
    # cancel every job and wait for them to go, or they train on beside the rest of the suite.
    subprocess.run(["scancel", "--user", getpass.getuser()], capture_output=True)
    wait_for(lambda: not subprocess.run(["squeue", "--noheader"], capture_output=True, text=True).stdout.strip(),
             120, "the cancelled jobs to end")
    subprocess.run(["bash", str(CLUSTER), "stop", str(state)], timeout=60)


def job_field(job_id: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return next((item.split("=", 1)[1] for item in out.split() if item.startswith(f"{field}=")), "")


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def wait_for(condition, timeout: float, what: str, job: str = "", output: Path | None = None) -> None:
    """Poll `condition`; with `job`, a job that ended before it holds fails the wait at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if job and job_field(job, "JobState") in FINAL_STATES:
            raise AssertionError(f"the job ended before {what}" + situation(job, output))
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}" + situation(job, output))


def situation(job: str, output: Path | None) -> str:
    """What a timed-out wait saw: the job's state and reason, the node, the busiest processes and
    the job's output, so a failure on a CI machine says whether the job pended, ran slowly or hung."""
    if not job:
        return ""
    state = " ".join(f"{name}={job_field(job, name)}" for name in ("JobState", "Reason", "RunTime", "Restarts"))
    nodes = subprocess.run(["sinfo", "-N", "-o", "%N %T %C"], capture_output=True, text=True).stdout.strip()
    busiest = subprocess.run(["ps", "-eo", "pcpu,etimes,args", "--sort=-pcpu"], capture_output=True,
                             text=True).stdout.splitlines()[:8]
    log = output.read_text()[-2000:] if output is not None and output.exists() else "(no output yet)"
    return f"\njob: {state}\nnodes: {nodes}\nbusiest:\n" + "\n".join(line[:160] for line in busiest) + f"\nlog:\n{log}"


def start_requeued_now(job: str, *settings: str) -> None:
    """Start a requeued job now instead of after `cred_expire`. Wait for it to pend, then two more
    seconds: slurmd revokes the old credential on a 1-second clock, and a start within the same
    second fails the job with "Job credential revoked"."""
    wait_for(lambda: job_field(job, "JobState") == "PENDING", 120, "the requeued job to be pending")
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", *settings, "StartTime=now"], check=True)


def wait_for_state(job: str, state: str, timeout: float) -> None:
    """Wait for the job to reach `state`; fail at once if it ends in another final state."""
    def reached() -> bool:
        current = job_field(job, "JobState")
        assert current == state or current not in FINAL_STATES, f"job {job} ended {current}, not {state}"
        return current == state

    wait_for(reached, timeout, f"the job to be {state}")


def logged_iterations(run_dir: Path) -> list[int]:
    if not (run_dir / "metrics.csv").exists():
        return []
    with open(run_dir / "metrics.csv") as handle:
        return [int(float(row["train/iteration"])) for row in csv.DictReader(handle) if row.get("train/iteration")]


# TERM with requeue: under `-m slow`, with the time-limit test below (its time limit and its
# scancel --signal=TERM); tests/test_signals.py checks SIGTERM's checkpoint and exact resume.
@pytest.mark.parametrize("signal_name, extra", [("USR1", []), pytest.param("TERM", ["run.requeue_on=[USR1,TERM]"],
                                                                          marks=pytest.mark.slow)])
def test_sbatch_trains_two_ranks_checkpoints_on_a_signal_requeues_and_resumes(slurm_cluster, tmp_path, signal_name,
                                                                                extra):
    run_dir, output = tmp_path / "run", tmp_path / "job.out"
    env = dict(without_launch(os.environ), OMP_NUM_THREADS="1", PYTHON=sys.executable, PYTHONPATH=str(ROOT),
               # W&B offline, its files under tmp_path. The environment may hold this test process's
               # W&B service (WANDB_SERVICE, when an earlier test used W&B): the jobs must not use it.
               NETRC=str(tmp_path / "no-netrc"),
               **{name: str(tmp_path / "wandb_home" / name.lower())
                  for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")})
    env.pop("WANDB_API_KEY", None)
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={output}",
         str(ROOT / "launch" / "slurm" / "train.sbatch"), "configs/nsgan.yaml", *TINY,
         f"trainer.max_steps={ITERATIONS}", f"run.dir={run_dir}", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: len(logged_iterations(run_dir)) >= 30, 240, "the job to train 30 iterations", job, output)
        subprocess.run(["scancel", f"--signal={signal_name}", job], check=True)
        wait_for(lambda: (run_dir / "hpc_ckpt_1.ckpt").exists() and job_field(job, "Restarts") == "1", 120,
                 f"the {signal_name} checkpoint and the requeue", job, output)
        start_requeued_now(job)
        wait_for_state(job, "COMPLETED", 400)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    log = output.read_text()
    # Both ranks ran (Lightning under SLURM with 2 tasks), the job resumed from the USR1 checkpoint ...
    # (from the USR1 checkpoint, or from last.ckpt of the same iteration when the stopping job
    # wrote that too before SLURM ended it: both hold the state at the stop)
    resumed_from = re.findall(r"resuming from (\S+)", log)
    assert len(resumed_from) == 2 and len(set(resumed_from)) == 1, log[-3000:]
    assert resumed_from[0] in (str(run_dir / "hpc_ckpt_1.ckpt"), str(run_dir / "checkpoints" / "last.ckpt"))
    # ... and finished: the success line is printed once, by rank 0, after training returned.
    assert log.count(f"done: {ITERATIONS} iterations") == 1, log[-3000:]
    interrupted_at = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"] // 2
    assert 30 <= interrupted_at < ITERATIONS
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 * ITERATIONS
    # The metrics of both parts are in one file, none missing.
    assert sorted(logged_iterations(run_dir)) == list(range(1, ITERATIONS + 1))  # each exactly once
    # W&B: both parts logged to the run's one W&B run id, the stopped part finished its run
    # before the requeue, and between them they hold every iteration once. Under TERM, SLURM
    # signals W&B's service process too: the stopped part loses W&B (and trains on without it).
    run_id = (run_dir / WANDB_RUN_ID_FILE).read_text().strip()
    parts = offline_runs(run_dir)
    assert len(parts) == 2 and all(f"-{run_id}" in part.name for part in parts)
    assert [[r.run_id for r in records_of(part, "run")] for part in parts] == [[run_id], [run_id]]
    if signal_name == "TERM":
        assert "training continues without W&B" in log or [e.exit_code for e in records_of(parts[0], "exit")] == [0]
        assert wandb_logged_iterations(parts[1])[-1] == ITERATIONS
        return
    assert [[e.exit_code for e in records_of(part, "exit")] for part in parts] == [[0], [0]]
    assert sorted(wandb_logged_iterations(parts[0]) + wandb_logged_iterations(parts[1])) == list(range(1, ITERATIONS + 1))


def test_a_four_point_sweep_runs_as_a_job_array_and_compares(slurm_cluster, tmp_path, capsys):
    from dgm_scale.cli import main

    sweep = tmp_path / "grid.yaml"
    sweep.write_text("name: tiny\nconfig: configs/nsgan.yaml\n"
                     f"overrides: [{', '.join(TINY)}, trainer.max_steps=12, eval.every=6, eval.num_samples=60,"
                     " tracking.wandb.mode=disabled]\n"
                     "grid:\n  optim.g.lr: [1.0e-4, 3.0e-4]\n  loss.name: [nonsaturating, hinge]\n")
    env = dict(without_launch(os.environ), OMP_NUM_THREADS="1", PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    submitted = subprocess.run([sys.executable, "-m", "dgm_scale.cli", "sweep", str(sweep), "--submit",
                                f"--root={tmp_path / 'runs'}", f"--sbatch=--cpus-per-task=1 --output={tmp_path}/%a.out"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    job = re.search(r"submitted array job (\d+)", submitted.stdout).group(1)
    done = lambda: all((tmp_path / "runs" / "tiny" / d / "checkpoints" / "last.ckpt").is_file()  # noqa: E731
                       for d in ("000-lr=0.0001,name=nonsaturating", "001-lr=0.0001,name=hinge",
                                 "002-lr=0.0003,name=nonsaturating", "003-lr=0.0003,name=hinge"))
    try:
        wait_for(lambda: done() and not subprocess.run(["squeue", "-h", "-j", job], capture_output=True,
                                                       text=True).stdout.strip(), 300, "the 4 array tasks")
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    assert main(["compare", str(tmp_path / "runs" / "tiny")]) == 0
    rows = (tmp_path / "runs" / "tiny" / "compare.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("run,status,iteration,best_fid,best_iteration,last_fid")
    assert rows[0].endswith("loss.name,optim.g.lr") and all(",finished,12," in row for row in rows[1:])
    assert (tmp_path / "runs" / "tiny" / "compare.html").is_file() and (tmp_path / "runs" / "tiny" / "compare.png").is_file()


# A minute of the time limit, then the requeued part: the longest test; signal handling and
# requeue stay covered by the USR1 test above and tests/test_signals.py.
@pytest.mark.slow
def test_a_job_at_its_time_limit_checkpoints_requeues_and_finishes(slurm_cluster, tmp_path):
    """A 1-minute job: at its time limit SLURM sends SIGTERM (SIGKILL after KillWait); with
    run.requeue_on=[USR1,TERM] it checkpoints, requeues itself, and its second part continues
    every iteration once, until `scancel --signal=TERM` makes it checkpoint again."""
    run_dir, output = tmp_path / "run", tmp_path / "job.out"
    env = dict(without_launch(os.environ), OMP_NUM_THREADS="1", PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    steps = 100_000  # more than a minute's worth: the first part ends at the limit
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--time=1", "--signal=USR1@0", "--ntasks-per-node=2", "--cpus-per-task=1",
         f"--output={output}", str(ROOT / "launch" / "slurm" / "train.sbatch"), "configs/nsgan.yaml", *TINY,
         "tracking.wandb.mode=disabled", f"trainer.max_steps={steps}", "run.requeue_on=[USR1,TERM]",
         f"run.dir={run_dir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: (run_dir / "hpc_ckpt_1.ckpt").exists() and job_field(job, "Restarts") == "1", 240,
                 "the time limit's checkpoint and the requeue")
        stopped_at = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] // 2
        # the second part: the rest of the run, with room for it
        start_requeued_now(job, "TimeLimit=30")
        wait_for(lambda: len(logged_iterations(run_dir)) > stopped_at + 5, 240, "the second part to train")
        subprocess.run(["scancel", "--signal=TERM", job], check=True)  # end the second part early: scancel's TERM
        wait_for(lambda: (run_dir / "hpc_ckpt_2.ckpt").exists(), 120, "the second part's checkpoint")
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    log = output.read_text()
    assert "signal 15: saved" in log, log[-3000:]  # the time limit's SIGTERM, caught
    assert re.search(r"signal .*: saved \S*hpc_ckpt_2\.ckpt", log), log[-3000:]  # and scancel's
    iterations = logged_iterations(run_dir)
    assert 30 <= stopped_at and sorted(iterations) == list(range(1, len(iterations) + 1))  # each once, no gap
