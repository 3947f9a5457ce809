"""Where the served samples come from. The server only needs this interface (a "source"):

- `meta`: a dict: `name`, `family`, `modality` ("images"), `num_classes` (0: unconditional),
  `sample_shape` [C, H, W], `latent_dim` (None without a latent space), `iteration` (training
  iterations behind the weights), `options` (the sampling options it takes, name ->
  {"default", "max"}; the server passes only values in (0, max]).
- `images(seed, num, label=None, **options)` -> uint8 [num, H, W, C]: samples 0 .. num - 1 of
  sequence `seed`, all of class `label`, or sample i of class i % num_classes when `label` is None
  on a conditional model (the same samples as `dgm-scale sample --seed S`).
- `interpolate(seed_a, seed_b, steps, label=None, **options)` -> uint8 [steps, H, W, C]: from
  sample 0 of seed_a to sample 0 of seed_b (class `label`, default 0), for sources with a latent
  space.

Sources raise `BadRequest` for a request they cannot serve (a one-line reason), ConfigError when
they cannot be opened. `ModuleSource` serves a GenerativeModule in memory, `CheckpointSource` a
checkpoint file; `open_source(path)` picks the source for a path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dgm_scale.core.errors import ConfigError
from dgm_scale.dump import as_array

#: the largest temperature offered (autoregressive families): beyond it the samples are noise
MAX_TEMPERATURE = 10.0
#: suffixes of exported generator files (not served yet; see open_source)
EXPORT_SUFFIXES = (".pt", ".pt2", ".onnx")


class BadRequest(ValueError):
    """A request the source or server cannot serve; the one-line message names the parameter.
    `status` is the HTTP status (400 unless said otherwise)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def slerp(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` points [steps, D] on the great circle from a [D] to b [D], norms interpolated
    linearly (a Gaussian latent's norm stays typical, which linear interpolation shrinks in
    between); the ends are a and b exactly. Linear interpolation when a and b are parallel."""
    t = torch.linspace(0, 1, steps, dtype=torch.float64)[:, None]
    a64, b64 = a.double(), b.double()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    if torch.sin(omega) < 1e-6:
        points = (1 - t) * a64 + t * b64
    else:
        unit_a, unit_b = a64 / a64.norm(), b64 / b64.norm()
        direction = (torch.sin((1 - t) * omega) * unit_a + torch.sin(t * omega) * unit_b) / torch.sin(omega)
        points = direction * ((1 - t) * a64.norm() + t * b64.norm())
    points[0], points[-1] = a64, b64
    return points.float()


class ModuleSource:
    """Samples of a GenerativeModule (images only). Latent families (GAN, VAE) take `truncation`
    psi in (0, 1]: every latent z ~ N(0, I) is scaled toward the mean, z * psi (psi = 1: the
    model's own samples; smaller: more typical, less varied samples). Autoregressive families take
    `temperature` in (0, MAX_TEMPERATURE] (the softmax's; default the model's)."""

    def __init__(self, module, name: str = "model"):
        if module.modality != "images":
            raise ConfigError(f"serve shows images; this model makes {module.modality} "
                              f"(dgm-scale sample writes them)")
        self.module = module  # its sampling methods put the networks in eval mode themselves
        latent = hasattr(module, "latent_dim")
        if latent:
            options = {"truncation": {"default": 1.0, "max": 1.0}}
        else:
            options = {"temperature": {"default": float(module.cfg.model.temperature), "max": MAX_TEMPERATURE}}
        self.meta = {"name": name, "family": module.family.name, "modality": module.modality,
                     "num_classes": int(module.num_classes), "sample_shape": list(module.sample_shape),
                     "latent_dim": int(module.latent_dim) if latent else None, "options": options,
                     "iteration": int(getattr(module, "checkpoint_iteration", 0))}

    def _labels(self, num: int, label: int | None) -> torch.Tensor | None:
        if label is None:
            return self.module.default_labels(num)
        return torch.full((num,), int(label), dtype=torch.long, device=self.module.device)

    def _check(self, options: dict) -> None:
        unknown = sorted(set(options) - set(self.meta["options"]))
        if unknown:
            raise BadRequest(f"{unknown[0]}: the {self.meta['family']} model takes {sorted(self.meta['options'])}")

    @torch.no_grad()
    def images(self, seed: int, num: int, label: int | None = None, **options) -> np.ndarray:
        self._check(options)
        labels = self._labels(num, label)
        truncation = options.pop("truncation", 1.0)
        if truncation == 1.0:  # the model's own samples, by its sampling contract
            samples = self.module.sample_batch(num, seed, 0, labels, **options)
        else:
            samples = self.module.generate(self.module.latents(num, seed, 0) * truncation, labels)
        return as_array(samples, "images")

    @torch.no_grad()
    def interpolate(self, seed_a: int, seed_b: int, steps: int, label: int | None = None,
                    **options) -> np.ndarray:
        self._check(options)
        if self.meta["latent_dim"] is None:
            raise BadRequest(f"interpolation needs a latent space; this {self.meta['family']} model has none")
        latents = slerp(self.module.latents(1, seed_a, 0)[0], self.module.latents(1, seed_b, 0)[0], steps)
        labels = self._labels(steps, 0 if label is None and self.meta["num_classes"] else label)
        samples = self.module.generate(latents * options.get("truncation", 1.0), labels)
        return as_array(samples, "images")


class CheckpointSource(ModuleSource):
    """A checkpoint's model (`load_module`), on `device` (default: CUDA when available)."""

    def __init__(self, path: str | Path, device: str | None = None):
        from dgm_scale.modules import load_module

        module = load_module(path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            module.to(torch.device(device))
        except (RuntimeError, AssertionError) as error:  # an unknown device, CUDA missing
            raise ConfigError(f"--device {device}: {(str(error).splitlines() or [''])[0]}") from None
        super().__init__(module, name=Path(path).name)


def open_source(path: str | Path, device: str | None = None) -> ModuleSource:
    """The source for `path`: a dgm_scale checkpoint. Exported generators (.pt, .pt2, .onnx) are
    not served yet: a clear ConfigError says so."""
    path = Path(path)
    if path.suffix in EXPORT_SUFFIXES:
        try:
            return CheckpointSource(path, device)
        except ConfigError:
            if not path.is_file():
                raise
            raise ConfigError(f"'{path}' is not a dgm_scale checkpoint; serving an exported generator "
                              f"({', '.join(EXPORT_SUFFIXES)}) is not supported yet: serve its .ckpt") from None
    return CheckpointSource(path, device)
