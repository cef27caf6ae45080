"""DDIM inversion, slerp and PSNR (diffusion/inversion.py), checked against exact answers."""

from __future__ import annotations

import math

import torch
from analytic import SCHED, Gaussian, max_err, noise, oracle_for

from animeddim.config import UNetConfig
from animeddim.diffusion.generation import denormalize
from animeddim.diffusion.inversion import (
    PSNR_CAP_DB,
    ddim_invert,
    interpolation_noises,
    psnr,
    slerp,
)
from animeddim.diffusion.samplers import ddim_sample, ddim_times
from animeddim.unet import UNet

TINY = UNetConfig(image_size=16, widths=[8, 16], block_depth=1, embedding_dims=8)


def _reconstruction_error(model, images: torch.Tensor, steps: int, **kw) -> float:
    z = ddim_invert(model, images, steps, SCHED, **kw)
    return max_err(ddim_sample(model, z, ddim_times(steps), SCHED), images)


def test_inversion_reconstructs_gaussian_samples_better_with_more_steps():
    """Measured max |x - ddim(invert(x))| at 10/50/200 steps falls for both the default
    (one refinement per step) and the classic approximation, the default always lower."""
    model = Gaussian()
    images = model.exact_output(noise(4), 0.0).float()  # typical samples of the data
    default = [_reconstruction_error(model, images, s) for s in (10, 50, 200)]
    classic = [_reconstruction_error(model, images, s, step_iterations=0) for s in (10, 50, 200)]
    assert default[0] > default[1] > default[2] and default[2] < 2e-3
    assert classic[0] > classic[1] > classic[2] and classic[2] < 0.05
    assert all(d < c for d, c in zip(default, classic, strict=True))


def test_inversion_start_iterations_matter():
    """Treating the images as the t = 0 state (no start solve) leaves a large error."""
    model = Gaussian()
    images = model.exact_output(noise(5), 0.0).float()
    assert _reconstruction_error(model, images, 50, start_iterations=0) > 10 * (
        _reconstruction_error(model, images, 50)
    )


def test_inversion_of_generated_images_on_tiny_unet():
    """An untrained net's 'images' are far outside [-2, 2] (x0_hat = x_1 / 0.02 at t = 1) and
    mostly clip to 0 or 255, so the recovered starting noise is checked as well as PSNR."""
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    torch.nn.init.normal_(model.head.weight, std=0.01)  # small but non-zero output
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    x1 = noise(6, (4, 3, 16, 16))
    with torch.no_grad():
        for steps in (10, 50):
            images = ddim_sample(model, x1, ddim_times(steps), SCHED)
            target = denormalize(images, mean, std)
            z = ddim_invert(model, images, steps, SCHED)
            out = denormalize(ddim_sample(model, z, ddim_times(steps), SCHED), mean, std)
            assert float(psnr(out, target).min()) > 30
            if steps == 50:
                assert max_err(z, x1) < 1e-2


def test_inversion_callback_and_call_count():
    calls: list[int] = []
    seen: list[tuple[int, float]] = []
    x0 = noise(7)
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


def test_inversion_refuses_steps_below_one():
    """steps 0 failed with an IndexError from inside the function."""
    import pytest

    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        ddim_invert(Gaussian(), noise(2), 0, SCHED)


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


def test_psnr_cap_and_known_value():
    import pytest

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
