"""Conditioning flows through: every sampler, inversion, generation and the prepared
network hand `cond` to every network call unchanged (k-diffusion's `extra_args`)."""

from __future__ import annotations

import pytest
import torch
from analytic import SCHED, SHAPE, Gaussian, noise

from animeddim.config import UNetConfig
from animeddim.diffusion.generation import generate, image_generators
from animeddim.diffusion.inversion import ddim_invert
from animeddim.diffusion.samplers import SAMPLERS, data_range, sample
from animeddim.runtime import prepare_inference
from animeddim.unet import UNet


class Recording:
    """The Gaussian denoiser, recording the `cond` of every call."""

    def __init__(self):
        self.model, self.seen = Gaussian(), []

    def __call__(self, x, noise_variance, cond=None):
        self.seen.append(cond)
        return self.model(x, noise_variance)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_passes_cond_unchanged_to_every_call(name):
    spec = SAMPLERS[name]
    cond = {"label": torch.tensor([1, 2, 3, 4])}  # any object: the sampler never looks
    for clip in (None, data_range(torch.zeros(3), torch.ones(3))):
        net = Recording()
        eta = 1.0 if spec.stochastic else 0.0
        gens = image_generators(0, range(SHAPE[0]))
        sample(net, noise(0), 5, SCHED, sampler=name, eta=eta, generators=gens,
               x0_range=clip, cond=cond)  # fmt: skip
        assert len(net.seen) == 5 and all(c is cond for c in net.seen)
        net = Recording()
        spec.fn(net, noise(0), spec.grid(3, SCHED), SCHED, cond=cond)
        assert len(net.seen) == 3 and all(c is cond for c in net.seen)


def test_inversion_passes_cond_unchanged():
    net, cond = Recording(), object()
    ddim_invert(net, noise(1), 4, SCHED, start_iterations=2, cond=cond)
    assert len(net.seen) == 2 + 3 * 2 and all(c is cond for c in net.seen)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_generate_slices_per_image_cond_per_batch(name):
    net = Recording()
    labels = torch.arange(5) * 10
    kw = dict(mean=torch.zeros(3), std=torch.ones(3), schedule=SCHED, image_size=8, n=5,
              steps=2, sampler=name, batch_size=2, first_index=3)  # fmt: skip
    generate(net, cond=labels, **kw)
    rows = [c.tolist() for c in net.seen]
    assert rows == [[0, 10]] * 2 + [[20, 30]] * 2 + [[40]] * 2
    net = Recording()
    generate(net, **kw)
    assert net.seen == [None] * 6


def test_prepared_network_chunks_per_image_cond():
    seen = []

    class Net(UNet):
        def forward(self, x, v, cond=None):
            seen.append(cond)
            return super().forward(x, v, cond)

    net = Net(UNetConfig(image_size=8, widths=[4, 8], block_depth=1, embedding_dims=4)).eval()
    prepared = prepare_inference(net, torch.device("cpu"), "fp32", chunk=2)
    x, v, labels = torch.randn(5, 3, 8, 8), torch.rand(5), torch.arange(5)
    with torch.no_grad():
        prepared(x, v, labels)
        prepared(x, v, "a class name")
    assert [c.tolist() for c in seen[:3]] == [[0, 1], [2, 3], [4]]
    assert seen[3:] == ["a class name"] * 3
