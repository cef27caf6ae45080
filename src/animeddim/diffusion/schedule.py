"""Continuous-time trigonometric diffusion schedule and the forward process.

Diffusion time t runs from 0 (clean) to 1 (almost pure noise). The schedule maps t to
an angle and returns (signal_rate, noise_rate) = (cos angle, sin angle), so that
signal_rate**2 + noise_rate**2 == 1 (variance preserving). The log signal-to-noise ratio
lambda_t = log(signal_rate / noise_rate) and its inverse live here too, for the samplers
that step in lambda and for the report. Arithmetic in float64, cast at the model boundary.
"""

from __future__ import annotations

import math

import torch

from ..config import ScheduleConfig


def rates(t: torch.Tensor, cfg: ScheduleConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Signal and noise rates of diffusion times.

    :param t: times in [0, 1], any shape.
    :return: (signal_rate, noise_rate), float64, the shape of t.
    """
    start_angle, end_angle = _angles(cfg)
    # angle = acos(max_signal_rate) + t * (acos(min_signal_rate) - acos(max_signal_rate))
    angle = start_angle + t.to(torch.float64) * (end_angle - start_angle)
    return torch.cos(angle), torch.sin(angle)


def _angles(cfg: ScheduleConfig) -> tuple[float, float]:
    """The schedule's angles at t = 0 and t = 1."""
    return math.acos(cfg.max_signal_rate), math.acos(cfg.min_signal_rate)


def log_snr(t: torch.Tensor, cfg: ScheduleConfig) -> torch.Tensor:
    """lambda_t = log(alpha_t / sigma_t) = log(signal_rate / noise_rate), float64, shape of t."""
    signal_rate, noise_rate = rates(t, cfg)
    return torch.log(signal_rate / noise_rate)


def time_of_log_snr(lam: torch.Tensor, cfg: ScheduleConfig) -> torch.Tensor:
    """Inverse of `log_snr`: diffusion times t in [0, 1] (float64) of log-SNRs `lam`.

    With signal_rate = cos(angle) and noise_rate = sin(angle), lambda = log(cot(angle)), so
    angle = atan(exp(-lambda)); the schedule's angle is linear in t.
    """
    start_angle, end_angle = _angles(cfg)
    angle = torch.atan(torch.exp(-lam.to(torch.float64)))
    return ((angle - start_angle) / (end_angle - start_angle)).clamp(0.0, 1.0)


def diffuse(
    images: torch.Tensor, noises: torch.Tensor, t: torch.Tensor, cfg: ScheduleConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward process x_t = signal_rate * x_0 + noise_rate * eps (Algorithm 1, step 1.3).

    :param images: [N x C x H x W] normalised clean images x_0.
    :param noises: [N x C x H x W] standard normal eps.
    :param t: [N] diffusion times in [0, 1].
    :return: (noisy_images, signal_rate, noise_rate); rates are [N x 1 x 1 x 1] in the
        images' dtype.
    """
    signal_rate, noise_rate = rates(t, cfg)
    signal_rate = signal_rate.to(images.dtype).view(-1, 1, 1, 1)
    noise_rate = noise_rate.to(images.dtype).view(-1, 1, 1, 1)
    return signal_rate * images + noise_rate * noises, signal_rate, noise_rate


def predict_x0(
    noisy_images: torch.Tensor,
    pred_noises: torch.Tensor,
    signal_rate: torch.Tensor,
    noise_rate: torch.Tensor,
) -> torch.Tensor:
    """x0_hat = (x_t - noise_rate * eps_hat) / signal_rate (Algorithm 1, step 2.5)."""
    return (noisy_images - noise_rate * pred_noises) / signal_rate
