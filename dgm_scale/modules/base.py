"""What every generative Lightning module shares: config, keyed noise, guarded steps, logging and
the one sampling contract (`sample_batch`) that sample grids, `dgm-scale sample`, evaluation and
the report use, whatever the family."""
from __future__ import annotations

import copy
import operator
from typing import Any, Callable, Dict, Optional, Tuple

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import Tensor

from dgm_scale.config import config_from_dict, to_dict
from dgm_scale.core.logs import log_now
from dgm_scale.distributed.interface import step_interface
from dgm_scale.families.registry import get_family
from dgm_scale.modules.guards import NonFiniteGuard
from dgm_scale.modules.sampling import TRUNCATION, class_labels, interpolation_inputs, keyed_noise, sampler_inputs
from dgm_scale.nets import count_parameters


def sample_shape(data_cfg) -> Tuple[int, ...]:
    """Shape of one data sample: (2,) for the 2-D toy mixtures, (seq_len,) bytes for text,
    else (C, R, R)."""
    from dgm_scale.data.config import modality_of

    modality = modality_of(data_cfg.name)
    if modality == "points":
        return (2,)
    if modality == "text":
        return (data_cfg.seq_len,)
    return (data_cfg.channels, data_cfg.resolution, data_cfg.resolution)


class GenerativeModule(L.LightningModule):
    """Base class: stores the resolved config as plain data (checkpoints load with weights_only).

    A family's module implements `training_step`, `configure_optimizers`, `networks()` and
    `sample_batch()`; optionally `sampler_variants()` (e.g. a GAN's EMA and raw generators) and
    `heldout_nll()` (families with a likelihood: the evaluation's bits per dim / char),
    `heldout_scores()` (other averages over the held-out split, e.g. a classifier's accuracy) and
    `encode_features()` (features of real data: `dgm-scale encode` / `probe`) and
    `sampling_controls()` (the sampling options a live page offers).
    """

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
    #: the networks (attribute names) a loss differentiates twice through (gradient penalty, R1):
    #: sharded (fsdp) training keeps their gathered weights from a backward to the optimizer step
    twice_differentiated: Tuple[str, ...] = ()

    def __init__(self, config: dict):
        from dgm_scale.data.config import modality_of

        super().__init__()
        self.save_hyperparameters({"config": config})
        # The typed schema's dataclasses, not a DictConfig: the training step reads a dozen config
        # values per iteration, and OmegaConf's attribute access (~20 us each on CPU) was ~1% of
        # a small GAN's step.
        self.cfg = OmegaConf.to_object(config_from_dict(config))
        self._cut_passes: list = []  # (output, its cut leaf): see passes_apart
        self.family = get_family(self.cfg.model.kind)
        self.modality = modality_of(self.cfg.data.name)  # images | points | text
        self.sample_shape = sample_shape(self.cfg.data)
        self.num_classes = int(getattr(self.cfg.model, "num_classes", 0))
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
        return (global_noise if world == 1 else global_noise[self.global_rank::world]).to(self.device)

    def setup(self, stage: str) -> None:
        if self.cfg.trainer.channels_last and len(self.sample_shape) == 3:
            # Every 4-D weight (the convolutions') in NHWC: a convolution's output takes its
            # weight's layout, so the activations follow without converting each batch.
            self.to(memory_format=torch.channels_last)

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

    def passes_apart(self, *outputs: Tensor) -> Tuple[Tensor, ...]:
        """What a loss should take for `outputs`, one network's outputs from separate forward
        passes (D on the real and on the fake batch): the outputs themselves, or, where the
        strategy wants one backward per pass (`StepInterface.backward_per_pass`), leaves cut from
        their graphs; the next `manual_backward` then runs the loss's backward, and each pass's
        own after it, with the gradient its cut leaf received. The gradients are the same sums."""
        self._cut_passes = []
        if not step_interface(self._trainer).backward_per_pass:
            return outputs
        cuts = tuple(output.detach().requires_grad_(output.requires_grad) for output in outputs)
        self._cut_passes = list(zip(outputs, cuts))
        return cuts

    def backward(self, loss: Tensor, *args, **kwargs) -> None:
        # `manual_backward(loss, optimizer)`: the optimizer is for the strategy (DeepSpeed picks
        # the engine by it); a plain backward ignores it. `loss` arrives loss-scaled, so the cut
        # passes' gradients (see passes_apart) carry the same scale.
        loss.backward()
        cut_passes, self._cut_passes = self._cut_passes, []
        for output, cut in cut_passes:
            if cut.grad is not None:
                output.backward(cut.grad)

    def on_train_start(self) -> None:
        self.start_iteration = self.iteration  # after any checkpoint was restored

    def guarded_step(self, loss: Tensor, opt, network: torch.nn.Module, name: str, scaled_terms=()) -> Tensor:
        """`opt.step()` unless `loss` or the gradient of `network` is NaN/Inf on any rank (then
        stop or skip, see modules/guards.py). Call it after backward; returns the skip flag, a
        device tensor (1.0: not applied), so that nothing here waits for the device."""
        skipped = self.nonfinite_guard.flag(self, loss, network, name, opt, scaled_terms)
        step_interface(self._trainer).step(opt, skipped)
        return skipped

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # No checkpoint past a non-finite step that was not acted on yet. The skip budget spans
        # the whole run, resumes included.
        self.nonfinite_guard.settle()
        checkpoint["nonfinite_skips"] = self.nonfinite_guard.skips

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite_guard.skips = int(checkpoint.get("nonfinite_skips", 0))

    def on_train_end(self) -> None:
        self.nonfinite_guard.settle()  # the steps after the last logged iteration

    def compiled(self, name: str) -> torch.nn.Module:
        """Network attribute `name` (dotted for a part: `discriminator.body`) for a training
        forward: `torch.compile`d under `trainer.compile` (built on first use, kept outside the
        module's submodules, so that state dicts and checkpoints hold the plain network's keys),
        else the network itself."""
        network = operator.attrgetter(name)(self)
        if not self.cfg.trainer.compile:
            return network
        cache = self.__dict__.setdefault("_compiled_networks", {})
        if name not in cache:
            cache[name] = torch.compile(network)
        return cache[name]

    def networks(self) -> Dict[str, torch.nn.Module]:
        """The trained networks by name, e.g. {"generator": G, "discriminator": D}; under DeepSpeed
        each optimizer's engine holds the networks whose parameters it owns."""
        raise NotImplementedError

    def logging_due(self) -> bool:
        """Whether the iteration about to run is logged (every `trainer.log_every` iterations).

        Metrics (gradient norms included) are only computed and logged then: logging every
        step cost ~15% of a small model's step time.
        """
        return (self.iteration + 1) % self.cfg.trainer.log_every == 0

    def log_train(self, values: dict, named: Optional[dict] = None) -> None:
        """This iteration's training values as `train/*` (+ `train/iteration`), one CSV row;
        `named` values are logged under their own names (e.g. `aug/p`).

        Straight to the loggers on rank 0 (values of rank 0's batch; gradient norms are global):
        `self.log(on_step=True)` here would make Lightning repeat them in every later row until
        the next logged iteration.
        """
        if self._trainer is None:
            return
        self.nonfinite_guard.settle()  # raises here under `stop`; counts the skips
        metrics = {f"train/{key}": float(value.detach() if isinstance(value, Tensor) else value)
                   for key, value in values.items()}
        metrics.update(named or {})
        if self.cfg.trainer.nonfinite == "skip":  # only then: other runs keep their columns
            metrics["train/nonfinite_skips"] = float(self.nonfinite_guard.skips)
        log_now(self.trainer, {**metrics, "train/iteration": float(self.iteration), "epoch": self.current_epoch})

    # ------------------------------------------------------------------ the sampling contract
    def default_labels(self, num: int, start: int = 0) -> Optional[Tensor]:
        """Class labels (start + i) % K for i < num: 0, 1, ..., K-1, 0, ... from sample `start`
        of a longer sequence, for conditional models; None otherwise."""
        if self.num_classes == 0:
            return None
        return class_labels(num, start, self.num_classes).to(self.device)

    def sampler_variants(self) -> Dict[str, str]:
        """The samplers `sample_batch(variant=...)` offers, name -> what it is; "" is the default
        (the one `dgm-scale sample`, best.ckpt and `eval/*` use; others are scored as `eval_<name>/*`)."""
        return {"": "the model"}

    def sample_batch(self, num: int, seed: int = 0, start: int = 0, labels: Optional[Tensor] = None,
                     variant: str = "", **options: Any) -> Tensor:
        """Samples start .. start + num - 1 of the sequence `seed`, on this module's device:
        images [num, C, H, W] / points [num, 2] (float32, model range [-1, 1]) or text [num, L]
        (int64 byte values). Sample i depends only on (seed, i, its label, variant, options), so
        any split of a sequence into batches or over ranks gives the same samples. `labels` [num]
        for conditional models (default: `default_labels(num, start)`). `options`: family
        specific (e.g. temperature)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, num: int, seed: int = 0, labels: Optional[Tensor] = None, variant: str = "",
               batch_size: int = 1024, **options: Any) -> Tensor:
        """`num` samples on the CPU (see sample_batch), made `batch_size` at a time."""
        parts = []
        for lo in range(0, num, batch_size):
            hi = min(num, lo + batch_size)
            part_labels = None if labels is None else labels[lo:hi]
            parts.append(self.sample_batch(hi - lo, seed, lo, part_labels, variant, **options).cpu())
        return torch.cat(parts)

    def interpolate(self, seed_a: int, seed_b: int, steps: int, label: Optional[int] = None,
                    variant: str = "") -> Optional[Tensor]:
        """Samples [steps, *sample_shape] along a path in latent space from sample 0 of sequence
        seed_a to sample 0 of seed_b (class `label`, default 0, on conditional models): the
        strip `dgm-scale serve` draws (sampling.interpolation_inputs). None for a family without
        a latent space (the report and W&B then show no strip)."""
        return None

    # ------------------------------------------------------------------ the export contract
    def export_network(self, variant: str = "") -> torch.nn.Module:
        """A self-contained copy of the sampler of `variant` (eval mode, no reference to this
        module): `forward(*export_inputs(...).values())` -> samples in [-1, 1], the samples
        `sample_batch` makes from the same inputs. What `dgm-scale export` traces."""
        raise NotImplementedError(f"the {self.family.name} family does not export its sampler")

    #: the `dgm-scale export` formats whose tracing suits the sampler (see export_network)
    export_formats: Tuple[str, ...] = ("torchscript", "onnx", "exported")

    def export_inputs(self, num: int, seed: int = 0, start: int = 0) -> Dict[str, Tensor]:
        """The exported network's inputs for samples start .. start + num - 1 of sequence `seed`
        (CPU), by name in call order: what `sample_batch` draws for those samples."""
        raise NotImplementedError(f"the {self.family.name} family does not export its sampler")

    # ------------------------------------------------------------------ the encoding contract
    def encode_features(self, images: Tensor, labels: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """What the model makes of real images [N, C, H, W] in [-1, 1] (+ labels [N], needed by
        class-conditional models): name -> float32 [N, D] on this module's device, row i from
        image i alone (called in eval mode under no_grad). The first entry is the model's
        representation, the one `dgm-scale probe` measures; `dgm-scale encode` writes them all."""
        raise NotImplementedError(f"the {self.family.name} family does not encode data")

    # ------------------------------------------------------------------ the controls of a live page
    def sampling_controls(self) -> Dict[str, Dict[str, Any]]:
        """The sampling options `sample_batch` takes that a live page (`dgm-scale serve`) may
        offer: name -> spec, one of
        - a number: {"default", "max"} and optionally "min" (values in [min, max]; without
          "min", in (0, max]);
        - an integer: {"type": "integer", "default", "min", "max"};
        - a choice: {"type": "choice", "default", "choices": [names]}.
        Every value within its spec must be one `sample_batch` accepts."""
        return {}

    #: whether `heldout_nll` scores this model (evaluations then read the held-out split)
    has_likelihood: bool = False
    #: the names of the `heldout_scores` this model reports (evaluations then read the held-out split)
    heldout_score_names: Tuple[str, ...] = ()

    @property
    def uses_heldout(self) -> bool:
        """Whether evaluations score this model on the held-out split."""
        return self.has_likelihood or bool(self.heldout_score_names)

    def heldout_scores(self, batch) -> Dict[str, Tuple[Tensor, int]]:
        """Scores that are averages over held-out samples, for models that predict something of
        them (a semi-supervised classifier's accuracy): name (one of `heldout_score_names`) ->
        (the sum over the batch, the number of samples it counts). The evaluation sums both over
        the held-out split and all ranks and reports sum / count as `eval/<name>`."""
        return {}

    def label_classes(self) -> Tuple[str, int]:
        """(config key, K): the training data must have K label classes (K = 0: no demand);
        a class-conditional model needs its `model.num_classes`."""
        return "model.num_classes", self.num_classes

    def heldout_nll(self, batch, seed: int = 0) -> Optional[Tuple[Tensor, int]]:
        """(total negative log-likelihood in nats over the batch, number of dimensions scored),
        for families with a likelihood over discrete data (8-bit pixels, bytes); None otherwise.
        The evaluation turns the sums over a held-out split into bits per dim / char; `seed`
        keys any noise it draws (a VAE's posterior sample)."""
        return None


class LatentModule(GenerativeModule):
    """A family whose samples decode latents z ~ N(0, I) [N, latent_dim] (the GAN, the VAE)."""

    def sampling_controls(self) -> Dict[str, Dict[str, Any]]:
        """Truncation psi in (0, 1]: the latents scaled toward the mean (the page's source applies it)."""
        return dict(TRUNCATION)

    def __init__(self, config: dict):
        super().__init__(config)
        self.latent_dim = int(self.cfg.model.latent_dim)

    def sampling_network(self, variant: str = "") -> torch.nn.Module:
        raise NotImplementedError

    def decode(self, z: Tensor, labels: Optional[Tensor], variant: str = "") -> Tensor:
        """Map latents [N, latent_dim] to samples in data space [N, *sample_shape]."""
        return self.sampling_network(variant)(z, labels)

    @torch.no_grad()
    def generate(self, latents: Tensor, labels: Optional[Tensor] = None, variant: str = "") -> Tensor:
        """Samples [N, *sample_shape] (float32, on this module's device) for latents [N, latent_dim],
        by the sampling network of `variant` in eval mode (its mode is restored)."""
        net = self.sampling_network(variant)
        was_training = net.training
        net.eval()
        try:
            samples = self.decode(latents.to(self.device), None if labels is None else labels.to(self.device), variant)
        finally:
            net.train(was_training)
        return samples.float()

    def latents(self, num: int, seed: int, start: int = 0) -> Tensor:
        """The latents of samples start .. start + num - 1 of sequence `seed` (CPU)."""
        return keyed_noise(seed, start, num, (self.latent_dim,))

    def interpolate(self, seed_a: int, seed_b: int, steps: int, label: Optional[int] = None,
                    variant: str = "") -> Tensor:
        inputs = interpolation_inputs(seed_a, seed_b, steps, self.latent_dim, self.num_classes, label)
        return self.generate(inputs["latents"], inputs.get("labels"), variant)

    #: maps the sampling network's output to samples (the VAE: its decoder's mean image)
    output_map: Optional[Callable[[Tensor], Tensor]] = None

    def export_network(self, variant: str = "") -> torch.nn.Module:
        return LatentSampler(copy.deepcopy(self.sampling_network(variant)).cpu().eval(), self.output_map)

    def export_inputs(self, num: int, seed: int = 0, start: int = 0) -> Dict[str, Tensor]:
        return sampler_inputs(seed, start, num, "latents", (self.latent_dim,), self.num_classes)

    def sample_batch(self, num: int, seed: int = 0, start: int = 0, labels: Optional[Tensor] = None,
                     variant: str = "", **options: Any) -> Tensor:
        if options:
            raise ValueError(f"unknown sampling option(s) for the {self.family.name} family: {sorted(options)}")
        labels = self.default_labels(num, start) if labels is None else labels
        return self.generate(self.latents(num, seed, start), labels, variant)


class LatentSampler(torch.nn.Module):
    """latents [N, latent_dim] (+ labels [N] int64) -> samples [N, *sample_shape] in [-1, 1]:
    a latent family's sampling network on its own, the network `dgm-scale export` traces."""

    def __init__(self, network: torch.nn.Module, output_map: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__()
        self.network = network
        self.output_map = output_map

    def forward(self, latents: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        # Unconditional: the latents alone, the call a user's decoder was checked with.
        samples = self.network(latents) if labels is None else self.network(latents, labels)
        if self.output_map is not None:
            samples = self.output_map(samples)
        return samples.clamp(-1.0, 1.0)
