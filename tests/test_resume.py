"""Resume: a run stopped and continued from its checkpoint equals the uninterrupted run."""
from pathlib import Path

import pytest
from torch.utils.data import DistributedSampler

from helpers import TINY, adapt, assert_same_weights, metrics_rows, stop_and_resume, torchrun
from dgm_scale.config import ConfigError, load_config
from dgm_scale.data import ResumableDistributedSampler
from dgm_scale.training import quiet_lightning, train

# Large batches so that the 6 iterations cross epoch boundaries (digits: 1,617 training images).
EPOCHS = {"wgan_gp": ["data.batch_size=128"], "vae": ["data.batch_size=512"], "nsgan": ["data.batch_size=512"]}


# wgan_gp stops at iteration 3 inside its second epoch, between checkpoints (every 5): only the
# last.ckpt written as the run reached max_steps holds its place
@pytest.mark.parametrize("variant, every", [("wgan_gp", 5), ("vae", 3)])
def test_resume_equals_uninterrupted_run(variant, every, tmp_path):
    quiet_lightning()
    run = lambda overrides: train(load_config(f"configs/{variant}.yaml", adapt(f"configs/{variant}.yaml", overrides)))  # noqa: E731
    full, part = stop_and_resume(run, tmp_path, TINY + EPOCHS[variant] + [f"run.checkpoint_every={every}"])
    assert_same_weights(full / "checkpoints" / "last.ckpt", part / "checkpoints" / "last.ckpt")
    assert metrics_rows(full) == metrics_rows(part)  # every logged loss, before and after the resume
    assert len({row["epoch"] for row in metrics_rows(full)}) >= 2  # the stop or the rest crossed an epoch end


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_random_flips_and_workers_equals_uninterrupted_run(workers, tmp_path):
    """data.hflip: the flips are keyed to (seed, epoch, index), so the batches after a resume
    are flipped exactly as in the straight run (with the global RNG they were not). With loader
    workers, whose iterator Lightning starts before on_train_start, the sampler must already
    stand at the restored position when the loader is built. Epochs end within the 6 iterations."""
    quiet_lightning()
    run = lambda overrides: train(load_config("configs/wgan_gp.yaml", overrides))  # noqa: E731
    common = TINY + EPOCHS["wgan_gp"] + ["data.hflip=true", f"data.num_workers={workers}", "run.checkpoint_every=3"]
    full, part = stop_and_resume(run, tmp_path, common)
    assert_same_weights(full / "checkpoints" / "last.ckpt", part / "checkpoints" / "last.ckpt")
    assert metrics_rows(full) == metrics_rows(part)
    assert len({row["epoch"] for row in metrics_rows(full)}) >= 2


def _torchrun_train(out: Path):
    def run(overrides: list[str]) -> None:
        proc = torchrun(["tests/ddp_worker.py", overrides[0], str(out), *overrides[1:]])
        assert proc.returncode == 0, proc.stderr[-3000:]
    return run


# Both are also covered, killed, in test_kill_resume.py (DDP at random, DeepSpeed while writing its
# sharded checkpoint): here under `-m slow`
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_two_process_resume_gives_the_same_next_steps(strategy, tmp_path):
    """2 CPU processes, WGAN-GP: stop at iteration 3, resume; the losses of iterations 4-6 and
    the final weights equal the uninterrupted run's (DeepSpeed: its ZeRO-2 partitions of both
    engines were saved and restored)."""
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    common = ["configs/wgan_gp.yaml", *TINY, *EPOCHS["wgan_gp"], "run.checkpoint_every=3", "trainer.devices=2",
              f"trainer.strategy={strategy}"]
    full, part = stop_and_resume(_torchrun_train(tmp_path), tmp_path, common)
    assert [row["train/iteration"] for row in metrics_rows(part)] == ["1.0", "2.0", "3.0", "4.0", "5.0", "6.0"]
    assert metrics_rows(full) == metrics_rows(part)
    assert_same_weights(full / "checkpoints" / "last.ckpt", part / "checkpoints" / "last.ckpt")


def test_sampler_without_resume_is_torchs_distributed_sampler():
    data = list(range(103))
    for rank in range(3):
        ours = ResumableDistributedSampler(data, num_replicas=3, rank=rank, seed=5)
        torchs = DistributedSampler(data, num_replicas=3, rank=rank, seed=5)
        for epoch in (0, 1):
            ours.set_epoch(epoch), torchs.set_epoch(epoch)
            assert list(ours) == list(torchs) and len(ours) == len(torchs)


@pytest.mark.parametrize("new_world", [2, 3])
def test_resumed_epoch_reads_every_sample_once_even_with_another_world_size(new_world):
    data, batch = list(range(100)), 4
    # 2 ranks consumed 5 batches each of epoch 1 before the stop.
    consumed = []
    for rank in range(2):
        sampler = ResumableDistributedSampler(data, num_replicas=2, rank=rank, seed=0)
        sampler.set_epoch(1)
        consumed += list(sampler)[:5 * batch]
    rest = []
    for rank in range(new_world):
        sampler = ResumableDistributedSampler(data, num_replicas=new_world, rank=rank, seed=0)
        sampler.resume(epoch=1, consumed=len(consumed))
        sampler.set_epoch(1)
        rest += list(sampler)
        # It yields the rest of the epoch; its length stays the whole epoch's share, because
        # Lightning counts the batches restored from the checkpoint as part of the epoch.
        assert len(list(sampler)) == -(-(len(data) - len(consumed)) // new_world)
        assert len(sampler) == -(-len(data) // new_world)
    seen = consumed + rest
    assert sorted(set(seen)) == data  # none lost
    assert len(seen) - len(data) < new_world  # repeated: only the padding that evens out the ranks
    sampler.set_epoch(2)  # the next epoch is whole again
    assert len(sampler) == -(-len(data) // new_world)


def test_resume_errors_name_the_key(tmp_path):
    quiet_lightning()
    with pytest.raises(ConfigError, match="run.resume.*does not exist"):
        train(load_config("configs/nsgan.yaml", TINY + [f"resume={tmp_path / 'missing.ckpt'}"]))
    with pytest.raises(ConfigError, match="run.resume.*'auto' needs run.dir"):
        train(load_config("configs/nsgan.yaml", TINY + ["resume=auto", f"run.root={tmp_path}"]))
    result = train(load_config("configs/nsgan.yaml", TINY + [f"run.dir={tmp_path / 'run'}"]))
    with pytest.raises(ConfigError, match="model.latent_dim.*trained with 8, this config has 16"):
        train(load_config("configs/nsgan.yaml", TINY + ["model.latent_dim=16", f"resume={result.checkpoint}"]))
    # resume=auto in a directory without checkpoints starts fresh
    fresh = train(load_config("configs/nsgan.yaml", TINY + ["resume=auto", f"run.dir={tmp_path / 'new'}"]))
    assert fresh.iterations == 3
