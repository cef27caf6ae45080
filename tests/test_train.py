"""Training end to end: CLI train + sample, resume equality, run-folder rules."""

from __future__ import annotations

import csv
import json
import warnings

import pytest
import torch
from conftest import run_cli, tiny_config
from PIL import Image

from animeddim import checkpoint as ckpt
from animeddim.run_folder import RunFolderError, load_run_config
from animeddim.runtime import compiler_available
from animeddim.train import train


def test_cli_train_then_sample(avatars16, tmp_path):
    run = tmp_path / "run"
    cfg = tmp_path / "tiny.json"
    cfg.write_text(
        json.dumps({"model": {"widths": [8, 16], "block_depth": 1, "embedding_dims": 8}})
    )
    p = run_cli(
        "train",
        "--data",
        str(avatars16),
        "--out",
        str(run),
        "--image-size",
        "16",
        "--epochs",
        "2",
        "--batch-size",
        "6",
        "--config",
        str(cfg),
        "--no-kid",
        "--quiet",
        "--precision",
        "fp32",
    )
    assert "run folder" in p.stdout
    stored = json.loads((run / "config.json").read_text())
    assert stored["model"]["widths"] == [8, 16] and stored["train"]["epochs"] == 2
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for r in rows:
        for k in (
            "train_noise_loss",
            "train_image_loss",
            "val_noise_loss",
            "val_image_loss",
            "learning_rate",
            "images_per_s",
            "wall_seconds",
        ):
            assert float(r[k]) > 0, k
    assert (run / "samples" / "epoch-0002.png").is_file()
    out, grid = tmp_path / "samples", tmp_path / "grid.png"
    run_cli(
        "sample",
        "--run",
        str(run),
        "--n",
        "5",
        "--steps",
        "3",
        "--out",
        str(out),
        "--grid",
        str(grid),
    )
    files = sorted(out.glob("*.png"))
    assert len(files) == 5
    assert Image.open(files[0]).size == (16, 16)
    assert Image.open(grid).size == (5 * 16, 16)


def _weights(run):
    tensors, meta = ckpt.load(run / "checkpoints" / "last.safetensors")
    return tensors, meta


def test_resume_is_bitwise_equal_to_uninterrupted(avatars16, tmp_path):
    full = tmp_path / "full"
    train(tiny_config(avatars16, epochs=3), full, progress=False, log=lambda s: None)
    part = tmp_path / "part"
    train(tiny_config(avatars16, epochs=1), part, progress=False, log=lambda s: None)
    cfg = load_run_config(part)
    cfg.train.epochs = 3
    train(cfg, part, resume=True, progress=False, log=lambda s: None)
    a, ma = _weights(full)
    b, mb = _weights(part)
    assert ma["step"] == mb["step"] and ma["epoch"] == mb["epoch"] == 3
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows_a = list(csv.DictReader(open(full / "metrics.csv")))
    rows_b = list(csv.DictReader(open(part / "metrics.csv")))
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra["val_noise_loss"] == rb["val_noise_loss"]
        assert ra["train_noise_loss"] == rb["train_noise_loss"]


def test_resume_mid_epoch_is_bitwise_equal(avatars16, tmp_path):
    full = tmp_path / "full"
    train(tiny_config(avatars16, epochs=2), full, progress=False, log=lambda s: None)
    part = tmp_path / "part"
    train(tiny_config(avatars16, epochs=2, max_steps=4), part, progress=False, log=lambda s: None)
    assert _weights(part)[1]["batch_in_epoch"] == 1  # 3 steps per epoch: stopped mid-epoch
    cfg = load_run_config(part)
    cfg.train.max_steps = 0
    train(cfg, part, resume=True, progress=False, log=lambda s: None)
    a, b = _weights(full)[0], _weights(part)[0]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.skipif(not compiler_available(), reason="torch.compile needs a C compiler")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_training_matches_eager(avatars16, tmp_path, precision):
    """The compiled training path (channels_last too for bf16) trains like the eager one."""
    weights = {}
    for compile in (False, True):
        run = tmp_path / f"{precision}-{compile}"
        cfg = tiny_config(avatars16, epochs=1, max_steps=2, compile=compile, precision=precision)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no silent fall-back to eager
            train(cfg, run, progress=False, log=lambda s: None)
        weights[compile] = ckpt.prefixed(_weights(run)[0], "model")
    atol = 1e-5 if precision == "fp32" else 2e-3  # bf16: rounding in a different order
    for k, eager in weights[False].items():
        torch.testing.assert_close(weights[True][k], eager, rtol=0, atol=atol, msg=k)
    # The two AdamW steps moved the network away from its start (the EMA stays near it).
    ema = ckpt.prefixed(_weights(tmp_path / f"{precision}-False")[0], "ema")
    assert max(float((weights[False][k] - ema[k]).abs().max()) for k in ema) > 1e-4


def test_ema_starts_as_exact_copy_and_tracks_network(avatars16, tmp_path):
    run = tmp_path / "r"
    train(tiny_config(avatars16, epochs=1, max_steps=1), run, progress=False, log=lambda s: None)
    t, _ = _weights(run)
    model, ema = ckpt.prefixed(t, "model"), ckpt.prefixed(t, "ema")
    k = "stem.weight"
    # after one step: ema = 0.999 * init + 0.001 * model, so it moved a little towards model
    assert not torch.equal(model[k], ema[k])
    assert (model[k] - ema[k]).abs().max() > 0


def test_run_folder_rules(avatars16, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "something.txt").write_text("x")
    with pytest.raises(RunFolderError, match="already holds files"):
        train(tiny_config(avatars16), run, progress=False)
    with pytest.raises(RunFolderError, match="not an animeddim run folder"):
        load_run_config(tmp_path / "missing")


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "{empty}", "--out", "{tmp}/r"], "no usable image"),
        (["train", "--data", "{tmp}/nope", "--out", "{tmp}/r"], "does not exist"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--image-size", "20"], "multiple of"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--device", "tpu"], "unknown device"),
        (["train", "--resume", "{tmp}/nope"], "not an animeddim run folder"),
        (["sample", "--run", "{tmp}/nope", "--grid", "{tmp}/g.png"], "neither a run folder"),
        (["sample", "--run", "{tmp}", "--steps", "0", "--grid", "g.png"], "steps must be"),
        (["sample", "--run", "{tmp}", "--steps", "1001", "--grid", "g.png"], "steps must be"),
        (["sample", "--run", "{tmp}", "--eta", "1.5", "--grid", "g.png"], "eta must be"),
        (["sample", "--run", "{tmp}", "--n", "0", "--grid", "g.png"], "n must be"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, avatars16, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    argv = [a.format(tmp=tmp_path, empty=empty, data=avatars16) for a in args]
    p = run_cli(*argv, check=False)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_init_starts_from_another_models_ema_weights(avatars16, tmp_path):
    quiet = {"progress": False, "log": lambda s: None}
    source = tmp_path / "source"
    train(tiny_config(avatars16, epochs=2), source, **quiet)
    src_ema = ckpt.prefixed(_weights(source)[0], "ema")
    exported = ckpt.export_weights(source, tmp_path / "source.safetensors", torch.float32)

    def one_step(name, **over):
        run = tmp_path / name
        train(tiny_config(avatars16, epochs=1, max_steps=1, seed=1, **over), run, **quiet)
        t = _weights(run)[0]
        return ckpt.prefixed(t, "model"), ckpt.prefixed(t, "ema")

    def gap(a, b):  # over the learned weights (BatchNorm's running statistics move faster)
        keys = [k for k in b if "running_" not in k and "num_batches" not in k]
        return max((a[k].float() - b[k].float()).abs().max().item() for k in keys)

    for i, spec in enumerate((str(source), str(exported))):  # a run folder, an exported file
        live, ema = one_step(f"init-{i}", init=spec)
        # One AdamW step moves each weight by about lr = 1e-3 (Adam's first step is lr * sign).
        assert 0 < gap(live, src_ema) <= 1.1e-3
        assert gap(ema, src_ema) <= 1.1e-6 + 1e-9  # ema = 0.999 * source + 0.001 * live
    live, _ = one_step("scratch")
    assert gap(live, src_ema) > 0.05  # without --init: a fresh network

    # The architecture must match; the error names the source and exits 2 on the CLI.
    args = ["--image-size", "16", "--batch-size", "6", "--max-steps", "1", "--no-kid", "--quiet"]
    p = run_cli(
        "train", "--data", str(avatars16), "--out", str(tmp_path / "wide"),
        "--init", str(exported), *args, check=False,
    )  # fmt: skip
    assert p.returncode == 2 and "initial weights from" in p.stderr, p.stderr
    assert "does not match" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("train", "--resume", str(source), "--init", str(exported), check=False)
    assert p.returncode == 2 and "cannot change when resuming" in p.stderr, p.stderr


def test_init_accepts_a_shipped_model_name():
    from animeddim.pretrained import pretrained_path, weights_path

    assert weights_path("avatars-64") == pretrained_path("avatars-64")
    with pytest.raises(ckpt.CheckpointError, match="neither a run folder"):
        weights_path("no-such-model")
