"""Exact denoisers of Gaussian data as `model.denoiser.target` networks: for pixels i.i.d.
N(mean, std^2) the optimal D(x_t) = mean + a std^2 / (a^2 std^2 + s^2) (x_t - a mean), given in each
objective's own output (the flow's velocity, the eps objective's noise), so that a module's
held-out likelihood can be checked against the data's exact NLL (test_diffusion_likelihood.py)."""
import torch
from torch import nn

from dgm_scale.families.diffusion.processes import VPDiscrete


def optimal_denoised(x, alpha, sigma, mean, std):
    return mean + alpha * std ** 2 / (alpha ** 2 * std ** 2 + sigma ** 2) * (x - alpha * mean)


class _Gaussian(nn.Module):
    def __init__(self, image_shape, mean: float = 0.1, std: float = 0.3):
        super().__init__()
        self.mean, self.std = mean, std
        self.unused = nn.Parameter(torch.zeros(()))  # the optimiser and the EMA need a parameter

    def alpha_sigma(self, noise_level):
        raise NotImplementedError

    def output(self, x, denoised, alpha, sigma):
        raise NotImplementedError

    def forward(self, x, noise_level, labels=None):
        alpha, sigma = (v.reshape(-1, *[1] * (x.dim() - 1)).to(x) for v in self.alpha_sigma(noise_level.double()))
        return self.output(x, optimal_denoised(x, alpha, sigma, self.mean, self.std), alpha, sigma) + 0 * self.unused


class FlowVelocity(_Gaussian):
    """loss.objective=flow: the network sees 1000 t and predicts (x - D) / t."""

    def alpha_sigma(self, noise_level):
        t = noise_level / 1000.0
        return 1 - t, t

    def output(self, x, denoised, alpha, sigma):
        return (x - denoised) / sigma


class CosineNoise(_Gaussian):
    """loss.objective=eps on the cosine schedule with 1000 discrete steps: the network sees the
    step index and predicts the noise (x - alpha D) / sigma."""

    process = VPDiscrete("cosine", 1000)

    def alpha_sigma(self, noise_level):
        return self.process.alpha_sigma(noise_level)

    def output(self, x, denoised, alpha, sigma):
        return (x - alpha * denoised) / sigma
