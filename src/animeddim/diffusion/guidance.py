"""Classifier-free guidance (Ho & Salimans, 2022) as a wrapper around the denoiser.

    eps = eps_null + w * (eps_cond - eps_null)

with eps_cond = model(x_t, v, cond) and eps_null = model(x_t, v, all-null), both from one
batched call. w = 1 is plain conditional sampling (one call per step), w = 0 is the null
model, and no condition at all (cond None) is unconditional sampling. A sampler sees an
ordinary denoiser and passes `cond` through as always.

Guidance in a limited interval (Kynkaanniemi et al., 2024, "Applying Guidance in a Limited
Interval Improves Sample and Distribution Quality in Diffusion Models"): the weight w applies
only at noise levels sigma = noise_rate / signal_rate in (lo, hi], plain conditional sampling
(w = 1, one call) elsewhere. The network's input is the noise variance v = noise_rate^2, so
sigma = sqrt(v / (1 - v)).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import GUIDE_ALWAYS as ALWAYS
from ..config import check_guidance_interval

NULL = -1  # the code of an unasked attribute


class Guided(nn.Module):
    """forward(x_t [N x C x H x W], noise_variances [N], cond [N x A] codes or None).

    :param model: a conditional denoiser ``(x_t, noise_variances, cond) -> eps_hat``.
    :param guidance: w; 1 is conditional sampling, larger values push harder toward cond.
    :param interval: (lo, hi): guide only where lo < sigma <= hi (sigma = noise / signal rate).
    """

    def __init__(self, model: Any, guidance: float, interval: tuple[float, float] = ALWAYS):
        super().__init__()
        self.model = model
        self.guidance = float(guidance)
        self.interval = check_guidance_interval(interval)

    def forward(
        self, noisy_images: torch.Tensor, noise_variances: torch.Tensor, cond: Any = None
    ) -> torch.Tensor:
        w = self.guidance
        if cond is None or w == 1.0:
            return self.model(noisy_images, noise_variances, cond)
        inside = None if self.interval == ALWAYS else in_interval(noise_variances, self.interval)
        if inside is not None and not bool(inside.any()):
            return self.model(noisy_images, noise_variances, cond)
        null = torch.full_like(cond, NULL)
        everywhere = inside is None or bool(inside.all())
        if w == 0.0 and everywhere:
            return self.model(noisy_images, noise_variances, null)
        eps = self.model(
            torch.cat([noisy_images, noisy_images]),
            torch.cat([noise_variances, noise_variances]),
            torch.cat([cond, null]),
        )
        eps_cond, eps_null = eps.chunk(2)
        if everywhere:
            return eps_null + w * (eps_cond - eps_null)
        # images outside the interval (a batch of mixed noise levels) take w = 1: eps_cond
        weight = torch.where(inside, w, 1.0).to(eps.dtype).view(-1, *[1] * (eps.dim() - 1))
        return eps_null + weight * (eps_cond - eps_null)


def in_interval(noise_variances: torch.Tensor, interval: tuple[float, float]) -> torch.Tensor:
    """[N] bool: lo < sigma <= hi, sigma = sqrt(v / (1 - v)) per noise variance."""
    lo, hi = interval
    v = noise_variances.detach().float()  # float32 on its own device (MPS has no float64)
    sigma = (v / (1.0 - v)).sqrt()  # v = 1 (no signal left) is sigma = inf
    return (sigma > lo) & (sigma <= hi)


def guided(model: Any, guidance: float, interval: tuple[float, float] = ALWAYS) -> Any:
    """`model` itself at w = 1 (nothing to combine), else the guided wrapper."""
    return model if guidance == 1.0 else Guided(model, guidance, interval)
