"""Models learn: an MLP GAN covers the 8-Gaussian ring; the VAE's ELBO rises far above chance."""
import time

import pytest
import torch

from dgm_scale.config import load_config
from dgm_scale.data import DataModule, toy_centers
from dgm_scale.metrics import mode_coverage
from dgm_scale.modules import build_module, load_module
from dgm_scale.training import train


def test_mode_coverage_counts_modes_and_quality():
    centers = toy_centers("ring8")
    torch.manual_seed(0)
    # 1000 samples on 6 of the 8 modes, tight; 1 stray point near mode 7; 200 far-off points.
    on_modes = centers[torch.arange(1000) % 6] + 0.01 * torch.randn(1000, 2)
    stray = centers[7:8] + 0.001
    far = torch.full((200, 2), 10.0)
    score = mode_coverage(torch.cat([on_modes, stray, far]), centers, std=0.02)
    assert score.modes_recovered == 6
    assert score.high_quality_fraction == pytest.approx(1001 / 1201)
    assert score.samples_per_mode[7] == 1


def test_mlp_gan_recovers_the_ring_of_eight_gaussians(configs_dir, tmp_path):
    # Half the config's 2000 steps. Observed at 1000 (4000 samples, sample seeds 0 and 1): run
    # seeds 0, 1, 2, 4 reach 8/8 modes with 81.8-84.9% high quality (seed 0: 82.3%); seed 3
    # collapses to 4-5 modes (33%), so this checks seed 0, not every seed. Margin: 7 points.
    # No evaluation: mode coverage below is this test's measure (KID over 2-D points in the
    # config's evaluation cost several times the training).
    cfg = load_config(configs_dir / "ring8.yaml", [f"run.dir={tmp_path / 'run'}", "trainer.progress_bar=false",
                                                   "trainer.max_steps=1000", "eval.every=0", "eval.at_end=false"])
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    module = load_module(result.checkpoint)
    samples = module.sample(4000, seed=0)
    score = mode_coverage(samples, toy_centers("ring8"), std=cfg.data.toy_std)
    print(f"ring8: {score} in {seconds:.0f} s")
    assert score.modes_recovered == 8
    assert score.high_quality_fraction > 0.75


def validation_elbo(module, datamodule) -> float:
    torch.manual_seed(0)
    module.eval()
    with torch.no_grad():
        values = [module.elbo(images)["elbo"] * images.shape[0] for images, _ in datamodule.val_dataloader()]
    return float(sum(values) / len(datamodule.val_set))


def test_vae_elbo_improves_far_beyond_the_untrained_model(configs_dir, tmp_path):
    cfg = load_config(configs_dir / "vae.yaml", [f"run.dir={tmp_path / 'run'}", "trainer.max_steps=400",
                                                 "trainer.progress_bar=false"])
    datamodule = DataModule(cfg.data)
    datamodule.setup("fit")
    untrained = validation_elbo(build_module(cfg), datamodule)
    result = train(cfg)
    trained = validation_elbo(load_module(result.checkpoint), datamodule)
    print(f"VAE validation ELBO (nats/image): untrained {untrained:.1f}, trained {trained:.1f}")
    # 256 pixels: the untrained decoder is ~ -180 nats (uniform guesses); trained well above.
    assert trained > untrained + 50
