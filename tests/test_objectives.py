"""Training objectives: prediction target (eps | v), loss (mae | mse), min-SNR weighting,
the noise-level focus.

Formulas are checked against numbers worked out by hand; a v-predicting oracle, through the
eps conversion, must sample exactly as the eps oracle does with every sampler; the settings
travel with config.json, checkpoints and exported files and cannot change on resume.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from analytic import SCHED, SHAPE, Gaussian, max_err, noise
from conftest import TINY_MODEL, run_main, tiny_config

from animeddim import checkpoint as ckpt
from animeddim.config import ConfigError, RunConfig, UNetConfig
from animeddim.diffusion.inversion import ddim_invert
from animeddim.diffusion.objectives import (
    as_eps,
    eps_from_v,
    focus_times,
    min_snr_weights,
    v_target,
    x0_from_v,
)
from animeddim.diffusion.samplers import SAMPLERS, sample
from animeddim.train import losses, train
from animeddim.unet import UNet, fold_batchnorm


def test_v_and_its_conversions_by_hand():
    # alpha = 0.6, sigma = 0.8; x0 = 1, eps = 2: x_t = 0.6 + 1.6 = 2.2, v = 1.2 - 0.8 = 0.4
    a, s = torch.tensor(0.6), torch.tensor(0.8)
    x0, eps = torch.full((1, 3, 2, 2), 1.0), torch.full((1, 3, 2, 2), 2.0)
    xt = a * x0 + s * eps
    v = v_target(x0, eps, a, s)
    torch.testing.assert_close(v, torch.full_like(v, 0.4))
    # eps = sigma x_t + alpha v = 1.76 + 0.24; x0 = alpha x_t - sigma v = 1.32 - 0.32
    torch.testing.assert_close(eps_from_v(xt, v, torch.tensor([0.64])), eps)
    torch.testing.assert_close(x0_from_v(xt, v, a, s), x0)


def test_min_snr_weights_by_hand():
    # t = 0: alpha = 0.95, SNR = 0.9025 / 0.0975 = 9.2564 > gamma = 5;
    # t = 1: alpha = 0.02, SNR = 0.0004 / 0.9996 < gamma.
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    w_eps = min_snr_weights(t, SCHED, "eps", 5.0)
    w_v = min_snr_weights(t, SCHED, "v", 5.0)
    snr0 = 0.9025 / 0.0975
    assert w_eps.tolist() == pytest.approx([5.0 / snr0, 1.0], rel=1e-9)
    # v: min(SNR, gamma) / (SNR + 1) = min(SNR, gamma) sigma^2: 5 * 0.0975 and alpha^2
    assert w_v.tolist() == pytest.approx([5.0 * 0.0975, 0.0004], rel=1e-9)
    assert w_eps.dtype == torch.float64


class Fixed:
    """A 'network' whose raw output is a fixed tensor (records how it was called)."""

    def __init__(self, out: torch.Tensor):
        self.out, self.raw = out, None

    def __call__(self, x, noise_variances, cond=None, *, raw=False):
        self.raw = raw
        return self.out


def _by_hand(kind: str, prediction: str, weight: str):
    """losses() of a fixed prediction, next to the same numbers computed from the formulas."""
    g = torch.Generator().manual_seed(0)
    x0, eps, pred = (torch.randn(3, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([0.05, 0.5, 0.97], dtype=torch.float64)
    cfg = RunConfig.from_dict(
        {
            "model": {**TINY_MODEL, "prediction": prediction},
            "train": {"loss": kind, "loss_weight": weight},
        }
    ).validate()
    net = Fixed(pred)
    objective, image_loss = losses(net, x0, eps, t, cfg, torch.autocast("cpu", enabled=False))
    assert net.raw is True  # training compares the network's own output with its target

    angle = math.acos(0.95) + t * (math.acos(0.02) - math.acos(0.95))
    a, s = torch.cos(angle).view(-1, 1, 1, 1), torch.sin(angle).view(-1, 1, 1, 1)
    x0, eps, pred = x0.double(), eps.double(), pred.double()
    xt = a * x0 + s * eps
    target = eps if prediction == "eps" else a * eps - s * x0
    x0_hat = (xt - s * pred) / a if prediction == "eps" else a * xt - s * pred
    err = (pred - target).abs() if kind == "mae" else (pred - target) ** 2
    per_image = err.mean(dim=(1, 2, 3))
    if weight == "min-snr":
        snr = (a / s).flatten() ** 2
        w = snr.clamp(max=5.0) / (snr if prediction == "eps" else snr + 1.0)
        per_image = per_image * w
    expected = (float(per_image.mean()), float((x0_hat - x0).abs().mean()))
    return (objective, image_loss), expected


@pytest.mark.parametrize(
    "kind, prediction, weight",
    [
        ("mae", "eps", "none"),
        ("mse", "eps", "none"),
        ("mae", "v", "none"),
        ("mse", "v", "none"),
        ("mse", "eps", "min-snr"),
        ("mse", "v", "min-snr"),
    ],
)
def test_losses_match_a_hand_computation(kind, prediction, weight):
    (objective, image_loss), (want_objective, want_image) = _by_hand(kind, prediction, weight)
    assert objective.dtype == torch.float32 and objective.ndim == 0
    assert float(objective) == pytest.approx(want_objective, rel=1e-5)
    assert float(image_loss) == pytest.approx(want_image, rel=1e-5)


def test_default_objective_is_the_mse_of_eps_and_mae_is_the_keras_loss_bit_for_bit():
    """The default is the paper's eq. 4, F.mse_loss(eps_hat, eps); `loss: mae` computes exactly
    what the loss was before the objective became a setting, F.l1_loss(eps_hat, eps). The
    tracked image loss is F.l1_loss(x0_hat, x0), x0_hat = (x_t - sigma eps_hat)/alpha, both ways."""
    from animeddim.diffusion.schedule import diffuse

    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    t = torch.rand(4, generator=g, dtype=torch.float64)
    cfg = RunConfig.from_dict({"model": {**TINY_MODEL}}).validate()
    assert (cfg.model.prediction, cfg.train.loss, cfg.train.loss_weight) == ("eps", "mse", "none")
    keras = RunConfig.from_dict({"model": {**TINY_MODEL}, "train": {"loss": "mae"}}).validate()
    torch.manual_seed(0)
    net = UNet(cfg.model)
    torch.nn.init.normal_(net.head.weight, std=0.3)
    xt, sr, nr = diffuse(x0, eps, t, cfg.schedule)
    pred = net(xt, (nr**2).view(-1), None).float()
    for c, loss in ((cfg, F.mse_loss), (keras, F.l1_loss)):
        got = losses(net, x0, eps, t, c, torch.autocast("cpu", enabled=False))
        assert torch.equal(got[0], loss(pred, eps))
        assert torch.equal(got[1], F.l1_loss((xt - nr * pred) / sr, x0))


def _gaussian_v(gauss: Gaussian):
    """E[v | x_t] of Gaussian data, from the posterior means of eps and x0 (not from eps_from_v):
    v* = alpha E[eps | x_t] - sigma E[x0 | x_t]."""

    def model(x, noise_variance, cond=None):
        var = noise_variance.double().view(-1, 1, 1, 1)
        alpha, sigma = torch.sqrt(1 - var), torch.sqrt(var)
        denom = alpha**2 * gauss.s**2 + var
        eps = sigma * (x.double() - alpha * gauss.mu) / denom
        x0 = gauss.mu + alpha * gauss.s**2 * (x.double() - alpha * gauss.mu) / denom
        return (alpha * eps - sigma * x0).float()

    return model


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("clip", [False, True])
def test_v_oracle_samples_like_the_eps_oracle_with_every_sampler(sampler, clip):
    gauss = Gaussian(seed=3)
    v_net = as_eps(_gaussian_v(gauss), "v")
    assert as_eps(gauss, "eps") is gauss
    x = noise(5)
    bounds = (torch.full((3,), -0.8), torch.full((3,), 0.8)) if clip else None
    eta = {"eta": 0.0}
    want = sample(gauss, x, 7, SCHED, sampler=sampler, x0_range=bounds, **eta)
    got = sample(v_net, x, 7, SCHED, sampler=sampler, x0_range=bounds, **eta)
    assert max_err(got, want) < 1e-5
    assert max_err(want, torch.zeros(SHAPE)) > 0.1  # a real image, not a trivial one


def test_v_oracle_inverts_like_the_eps_oracle():
    gauss = Gaussian(seed=4)
    images = gauss.exact_output(noise(6), 1 / 8).float()
    want = ddim_invert(gauss, images, 8, SCHED)
    got = ddim_invert(as_eps(_gaussian_v(gauss), "v"), images, 8, SCHED)
    assert max_err(got, want) < 1e-4


@torch.no_grad()
def test_unet_returns_eps_whatever_it_predicts():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, 16, 16, generator=g)
    nv = torch.tensor([0.1, 0.5, 0.9])
    for prediction in ("eps", "v"):
        torch.manual_seed(0)
        net = UNet(UNetConfig(**TINY_MODEL, prediction=prediction)).eval()
        torch.nn.init.normal_(net.head.weight, std=0.3)
        raw = net(x, nv, raw=True)
        want = raw if prediction == "eps" else eps_from_v(x, raw, nv)
        assert torch.equal(net(x, nv), want)
        # the folded sampling copy converts too
        torch.testing.assert_close(fold_batchnorm(net)(x, nv), want, atol=1e-5, rtol=1e-5)
    # the same weights: a v network's eps is not its raw output
    assert max_err(net(x, nv), raw) > 0.1


def test_old_saved_configs_and_the_shipped_model_keep_the_mae_they_were_trained_with():
    from animeddim.pretrained import pretrained_path

    # A config file names a few settings: the rest are today's defaults (the MSE).
    cfg = RunConfig.from_dict({"model": {"widths": [8, 16]}, "train": {"epochs": 2}})
    assert (cfg.model.prediction, cfg.train.loss, cfg.train.loss_weight) == ("eps", "mse", "none")
    # A whole train section written before train.loss existed was trained with the MAE.
    loaded = ckpt.load_model(pretrained_path("avatars-64"))
    assert loaded.config.model.prediction == "eps" and loaded.config.train.loss == "mae"
    assert "prediction" not in loaded.meta["config"]["model"]  # written before the setting
    assert "loss" not in loaded.meta["config"]["train"]
    old = RunConfig().to_dict()
    for key in ("loss", "loss_weight", "min_snr_gamma", "cond_drop"):  # the newer settings
        del old["train"][key]
    assert RunConfig.from_dict(old).train.loss == "mae"
    # Every shipped recipe file says which loss it trained with.
    for recipe in sorted((Path(__file__).parents[1] / "configs").glob("*.json")):
        assert json.loads(recipe.read_text())["train"]["loss"] == "mae", recipe


def test_min_snr_needs_the_squared_error_and_choices_are_checked():
    with pytest.raises(ConfigError, match="use --loss mse"):
        RunConfig.from_dict({"train": {"loss": "mae", "loss_weight": "min-snr"}}).validate()
    RunConfig.from_dict({"train": {"loss_weight": "min-snr"}}).validate()  # the MSE, default
    with pytest.raises(ConfigError, match="model.prediction = 'x0'"):
        RunConfig.from_dict({"model": {"prediction": "x0"}}).validate()
    with pytest.raises(ConfigError, match="invalid loss = 'l2'"):
        RunConfig.from_dict({"train": {"loss": "l2"}}).validate()


def test_cli_objective_settings_travel_with_the_run_and_cannot_change_on_resume(
    avatars16, tmp_path, capsys
):
    run, exported = tmp_path / "run", tmp_path / "v.safetensors"
    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps({"model": TINY_MODEL}))
    common = ["--epochs", "1", "--batch-size", "6", "--no-kid", "--quiet", "--precision", "fp32"]
    objective = ["--prediction", "v", "--loss", "mse", "--loss-weight", "min-snr"]
    rc, out, err = run_main(
        capsys, "train", "--data", avatars16, "--out", run, "--config", cfg_file,
        *common, *objective,
    )  # fmt: skip
    assert rc == 0, err
    stored = json.loads((run / "config.json").read_text())
    assert stored["model"]["prediction"] == "v"
    assert (stored["train"]["loss"], stored["train"]["loss_weight"]) == ("mse", "min-snr")
    rc, _, err = run_main(capsys, "export", "--run", run, "--out", exported)
    assert rc == 0, err
    for f in (run / "checkpoints" / "last.safetensors", exported):
        loaded = ckpt.load_model(f)
        assert loaded.model.cfg.prediction == "v" and loaded.config.train.loss == "mse"
    rc, _, err = run_main(
        capsys, "sample", "--run", exported, "--n", "2", "--steps", "2", "--out", tmp_path / "s"
    )
    assert rc == 0, err
    assert len(list((tmp_path / "s").glob("*.png"))) == 2

    for flags in (["--loss", "mae"], ["--prediction", "eps"], ["--loss-weight", "none"]):
        rc, out, err = run_main(capsys, "train", "--resume", run, "--epochs", "2", *flags)
        assert rc == 2 and f"{flags[0]} cannot change when resuming" in err, err
        assert "Traceback" not in err
    rc, _, err = run_main(
        capsys, "train", "--data", avatars16, "--out", tmp_path / "bad", "--config", cfg_file,
        *common, "--loss", "mae", "--loss-weight", "min-snr",
    )  # fmt: skip
    assert rc == 2 and "use --loss mse" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


def test_api_resume_with_another_objective_is_refused(avatars16, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(avatars16, epochs=1, loss="mse")
    train(cfg, run, progress=False, log=lambda s: None)
    for part, name, value in (("train", "loss", "mae"), ("model", "prediction", "v")):
        other = tiny_config(avatars16, epochs=2, loss="mse")
        setattr(getattr(other, part), name, value)
        with pytest.raises(ckpt.CheckpointError, match=f"{part}.{name} is"):
            train(other, run, resume=True, progress=False, log=lambda s: None)
    # the run itself resumes
    res = train(tiny_config(avatars16, epochs=2, loss="mse"), run, resume=True, progress=False,
                log=lambda s: None)  # fmt: skip
    assert res.epoch == 2


def test_noise_focus_times_by_hand():
    """The first round(share * N) uniform draws are mapped linearly onto the times of sigma
    in (LO, HI]; the others, and share 0, are left as drawn."""
    u = torch.tensor([0.0, 0.5, 1.0, 0.25, 0.75, 0.1, 0.9, 0.3], dtype=torch.float64)
    cfg = RunConfig()
    assert focus_times(u, cfg) is u  # off by default: nothing changes
    cfg.train.noise_focus, cfg.train.noise_focus_share = "1.5,10", 0.375  # 3 of 8
    cfg.validate()
    # angle = atan(sigma); t is linear in the angle from acos(0.95) (t = 0) to acos(0.02)
    a0, a1 = math.acos(SCHED.max_signal_rate), math.acos(SCHED.min_signal_rate)
    t_lo, t_hi = ((math.atan(s) - a0) / (a1 - a0) for s in (1.5, 10.0))
    want = [t_lo, t_lo + 0.5 * (t_hi - t_lo), t_hi, *u[3:].tolist()]
    got = focus_times(u, cfg)
    assert got.tolist() == pytest.approx(want, abs=1e-12) and got.dtype == torch.float64
    cfg.train.noise_focus = "2,inf"  # up to the schedule's noisiest level, t = 1
    assert focus_times(u, cfg)[2].item() == pytest.approx(1.0, abs=1e-12)
    cfg.train.noise_focus_share = 1.0
    assert (focus_times(u, cfg) >= (math.atan(2.0) - a0) / (a1 - a0) - 1e-12).all()


@pytest.mark.parametrize(
    ("train", "says"),
    [
        ({"noise_focus": "10,1", "noise_focus_share": 0.5}, "invalid noise_focus = '10,1'"),
        ({"noise_focus": "one", "noise_focus_share": 0.5}, "invalid noise_focus = 'one'"),
        ({"noise_focus_share": 0.5}, "invalid noise_focus = ''"),  # a share of nothing
        ({"noise_focus": "1,10", "noise_focus_share": 1.5}, "invalid noise_focus_share = 1.5"),
        ({"noise_focus": "1,10", "noise_focus_share": float("nan")}, "noise_focus_share"),
    ],
)
def test_noise_focus_settings_are_checked(train, says):
    with pytest.raises(ConfigError, match=says):
        RunConfig.from_dict({"train": train}).validate()


def test_noise_focus_trains_that_share_of_each_batch_in_the_band(avatars16, tmp_path, monkeypatch):
    """What the training steps hand the loss: 4 of each 8 times in the band, the rest as
    drawn; validation keeps uniform times (so its loss compares with any run's)."""
    import animeddim.train as train_module
    from animeddim.diffusion.schedule import rates

    seen = []
    real = train_module.losses

    def recording(net, images, noises, t, *a, **k):
        seen.append((net, t.clone()))
        return real(net, images, noises, t, *a, **k)

    monkeypatch.setattr(train_module, "losses", recording)
    cfg = tiny_config(avatars16, epochs=1, batch_size=8, noise_focus="1,10", noise_focus_share=0.5)
    train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    live = seen[0][0]
    steps = [t for net, t in seen if net is live]
    val = torch.cat([t for net, t in seen if net is not live])
    assert steps and len(val) > 0 and all(len(t) == 8 for t in steps)
    for t in steps:
        signal, noise_rate = rates(t, cfg.schedule)
        sigma = noise_rate / signal
        assert ((sigma[:4] > 1 - 1e-9) & (sigma[:4] <= 10 + 1e-9)).all()
    rest = torch.cat([t[4:] for t in steps])
    signal, noise_rate = rates(torch.cat([rest, val]), cfg.schedule)
    sigma = noise_rate / signal
    assert ((sigma < 1) | (sigma > 10)).any()  # drawn from every level, not the band
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (stored["noise_focus"], stored["noise_focus_share"]) == ("1,10", 0.5)
