"""Seeded generation (diffusion/generation.py): batch independence, clipping defaults, and
the shipped model's samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from animeddim.config import ScheduleConfig, UNetConfig
from animeddim.diffusion.generation import generate
from animeddim.diffusion.samplers import SAMPLERS
from animeddim.unet import UNet

SCHED = ScheduleConfig()
TINY = UNetConfig(image_size=16, widths=[8, 16], block_depth=1, embedding_dims=8)
KW = dict(mean=torch.full((3,), 0.5), std=torch.full((3,), 0.25), schedule=SCHED,
          image_size=16, n=5, seed=7, steps=3)  # fmt: skip
# Written by the sampling code before the diffusion/ package existed (commit 72a0250):
# rows ddim eta 0, ddim eta 1, dpmpp-2m, dpmpp-2m-logsnr; image 0 of seed 3, 6 steps,
# fp32, the samplers' default clipping.
SHIPPED_SAMPLES = Path(__file__).parent / "data" / "shipped-avatars-64-samples.png"


def _tiny_unet() -> UNet:
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)  # make the output non-trivial
    return model


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_image_i_independent_of_batch_size(sampler):
    model = _tiny_unet()
    eta = 0.5 if SAMPLERS[sampler].stochastic else 0.0
    kw = {**KW, "sampler": sampler, "eta": eta}
    a = generate(model, batch_size=5, **kw)
    assert a.dtype == torch.uint8 and a.shape == (5, 16, 16, 3)
    assert torch.equal(a, generate(model, batch_size=2, **kw))
    assert torch.equal(a[2:], generate(model, batch_size=2, **{**kw, "n": 3, "first_index": 2}))
    assert not torch.equal(a, generate(model, batch_size=5, **{**kw, "seed": 8}))


def test_clip_defaults_and_errors():
    model = _tiny_unet()
    kw = {**KW, "sampler": "dpmpp-2m"}
    a = generate(model, **kw)
    assert not torch.equal(a, generate(model, **{**kw, "sampler": "ddim"}))
    # DPM-Solver++ clips x0_hat by default, DDIM does not; this network's x0_hat leaves the
    # data range, so clipping changes the images.
    assert torch.equal(a, generate(model, clip=True, **kw))
    assert not torch.equal(a, generate(model, clip=False, **kw))
    ddim_kw = {**KW, "sampler": "ddim"}
    assert torch.equal(generate(model, **ddim_kw), generate(model, clip=False, **ddim_kw))
    assert not torch.equal(generate(model, **ddim_kw), generate(model, clip=True, **ddim_kw))
    with pytest.raises(ValueError, match="dpmpp-2m is deterministic"):
        generate(model, **{**kw, "eta": 0.5})
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        generate(model, **{**kw, "sampler": "plms"})
    done: list[int] = []
    generate(model, batch_size=2, progress=done.append, **KW)
    assert done == [2, 2, 1]


def test_bad_counts_are_value_errors_and_no_images_are_still_uint8():
    """n = -1 gave an empty float32 tensor (the docstring says uint8), batch_size 0 a
    'range() arg 3 must not be zero' and steps 0 the starting noise as images."""
    model = _tiny_unet()
    empty = generate(model, **{**KW, "n": 0})
    assert empty.dtype == torch.uint8 and empty.shape == (0, 16, 16, 3)
    with pytest.raises(ValueError, match="n must be an integer >= 0, got -1"):
        generate(model, **{**KW, "n": -1})
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        generate(model, batch_size=0, **KW)
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        generate(model, **{**KW, "steps": 0})
    # A count computed in torch or numpy is an integer; a float one is not.
    want = generate(model, batch_size=2, **KW)
    scalars = {"steps": torch.tensor(3), "n": np.int64(5), "batch_size": torch.tensor(2)}
    assert torch.equal(generate(model, **{**KW, **scalars}), want)
    for name, value in (("steps", torch.tensor(3.0)), ("n", torch.tensor([5]))):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= ., got tensor"):
            generate(model, **{**KW, name: value})


def test_shipped_model_samples_are_unchanged():
    """The shipped avatars-64 model draws the same images as before (2/255 per pixel)."""
    from animeddim.checkpoint import load_model
    from animeddim.pretrained import pretrained_path

    m = load_model(pretrained_path("avatars-64"), "cpu")
    ref = np.asarray(Image.open(SHIPPED_SAMPLES)).astype(int)
    rows = []
    for sampler, eta in (("ddim", 0.0), ("ddim", 1.0), ("dpmpp-2m", 0.0), ("dpmpp-2m-logsnr", 0.0)):
        x = generate(m.model, mean=m.mean, std=m.std, schedule=m.config.schedule, image_size=64,
                     n=1, seed=3, steps=6, eta=eta, sampler=sampler)  # fmt: skip
        rows.append(x[0].numpy())
    diff = np.abs(np.concatenate(rows).astype(int) - ref)
    assert diff.max() <= 2, f"max difference {diff.max()}/255"
