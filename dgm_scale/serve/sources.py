"""Where the served samples come from. The server only needs this interface (a "source"):

- `meta`: a dict: `name`, `family`, `modality` ("images"), `num_classes` (0: unconditional),
  `sample_shape` [C, H, W], `latent_dim` (None without a latent space), `iteration` (training
  iterations behind the weights), `options` (the sampling options it takes, name -> spec, as
  GenerativeModule.sampling_controls gives them: a number {"default", "max"[, "min"]}, an
  integer {"type": "integer", ...} or a choice {"type": "choice", "choices"}; the server passes
  only values within the spec).
- `images(seed, num, label=None, **options)` -> uint8 [num, H, W, C]: samples 0 .. num - 1 of
  sequence `seed`, all of class `label`, or sample i of class i % num_classes when `label` is None
  on a conditional model (the same samples as `dgm-scale sample --seed S`).
- `interpolate(seed_a, seed_b, steps, label=None, **options)` -> uint8 [steps, H, W, C]: from
  sample 0 of seed_a to sample 0 of seed_b (class `label`, default 0), for sources with a latent
  space.

Sources raise `BadRequest` for a request they cannot serve (a one-line reason), ConfigError when
they cannot be opened. `SampleSource` holds what every source shares (meta, labels, option
checks, truncation, interpolation) and asks its subclass for latents and samples: `ModuleSource`
serves a GenerativeModule in memory, `CheckpointSource` a checkpoint file, `ExportSource` an
exported sampler (`dgm-scale export`: the file and its FILE.json sidecar); `open_source(path)`
picks the source for a path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dgm_scale.core.errors import ConfigError, described, first_line
from dgm_scale.dump import as_array
from dgm_scale.modules.sampling import TRUNCATION, class_labels, interpolation_inputs, sampler_inputs


class BadRequest(ValueError):
    """A request the source or server cannot serve; the one-line message names the parameter.
    `status` is the HTTP status (400 unless said otherwise), `headers` extra response headers."""

    def __init__(self, message: str, status: int = 400, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class SampleSource:
    """What every source shares: `meta`, the labels of a request, the option check, truncation
    and interpolation of latents. A subclass gives `_latents(seed, num)` (latent families) and
    `_decode(latents, labels)` -> samples [N, C, H, W] in [-1, 1], and overrides `_sample` when
    its samples are not decoded latents (autoregressive families)."""

    def __init__(self, name: str, family: str, modality: str, num_classes: int, sample_shape,
                 latent_dim: int | None, options: dict, iteration: int = 0):
        if modality != "images":
            raise ConfigError(f"serve shows images; this model makes {modality} (dgm-scale sample writes them)")
        self.meta = {"name": name, "family": family, "modality": modality, "num_classes": int(num_classes),
                     "sample_shape": [int(size) for size in sample_shape],
                     "latent_dim": None if latent_dim is None else int(latent_dim), "options": options,
                     "iteration": int(iteration)}

    def _labels(self, num: int, label: int | None) -> torch.Tensor | None:
        classes = self.meta["num_classes"]
        if label is not None and not classes:
            raise BadRequest("class: this model is unconditional (it has no classes)")
        if label is None:
            return class_labels(num, 0, classes) if classes else None
        return torch.full((num,), int(label), dtype=torch.long)

    def _check(self, options: dict) -> None:
        unknown = sorted(set(options) - set(self.meta["options"]))
        if unknown:
            raise BadRequest(f"{unknown[0]}: the {self.meta['family']} model takes {sorted(self.meta['options'])}")

    def _latents(self, seed: int, num: int) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, latents: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _sample(self, seed: int, num: int, labels: torch.Tensor | None, **options) -> torch.Tensor:
        return self._decode(self._latents(seed, num) * options.get("truncation", 1.0), labels)

    @torch.no_grad()
    def images(self, seed: int, num: int, label: int | None = None, **options) -> np.ndarray:
        self._check(options)
        return as_array(self._sample(seed, num, self._labels(num, label), **options), "images")

    @torch.no_grad()
    def interpolate(self, seed_a: int, seed_b: int, steps: int, label: int | None = None,
                    **options) -> np.ndarray:
        self._check(options)
        if self.meta["latent_dim"] is None:
            raise BadRequest(f"interpolation needs a latent space; this {self.meta['family']} model has none")
        self._labels(1, label)  # a class the model does not have: BadRequest
        inputs = interpolation_inputs(seed_a, seed_b, steps, self.meta["latent_dim"], self.meta["num_classes"], label)
        latents = inputs["latents"] * options.get("truncation", 1.0)
        return as_array(self._decode(latents, inputs.get("labels")), "images")


class ModuleSource(SampleSource):
    """Samples of a GenerativeModule (images only), with the controls its family offers
    (`sampling_controls`): latent families (GAN, VAE) `truncation` psi in (0, 1] - every latent
    z ~ N(0, I) scaled toward the mean, z * psi (psi = 1: the model's own samples; smaller: more
    typical, less varied samples); autoregressive ones the softmax's `temperature`; diffusion
    its `sampler`, `steps` and (guided models) `guidance`. Options other than truncation go to
    the module's `sample_batch` as they are."""

    def __init__(self, module, name: str = "model"):
        self.module = module  # its sampling methods put the networks in eval mode themselves
        super().__init__(name, module.family.name, module.modality, module.num_classes, module.sample_shape,
                         getattr(module, "latent_dim", None), module.sampling_controls(),
                         getattr(module, "checkpoint_iteration", 0))

    def _latents(self, seed: int, num: int) -> torch.Tensor:
        return self.module.latents(num, seed, 0)

    def _decode(self, latents: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.module.generate(latents, labels)

    def _sample(self, seed: int, num: int, labels: torch.Tensor | None, **options) -> torch.Tensor:
        if options.get("truncation", 1.0) != 1.0:
            return super()._sample(seed, num, labels, **options)
        options.pop("truncation", None)  # psi = 1: the model's own samples, by its sampling contract
        return self.module.sample_batch(num, seed, 0, labels, **options)


class CheckpointSource(ModuleSource):
    """A checkpoint's model (`load_module`), on `device` (default: CUDA when available)."""

    def __init__(self, path: str | Path, device: str | None = None, trust_code: bool = False):
        from dgm_scale.modules import load_module

        module = load_module(path, trust_code=trust_code)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            module.to(torch.device(device))
        except (RuntimeError, AssertionError) as error:  # an unknown device, CUDA missing
            raise ConfigError(f"--device {device}: {first_line(error)}") from None
        super().__init__(module, name=Path(path).name)


class ExportSource(SampleSource):
    """An exported sampler (`dgm-scale export`: FILE and its sidecar FILE.json), run on the CPU.
    Its inputs are drawn as the module's `export_inputs` draws them (`sampler_inputs`), so it
    shows the samples of the checkpoint it came from. Latent families take `truncation`; an
    autoregressive export's temperature was fixed when it was exported: no option. A fixed-batch
    export runs in chunks of its batch size (the last one padded, then cut)."""

    def __init__(self, path: str | Path, device: str | None = None):
        from dgm_scale.export.runtime import load_export

        if device not in (None, "cpu"):
            raise ConfigError(f"--device {device}: exported samplers are served on the CPU")
        try:
            self.sampler = load_export(path)
        except ConfigError:
            raise
        except Exception as error:  # noqa: BLE001 - a damaged file: torch / onnxruntime cannot load it
            raise ConfigError(f"export '{path}' does not load: {described(error)}") from None
        side = self.sampler.meta
        noise = side["inputs"][0]
        self.noise, self.noise_shape = noise["name"], noise["shape"][1:]
        latent = self.noise == "latents"
        super().__init__(Path(path).name, side["family"], side["modality"], side["num_classes"],
                         side["sample_shape"], side["latent_dim"] if latent else None,
                         TRUNCATION if latent else {}, side.get("iteration", 0))

    def _inputs(self, seed: int, num: int) -> dict:
        return sampler_inputs(seed, 0, num, self.noise, self.noise_shape, self.meta["num_classes"])

    def _latents(self, seed: int, num: int) -> torch.Tensor:
        return self._inputs(seed, num)["latents"]

    def _decode(self, latents: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self._run({"latents": latents} if labels is None else {"latents": latents, "labels": labels})

    def _sample(self, seed: int, num: int, labels: torch.Tensor | None, **options) -> torch.Tensor:
        inputs = self._inputs(seed, num)
        if labels is not None:
            inputs["labels"] = labels
        if "truncation" in options:
            inputs["latents"] = inputs["latents"] * options["truncation"]
        return self._run(inputs)

    def _run(self, inputs: dict) -> torch.Tensor:
        """The sampler on `inputs` of any batch size: a fixed-batch export in chunks of its size."""
        num = len(next(iter(inputs.values())))
        size = num if self.sampler.meta["dynamic_batch"] else int(self.sampler.meta["batch_size"])
        parts = []
        for low in range(0, num, size):
            chunk = {name: value[low:low + size] for name, value in inputs.items()}
            short = size - len(next(iter(chunk.values())))
            padded = {name: torch.cat([value, value[-1:].expand(short, *value.shape[1:])])
                      for name, value in chunk.items()}
            parts.append(self.sampler(**padded)[:size - short])
        return torch.cat(parts)


def open_source(path: str | Path, device: str | None = None, trust_code: bool = False) -> SampleSource:
    """The source for `path`: an exported sampler when its sidecar FILE.json exists (ExportSource),
    else a dgm_scale checkpoint (CheckpointSource; `trust_code` as for load_module); anything
    else is a one-line ConfigError."""
    from dgm_scale.export.runtime import sidecar_path

    path = Path(path)
    if path.is_file() and sidecar_path(path).is_file():
        return ExportSource(path, device)
    try:
        return CheckpointSource(path, device, trust_code)
    except ConfigError as error:
        if not path.is_file() or "not a dgm_scale checkpoint" not in str(error):
            raise
        raise ConfigError(f"'{path}' is neither a dgm_scale checkpoint nor an export (no sidecar "
                          f"'{sidecar_path(path).name}' beside it)") from None
