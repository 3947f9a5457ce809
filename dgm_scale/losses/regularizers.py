"""Regularisers of the discriminator / critic: gradient penalty, R1, LeCam and weight clipping."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn


def gradient_penalty(
    critic: Callable[..., Tensor],
    real_images: Tensor,
    fake_images: Tensor,
    labels: Optional[Tensor] = None,
    target_norm: float = 1.0,
    mix: Optional[Tensor] = None,
    grad_scale: float = 1.0,
) -> Tensor:
    """WGAN-GP penalty E[(||grad_x f(x_hat)||_2 - 1)^2] on random interpolates (Gulrajani et al. 2017).

    real_images, fake_images: [N, ...] of the same shape; mix: [N] interpolation weights in
    [0, 1] (uniform draws from the global RNG if None; the GAN module passes keyed draws so that
    a resumed run repeats them). grad_scale: the fp16 loss scale of the critic's optimizer; the
    inner gradient is taken of the scaled output and unscaled in float32, so that it neither
    underflows in fp16 nor goes unscaled (PyTorch AMP docs, "Gradient penalty"). Returns a scalar (the *unweighted*
    penalty; the caller multiplies by lambda). `create_graph=True` keeps the penalty
    differentiable w.r.t. the critic's weights; the gradient is taken out of place with
    `autograd.grad` (an in-place `.backward()` here breaks under DDP, PyTorch #47562).
    """
    alpha_shape = (real_images.shape[0],) + (1,) * (real_images.dim() - 1)
    if mix is None:
        mix = torch.rand(real_images.shape[0], device=real_images.device)
    alpha = mix.to(real_images.dtype).reshape(alpha_shape)
    interpolates = (alpha * real_images.detach() + (1 - alpha) * fake_images.detach()).requires_grad_(True)
    critic_out = critic(interpolates, labels) if labels is not None else critic(interpolates)
    (scaled_grads,) = torch.autograd.grad(critic_out.float().sum() * grad_scale, interpolates, create_graph=True)
    # Unscale and take norms in float32: under fp16 the squared sum can overflow. An overflow in
    # the scaled gradient makes the penalty inf/NaN, and the scaler then skips the step.
    grad_norms = (scaled_grads.float() / grad_scale).flatten(1).norm(2, dim=1)
    return ((grad_norms - target_norm) ** 2).mean()


@torch.no_grad()
def clip_weights(module: nn.Module, clip_value: float) -> None:
    """WGAN weight clipping (Arjovsky et al. 2017): clamp every parameter to [-c, c], in place."""
    for param in module.parameters():
        param.clamp_(-clip_value, clip_value)


def r1_penalty(critic: Callable[..., Tensor], real_images: Tensor, labels: Optional[Tensor] = None,
               grad_scale: float = 1.0) -> Tensor:
    """R1 (Mescheder et al. 2018): E[||grad_x D(x)||^2] on real images, unweighted (the caller
    multiplies by gamma / 2, and by k when it is applied every k steps: lazy regularisation).

    `critic` is what D computes on an image (with any augmentation inside it: the gradient is
    taken w.r.t. the image before augmentation, as in StyleGAN2-ADA). `grad_scale`: the fp16 loss
    scale of D's optimizer, as in `gradient_penalty`; the norms are taken in float32 (bf16 too).
    """
    inputs = real_images.detach().requires_grad_(True)
    critic_out = critic(inputs, labels) if labels is not None else critic(inputs)
    (scaled_grads,) = torch.autograd.grad(critic_out.float().sum() * grad_scale, inputs, create_graph=True)
    return (scaled_grads.float() / grad_scale).square().flatten(1).sum(dim=1).mean()


def lecam_penalty(real_logits: Tensor, fake_logits: Tensor, real_anchor: Tensor, fake_anchor: Tensor) -> Tensor:
    """LeCam regulariser (Tseng et al. 2021): E[(D(real) - a_fake)^2] + E[(D(fake) - a_real)^2],
    with a_real, a_fake moving averages of D's mean outputs on real and fake images (held by the
    caller). Unweighted (the caller multiplies by lambda). Logits [N], anchors scalars."""
    return (real_logits.float() - fake_anchor).square().mean() + (fake_logits.float() - real_anchor).square().mean()
