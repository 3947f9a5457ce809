"""Training runs: tiny configs, torchrun, weights compared, callbacks added to every run."""
from __future__ import annotations

import contextlib
import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from dgm_scale.modules import load_module



# ----------------------------------------------------------------------------- runs
ROOT = Path(__file__).resolve().parents[2]
TOY_FAMILY = ROOT / "tests" / "toy_family.py"  # a family defined outside the package (no encode_features)


TINY = ["tracking.wandb.mode=disabled", "eval.every=0", "eval.at_end=false", "data.resolution=8", "data.batch_size=8", "model.generator.width=4", "model.discriminator.width=4",
        "model.latent_dim=8", "trainer.max_steps=3", "trainer.log_every=1", "trainer.progress_bar=false",
        "trainer.accelerator=cpu", "run.sample_every=2", "run.checkpoint_every=2", "run.num_samples=4"]


# TINY without the GAN's network keys: for families without a generator and discriminator
TINY_RUN = [item for item in TINY if not item.startswith("model.")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], timeout: int = 240, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "--rdzv-id=test", *args]
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM: torchrun stops its ranks (each in a session of its own, out of reach of a
            # kill of torchrun alone) before it exits; orphaned, they would hold memory and ports.
            proc.terminate()
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:  # torchrun itself stuck: leaving the with-block would wait forever
                proc.kill()
                out, err = proc.communicate()
            raise AssertionError(f"torchrun {' '.join(args[:2])} ran past {timeout} s (stopped with its ranks): "
                                 f"{err[-3000:]}") from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


TINY_TRAIN = ["tracking.wandb.mode=disabled", "eval.every=0", "eval.at_end=false", "data.resolution=8", "data.batch_size=16", "model.generator.width=8", "model.discriminator.width=8",
        "model.latent_dim=8", "trainer.max_steps=4", "trainer.log_every=1", "trainer.progress_bar=false",
        "run.sample_every=2", "run.checkpoint_every=2", "run.num_samples=16"]


def metrics_rows(run_dir: Path) -> list[dict]:
    """The logged training rows, without the perf/* timings (which differ from run to run)."""
    with open(run_dir / "metrics.csv") as handle:
        return [{key: value for key, value in row.items() if not key.startswith("perf/")}
                for row in csv.DictReader(handle) if row.get("train/iteration")]


def assert_same_weights(first: Path, second: Path, atol: float = 0.0) -> None:
    a, b = load_module(first).state_dict(), load_module(second).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def with_callback(callback: L.Callback, setattr=setattr) -> None:
    """Runs of `dgm_scale.training.train` get `callback` first among their callbacks (pass
    monkeypatch.setattr in a test)."""
    import dgm_scale.training as train_module

    build = train_module.build_callbacks
    setattr(train_module, "build_callbacks", lambda *a, **k: [callback] + build(*a, **k))


def lean_zero_state(zero_state: dict) -> dict:
    """A ZeRO-1/2 partition's flat per-group tensors without the end padding: {"fp32", Adam's
    "exp_avg", "exp_avg_sq"} by group, plus "step" (from DeepSpeed's own state_dict layout)."""
    groups = {}
    for group, fp32 in enumerate(zero_state["single_partition_of_fp32_groups"]):
        state = zero_state["base_optimizer_state"]["state"].get(group)  # none before the first step
        groups[group] = {"fp32": fp32.reshape(-1).clone()}
        if state is not None:
            groups[group].update({"step": float(state["step"]), **{
                k: state[k].reshape(-1)[:fp32.numel()].clone() for k in ("exp_avg", "exp_avg_sq")}})
    return groups


class ElasticProbe(L.Callback):
    """What a (resumed) run holds right after loading - its weights and optimizer state (ZeRO:
    this rank's partition, lean; FSDP: gathered) - and every training batch's first tensor, saved to
    `out/loaded{rank}.pt` and `out/batches{rank}.pt` (tests/test_elastic.py)."""

    def __init__(self, out: str):
        self.out, self.batches = Path(out), []

    def on_train_start(self, trainer, pl_module) -> None:
        from fsdp_state import full  # FSDP's shards gathered (a collective on every rank, in one order)

        optimizers = []
        for optimizer in trainer.strategy.optimizers:
            if type(optimizer).__name__ == "DeepSpeedZeroOptimizer":
                optimizers.append(lean_zero_state(optimizer.state_dict()))
            else:
                optimizers.append({int(k): {n: full(v) for n, v in st.items()}
                                   for k, st in optimizer.state_dict()["state"].items()})
        params = {name: full(p) for name, p in pl_module.state_dict().items()}
        torch.save({"params": params, "optimizers": optimizers, "world": trainer.world_size},
                   self.out / f"loaded{trainer.global_rank}.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append(batch[0].detach().clone())
        torch.save(self.batches, self.out / f"batches{trainer.global_rank}.pt")


class ActivationDtypes(L.Callback):
    """The dtypes of the outputs of every linear and convolution layer in the forwards of the
    training steps (not those of sample grids or evaluations, which run outside them): what
    `trainer.precision` computes in."""

    def __init__(self):
        self.dtypes: set[str] = set()
        self._recording = False

    def on_train_start(self, trainer, pl_module) -> None:
        for layer in pl_module.modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
                layer.register_forward_hook(self._record)

    def _record(self, layer, inputs, output) -> None:
        if self._recording:
            self.dtypes.add(str(output.dtype).removeprefix("torch."))

    def on_train_batch_start(self, *args) -> None:
        self._recording = True

    def on_train_batch_end(self, *args) -> None:  # first of the callbacks (with_callback): before the sample grids
        self._recording = False


def train_computing(config: str | Path, overrides: list[str]):
    """`train()` of CONFIG with OVERRIDES, and the dtypes its training steps computed in
    (ActivationDtypes)."""
    import pytest

    from dgm_scale.config import load_config
    from dgm_scale.training import train

    activations = ActivationDtypes()
    with pytest.MonkeyPatch.context() as patch:
        with_callback(activations, patch.setattr)
        result = train(load_config(config, overrides))
    return result, activations.dtypes


def assert_same_final_run(reference: Path, resumed: Path, steps: int) -> None:
    """A resumed run ended as the uninterrupted `reference`: the same final weights (EMA and
    buffers included), bit for bit, and the same logged training rows, each iteration once."""
    assert_same_weights(reference / "checkpoints" / "last.ckpt", resumed / "checkpoints" / "last.ckpt")
    assert metrics_rows(reference) == metrics_rows(resumed)
    assert [float(row["train/iteration"]) for row in metrics_rows(resumed)] == list(range(1, steps + 1))


def assert_same_phema(reference: Path, resumed: Path, iterations: list[int]) -> None:
    """Two diffusion runs hold the same power-function EMAs (post-hoc EMA): in last.ckpt, and in
    the snapshots of `iterations` (RUN/phema/), bit for bit."""
    states = [torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["phema"] for run in (reference, resumed)]
    assert states[0]["iteration"] == states[1]["iteration"]
    for a, b in zip(sum(states[0]["averages"], []), sum(states[1]["averages"], []), strict=True):
        assert torch.equal(a, b)
    for iteration in iterations:
        name = f"phema/phema_{iteration:07d}.pt"
        a, b = (torch.load(run / name, weights_only=True)["profiles"] for run in (reference, resumed))
        assert len(a) == len(b) and all(x.keys() == y.keys() for x, y in zip(a, b))
        assert all(torch.equal(x[key], y[key]) for x, y in zip(a, b) for key in x), name


@contextlib.contextmanager
def one_thread():
    """In-process runs compute like the OMP_NUM_THREADS=1 subprocesses (same reduction order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_here(args: list[str], run_dir: Path) -> None:
    """`dgm-scale train ARGS run.dir=RUN_DIR` in this process (ARGS: a config file, then
    overrides), computing like a one-thread subprocess, to compare with one."""
    from dgm_scale.config import load_config
    from dgm_scale.training import train

    with one_thread():
        train(load_config(args[0], [*args[1:], f"run.dir={run_dir}"]))


def stop_and_resume(run_train, tmp_path: Path, common: list[str]) -> tuple[Path, Path]:
    """Train 6 iterations straight, and 3 + 3 with a resume; return both run directories."""
    full, part = tmp_path / "full", tmp_path / "part"
    run_train(common + ["trainer.max_steps=6", f"run.dir={full}"])
    run_train(common + ["trainer.max_steps=3", f"run.dir={part}"])
    run_train(common + ["trainer.max_steps=6", f"run.dir={part}", "resume=auto"])
    return full, part


def with_callbacks(first: L.Callback, last: L.Callback, setattr=setattr) -> None:
    """Runs of `dgm_scale.training.train` get `first` before and `last` after all their callbacks."""
    import dgm_scale.training as train_module

    build = train_module.build_callbacks
    setattr(train_module, "build_callbacks", lambda *a, **k: [first] + build(*a, **k) + [last])
