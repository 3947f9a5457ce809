"""Mixed precision: fp16 with one loss scaler per network, the gradient penalty under scaling."""
import csv

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers import TINY, adapt, torchrun, train_computing
from dgm_scale.distributed.precision import PerOptimizerScaledPrecision
from dgm_scale.losses import gradient_penalty
from dgm_scale.training import quiet_lightning


def test_gradient_penalty_does_not_depend_on_the_loss_scale():
    torch.manual_seed(0)
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    real, fake, mix = torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4), torch.rand(6)
    grads = {}
    for scale in (1.0, 4096.0):
        critic.zero_grad()
        penalty = gradient_penalty(critic, real, fake, mix=mix, grad_scale=scale)
        (penalty * scale).backward()  # as the scaler does with the critic's loss
        # (the last bias gets no gradient: the penalty does not depend on it)
        grads[scale] = [p.grad / scale for p in critic.parameters() if p.grad is not None]
        torch.testing.assert_close(penalty, gradient_penalty(critic, real, fake, mix=mix))
    assert len(grads[1.0]) == len(grads[4096.0]) == 3
    for unscaled, reference in zip(grads[4096.0], grads[1.0]):
        torch.testing.assert_close(unscaled, reference, rtol=1e-5, atol=1e-7)


class TwoNetworks(L.LightningModule):
    """Two networks, two optimizers; network A's loss overflows in the first step."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net_a, self.net_b = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net_a.parameters(), lr=0.1), torch.optim.SGD(self.net_b.parameters(), lr=0.1)]

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        self.manual_backward(self.net_a(batch[0]).sum() * float("inf"), opt_a)
        opt_a.step()
        # a small fp32 loss (as in our modules): its scaled gradients fit fp16 (max 65,504)
        self.manual_backward(self.net_b(batch[0]).float().mean() * 0.1, opt_b)
        opt_b.step()

    def backward(self, loss, *args, **kwargs):  # as GenerativeModule: the optimizer is for the strategy
        loss.backward()


def _fit_one_step(module, plugin):
    data = DataLoader(TensorDataset(torch.full((4, 3), 0.01)), batch_size=2)  # small: B's scaled grads fit fp16
    trainer = L.Trainer(accelerator="cpu", plugins=[plugin], max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    return trainer


def test_an_overflow_skips_and_backs_off_only_that_networks_step():
    torch.manual_seed(0)
    module = TwoNetworks()
    before_a, before_b = module.net_a.weight.detach().clone(), module.net_b.weight.detach().clone()
    plugin = PerOptimizerScaledPrecision("cpu")
    _fit_one_step(module, plugin)
    assert torch.equal(module.net_a.weight, before_a)  # A's step was skipped
    assert not torch.equal(module.net_b.weight, before_b)  # B's was not
    assert [scaler.get_scale() for scaler in plugin.scalers] == [65536.0 / 2, 65536.0]  # only A backed off
    # a checkpoint restores each scaler into its own optimizer's slot
    restored = PerOptimizerScaledPrecision("cpu")
    restored.load_state_dict(plugin.state_dict())
    restored.connect(module, list(module.configure_optimizers()), [])
    assert [scaler.get_scale() for scaler in restored.scalers] == [65536.0 / 2, 65536.0]


def _losses(run_dir, keys=("train/d_loss", "train/gradient_penalty", "train/d_grad_norm")):
    with open(run_dir / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/iteration")]
    return torch.tensor([[float(row[k]) for k in keys] for row in rows])


def test_fp16_wgan_gp_tracks_fp32_on_cpu(tmp_path):
    """True fp16 autocast on CPU (Lightning would silently switch 16-mixed to bf16 there): WGAN-GP
    stays finite and its penalty and gradient norms stay within fp16 error of the fp32 run."""
    quiet_lightning()
    common = TINY + ["trainer.max_steps=8", "trainer.log_every=1"]
    runs, computed = {}, {}
    for prec in ("32-true", "16-mixed"):
        runs[prec], computed[prec] = train_computing("configs/wgan_gp.yaml", common + [f"trainer.precision={prec}",
                                                                                        f"run.dir={tmp_path / prec}"])
    assert computed == {"32-true": {"float32"}, "16-mixed": {"float16"}}
    assert isinstance(runs["16-mixed"].module.trainer.precision_plugin, PerOptimizerScaledPrecision)
    fp32, fp16 = _losses(tmp_path / "32-true"), _losses(tmp_path / "16-mixed")
    assert torch.isfinite(fp16).all() and fp16.shape == fp32.shape == (8, 3)
    torch.testing.assert_close(fp16[:, 1:], fp32[:, 1:], rtol=0.05, atol=1e-3)  # penalty, D gradient norm
    assert (fp16 != fp32).all()  # but not the fp32 run: fp16 rounding in every logged value
    checkpoint = torch.load(runs["16-mixed"].checkpoint, weights_only=True)
    assert len(checkpoint["PerOptimizerScaledPrecision"]["scalers"]) == 2  # G's and D's
    scales = _losses(tmp_path / "16-mixed", ("train/loss_scale_g", "train/loss_scale_d"))  # logged, each its own
    assert (scales > 0).all() and scales.shape == (8, 2)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_r1_under_mixed_precision_tracks_fp32(precision, tmp_path):
    """R1 (every step) is taken of the loss-scaled output under fp16 (per-network scaler) and
    unscaled in float32; under bf16 its norms are float32 too: the penalty follows the fp32 run."""
    quiet_lightning()
    common = TINY + ["trainer.max_steps=6", "trainer.log_every=1", "loss.r1_gamma=1.0", "model.discriminator.norm=layer",
                     "trainer.accelerator=cpu"]
    keys = ("train/r1", "train/d_grad_norm")
    computed = {prec: train_computing("configs/nsgan.yaml", common + [f"trainer.precision={prec}",
                                                                      f"run.dir={tmp_path / prec}"])[1]
                for prec in ("32-true", precision)}
    assert computed == {"32-true": {"float32"}, precision: {"float16" if precision == "16-mixed" else "bfloat16"}}
    fp32, mixed = _losses(tmp_path / "32-true", keys), _losses(tmp_path / precision, keys)
    assert torch.isfinite(fp32).all() and (fp32[:, 0] > 0).all()
    # fp16: the first step's scaled gradient overflows at the initial scale (65536) and the
    # scaler skips it (its NaN is logged, not counted as a guard skip); after that it follows fp32.
    first = 1 if precision == "16-mixed" and not torch.isfinite(mixed[0]).all() else 0
    assert torch.isfinite(mixed[first:]).all()
    torch.testing.assert_close(mixed[first:], fp32[first:], rtol=0.05 if precision == "16-mixed" else 0.1, atol=1e-7)
    assert (mixed[first:] != fp32[first:]).all()  # but not the fp32 run: its rounding in every logged value


@pytest.mark.parametrize("variant", ["nsgan", "vae"])
def test_fp16_trains_every_model_kind(variant, tmp_path):
    quiet_lightning()
    path = f"configs/{variant}.yaml"
    result, computed = train_computing(path, adapt(path, TINY + ["trainer.precision=16-mixed", f"run.dir={tmp_path / 'run'}"]))
    assert result.iterations == 3 and computed == {"float16"}
    assert all(torch.isfinite(p).all() for p in result.module.parameters())


def test_fp16_on_two_processes_keeps_ranks_identical(tmp_path):
    """Scaled gradients are averaged (an inf on one rank reaches all): every rank skips or steps alike."""

    proc = torchrun(["tests/ddp_worker.py", "configs/wgan_gp.yaml", str(tmp_path), *TINY, "trainer.devices=2",
                     "trainer.precision=16-mixed", f"run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["activation_dtypes"] == rank1["activation_dtypes"] == ["float16"]
    for name, tensor in rank0["params"].items():
        assert torch.isfinite(tensor).all(), name
        torch.testing.assert_close(tensor, rank1["params"][name], rtol=0, atol=0, msg=name)
