"""The samplers and their registry (diffusion/samplers.py), checked against exact answers.

`analytic.py` holds the exact denoisers: an oracle that knows x0, and the Gaussian-data
model whose probability-flow ODE has a closed-form solution.
"""

from __future__ import annotations

import math

import pytest
import torch
from analytic import SCHED, SHAPE, Gaussian, max_err, noise, oracle_for

from animeddim.diffusion.generation import denormalize, image_generators
from animeddim.diffusion.samplers import (
    SAMPLERS,
    check_sampler,
    clip_x0,
    data_range,
    ddim_sample,
    ddim_sigma,
    ddim_times,
    default_clip_x0,
    dpmpp_2m_sample,
    logsnr_times,
    randn_per_image,
    sample,
    sampler_help,
    unipc_sample,
)
from animeddim.diffusion.schedule import diffuse, log_snr


def _recorder(seen: list[float]):
    return lambda i, t, x, p: seen.append(t)


def test_time_grids():
    assert ddim_times(5).tolist() == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2], abs=1e-15)
    times = logsnr_times(5, SCHED)
    assert times[0] == 1.0 and times[-1] == 0.0 and torch.all(times[1:] < times[:-1])
    lam = log_snr(times, SCHED)
    torch.testing.assert_close(lam.diff(), lam.diff()[:1].expand(4), rtol=0, atol=1e-12)
    assert logsnr_times(1, SCHED).tolist() == [1.0]
    # Every sampler evaluates at its registered grid, in order.
    for name, spec in SAMPLERS.items():
        seen: list[float] = []
        sample(Gaussian(), noise(0), 5, SCHED, sampler=name, callback=_recorder(seen))
        assert seen == spec.grid(5, SCHED).tolist(), name


def test_registry_rules_and_errors():
    assert list(SAMPLERS)[0] == "ddim"
    assert [n for n, s in SAMPLERS.items() if s.stochastic] == ["ddim"]
    assert not default_clip_x0("ddim") and default_clip_x0("dpmpp-2m")
    assert all(name in sampler_help() for name in SAMPLERS)
    model, x = Gaussian(), noise(3)
    with pytest.raises(ValueError, match="unknown sampler 'euler'; choose one of ddim, dpmpp-2m"):
        sample(model, x, 4, SCHED, sampler="euler")
    with pytest.raises(ValueError, match="dpmpp-2m is deterministic; use eta 0"):
        sample(model, x, 4, SCHED, sampler="dpmpp-2m", eta=0.5)
    check_sampler("ddim", 1.0)  # allowed
    # The two DPM-Solver++ entries differ by their grid only.
    assert not torch.equal(
        sample(model, x, 4, SCHED, sampler="dpmpp-2m"),
        sample(model, x, 4, SCHED, sampler="dpmpp-2m-logsnr"),
    )
    torch.testing.assert_close(
        sample(model, x, 4, SCHED, sampler="dpmpp-2m-logsnr"),
        dpmpp_2m_sample(model, x, logsnr_times(4, SCHED), SCHED),
    )


def test_bad_arguments_are_value_errors_naming_them():
    """Called from Python, a wrong argument was silently used or failed deep inside torch:
    steps 0 returned the noise itself, steps 2.5 ran 3 steps, eta 5 ran, one generator for
    two images gave both the same fresh noise, steps -1 failed in torch.arange."""
    model, x = Gaussian(), noise(2)
    gens = image_generators(0, range(len(x)))
    for steps in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"steps must be an integer >= 1, got {steps!r}"):
            sample(model, x, steps, SCHED, sampler="dpmpp-2m")
    for eta in (5.0, -0.1, "0.5"):
        with pytest.raises(ValueError, match="eta must be a number in \\[0, 1\\], got"):
            sample(model, x, 3, SCHED, eta=eta, generators=gens)
    with pytest.raises(ValueError, match=f"one per image: got 1 for {len(x)} images"):
        sample(model, x, 3, SCHED, eta=1.0, generators=gens[:1])
    with pytest.raises(ValueError, match="initial_noise must be \\[N x C x H x W\\]"):
        sample(model, x[0], 3, SCHED)
    # numpy integers are integers
    import numpy as np

    assert torch.equal(sample(model, x, np.int64(3), SCHED), sample(model, x, 3, SCHED))


def test_an_integer_scalar_tensor_is_a_step_count_and_a_float_or_bool_one_is_not():
    """steps computed in torch (torch.tensor(20)) or numpy were refused as 'not an integer';
    one integer of any kind is now read as its int. A float (even 3.0), a bool and a tensor
    or array holding more than a scalar (torch.tensor([3]), whose one element operator.index
    would read) are still refused with the same message."""
    import re

    import numpy as np

    from animeddim.config import as_integer
    from animeddim.diffusion.inversion import ddim_invert
    from animeddim.diffusion.samplers import check_steps

    model, x = Gaussian(), noise(2)
    want = sample(model, x, 3, SCHED)
    for steps in (torch.tensor(3), torch.tensor(3, dtype=torch.uint8), np.int32(3), np.array(3)):
        assert type(check_steps(steps)) is int and check_steps(steps) == 3
        assert torch.equal(sample(model, x, steps, SCHED), want)
        assert torch.equal(sample(model, x, steps, SCHED, sampler="dpmpp-2m-logsnr"),
                           sample(model, x, 3, SCHED, sampler="dpmpp-2m-logsnr"))  # fmt: skip
    inverted = ddim_invert(model, x, torch.tensor(2), SCHED)
    assert torch.equal(inverted, ddim_invert(model, x, 2, SCHED))
    bad = (torch.tensor(3.0), torch.tensor(2.5), torch.tensor(True), torch.tensor([3]),
           torch.tensor([[3]]), np.array([3]), np.float64(3), np.bool_(True), 3.0, "3",
           torch.tensor(0), np.int64(-1))  # fmt: skip
    for steps in bad:
        message = f"steps must be an integer >= 1, got {steps!r}"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            sample(model, x, steps, SCHED)
    assert [as_integer(v) for v in (7, torch.tensor(-2), np.uint8(4), None, [1])] == [
        7, -2, 4, None, None]  # fmt: skip


@pytest.mark.parametrize("steps", [1, 5, 20])
def test_ddim_with_oracle_recovers_data(steps):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 3, 8, 8, generator=g)
    x = torch.randn(3, 3, 8, 8, generator=g)
    torch.testing.assert_close(
        ddim_sample(oracle_for(x0), x, ddim_times(steps), SCHED), x0, atol=2e-4, rtol=1e-4
    )


def test_ddim_step_is_exact_update():
    """One deterministic step maps x_t to signal' x0 + noise' eps exactly (the DDIM identity)."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 3, 4, 4, generator=g)
    eps = torch.randn(2, 3, 4, 4, generator=g)
    seen = []
    ddim_sample(
        oracle_for(x0),
        0.02 * x0 + math.sqrt(1 - 0.02**2) * eps,
        ddim_times(4),
        SCHED,
        callback=lambda s, t, xt, px0: seen.append((t, xt.clone())),
    )
    assert len(seen) == 4
    for t, xt in seen:
        expected, _, _ = diffuse(x0, eps, torch.full((2,), t), SCHED)
        torch.testing.assert_close(xt, expected, atol=2e-4, rtol=1e-4)


def test_stochastic_ddim_with_oracle_also_recovers_data():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 8, 8, generator=g)
    x = torch.randn(2, 3, 8, 8, generator=g)
    gens = image_generators(0, [0, 1])
    out = ddim_sample(oracle_for(x0), x, ddim_times(10), SCHED, eta=1.0, generators=gens)
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=1e-3)


def _toy_net(x: torch.Tensor, noise_variance: torch.Tensor, cond=None) -> torch.Tensor:
    """A fixed nonlinear 'network' (not an oracle: its eps is not the noise of any x0)."""
    v = noise_variance.double().view(-1, 1, 1, 1)
    return torch.tanh(1.3 * x.double() + 0.7 * v - 0.2).float()


def _ddim_reference(x: torch.Tensor, steps: int, eta: float, seed: int, sigma_of=None):
    """DDIM written from Song et al. 2021 in float64, independently of the package: the
    schedule's angle is linear in t, alpha_bar = cos^2(angle) and, eq. 12 with eq. 16,
    x' = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a')."""
    if sigma_of is None:

        def sigma_of(a, a_next):
            return eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))

    lo, hi = math.acos(SCHED.max_signal_rate), math.acos(SCHED.min_signal_rate)
    alpha_bar = [math.cos(lo + (1 - k / steps) * (hi - lo)) ** 2 for k in range(steps)]
    gens = image_generators(seed, range(x.shape[0]))
    x = x.double()
    for k in range(steps):
        a = alpha_bar[k]
        var = torch.full((x.shape[0],), 1 - a, dtype=torch.float64)
        eps = _toy_net(x, var).double()
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if k == steps - 1:
            return x0
        a_next = alpha_bar[k + 1]
        sigma = sigma_of(a, a_next)
        z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).double()
        x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next - sigma**2) * eps + sigma * z


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_eta_noise_term_matches_a_float64_reference(eta):
    """sigma (eq. 16) and the direction sqrt(1 - a' - sigma^2), against the reference on a
    toy network; a wrong sigma (eta^2 in place of eta, or no noise) is far off."""
    x = noise(10)
    gens = image_generators(4, range(SHAPE[0]))
    out = ddim_sample(_toy_net, x, ddim_times(6), SCHED, eta=eta, generators=gens)
    ref = _ddim_reference(x, 6, eta, seed=4)
    assert max_err(out, ref) < 1e-4
    if eta == 0.5:
        for wrong in (
            lambda a, an: 0.25 * math.sqrt((1 - an) / (1 - a) * (1 - a / an)),
            lambda a, an: 0.0,
        ):
            assert max_err(_ddim_reference(x, 6, eta, seed=4, sigma_of=wrong), ref) > 0.05
    a, a_next = 0.3, 0.6
    posterior_variance = (1 - a_next) / (1 - a) * (1 - a / a_next)  # DDPM's beta tilde
    assert ddim_sigma(1.0, a, a_next) ** 2 == pytest.approx(posterior_variance)


@pytest.mark.parametrize("grid", [ddim_times, logsnr_times])
@pytest.mark.parametrize("steps", [1, 2, 5, 10])
def test_dpmpp_with_oracle_recovers_data_in_exactly_s_calls(steps, grid):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 3, 8, 8, generator=g)
    x = torch.randn(3, 3, 8, 8, generator=g)
    calls: list[int] = []
    out = dpmpp_2m_sample(oracle_for(x0, calls), x, grid(steps, SCHED), SCHED)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    assert len(calls) == steps


def _ode_error(name: str, steps: int, model: Gaussian, x: torch.Tensor) -> float:
    last = float(SAMPLERS[name].grid(steps, SCHED)[-1])
    return max_err(sample(model, x, steps, SCHED, sampler=name), model.exact_output(x, last))


@pytest.mark.parametrize("name", ["dpmpp-2m", "dpmpp-2m-logsnr"])
def test_dpmpp_is_second_order_on_gaussian_data(name):
    """Against the exact ODE solution's x0_hat at each solver's last time, DPM-Solver++(2M)
    is at least 3x closer than DDIM at every step count and its error falls ~S^-2 (DDIM's
    ~S^-1). Measured: 10/20/40 steps, DDIM 0.164/0.090/0.047; time grid 0.037/0.010/0.0029;
    log-SNR grid 0.027/0.0041/0.00096."""
    model, x = Gaussian(), noise(2)
    ddim = {s: _ode_error("ddim", s, model, x) for s in (10, 20, 40)}
    dpm = {s: _ode_error(name, s, model, x) for s in (10, 20, 40)}
    assert all(dpm[s] < ddim[s] / 3 for s in ddim)
    assert 3 < ddim[10] / ddim[40] < 5  # first order: about 4
    assert dpm[10] / dpm[40] > 10  # second order: about 16
    # DDIM itself converges to the exact output (1000 steps end at t = 0.001).
    assert _ode_error("ddim", 1000, model, x) < 5e-3


@pytest.mark.parametrize("steps", [1, 2, 5, 10])
def test_unipc_with_oracle_recovers_data_in_exactly_s_calls(steps):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 3, 8, 8, generator=g)
    calls: list[int] = []
    out = unipc_sample(oracle_for(x0, calls), noise(11, x0.shape), ddim_times(steps), SCHED)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    assert len(calls) == steps


def test_unipc_converges_to_the_exact_ode_solution_faster_than_ddim():
    """UniPC-bh2 (order 2) against the exact ODE solution's x0_hat on DDIM's grid: its error
    falls with the steps, at least as fast as a second-order method's, and is below DDIM's
    and DPM-Solver++(2M)'s (the corrector's gain) at every step count. Measured at 10/20/40
    steps: 0.0038/0.0011/0.00021 (DDIM 0.164/0.090/0.047, DPM-Solver++(2M)
    0.037/0.010/0.0029)."""
    model, x = Gaussian(), noise(2)
    ddim = {s: _ode_error("ddim", s, model, x) for s in (10, 20, 40)}
    dpm = {s: _ode_error("dpmpp-2m", s, model, x) for s in (10, 20, 40)}
    unipc = {s: _ode_error("unipc", s, model, x) for s in (10, 20, 40)}
    assert unipc[10] > unipc[20] > unipc[40]
    assert all(unipc[s] < ddim[s] / 3 and unipc[s] < dpm[s] for s in ddim)
    assert unipc[10] / unipc[40] > 10  # second order or better: >= 16


def test_data_range_maps_pixel_bounds_and_clip_is_per_channel():
    mean, std = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0.1, 0.25, 0.3])
    low, high = data_range(mean, std)
    torch.testing.assert_close(low, torch.tensor([-2.0, -2.0, -3.0]))
    torch.testing.assert_close(high, torch.tensor([8.0, 2.0, 1 / 3]))
    u8 = denormalize(torch.stack([low, high]).view(2, 3, 1, 1), mean, std)
    assert u8.flatten().tolist() == [0, 0, 0, 255, 255, 255]
    x = torch.tensor([-5.0, 0.0, 9.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    clipped = clip_x0(x, (low, high))
    assert torch.equal(
        clipped[:, :, 0, 0], torch.stack([low[0], torch.tensor(0.0), high[2]]).expand(2, 3)
    )
    assert clip_x0(x, None) is x


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_clipping_with_an_oracle_returns_the_clipped_data(sampler):
    """Every x0_hat is clipped, so an exact network for data partly outside the range gives
    exactly the clipped data; data inside the range is untouched by clipping."""
    g = torch.Generator().manual_seed(4)
    x0, x = 2.0 * torch.randn(*SHAPE, generator=g), torch.randn(*SHAPE, generator=g)
    bounds = (torch.full((3,), -1.0), torch.full((3,), 1.0))
    assert (x0.abs() > 1).float().mean() > 0.5
    seen: list[torch.Tensor] = []
    out = sample(
        oracle_for(x0), x, 6, SCHED, sampler=sampler, x0_range=bounds,
        callback=lambda i, t, x, p: seen.append(p),
    )  # fmt: skip
    torch.testing.assert_close(out, x0.clamp(-1, 1), atol=1e-4, rtol=0)
    assert len(seen) == 6 and all(float(p.abs().max()) <= 1.0 for p in seen)
    torch.testing.assert_close(
        sample(oracle_for(x0), x, 6, SCHED, sampler=sampler), x0, atol=1e-4, rtol=1e-4
    )
    inside = x0.clamp(-0.9, 0.9)
    torch.testing.assert_close(
        sample(oracle_for(inside), x, 6, SCHED, sampler=sampler, x0_range=bounds),
        sample(oracle_for(inside), x, 6, SCHED, sampler=sampler),
    )


def test_stochastic_ddim_with_clipping_stays_consistent():
    """With eta = 1 the noise direction is re-derived from the clipped x0_hat: an exact
    network for in-range data still returns the data, clipped or not."""
    g = torch.Generator().manual_seed(5)
    x0 = (0.5 * torch.randn(*SHAPE, generator=g)).clamp(-0.9, 0.9)
    x = torch.randn(*SHAPE, generator=g)
    bounds = (torch.full((3,), -1.0), torch.full((3,), 1.0))
    gens = [torch.Generator().manual_seed(i) for i in range(SHAPE[0])]
    out = ddim_sample(
        oracle_for(x0), x, ddim_times(5), SCHED, eta=1.0, generators=gens, x0_range=bounds
    )
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_per_image_noise_depends_only_on_seed_and_index():
    a = randn_per_image(image_generators(3, [4, 5]), (2, 2), "cpu")
    b = randn_per_image(image_generators(3, [5]), (2, 2), "cpu")
    torch.testing.assert_close(a[1], b[0], rtol=0, atol=0)


def test_registry_agrees_with_the_torch_free_name_table(monkeypatch):
    from animeddim.diffusion import sampler_names, samplers

    assert tuple(SAMPLERS) == sampler_names.SAMPLER_NAMES
    for name, spec in SAMPLERS.items():
        info = sampler_names.SAMPLER_INFO[name]
        assert (spec.stochastic, spec.clip_x0, spec.help) == (
            info.stochastic,
            info.clip_x0,
            info.help,
        )
    assert sampler_names.clipped_by_default() == tuple(n for n, s in SAMPLERS.items() if s.clip_x0)
    assert sampler_help() == sampler_names.sampler_help()
    # A sampler added to one list and not the other stops the import, naming both lists.
    monkeypatch.setitem(samplers._FUNCTIONS, "euler", (ddim_sample, ddim_times))
    with pytest.raises(ImportError, match="euler.*must name the same samplers"):
        samplers._registry()
