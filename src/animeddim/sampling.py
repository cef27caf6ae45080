"""Reverse diffusion from noise to images, inversion and interpolation, as plain functions.

Samplers take the denoising network as an argument, together with the starting noise,
the number of steps, eta and explicit random generators; they return tensors and keep
no state. Image i's randomness comes from its own generator, seeded by (seed, i), so an
image is the same whatever the batch size or the number of processes.

Two samplers share the schedule's continuous time t in [0, 1]:

- ``ddim``: DDIM (Song et al. 2021), S steps uniform in t from t = 1 to t = 1/S;
  deterministic for eta = 0, stochastic for eta > 0.
- ``dpmpp-2m``: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), S evaluations uniform in
  log-SNR lambda from t = 1 to t = 0; second order, deterministic.

Both return the network's data prediction x0_hat at their last evaluation, because the
schedule's clean end t = 0 still has noise_rate = sqrt(1 - max_signal_rate**2) (0.31 by
default): the state x_t itself is never noise free.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch

from .config import ScheduleConfig
from .schedule import predict_x0, rates

# (noisy_images [N x C x H x W], noise_variances [N]) -> predicted noise [N x C x H x W]
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(step, t, noisy_images, pred_images), called once per reverse step
StepCallback = Callable[[int, float, torch.Tensor, torch.Tensor], None]

_SEED_STRIDE = 0x9E3779B97F4A7C15  # spreads (seed, index) pairs over distinct generator seeds


def image_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded by (seed, image index) alone."""
    gens = []
    for i in indices:
        g = torch.Generator()
        g.manual_seed((seed * _SEED_STRIDE + int(i) + 1) % (2**63))
        gens.append(g)
    return gens


def randn_per_image(
    generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str
) -> torch.Tensor:
    """Stack one standard-normal draw of `shape` from each generator: [N x *shape]."""
    draws = [torch.randn(tuple(shape), generator=g) for g in generators]
    return torch.stack(draws).to(device)


def ddim_sample(
    model: Denoiser,
    initial_noise: torch.Tensor,
    steps: int,
    schedule: ScheduleConfig,
    eta: float = 0.0,
    generators: Sequence[torch.Generator] | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDIM reverse process (Algorithm 1, part 2) from t = 1 down to t = 1/steps.

    :param model: the denoiser; called with normalised x_t and noise variances.
    :param initial_noise: [N x C x H x W] standard normal x_T.
    :param steps: number of reverse steps S >= 1.
    :param eta: 0 gives deterministic DDIM; 1 the DDPM-like stochastic sampler.
    :param generators: one per image; needed when eta > 0.
    :return: [N x C x H x W] the final predicted clean images x0_hat (normalised space).
    """
    if eta > 0 and generators is None:
        raise ValueError("eta > 0 needs one random generator per image")
    n = initial_noise.shape[0]
    device = initial_noise.device
    noisy_images = initial_noise
    pred_images = initial_noise
    for s in range(steps):
        # 1. t = (S - s) / S and the next time, one step closer to the data.
        t = torch.full((n,), 1.0 - s / steps, dtype=torch.float64, device=device)
        signal_rate, noise_rate = rates(t, schedule)
        next_signal_rate, next_noise_rate = rates(t - 1.0 / steps, schedule)
        # 2. eps_hat = network(x_t, noise_rate^2); x0_hat = (x_t - noise_rate eps_hat) / signal_rate
        pred_noises = model(noisy_images, (noise_rate**2).float()).float()
        sr, nr = _bcast(signal_rate), _bcast(noise_rate)
        pred_images = predict_x0(noisy_images, pred_noises, sr, nr)
        if callback is not None:
            callback(s, float(t[0]), noisy_images, pred_images)
        if s == steps - 1:
            break
        # 3. x_{t-1} = signal_rate_{t-1} x0_hat + noise_rate_{t-1} eps_hat (DDIM, eta = 0);
        #    with eta > 0 part of the noise direction is replaced by fresh noise
        #    (Song et al. 2021, eq. 12 with sigma_t = eta * sqrt((1-a')/(1-a)) sqrt(1-a/a')).
        if eta > 0:
            a, a_next = signal_rate**2, next_signal_rate**2
            sigma = eta * torch.sqrt((1 - a_next) / (1 - a)) * torch.sqrt(1 - a / a_next)
            direction = torch.sqrt((1 - a_next - sigma**2).clamp(min=0.0))
            z = randn_per_image(generators, noisy_images.shape[1:], device)
            noisy_images = (
                _bcast(next_signal_rate) * pred_images
                + _bcast(direction) * pred_noises
                + _bcast(sigma) * z
            )
        else:
            noisy_images = _bcast(next_signal_rate) * pred_images + _bcast(next_noise_rate) * (
                pred_noises
            )
    return pred_images


def _bcast(r: torch.Tensor) -> torch.Tensor:
    """[N] float64 rates -> [N x 1 x 1 x 1] float32, cast at the model boundary."""
    return r.float().view(-1, 1, 1, 1)


def denormalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalised [N x C x H x W] -> uint8 [N x H x W x C] (clipped to [0, 1] first)."""
    x = images * std.view(1, -1, 1, 1).to(images) + mean.view(1, -1, 1, 1).to(images)
    x = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


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
) -> torch.Tensor:
    """Generate images first_index .. first_index + n - 1 of `seed`.

    :return: uint8 [n x image_size x image_size x channels] on the CPU.
    """
    out = []
    for start in range(first_index, first_index + n, batch_size):
        idx = list(range(start, min(start + batch_size, first_index + n)))
        gens = image_generators(seed, idx)
        noise = randn_per_image(gens, (channels, image_size, image_size), device)
        with torch.no_grad(), autocast or contextlib.nullcontext():
            x0 = ddim_sample(model, noise, steps, schedule, eta=eta, generators=gens)
        out.append(denormalize(x0.float(), mean, std).cpu())
        if progress is not None:
            progress(len(idx))
    return torch.cat(out) if out else torch.empty(0, image_size, image_size, channels)
