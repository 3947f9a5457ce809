"""Checkpoint hygiene: keep the newest K iteration checkpoints; every checkpoint loads weights_only."""
from pathlib import Path

import pytest
import torch

from helpers import TINY
from dgm_scale.config import load_config
from dgm_scale.tracking.callbacks import prune_iteration_checkpoints
from dgm_scale.training import train


def names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_prune_keeps_the_newest_k_and_never_last_or_best(tmp_path):
    others = ["last.ckpt", "best.ckpt", "best.json", ".last.ckpt.tmp", "iter_notanumber.ckpt"]
    for name in [f"iter_{i:07d}.ckpt" for i in (2, 4, 10, 12, 100)] + others:
        (tmp_path / name).write_bytes(b"x")
    assert prune_iteration_checkpoints(tmp_path, 0) == []
    deleted = prune_iteration_checkpoints(tmp_path, 2)
    assert sorted(path.name for path in deleted) == ["iter_0000002.ckpt", "iter_0000004.ckpt", "iter_0000010.ckpt"]
    assert names(tmp_path) == sorted(["iter_0000012.ckpt", "iter_0000100.ckpt"] + others)


@pytest.mark.parametrize("keep, kept", [(2, [5, 6]), (0, [1, 2, 3, 4, 5, 6])])
def test_training_keeps_the_newest_iteration_checkpoints(keep, kept, tmp_path):
    train(load_config("configs/nsgan.yaml", TINY + ["trainer.max_steps=6", "run.checkpoint_every=1",
                                                    f"run.keep_checkpoints={keep}", f"run.dir={tmp_path}"]))
    assert names(tmp_path / "checkpoints") == [f"iter_{i:07d}.ckpt" for i in kept] + ["last.ckpt"]


def test_fp16_checkpoint_loads_weights_only(tmp_path):
    """The loss scalers' states are plain numbers: the checkpoint needs no pickled objects. And
    the scaler's own overflow skips (the gradient penalty overflows fp16 at first) are not
    NaN-guard events: the run trains through them under trainer.nonfinite=stop."""
    result = train(load_config("configs/wgan_gp.yaml", TINY + ["trainer.precision=16-mixed", f"run.dir={tmp_path}"]))
    checkpoint = torch.load(result.checkpoint, weights_only=True)
    scalers = checkpoint["PerOptimizerScaledPrecision"]["scalers"]
    assert len(scalers) == 2 and scalers[1]["scale"] < 2.0 ** 16  # D's scaler did skip steps
    assert result.iterations == 3 and checkpoint["nonfinite_skips"] == 0
