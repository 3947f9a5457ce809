"""The diffusion Lightning module: one denoiser network, trained on the objective's regression
target at noise levels drawn per sample, sampled by the configured sampler from its EMA.

Every random number of a training step (noise levels, noise, label dropout) comes from
`draw_noise`, keyed to (run.seed, iteration): a resumed run draws what the uninterrupted one
would have, and W processes draw the noise of one process with a W times larger batch. Sample i
of a seed depends only on (seed, i): its starting noise and the fresh noise of each stochastic
step are drawn from keyed sequences (modules/sampling.py).
"""
from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from dgm_scale.core.errors import ConfigError
from dgm_scale.data.transforms import from_8bit, to_8bit
from dgm_scale.distributed.interface import step_interface
from dgm_scale.families.diffusion import SamplerConfig, likelihood_method, validate_sampler, vlb_steps
from dgm_scale.families.diffusion.likelihood import ode_log_density, ode_nll, rademacher, ratio_bounds, ratio_grid, \
    vlb_terms
from dgm_scale.families.diffusion.posthoc import write_snapshot
from dgm_scale.families.diffusion.processes import build_process
from dgm_scale.families.diffusion.samplers import SAMPLERS, generate, levels
from dgm_scale.losses.diffusion import build_objective, denoising_loss
from dgm_scale.modules.base import GenerativeModule
from dgm_scale.modules.ema import make_ema_copy, ramped_decay, update_ema
from dgm_scale.modules.optim import build_optimizer
from dgm_scale.modules.phema import PowerFunctionEMA
from dgm_scale.modules.sampling import keyed_noise, sampler_inputs
from dgm_scale.nets.custom import build_network, check_network
from dgm_scale.nets.unet import build_unet

#: the sampling options `sample_batch` takes besides name / steps / guidance (SamplerConfig's fields)
SAMPLER_FIELDS = tuple(f.name for f in dataclasses.fields(SamplerConfig))


def stream_seed(seed: int, stream: int) -> int:
    """The seed of noise stream `stream` >= 1 of sample sequence `seed` (a sampler's step noise),
    apart from the sequences of other seeds and streams."""
    return (int(seed) * 2_147_483_647 + int(stream) * 1_000_000_007 + 1) % (2 ** 62)


#: the most steps and the largest guidance weight a live page offers: one request holds the model
#: for steps x samples denoiser passes (ddpm at 250 of 1,000 levels is already close to all of them)
MAX_PAGE_STEPS, MAX_PAGE_GUIDANCE = 250, 10.0

#: the noise-to-signal ratios sigma / alpha that bound the bins of the logged loss by noise level
NOISE_BINS = (0.1, 1.0, 10.0)


def noise_bin_names() -> Tuple[str, ...]:
    edges = ["0", *map(str, NOISE_BINS), "inf"]
    return tuple(f"loss_sigma_{low}_{high}" for low, high in zip(edges[:-1], edges[1:]))


def loss_by_noise_level(losses: Tensor, ratios: Tensor) -> Dict[str, Tensor]:
    """The mean of per-sample `losses` [N] in each bin of their sigma / alpha `ratios` [N]
    (NOISE_BINS), by name (`loss_sigma_<low>_<high>`); empty bins are left out."""
    bins = torch.bucketize(ratios.float(), torch.tensor(NOISE_BINS, device=ratios.device))
    return {name: losses[bins == index].mean() for index, name in enumerate(noise_bin_names())
            if bool((bins == index).any())}


def as_column(values: Tensor, like: Tensor) -> Tensor:
    """[N] -> [N, 1, 1, 1] (as many trailing 1s as `like` has dimensions after the batch)."""
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def network_output(network: nn.Module, process, objective, x: Tensor, t: Tensor, labels: Optional[Tensor]) -> Tensor:
    """The network's raw output (float32) at noisy images x and times t [N]: its input scaled by
    the objective (EDM's c_in), its noise level the process's (1000 t, ln(sigma) / 4)."""
    alpha, sigma = (as_column(v, x) for v in process.alpha_sigma(t))
    return network(x * objective.input_scale(alpha, sigma), process.noise_input(t).to(x.dtype), labels).float()


def denoised(network: nn.Module, process, objective, x: Tensor, t: Tensor, labels: Optional[Tensor]) -> Tensor:
    """D(x, t): the estimate of the clean images (float32)."""
    alpha, sigma = (as_column(v, x).float() for v in process.alpha_sigma(t))
    return objective.denoised(network_output(network, process, objective, x, t, labels), x.float(), alpha, sigma)


def guided_denoiser(network: nn.Module, process, objective, labels: Optional[Tensor], guidance: float,
                    num_classes: int, clip: bool = False) -> Callable[[Tensor, float], Tensor]:
    """D(x, t) with classifier-free guidance: D_none + w (D_label - D_none) (w = 1: D_label; no
    labels: the unconditional D), "none" being class `num_classes`; with `clip`, clamped to [-1, 1]."""
    def denoise(x: Tensor, t: float) -> Tensor:
        estimate = guided(x, t)
        return estimate.clamp(-1.0, 1.0) if clip else estimate

    def guided(x: Tensor, t: float) -> Tensor:
        times = torch.ones_like(x.flatten(1)[:, 0], dtype=torch.float32) * t  # (follows a traced batch size)
        if labels is None or guidance == 1.0:
            return denoised(network, process, objective, x, times, labels)
        none = torch.full_like(labels, num_classes)
        if guidance == 0.0:
            return denoised(network, process, objective, x, times, none)
        both = denoised(network, process, objective, torch.cat([x, x]), torch.cat([times, times]),
                        torch.cat([labels, none]))
        conditional, unconditional = both[:x.shape[0]], both[x.shape[0]:]  # (chunk() fixes a traced batch size)
        return unconditional + guidance * (conditional - unconditional)
    return denoise


def no_step_noise(step: int) -> Tensor:
    raise RuntimeError("a deterministic sampler drew step noise")


def is_deterministic(settings) -> bool:
    """Whether sampler `settings` draws no noise after the start (what an export can hold)."""
    return not (settings.name == "ddpm" or (settings.name == "ddim" and settings.eta > 0)
                or (settings.name == "heun" and settings.churn > 0))


class FixedStepSampler(nn.Module):
    """noise [N, C, H, W] (+ labels [N] int64) -> images [N, C, H, W] in [-1, 1]: a deterministic
    sampler's fixed steps around a copy of the denoiser, unrolled (what `dgm-scale export`
    traces); the images `sample_batch` makes from the same noise."""

    def __init__(self, network: nn.Module, process, objective, settings, num_classes: int):
        super().__init__()
        self.network, self.process, self.objective = network, process, objective
        self.settings, self.num_classes = settings, num_classes
        levels(process, settings.steps)  # computed now: a trace of forward sees plain numbers

    def forward(self, noise: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        settings = self.settings
        denoise = guided_denoiser(self.network, self.process, self.objective, labels, settings.guidance,
                                  self.num_classes, settings.clip_denoised)
        return generate(self.settings, denoise, self.process, noise, no_step_noise).float().clamp(-1.0, 1.0)


@contextmanager
def evaluating(network: nn.Module) -> Iterator[nn.Module]:
    was_training = network.training
    network.eval()
    try:
        yield network
    finally:
        network.train(was_training)


class DiffusionModule(GenerativeModule):
    def __init__(self, config: dict):
        super().__init__(config)
        cfg = self.cfg
        self.automatic_optimization = False
        self.process = build_process(cfg.loss, cfg.sampler)
        self.objective = build_objective(cfg.loss)
        self.denoiser = self._build_denoiser()
        self.denoiser_ema = make_ema_copy(self.denoiser) if cfg.model.ema_decay > 0 else None
        # post-hoc EMA: not a submodule (its averages stay out of the state dict sampling loads)
        phema = cfg.model.phema
        self.phema = PowerFunctionEMA(phema.sigma_rels) if phema.snapshot_every > 0 else None

    def _build_denoiser(self) -> nn.Module:
        net, shape, classes = self.cfg.model.denoiser, self.sample_shape, self.num_classes
        denoiser = build_network("model.denoiser", net, lambda: build_unet(net, shape, classes),
                                 {"image_shape": shape, "num_classes": classes})
        if net.target:
            labels = torch.arange(2) % classes if classes else None
            check_network("model.denoiser", net.target, denoiser,
                          {"x": torch.zeros(2, *shape), "noise_level": torch.ones(2), "labels": labels}, [(2, *shape)])
        return denoiser

    def configure_optimizers(self):
        return build_optimizer(self.denoiser.parameters(), self.cfg.optim)

    def networks(self) -> dict:
        return {"denoiser": self.denoiser}

    # ------------------------------------------------------------------ the objective
    def per_sample_loss(self, images: Tensor, noise: Tensor, t: Tensor, labels: Optional[Tensor],
                        network: Optional[nn.Module] = None) -> Tensor:
        """The objective's loss [N] of each image noised with `noise` at time t [N]."""
        alpha, sigma = (as_column(v, images) for v in self.process.alpha_sigma(t))
        noisy = alpha * images + sigma * noise
        network = network if network is not None else self.compiled("denoiser")
        prediction = network_output(network, self.process, self.objective, noisy, t, labels)
        return denoising_loss(prediction, self.objective.target(images, noise, alpha, sigma))

    def training_labels(self, labels: Tensor, uniforms: Tensor) -> Optional[Tensor]:
        """A conditional model's labels with `model.label_dropout` of them (uniforms below it) and
        hidden ones (-1, data.labels_per_class) set to "no class" (K); None if unconditional."""
        if self.num_classes == 0:
            return None
        labels = labels.to(self.device).long()
        dropped = (uniforms < self.cfg.model.label_dropout) | (labels < 0)
        return torch.where(dropped, torch.full_like(labels, self.num_classes), labels)

    def training_step(self, batch, batch_idx: int) -> None:
        opt = self.optimizers()
        log_now = self.logging_due()  # before the step, which advances the iteration
        iteration = self.iteration + 1  # the one this step completes (1-based)
        images = batch[0]
        count = images.shape[0]
        labels = self.training_labels(batch[1], self.draw_noise(count, uniform=True))
        t = self.process.training_times(self.draw_noise(count, uniform=True), self.draw_noise(count))
        losses = self.per_sample_loss(images, self.draw_noise(count, *self.sample_shape), t, labels)
        loss = losses.mean()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss, opt)
        skipped = self.guarded_step(loss, opt, self.denoiser, "denoiser")
        decay = self._step_ema(skipped)
        self._step_phema(iteration)
        if not log_now:
            return
        stepped = not bool(skipped)  # (a logged iteration: reading the flag may sync)
        decay = decay if stepped else None
        norm = step_interface(self._trainer).gradient_norm(opt, self.denoiser) if stepped else torch.tensor(float("nan"))
        alpha, sigma = self.process.alpha_sigma(t.detach())
        logs = {"loss": loss.detach(), "grad_norm": norm, **loss_by_noise_level(losses.detach(), sigma / alpha)}
        if decay is not None:
            logs["ema_decay"] = decay
        self.log_train(logs)
        self.log("loss", loss.detach(), prog_bar=True, logger=False)

    def _step_ema(self, skipped: Tensor) -> Optional[float]:
        """After an applied step the EMA takes the new weights (ramped decay, as the GAN's G);
        gated on the device by `skipped`."""
        if self.denoiser_ema is None:
            return None
        decay = ramped_decay(self.cfg.model.ema_decay, self.cfg.model.ema_rampup, self.iteration + 1)
        update_ema(self.denoiser_ema, self.denoiser, decay, copy_batchnorm=True, skip=skipped)
        return decay

    def _step_phema(self, iteration: int) -> None:
        """Every iteration, stepped or skipped (a skipped one holds the weights a second
        iteration): the power-function EMAs take the weights, and on schedule rank 0 writes a
        snapshot - here, before the checkpoint of this iteration, so that a run killed in
        between and resumed from that checkpoint has the snapshot."""
        if self.phema is None:
            return
        self.phema.update(list(self.denoiser.parameters()), iteration)
        every, last = self.cfg.model.phema.snapshot_every, self.cfg.trainer.max_steps
        due = (iteration % every == 0 or iteration == last) and self._trainer is not None
        # Under fsdp every rank reads the averages (its shards, gathered: a collective); rank 0 writes.
        if due and (self.phema.sharded or self.trainer.is_global_zero):
            names = [name for name, _ in self.denoiser.named_parameters()]
            profiles = self.phema.profiles(names)
            if self.trainer.is_global_zero:
                write_snapshot(Path(self.trainer.default_root_dir), self.phema, names, iteration, profiles)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.phema is not None:
            checkpoint["phema"] = self.phema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.phema is None:
            return
        if "phema" not in checkpoint:
            raise ConfigError("config key 'model.phema.snapshot_every': the checkpoint resumed from holds no "
                              "power-function EMAs (it was written without them): resume with "
                              "model.phema.snapshot_every=0, or start a new run")
        try:
            self.phema.load_state_dict(checkpoint["phema"])
        except ValueError as error:
            raise ConfigError(f"config key 'model.phema.sigma_rels': {error}") from None

    # ------------------------------------------------------------------ sampling
    def sampler_variants(self) -> Dict[str, str]:
        if self.denoiser_ema is None:
            return {"": "denoiser"}
        return {"": "EMA denoiser", "raw": "raw denoiser"}

    def sampling_network(self, variant: str = "") -> nn.Module:
        if variant not in self.sampler_variants():
            raise ValueError(f"unknown sampler variant '{variant}'; this model has {sorted(self.sampler_variants())}")
        return self.denoiser if self.denoiser_ema is None or variant == "raw" else self.denoiser_ema

    def sampler_settings(self, **given: Any):
        """The config's `sampler` section with the given options (None: the config's) replacing
        its values; a ValueError naming the option for a bad or unknown one."""
        unknown = sorted(set(given) - set(SAMPLER_FIELDS))
        if unknown:
            raise ValueError(f"unknown sampling option(s) for the diffusion family: {unknown}; it takes "
                             f"{', '.join(SAMPLER_FIELDS)}")
        settings = dataclasses.replace(self.cfg.sampler, **{k: v for k, v in given.items() if v is not None})
        try:
            validate_sampler(settings, self.cfg.loss, self.cfg.model)
        except ConfigError as error:
            raise ValueError(str(error)) from None
        return settings

    def sampling_controls(self) -> Dict[str, Dict[str, Any]]:
        """The sampler, its steps (up to a discrete model's loss.timesteps, at most
        MAX_PAGE_STEPS) and, for a model trained with label dropout, the guidance weight."""
        settings, loss = self.cfg.sampler, self.cfg.loss
        discrete = loss.objective in ("eps", "v") and loss.timesteps > 0
        controls = {"sampler": {"type": "choice", "default": settings.name, "choices": sorted(SAMPLERS)},
                    "steps": {"type": "integer", "default": settings.steps, "min": 1,
                              "max": min(loss.timesteps, MAX_PAGE_STEPS) if discrete else MAX_PAGE_STEPS}}
        if self.num_classes > 0 and self.cfg.model.label_dropout > 0:
            controls["guidance"] = {"default": float(settings.guidance), "min": 0.0, "max": MAX_PAGE_GUIDANCE}
        return controls

    @torch.no_grad()
    def sample_batch(self, num: int, seed: int = 0, start: int = 0, labels: Optional[Tensor] = None,
                     variant: str = "", sampler: Optional[str] = None, steps: Optional[int] = None,
                     guidance: Optional[float] = None, **options: Any) -> Tensor:
        """Images [num, C, H, W] in [-1, 1] by `sampler` (default sampler.name) in `steps` steps
        with guidance weight `guidance`; `options`: other `sampler` keys (eta, churn, ...)."""
        settings = self.sampler_settings(name=sampler, steps=steps, guidance=guidance, **options)
        labels = self.default_labels(num, start) if labels is None else labels.to(self.device).long()
        shape = self.sample_shape

        def step_noise(step: int) -> Tensor:
            return keyed_noise(stream_seed(seed, step + 1), start, num, shape).to(self.device)

        noise = keyed_noise(seed, start, num, shape).to(self.device)
        with evaluating(self.sampling_network(variant)) as network:
            denoise = guided_denoiser(network, self.process, self.objective, labels, settings.guidance, self.num_classes,
                                      settings.clip_denoised)
            images = generate(settings, denoise, self.process, noise, step_noise)
        return images.float().clamp(-1.0, 1.0)

    # ------------------------------------------------------------------ likelihood and encoding
    @property
    def has_likelihood(self) -> bool:
        return likelihood_method(self.cfg.likelihood, self.cfg.loss) != "none"

    def _plain_denoiser(self, network: nn.Module, labels: Optional[Tensor], clip: bool):
        """D(x, t) of `network`, conditioned on `labels` (the true classes: log p(x | class)), no guidance."""
        return guided_denoiser(network, self.process, self.objective, labels, 1.0, self.num_classes, clip)

    def _ode_ratios(self, steps: int) -> Tensor:
        likelihood = self.cfg.likelihood
        return ratio_grid(*ratio_bounds(self.process, likelihood.ratio_min, likelihood.ratio_max), steps)

    @torch.no_grad()
    def heldout_nll(self, batch, seed: int = 0) -> Optional[Tuple[Tensor, int]]:
        """An upper bound on -log P(x) (nats, summed over the batch's 8-bit-rounded images; see
        likelihood.py for which bound), averaged over likelihood.repeats draws keyed to `seed`."""
        likelihood, method = self.cfg.likelihood, likelihood_method(self.cfg.likelihood, self.cfg.loss)
        if method == "none":
            return None
        images = from_8bit(to_8bit(batch[0].to(self.device)))
        count, shape = images.shape[0], self.sample_shape
        labels = self.training_labels(batch[1], torch.ones(count, device=self.device)) if self.num_classes else None

        def draw(stream: int, uniform: bool = False) -> Tensor:
            return keyed_noise(stream_seed(seed, stream), 0, count, shape, uniform).to(self.device)

        total = torch.zeros(count, dtype=torch.float64, device=self.device)
        with evaluating(self.sampling_network()) as network:
            for repeat in range(likelihood.repeats):
                first = 1 + repeat * 1_000_003  # this draw's streams: first, first + 1, ...
                if method == "vlb":
                    denoise = self._plain_denoiser(network, labels, self.cfg.sampler.clip_denoised)
                    steps = vlb_steps(likelihood, self.cfg.loss)
                    total += sum(vlb_terms(denoise, self.process, images, steps, lambda k: draw(first + k)).values())
                else:
                    probes = [rademacher(draw(first + 1 + p)) for p in range(likelihood.probes)]
                    total += ode_nll(self._plain_denoiser(network, labels, False), self.process, images,
                                     self._ode_ratios(likelihood.ode_steps), draw(first, uniform=True), probes)
        return total.sum() / likelihood.repeats, images.numel()

    @torch.no_grad()
    def encode_features(self, images: Tensor, labels: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """`latent`: the image carried by the probability-flow ODE (likelihood.ode_steps Heun steps)
        from sigma / alpha = likelihood.ratio_min to ratio_max and divided by ratio_max - the
        noise the deterministic samplers would start from (DDIM inversion), ~N(0, I) [N, C*H*W]."""
        images = images.to(self.device).float()
        if self.num_classes and labels is None:
            raise ValueError("a class-conditional diffusion model encodes images with their labels")
        labels = self.training_labels(labels, torch.ones(len(images), device=self.device)) if self.num_classes else None
        ratios = self._ode_ratios(self.cfg.likelihood.ode_steps)
        with evaluating(self.sampling_network()) as network:
            _, latent = ode_log_density(self._plain_denoiser(network, labels, False), self.process, images, ratios)
        return {"latent": (latent / float(ratios[-1])).flatten(1).float()}

    # ------------------------------------------------------------------ export
    def export_network(self, variant: str = "") -> nn.Module:
        settings = self.sampler_settings()
        if not is_deterministic(settings):
            raise NotImplementedError(f"the diffusion family exports deterministic samplers (euler, dpmpp_2m, ddim "
                                      f"with eta 0, heun without churn); this model's is sampler.name {settings.name} "
                                      f"(eta {settings.eta}, churn {settings.churn}): set another with sampler.*")
        network = copy.deepcopy(self.sampling_network(variant)).cpu().eval()
        return FixedStepSampler(network, self.process, self.objective, settings, self.num_classes)

    def export_inputs(self, num: int, seed: int = 0, start: int = 0) -> Dict[str, Tensor]:
        return sampler_inputs(seed, start, num, "noise", self.sample_shape, self.num_classes)
