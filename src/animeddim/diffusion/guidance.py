"""Classifier-free guidance (Ho & Salimans, 2022) as a wrapper around the denoiser.

    eps = eps_null + w * (eps_cond - eps_null)

with eps_cond = model(x_t, v, cond) and eps_null = model(x_t, v, all-null), both from one
batched call. w = 1 is plain conditional sampling (one call per step), w = 0 is the null
model, and no condition at all (cond None) is unconditional sampling. A sampler sees an
ordinary denoiser and passes `cond` through as always.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NULL = -1  # the code of an unasked attribute


class Guided(nn.Module):
    """forward(x_t [N x C x H x W], noise_variances [N], cond [N x A] codes or None).

    :param model: a conditional denoiser ``(x_t, noise_variances, cond) -> eps_hat``.
    :param guidance: w; 1 is conditional sampling, larger values push harder toward cond.
    """

    def __init__(self, model: Any, guidance: float):
        super().__init__()
        self.model = model
        self.guidance = float(guidance)

    def forward(
        self, noisy_images: torch.Tensor, noise_variances: torch.Tensor, cond: Any = None
    ) -> torch.Tensor:
        w = self.guidance
        if cond is None or w == 1.0:
            return self.model(noisy_images, noise_variances, cond)
        null = torch.full_like(cond, NULL)
        if w == 0.0:
            return self.model(noisy_images, noise_variances, null)
        eps = self.model(
            torch.cat([noisy_images, noisy_images]),
            torch.cat([noise_variances, noise_variances]),
            torch.cat([cond, null]),
        )
        eps_cond, eps_null = eps.chunk(2)
        return eps_null + w * (eps_cond - eps_null)


def guided(model: Any, guidance: float) -> Any:
    """`model` itself at w = 1 (nothing to combine), else the guided wrapper."""
    return model if guidance == 1.0 else Guided(model, guidance)
