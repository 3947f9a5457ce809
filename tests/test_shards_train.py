"""Training on tar shards end to end: the data module streams them, ranks split them, resume
continues the stream exactly, and damaged data is skipped and counted in metrics.csv."""
from pathlib import Path

import pytest
import torch

from helpers import TINY, assert_same_weights, metrics_rows, stop_and_resume, torchrun, workers_stop_inside
from dgm_scale.config import load_config
from dgm_scale.data import DataError
from dgm_scale.data.shards.samples import FAULT_KINDS
from dgm_scale.data.shards.writer import BuildOptions, build_shards
from dgm_scale.training import quiet_lightning, train

SHARDS = ["data.name=shards", "data.resolution=8", "data.channels=1", "data.shuffle_buffer=64"]


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "digits"
    build_shards("builtin:digits", out, BuildOptions(samples_per_shard=200, resolution=8, progress=False))
    return out


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory) -> Path:
    """128 noise images in 8 shards of 16: 2 ranks x 2 workers get 2 shards each, 4 batches of 8,
    so one epoch delivers every sample (no even-ranks cap, no drop_last tail)."""
    import numpy as np

    root = tmp_path_factory.mktemp("even")
    images = np.random.default_rng(0).integers(0, 256, (128, 8, 8), dtype=np.uint8)
    np.savez(root / "noise.npz", x=images)
    build_shards(str(root / "noise.npz"), root / "shards", BuildOptions(samples_per_shard=16, progress=False))
    return root / "shards"


def keys_by_shard(shard_dir: Path) -> dict[str, set[str]]:
    """Each tar's sample keys, read with tarfile (member name up to its first dot)."""
    import tarfile

    shards = {}
    for path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            shards[path.name] = {member.name.split(".", 1)[0] for member in tar.getmembers()}
    return shards


def test_gan_trains_on_shards_with_workers(digit_shards, tmp_path):
    quiet_lightning()
    with workers_stop_inside():
        result = train(load_config("configs/nsgan.yaml", TINY + SHARDS + [
            f"data.path={digit_shards}", "data.num_workers=2", f"run.dir={tmp_path / 'run'}"]))
    assert result.iterations == 3 and result.checkpoint.is_file()
    assert all(torch.isfinite(p).all() for p in result.module.parameters())
    rows = metrics_rows(tmp_path / "run")
    for kind in FAULT_KINDS:  # every fault count is logged, and is 0 on clean shards
        logged = [float(row[f"data/skipped_{kind}"]) for row in rows if row.get(f"data/skipped_{kind}")]
        assert logged and not any(logged), (kind, logged)


def test_resume_on_shards_equals_uninterrupted_run(digit_shards, tmp_path):
    """Stop at iteration 3 and resume: the stream continues after the consumed batches (two
    workers, shuffle buffer), so the weights and every logged loss equal the straight run's."""
    quiet_lightning()
    run = lambda overrides: train(load_config("configs/wgan_gp.yaml", overrides))  # noqa: E731
    common = TINY + SHARDS + [f"data.path={digit_shards}", "data.num_workers=2", "data.batch_size=16",
                              "run.checkpoint_every=3"]
    full, part = stop_and_resume(run, tmp_path, common)
    assert_same_weights(full / "checkpoints" / "last.ckpt", part / "checkpoints" / "last.ckpt")
    assert metrics_rows(full) == metrics_rows(part)


def test_two_ranks_split_the_shards_and_agree(even_shards, tmp_path, monkeypatch):
    """Epoch 0 (8 iterations; 10 run, so it ended): the ranks trained on disjoint keys that
    together are every sample of the tar files, each shard read by one rank; weights agree."""
    monkeypatch.setenv("DGM_TEST_KEYS", "1")  # tests/ddp_worker.py records the consumed keys
    proc = torchrun(["tests/ddp_worker.py", "configs/nsgan.yaml", str(tmp_path), *TINY, *SHARDS,
                     f"data.path={even_shards}", "data.num_workers=2", "trainer.devices=2",
                     "trainer.max_steps=10", f"run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, tensor in rank0["params"].items():
        torch.testing.assert_close(tensor, rank1["params"][name], rtol=0, atol=0, msg=name)
    epoch0 = [[key for epoch, keys in rank["stream_keys"] if epoch == 0 for key in keys] for rank in (rank0, rank1)]
    assert [[epoch for epoch, _ in rank["stream_keys"]] for rank in (rank0, rank1)] == [[0] * 8 + [1] * 2] * 2
    assert [len(keys) for keys in epoch0] == [len(set(keys)) for keys in epoch0] == [64, 64]  # no repeats
    shards = keys_by_shard(even_shards)
    assert set(epoch0[0]).isdisjoint(epoch0[1])
    assert set(epoch0[0]) | set(epoch0[1]) == set().union(*shards.values())
    readers = {name: [r for r in (0, 1) if keys & set(epoch0[r])] for name, keys in shards.items()}
    assert all(len(ranks) == 1 for ranks in readers.values()), readers


# the split shards (uneven per-rank counts) are where a hang would be; resampled under `-m slow`
@pytest.mark.parametrize("mode", [pytest.param(["data.resampled=true", "data.steps_per_epoch=2"],
                                               marks=pytest.mark.slow), []])
def test_two_ranks_cross_epoch_ends_without_hanging(mode, digit_shards, tmp_path):
    """16 iterations at 2 (resampled) or ~6 (split shards, even rank caps) batches per epoch:
    both ranks end every epoch together, or DDP would hang at the first epoch end."""
    proc = torchrun(["tests/ddp_worker.py", "configs/nsgan.yaml", str(tmp_path), *TINY, *SHARDS, *mode,
                     f"data.path={digit_shards}", "data.num_workers=2", "trainer.devices=2", "data.batch_size=64",
                     "trainer.max_steps=16", f"run.dir={tmp_path / 'run'}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epochs = {row["epoch"] for row in metrics_rows(tmp_path / "run")}
    assert len(epochs) >= 2, epochs


def test_damaged_shard_is_skipped_and_counted_or_named_in_strict_mode(digit_shards, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(digit_shards, damaged)
    victim = sorted(damaged.glob("*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[:5000])  # cut inside a member
    quiet_lightning()
    # 60 x 32 samples: more than one epoch of the 1,797 digits, so every shard is read
    common = TINY + SHARDS + [f"data.path={damaged}", "trainer.max_steps=60", "data.batch_size=32",
                              "trainer.log_every=1"]
    result = train(load_config("configs/nsgan.yaml", common + [f"run.dir={tmp_path / 'lenient'}"]))
    assert result.iterations == 60
    rows = metrics_rows(tmp_path / "lenient")
    assert max(float(row.get("data/skipped_bad_shard") or 0) for row in rows) >= 1
    with pytest.raises(DataError, match=victim.name):
        train(load_config("configs/nsgan.yaml", common + ["data.strict=true", f"run.dir={tmp_path / 'strict'}"]))


def test_bad_shard_spec_fails_before_a_run_directory_exists(tmp_path):
    quiet_lightning()
    with pytest.raises(DataError, match="nothing-here"):
        train(load_config("configs/nsgan.yaml", TINY + SHARDS + [f"data.path={tmp_path / 'nothing-here'}",
                                                                  f"run.root={tmp_path / 'runs'}"]))
    assert not (tmp_path / "runs").exists()


def test_shards_made_by_plain_tar_train(tmp_path):
    """Not our writer: `tar` over a folder of .jpg + .json files (img2dataset's layout)."""
    import json
    import shutil
    import subprocess

    import numpy as np
    from PIL import Image

    if shutil.which("tar") is None:
        pytest.skip("no tar binary")
    src = tmp_path / "src"
    src.mkdir()
    generator = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(generator.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(src / f"{i:05d}.jpg")
        (src / f"{i:05d}.json").write_text(json.dumps({"caption": "noise", "label": i % 4}))
    for shard in range(2):  # --sort=name keeps each sample's two files together
        names = [f"{i:05d}.{ext}" for i in range(shard * 20, shard * 20 + 20) for ext in ("jpg", "json")]
        subprocess.run(["tar", "--sort=name", "-cf", str(tmp_path / f"plain-{shard}.tar"), "-C", str(src), *names],
                       check=True)
    quiet_lightning()
    result = train(load_config("configs/nsgan.yaml", TINY + [
        "data.name=shards", f"data.path={tmp_path}/plain-{{0..1}}.tar", "data.channels=3", "data.resolution=8",
        "data.batch_size=4", "data.shuffle_buffer=8", f"run.dir={tmp_path / 'run'}"]))
    assert result.iterations == 3 and result.checkpoint.is_file()
