"""The arithmetic of one training step, shared by the loop, its checkpoints and the benchmarks:
the generator of a step's noises and times, EMA decay and update, the learning rate and
the normalisation of a batch.
"""

from __future__ import annotations

import torch


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of noises and times of optimiser step `step`."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + 17) % (2**63))
    return g


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay of optimiser step `step` (0-based): `decay`, or with warm-up
    min(decay, (1 + step) / (10 + step)) (TensorFlow's ExponentialMovingAverage with
    num_updates), which reaches 0.999 at step 8,990; step 0 keeps 10% of the start."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def learning_rate_at(step: int, tc) -> float:
    """The learning rate of optimiser step `step` (0-based): --lr, reached linearly over the
    first `lr_warmup_images` training images when set (a function of the step alone, so a
    resumed run goes on where it stopped)."""
    if not tc.lr_warmup_images:
        return tc.learning_rate
    return tc.learning_rate * min(1.0, (step + 1) * tc.batch_size / tc.lr_warmup_images)


def ema_update(ema: list[torch.Tensor], live: list[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * live, for all tensors in one fused call."""
    torch._foreach_lerp_(ema, live, 1.0 - decay)


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Images [b x C x H x W] in [0, 1] standardised per channel by the data's mean and std [C]."""
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
