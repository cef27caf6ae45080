"""The Python API every front end calls (pipelines.py): loading, settings, progress."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL

from animeddim import checkpoint as ckpt
from animeddim import metrics, pipelines
from animeddim.config import ConfigError, RunConfig
from animeddim.data import load_folder
from animeddim.unet import UNet


class FakeExtractor:
    """Per-channel mean and std as 'features' (a cheap stand-in for Inception)."""

    cache_token = "fake.pt:1"
    weights_id = "fake.pt sha256:000000000000"

    def __init__(self) -> None:
        self.paper_batches: list[torch.Tensor] = []

    def features(self, images_u8, protocol, batch_size=64, bf16=False):
        if protocol == "paper":
            self.paper_batches.append(images_u8.clone())
        x = images_u8.double() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    cfg = RunConfig.from_dict({"data": {"image_size": 16}, "model": TINY_MODEL})
    torch.manual_seed(0)
    net = UNet(cfg.model)
    torch.nn.init.normal_(net.head.weight, std=0.05)
    tensors = {
        **ckpt.with_prefix(net.state_dict(), "ema"),
        "norm.mean": torch.full((3,), 0.5),
        "norm.std": torch.full((3,), 0.25),
    }
    path = tmp_path_factory.mktemp("pipe") / "m.safetensors"
    return ckpt.save(path, tensors, {"config": cfg.to_dict(), "epoch": 0, "step": 0})


@pytest.fixture(scope="module")
def loaded(model_file):
    return pipelines.load_for_sampling(model_file, device="cpu")[0]


class Record:
    def __init__(self):
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, stage, done, total):
        self.calls.append((stage, done, total))

    def stages(self) -> list[str]:
        return list(dict.fromkeys(s for s, _, _ in self.calls))


def test_load_for_sampling_and_checked_settings(model_file):
    loaded, device = pipelines.load_for_sampling(str(model_file), device="cpu")
    assert device == torch.device("cpu") and loaded.config.model.image_size == 16
    s = pipelines.resolve_settings("cpu", sampler="unipc", steps=7)
    assert (s.sampler, s.steps, s.precision in ("fp32", "bf16")) == ("unipc", 7, True)
    with s.autocast():
        pass
    assert pipelines.resolve_settings("cpu", sampler="ddim", eta=1.0).eta == 1.0
    with pytest.raises(ConfigError, match="dpmpp-2m is deterministic; use eta 0"):
        pipelines.resolve_settings("cpu", sampler="dpmpp-2m", eta=0.5)
    with pytest.raises(ConfigError, match="unknown sampler 'euler'"):
        pipelines.resolve_settings("cpu", sampler="euler")
    with pytest.raises(ConfigError, match="steps"):
        pipelines.resolve_settings("cpu", steps=0)


def test_draw_reports_progress_and_gives_the_same_images(loaded):
    s = pipelines.resolve_settings("cpu", steps=2, batch_size=2, precision="fp32")
    rec = Record()
    images = pipelines.draw(loaded, 5, s, progress=rec)
    assert rec.calls == [("sample", 0, 5), ("sample", 2, 5), ("sample", 4, 5), ("sample", 5, 5)]
    assert torch.equal(images, pipelines.draw(loaded, 5, s))


def test_evaluate_progress_and_shuffled_paper_batches(loaded, avatars16, tmp_path):
    s = pipelines.resolve_settings("cpu", steps=1, precision="fp32")
    rec, fake = Record(), FakeExtractor()
    r = pipelines.evaluate(
        loaded, avatars16, n=8, settings=s, extractor=fake, cache_dir=tmp_path,
        paper_batch=4, progress=rec,
    )  # fmt: skip
    # the real folder is read first: a bad one is refused before any image is drawn
    assert rec.stages() == ["features (real)", "sample", "features (generated)", "paper KID"]
    last = {stage: (done, total) for stage, done, total in rec.calls}
    assert all(done == total for done, total in last.values())  # every stage ends complete
    assert r["paper"]["batches"] == 2
    # The paper protocol's real batches come in the fixed shuffled order, not file order.
    real = load_folder(avatars16, 16).images
    first = torch.from_numpy(np.asarray(real[metrics.paper_order(len(real))[:4]]))
    assert torch.equal(fake.paper_batches[0], first.permute(0, 3, 1, 2))


def test_evaluate_seconds_count_the_real_features_read_first(loaded, avatars16, tmp_path):
    """Once the real folder was read before drawing, "seconds" started after it: the total
    was less than its own parts (standard_seconds holds the real features' time)."""
    import time

    class SlowReal(FakeExtractor):
        def features(self, images_u8, protocol, batch_size=64, bf16=False):
            if len(images_u8) == 24:  # the real folder's 24 images, not the 8 drawn
                time.sleep(0.5)
            return super().features(images_u8, protocol, batch_size, bf16)

    s = pipelines.resolve_settings("cpu", steps=1, precision="fp32")
    r = pipelines.evaluate(loaded, avatars16, n=8, settings=s, extractor=SlowReal(),
                           cache_dir=tmp_path, protocols=("standard",))  # fmt: skip
    assert r["standard_seconds"] >= 0.5
    assert r["seconds"] >= r["generate_seconds"] + r["standard_seconds"] - 0.01, r


def test_invert_interpolate_and_steps_report_progress(loaded, avatars16, tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    for f in sorted(avatars16.glob("*.png"))[:3]:
        (folder / f.name).write_bytes(f.read_bytes())
    s = pipelines.resolve_settings("cpu", steps=2, batch_size=2, precision="fp32")
    rec = Record()
    pipelines.invert(loaded, folder, tmp_path / "inv", steps=2, settings=s, progress=rec)
    assert rec.calls[-1] == ("invert", 3, 3) and rec.stages() == ["invert"]
    rec = Record()
    pipelines.interpolate(loaded, tmp_path / "i.png", seeds=(1, 2), frames=3, settings=s,
                          progress=rec)  # fmt: skip
    assert rec.calls == [("interpolate", 0, 3), ("interpolate", 2, 3), ("interpolate", 3, 3)]
    rec = Record()
    pipelines.steps_study(
        loaded, avatars16, steps=[1, 2], etas=[0.0, 1.0], samplers=["dpmpp-2m"], n=4,
        settings=s, extractor=FakeExtractor(), out_dir=tmp_path / "st", cache_dir=tmp_path,
        log=lambda _: None, progress=rec,
    )  # fmt: skip
    assert rec.stages() == [
        "features (real)",
        "dpmpp-2m eta 0, 1 step: sample",  # not "1 steps"
        "dpmpp-2m eta 0, 1 step: features",
        "dpmpp-2m eta 0, 2 steps: sample",
        "dpmpp-2m eta 0, 2 steps: features",
    ]


def test_trajectory_reports_progress_and_its_strips_are_the_sampled_images(loaded, tmp_path):
    from PIL import Image

    s = pipelines.resolve_settings("cpu", steps=5, sampler="dpmpp-2m", seed=3, precision="fp32")
    rec = Record()
    path = pipelines.trajectory(
        loaded, tmp_path / "t.png", settings=s, n=2, columns=3, progress=rec
    )
    assert rec.calls == [("trajectory", k, 5) for k in range(6)]
    r = pipelines.reverse_steps(loaded, settings=s, n=2, columns=3)
    assert r.steps == [0, 2, 4] and r.times == pytest.approx([1.0, 0.6, 0.2])
    assert r.noisy.shape == r.pred.shape == (2, 3, 16, 16, 3)
    # The last predicted x0 is the sample `draw` returns; rows are x_t, x0 of image 0, then 1.
    assert torch.equal(r.pred[:, -1], pipelines.draw(loaded, 2, s))
    grid = torch.from_numpy(np.array(Image.open(path)))
    rows = torch.cat([r.noisy[0], r.pred[0], r.noisy[1], r.pred[1]])  # [4*3, 16, 16, 3]
    expected = rows.view(4, 3, 16, 16, 3).permute(0, 2, 1, 3, 4).reshape(64, 48, 3)
    assert torch.equal(grid, expected)
    assert pipelines.shown_steps(20, 7) == [0, 3, 6, 10, 13, 16, 19]
    assert pipelines.shown_steps(1, 7) == [0] and pipelines.shown_steps(9, 1) == [8]


def test_check_seed_takes_any_integer_type_in_range():
    """A numpy integer seed from Python code is a seed (returned as int); out of range or not
    an integer is a ConfigError naming it."""
    import numpy as np

    from animeddim.config import ConfigError
    from animeddim.pipelines import check_seed

    assert check_seed(np.int64(5)) == 5 and type(check_seed(np.uint32(7))) is int
    for bad in (np.int64(-1), 2**63, 1.5, True, "3"):
        with pytest.raises(ConfigError, match="0 .. 2\\*\\*63 - 1"):
            check_seed(bad)


def test_wrong_arguments_from_python_are_config_errors_naming_them(loaded, tmp_path):
    """From a notebook, steps "5" or batch_size None died in a comparison (TypeError), steps
    2.5 and precision "fp8" were accepted (the latter a KeyError at the first draw), n -1
    drew nothing, interpolate frames 0 failed inside torch, three seeds used two, and invert
    steps 0 hit an IndexError."""
    for kw, match in [
        ({"steps": "5"}, "steps must be an integer >= 1, got '5'"),
        ({"steps": 2.5}, "steps must be an integer >= 1, got 2.5"),
        ({"batch_size": None}, "batch_size must be an integer >= 1, got None"),
        ({"eta": "0.5"}, "eta must be a number in \\[0, 1\\], got '0.5'"),
        ({"eta": 2}, "eta must be a number in \\[0, 1\\], got 2"),
        ({"precision": "fp8"}, "unknown precision 'fp8': expected auto, fp32, bf16 or fp16"),
    ]:
        with pytest.raises(ConfigError, match=match):
            pipelines.resolve_settings("cpu", **kw)
    s = pipelines.resolve_settings("cpu", steps=np.int64(1), batch_size=2, precision="fp32")
    assert type(s.steps) is int
    # a 0-d integer tensor too (steps computed in torch), read as its int; not a float one
    t = pipelines.resolve_settings("cpu", steps=torch.tensor(3), seed=torch.tensor(5))
    assert (type(t.steps), t.steps, type(t.seed), t.seed) == (int, 3, int, 5)
    for kw in ({"steps": torch.tensor(3.0)}, {"steps": torch.tensor(True)}, {"seed": 1.0}):
        with pytest.raises(ConfigError, match="must be an integer"):
            pipelines.resolve_settings("cpu", **kw)
    for n, first, match in [(-1, 0, "n must be"), (2.0, 0, "n must be"), (1, -1, "first_index")]:
        with pytest.raises(ConfigError, match=match):
            pipelines.draw(loaded, n, s, first_index=first)
    out = tmp_path / "i.gif"
    for kw, match in [
        ({"seeds": (1, 2), "frames": 0}, "frames must be an integer >= 2, got 0"),
        ({"seeds": (1, 2, 3)}, "give two seeds or two images, not both: got seeds=\\(1, 2, 3\\)"),
        ({}, "give two seeds or two images"),
        ({"seeds": (1, 2), "images": ("a.png", "b.png")}, "not both"),
    ]:
        with pytest.raises(ConfigError, match=match):
            pipelines.interpolate(loaded, out, settings=s, **kw)
    with pytest.raises(ConfigError, match="steps must be an integer >= 1, got 0"):
        pipelines.invert(loaded, tmp_path, tmp_path / "inv", steps=0, settings=s)
    with pytest.raises(ConfigError, match="n must be an integer >= 1, got 0"):
        pipelines.reverse_steps(loaded, settings=s, n=0)
    assert not out.exists() and not (tmp_path / "inv").exists()  # refused before writing


def test_whether_sampling_compiles_is_decided_by_the_whole_job_not_a_process_share(
    monkeypatch,
):
    """A compiled sampling network rounds otherwise than the eager one (bf16: pixels apart),
    so the number of processes must not change the choice. Before: each process chose by
    its own share, so 1,000 images at 10 steps compiled in one process (10,000
    image-steps) and not in each of two (5,000 each)."""
    from animeddim import distributed, runtime
    from animeddim.pipelines import core, folder

    monkeypatch.setattr(runtime, "compiler_available", lambda: True)
    monkeypatch.setattr(distributed, "shard", lambda n: (0, n // 2))  # process 0 of 2
    chosen = []

    def sampling_net(loaded, s, evaluations):
        chosen.append(s.compiles(evaluations))
        return "net"

    monkeypatch.setattr(core, "sampling_net", sampling_net)
    monkeypatch.setattr(core, "draw", lambda loaded, n, *a, **k: torch.zeros(n, 4, 4, 3))
    loaded = pipelines.open_model("avatars-64")
    s = pipelines.resolve_settings("cpu", "fp32", steps=10)
    names = [f"{i}.png" for i in range(1000)]
    job = folder.image_job(loaded, s, names, 8)
    job.make(2, 0)
    assert chosen == [True] and job.compiled
    few = folder.image_job(loaded, s, names[:999], 8)  # 9,990 image-steps: eager
    few.make(2, 0)
    assert chosen == [True, False] and not few.compiled
    assert s.decided(10_000).compile is True and s.decided(9_999).compile is False
