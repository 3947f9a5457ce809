"""No host-device synchronisation in the training step of iterations that log nothing.

On a GPU the host queues kernels ahead of the device as long as nothing reads a tensor's value
on the host; one `.item()`, `bool(tensor)`, `.cpu()`, NaN check decided on the host or
progress-bar value per iteration stalls that queue, and the host's own overhead is then added to
every step. SyncCounter (tests/helpers/syncs.py) records every such call from the first callback's
batch start to the last callback's batch end - the training step, Lightning's loop around it
and all our callbacks - on the CPU, where the same calls would sync a GPU.
"""
import os

import pytest
import torch

from helpers import TINY, TINY_RUN, SyncCounter, adapt, torchrun, with_callbacks
from dgm_scale.config import load_config
from dgm_scale.training import train

LOG_EVERY = 3
#: 6 iterations; logged, sample grids and checkpoints at 3 and 6: counted at 1, 2, 4 and 5
SCHEDULE = ["trainer.max_steps=6", f"trainer.log_every={LOG_EVERY}", f"run.checkpoint_every={LOG_EVERY}",
              f"run.sample_every={LOG_EVERY}", "trainer.progress_bar=true"]
#: the networks' keys: the GAN's names (adapted to the VAE's), or the family's own
NETWORKS = {"autoregressive": ["model.width=8", "model.embed_dim=8", "model.layers=1"],
            "diffusion": ["model.denoiser.width=8", "model.denoiser.channel_mult=[1,2]"]}

CASES = {
    "gan": ("nsgan", []),
    "gan-gradient-penalty": ("wgan_gp", ["loss.n_critic=2"]),
    "gan-r1-lecam-ada": ("nsgan", ["loss.r1_gamma=1.0", "loss.lecam_weight=0.1", "aug.ada=true", "aug.ada_interval=2"]),
    "vae": ("vae", []),
    "autoregressive": ("autoregressive", []),
    "ssgan": ("ssgan", []),
    "diffusion": ("diffusion", []),
    "gan-gradient-penalty-bf16": ("wgan_gp", ["loss.n_critic=2", "trainer.precision=bf16-mixed"]),
    "gan-gradient-penalty-fp16": ("wgan_gp", ["loss.n_critic=2", "trainer.precision=16-mixed"]),
    "vae-fp16": ("vae", ["trainer.precision=16-mixed"]),
}


def overrides(config: str, extra: list[str]) -> list[str]:
    if config in NETWORKS:
        return TINY_RUN + NETWORKS[config] + SCHEDULE + extra
    return adapt(f"configs/{config}.yaml", TINY + SCHEDULE + extra)


def describe(syncs) -> str:
    return "; ".join(f"iteration {iteration}: {what} from {caller}" for iteration, what, caller in syncs[:12])


@pytest.mark.parametrize("case", list(CASES))
def test_no_sync_in_unlogged_iterations(case, tmp_path, monkeypatch):
    config, extra = CASES[case]
    counter = SyncCounter(LOG_EVERY)
    with_callbacks(counter.first, counter.last, monkeypatch.setattr)
    result = train(load_config(f"configs/{config}.yaml", overrides(config, extra) + [f"run.dir={tmp_path}"]))
    assert result.iterations == 6
    assert counter.syncs == [], describe(counter.syncs)


def test_the_counter_sees_a_sync(tmp_path, monkeypatch):
    """The counter is not blind: a `.item()` in every G step is found in every counted iteration,
    and so is a host-side NaN decision (all_finite, what the guards did before)."""
    from dgm_scale.core.finite import all_finite
    from dgm_scale.families.gan.module import GANModule

    step = GANModule.generator_step

    def syncing_step(self, *args, **kwargs):
        logs = step(self, *args, **kwargs)
        all_finite([next(self.generator.parameters())])
        return logs
    monkeypatch.setattr(GANModule, "generator_step", syncing_step)
    counter = SyncCounter(LOG_EVERY)
    with_callbacks(counter.first, counter.last, monkeypatch.setattr)
    train(load_config("configs/nsgan.yaml", overrides("nsgan", []) + [f"run.dir={tmp_path}"]))
    assert sorted({iteration for iteration, _, _ in counter.syncs}) == [1, 2, 4, 5]
    assert {what for _, what, _ in counter.syncs} >= {"__bool__", "aten._local_scalar_dense"}


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_no_sync_in_unlogged_iterations_on_two_processes(strategy, tmp_path, monkeypatch):
    """2 processes (our DDP; DeepSpeed ZeRO-2): the guard's flag all-reduce, the LeCam anchors'
    and the gradient all-reduce run on the device; nothing of ours reads a value on the host.
    DeepSpeed's own optimizer step reads its overflow flag and gradient norm on the host
    (stage_1_and_2.py); those are listed apart and left out of the count."""
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    monkeypatch.setenv("DGM_TEST_SYNCS", str(LOG_EVERY))
    proc = torchrun(["tests/ddp_worker.py", "configs/wgan_gp.yaml", str(tmp_path),
                     *overrides("wgan_gp", ["loss.n_critic=2", "loss.lecam_weight=0.1"]), "trainer.devices=2",
                     f"trainer.strategy={strategy}", f"run.dir={tmp_path / 'run'}"],
                    timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        syncs = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)["syncs"]
        assert {iteration for iteration, _, _ in syncs} <= {1, 2, 4, 5}
        ours = [sync for sync in syncs if f"{os.sep}deepspeed{os.sep}" not in sync[2]]
        assert ours == [], describe(ours)
