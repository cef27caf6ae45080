"""Seeded image generation: per-image random generators, batching, uint8 output.

Image i's randomness comes from its own generator, seeded by (seed, i), so an image is the
same whatever the batch size or the number of processes (EDM's StackedRandomGenerator).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..config import ScheduleConfig, as_integer
from .samplers import (
    Denoiser,
    check_sampler,
    check_steps,
    randn_per_image,
    sample,
    sampler_x0_range,
)

_SEED_STRIDE = 0x9E3779B97F4A7C15  # spreads (seed, index) pairs over distinct generator seeds


def image_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded by (seed, image index) alone."""
    gens = []
    for i in indices:
        g = torch.Generator()
        g.manual_seed((seed * _SEED_STRIDE + int(i) + 1) % (2**63))
        gens.append(g)
    return gens


def denormalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalised [N x C x H x W] -> uint8 [N x H x W x C] (clipped to [0, 1] first)."""
    x = images * std.view(1, -1, 1, 1).to(images) + mean.view(1, -1, 1, 1).to(images)
    x = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


def batch_cond(cond: Any, start: int, stop: int) -> Any:
    """Images start .. stop - 1 of per-image conditioning: a tensor (or list) with one row
    per image is sliced; None (and anything else) is passed unchanged."""
    if isinstance(cond, (torch.Tensor, list, tuple)):
        return cond[start:stop]
    return cond


def _count(value: int, name: str, least: int) -> int:
    """`value` as an int if it is an integer >= `least` (`config.as_integer`), else ValueError
    naming it."""
    count = as_integer(value)
    if count is None or count < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return count


def generate(
    model: Denoiser,
    *,
    mean: torch.Tensor,
    std: torch.Tensor,
    schedule: ScheduleConfig,
    image_size: int,
    channels: int = 3,
    n: int,
    seed: int = 0,
    steps: int = 20,
    eta: float = 0.0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
    first_index: int = 0,
    progress: Callable[[int], None] | None = None,
    sampler: str = "ddim",
    clip: bool | None = None,
    cond: Any = None,
) -> torch.Tensor:
    """Generate images first_index .. first_index + n - 1 of `seed`.

    :param sampler: a name in `samplers.SAMPLERS`; `steps` network evaluations.
    :param clip: clip x0_hat to the data range at every step; None: the sampler's default.
    :param cond: conditioning of the n images: a tensor or list with one row per image
        (sliced per batch), or None.
    :param progress: called with the number of images finished after each batch.
    :return: uint8 [n x image_size x image_size x channels] on the CPU.
    :raises ValueError: naming the bad argument (`samplers.sample`'s, n < 0, batch_size < 1).
    """
    check_sampler(sampler, eta)
    steps = check_steps(steps)
    n, batch_size = _count(n, "n", 0), _count(batch_size, "batch_size", 1)
    x0_range = sampler_x0_range(clip, sampler, mean, std)
    out = []
    for start in range(first_index, first_index + n, batch_size):
        idx = list(range(start, min(start + batch_size, first_index + n)))
        gens = image_generators(seed, idx)
        noise = randn_per_image(gens, (channels, image_size, image_size), device)
        lo = start - first_index
        with torch.no_grad(), autocast or contextlib.nullcontext():
            x0 = sample(
                model,
                noise,
                steps,
                schedule,
                sampler=sampler,
                eta=eta,
                generators=gens,
                x0_range=x0_range,
                cond=batch_cond(cond, lo, lo + len(idx)),
            )
        out.append(denormalize(x0.float(), mean, std).cpu())
        if progress is not None:
            progress(len(idx))
    return (
        torch.cat(out)
        if out
        else torch.empty(0, image_size, image_size, channels, dtype=torch.uint8)
    )
