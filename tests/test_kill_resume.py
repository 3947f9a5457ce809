"""kill -9 at a random moment, `resume=auto`: the run ends bit-identical to an uninterrupted one.

Real `dgm-scale train` processes (torchrun for 2 processes) are killed with SIGKILL at a seeded
random point after a chosen iteration's checkpoint appeared, then resumed to the end; final
weights (EMA included) and every logged training value in metrics.csv must equal those of an
uninterrupted run. A kill in the middle of a checkpoint write is made deterministic by
tests/kill_in_save.py, which writes half of a checkpoint and then kills its own process.

Starting a process costs ~4 s of CPU (imports) against ~1 s of training, so the one-process
reference runs and final resumes run inside pytest (one thread, like the subprocesses; the same
`train()` the CLI calls) while only the killed runs are separate processes.
"""
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from helpers import (ROOT, TINY, TINY_RUN, adapt_args, assert_same_final_run, assert_same_phema, free_port, metrics_rows,
                     train_here)
from dgm_scale.modules import load_module

SEED = 20261202
MAX_STEPS = 16
COMMON = TINY + [f"trainer.max_steps={MAX_STEPS}", "run.checkpoint_every=1", "run.sample_every=100",
                 "run.keep_checkpoints=3"]
# n_critic > 1; batches large enough that the iterations cross epoch ends (digits: 1,617 images)
GAN = ["configs/wgan_gp.yaml", "loss.n_critic=2", "data.batch_size=128"]
VAE = ["configs/vae.yaml", "data.batch_size=512"]


def launch(args: list[str], run_dir: Path, nproc: int = 1, driver: str = "", env: dict | None = None) -> subprocess.Popen:
    """`dgm-scale train ARGS run.dir=RUN_DIR` (under torchrun when nproc > 1), output to RUN_DIR.log."""
    command = ["-m", "dgm_scale.cli"] if not driver else [driver]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
                   f"--rdzv-id={run_dir.name}", *command]
    log = open(f"{run_dir}.log", "a")
    return subprocess.Popen([sys.executable, *command, "train", *args, f"run.dir={run_dir}"], cwd=ROOT,
                            stdout=log, stderr=log,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {})))


def finish(proc: subprocess.Popen, run_dir: Path) -> None:
    assert proc.wait(timeout=180) == 0, Path(f"{run_dir}.log").read_text()[-3000:]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process and all its descendants (torchrun's workers run in their own sessions)."""
    family = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    for child in family:
        child.kill()
    proc.wait()
    psutil.wait_procs(family, timeout=10)


def checkpointed_iterations(run_dir: Path) -> list[int]:
    return sorted(int(p.stem[5:]) for p in (run_dir / "checkpoints").glob("iter_*.ckpt")) \
        if (run_dir / "checkpoints").is_dir() else []


def iteration_seconds(run_dir: Path) -> float:
    """One iteration's time: the shortest gap between the write times of consecutive iteration
    checkpoints (one per iteration; the shortest, because an older file may be a killed run's)."""
    times = []
    for number in checkpointed_iterations(run_dir):
        try:
            times.append((number, (run_dir / "checkpoints" / f"iter_{number:07d}.ckpt").stat().st_mtime))
        except FileNotFoundError:  # pruned meanwhile (run.keep_checkpoints)
            pass
    gaps = [(t2 - t1) / (n2 - n1) for (n1, t1), (n2, t2) in zip(times, times[1:]) if t2 > t1]
    return min(gaps) if gaps else 0.05


def kill_after(proc: subprocess.Popen, run_dir: Path, iteration: int, fraction: float) -> None:
    """SIGKILL `proc` `fraction` of an iteration's time after the checkpoint of `iteration` (or a
    later one) appeared, so that the kill lands at the same point of the run on a fast or a slow
    machine."""
    deadline = time.monotonic() + 120
    while not any(i >= iteration for i in checkpointed_iterations(run_dir)):
        assert proc.poll() is None, f"run ended before iteration {iteration}: {Path(f'{run_dir}.log').read_text()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.002)
    time.sleep(fraction * iteration_seconds(run_dir))
    assert proc.poll() is None, "the run finished before it could be killed: choose an earlier kill point"
    kill_tree(proc)


def kill_in_background(proc: subprocess.Popen, run_dir: Path, iteration: int, fraction: float):
    """kill_after in a thread (so a reference run can train meanwhile); join() re-raises its failure."""
    errors = []

    def watch():
        try:
            kill_after(proc, run_dir, iteration, fraction)
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)
            proc.kill()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()

    def join() -> None:
        thread.join(timeout=180)
        if errors:
            raise errors[0]
    return join


def random_kill_point(case: str, first: int, last: int) -> tuple[int, float]:
    """A seeded kill point: after the checkpoint of an iteration in [first, last], within the
    next 1.5 iterations (so also while a checkpoint is being written); at most iteration
    last + 2 of MAX_STEPS, so the run cannot finish first."""
    rng = random.Random(f"{SEED}-{case}")
    iteration, fraction = rng.randint(first, last), rng.uniform(0.0, 1.5)
    print(f"{case}: SIGKILL {fraction:.2f} iterations' time after the checkpoint of iteration {iteration} (seed {SEED})")
    return iteration, fraction


def checkpoint_iteration(run_dir: Path) -> int:
    return load_module(run_dir / "checkpoints" / "last.ckpt").checkpoint_iteration


def assert_same_run(reference: Path, resumed: Path) -> None:
    assert_same_final_run(reference, resumed, MAX_STEPS)


def test_gan_killed_while_saving_then_at_random_resumes_exactly(tmp_path):
    """WGAN-GP, n_critic 2, EMA. First kill: half-way through writing last.ckpt at iteration 4
    (save 8; iter_4 is save 7) - the half file is the temporary one, last.ckpt is iteration 3's
    and whole. Second kill: SIGKILL at a random point of the resumed run. Then resume to the end."""
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    first = launch([*GAN, *COMMON], victim, driver="tests/kill_in_save.py", env={"DGM_TEST_KILL_AT_SAVE": "8"})
    train_here([*GAN, *COMMON], reference)
    assert first.wait(timeout=180) == -9
    assert (victim / "checkpoints" / ".last.ckpt.tmp").is_file()
    assert checkpoint_iteration(victim) == 3  # loads: whole
    iteration, fraction = random_kill_point("gan", 5, 10)
    second = launch([*GAN, *COMMON, "resume=auto"], victim)
    kill_after(second, victim, iteration, fraction)
    stopped_at = checkpoint_iteration(victim)
    print(f"gan: killed; last.ckpt holds iteration {stopped_at}")
    assert iteration <= stopped_at < MAX_STEPS
    train_here([*GAN, *COMMON, "resume=auto"], victim)
    assert_same_run(reference, victim)


def kill_at_random_and_resume(args: list[str], tmp_path: Path, case: str) -> Path:
    """Train `args` once straight (here) and once killed at a seeded random point (a subprocess),
    resume the killed one, and require the same run; returns the reference run directory."""
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    iteration, fraction = random_kill_point(case, 2, 10)
    proc = launch(args, victim)
    join = kill_in_background(proc, victim, iteration, fraction)
    train_here(args, reference)
    join()
    assert iteration <= checkpoint_iteration(victim) < MAX_STEPS
    train_here([*args, "resume=auto"], victim)
    assert_same_run(reference, victim)
    return reference


def test_vae_killed_at_random_resumes_exactly(tmp_path):
    kill_at_random_and_resume(adapt_args([*VAE, *COMMON]), tmp_path, "vae")


def test_ssgan_killed_at_random_resumes_exactly(tmp_path):
    """The semi-supervised GAN: 10 labels per class (a choice keyed to the seed), feature matching."""
    args = ["configs/ssgan.yaml", *COMMON, "data.batch_size=256"]
    reference = kill_at_random_and_resume(args, tmp_path, "ssgan")
    assert "train/d_supervised" in metrics_rows(reference)[0]


def test_autoregressive_text_model_killed_at_random_resumes_exactly(tmp_path):
    """A byte-level LSTM on a small text file (epochs of 5 iterations, each starting its
    windows at an offset keyed to the epoch): killed at random, resumed, equal to the straight run."""
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"word{i % 37} and line {i}." for i in range(150)))
    args = [str(ROOT / "configs" / "char_rnn.yaml"), *TINY_RUN, f"trainer.max_steps={MAX_STEPS}", "run.checkpoint_every=1",
            "run.sample_every=100", "run.keep_checkpoints=3", f"data.path={text}", "data.seq_len=16",
            "data.batch_size=32", "model.width=16", "model.embed_dim=8"]
    reference = kill_at_random_and_resume(args, tmp_path, "autoregressive")
    assert len({row["epoch"] for row in metrics_rows(reference)}) >= 3


def test_gan_with_ada_and_diffaugment_killed_at_random_resumes_exactly(tmp_path):
    """Augmentation noise is keyed to the iteration and ADA's p / r_t statistics are buffers: a
    run killed at random and resumed equals the straight run, p included."""
    args = [*GAN, *COMMON, "aug.policy=[translation,cutout]", "aug.ada=true", "aug.ada_kimg=1", "aug.ada_interval=2",
            "aug.ada_p=0.3", "loss.lecam_weight=0.1"]
    reference = kill_at_random_and_resume(args, tmp_path, "ada")
    assert "aug/p" in metrics_rows(reference)[0]


def test_diffusion_killed_at_random_resumes_exactly(tmp_path):
    """EDM, class-conditional with label dropout: noise levels, noise and dropped labels are all
    keyed to the iteration, so the resumed run draws exactly what the straight one drew; the
    post-hoc EMA's power-function averages and snapshots are the straight run's too."""
    args = [str(ROOT / "configs" / "edm.yaml"), *TINY_RUN, f"trainer.max_steps={MAX_STEPS}", "run.checkpoint_every=1",
            "run.sample_every=100", "run.keep_checkpoints=3", "model.num_classes=10", "model.label_dropout=0.2",
            "model.denoiser.width=8", "model.denoiser.channel_mult=[1,2]", "data.batch_size=256",
            "model.phema.snapshot_every=3"]
    reference = kill_at_random_and_resume(args, tmp_path, "diffusion")
    assert "train/ema_decay" in metrics_rows(reference)[0]
    assert_same_phema(reference, tmp_path / "victim", [3, 6, 9, 12, 15, 16])


def test_two_process_ddp_killed_at_random_resumes_exactly(tmp_path):
    """torchrun, 2 processes: the launcher and both workers are SIGKILLed together."""
    args = [*GAN, *COMMON, "trainer.devices=2"]
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    iteration, fraction = random_kill_point("ddp", 2, 10)
    runs = [launch(args, reference, nproc=2), launch(args, victim, nproc=2)]
    kill_after(runs[1], victim, iteration, fraction)
    assert iteration <= checkpoint_iteration(victim) < MAX_STEPS
    finish(launch([*args, "resume=auto"], victim, nproc=2), victim)
    finish(runs[0], reference)
    assert_same_run(reference, victim)


def test_deepspeed_killed_while_writing_a_sharded_checkpoint_resumes_exactly(tmp_path):
    """2 processes, DeepSpeed ZeRO-2: each rank writes its own partition files; killed while rank 0
    writes the checkpoint that names them (save 6 = last.ckpt of iteration 3), the previous
    checkpoint and its shards stay whole, and the resumed run equals the uninterrupted one.
    (Resuming on another number of processes: tests/test_elastic.py.)"""
    pytest.importorskip("deepspeed")
    from dgm_scale.distributed.zero_checkpoint import shards_of, to_plain

    args = [*GAN, *COMMON, "trainer.devices=2", "trainer.strategy=deepspeed", "run.keep_checkpoints=2"]
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    killed = launch(args, victim, nproc=2, driver="tests/kill_in_save.py", env={"DGM_TEST_KILL_AT_SAVE": "6"})
    finish(launch(args, reference, nproc=2), reference)
    assert killed.wait(timeout=180) != 0
    assert checkpoint_iteration(victim) == 2  # last.ckpt of iteration 2, whole
    named = shards_of(victim / "checkpoints" / "last.ckpt")
    assert named["world_size"] == 2
    assert sorted(p.name for p in (victim / "checkpoints" / named["dir"]).iterdir()) == [
        "rank00000-opt0.pt", "rank00000-opt1.pt", "rank00001-opt0.pt", "rank00001-opt1.pt"]
    finish(launch([*args, "resume=auto"], victim, nproc=2), victim)
    assert_same_run(reference, victim)
    # only the shard folders that existing checkpoints name are left
    checkpoints = reference / "checkpoints"
    named = {shards_of(path)["dir"] for path in checkpoints.glob("*.ckpt")}
    assert {f"zero/{p.name}" for p in (checkpoints / "zero").iterdir()} == named and len(named) == 3  # last + 2 iter
    plain = to_plain(checkpoints / "last.ckpt", tmp_path / "plain.ckpt")
    states = torch.load(plain, weights_only=True)["optimizer_states"]
    assert [len(state["zero_partitions"]) for state in states] == [2, 2]
