"""Every variant trains end to end on CPU; checkpoints reload; sampling is reproducible."""
import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from helpers import TINY_TRAIN, adapt, train_computing
from dgm_scale.cli import main
from dgm_scale.config import load_config
from dgm_scale.modules import build_module, load_module
from dgm_scale.training import train

VARIANTS = ["gan", "nsgan", "lsgan", "wgan", "wgan_gp", "hinge", "vae"]


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_checkpoints_and_samples_reproducibly(variant, configs_dir, tmp_path):
    cfg = load_config(configs_dir / f"{variant}.yaml", adapt(configs_dir / f"{variant}.yaml", TINY_TRAIN + [f"run.dir={tmp_path / 'run'}"]))
    result = train(cfg)
    assert result.iterations == 4
    run_dir = result.run_dir
    assert (run_dir / "config.yaml").read_text().count("max_steps: 4") == 1
    rows = read_metrics(run_dir)
    loss_key = "train/g_loss" if variant != "vae" else "train/elbo"
    losses = [float(row[loss_key]) for row in rows if row.get(loss_key)]
    assert len(losses) == 4 and all(math.isfinite(value) for value in losses)
    assert [float(row["train/iteration"]) for row in rows if row.get(loss_key)] == [1, 2, 3, 4]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["iter_0000002.ckpt", "iter_0000004.ckpt", "last.ckpt"]
    assert {"iter_0000002.png", "iter_0000004.png", "final.png", "latest.png"} <= {p.name for p in (run_dir / "samples").iterdir()}

    module = load_module(run_dir / "checkpoints" / "last.ckpt")
    first, second = module.sample(6, seed=3), module.sample(6, seed=3)
    assert first.shape == (6, 1, 8, 8)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.equal(first, module.sample(6, seed=4))
    # The reloaded network is the trained one, bit for bit, and not a fresh initialisation.
    trained = result.module.state_dict()
    assert module.state_dict().keys() == trained.keys()
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0, msg=name)
    L.seed_everything(cfg.run.seed, verbose=False)  # as train() does before building the module
    fresh = build_module(cfg)
    for name, network in fresh.networks().items():  # its parameters (batch-norm statistics move without a step)
        initial = dict(network.named_parameters())
        assert any(not torch.equal(p, initial[key]) for key, p in module.networks()[name].named_parameters()), name


def test_critic_takes_n_critic_batches_per_generator_step(configs_dir, tmp_path):
    cfg = load_config(configs_dir / "wgan.yaml", TINY_TRAIN + [f"run.dir={tmp_path / 'run'}", "trainer.max_steps=2"])
    result = train(cfg)
    ckpt = torch.load(result.checkpoint, weights_only=True)
    assert ckpt["global_step"] == 2 * (5 + 1)  # Lightning counts each optimizer step
    d_steps = ckpt["optimizer_states"][1]["state"][0]["step"]
    g_steps = ckpt["optimizer_states"][0]["state"][0]["step"]
    assert (int(d_steps), int(g_steps)) == (10, 2)
    # WGAN weight clipping holds after training.
    module = load_module(result.checkpoint)
    assert max(p.abs().max().item() for p in module.discriminator.parameters()) <= 0.01 + 1e-7


def test_existing_run_dir_is_never_overwritten(configs_dir, tmp_path, capsys):
    args = ["train", *TINY_TRAIN, "trainer.max_steps=1", f"run.dir={tmp_path / 'run'}"]
    assert main(args) == 0
    before = (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes()
    assert main(args) == 2
    assert "run.dir" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes() == before


def test_sample_command_writes_a_grid(configs_dir, tmp_path, capsys):
    assert main(["train", str(configs_dir / "nsgan.yaml"), *TINY_TRAIN, f"run.dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    assert "4 iterations" in out and "samples/s" in out and str(tmp_path / "run") in out
    grid = tmp_path / "grid.png"
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert main(["sample", ckpt, "--num", "9", "--out", str(grid), "--seed", "1"]) == 0
    first = grid.read_bytes()
    assert main(["sample", ckpt, "--num", "9", "--out", str(grid), "--seed", "1"]) == 0
    assert grid.read_bytes() == first
    image = Image.open(grid)
    assert image.size == (8 * (3 * 8 + 4 * 2),) * 2  # 3x3 tiles of 8 px, 2 px padding, enlarged 8x
    assert main(["sample", str(tmp_path / "missing.ckpt")]) == 2


def test_trains_on_an_image_folder_in_rgb(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(20):
            pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{index}.png")
    cfg = load_config(overrides=TINY_TRAIN + ["data.name=folder", f"data.path={tmp_path / 'images'}", "data.channels=3",
                                        "data.hflip=true", "data.batch_size=8", "trainer.max_steps=2",
                                        f"run.dir={tmp_path / 'run'}"])
    result = train(cfg)
    assert load_module(result.checkpoint).sample(4, seed=0).shape == (4, 3, 8, 8)


def test_class_conditional_gan_trains_and_samples_per_class(tmp_path):
    cfg = load_config(overrides=TINY_TRAIN + ["model.num_classes=10", "trainer.max_steps=2", f"run.dir={tmp_path / 'run'}"])
    module = load_module(train(cfg).checkpoint)
    same_z_class_0 = module.sample(2, seed=0, labels=torch.tensor([0, 0]))
    same_z_class_5 = module.sample(2, seed=0, labels=torch.tensor([5, 5]))
    assert not torch.equal(same_z_class_0, same_z_class_5)


@pytest.mark.parametrize("variant", ["wgan_gp", "vae"])
def test_bf16_mixed_precision_trains_on_cpu(variant, configs_dir, tmp_path):
    """bf16 autocast (the layers compute in bf16), finite losses that are not the fp32 run's."""
    path = configs_dir / f"{variant}.yaml"
    loss_key = "train/g_loss" if variant != "vae" else "train/elbo"
    runs, losses, computed = {}, {}, {}
    for precision in ("32-true", "bf16-mixed"):
        runs[precision], computed[precision] = train_computing(path, adapt(path, TINY_TRAIN + [
            f"trainer.precision={precision}", "trainer.accelerator=cpu", f"run.dir={tmp_path / precision}"]))
        losses[precision] = [float(row[loss_key]) for row in read_metrics(runs[precision].run_dir) if row.get(loss_key)]
    result = runs["bf16-mixed"]
    assert computed == {"32-true": {"float32"}, "bf16-mixed": {"bfloat16"}}
    assert len(losses["bf16-mixed"]) == 4 and all(math.isfinite(value) for value in losses["bf16-mixed"])
    assert all(a != b for a, b in zip(losses["bf16-mixed"], losses["32-true"], strict=True))
    if variant == "wgan_gp":
        penalties = [float(row["train/gradient_penalty"]) for row in read_metrics(result.run_dir) if row.get("train/gradient_penalty")]
        assert penalties and all(math.isfinite(value) for value in penalties)
    # Weights stay float32 (mixed precision computes in bf16, keeps master weights in fp32).
    assert all(p.dtype == torch.float32 for p in load_module(result.checkpoint).parameters())


def test_trains_with_loader_worker_processes(tmp_path):
    cfg = load_config(overrides=TINY_TRAIN + ["data.num_workers=2", "data.hflip=true", f"run.dir={tmp_path / 'run'}"])
    assert train(cfg).iterations == 4


def test_torch_compile_trains_like_eager_and_checkpoints_plain_keys(configs_dir, tmp_path):
    """trainer.compile: compiled forwards (the gradient penalty eager: double backward), the same
    losses as the eager run to float tolerance, and plain network keys in the checkpoint."""
    runs = {}
    for compile_ in (False, True):
        cfg = load_config(configs_dir / "wgan_gp.yaml", TINY_TRAIN + ["trainer.max_steps=3", f"trainer.compile={compile_}",
                                                                      f"run.dir={tmp_path / str(compile_)}"])
        runs[compile_] = train(cfg)
    eager, compiled = (read_metrics(runs[c].run_dir) for c in (False, True))
    for key in ("train/d_loss", "train/g_loss", "train/gradient_penalty"):
        for a, b in zip(eager, compiled, strict=True):
            assert math.isclose(float(a[key]), float(b[key]), rel_tol=1e-3, abs_tol=1e-4), key
    state = torch.load(runs[True].checkpoint, weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in state)
    assert "_compiled_networks" in runs[True].module.__dict__
