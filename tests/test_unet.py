"""The network (unet.py): shapes, the noise embedding, the denoiser signature."""

from __future__ import annotations

import copy

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


def test_channels_last_training_pass_stays_channels_last_and_matches_nchw(monkeypatch):
    """A channels_last net trains channels_last throughout: every BatchNorm (the first
    block's, after the embedding is concatenated, too) gets its input and gradient in that
    layout, and each upsampled map gets its gradient laid out so (not a slice of the cat's);
    its gradients are the NCHW net's within rounding."""
    import torch.nn.functional as F

    from animeddim import unet as unet_module

    cl = torch.channels_last

    def laid_out_cl(t):
        return t.is_contiguous(memory_format=cl) and not t.is_contiguous()

    torch.manual_seed(0)
    nchw = UNet(TINY).train()
    torch.nn.init.normal_(nchw.head.weight, std=0.3)
    net = copy.deepcopy(nchw).to(memory_format=cl)
    seen, upsampled_grads = [], []
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_hook(lambda m, i, o: seen.append(laid_out_cl(i[0])))
            m.register_full_backward_hook(lambda m, gi, go: seen.append(laid_out_cl(gi[0])))

    original = F.interpolate

    def interpolate(*args, **kw):
        y = original(*args, **kw)
        y.register_hook(lambda g: upsampled_grads.append(laid_out_cl(g)))
        return y

    monkeypatch.setattr(unet_module.F, "interpolate", interpolate)
    x, v = torch.randn(4, 3, 16, 16), torch.rand(4)
    net(x.contiguous(memory_format=cl), v).square().mean().backward()
    monkeypatch.undo()
    nchw(x, v).square().mean().backward()
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert len(seen) == 2 * norms and all(seen)
    assert upsampled_grads == [True]
    for (name, p), q in zip(net.named_parameters(), nchw.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
