"""Wrong arguments given to the Python API (`animeddim.pipelines`) from a notebook: each is
one ConfigError or TypeError naming the bad value and what is accepted, raised before any
work, never a deep torch error or a silent wrong result. Tiny 16-px networks, CPU."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_MODEL

from animeddim import checkpoint as ckpt
from animeddim import pipelines
from animeddim.config import ConfigError, RunConfig
from animeddim.unet import UNet

VOCAB = {"hair_color": ["black", "red", "blond"], "glasses": ["no", "yes"]}


def _model_file(folder, name: str, **model) -> str:
    cfg = RunConfig.from_dict({"model": {**TINY_MODEL, "image_size": 16, **model}})
    torch.manual_seed(0)
    net = UNet(cfg.model)
    tensors = {
        **ckpt.with_prefix(net.state_dict(), "ema"),
        "norm.mean": torch.full((3,), 0.5),
        "norm.std": torch.full((3,), 0.25),
    }
    path = folder / f"{name}.safetensors"
    return ckpt.save(path, tensors, {"config": cfg.to_dict(), "epoch": 0, "step": 0})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    plain = _model_file(folder, "plain")
    cond = _model_file(folder, "cond", vocabulary=VOCAB)
    other = _model_file(folder, "other", widths=[8, 8], image_size=8)
    load = pipelines.load_for_sampling
    return load(plain, device="cpu")[0], load(cond, device="cpu")[0], load(other, device="cpu")[0]


def _settings(**kw) -> pipelines.SampleSettings:
    return pipelines.resolve_settings("cpu", "fp32", steps=1, batch_size=4, **kw)


def test_settings_that_sampling_cannot_use_are_refused_when_made():
    """clip="no" and compile="no" were taken (both true: clipped, compiled); a hand-made
    SampleSettings with precision "auto" died in a KeyError at the first draw, device "gpu"
    in torch's device parser, and seed -1 drew the images of seed 2**63 - 1 without a word;
    a NaN attribute weight drew black images; device 0 became "auto"."""
    for kw, match in [
        ({"clip": "no"}, "clip must be True, False or None, got 'no'"),
        ({"compile": "no"}, "compile must be True, False or None, got 'no'"),
        ({"guidance_interval": "x"}, "a guidance interval is LO,HI in sigma"),
        ({"guidance_interval": (1, "inf")}, r"guidance_interval must be \(LO, HI\)"),
        ({"guidance_interval": 3}, r"guidance_interval must be \(LO, HI\)"),
        ({"attribute_guidance": {"glasses": math.nan}}, "weights >= 0, got 'glasses': nan"),
        ({"attribute_guidance": {"glasses": "3"}}, "weights >= 0, got 'glasses': '3'"),
        ({"attribute_guidance": 3}, "attribute_guidance must be a dict"),
    ]:
        with pytest.raises(ConfigError, match=match):
            _settings(**kw)
    for kw, match in [
        ({"precision": "auto"}, "precision must be fp32, bf16 or fp16 .* got 'auto'"),
        ({"device": "gpu"}, "unknown device 'gpu': expected cpu, cuda, cuda:N or mps"),
        ({"seed": -1}, r"seed must be an integer in 0 \.\. 2\*\*63 - 1, got -1"),
        ({"steps": "2"}, "steps must be an integer >= 1, got '2'"),
        ({"sampler": "ddpm"}, "unknown sampler 'ddpm'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            pipelines.SampleSettings(**kw)
    for call in (pipelines.resolve_settings, pipelines.load_for_sampling):
        with pytest.raises(ConfigError, match="device must be a string .* got 0"):
            call(device=0)
    # what the CLI writes is read as the CLI reads it
    s = _settings(guidance_interval="1,inf", attribute_guidance="glasses=3")
    assert s.guidance_interval == (1.0, math.inf) and s.attribute_guidance == {"glasses": 3.0}
    assert pipelines.SampleSettings(device="cpu").device == torch.device("cpu")


def test_conditioning_the_model_cannot_take_is_refused_naming_it(models):
    """Codes given to an unconditional model were ignored without a word; float codes were
    truncated (a NaN one read as null), -5 read as null, 999 an IndexError inside the
    embedding, codes of the wrong length or width a RuntimeError inside the U-Net, no rows a
    ZeroDivisionError; a NaN or infinite guidance weight drew black images, "3" was taken."""
    plain, cond, _ = models
    s = _settings()
    ok = torch.tensor([[0, 1], [2, -1]])
    assert pipelines.draw_per_image(cond, 3, s, ok, 2.0).shape == (3, 16, 16, 3)
    assert pipelines.draw(cond, 2, s, cond=ok).shape == (2, 16, 16, 3)
    with pytest.raises(ConfigError, match="cond given, but .* is an unconditional model"):
        pipelines.draw(plain, 2, s, cond=ok)
    for codes, err, match in [
        (ok.float(), TypeError, "codes must be an integer tensor .* got a torch.float32 tensor"),
        (ok.tolist(), TypeError, "codes must be an integer tensor .* got a list"),
        (ok[0], ConfigError, r"shape \[R x 2\] with R >= 1 .*hair_color, glasses\), got \[2\]"),
        (ok[:0], ConfigError, r"got \[0 x 2\]"),
        (torch.zeros(2, 3, dtype=torch.long), ConfigError, r"got \[2 x 3\]"),
        (torch.tensor([[0, 2]]), ConfigError, r"codes\[0, 1\] is 2: attribute 'glasses' takes "),
        (torch.tensor([[-5, 0]]), ConfigError, r"codes 0 \.\. 2 \(its values in order\) or -1"),
    ]:
        with pytest.raises(err, match=match):
            pipelines.draw_per_image(cond, 3, s, codes)
    with pytest.raises(ConfigError, match=r"cond must have shape \[3 x 2\] .* got \[2 x 2\]"):
        pipelines.draw(cond, 3, s, cond=ok)
    for w in (math.nan, math.inf, -1.0, "3", None):
        with pytest.raises(ConfigError, match=f"guidance must be a number >= 0 .*, got {w!r}"):
            pipelines.draw_conditional(cond, 1, s, {"glasses": "yes"}, w)
    with pytest.raises(TypeError, match="must be a dict of attribute -> value .* 'glasses=yes'"):
        pipelines.draw_conditional(cond, 1, s, "glasses=yes")
    # edit's changes as the CLI writes them died in an AttributeError inside `encode`
    with pytest.raises(TypeError, match="changes must be a dict of attribute -> value"):
        pipelines.edit(cond, "no-images", "no-out", "glasses=yes", settings=s)
    with pytest.raises(TypeError, match="got a tuple: load_for_sampling returns"):
        pipelines.vocabulary((cond, torch.device("cpu")))


def test_a_sampling_net_made_from_another_model_is_refused(models):
    """A `net` prepared from another model was run on this model's noise and normalisation
    (convolutions take any image size) and drew its nonsense without a word."""
    plain, cond, other = models
    s = _settings()
    for model, net_from in [(plain, other), (other, plain), (plain, cond)]:
        with pytest.raises(ConfigError, match="net was made from another model"):
            pipelines.draw(model, 1, s, net=pipelines.sampling_net(net_from, s, 1))
    net = pipelines.sampling_net(plain, s, 1)
    assert torch.equal(pipelines.draw(plain, 2, s, net=net), pipelines.draw(plain, 2, s))


def test_the_pair_load_for_sampling_returns_is_refused_with_the_remedy(models, tmp_path):
    """`loaded = load_for_sampling(...)` keeps (loaded, device): every call then died in an
    AttributeError ('tuple' object has no attribute 'config'), evaluate only after reading
    the real folder. A count of the wrong kind or an unknown sampler in the steps study, or
    n = 1 in evaluate, failed after the real features (a KeyError for the sampler)."""
    plain = models[0]
    pair, s = (plain, torch.device("cpu")), _settings()
    calls = [
        lambda m: pipelines.draw(m, 1, s),
        lambda m: pipelines.draw_conditional(m, 1, s),
        lambda m: pipelines.invert(m, tmp_path, tmp_path / "inv", settings=s),
        lambda m: pipelines.interpolate(m, tmp_path / "i.gif", seeds=(1, 2), settings=s),
        lambda m: pipelines.reverse_steps(m, settings=s),
        lambda m: pipelines.evaluate(m, tmp_path / "none", settings=s, extractor=None),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="got a tuple: load_for_sampling returns .* unpack"):
            call(pair)
    with pytest.raises(TypeError, match="expected a loaded model .* got str 'm.safetensors'"):
        pipelines.draw("m.safetensors", 1, s)
    with pytest.raises(TypeError, match="expected SampleSettings .* got NoneType None"):
        pipelines.draw(plain, 1, None)
    with pytest.raises(ConfigError, match="give two seeds or two images, not both: got seeds=1"):
        pipelines.interpolate(plain, tmp_path / "i.gif", seeds=1, settings=s)
    with pytest.raises(ConfigError, match="n must be an integer >= 2, got 1"):
        pipelines.evaluate(plain, tmp_path / "none", n=1, settings=s, extractor=None)
    study = {"etas": [0], "samplers": ["ddim"], "n": 4, "settings": s, "extractor": None}
    for kw, match in [
        ({"samplers": ["ddpm"]}, "unknown sampler 'ddpm'"),
        ({"steps": [5, "10"]}, "steps must be an integer >= 1, got '10'"),
        ({"etas": [0, 2]}, r"eta must be a number in \[0, 1\], got 2"),
    ]:
        with pytest.raises(ConfigError, match=match):
            kw = {"steps": [1], **study, **kw}
            pipelines.steps_study(plain, tmp_path / "none", out_dir=tmp_path / "st", **kw)
    assert not any(p.exists() for p in (tmp_path / "inv", tmp_path / "i.gif", tmp_path / "st"))


def test_write_report_refuses_steps_seed_or_device_it_cannot_use_first(tmp_path):
    """`report.write_report(runs, out, steps="5")` died in a comparison (TypeError), a seed
    of 1.5 was taken, and device "gpu" failed in torch's device parser only once the first
    run's network was loaded; each is now refused before any folder is read."""
    from animeddim.report import write_report
    from animeddim.run_folder import RunFolderError

    for kw, match in [
        ({"steps": "5"}, "invalid steps = '5': expected an integer >= 1"),
        ({"seed": 1.5}, r"invalid seed = 1.5: expected an integer in 0 \.\. 2\*\*63 - 1"),
        ({"device": "gpu"}, "unknown device 'gpu': expected auto, cpu, cuda, cuda:N or mps"),
    ]:
        with pytest.raises(RunFolderError, match=match):
            write_report(tmp_path / "no-run", tmp_path / "report", **kw)
    assert not (tmp_path / "report").exists()
