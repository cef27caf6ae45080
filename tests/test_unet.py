"""The network (unet.py): shapes, the noise embedding, the denoiser signature."""

from __future__ import annotations

import pytest
import torch

from animeddim.config import UNetConfig
from animeddim.unet import UNet, count_parameters, sinusoidal_embedding

TINY = UNetConfig(image_size=16, widths=[8, 16], block_depth=1, embedding_dims=8)


def test_unet_shapes_zero_output_and_default_size():
    model = UNet(TINY)
    y = model(torch.randn(2, 3, 16, 16), torch.rand(2))
    assert y.shape == (2, 3, 16, 16)
    assert torch.count_nonzero(y) == 0  # zero-initialised output layer
    # The Keras-example default network has 1.95 M parameters.
    assert count_parameters(UNet(UNetConfig())) == 1_950_627


def test_sinusoidal_embedding_frequencies():
    e = sinusoidal_embedding(torch.tensor([0.0, 0.25]), 32, 1000.0)
    assert e.shape == (2, 32, 1, 1)
    torch.testing.assert_close(e[0, :16, 0, 0], torch.zeros(16))  # sin(0)
    torch.testing.assert_close(e[0, 16:, 0, 0], torch.ones(16))  # cos(0)
    # lowest frequency is 1: sin(2*pi*1*0.25) = 1
    assert e[1, 0, 0, 0].item() == pytest.approx(1.0, abs=1e-6)


def test_denoiser_takes_cond_and_the_unconditional_net_ignores_it():
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    x, v = torch.randn(2, 3, 16, 16), torch.rand(2)
    with torch.no_grad():
        ref = model(x, v)
        assert torch.equal(model(x, v, None), ref)
        assert torch.equal(model(x, v, cond=torch.tensor([3, 5])), ref)
