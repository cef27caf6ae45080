"""Training objectives: the prediction target, the loss and its weighting over noise levels.

With x_t = alpha x_0 + sigma eps (alpha = signal_rate, sigma = noise_rate, alpha^2 +
sigma^2 = 1, `schedule.rates`) the network predicts either

- eps (the paper's, and the Keras example's): the noise; or
- v = alpha eps - sigma x_0 (Salimans & Ho 2022, "Progressive distillation", sec. 4): the
  velocity of x_t along the schedule's angle. Then eps = sigma x_t + alpha v and
  x_0 = alpha x_t - sigma v.

Whatever the network predicts, every sampler, inversion and guidance gets eps: `UNet`
converts its own output (`eps_from_v`), and `as_eps` wraps any other denoiser. Only the
noise variance sigma^2, the network's own input, is needed for the conversion, so the
network still never sees the schedule.

The loss is the mean absolute error (the Keras example's) or the squared error (the
paper's eq. 4, ||eps - eps_theta||^2) between the prediction and its target. Min-SNR-gamma
weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
Strategy", eq. 10 and its table of equivalent weights) weights each image's squared error
so that, in x_0 terms, its weight is min(SNR, gamma), SNR = alpha^2 / sigma^2:
w = min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RunConfig, ScheduleConfig, parse_guidance_interval
from .schedule import predict_x0, rates, time_of_log_snr


def eps_from_v(
    noisy_images: torch.Tensor, pred_v: torch.Tensor, noise_variances: torch.Tensor
) -> torch.Tensor:
    """eps_hat = sigma x_t + alpha v_hat, with sigma^2 the noise variance and alpha^2 =
    1 - sigma^2 (variance preserving). [N x C x H x W] float32."""
    var = noise_variances.float().reshape(-1, 1, 1, 1)
    return var.sqrt() * noisy_images.float() + (1.0 - var).sqrt() * pred_v.float()


def v_target(
    images: torch.Tensor, noises: torch.Tensor, signal_rate: torch.Tensor, noise_rate: torch.Tensor
) -> torch.Tensor:
    """v = alpha eps - sigma x_0 (rates [N x 1 x 1 x 1] or scalars)."""
    return signal_rate * noises - noise_rate * images


def x0_from_v(
    noisy_images: torch.Tensor, pred_v: torch.Tensor, signal_rate, noise_rate
) -> torch.Tensor:
    """x0_hat = alpha x_t - sigma v_hat."""
    return signal_rate * noisy_images - noise_rate * pred_v


class EpsFromV(nn.Module):
    """A v-predicting denoiser seen as an eps-predicting one: forward(x_t, noise_variances,
    cond) -> eps_hat = sigma x_t + alpha v_hat (float32)."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(
        self, noisy_images: torch.Tensor, noise_variances: torch.Tensor, cond: Any = None
    ) -> torch.Tensor:
        v = self.model(noisy_images, noise_variances, cond)
        return eps_from_v(noisy_images, v, noise_variances)


def as_eps(model: Any, prediction: str) -> Any:
    """The denoiser every sampler takes (eps out) of a `prediction` ("eps" | "v") model."""
    return model if prediction == "eps" else EpsFromV(model)


def min_snr_weights(
    t: torch.Tensor, schedule: ScheduleConfig, prediction: str, gamma: float
) -> torch.Tensor:
    """Min-SNR-gamma loss weight of each time, for the squared error of `prediction`.

    :param t: [N] diffusion times in [0, 1].
    :return: [N] float64: min(SNR, gamma) / SNR (eps) or min(SNR, gamma) / (SNR + 1) (v).
    """
    signal_rate, noise_rate = rates(t, schedule)
    snr = (signal_rate / noise_rate) ** 2
    capped = snr.clamp(max=gamma)
    return capped / snr if prediction == "eps" else capped / (snr + 1.0)


def focus_times(t: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """A batch's diffusion times with cfg.train.noise_focus applied: the first
    round(noise_focus_share * N) of the [N] uniform draws `t` are mapped linearly into the
    times of the noise levels sigma in (LO, HI], the rest kept. The same draws are used
    (nothing more is drawn), so share 0 gives `t` itself; the images are shuffled, so the
    first ones are any images. Done on the global batch, before each rank takes its slice."""
    tc = cfg.train
    k = round(tc.noise_focus_share * len(t))
    if k == 0:
        return t
    lo, hi = parse_guidance_interval(tc.noise_focus)
    ends = time_of_log_snr(-torch.tensor([lo, hi], dtype=torch.float64).log(), cfg.schedule)
    t_lo, t_hi = ends.tolist()
    return torch.cat([t_lo + t[:k] * (t_hi - t_lo), t[k:]])


def objective(
    pred: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    cfg: RunConfig,
) -> torch.Tensor:
    """The training loss of predictions `pred` of `target` ([N x C x H x W]) at times t [N]:
    cfg.train.loss (mae | mse), each image's mean weighted by cfg.train.loss_weight, then the
    mean over images. Unweighted, it is F.l1_loss / F.mse_loss itself (the Keras example's
    loss, bit for bit)."""
    tc = cfg.train
    if tc.loss_weight == "none":
        return F.l1_loss(pred, target) if tc.loss == "mae" else F.mse_loss(pred, target)
    err = (pred - target).abs() if tc.loss == "mae" else (pred - target).square()
    w = min_snr_weights(t, cfg.schedule, cfg.model.prediction, tc.min_snr_gamma)
    return (err.mean(dim=tuple(range(1, err.ndim))) * w.to(err.dtype)).mean()


def target_and_x0(
    prediction: str,
    images: torch.Tensor,
    noises: torch.Tensor,
    noisy_images: torch.Tensor,
    pred: torch.Tensor,
    signal_rate: torch.Tensor,
    noise_rate: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target of the network's raw prediction `pred` and the x0_hat it implies.

    eps: (eps, (x_t - sigma eps_hat) / alpha) (Algorithm 1, step 2.5); v: (alpha eps - sigma
    x_0, alpha x_t - sigma v_hat). Rates are [N x 1 x 1 x 1].
    """
    if prediction == "v":
        target = v_target(images, noises, signal_rate, noise_rate)
        return target, x0_from_v(noisy_images, pred, signal_rate, noise_rate)
    return noises, predict_x0(noisy_images, pred, signal_rate, noise_rate)
