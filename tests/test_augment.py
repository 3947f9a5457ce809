"""GAN quality: augmentation of what D sees (DiffAugment, ADA), R1 and LeCam, StyleGAN2."""
import math

import pytest
import torch

from dgm_scale.augment import AdaptiveProbability, Augmenter
from dgm_scale.augment import ada as ada_ops
from dgm_scale.augment import diffaugment
from dgm_scale.config import ConfigError, load_config
from dgm_scale.data import DataModule
from dgm_scale.losses.regularizers import lecam_penalty, r1_penalty
from dgm_scale.modules import build_module
from dgm_scale.training import train
from helpers import TINY, torchrun

DIFF_OPS = [diffaugment.brightness, diffaugment.saturation, diffaugment.contrast, diffaugment.translation,
            diffaugment.cutout]


@pytest.mark.parametrize("op", DIFF_OPS, ids=lambda op: op.__name__)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_diffaugment_op_is_differentiable(op, channels):
    torch.manual_seed(0)
    x = torch.randn(2, channels, 8, 8, dtype=torch.float64, requires_grad=True)
    u = torch.rand(2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda images: op(images, u), (x,))


@pytest.mark.parametrize("name", list(ada_ops.OPS))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_ada_op_is_differentiable_and_the_identity_at_p0(name, channels):
    torch.manual_seed(1)
    x = torch.randn(3, channels, 8, 8, dtype=torch.float64, requires_grad=True)
    u = torch.rand(3, ada_ops.uniforms_needed([name]), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda images: ada_ops.ada_augment(images, [name], 0.7, u), (x,))
    assert torch.equal(ada_ops.ada_augment(x, [name], 0.0, u), x)
    draws = ada_ops.OPS[name][1]
    changing = {"xflip": 0.2, "rotate90": 0.6, "translation": 0.9, "color": 0.9, "cutout": 0.5}[name]
    u[:, draws:] = changing  # parameters that change every image (p = 1: every op applies)
    assert not torch.equal(ada_ops.ada_augment(x, [name], 1.0, u), x)


def test_diffaugment_ops_do_what_they_say():
    x = torch.arange(64.0).view(1, 1, 8, 8)
    shifted = diffaugment.integer_shift(x, torch.tensor([1]), torch.tensor([-2]))
    assert shifted[0, 0, 1, 0] == x[0, 0, 0, 2] and shifted[0, 0, 0].abs().sum() == 0  # row 0 uncovered
    holes = diffaugment.cutout(torch.ones(4, 1, 8, 8), torch.rand(4, 2))
    assert ((holes == 0).sum(dim=(1, 2, 3)) <= 16).all() and ((holes == 0).sum(dim=(1, 2, 3)) >= 8).all()
    rotated = ada_ops.rotate90(x, torch.tensor([True]), torch.tensor([[0.3]]))  # k = 1
    assert torch.equal(rotated, torch.rot90(x, 1, dims=(2, 3)))


def memorising_critic(training: torch.Tensor):
    """+1 for an image equal to a training image (as stored), -1 for anything else."""
    def critic(images: torch.Tensor) -> torch.Tensor:
        distances = torch.cdist(images.flatten(1), training.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
        return torch.where(distances.min(dim=1).values < 1e-6, 1.0, -1.0)
    return critic


def test_ada_raises_p_against_a_memorising_d_until_rt_reaches_the_target():
    """A D that memorised the reals says +1 to every un-augmented real (r_t = 1 > 0.6): p rises
    until enough reals are augmented beyond recognition that r_t sits at the target."""
    torch.manual_seed(0)
    reals = torch.rand(64, 1, 8, 8) * 2 - 1
    critic = memorising_critic(reals)
    ada = AdaptiveProbability(target=0.6, speed_images=20_000, interval=4)
    augmenter = Augmenter([], ["xflip", "rotate90", "translation"], ada)
    history = []
    for step in range(2000):
        u = torch.rand(64, augmenter.uniforms, generator=torch.Generator().manual_seed(step))
        augmenter.accumulate(critic(augmenter(reals, u)))
        if augmenter.adjust(lambda t: t):
            history.append((float(ada.p), float(ada.last_rt)))
    assert history[0] == (pytest.approx(256 / 20_000), 1.0)  # first adjustment: r_t = 1, p up one step
    # Equilibrium: r_t = 1 - 2 P(a real is changed) = 0.6, where a real stays as it is unless
    # flipped (p / 2), rotated by a non-zero quarter (3p / 4) or shifted by a non-zero step (3p / 4
    # at 8 px: each of dy, dx is 0 for half the uniforms).
    unchanged = lambda p: (1 - p / 2) * (1 - 3 * p / 4) ** 2  # noqa: E731
    lo, hi = 0.0, 1.0
    for _ in range(60):
        lo, hi = ((lo + hi) / 2, hi) if unchanged((lo + hi) / 2) > 0.8 else (lo, (lo + hi) / 2)
    late = history[len(history) // 2:]
    assert sum(p for p, _ in late) / len(late) == pytest.approx(lo, rel=0.2)
    assert abs(sum(rt for _, rt in late) / len(late) - 0.6) < 0.05


def test_ada_lowers_p_when_d_does_not_overfit():
    ada = AdaptiveProbability(target=0.6, speed_images=10_000, interval=2, initial_p=0.5)
    for step in range(40):  # a D as sure of fakes as of reals: sign(D(real)) averages 0
        ada.accumulate(torch.tensor([1.0, -1.0, -1.0, 1.0]) * (1 if step % 2 else -1))
        ada.adjust(lambda t: t)
    assert float(ada.p) == pytest.approx(0.5 - 20 * 8 / 10_000) and float(ada.last_rt) == 0.0
    fixed = AdaptiveProbability(target=0.6, speed_images=0, interval=1, initial_p=0.3)  # ada_kimg=0: p stays
    fixed.accumulate(torch.ones(4))
    fixed.adjust(lambda t: t)
    assert float(fixed.p) == 0.3


def test_r1_of_a_linear_critic_is_the_squared_weight_norm():
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1))
    real = torch.randn(5, 1, 4, 4)
    expected = critic[1].weight.square().sum()
    torch.testing.assert_close(r1_penalty(critic, real), expected)
    torch.testing.assert_close(r1_penalty(critic, real, grad_scale=1024.0), expected)  # fp16 loss scale undone
    assert r1_penalty(critic, real).requires_grad  # differentiable w.r.t. D's weights


def test_lecam_is_the_distance_of_each_side_to_the_other_sides_anchor():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0])
    value = lecam_penalty(real, fake, real_anchor=torch.tensor(2.0), fake_anchor=torch.tensor(-1.0))
    assert float(value) == pytest.approx(((2 ** 2 + 4 ** 2) / 2) + ((4 ** 2 + 2 ** 2) / 2))


def _regularisers(overrides: list[str]) -> list[float]:
    """The regularisation term `_regularise` adds at D steps 0..3 of a fixed D and real batch."""
    torch.manual_seed(0)
    module = build_module(load_config(overrides=TINY + ["model.discriminator.norm=none"] + overrides))
    real, fake = torch.rand(4, 1, 8, 8) * 2 - 1, torch.rand(4, 1, 8, 8) * 2 - 1
    zero = torch.zeros(())
    return [float(module._regularise(zero, {}, real, fake, zero.expand(4), zero.expand(4), None, None, step)[0].detach())
            for step in range(4)]


def test_lazy_r1_weights_each_k_th_step_by_k_so_its_expectation_is_the_per_step_penalty():
    every_step = _regularisers(["loss.r1_gamma=0.5"])
    lazy = _regularisers(["loss.r1_gamma=0.5", "loss.r1_interval=4"])
    assert lazy[1:] == [0.0, 0.0, 0.0] and lazy[0] > 0
    assert every_step == pytest.approx([every_step[0]] * 4)  # same D, same images: the same penalty
    assert sum(lazy) == pytest.approx(sum(every_step), rel=1e-6)


@pytest.mark.parametrize("resolution", [16, 32])
@pytest.mark.parametrize("classes", [0, 10])
def test_stylegan2_networks_forward_and_backward(resolution, classes):
    cfg = load_config(overrides=["model.generator.arch=stylegan2", "model.discriminator.arch=stylegan2",
                                 "model.generator.width=8", "model.discriminator.width=8", "model.generator.depth=2",
                                 f"data.resolution={resolution}", f"model.num_classes={classes}", "data.channels=3"])
    module = build_module(cfg)
    labels = torch.arange(6) % classes if classes else None
    z = torch.randn(6, module.latent_dim)
    images = module.generator(z, labels)
    assert images.shape == (6, 3, resolution, resolution) and images.abs().max() <= 1
    logits = module.discriminator(images, labels)
    assert logits.shape == (6, 1)
    (logits.sum() + images.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.generator.parameters())
    assert all(p.grad is not None for p in module.discriminator.parameters())
    # noise inputs keyed to each sample: a sample is the same in any batch
    torch.testing.assert_close(module.generator(z[:2], labels[:2] if classes else None), images[:2].detach())


def test_bad_gan_quality_settings_are_named():
    for override, key in (("aug.policy=[zoom]", "aug.policy"), ("aug.ada_ops=[hue]", "aug.ada_ops"),
                          ("aug.ada_p=1.5", "aug.ada_p"), ("aug.ada_p=-0.1", "aug.ada_p"),
                          ("loss.r1_gamma=-1", "loss.r1_gamma"), ("loss.r1_interval=0", "loss.r1_interval"),
                          ("loss.lecam_weight=-1", "loss.lecam_weight")):
        with pytest.raises(ConfigError, match=key):
            load_config(overrides=[override])
    sg2 = ["model.generator.arch=stylegan2", "model.discriminator.arch=stylegan2"]
    with pytest.raises(ConfigError, match="'data.resolution' must be a power of two in \\[8, 256\\], got 12"):
        load_config(overrides=sg2 + ["data.resolution=12"])
    with pytest.raises(ConfigError, match="'model.discriminator.spectral_norm': stylegan2"):
        load_config(overrides=sg2 + ["model.discriminator.spectral_norm=true"])
    with pytest.raises(ConfigError, match="'aug': augmentation is for images"):
        load_config("configs/ring8.yaml", ["aug.policy=[cutout]"])


def test_a_fixed_subset_of_the_training_data():
    whole = DataModule(load_config().data)
    whole.setup("fit")
    tenth = DataModule(load_config(overrides=["data.subset=0.1"]).data)
    tenth.setup("fit")
    assert len(tenth.train_set) == round(len(whole.train_set) * 0.1) and tenth.num_classes == 10
    again = DataModule(load_config(overrides=["data.subset=0.1", "run.seed=5"]).data)
    again.setup("fit")
    assert torch.equal(tenth.train_set[3][0], again.train_set[3][0])  # the same images whatever the seed
    assert len(tenth.val_set) == len(whole.val_set)


AUGMENTED = TINY + ["aug.policy=[color,translation,cutout]", "aug.ada=true", "aug.ada_kimg=1", "aug.ada_p=0.5",
                    "aug.ada_interval=1", "loss.r1_gamma=0.1", "loss.r1_interval=2", "loss.lecam_weight=0.1",
                    "model.discriminator.norm=layer"]


def test_augmented_regularised_training_logs_p_and_rt(tmp_path):
    result = train(load_config(overrides=AUGMENTED + ["trainer.max_steps=4", f"run.dir={tmp_path / 'run'}"]))
    module = result.module
    p, rt = float(module.augmenter.ada.p), float(module.augmenter.ada.last_rt)
    assert p == pytest.approx(0.5 + math.copysign(8 / 1000, rt - 0.6) * 4)  # 4 adjustments of 8 reals (here r_t
    # had the same side of the target each time: a fresh D's outputs barely move in 4 steps)
    header = (result.run_dir / "metrics.csv").read_text().splitlines()[0]
    assert {"aug/p", "aug/rt", "train/r1", "train/lecam"} <= set(header.split(","))
    checkpoint = torch.load(result.checkpoint, weights_only=True)["state_dict"]
    assert float(checkpoint["augmenter.ada.p"]) == float(module.augmenter.ada.p)
    assert "lecam.real" in checkpoint


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_two_ranks_stay_identical_with_augmentation_and_regularisers(strategy, tmp_path):
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    proc = torchrun(["tests/ddp_worker.py", "configs/nsgan.yaml", str(tmp_path), *AUGMENTED, "trainer.devices=2",
                     f"trainer.strategy={strategy}", f"run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # weights, p and r_t statistics, LeCam anchors (batch-norm statistics are each rank's own)
    shared = {**rank0["params"], **{k: v for k, v in rank0["buffers"].items() if k.startswith(("augmenter", "lecam"))}}
    assert len(shared) > len(rank0["params"])
    for name, tensor in shared.items():
        other = {**rank1["params"], **rank1["buffers"]}[name]
        torch.testing.assert_close(tensor, other, rtol=0, atol=0, msg=name)
    assert float(rank0["buffers"]["augmenter.ada.p"]) > 0
