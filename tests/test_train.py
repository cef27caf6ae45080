"""Training end to end: CLI train + sample, resume equality, run-folder rules."""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import run_cli, run_here, tiny_config
from PIL import Image

from animeddim import checkpoint as ckpt
from animeddim import run_folder
from animeddim.run_folder import RunFolderError, load_run_config
from animeddim.runtime import compiler_available
from animeddim.train import ema_decay_at, learning_rate_at, train


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


def _stopped_then_resumed(avatars16, run, steps: int, **settings) -> dict:
    """Train `run` for `steps` optimiser steps, resume it to its end; its last weights."""
    train(tiny_config(avatars16, max_steps=steps, **settings), run, progress=False,
          log=lambda s: None)  # fmt: skip
    assert _weights(run)[1]["step"] == steps
    cfg = load_run_config(run)
    cfg.train.max_steps = 0
    train(cfg, run, resume=True, progress=False, log=lambda s: None)
    return _weights(run)[0]


def test_resume_mid_epoch_is_bitwise_equal(avatars16, tmp_path):
    full = tmp_path / "full"
    train(tiny_config(avatars16, epochs=2), full, progress=False, log=lambda s: None)
    b = _stopped_then_resumed(avatars16, tmp_path / "part", 4, epochs=2)  # 3 steps per epoch
    a = _weights(full)[0]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.skipif(not compiler_available(), reason="torch.compile needs a C compiler")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_training_matches_eager(avatars16, tmp_path, precision, process_threads):
    """The compiled training path (channels_last too for bf16) trains like the eager one.

    On one thread the kernels sum in another order and fp32 head.bias ends 1.1e-4 apart
    (measured; the other weights 3e-7): the check keeps the thread count it was set for."""
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


def test_ema_warmup_decay_rises_to_the_set_decay():
    assert [ema_decay_at(s, 0.999, True) for s in (0, 1, 90)] == [0.1, 2 / 11, 0.91]
    assert ema_decay_at(8990, 0.999, True) == 0.999 == ema_decay_at(10**6, 0.999, True)
    assert ema_decay_at(0, 0.999, False) == 0.999


def test_a_run_whose_ema_is_still_mostly_its_untrained_start_says_so(
    avatars16, trained_tiny, tmp_path
):
    """A short run on a small folder (a minute on the CPU) ends with an EMA that is still
    mostly the random start, and every sample is noise; the end of `train` says so. A run
    started from trained weights (--init) starts from no noise: nothing to say."""
    tiny = ["--image-size", 16, "--widths", "8,16", "--block-depth", 1, "--embedding-dims", 8,
            "--batch-size", 6, "--no-kid", "--quiet", "--precision", "fp32"]  # fmt: skip
    p = run_here("train", "--data", avatars16, "--out", tmp_path / "a", *tiny)
    note = [line for line in p.stdout.splitlines() if line.startswith("note: after 3 steps")]
    assert note == [
        "note: after 3 steps the EMA weights (decay 0.999), which sampling, validation and the "
        "KID use, are still 99.7% the untrained start, so they draw noise; train longer (2,302 "
        "steps bring that under 10%), or start the run with --ema-warmup"
    ]
    p = run_here("train", "--data", avatars16, "--out", tmp_path / "b", "--ema-decay", 0.5, *tiny)
    assert "still 12.5% the untrained start" in p.stdout and "(4 steps bring" in p.stdout
    others = (["--ema-decay", 0.4], ["--ema-warmup"], ["--init", trained_tiny])  # 6.4%, 10%
    for i, other in enumerate(others):
        p = run_here("train", "--data", avatars16, "--out", tmp_path / f"c{i}", *other, *tiny)
        assert "run folder" in p.stdout and "untrained start" not in p.stdout


def test_ema_warmup_first_step_keeps_a_tenth_of_the_start(avatars16, tmp_path):
    """Step 0 with warm-up: ema = 0.1 start + 0.9 network; without: 0.999 start + 0.001
    network. The networks are the same (the EMA does not feed back), so the start follows."""
    runs = {}
    for warmup in (False, True):
        run = tmp_path / f"w{warmup}"
        cfg = tiny_config(avatars16, epochs=1, max_steps=1, ema_warmup=warmup)
        train(cfg, run, progress=False, log=lambda s: None)
        t = _weights(run)[0]
        runs[warmup] = ckpt.prefixed(t, "model"), ckpt.prefixed(t, "ema")
    (model, ema_plain), (model_w, ema_w) = runs[False], runs[True]
    for k in model:
        assert torch.equal(model[k], model_w[k]), k
        if not model[k].is_floating_point():
            continue  # BatchNorm's batch counter is copied, not averaged
        start = (ema_plain[k].double() - 0.001 * model[k].double()) / 0.999
        want = (0.1 * start + 0.9 * model[k].double()).float()
        torch.testing.assert_close(ema_w[k], want, rtol=0, atol=1e-6, msg=k)
    floats = [k for k in model if model[k].is_floating_point()]
    assert max(float((ema_w[k] - ema_plain[k]).abs().max()) for k in floats) > 1e-3


def test_run_folder_rules(avatars16, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "something.txt").write_text("x")
    with pytest.raises(RunFolderError, match="already holds files"):
        train(tiny_config(avatars16), run, progress=False)
    with pytest.raises(RunFolderError, match="not an animeddim run folder"):
        load_run_config(tmp_path / "missing")


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
    p = run_here(
        "train", "--data", str(avatars16), "--out", str(tmp_path / "wide"),
        "--init", str(exported), *args, check=False,
    )  # fmt: skip
    assert p.returncode == 2 and "initial weights from" in p.stderr, p.stderr
    assert "does not match" in p.stderr and "Traceback" not in p.stderr
    p = run_here("train", "--resume", str(source), "--init", str(exported), check=False)
    assert p.returncode == 2 and "cannot change when resuming" in p.stderr, p.stderr


def test_init_accepts_a_shipped_model_name():
    from animeddim.pretrained import pretrained_path, weights_path

    assert weights_path("avatars-64") == pretrained_path("avatars-64")
    with pytest.raises(
        ckpt.CheckpointError,
        match="unknown model 'no-such-model': shipped models are avatars-64, avatars-64-cond; "
        "otherwise give a run folder",
    ):
        weights_path("no-such-model")


# --------------------------------------------------------------------------------------------
# Training finishes or refuses up front; one run folder, one process, one data set


def _tiny_args(data, out, *extra: str) -> list[str]:
    model = ["--image-size", "16", "--widths", "8,16", "--block-depth", "1"]
    return ["train", "--data", str(data), "--out", str(out), *model, "--embedding-dims", "8",
            "--precision", "fp32", "--quiet", *extra]  # fmt: skip


def _one_line_exit_2(p, *fragments: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    for f in fragments:
        assert f in p.stderr, p.stderr


def _folder(src, dst, n: int):
    dst.mkdir()
    for f in sorted(src.glob("*.png"))[:n]:
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_no_validation_split_trains_to_the_end(avatars16, tmp_path):
    """--val-fraction 0 (and a 1-image folder) used to crash on the epoch line after saving."""
    p = run_here(*_tiny_args(avatars16, tmp_path / "r", "--val-fraction", "0", "--batch-size",
                            "12"))  # fmt: skip
    assert "epoch 1/1" in p.stdout and "(val" not in p.stdout
    rows = list(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    assert [r["val_noise_loss"] for r in rows] == [""]
    one = _folder(avatars16, tmp_path / "one", 1)
    p = run_here(*_tiny_args(one, tmp_path / "r1", "--batch-size", "1"))
    assert "note: per-epoch KID disabled" in p.stdout and "run folder" in p.stdout


def test_failed_start_leaves_nothing_that_blocks_the_fixed_command(avatars16, tmp_path):
    run = tmp_path / "r"
    _one_line_exit_2(run_here(*_tiny_args(avatars16, run, "--batch-size", "99"), check=False),
                     "larger than the training split")  # fmt: skip
    assert not run.exists()
    # A run killed before its first checkpoint: config.json and reference.png only.
    run_folder.prepare_run_dir(run, tiny_config(avatars16), resume=False)
    (run / "reference.png").write_bytes(b"")
    p = run_here(*_tiny_args(avatars16, run, "--batch-size", "6", "--max-steps", "1", "--no-kid"))
    assert (run / "checkpoints" / "last.safetensors").is_file()
    # Stopped inside epoch 1: the closing line lists no metrics.csv, which is not there.
    assert not (run / "metrics.csv").exists()
    assert f"run folder: {run} (checkpoints/ only: stopped at step 1, before" in p.stdout
    # Once it has a checkpoint, only --resume may continue it.
    p = run_here(*_tiny_args(avatars16, run, "--batch-size", "6"), check=False)
    _one_line_exit_2(p, "already holds files")


def test_a_failed_start_removes_every_folder_its_out_made(avatars16, tmp_path):
    """`train --out runs/a/b`, runs and below new, refused once the data is read (before:
    the lock recorded only whether b existed, so runs/a was left behind). Every folder the
    start made goes, and only those: one there before stays."""
    out = tmp_path / "runs" / "a" / "b"
    for there_before in (None, tmp_path / "runs"):
        if there_before is not None:
            there_before.mkdir()
        p = run_here(*_tiny_args(avatars16, out, "--batch-size", "99"), check=False)
        _one_line_exit_2(p, "larger than the training split")
        assert [d.name for d in tmp_path.rglob("*")] == ([] if there_before is None else ["runs"])


def test_out_inside_data_is_refused(avatars16, tmp_path):
    data = _folder(avatars16, tmp_path / "data", 6)
    p = run_here(*_tiny_args(data, data / "run"), check=False)
    _one_line_exit_2(p, "lies inside --data")
    assert not (data / "run").exists()


def test_second_process_on_a_run_folder_is_refused_naming_the_holder(avatars16, tmp_path):
    run = tmp_path / "r"
    run_here(*_tiny_args(avatars16, run, "--batch-size", "6", "--max-steps", "1", "--no-kid"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        p = run_cli("train", "--resume", str(run), "--epochs", "2", "--quiet", check=False)
        _one_line_exit_2(p, f"in use by process {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its PID is still in the file; the next one takes over.
    assert (run / run_folder.LOCK_NAME).read_text().strip() == str(holder.pid)
    p = run_cli("train", "--resume", str(run), "--max-steps", "0", "--quiet")
    assert f"took over the lock of process {holder.pid}" in p.stdout
    assert [r["epoch"] for r in csv.DictReader(open(run / "metrics.csv"))] == ["1"]
    assert (run / run_folder.LOCK_NAME).read_text() == ""  # released: no PID left behind


HOLD_LOCK = """
import sys, time
from pathlib import Path
from animeddim.run_folder import lock
with lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_resume_on_changed_data_is_an_error_unless_allowed(avatars16, tmp_path):
    data = _folder(avatars16, tmp_path / "data", 12)
    run = tmp_path / "r"
    run_here(*_tiny_args(data, run, "--batch-size", "6", "--max-steps", "1", "--no-kid"))
    stored = json.loads((run / "config.json").read_text())["data"]
    assert stored["abs_path"] == str(data.resolve()) and stored["fingerprint"].startswith("12:")
    (data / "new.png").write_bytes((avatars16 / "avatar-000020.png").read_bytes())
    resume = ["train", "--resume", str(run), "--epochs", "2", "--max-steps", "0", "--quiet"]
    p = run_here(*resume, check=False)
    _one_line_exit_2(p, "changed since the run started", "12 files then, 13 now")
    # From another working directory, the run still finds its own (absolute) data folder.
    p = subprocess.run(
        [sys.executable, "-m", "animeddim", *resume, "--allow-changed-data"],
        cwd=tmp_path / "data", capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "resuming on changed data" in p.stdout


def test_a_resume_with_nothing_left_to_train_is_refused_naming_the_option(avatars16, tmp_path):
    """A finished run resumed with its --epochs (or fewer), or a run stopped at --max-steps
    resumed without a higher one (before: exit 0 after 'resuming RUN at epoch 3' and no step,
    with the smaller --epochs recorded in config.json; or one step past --max-steps, then
    '--resume continues the epoch' again). Now exit 2 naming the option and what to give;
    config.json and metrics.csv as they were."""
    run = tmp_path / "r"  # 24 avatars, 6 held out, batch 6: 3 steps per epoch
    run_here(*_tiny_args(avatars16, run, "--batch-size", "6", "--no-kid", "--max-steps", "2"))
    before = (run / "config.json").read_bytes()
    for extra in ([], ["--max-steps", "1"], ["--epochs", "3"]):
        p = run_here("train", "--resume", str(run), "--quiet", *extra, check=False)
        _one_line_exit_2(p, "nothing to train in run folder", "2 steps done and --max-steps is")
        assert "resume with --max-steps above 2 (or 0: no limit) to train on" in p.stderr
    assert (run / "config.json").read_bytes() == before
    assert ckpt.read_meta(run / "checkpoints" / "last.safetensors")["step"] == 2
    run_here("train", "--resume", str(run), "--max-steps", "0", "--quiet")  # finishes epoch 1
    before = {f: (run / f).read_bytes() for f in ("config.json", "metrics.csv")}
    for extra in ([], ["--epochs", "1"]):
        p = run_here("train", "--resume", str(run), "--quiet", *extra, check=False)
        _one_line_exit_2(p, "1 epoch done and --epochs is 1; resume with --epochs above 1")
    assert {f: (run / f).read_bytes() for f in before} == before
    p = run_here("train", "--resume", str(run), "--epochs", "2", "--quiet")
    assert [r["epoch"] for r in csv.DictReader(open(run / "metrics.csv"))] == ["1", "2"]


def test_nothing_left_to_train_is_said_before_the_data_is_read(avatars16, tmp_path, monkeypatch):
    """Before: a resume with nothing left to train was refused only after the data folder
    was decoded and the Inception network loaded (many seconds); with its data folder gone,
    it said the folder does not exist instead. Now the checkpoint says it first."""
    import shutil

    from animeddim import train as train_mod

    data = _folder(avatars16, tmp_path / "data", 12)  # 10 training images, batch 3: 3 steps
    stopped, done = tmp_path / "stopped", tmp_path / "done"
    run_here(*_tiny_args(data, stopped, "--batch-size", "3", "--no-kid", "--max-steps", "2"))
    run_here(*_tiny_args(data, done, "--batch-size", "3", "--no-kid"))

    def no_reading(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr(train_mod, "load_data", no_reading)
    monkeypatch.setattr(train_mod, "training_inception", no_reading)
    for run, said in ((stopped, "2 steps done"), (done, "1 epoch done")):
        with pytest.raises(RunFolderError, match=rf"nothing to train in run folder .*{said}"):
            train(load_run_config(run), run, resume=True, progress=False, log=lambda s: None)
    monkeypatch.undo()
    shutil.rmtree(data)
    p = run_here("train", "--resume", str(stopped), "--quiet", check=False)
    _one_line_exit_2(p, "nothing to train in run folder", "2 steps done and --max-steps is 2")
    p = run_here("train", "--resume", str(done), "--quiet", check=False)
    _one_line_exit_2(p, "1 epoch done and --epochs is 1; resume with --epochs above 1")

    # A checkpoint that does not say how long its epoch is (written before it did): a run
    # stopped inside an epoch is refused once the data says it, with the same line.
    _folder(avatars16, data, 12)
    last = stopped / "checkpoints" / "last.safetensors"
    tensors, meta = ckpt.load(last)
    ckpt.save(last, tensors, {k: v for k, v in meta.items() if k != "steps_per_epoch"})
    data.rename(tmp_path / "elsewhere")
    p = run_here("train", "--resume", str(stopped), "--quiet", check=False)
    _one_line_exit_2(p, "image folder", "does not exist")
    (tmp_path / "elsewhere").rename(data)
    p = run_here("train", "--resume", str(stopped), "--quiet", check=False)
    _one_line_exit_2(p, "nothing to train in run folder", "2 steps done and --max-steps is 2")


def test_a_resume_refused_once_the_data_is_read_writes_nothing(avatars16, tmp_path):
    """A checkpoint written before it recorded its epoch's length, stopped at --max-steps
    inside an epoch, is refused 'nothing to train' only once the data is read (before: after
    metrics.csv had been cut to the checkpoint's epoch and written again). No file of the run
    folder is written: not its metrics.csv, not its config.json."""
    data = _folder(avatars16, tmp_path / "data", 12)  # 10 training images, batch 3: 3 steps
    run = tmp_path / "run"
    run_here(*_tiny_args(data, run, "--batch-size", "3", "--no-kid", "--epochs", "2",
                         "--max-steps", "5"))  # fmt: skip
    last = run / "checkpoints" / "last.safetensors"
    tensors, meta = ckpt.load(last)
    assert (meta["epoch"], meta["batch_in_epoch"]) == (1, 2)  # inside epoch 2
    ckpt.save(last, tensors, {k: v for k, v in meta.items() if k != "steps_per_epoch"})
    # epoch 2's row, as a resume to its end killed before its checkpoint leaves it
    (row,) = csv.DictReader(open(run / "metrics.csv", encoding="utf-8"))
    run_folder.append_metrics(run, {**row, "epoch": 2, "step": 6})

    def files() -> dict:
        return {
            p: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns)
            for p in run.rglob("*")
            if p.is_file() and p.name != run_folder.LOCK_NAME
        }

    before = files()
    p = run_here("train", "--resume", str(run), "--quiet", check=False)
    _one_line_exit_2(p, "nothing to train in run folder", "5 steps done and --max-steps is 5")
    assert files() == before
    run_here("train", "--resume", str(run), "--max-steps", "0", "--quiet")
    assert [r["epoch"] for r in csv.DictReader(open(run / "metrics.csv"))] == ["1", "2"]


def test_training_walks_the_data_folder_once(avatars16, tmp_path, monkeypatch):
    """Training listed the data folder twice at its start: once for the fingerprint, once to
    decode it. The walk made for the fingerprint is now the one decoded; a run started before
    hidden files were passed over decodes the earlier walk its fingerprint matched."""
    from animeddim import data as data_mod
    from animeddim.train_data import load_data

    walks, real = [], data_mod.list_images

    def counted(root, **kwargs):
        walks.append(kwargs)
        return real(root, **kwargs)

    monkeypatch.setattr(data_mod, "list_images", counted)
    data = _folder(avatars16, tmp_path / "data", 12)
    assert len(load_data(tiny_config(data), data, False).imageset.paths) == 12
    assert walks == [{}]
    (data / ".hidden.png").write_bytes((avatars16 / "avatar-000020.png").read_bytes())
    cfg = tiny_config(data)
    cfg.data.fingerprint = run_folder.data_fingerprint(real(data, everything=True).files, data)
    walks.clear()
    with pytest.warns(data_mod.PassedOverWarning, match="goes on with the images it began"):
        paths = load_data(cfg, data, False).imageset.paths
    assert walks == [{}, {"everything": True}] and len(paths) == 13
    assert str(data / ".hidden.png") in paths


def _resume_config(*args: str):
    from animeddim.cli import build_parser
    from animeddim.cli.commands import resume_config_from_args

    return resume_config_from_args(build_parser().parse_args(["train", "--resume", *args]))


def test_resume_takes_the_runs_own_data_folder_and_config_file(avatars16, tmp_path, monkeypatch):
    """`--resume RUN --data DIR` and `--resume RUN --config FILE` were refused whole, even
    with the folder the run trained on or the file it started from. Now a setting the run
    keeps may be given with the run's own value: the folder however spelt (relative, a
    trailing slash, ~, a symbolic link), the config file the run started from, one of
    resumable settings (applied as the options would be); the settings are then exactly a
    plain resume's. Another value is refused in one line naming the setting and both values."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    data = _folder(avatars16, tmp_path / "data", 12)  # 10 training images, batch 3: 3 steps
    (tmp_path / "link").symlink_to("data")
    model = {"image_size": 16, "widths": [8, 16], "block_depth": 1, "embedding_dims": 8}
    train = {"batch_size": 3, "kid": False, "precision": "fp32", "max_steps": 1}
    started = {"data": {"path": "data"}, "model": model, "train": train}
    (tmp_path / "start.json").write_text(json.dumps(started))
    (tmp_path / "more.json").write_text(json.dumps({"train": {"epochs": 2, "log_every": 5}}))
    started["train"]["batch_size"] = 4
    (tmp_path / "other.json").write_text(json.dumps(started))
    run_here("train", "--config", "start.json", "--out", "run", "--quiet")

    plain = _resume_config("run", "--max-steps", "2").to_dict()
    for same in (["--data", "data/"], ["--data", "./data"], ["--data", "~/data"],
                 ["--data", str(tmp_path / "link")], ["--config", "start.json"],
                 ["--config", "start.json", "--data", "data"]):  # fmt: skip
        assert _resume_config("run", *same, "--max-steps", "2").to_dict() == plain, same
    options = _resume_config("run", "--epochs", "2", "--log-every", "5").to_dict()
    assert _resume_config("run", "--config", "more.json").to_dict() == options
    both = _resume_config("run", "--config", "more.json", "--epochs", "3")
    assert both.train.epochs == 3  # the options over the file, as for a new run

    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    p = run_here("train", "--resume", "run", "--config", "start.json", "--data", "./data/",
                 "--max-steps", "2", "--quiet")  # fmt: skip
    assert "stopped at step 2" in p.stdout
    stored["train"]["max_steps"] = 2  # the one setting given otherwise; data.path as it was
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == stored

    _folder(avatars16, tmp_path / "elsewhere", 3)  # other images: `train` refuses them
    before = (tmp_path / "run" / "config.json").read_bytes()
    for args, line in (
        (["--data", "elsewhere", "--max-steps", "0"], "cannot resume on changed data: the "
         f"images in 'elsewhere' are not those the run trained on in '{data.resolve()}' (12 "
         "files then, 3 now, or files renamed or rewritten); give --data the folder that holds "
         "them"),
        (["--labels", "folders"], "--labels cannot change when resuming: --labels is '' in the "
         "run, 'folders' given; leave it out"),
        (["--config", "other.json"], "train.batch_size (in 'other.json') cannot change when "
         "resuming: train.batch_size is 3 in the run, 4 given; leave it out"),
        (["--config", "other.json", "--seed", "3"], "train.batch_size (in 'other.json'), --seed "
         "cannot change when resuming: train.batch_size is 3 in the run, 4 given; --seed is 0 "
         "in the run, 3 given; leave them out"),
    ):  # fmt: skip
        _one_line_exit_2(run_here("train", "--resume", "run", *args, check=False), line)
    assert (tmp_path / "run" / "config.json").read_bytes() == before


def test_a_run_whose_data_moved_resumes_there_as_if_uninterrupted(avatars16, tmp_path):
    """A data folder moved (or copied) elsewhere: `--resume RUN --data NEW` was refused ('--data
    cannot change when resuming'), and config.json had to be edited by hand. Now the images
    there are checked to be the run's, the run goes on there, bitwise as if uninterrupted,
    with one note, and config.json records the new place for the next plain --resume."""
    data = _folder(avatars16, tmp_path / "data", 12)  # 10 training images, batch 3: 3 steps
    full, run, moved = tmp_path / "full", tmp_path / "run", tmp_path / "moved"
    run_here(*_tiny_args(data, full, "--batch-size", "3", "--no-kid", "--epochs", "2"))
    run_here(*_tiny_args(data, run, "--batch-size", "3", "--no-kid", "--epochs", "2",
                         "--max-steps", "4"))  # fmt: skip
    data.rename(moved)
    p = run_here("train", "--resume", str(run), "--max-steps", "0", "--quiet", check=False)
    _one_line_exit_2(p, f"image folder '{data}' does not exist: the run's data folder; if it "
                     "moved, resume with --data and its new place")  # fmt: skip
    # a new place given that does not exist (a typo): it, not the old place, is to correct
    p = run_here("train", "--resume", str(run), "--data", str(tmp_path / "moves"),
                 "--max-steps", "0", "--quiet", check=False)  # fmt: skip
    _one_line_exit_2(p, f"image folder '{tmp_path / 'moves'}' does not exist: give --data the "
                     "folder the run's images are in now (it trained on them in "
                     f"'{data}')")  # fmt: skip
    p = run_here("train", "--resume", str(run), "--data", str(moved), "--max-steps", "0",
                 "--quiet")  # fmt: skip
    notes = [
        line
        for line in p.stdout.splitlines()
        if line.startswith("note:") and "EMA weights" not in line
    ]
    assert notes == [f"note: the run's data folder moved from '{data}' to '{moved}'"], p.stdout
    stored = json.loads((run / "config.json").read_text())["data"]
    assert stored["path"] == stored["abs_path"] == str(moved)
    a, b = _weights(full), _weights(run)
    assert a[1]["step"] == b[1]["step"] == 6
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    rows = [list(csv.DictReader(open(r / "metrics.csv"))) for r in (full, run)]
    assert [[r["train_noise_loss"], r["val_noise_loss"]] for r in rows[0]] == [
        [r["train_noise_loss"], r["val_noise_loss"]] for r in rows[1]
    ]
    p = run_here("train", "--resume", str(run), "--epochs", "3", "--quiet")  # found there
    assert "moved from" not in p.stdout and "resuming" in p.stdout  # no note of a move


def test_a_resume_given_a_folder_of_other_images_is_refused_unless_allowed(avatars16, tmp_path):
    """`--resume RUN --data OTHER` where OTHER's images are not the run's: one line naming
    both folders, before any image is decoded, config.json untouched; with
    --allow-changed-data the run trains on OTHER, noted, and records it."""
    from animeddim import train as train_mod

    data = _folder(avatars16, tmp_path / "data", 12)
    other = _folder(avatars16, tmp_path / "other", 13)
    run = tmp_path / "run"
    run_here(*_tiny_args(data, run, "--batch-size", "3", "--no-kid", "--max-steps", "1"))
    before = (run / "config.json").read_bytes()
    resume = ["train", "--resume", str(run), "--data", str(other), "--max-steps", "0", "--quiet"]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train_mod, "load_data", lambda *a, **k: pytest.fail("images were decoded"))
        p = run_here(*resume, check=False)
    _one_line_exit_2(p, f"cannot resume on changed data: the images in '{other}' are not those "
                     f"the run trained on in '{data}' (12 files then, 13 now, or files renamed "
                     "or rewritten); give --data the folder that holds them, or resume with "
                     "--allow-changed-data")  # fmt: skip
    assert (run / "config.json").read_bytes() == before
    p = run_here(*resume, "--allow-changed-data")
    notes = [
        line
        for line in p.stdout.splitlines()
        if line.startswith("note:") and "EMA weights" not in line
    ]
    assert notes == [f"note: resuming on changed data (the images in '{other}' are not those "
                     f"the run trained on in '{data}' (12 files then, 13 now, or files renamed "
                     "or rewritten))"], p.stdout  # fmt: skip
    stored = json.loads((run / "config.json").read_text())["data"]
    assert stored["abs_path"] == str(other) and stored["fingerprint"].startswith("13:")


# Every option combination the parser accepts, on any folder with >= 1 usable image, trains
# to the end or is refused before any work with exit 2 and one sentence.
PROPERTY_EXAMPLES = 25
KID_CHOICES = [[], ["--no-kid"], ["--kid-images", "1"], ["--kid-images", "2"]]


@pytest.fixture(scope="module")
def avatars8(tmp_path_factory):
    from animeddim.datasets import generate_avatars

    return generate_avatars(tmp_path_factory.mktemp("avatars8"), n=7, size=8, seed=0, workers=1)


def test_every_accepted_option_combination_trains_or_is_refused_up_front(
    avatars8, fast_inception, tmp_path_factory, monkeypatch, capsys
):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    from animeddim import cli, metrics

    if fast_inception is not None:  # the real network, loaded once for all examples
        monkeypatch.setattr(metrics, "InceptionFeatures", lambda *a, **k: fast_inception)
    outcomes = {0: 0, 2: 0}

    @hypothesis.settings(
        max_examples=PROPERTY_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(
        n=st.integers(1, 7),
        batch=st.integers(1, 8),
        val=st.sampled_from(["0", "0.1", "0.2", "0.5", "0.9"]),
        kid=st.sampled_from(KID_CHOICES),
        steps=st.sampled_from([[], ["--max-steps", "1"], ["--checkpoint-every", "1"]]),
    )
    def check(n, batch, val, kid, steps):
        tmp = tmp_path_factory.mktemp("prop")
        data = _folder(avatars8, tmp / "data", n)
        run = tmp / "run"
        argv = ["train", "--data", str(data), "--out", str(run), "--image-size", "8",
                "--widths", "4,8", "--block-depth", "1", "--embedding-dims", "4",
                "--batch-size", str(batch), "--val-fraction", val, "--kid-steps", "1",
                "--precision", "fp32", "--quiet", *kid, *steps]  # fmt: skip
        rc = cli.main(argv)
        out, err = capsys.readouterr()
        assert rc in (0, 2), (argv, rc, err)
        outcomes[rc] += 1
        if rc == 2:
            assert len(err.strip().splitlines()) == 1 and err.startswith("animeddim: error:")
            assert not run.exists(), "refused after work had started"
        else:
            rows = list(csv.DictReader(open(run / "metrics.csv")))
            assert len(rows) == 1 and (run / "checkpoints" / "last.safetensors").is_file()

    check()
    print(f"outcomes over {PROPERTY_EXAMPLES} examples: {outcomes}")
    assert outcomes[0] and outcomes[2]  # both kinds occur: the strategy reaches the edges


def test_restored_adamw_moments_take_their_parameters_layout():
    """Checkpoints hold contiguous tensors; fused AdamW on channels_last parameters with
    contiguous moments would pair the wrong elements (a wrong step, not rounding)."""
    from animeddim.train_state import _restore_optimizer

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    twin = copy.deepcopy(conv)
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1, fused=True) for m in (conv, twin)]
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)

    def step(m, opt):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()

    step(conv, opts[0])
    step(twin, opts[1])
    saved = {  # as a checkpoint gives them back: contiguous
        f"optim.{i}.{k}": v.clone().contiguous() if torch.is_tensor(v) else torch.tensor(v)
        for i, s in opts[0].state_dict()["state"].items()
        for k, v in s.items()
    }
    restored = torch.optim.AdamW(twin.parameters(), lr=0.1, fused=True)
    _restore_optimizer(restored, saved, opts[0].state_dict()["param_groups"])
    exp_avg = restored.state[twin.weight]["exp_avg"]
    assert exp_avg.is_contiguous(memory_format=torch.channels_last)
    step(conv, opts[0])
    step(twin, restored)
    assert torch.equal(conv.weight, twin.weight) and torch.equal(conv.bias, twin.bias)


def test_a_cache_on_the_device_trains_bitwise_like_the_host_one(avatars16, tmp_path):
    """--data-on-device yes (batches gathered, flipped and normalised from one copy of the
    cache on the device) trains to the same weights and losses as the host batches."""
    runs = {}
    for where in ("no", "yes"):
        runs[where] = tmp_path / where
        cfg = tiny_config(avatars16, epochs=2, max_steps=4, data_on_device=where)
        train(cfg, runs[where], progress=False, log=lambda s: None)
    a, b = _weights(runs["no"])[0], _weights(runs["yes"])[0]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [list(csv.DictReader(open(runs[w] / "metrics.csv"))) for w in ("no", "yes")]
    assert [r["val_noise_loss"] for r in rows[0]] == [r["val_noise_loss"] for r in rows[1]]


def test_learning_rate_warmup_is_linear_in_images_and_resumes_exactly(avatars16, tmp_path):
    cfg = tiny_config(avatars16, lr_warmup_images=24, learning_rate=2e-3)
    assert [learning_rate_at(s, cfg.train) for s in range(5)] == pytest.approx(
        [5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3]  # batch 6: 6, 12, 18, 24 images of 24
    )
    assert learning_rate_at(0, tiny_config(avatars16).train) == 1e-3  # no warm-up: --lr
    # 3 steps per epoch: the run stops inside the warm-up and resumes there.
    full, part = tmp_path / "full", tmp_path / "part"
    train(
        tiny_config(avatars16, epochs=2, lr_warmup_images=24),
        full,
        progress=False,
        log=lambda s: None,
    )
    b = _stopped_then_resumed(avatars16, part, 2, epochs=2, lr_warmup_images=24)
    a = _weights(full)[0]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = list(csv.DictReader(open(full / "metrics.csv")))
    assert [float(r["learning_rate"]) for r in rows] == pytest.approx([0.75e-3, 1e-3])
    # The warm-up changes the run: without it the weights differ.
    plain = tmp_path / "plain"
    train(tiny_config(avatars16, epochs=2), plain, progress=False, log=lambda s: None)
    assert any(not torch.equal(a[k], _weights(plain)[0][k]) for k in a)


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """--compile-mode is handed to torch.compile ("default" as torch's own default, None); CUDA
    graphs, and the per-step mark they need, only where the mode replays them on CUDA."""
    from animeddim import runtime

    seen = []
    monkeypatch.setattr(runtime, "compiler_available", lambda: True)
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.append(kw) or m)
    net = torch.nn.Linear(2, 2)
    for mode in ("default", "reduce-overhead", "max-autotune"):
        runtime.maybe_compile(net, True, torch.device("cpu"), mode)
    assert seen == [{"mode": None}, {"mode": "reduce-overhead"}, {"mode": "max-autotune"}]
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert runtime.uses_cuda_graphs("reduce-overhead", cuda)
    assert runtime.uses_cuda_graphs("max-autotune", cuda)
    assert not runtime.uses_cuda_graphs("max-autotune-no-cudagraphs", cuda)
    assert not runtime.uses_cuda_graphs("default", cuda)
    assert not runtime.uses_cuda_graphs("reduce-overhead", cpu)
    assert runtime.data_on_device("yes", 10, cpu) and not runtime.data_on_device("no", 10, cpu)
    assert not runtime.data_on_device("auto", 10, cpu)  # the host cache is already there


class _MeanStd:
    """Per-channel mean and std as 'features', in place of Inception: what is tested is what
    the run says about its KID, not the network."""

    cache_token, weights_id = "mean-std:1", "mean-std"

    def features(self, images_u8, protocol, batch_size=64, bf16=False):
        x = images_u8.double() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_eval_every_on_few_images_says_so_once_at_the_start(
    avatars16, tmp_path, monkeypatch, capsys
):
    """train --eval-every measured its standard KID against a few dozen real images (its
    --eval-real folder, or the validation split) every epoch without the caution `kid` gives
    there (`metrics.few_images_note`: KID's ± is then no spread between image sets). The run
    notes it once, at its start (a resume, at its own), in kid's words."""
    from conftest import run_main

    from animeddim import metrics

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(metrics, "find_inception_weights", lambda: tmp_path / "fake.pt")
    monkeypatch.setattr(metrics, "InceptionFeatures", lambda *a, **k: _MeanStd())
    run, real = tmp_path / "run", _folder(avatars16, tmp_path / "real", 5)
    kid = ["--batch-size", "6", "--no-kid", "--eval-every", "1", "--eval-images", "6",
           "--eval-steps", "1"]  # fmt: skip
    rc, out, err = run_main(capsys, *_tiny_args(avatars16, run, *kid, "--eval-real", real,
                                                "--epochs", "1"))  # fmt: skip
    assert rc == 0, err
    sets = [(5, f"images in '{real}'"), (6, "generated images")]
    note = f"note: --eval-every {metrics.few_images_note(sets, fid=False)}"
    assert out.splitlines().count(note) == 1 and out.index(note) < out.index("epoch 1/1")
    assert "KID of 5 images in" in note and "fewer than 1,000" in note
    rc, out, err = run_main(capsys, "train", "--resume", run, "--epochs", "2", "--quiet")
    assert rc == 0, err
    assert out.splitlines().count(note) == 1 and out.index(note) < out.index("epoch 2/2")
    # Against the validation split (no --eval-real): its count; 1,000 a side: nothing.
    from animeddim.train_kid import make_standard_kid

    logged: list[str] = []
    for n in (6, 1000):
        cfg = tiny_config(avatars16, eval_every=1, eval_images=n)
        assert make_standard_kid(cfg, (_MeanStd(), None), torch.zeros(n, 4), logged.append)
    sets = [(6, "validation images"), (6, "generated images")]
    assert logged == [f"note: --eval-every {metrics.few_images_note(sets, fid=False)}"]


def test_bad_values_of_the_gpu_settings_are_one_line_errors(avatars16, tmp_path):
    for args, fragment in (
        (["--compile-mode", "fastest"], "invalid choice: 'fastest'"),
        (["--data-on-device", "maybe"], "invalid choice: 'maybe'"),
        (["--lr-warmup-images", "-5"], "lr-warmup-images"),
        (["--eval-every", "1", "--eval-real", str(tmp_path / "nowhere")], "' does not exist: "),
        (["--eval-every", "1", "--eval-real", str(avatars16 / "labels.csv")], "is a file, not a"),
        (["--eval-every", "1", "--val-fraction", "0", "--batch-size", "4"], "it has 0 image"),
        (["--eval-sampler", "euler"], "invalid choice: 'euler'"),
        (["--eval-images", "1"], "eval-images"),
    ):
        p = run_cli(*_tiny_args(avatars16, tmp_path / "r", *args), check=False)
        _one_line_exit_2(p, fragment)
        assert not (tmp_path / "r").exists()


def test_unreadable_kid_weights_and_config_files_are_refused_before_the_run_folder(
    avatars16, tmp_path, monkeypatch
):
    """A KID weights file that is not TorchScript, a YAML or folder config: one line, exit 2,
    no run folder (before: a traceback after the run folder was made; "not valid yaml: ...
    Expecting value"; "does not exist" for a folder)."""
    fake = tmp_path / "inception.pt"
    fake.write_text("not a network")
    monkeypatch.setenv("ANIMEDDIM_INCEPTION_WEIGHTS", str(fake))
    p = run_cli(
        *_tiny_args(avatars16, tmp_path / "r", "--max-steps", "1", "--batch-size", "4"), check=False
    )
    _one_line_exit_2(p, "cannot measure KID while training", "inception.pt")
    assert not (tmp_path / "r").exists()
    p = run_cli(
        *_tiny_args(avatars16, tmp_path / "r", "--max-steps", "1", "--batch-size", "4", "--no-kid")
    )
    assert (tmp_path / "r" / "checkpoints" / "last.safetensors").is_file()  # no KID: not read
    yaml = tmp_path / "c.yaml"
    yaml.write_text("train:\n  epochs: 3\n")
    for config, fragment in ((yaml, ".yaml is not read"), (tmp_path, "is a folder")):
        p = run_cli(*_tiny_args(avatars16, tmp_path / "r2", "--config", str(config)), check=False)
        _one_line_exit_2(p, fragment)
        assert not (tmp_path / "r2").exists()


def test_epoch_end_work_every_n_epochs_trains_the_same_weights(avatars16, tmp_path):
    """--epoch-end-every 2: rows and checkpoints at epochs 2, 4 and the last (5), the
    training itself bit for bit that of every epoch's; a run resumed from epoch 2 ends the
    same; a time limit still gets its row at once."""
    quiet = {"progress": False, "log": lambda s: None}
    every, each = tmp_path / "every", tmp_path / "each"
    train(tiny_config(avatars16, epochs=5, epoch_end_every=2), every, **quiet)
    train(tiny_config(avatars16, epochs=5), each, **quiet)
    a, b = _weights(every), _weights(each)
    assert a[1]["epoch"] == b[1]["epoch"] == 5 and a[1]["step"] == b[1]["step"] == 15
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    rows = list(csv.DictReader(open(every / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["2", "4", "5"]
    by_epoch = {r["epoch"]: r for r in csv.DictReader(open(each / "metrics.csv"))}
    assert rows[1]["val_noise_loss"] == by_epoch["4"]["val_noise_loss"]  # the same EMA
    two = [float(by_epoch[e]["train_noise_loss"]) for e in ("3", "4")]
    assert float(rows[1]["train_noise_loss"]) == pytest.approx(sum(two) / 2, rel=1e-5)
    part = tmp_path / "part"
    train(tiny_config(avatars16, epochs=2, epoch_end_every=2), part, **quiet)
    cfg = load_run_config(part)
    cfg.train.epochs = 5
    train(cfg, part, resume=True, **quiet)
    for k, v in _weights(part)[0].items():
        assert torch.equal(v, a[0][k]), k
    timed = tmp_path / "timed"
    lines = []
    cfg = tiny_config(avatars16, epochs=5, epoch_end_every=3, time_limit_minutes=1e-9)
    train(cfg, timed, progress=False, log=lines.append)
    assert [r["epoch"] for r in csv.DictReader(open(timed / "metrics.csv"))] == ["1"]
    assert _weights(timed)[1]["epoch"] == 1 and "reached after epoch 1" in lines[-1]


def test_validation_draws_and_loss_do_not_depend_on_the_batch_size(avatars16):
    """An image's validation noise and time come from its position in the split (chunks of
    VAL_CHUNK), so the validation loss of one network is the same at any batch size (before:
    draws per batch, a 2.7% spread between batch sizes on the shipped model)."""
    import numpy as np

    from animeddim.data import load_folder
    from animeddim.train import VAL_CHUNK, validate, validation_draws
    from animeddim.unet import UNet

    shape, cpu = torch.Size([3, 4, 4]), torch.device("cpu")
    n, t = validation_draws(VAL_CHUNK - 3, VAL_CHUNK + 5, shape, cpu)
    n1, t1 = validation_draws(VAL_CHUNK - 3, VAL_CHUNK, shape, cpu)
    n2, t2 = validation_draws(VAL_CHUNK, VAL_CHUNK + 5, shape, cpu)
    assert n.shape == (8, 3, 4, 4) and torch.equal(n, torch.cat([n1, n2]))
    assert torch.equal(t, torch.cat([t1, t2])) and t.dtype == torch.float64
    images = load_folder(avatars16, 16, progress=False).images
    idx = np.arange(len(images))
    torch.manual_seed(0)
    cfg = tiny_config(avatars16)
    net = UNet(cfg.model)
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    got = []
    for bs in (24, 7, 5):
        cfg.train.batch_size = bs
        got.append(validate(net, images, idx, cfg, mean, std, cpu, contextlib.nullcontext()))
    for nl, il in got[1:]:
        assert nl == pytest.approx(got[0][0], rel=1e-6) and il == pytest.approx(got[0][1], rel=1e-6)


def test_a_ctrl_c_inside_an_optimiser_step_lands_after_it(
    avatars16, trained_tiny, tmp_path, monkeypatch
):
    """Ctrl-C (or SIGTERM) during an optimiser step, after its forward pass (before: the
    KeyboardInterrupt landed there, so the checkpoint it saved held the BatchNorm statistics
    of a batch whose step was not counted; the resumed run took that batch again and ended
    unlike an uninterrupted one, first BatchNorm's num_batches_tracked one higher). Now the
    stop waits for the step's end, and the resumed run is bitwise the uninterrupted one."""
    import signal

    from animeddim import train as train_mod

    real_losses, calls = train_mod.losses, []

    def losses_then_ctrl_c(*args, **kwargs):
        out = real_losses(*args, **kwargs)  # BatchNorm has seen this batch
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(train_mod, "losses", losses_then_ctrl_c)
    run = tmp_path / "r"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        res = train(tiny_config(avatars16, epochs=2), run, progress=False, log=lambda s: None)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert res.interrupted and res.step == 2 and len(calls) == 2
    monkeypatch.undo()
    train(load_run_config(run), run, resume=True, progress=False, log=lambda s: None)
    (a, ma), (b, mb) = _weights(trained_tiny), _weights(run)
    assert ma["step"] == mb["step"] and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_sigterm_whose_raise_was_swallowed_stops_training_at_the_next_step(
    avatars16, tmp_path, monkeypatch
):
    """A SIGTERM's raise swallowed by Python (inside a `__del__`, a callback from C) left the
    loop training on; each step now raises a stop seen again, saving a resumable checkpoint."""
    import signal

    from animeddim import interrupts
    from animeddim import train as train_mod

    real_step, steps = train_mod.train_step, []

    def step_then_signal(state, *args):
        steps.append(state.step)
        if state.step == 1:  # as if the handler's raise had been swallowed during step 2
            interrupts.seen.add(signal.SIGTERM)
        return real_step(state, *args)

    monkeypatch.setattr(train_mod, "train_step", step_then_signal)
    try:
        res = train(tiny_config(avatars16, epochs=3), tmp_path / "r", progress=False,
                    log=lambda s: None)  # fmt: skip
    finally:
        interrupts.seen.clear()
    assert res.interrupted and res.step == 2 and steps == [0, 1]
    assert _weights(tmp_path / "r")[1]["step"] == 2  # the checkpoint a Ctrl-C would save


def test_train_notes_the_images_smaller_than_its_image_size_once(
    avatars16, tmp_path, monkeypatch, capsys
):
    """train enlarged the images smaller than --image-size to it (a 64-px folder trained at
    128 px: blurry samples) without a word, where `data prepare` at that size names them. One
    note at the start says how many and the smallest, in prepare's words, from the sizes the
    decoder saw; a disk cache records them, so a run that reads it says the same without
    decoding again."""
    from conftest import run_main

    from animeddim import data as data_mod

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = _folder(avatars16, tmp_path / "faces", 10)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"s1.png": (8, 12), "sub/s2.png": (30, 10)}.items():
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    note = (
        "note: 2 images smaller than 16x16 (the centred square of each) were enlarged to it, "
        "blurring them (the smallest: s1.png, 12x8); a smaller --image-size keeps them sharp"
    )
    args = ["--batch-size", "4", "--no-kid", "--epochs", "1"]
    for run, cache in (("memory", "memory"), ("disk", "disk")):
        rc, out, err = run_main(
            capsys, *_tiny_args(folder, tmp_path / run, *args, "--cache", cache)
        )
        assert rc == 0, err
        assert out.splitlines().count(note) == 1 and out.index(note) < out.index("epoch 1/1")

    def refuse(path: str, size: int, profiles: bool = True) -> None:
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(data_mod, "_decode_path", refuse)  # the resume reads the disk cache
    rc, out, err = run_main(capsys, "train", "--resume", tmp_path / "disk", "--epochs", "2")
    assert rc == 0, err
    assert out.splitlines().count(note) == 1 and out.index(note) < out.index("epoch 2/2")
    monkeypatch.undo()
    rc, out, err = run_main(capsys, *_tiny_args(avatars16, tmp_path / "sharp", *args))
    assert rc == 0, err
    assert "enlarged" not in out + err  # images of the training size: nothing to say
