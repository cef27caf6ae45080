"""Schedule, network, sampler and checkpoint: the paper's maths, checked directly."""

from __future__ import annotations

import math

import pytest
import torch

from animeddim import checkpoint as ckpt
from animeddim.config import ConfigError, RunConfig, ScheduleConfig, UNetConfig
from animeddim.sampling import ddim_sample, generate, image_generators, randn_per_image
from animeddim.schedule import diffuse, predict_x0, rates
from animeddim.unet import UNet, count_parameters, sinusoidal_embedding

SCHED = ScheduleConfig()
TINY = UNetConfig(image_size=16, widths=[8, 16], block_depth=1, embedding_dims=8)


def oracle_for(x0: torch.Tensor):
    """A 'network' that returns the exact noise of x_t given the true clean images."""

    def model(x: torch.Tensor, noise_variance: torch.Tensor) -> torch.Tensor:
        var = noise_variance.double().view(-1, 1, 1, 1)
        return ((x.double() - torch.sqrt(1 - var) * x0.double()) / torch.sqrt(var)).float()

    return model


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


@pytest.mark.parametrize("steps", [1, 5, 20])
def test_ddim_with_oracle_recovers_data(steps):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 3, 8, 8, generator=g)
    noise = torch.randn(3, 3, 8, 8, generator=g)
    out = ddim_sample(oracle_for(x0), noise, steps, SCHED)
    torch.testing.assert_close(out, x0, atol=2e-4, rtol=1e-4)


def test_ddim_step_is_exact_update():
    """One deterministic step maps x_t to signal' x0 + noise' eps exactly (the DDIM identity)."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 3, 4, 4, generator=g)
    eps = torch.randn(2, 3, 4, 4, generator=g)
    seen = []
    ddim_sample(
        oracle_for(x0),
        eps * 0 + (0.02 * x0 + math.sqrt(1 - 0.02**2) * eps),
        4,
        SCHED,
        callback=lambda s, t, xt, px0: seen.append((t, xt.clone())),
    )
    for t, xt in seen:
        expected, _, _ = diffuse(x0, eps, torch.full((2,), t), SCHED)
        torch.testing.assert_close(xt, expected, atol=2e-4, rtol=1e-4)


def test_stochastic_sampler_with_oracle_also_recovers_data():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 8, 8, generator=g)
    noise = torch.randn(2, 3, 8, 8, generator=g)
    out = ddim_sample(
        oracle_for(x0), noise, 10, SCHED, eta=1.0, generators=image_generators(0, [0, 1])
    )
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=1e-3)


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


def test_image_i_independent_of_batch_size():
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)  # make the output non-trivial
    kw = dict(
        mean=torch.full((3,), 0.5),
        std=torch.full((3,), 0.25),
        schedule=SCHED,
        image_size=16,
        n=5,
        seed=7,
        steps=3,
        eta=0.5,
    )
    a = generate(model, batch_size=5, **kw)
    b = generate(model, batch_size=2, **kw)
    assert a.dtype == torch.uint8 and a.shape == (5, 16, 16, 3)
    assert torch.equal(a, b)
    c = generate(model, batch_size=5, **{**kw, "seed": 8})
    assert not torch.equal(a, c)


def test_per_image_noise_depends_only_on_seed_and_index():
    a = randn_per_image(image_generators(3, [4, 5]), (2, 2), "cpu")
    b = randn_per_image(image_generators(3, [5]), (2, 2), "cpu")
    torch.testing.assert_close(a[1], b[0], rtol=0, atol=0)


def test_config_roundtrip_and_errors():
    cfg = RunConfig()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown setting"):
        RunConfig.from_dict({"train": {"epochz": 3}})
    with pytest.raises(ConfigError, match="epochs"):
        RunConfig.from_dict({"train": {"epochs": "many"}})
    bad = RunConfig.from_dict({"data": {"image_size": 20}, "model": {"image_size": 20}})
    with pytest.raises(ConfigError, match="multiple of 8"):
        bad.validate()


def _tiny_checkpoint(path, cfg: RunConfig):
    model = UNet(cfg.model)
    tensors = {
        **ckpt.with_prefix(model.state_dict(), "ema"),
        "norm.mean": torch.zeros(3),
        "norm.std": torch.ones(3),
    }
    return ckpt.save(path, tensors, {"config": cfg.to_dict(), "epoch": 0, "step": 0})


def test_checkpoint_roundtrip_and_atomic_write(tmp_path):
    cfg = RunConfig.from_dict(
        {
            "data": {"image_size": 16},
            "model": {"image_size": 16, "widths": [8, 16], "block_depth": 1, "embedding_dims": 8},
        }
    )
    f = _tiny_checkpoint(tmp_path / "c.safetensors", cfg)
    loaded = ckpt.load_model(f)
    assert loaded.config == cfg
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_bad_checkpoints_are_clear_errors(tmp_path):
    cfg = RunConfig.from_dict(
        {
            "data": {"image_size": 16},
            "model": {"image_size": 16, "widths": [8, 16], "block_depth": 1, "embedding_dims": 8},
        }
    )
    f = _tiny_checkpoint(tmp_path / "c.safetensors", cfg)
    data = f.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="not a readable"):
        ckpt.load_model(tmp_path / "trunc.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_model(tmp_path / "text.safetensors")
    # Another architecture: the config says widths [8, 16] but weights are for [8, 32].
    other = RunConfig.from_dict(
        {
            "data": {"image_size": 16},
            "model": {"image_size": 16, "widths": [8, 32], "block_depth": 1, "embedding_dims": 8},
        }
    )
    tensors, meta = ckpt.load(_tiny_checkpoint(tmp_path / "o.safetensors", other))
    meta["config"] = cfg.to_dict()
    ckpt.save(tmp_path / "mismatch.safetensors", tensors, meta)
    with pytest.raises(ckpt.CheckpointError, match="does not match"):
        ckpt.load_model(tmp_path / "mismatch.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.load_model(tmp_path)


def test_pickle_checkpoint_runs_no_code(tmp_path):
    """A pickle whose payload would create a file is refused without running it."""
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_model(bad)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_model(tmp_path / "evil.pt")
    assert not marker.exists()
