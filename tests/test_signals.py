"""SIGTERM / SIGUSR1 outside SLURM: checkpoint at the next iteration, stop, continue with resume=auto."""
import os
import signal
import subprocess
import sys
import time

from dgm_scale.distributed.preemption import requeue_checkpoints
from helpers import ROOT, TINY, metrics_rows

STEPS = 150


def stop_with(signum: int, run_dir, args: list[str]) -> str:
    """Start a training, signal it once it has logged a few rows, return its output."""
    proc = subprocess.Popen([sys.executable, "-m", "dgm_scale.cli", "train", *args, f"run.dir={run_dir}"], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    args = [*TINY, f"trainer.max_steps={STEPS}", "run.checkpoint_every=10", "run.keep_checkpoints=1"]
    run_dir = tmp_path / "run"
    for number, signum in enumerate((signal.SIGTERM, signal.SIGUSR1), 1):
        out = stop_with(signum, run_dir, args + (["resume=auto"] if number > 1 else []))
        assert "stopped at iteration" in out and f"resume=auto run.dir={run_dir}" in out
        assert [p.name for p in requeue_checkpoints(run_dir)] == [f"hpc_ckpt_{number}.ckpt"]  # older one pruned
    subprocess.run([sys.executable, "-m", "dgm_scale.cli", "train", *args, f"run.dir={run_dir}", "resume=auto"],
                   cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True, capture_output=True)
    iterations = [int(float(row["train/iteration"])) for row in metrics_rows(run_dir)]
    assert iterations == list(range(1, STEPS + 1))  # each exactly once across the three parts
