"""What every generative Lightning module shares: config handling, optimisers, seeded sampling."""
from __future__ import annotations

from typing import Optional, Tuple

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import Tensor

from dgm_scale.config import config_from_dict, to_dict
from dgm_scale.modules.guards import NonFiniteGuard
from dgm_scale.nets import count_parameters


def sample_shape(data_cfg) -> Tuple[int, ...]:
    """Shape of one data sample: (2,) for the 2-D toy mixtures, else (C, R, R)."""
    from dgm_scale.data.datasets import TOY_DATASETS

    if data_cfg.name in TOY_DATASETS:
        return (2,)
    return (data_cfg.channels, data_cfg.resolution, data_cfg.resolution)


def build_optimizer(params, opt_cfg) -> torch.optim.Optimizer:
    """Adam or RMSprop from an `optim.g` / `optim.d` config block."""
    if opt_cfg.name == "adam":
        return torch.optim.Adam(params, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps,
                                weight_decay=opt_cfg.weight_decay)
    if opt_cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=opt_cfg.lr, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay)
    raise ValueError(f"unknown optimizer '{opt_cfg.name}'")


class GenerativeModule(L.LightningModule):
    """Base class: stores the resolved config as plain data (checkpoints load with weights_only)."""

    #: optimizer.step() calls per training iteration; Lightning's global_step counts those calls.
    optimizer_steps_per_iteration: int = 1
    #: loader batches of `data.batch_size` consumed per iteration (the GAN's critic takes n_critic).
    batches_per_iteration: int = 1
    #: the iteration this process started training from (> 0 after a resume)
    start_iteration: int = 0
    #: draw_noise's key state: the iteration it last drew for, and how often it drew in it
    _noise_iteration: Optional[int] = None
    _noise_draws: int = 0
    #: the training iteration of the checkpoint this module was loaded from (load_module)
    checkpoint_iteration: int = 0

    def __init__(self, config: dict):
        super().__init__()
        self.save_hyperparameters({"config": config})
        # The typed schema's dataclasses, not a DictConfig: the training step reads a dozen config
        # values per iteration, and OmegaConf's attribute access (~20 us each on CPU) was ~1% of
        # a small GAN's step.
        self.cfg = OmegaConf.to_object(config_from_dict(config))
        self.sample_shape = sample_shape(self.cfg.data)
        self.latent_dim = self.cfg.model.latent_dim
        self.num_classes = self.cfg.model.num_classes
        self.nonfinite_guard = NonFiniteGuard(self.cfg.trainer.nonfinite, self.cfg.trainer.max_nonfinite_skips)

    @classmethod
    def from_config(cls, cfg) -> "GenerativeModule":
        return cls(to_dict(cfg))

    @property
    def iteration(self) -> int:
        """Completed training iterations (restored with the checkpoint through global_step)."""
        return self.global_step // self.optimizer_steps_per_iteration

    def draw_noise(self, num: int, *shape: int, uniform: bool = False) -> Tensor:
        """Noise [num, *shape] for this rank's share of the global batch: N(0, 1), or U[0, 1).

        The noise of the whole global batch (num x world size rows) is drawn from a generator
        keyed to (run.seed, iteration, draw within the iteration), and rank r keeps rows
        r, r + W, r + 2W, ... - the same interleaving the sampler uses for the data. So W ranks
        x batch B draw exactly the noise of 1 rank x batch W*B, every rank draws different
        noise, and a resumed run draws what the uninterrupted one would have drawn (the global
        RNG, whose state a checkpoint does not hold, is never used in training).
        """
        iteration = self.iteration
        if iteration != self._noise_iteration:
            self._noise_iteration, self._noise_draws = iteration, 0
        key = (self.cfg.run.seed * 1_000_003 + iteration) * 1_009 + self._noise_draws
        self._noise_draws += 1
        world = self.trainer.world_size if self._trainer is not None else 1
        generator = torch.Generator().manual_seed(key)
        draw = torch.rand if uniform else torch.randn
        global_noise = draw(num * world, *shape, generator=generator)
        return global_noise[self.global_rank::world].to(self.device)

    def on_fit_start(self) -> None:
        """Log what a run's numbers depend on: parameter counts and the global batch."""
        per_device = self.cfg.data.batch_size
        params = {
            **{f"params/{name}": count_parameters(net) for name, net in self.networks().items()},
            "batch/per_device": per_device,
            "batch/world_size": self.trainer.world_size,
            # Learning rates are not rescaled with it: see launch/README.md.
            "batch/global": per_device * self.trainer.world_size,
        }
        for logger in self.loggers:  # every logger (CSV hparams.yaml, W&B config), not just the first
            logger.log_hyperparams(params)

    def backward(self, loss: Tensor, *args, **kwargs) -> None:
        # `manual_backward(loss, optimizer)`: the optimizer is for the strategy (DeepSpeed picks
        # the engine by it); a plain backward ignores it.
        loss.backward()

    def on_train_start(self) -> None:
        self.start_iteration = self.iteration  # after any checkpoint was restored

    def guarded_step(self, loss: Tensor, opt, network: torch.nn.Module, name: str, scaled_terms=()) -> bool:
        """`opt.step()` unless `loss` or the gradient of `network` is NaN/Inf on any rank (then
        stop or skip, see modules/guards.py). Call it after backward; returns whether it stepped."""
        if not self.nonfinite_guard.check(self, loss, network, name, opt, scaled_terms):
            return False
        opt.step()
        return True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The skip budget spans the whole run, resumes included.
        checkpoint["nonfinite_skips"] = self.nonfinite_guard.skips

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite_guard.skips = int(checkpoint.get("nonfinite_skips", 0))

    def networks(self) -> dict:
        """The trained networks by name, e.g. {"generator": G, "discriminator": D}."""
        raise NotImplementedError

    def logging_due(self) -> bool:
        """Whether the iteration about to run is logged (every `trainer.log_every` iterations).

        Metrics (gradient norms included) are only computed and logged then: logging every
        step cost ~15% of a small model's step time.
        """
        return (self.iteration + 1) % self.cfg.trainer.log_every == 0

    def log_train(self, values: dict) -> None:
        """This iteration's training values as `train/*` (+ `train/iteration`), one CSV row.

        Straight to the loggers on rank 0 (values of rank 0's batch; gradient norms are global):
        `self.log(on_step=True)` here would make Lightning repeat them in every later row until
        the next logged iteration.
        """
        from dgm_scale.tracking.loggers import log_now

        if self._trainer is None:
            return
        metrics = {f"train/{key}": float(value) for key, value in values.items()}
        if self.cfg.trainer.nonfinite == "skip":  # only then: other runs keep their columns
            metrics["train/nonfinite_skips"] = float(self.nonfinite_guard.skips)
        log_now(self.trainer, {**metrics, "train/iteration": float(self.iteration), "epoch": self.current_epoch})

    def default_labels(self, num: int, start: int = 0) -> Optional[Tensor]:
        """Class labels (start + i) % K for i < num: 0, 1, ..., K-1, 0, ... from sample `start`
        of a longer sequence, for conditional models; None otherwise."""
        if self.num_classes == 0:
            return None
        return torch.arange(start, start + num, device=self.device) % self.num_classes

    def sampling_network(self) -> torch.nn.Module:
        raise NotImplementedError

    def decode(self, z: Tensor, labels: Optional[Tensor]) -> Tensor:
        """Map latents [N, latent_dim] to samples in data space [N, *sample_shape]."""
        return self.sampling_network()(z, labels)

    @torch.no_grad()
    def generate(self, latents: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """Samples [N, *sample_shape] (float32, on this module's device) for latents [N, latent_dim].

        Uses the sampling network (the EMA generator when kept) in eval mode, then restores its mode.
        """
        net = self.sampling_network()
        was_training = net.training
        net.eval()
        try:
            samples = self.decode(latents.to(self.device), None if labels is None else labels.to(self.device))
        finally:
            net.train(was_training)
        return samples.float()

    def sample(self, num: int, seed: int = 0, labels: Optional[Tensor] = None) -> Tensor:
        """`num` samples [num, *sample_shape] (float32, CPU); the same seed gives the same samples.

        The latents come from a CPU generator so that the result does not depend on the device.
        """
        latents = torch.randn(num, self.latent_dim, generator=torch.Generator().manual_seed(seed))
        return self.generate(latents, self.default_labels(num) if labels is None else labels).cpu()
