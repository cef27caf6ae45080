"""DPM-Solver++(2M), DDIM inversion, slerp and PSNR: checked against exact answers.

The analytic model is the exact noise predictor of Gaussian data x0 ~ N(mu, diag(s^2)):
with x_t = alpha x0 + sigma eps, Cov(eps, x_t) = sigma and Var(x_t) = alpha^2 s^2 + sigma^2,
so eps*(x_t) = E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2). Its
probability-flow ODE keeps each coordinate's standard score
z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) fixed (a 1-D flow between Gaussians
is their monotone affine map), so the exact sampler output is known in closed form.
"""

from __future__ import annotations

import math

import pytest
import torch

from animeddim.config import ScheduleConfig, UNetConfig
from animeddim.sampling import (
    PSNR_CAP_DB,
    clip_x0,
    data_range,
    ddim_invert,
    ddim_sample,
    denormalize,
    dpmpp_2m_sample,
    dpmpp_times,
    generate,
    interpolation_noises,
    log_snr,
    psnr,
    sample,
    slerp,
    time_of_log_snr,
)
from animeddim.schedule import rates
from animeddim.unet import UNet

SCHED = ScheduleConfig()
TINY = UNetConfig(image_size=16, widths=[8, 16], block_depth=1, embedding_dims=8)
SHAPE = (4, 3, 8, 8)


def oracle_for(x0: torch.Tensor, calls: list[int] | None = None):
    """A 'network' that returns the exact noise of x_t given the true clean images."""

    def model(x: torch.Tensor, noise_variance: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(1)
        var = noise_variance.double().view(-1, 1, 1, 1)
        return ((x.double() - torch.sqrt(1 - var) * x0.double()) / torch.sqrt(var)).float()

    return model


class Gaussian:
    """Data N(mu, diag(s^2)) per pixel; its exact eps predictor and exact ODE solution."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mu = 0.5 * torch.randn(1, *SHAPE[1:], generator=g, dtype=torch.float64)
        self.s = 0.3 + 0.7 * torch.rand(1, *SHAPE[1:], generator=g, dtype=torch.float64)

    def __call__(self, x: torch.Tensor, noise_variance: torch.Tensor) -> torch.Tensor:
        var = noise_variance.double().view(-1, 1, 1, 1)
        alpha, sigma = torch.sqrt(1 - var), torch.sqrt(var)
        # eps*(x_t) = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2)
        return (sigma * (x.double() - alpha * self.mu) / (alpha**2 * self.s**2 + var)).float()

    def exact_output(self, noise: torch.Tensor, t_end: float) -> torch.Tensor:
        """x0_hat at t_end of the exact ODE solution started from x_1 = noise."""
        a1, b1 = (float(r) for r in rates(torch.tensor(1.0), SCHED))
        z = (noise.double() - a1 * self.mu) / torch.sqrt(a1**2 * self.s**2 + b1**2)
        a, b = (float(r) for r in rates(torch.tensor(t_end), SCHED))
        # x_t = a mu + sqrt(a^2 s^2 + b^2) z;
        # x0_hat(x_t) = mu + a s^2 (x_t - a mu) / (a^2 s^2 + b^2)
        return self.mu + a * self.s**2 * z / torch.sqrt(a**2 * self.s**2 + b**2)


def _noise(seed: int) -> torch.Tensor:
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed))


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def test_log_snr_time_inverse_and_grids():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(time_of_log_snr(log_snr(t, SCHED), SCHED), t, rtol=0, atol=1e-12)
    # lambda_max = log(0.95 / sqrt(1 - 0.95^2)) at t = 0
    assert float(log_snr(torch.tensor(0.0), SCHED)) == pytest.approx(
        math.log(0.95 / math.sqrt(1 - 0.95**2)), abs=1e-12
    )
    times = dpmpp_times(5, SCHED, "logsnr")
    assert times[0] == 1.0 and times[-1] == 0.0 and torch.all(times[1:] < times[:-1])
    lam = log_snr(times, SCHED)
    torch.testing.assert_close(lam.diff(), lam.diff()[:1].expand(4), rtol=0, atol=1e-12)
    assert dpmpp_times(1, SCHED, "logsnr").tolist() == [1.0]
    # The default grid is DDIM's: t = 1, 1 - 1/S, ..., 1/S.
    seen: list[float] = []
    ddim_sample(Gaussian(), _noise(0), 5, SCHED, callback=lambda i, t, x, p: seen.append(t))
    assert dpmpp_times(5, SCHED).tolist() == pytest.approx(seen, abs=1e-15)
    assert dpmpp_times(5, SCHED).tolist() == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2], abs=1e-15)
    with pytest.raises(ValueError, match="time or logsnr"):
        dpmpp_times(5, SCHED, "karras")


@pytest.mark.parametrize("spacing", ["time", "logsnr"])
@pytest.mark.parametrize("steps", [1, 2, 5, 10])
def test_dpmpp_with_oracle_recovers_data_in_exactly_s_calls(steps, spacing):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 3, 8, 8, generator=g)
    noise = torch.randn(3, 3, 8, 8, generator=g)
    calls: list[int] = []
    seen: list[float] = []
    out = dpmpp_2m_sample(
        oracle_for(x0, calls),
        noise,
        steps,
        SCHED,
        callback=lambda i, t, x, p: seen.append(t),
        spacing=spacing,
    )
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    assert len(calls) == steps
    assert seen == dpmpp_times(steps, SCHED, spacing).tolist()


@pytest.mark.parametrize("spacing", ["time", "logsnr"])
def test_dpmpp_is_second_order_on_gaussian_data(spacing):
    """Against the exact ODE solution's x0_hat at each solver's last time, DPM-Solver++(2M)
    is at least 3x closer than DDIM at every step count and its error falls ~S^-2 (DDIM's
    ~S^-1). Measured: 10/20/40 steps, DDIM 0.164/0.090/0.047; time grid 0.037/0.010/0.0029;
    log-SNR grid 0.027/0.0041/0.00096."""
    model, noise = Gaussian(), _noise(2)

    def error(sampler, steps: int) -> float:
        kw = {"spacing": spacing} if sampler is dpmpp_2m_sample else {}
        last = float(dpmpp_times(steps, SCHED, kw.get("spacing", "time"))[-1])
        return _max_err(sampler(model, noise, steps, SCHED, **kw), model.exact_output(noise, last))

    ddim = {s: error(ddim_sample, s) for s in (10, 20, 40)}
    dpm = {s: error(dpmpp_2m_sample, s) for s in (10, 20, 40)}
    print(f"max |error| vs exact ODE output ({spacing}): ddim {ddim}  dpmpp-2m {dpm}")
    assert all(dpm[s] < ddim[s] / 3 for s in ddim)
    assert ddim[10] / ddim[40] < 5  # first order: about 4
    assert dpm[10] / dpm[40] > 10  # second order: about 16
    # DDIM itself converges to the exact output (1000 steps end at t = 0.001).
    assert _max_err(ddim_sample(model, noise, 1000, SCHED), model.exact_output(noise, 1e-3)) < 5e-3


def test_sample_dispatch_and_errors():
    model, noise = Gaussian(), _noise(3)
    torch.testing.assert_close(sample(model, noise, 4, SCHED), ddim_sample(model, noise, 4, SCHED))
    torch.testing.assert_close(
        sample(model, noise, 4, SCHED, sampler="dpmpp-2m"), dpmpp_2m_sample(model, noise, 4, SCHED)
    )
    torch.testing.assert_close(
        sample(model, noise, 4, SCHED, sampler="dpmpp-2m-logsnr"),
        dpmpp_2m_sample(model, noise, 4, SCHED, spacing="logsnr"),
    )
    assert not torch.equal(
        sample(model, noise, 4, SCHED, sampler="dpmpp-2m"),
        sample(model, noise, 4, SCHED, sampler="dpmpp-2m-logsnr"),
    )
    with pytest.raises(ValueError, match="ddim, dpmpp-2m, dpmpp-2m-logsnr"):
        sample(model, noise, 4, SCHED, sampler="euler")
    with pytest.raises(ValueError, match="dpmpp-2m is deterministic; use eta 0"):
        sample(model, noise, 4, SCHED, sampler="dpmpp-2m", eta=0.5)


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


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m", "dpmpp-2m-logsnr"])
def test_clipping_with_an_oracle_returns_the_clipped_data(sampler):
    """Every x0_hat is clipped, so an exact network for data partly outside the range gives
    exactly the clipped data; data inside the range is untouched by clipping."""
    g = torch.Generator().manual_seed(4)
    x0, noise = 2.0 * torch.randn(*SHAPE, generator=g), torch.randn(*SHAPE, generator=g)
    bounds = (torch.full((3,), -1.0), torch.full((3,), 1.0))
    assert (x0.abs() > 1).float().mean() > 0.5
    seen: list[torch.Tensor] = []
    out = sample(
        oracle_for(x0), noise, 6, SCHED, sampler=sampler, x0_range=bounds,
        callback=lambda i, t, x, p: seen.append(p),
    )  # fmt: skip
    torch.testing.assert_close(out, x0.clamp(-1, 1), atol=1e-4, rtol=0)
    assert len(seen) == 6 and all(float(p.abs().max()) <= 1.0 for p in seen)
    torch.testing.assert_close(
        sample(oracle_for(x0), noise, 6, SCHED, sampler=sampler), x0, atol=1e-4, rtol=1e-4
    )
    inside = x0.clamp(-0.9, 0.9)
    torch.testing.assert_close(
        sample(oracle_for(inside), noise, 6, SCHED, sampler=sampler, x0_range=bounds),
        sample(oracle_for(inside), noise, 6, SCHED, sampler=sampler),
    )


def test_stochastic_ddim_with_clipping_stays_consistent():
    """With eta = 1 the noise direction is re-derived from the clipped x0_hat: an exact
    network for in-range data still returns the data, clipped or not."""
    g = torch.Generator().manual_seed(5)
    x0 = (0.5 * torch.randn(*SHAPE, generator=g)).clamp(-0.9, 0.9)
    noise = torch.randn(*SHAPE, generator=g)
    bounds = (torch.full((3,), -1.0), torch.full((3,), 1.0))
    gens = [torch.Generator().manual_seed(i) for i in range(SHAPE[0])]
    out = ddim_sample(oracle_for(x0), noise, 5, SCHED, eta=1.0, generators=gens, x0_range=bounds)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def _reconstruction_error(model, images: torch.Tensor, steps: int, **kw) -> float:
    noise = ddim_invert(model, images, steps, SCHED, **kw)
    return _max_err(ddim_sample(model, noise, steps, SCHED), images)


def test_inversion_reconstructs_gaussian_samples_better_with_more_steps():
    model = Gaussian()
    images = model.exact_output(_noise(4), 0.0).float()  # typical samples of the data
    default = [_reconstruction_error(model, images, s) for s in (10, 50, 200)]
    classic = [_reconstruction_error(model, images, s, step_iterations=0) for s in (10, 50, 200)]
    print(f"max |x - ddim(invert(x))| at 10/50/200 steps: default {default} classic {classic}")
    assert default[0] > default[1] > default[2] and default[2] < 2e-3
    assert classic[0] > classic[1] > classic[2] and classic[2] < 0.05
    assert all(d < c for d, c in zip(default, classic, strict=True))


def test_inversion_start_iterations_matter():
    """Treating the images as the t = 0 state (no start solve) leaves a large error."""
    model = Gaussian()
    images = model.exact_output(_noise(5), 0.0).float()
    assert _reconstruction_error(model, images, 50, start_iterations=0) > 10 * (
        _reconstruction_error(model, images, 50)
    )


def _tiny_unet() -> UNet:
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    torch.nn.init.normal_(model.head.weight, std=0.01)  # small but non-zero output
    return model


def test_inversion_of_generated_images_on_tiny_unet():
    """An untrained net's 'images' are far outside [-2, 2] (x0_hat = x_1 / 0.02 at t = 1) and
    mostly clip to 0 or 255, so the recovered starting noise is checked as well as PSNR."""
    model = _tiny_unet()
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    results = {}
    with torch.no_grad():
        for steps in (10, 50):
            images = ddim_sample(model, noise, steps, SCHED)
            target = denormalize(images, mean, std)
            for label, kw in (("default", {}), ("classic", {"step_iterations": 0})):
                z = ddim_invert(model, images, steps, SCHED, **kw)
                out = denormalize(ddim_sample(model, z, steps, SCHED), mean, std)
                results[steps, label] = float(psnr(out, target).min())
                results[steps, label, "noise"] = _max_err(z, noise)
    print(f"min PSNR (dB) of ddim(invert(x)): {results}")
    assert results[50, "default"] > 30
    assert results[10, "default"] > 30
    assert results[50, "default", "noise"] < 1e-2


def test_inversion_callback_and_call_count():
    calls: list[int] = []
    seen: list[tuple[int, float]] = []
    x0 = _noise(7)
    ddim_invert(
        oracle_for(x0, calls),
        x0,
        5,
        SCHED,
        lambda k, t, x, p: seen.append((k, t)),
        start_iterations=3,
        step_iterations=2,
    )
    assert len(calls) == 3 + 4 * 3
    assert [k for k, _ in seen] == [4, 3, 2, 1, 0] and seen[-1][1] == 1.0


def test_slerp_endpoints_norms_and_frames():
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(3, 16, 16, generator=g), torch.randn(3, 16, 16, generator=g)
    b = b * (a.norm() / b.norm())  # equal norms
    frames = interpolation_noises(a, b, 9)
    assert frames.shape == (9, 3, 16, 16) and frames.dtype == a.dtype
    assert torch.equal(frames[0], a) and torch.equal(frames[-1], b)
    norms = frames.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, a.norm().expand(9), rtol=1e-5, atol=1e-5)
    # half way lies on the bisector of the great circle, unlike the shrunken linear mean
    mid = slerp(a[None], b[None], 0.5)[0]
    torch.testing.assert_close(mid, (a + b) / (a + b).norm() * a.norm(), rtol=1e-5, atol=1e-5)
    # batched pairs with per-pair weights; parallel inputs fall back to linear interpolation
    pairs = slerp(torch.stack([a, a]), torch.stack([b, 2 * a]), torch.tensor([0.0, 0.5]))
    assert torch.equal(pairs[0], a)
    torch.testing.assert_close(pairs[1], 1.5 * a)


def test_generate_dpmpp_independent_of_batch_size():
    model = _tiny_unet()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    kw = dict(mean=torch.full((3,), 0.5), std=torch.full((3,), 0.25), schedule=SCHED,
              image_size=16, n=5, seed=7, steps=3, sampler="dpmpp-2m")  # fmt: skip
    a = generate(model, batch_size=5, **kw)
    b = generate(model, batch_size=2, **kw)
    assert a.dtype == torch.uint8 and a.shape == (5, 16, 16, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(model, batch_size=5, **{**kw, "sampler": "ddim"}))
    # DPM-Solver++ clips x0_hat by default, DDIM does not; this network's x0_hat leaves the
    # data range, so clipping changes the images.
    assert torch.equal(a, generate(model, batch_size=5, clip=True, **kw))
    assert not torch.equal(a, generate(model, batch_size=5, clip=False, **kw))
    ddim_kw = {**kw, "sampler": "ddim"}
    assert torch.equal(generate(model, **ddim_kw), generate(model, clip=False, **ddim_kw))
    assert not torch.equal(generate(model, **ddim_kw), generate(model, clip=True, **ddim_kw))
    with pytest.raises(ValueError, match="dpmpp-2m is deterministic"):
        generate(model, **{**kw, "eta": 0.5})
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        generate(model, **{**kw, "sampler": "plms"})


def test_psnr_cap_and_known_value():
    g = torch.Generator().manual_seed(9)
    a = torch.randint(1, 256, (2, 8, 8, 3), generator=g, dtype=torch.uint8)
    assert psnr(a, a).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]
    # every pixel off by one level: MSE 1, PSNR = 20 log10(255) = 48.13 dB
    p = psnr(a, a - 1)
    assert p.dtype == torch.float64 and p.shape == (2,)
    torch.testing.assert_close(
        p, torch.full((2,), 20 * math.log10(255), dtype=torch.float64), rtol=0, atol=1e-12
    )
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(a, a[:1])
