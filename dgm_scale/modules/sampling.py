"""Noise keyed to (seed, sample index): sample i of a seeded sequence is the same whichever
batch or rank draws it.

The sequence is cut into blocks of BLOCK samples; block b's noise comes from a CPU generator
seeded with (seed, b), so drawing samples [start, start + num) costs at most two partial blocks
more than the samples themselves, and the result does not depend on the device.

Also the one latent interpolation rule (`interpolation_inputs`): `dgm-scale serve`'s strip, the
run report's and W&B's (`LatentModule.interpolate`) are the same images.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

BLOCK = 1024


def _block_key(seed: int, block: int) -> int:
    return (int(seed) * 1_000_003 + block * 7_919 + 17) % (2**63 - 1)


def keyed_noise(seed: int, start: int, num: int, shape: Sequence[int], uniform: bool = False) -> Tensor:
    """Noise [num, *shape] (float32, CPU) for samples start .. start + num - 1 of sequence `seed`:
    N(0, 1), or U[0, 1) with `uniform`."""
    if num <= 0:
        return torch.zeros(0, *shape)
    draw = torch.rand if uniform else torch.randn
    first, last = start // BLOCK, (start + num - 1) // BLOCK
    blocks = [draw(BLOCK, *shape, generator=torch.Generator().manual_seed(_block_key(seed, block)))
              for block in range(first, last + 1)]
    offset = start - first * BLOCK
    return torch.cat(blocks)[offset:offset + num]


#: latent families' page control: psi in (0, 1] scaling every latent toward the mean
TRUNCATION = {"truncation": {"default": 1.0, "max": 1.0}}
#: the largest temperature a page offers (autoregressive families): beyond it the samples are noise
MAX_TEMPERATURE = 10.0

#: the noise input of each kind of sampler, by name -> drawn from U[0, 1) (else N(0, 1));
#: "noise": a diffusion sampler's starting noise, shaped like a sample
NOISE_INPUTS = {"latents": False, "uniforms": True, "noise": False}


def class_labels(num: int, start: int, num_classes: int) -> Tensor:
    """The default classes (start + i) % num_classes of samples start .. start + num - 1 (CPU)."""
    return torch.arange(start, start + num) % num_classes


def sampler_inputs(seed: int, start: int, num: int, noise: str, shape: Sequence[int],
                   num_classes: int = 0) -> dict[str, Tensor]:
    """The inputs of samples start .. start + num - 1 of sequence `seed` for a sampler fed noise
    `noise` (a NOISE_INPUTS name) of `shape` per sample and, when num_classes > 0, `labels`
    (class_labels), by name in call order (CPU): the families' `export_inputs` (latent families:
    "latents" [latent_dim]; autoregressive: "uniforms" [C * H * W]; diffusion: "noise" [C, H, W]), and `dgm-scale serve EXPORT`
    for samplers known only by their export's sidecar."""
    if noise not in NOISE_INPUTS:
        raise ValueError(f"unknown sampler noise '{noise}': expected one of {sorted(NOISE_INPUTS)}")
    inputs = {noise: keyed_noise(seed, start, num, shape, uniform=NOISE_INPUTS[noise])}
    if num_classes:
        inputs["labels"] = class_labels(num, start, num_classes)
    return inputs


#: the interpolation strip the serve page shows first and the run report draws: (seed A, seed B, steps)
STRIP = (0, 1, 8)


def slerp(a: Tensor, b: Tensor, steps: int) -> Tensor:
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


def interpolation_inputs(seed_a: int, seed_b: int, steps: int, latent_dim: int, num_classes: int = 0,
                         label: int | None = None) -> dict[str, Tensor]:
    """The inputs of a latent interpolation strip (CPU): `latents` [steps, latent_dim] on the
    great circle (slerp) from the latent of sample 0 of sequence seed_a to that of seed_b (the
    latents every latent sampler draws: keyed_noise), and, when num_classes > 0, `labels` [steps]:
    class `label` (default 0) throughout."""
    first, last = (keyed_noise(seed, 0, 1, (latent_dim,))[0] for seed in (seed_a, seed_b))
    inputs = {"latents": slerp(first, last, steps)}
    if num_classes:
        inputs["labels"] = torch.full((steps,), 0 if label is None else int(label), dtype=torch.long)
    return inputs
