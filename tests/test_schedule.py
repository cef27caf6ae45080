"""The trigonometric schedule, the forward process and log-SNR (diffusion/schedule.py)."""

from __future__ import annotations

import math

import pytest
import torch

from animeddim.config import ScheduleConfig
from animeddim.diffusion.schedule import diffuse, log_snr, predict_x0, rates, time_of_log_snr

SCHED = ScheduleConfig()


def test_schedule_identities_and_end_points():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    s, n = rates(t, SCHED)
    assert s.dtype == torch.float64
    torch.testing.assert_close(s**2 + n**2, torch.ones_like(t), rtol=0, atol=1e-15)
    assert s[0].item() == pytest.approx(0.95, abs=1e-15)
    assert s[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.all(s[1:] < s[:-1])  # monotone: more noise as t grows


def test_true_noise_recovers_x0():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=g)
    eps = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    xt, s, n = diffuse(x0, eps, t, SCHED)
    torch.testing.assert_close(predict_x0(xt, eps, s, n), x0, atol=1e-4, rtol=1e-4)


def test_log_snr_and_its_inverse():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(time_of_log_snr(log_snr(t, SCHED), SCHED), t, rtol=0, atol=1e-12)
    # lambda_max = log(0.95 / sqrt(1 - 0.95^2)) at t = 0, lambda_min at t = 1
    assert float(log_snr(torch.tensor(0.0), SCHED)) == pytest.approx(
        math.log(0.95 / math.sqrt(1 - 0.95**2)), abs=1e-12
    )
    assert float(log_snr(torch.tensor(1.0), SCHED)) == pytest.approx(
        math.log(0.02 / math.sqrt(1 - 0.02**2)), abs=1e-12
    )
    assert torch.all(log_snr(t, SCHED).diff() < 0)  # less signal as t grows
    # log-SNRs beyond the schedule's ends map to its ends
    assert time_of_log_snr(torch.tensor([10.0, -10.0]), SCHED).tolist() == [0.0, 1.0]
