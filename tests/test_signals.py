"""SIGTERM / SIGUSR1 outside SLURM: checkpoint at the next iteration, stop, continue with resume=auto."""
import os
import signal
import subprocess
import sys
import time

from dgm_scale.distributed.preemption import requeue_checkpoints
from helpers import ROOT, TINY, assert_same_final_run, train_here

STEPS = 40  # the signals come after the checkpoints of iterations 5 and ~10: far from the end


def train_process(run_dir, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dgm_scale.cli", "train", *args, f"run.dir={run_dir}"], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop_with(signum: int, run_dir, args: list[str]) -> str:
    """Start a training, signal it once it has written a checkpoint, return its output."""
    proc = train_process(run_dir, args)
    started, deadline = time.time(), time.monotonic() + 120
    last = run_dir / "checkpoints" / "last.ckpt"
    while not (last.is_file() and last.stat().st_mtime > started):  # training (and its handlers) started
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-2000:] if proc.poll() else ""
        time.sleep(0.1)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    return out


def test_sigterm_and_sigusr1_checkpoint_stop_and_resume_exactly(tmp_path):
    """Stopped by SIGTERM, resumed with resume=auto and stopped by SIGUSR1, resumed from that
    hpc_ckpt to the end: the same final weights and logged rows as an uninterrupted run, bit for
    bit (both stops fall inside an epoch, whose rest must not be skipped)."""
    args = ["configs/nsgan.yaml", *TINY, f"trainer.max_steps={STEPS}", "run.checkpoint_every=5",
            "run.keep_checkpoints=1"]
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    resume = []
    for number, signum in enumerate((signal.SIGTERM, signal.SIGUSR1), 1):
        out = stop_with(signum, run_dir, args + resume)
        assert "stopped at iteration" in out and f"resume=auto run.dir={run_dir}" in out
        assert [p.name for p in requeue_checkpoints(run_dir)] == [f"hpc_ckpt_{number}.ckpt"]  # older one pruned
        # First as the message says (resume=auto: the last.ckpt written as the run stopped, as a
        # requeued SLURM job does), then from the signal's own checkpoint
        resume = ["run.resume=auto"] if number == 1 else [f"run.resume={run_dir / 'hpc_ckpt_2.ckpt'}"]
    last_part = train_process(run_dir, args + resume)
    train_here(args, reference)  # meanwhile
    out, _ = last_part.communicate(timeout=180)
    assert last_part.returncode == 0, out[-2000:]
    assert f"resuming from {run_dir / 'hpc_ckpt_2.ckpt'} (world size 1 -> 1" in out
    assert_same_final_run(reference, run_dir, STEPS)  # each iteration exactly once across the three parts
