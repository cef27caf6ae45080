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

Per-attribute weights: the condition's score splits, by the chain rule, into the rest of the
asked attributes' and attribute a's given the rest,

    eps_cond - eps_null = (eps_rest - eps_null) + (eps_cond - eps_rest),

with eps_rest = model(x_t, v, cond with attribute a null). Weighting the second part w_a
instead of w gives

    eps = eps_null + w * (eps_cond - eps_null) + (w_a - w) * (eps_cond - eps_rest),

one more batched evaluation per attribute so weighted. For an image that does not ask
attribute a, eps_rest = eps_cond and the extra term vanishes. Outside the interval every
weight is 1 (plain conditional).
"""

from __future__ import annotations

from collections.abc import Mapping
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
    :param per_attribute: attribute index (column of cond) -> its own weight w_a, in place
        of w for that attribute given the others (module docstring); {} for none.
    """

    def __init__(
        self,
        model: Any,
        guidance: float,
        interval: tuple[float, float] = ALWAYS,
        per_attribute: Mapping[int, float] | None = None,
    ):
        super().__init__()
        self.model = model
        self.guidance = float(guidance)
        self.interval = check_guidance_interval(interval)
        # attributes whose own weight equals w add nothing: left out
        self.per_attribute = {
            int(a): float(wa) for a, wa in (per_attribute or {}).items() if wa != self.guidance
        }

    def _asked(self, cond: torch.Tensor) -> dict[int, float]:
        """The per-attribute weights of the attributes some image of `cond` asks."""
        if not self.per_attribute:
            return {}
        asked = (cond[:, list(self.per_attribute)] != NULL).any(0).tolist()
        return {a: wa for (a, wa), on in zip(self.per_attribute.items(), asked, strict=True) if on}

    def forward(
        self, noisy_images: torch.Tensor, noise_variances: torch.Tensor, cond: Any = None
    ) -> torch.Tensor:
        w = self.guidance
        # only the weighted attributes some image asks: the others add nothing
        extra = {} if cond is None else self._asked(cond)
        if cond is None or (w == 1.0 and not extra):
            return self.model(noisy_images, noise_variances, cond)
        inside = None if self.interval == ALWAYS else in_interval(noise_variances, self.interval)
        if inside is not None and not bool(inside.any()):
            return self.model(noisy_images, noise_variances, cond)
        null = torch.full_like(cond, NULL)
        everywhere = inside is None or bool(inside.all())
        if w == 0.0 and everywhere and not extra:
            return self.model(noisy_images, noise_variances, null)
        conds = [cond, null]
        for a in extra:
            rest = cond.clone()
            rest[:, a] = NULL
            conds.append(rest)
        k = len(conds)
        eps = self.model(
            torch.cat([noisy_images] * k),
            torch.cat([noise_variances] * k),
            torch.cat(conds),
        )
        eps_cond, eps_null, *eps_rest = eps.chunk(k)
        if everywhere:
            out = eps_null + w * (eps_cond - eps_null)
            for wa, e in zip(extra.values(), eps_rest, strict=True):
                out = out + (wa - w) * (eps_cond - e)
            return out
        # images outside the interval (a batch of mixed noise levels) take w = 1: eps_cond
        shape = (-1, *[1] * (eps.dim() - 1))
        weight = torch.where(inside, w, 1.0).to(eps.dtype).view(shape)
        out = eps_null + weight * (eps_cond - eps_null)
        for wa, e in zip(extra.values(), eps_rest, strict=True):
            out = out + torch.where(inside, wa - w, 0.0).to(eps.dtype).view(shape) * (eps_cond - e)
        return out


def in_interval(noise_variances: torch.Tensor, interval: tuple[float, float]) -> torch.Tensor:
    """[N] bool: lo < sigma <= hi, sigma = sqrt(v / (1 - v)) per noise variance."""
    lo, hi = interval
    v = noise_variances.detach().float()  # float32 on its own device (MPS has no float64)
    sigma = (v / (1.0 - v)).sqrt()  # v = 1 (no signal left) is sigma = inf
    return (sigma > lo) & (sigma <= hi)


def guided(
    model: Any,
    guidance: float,
    interval: tuple[float, float] = ALWAYS,
    per_attribute: Mapping[int, float] | None = None,
) -> Any:
    """`model` itself at w = 1 with no other per-attribute weight (nothing to combine), else
    the guided wrapper."""
    if guidance == 1.0 and all(wa == 1.0 for wa in (per_attribute or {}).values()):
        return model
    return Guided(model, guidance, interval, per_attribute)
