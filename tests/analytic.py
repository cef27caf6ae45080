"""Denoisers with exact answers, shared by the sampler and inversion tests.

`oracle_for(x0)` returns the exact noise of x_t given the true clean images. `Gaussian` is
the exact noise predictor of Gaussian data x0 ~ N(mu, diag(s^2)): with x_t = alpha x0 +
sigma eps, Cov(eps, x_t) = sigma and Var(x_t) = alpha^2 s^2 + sigma^2, so
eps*(x_t) = E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2). Its
probability-flow ODE keeps each coordinate's standard score
z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) fixed (a 1-D flow between Gaussians
is their monotone affine map), so the exact sampler output is known in closed form.
"""

from __future__ import annotations

from typing import Any

import torch

from animeddim.config import ScheduleConfig
from animeddim.diffusion.schedule import rates

SCHED = ScheduleConfig()
SHAPE = (4, 3, 8, 8)


def oracle_for(x0: torch.Tensor, calls: list[int] | None = None):
    """A 'network' that returns the exact noise of x_t given the true clean images."""

    def model(x: torch.Tensor, noise_variance: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if calls is not None:
            calls.append(1)
        var = noise_variance.double().view(-1, 1, 1, 1)
        return ((x.double() - torch.sqrt(1 - var) * x0.double()) / torch.sqrt(var)).float()

    return model


class Gaussian:
    """Data N(mu, diag(s^2)) per pixel; its exact eps predictor and exact ODE solution."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mu = 0.5 * torch.randn(1, *SHAPE[1:], generator=g, dtype=torch.float64)
        self.s = 0.3 + 0.7 * torch.rand(1, *SHAPE[1:], generator=g, dtype=torch.float64)

    def __call__(
        self, x: torch.Tensor, noise_variance: torch.Tensor, cond: Any = None
    ) -> torch.Tensor:
        var = noise_variance.double().view(-1, 1, 1, 1)
        alpha, sigma = torch.sqrt(1 - var), torch.sqrt(var)
        # eps*(x_t) = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2)
        return (sigma * (x.double() - alpha * self.mu) / (alpha**2 * self.s**2 + var)).float()

    def exact_output(self, noise: torch.Tensor, t_end: float) -> torch.Tensor:
        """x0_hat at t_end of the exact ODE solution started from x_1 = noise."""
        a1, b1 = (float(r) for r in rates(torch.tensor(1.0), SCHED))
        z = (noise.double() - a1 * self.mu) / torch.sqrt(a1**2 * self.s**2 + b1**2)
        a, b = (float(r) for r in rates(torch.tensor(t_end), SCHED))
        # x_t = a mu + sqrt(a^2 s^2 + b^2) z;
        # x0_hat(x_t) = mu + a s^2 (x_t - a mu) / (a^2 s^2 + b^2)
        return self.mu + a * self.s**2 * z / torch.sqrt(a**2 * self.s**2 + b**2)


def noise(seed: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())
