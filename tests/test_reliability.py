"""Reliability (issue 7): kills, divergence, full disks, bad files and options, determinism.

Every fault here is injected for real (SIGKILL, NaN losses, ENOSPC/EROFS from the file
system) on tiny data, and each test checks what survives it. docs/reliability.md tabulates
the faults, the bad inputs and the work lost, by test name.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import math
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, copy_run, run_cli, run_main, shared_dir, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from animeddim import batches as batches_mod
from animeddim import checkpoint as ckpt
from animeddim import data as data_mod
from animeddim import io as io_mod
from animeddim import run_folder
from animeddim import train as train_mod
from animeddim.config import ConfigError, RunConfig
from animeddim.config_files import load_config_file
from animeddim.run_folder import latest_checkpoint, load_run_config
from animeddim.train import TrainingDiverged, train

EPOCHS, STEPS_PER_EPOCH = 2, 3  # 24 avatars, 25 % validation, batch 6: 3 steps per epoch
QUIET = {"progress": False, "log": lambda s: None}


# --------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("cfg") / "tiny.json"
    f.write_text(json.dumps({"model": TINY_MODEL, "data": {"val_fraction": 0.25}}))
    return f


def _train_args(data: Path, out: Path, tiny_json: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--config",
        str(tiny_json),
        "--image-size",
        "16",
        "--batch-size",
        "6",
        "--no-kid",
        "--quiet",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        *extra,
    ]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m animeddim ARGS` in a subprocess with extra environment variables."""
    e = {**os.environ, "PYTHONUNBUFFERED": "1"}
    e.pop(ckpt.KILL_AT_SAVE_ENV, None)
    e.update(env or {})
    cmd = [sys.executable, "-m", "animeddim", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=e)


def _one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def _checkpoints(run: Path) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
    """Load every checkpoint file of a run: none may be unreadable or hold a non-finite float."""
    out = {}
    for f in sorted((run / "checkpoints").glob("*.safetensors")):
        tensors, meta = ckpt.load(f)
        for k, v in tensors.items():
            assert not v.is_floating_point() or bool(torch.isfinite(v).all()), (f.name, k)
        out[f.name] = (tensors, meta)
    return out


def _temp_files(run: Path) -> list[Path]:
    return [p for d in (run, run / "checkpoints", run / "samples") for p in d.glob(".*.tmp*")]


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _metric_rows(run: Path) -> list[dict[str, str]]:
    timing = {"images_per_s", "epoch_seconds", "wall_seconds", "kid_seconds"}
    rows = csv.DictReader(open(run / "metrics.csv", encoding="utf-8"))
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


@pytest.fixture(scope="module")
def reference_run(avatars16, tiny_json, tmp_path_factory) -> Path:
    """An uninterrupted CLI run: 2 epochs of 3 steps, a checkpoint every step, 2 kept."""

    def build(tmp: Path) -> Path:
        args = ("--epochs", str(EPOCHS), "--checkpoint-every", "1", "--keep-checkpoints", "2")
        p = _cli(*_train_args(avatars16, tmp / "run", tiny_json, *args))
        assert p.returncode == 0, p.stderr
        return tmp / "run"

    return shared_dir(tmp_path_factory, "reference", build)


# --------------------------------------------------------------------------------------------
# kills


# (kill point "N:PHASE" = N-th checkpoint save of that process, steps done when it dies,
#  step the next resume starts from). Saves per step: step-N then last; at an epoch end: last.
KILLS = [
    ("3:write", 2, 1),  # fresh run; half of step-00000002 written -> step 1 is the newest
    ("5:done", 3, 3),  # resumed at 1; the epoch-end last.safetensors renamed, then killed
    ("4:rename", 5, 5),  # resumed at 3; last.safetensors@5 complete but not renamed -> step-5
]


def test_sigkill_during_and_between_saves_then_resume_equals_uninterrupted(
    avatars16, tiny_json, reference_run, tmp_path
):
    """SIGKILL mid-write, before the rename and after it; every resume picks the newest
    complete checkpoint, loses at most one checkpoint interval (1 step) and the run ends
    bitwise equal to the uninterrupted one, metrics rows included."""
    run = tmp_path / "run"
    args = ("--epochs", str(EPOCHS), "--checkpoint-every", "1", "--keep-checkpoints", "2")
    argv = _train_args(avatars16, run, tiny_json, *args)
    resume_argv = ["train", "--resume", str(run), "--quiet", "--device", "cpu"]
    for i, (point, steps_done, resume_step) in enumerate(KILLS):
        p = _cli(*(argv if i == 0 else resume_argv), env={ckpt.KILL_AT_SAVE_ENV: point})
        assert p.returncode == -signal.SIGKILL, (point, p.stdout, p.stderr)
        files = _checkpoints(run)  # every checkpoint file on disk is complete and finite
        assert files, point
        if not point.endswith("done"):
            assert _temp_files(run), point  # the kill really hit a save in progress
        _, meta = latest_checkpoint(run, load_run_config(run), log=lambda s: None)
        assert meta["step"] == resume_step, point
        assert steps_done - meta["step"] <= 1, point  # at most one checkpoint interval lost
    p = _cli(*resume_argv)
    assert p.returncode == 0, p.stderr
    assert f"step {KILLS[-1][2]}" in p.stdout and "step-00000005.safetensors" in p.stdout
    assert not _temp_files(run)  # stale temporary files of the killed processes are gone
    files = _checkpoints(run)
    assert sorted(files) == [
        "last.safetensors",
        "step-00000005.safetensors",
        "step-00000006.safetensors",
    ]  # --keep-checkpoints 2
    ref = _checkpoints(reference_run)
    assert sorted(ref) == sorted(files)
    for name in files:
        _assert_same_tensors(files[name][0], ref[name][0])
        assert files[name][1]["step"] == ref[name][1]["step"]
    assert _metric_rows(run) == _metric_rows(reference_run)
    for png in ("epoch-0001.png", "epoch-0002.png"):
        assert (run / "samples" / png).read_bytes() == (
            reference_run / "samples" / png
        ).read_bytes()


def test_ctrl_c_while_a_best_kid_checkpoint_is_written_keeps_the_epochs_row(
    avatars16, tmp_path, monkeypatch
):
    """Ctrl-C while the epoch end writes best-kid.safetensors (before: the epoch was counted
    done before its metrics row was written, so the checkpoint the Ctrl-C saved resumed after
    it: that epoch's row and its best-KID checkpoint were never written). Now the row is
    written first and the interrupted best-KID checkpoint is written again before stopping."""
    kids = iter([0.5, 0.4])  # each epoch improves on the one before
    monkeypatch.setattr(train_mod, "training_inception", lambda cfg, device: (None, None))
    monkeypatch.setattr(train_mod, "make_kid", lambda *a: lambda *b: next(kids))
    real_save, cut = ckpt.save, []

    def save(path, *args, **kwargs):
        if Path(path).name == "best-kid.safetensors" and not cut:
            cut.append(path)
            raise KeyboardInterrupt  # as the SIGINT handler does, mid-write
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save", save)
    run = tmp_path / "run"
    res = train(tiny_config(avatars16, epochs=2, kid=True), run, **QUIET)
    assert res.interrupted and cut
    files = _checkpoints(run)
    assert [r["epoch"] for r in _metric_rows(run)] == ["1"]
    assert files["last.safetensors"][1]["epoch"] == 1
    assert files["best-kid.safetensors"][1]["epoch"] == 1
    assert files["best-kid.safetensors"][1]["best_kid"] == 0.5
    res = train(load_run_config(run), run, resume=True, **QUIET)
    assert not res.interrupted and res.epoch == 2
    assert [(r["epoch"], r["kid"]) for r in _metric_rows(run)] == [("1", "0.5"), ("2", "0.4")]
    assert _checkpoints(run)["best-kid.safetensors"][1]["epoch"] == 2


def test_a_run_stopped_in_an_epochs_kid_writes_that_epochs_throughput_on_resume(
    avatars16, tmp_path, monkeypatch
):
    """Ctrl-C while an epoch end measures KID (the epoch's steps done, its row not written),
    then a resume (before: the row was written with images_per_s 0 and epoch_seconds ~0,
    the time of the steps gone with the process). The checkpoint keeps the training images
    and seconds since the last row, so the resumed row holds the epoch's throughput; resumed
    from a checkpoint that did not keep them, the two cells are empty, never 0, and the
    report reads them as missing."""
    kids = iter([KeyboardInterrupt, 0.5, 0.5])  # Ctrl-C in the first measurement

    def kid(*args):
        value = next(kids)
        if value is KeyboardInterrupt:
            raise KeyboardInterrupt  # as the SIGINT handler does
        return value

    monkeypatch.setattr(train_mod, "training_inception", lambda cfg, device: (None, None))
    monkeypatch.setattr(train_mod, "make_kid", lambda *a: kid)
    run = tmp_path / "run"
    res = train(tiny_config(avatars16, epochs=1, kid=True), run, **QUIET)
    assert res.interrupted and not (run / "metrics.csv").exists()
    last = run / "checkpoints" / "last.safetensors"
    tensors, meta = ckpt.load(last)
    assert meta["epoch"] == 0 and meta["batch_in_epoch"] >= 1  # the epoch's steps are done
    old = copy_run(run, tmp_path / "old")

    res = train(load_run_config(run), run, resume=True, **QUIET)
    assert not res.interrupted and res.epoch == 1
    (row,) = csv.DictReader(open(run / "metrics.csv", encoding="utf-8"))
    assert float(row["images_per_s"]) > 0  # before: 0
    assert meta["row_images"] == 6 * meta["batch_in_epoch"] and meta["row_seconds"] > 0
    seconds = float(row["epoch_seconds"])
    assert seconds >= meta["row_seconds"]  # the steps' time before the Ctrl-C is in it
    assert float(row["images_per_s"]) == pytest.approx(meta["row_images"] / seconds, rel=1e-4)

    # a checkpoint written before the tally was kept: the row cannot know the time
    ckpt.save(old / "checkpoints" / "last.safetensors", tensors, {
        k: v for k, v in meta.items() if k not in ("row_images", "row_seconds")
    })  # fmt: skip
    train(load_run_config(old), old, resume=True, **QUIET)
    (row,) = csv.DictReader(open(old / "metrics.csv", encoding="utf-8"))
    assert row["images_per_s"] == "" and row["epoch_seconds"] == "" and row["kid"] == "0.5"
    (read,) = run_folder.read_run(old).rows
    assert read["images_per_s"] is None and read["epoch_seconds"] is None
    assert read["wall_seconds"] > 0


def test_checkpoint_save_is_temp_file_fsync_rename_fsync_dir(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the fsynced files")
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    _tiny_checkpoint(tmp_path / "c.safetensors")
    tmp = f".c.safetensors.tmp-{os.getpid()}"
    assert calls == [
        ("fsync", tmp),  # the data is on disk before the name points at it
        ("replace", tmp, "c.safetensors"),
        ("fsync", tmp_path.name),  # and the rename itself is on disk
    ]


def test_resume_before_the_first_checkpoint_is_a_clear_error(avatars16, tmp_path, capsys):
    run = tmp_path / "run"
    run_folder.prepare_run_dir(run, tiny_config(avatars16), resume=False)
    stale = run / "checkpoints" / ".last.safetensors.tmp-999999"
    stale.write_bytes(b"half a checkpoint")
    rc, _, err = run_main(capsys, "train", "--resume", run, "--quiet")
    assert rc == 2
    _one_line_error(err, "holds no complete checkpoint", "before its first one")
    assert not stale.exists()
    # last.safetensors gone, best-kid.safetensors kept (before: "the run stopped before its
    # first one" too, which it had not)
    _tiny_checkpoint(run / "checkpoints" / "best-kid.safetensors")
    rc, _, err = run_main(capsys, "train", "--resume", run, "--quiet")
    assert rc == 2
    _one_line_error(err, "no last.safetensors or step-N file; it holds best-kid.safetensors")


def test_damaged_last_checkpoint_falls_back_to_newest_step_file(avatars16, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(avatars16, max_steps=2, checkpoint_every=1), run, **QUIET)
    last = run / "checkpoints" / "last.safetensors"
    last.write_bytes(last.read_bytes()[:1000])  # e.g. a disk error after the rename
    notes = []
    _, meta = latest_checkpoint(run, load_run_config(run), log=notes.append)
    assert meta["step"] == 2 and "step-00000002.safetensors" in notes[0]


# --------------------------------------------------------------------------------------------
# divergence


def test_cli_divergence_exits_3_naming_the_step_and_keeps_good_checkpoints(
    avatars16, tiny_json, tmp_path
):
    run = tmp_path / "run"
    # A learning rate of 1e6 makes the weights and then the loss overflow within an epoch.
    argv = _train_args(avatars16, run, tiny_json, "--epochs", "2", "--checkpoint-every", "1")
    p = _cli(*argv, "--lr", "1e6")
    assert p.returncode == 3, (p.stdout, p.stderr)
    _one_line_error(p.stderr, "animeddim: training diverged", "non-finite")
    bad_step = int(re.search(r"by step (\d+)", p.stderr).group(1))
    files = _checkpoints(run)  # all finite: no NaN weights were ever written
    last_step = files["last.safetensors"][1]["step"]
    assert bad_step - 1 <= last_step < bad_step
    assert all(m["step"] < bad_step for _, m in files.values())


def _nan_loss_at(monkeypatch, bad_step: int, on_inject=lambda: None) -> None:
    """Make the training loss of optimiser step `bad_step` (1-based) NaN."""
    real = train_mod.losses
    calls = [0]

    def losses(*args, **kwargs):
        noise_loss, image_loss = real(*args, **kwargs)
        if torch.is_grad_enabled():  # training, not validation (which runs under no_grad)
            calls[0] += 1
            if calls[0] == bad_step:
                on_inject()
                return noise_loss * math.nan, image_loss * math.nan
        return noise_loss, image_loss

    monkeypatch.setattr(train_mod, "losses", losses)


@pytest.mark.parametrize(
    "log_every, checkpoint_every, named_step",
    [
        (1, 0, 5),  # found when the loss is read, the same step
        (10, 1, 5),  # found by the checkpoint of that step, which is then not written
        (10, 0, 6),  # found at the end of the epoch
    ],
)
def test_nan_loss_stops_and_never_overwrites_the_last_good_checkpoint(
    avatars16, tmp_path, monkeypatch, log_every, checkpoint_every, named_step
):
    run = tmp_path / "run"
    snapshot: dict[str, bytes] = {}

    def take_snapshot():
        snapshot.update({f.name: f.read_bytes() for f in (run / "checkpoints").iterdir()})

    _nan_loss_at(monkeypatch, 5, take_snapshot)
    cfg = tiny_config(
        avatars16, epochs=EPOCHS, log_every=log_every, checkpoint_every=checkpoint_every
    )
    with pytest.raises(TrainingDiverged, match=rf"by step {named_step}\b"):
        train(cfg, run, **QUIET)
    assert "last.safetensors" in snapshot
    after = {f.name: f.read_bytes() for f in (run / "checkpoints").iterdir()}
    assert after == snapshot  # nothing written, nothing overwritten after the NaN
    _checkpoints(run)


def test_nan_policy_skip_batch_skips_and_goes_on(avatars16, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _nan_loss_at(monkeypatch, 5)
    cfg = tiny_config(avatars16, epochs=EPOCHS, nan_policy="skip-batch", checkpoint_every=1)
    with pytest.warns(UserWarning, match="non-finite loss at step 5: batch skipped"):
        res = train(cfg, run, **QUIET)
    assert (res.epoch, res.step) == (EPOCHS, EPOCHS * STEPS_PER_EPOCH)
    files = _checkpoints(run)
    assert files["last.safetensors"][1]["step"] == EPOCHS * STEPS_PER_EPOCH
    assert len(_metric_rows(run)) == EPOCHS


# --------------------------------------------------------------------------------------------
# full disk, unwritable output


class _FullDisk:
    """A file whose write stores half the bytes and then fails like a full disk."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_write_failure_is_one_line_and_keeps_previous_checkpoint(
    avatars16, tiny_json, tmp_path, monkeypatch, capsys, fault
):
    run = tmp_path / "run"
    real_open, saves = open, [0]

    def failing_open(file, mode="r", *args, **kwargs):
        if "w" in mode and ".safetensors.tmp-" in str(file):
            saves[0] += 1
            if saves[0] == 3:  # step-00000002: after step-1 and last@1 were written
                if fault == "read-only":
                    raise OSError(errno.EROFS, "Read-only file system", str(file))
                return _FullDisk(real_open(file, mode, *args, **kwargs))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io_mod, "open", failing_open, raising=False)
    argv = _train_args(avatars16, run, tiny_json, "--checkpoint-every", "1")
    rc, _, err = run_main(capsys, *argv)
    assert rc == 1
    reason = "No space left on device" if fault == "disk full" else "Read-only file system"
    _one_line_error(err, reason, "step-00000002")
    files = _checkpoints(run)
    assert sorted(files) == ["last.safetensors", "step-00000001.safetensors"]
    assert files["last.safetensors"][1]["step"] == 1
    assert not _temp_files(run)  # the half-written temporary file was removed
    monkeypatch.undo()  # space again: the run resumes from step 1 and finishes
    rc, out, _ = run_main(capsys, "train", "--resume", run, "--quiet")
    assert rc == 0 and "step 1" in out
    assert _checkpoints(run)["last.safetensors"][1]["step"] == STEPS_PER_EPOCH


def test_a_read_only_file_system_names_the_users_file(trained_tiny, tmp_path, monkeypatch, capsys):
    """On a read-only mount the kernel refuses creating the temporary file and also
    unlinking it, though it does not exist (before: that second EROFS was the one reported,
    `Read-only file system: DIR/.seed0-000000.png.tmp-PID`, a name the user never gave)."""
    real_open, real_unlink = open, Path.unlink

    def read_only_open(file, mode="r", *args, **kwargs):
        if "w" in mode and ".tmp-" in str(file):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    def read_only_unlink(self, missing_ok=False):
        if ".tmp-" in self.name:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(io_mod, "open", read_only_open, raising=False)
    monkeypatch.setattr(Path, "unlink", read_only_unlink)
    out = tmp_path / "e.safetensors"
    rc, _, err = run_main(capsys, "export", "--run", trained_tiny, "--out", out)
    assert rc == 1
    _one_line_error(err, f"Read-only file system: {out}")
    rc, _, err = run_main(capsys, "sample", "--run", trained_tiny, "--n", "2", "--steps", "2",
                          "--out", tmp_path / "s")  # fmt: skip
    assert rc == 1 and ".tmp-" not in err and "Traceback" not in err  # above: progress bars
    # the folder given (its first file is the hidden note that lets a stopped sample go on)
    assert f"error: Read-only file system: {tmp_path / 's'}\n" in err, err
    assert not list(tmp_path.rglob("*.tmp-*")) and not out.exists()


def test_a_full_disk_at_a_metrics_row_leaves_metrics_csv_whole_and_names_it(
    avatars16, tiny_json, tmp_path, monkeypatch, capsys
):
    """The disk fills while epoch 2's row is written: half its bytes stored, then ENOSPC
    (before: metrics.csv was appended to, so it kept half a row, its last number cut short,
    which the report read as it stood; and the error named no file)."""
    run = tmp_path / "run"
    real_open, rows = open, [0]

    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if ("w" in mode or "a" in mode) and "metrics.csv" in str(file):
            rows[0] += 1
            if rows[0] == 2:
                return _FullDisk(f)
        return f

    monkeypatch.setattr(io_mod, "open", full_open, raising=False)
    monkeypatch.setattr(run_folder, "open", full_open, raising=False)  # where rows were appended
    rc, _, err = run_main(capsys, *_train_args(avatars16, run, tiny_json, "--epochs", "3"))
    assert rc == 1
    _one_line_error(err, f"No space left on device: {run / 'metrics.csv'}")
    text = (run / "metrics.csv").read_text(encoding="utf-8")
    assert text.endswith("\n") and len(text.splitlines()) == 2  # the header and epoch 1's row
    assert [r["epoch"] for r in _metric_rows(run)] == ["1"] and not _temp_files(run)
    monkeypatch.undo()  # space again: the run resumes and writes epoch 2's row once
    rc, _, err = run_main(capsys, "train", "--resume", run, "--quiet")
    assert rc == 0, err
    assert [r["epoch"] for r in _metric_rows(run)] == ["1", "2", "3"]


@pytest.mark.parametrize("where", ["lock", "config.json"])
def test_a_full_disk_before_a_run_starts_leaves_nothing_in_the_way(
    where, avatars16, tiny_json, tmp_path, monkeypatch, capsys
):
    """The disk is full when `train` writes its PID into the run's lock file, or its
    config.json (before: the lock's error named no file, `animeddim: error: No space left on
    device`; a failed config.json left empty checkpoints/ and samples/ folders, which the
    same command then refused, `already holds files; use --resume`, and --resume refused as
    holding no config.json). The same command, with space again, trains."""
    run = tmp_path / "run"
    if where == "lock":

        def pwrite(fd, data, offset):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(run_folder.os, "pwrite", pwrite)
    else:
        real_open = open

        def full_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            return _FullDisk(f) if "w" in mode and "config.json" in str(file) else f

        monkeypatch.setattr(io_mod, "open", full_open, raising=False)
    argv = _train_args(avatars16, run, tiny_json)
    rc, _, err = run_main(capsys, *argv)
    assert rc == 1
    named = run / (run_folder.LOCK_NAME if where == "lock" else "config.json")
    _one_line_error(err, f"No space left on device: {named}")
    assert not run.exists()  # the folder the failed start made is gone
    monkeypatch.undo()
    rc, _, err = run_main(capsys, *argv)
    assert rc == 0, err
    assert (run / "checkpoints" / "last.safetensors").is_file()


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(
    trained_tiny, tmp_path, monkeypatch, capsys
):
    """A read-only mount (or, for a user other than root, a folder without write permission)
    under an output (before: `sample` drew every image and `evaluate` measured KID, minutes at
    their defaults, then failed writing their first file). Root ignores permission bits, so
    the folder's `os.access` is made to answer no, as it does for root on a read-only mount.
    One line on stderr: no progress bar, so no work began."""
    from animeddim import outputs

    run = copy_run(trained_tiny, tmp_path / "run")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    commands = [
        (locked, ["sample", "--run", run, "--n", "2", "--steps", "2", "--out", locked / "s"]),
        (locked, ["export", "--run", run, "--out", locked / "e.safetensors"]),
        (locked, ["report", "--run", run, "--out", locked / "rep", "--steps", "1"]),
        (run, ["evaluate", "--run", run, "--real", run / "samples", "--n", "2"]),  # RUN/eval-*
    ]
    for folder, argv in commands:
        no_write = {folder}

        def access(path, mode, *args, no_write=no_write, **kwargs):
            if Path(path) in no_write and mode & os.W_OK:
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(outputs.os, "access", access)
        before = sorted(p.name for p in folder.rglob("*"))
        rc, _, err = run_main(capsys, *argv)
        assert rc == 2, (argv, err)
        _one_line_error(err, "cannot be written", f"{str(folder)!r} has no write permission")
        assert sorted(p.name for p in folder.rglob("*")) == before
        monkeypatch.undo()


def test_unwritable_output_folder_is_one_line(avatars16, tiny_json, capsys):
    # Nobody, root included, can create folders in sysfs: a real unwritable place.
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs here")
    rc, _, err = run_main(capsys, *_train_args(avatars16, Path("/sys/animeddim-test/r"), tiny_json))
    assert rc == 1
    _one_line_error(err, "animeddim: error:", "/sys/animeddim-test")


# --------------------------------------------------------------------------------------------
# bad images


def _fake_size_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR (with a correct CRC) claims width x height: a decompression bomb."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def _odd_but_valid_images(d: Path) -> None:
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(d / "sixteen-bit.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (4, 4, 12, 12))
    pal.save(d / "palette-transparent.png", transparency=0)
    Image.new("LA", (16, 16), (128, 200)).save(d / "gray-alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    Image.new("RGB", (20, 16), (0, 128, 255)).save(d / "exif-rotated.jpg", exif=exif)
    Image.new("RGB", (1, 1), (10, 20, 30)).save(d / "one-pixel.png")


BAD_FILES = {  # name -> words of the reason given for skipping it
    "zero-byte.png": "empty",
    "truncated.png": "truncated",
    "truncated.jpg": "truncated",
    "text.png": "not an image",
    "bomb.png": "bomb",
}


def _bad_images(d: Path, good: Path) -> None:
    (d / "zero-byte.png").write_bytes(b"")
    png = next(good.glob("*.png")).read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    Image.new("RGB", (64, 64), (1, 2, 3)).save(d / "full.jpg", quality=95)
    jpg = (d / "full.jpg").read_bytes()
    (d / "full.jpg").unlink()
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "text.png").write_text("definitely not a picture\n")
    (d / "bomb.png").write_bytes(_fake_size_png(100_000, 100_000))
    (d / "loop").symlink_to(d, target_is_directory=True)  # a symlink loop


def test_cli_trains_through_bad_images_and_strict_refuses(avatars16, tiny_json, tmp_path, capsys):
    data = tmp_path / "mixed"
    data.mkdir()
    for f in avatars16.glob("*.png"):
        shutil.copy(f, data / f.name)
    _odd_but_valid_images(data)
    _bad_images(data, avatars16)
    tried = len(list(avatars16.glob("*.png"))) + 6 + len(BAD_FILES)
    p = _cli(*_train_args(data, tmp_path / "run", tiny_json, "--max-steps", "1"))
    assert p.returncode == 0, p.stderr
    note = [line for line in p.stdout.splitlines() if line.startswith("note: skipped")]
    assert len(note) == 1 and f"skipped {len(BAD_FILES)} of {tried} files" in note[0]
    for name, reason in BAD_FILES.items():
        assert re.search(rf"{re.escape(name)}: [^;]*{reason}", note[0], re.I), (name, note[0])
    assert _checkpoints(tmp_path / "run")["last.safetensors"][1]["step"] == 1
    argv = _train_args(data, tmp_path / "strict", tiny_json, "--max-steps", "1", "--strict")
    rc, _, err = run_main(capsys, *argv)
    assert rc == 2
    _one_line_error(err, "--strict", f"skipped {len(BAD_FILES)} of {tried}")


# --------------------------------------------------------------------------------------------
# bad checkpoints


class _Payload:
    """Unpickling this calls open(marker, "w"): proof that code ran if the marker exists."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _tiny_checkpoint(path: Path, widths=(8, 16), **meta) -> Path:
    cfg = RunConfig.from_dict(
        {"data": {"image_size": 16}, "model": {**TINY_MODEL, "widths": list(widths)}}
    )
    from animeddim.unet import UNet

    tensors = {
        **ckpt.with_prefix(UNet(cfg.model).state_dict(), "ema"),
        "norm.mean": torch.zeros(3),
        "norm.std": torch.ones(3),
    }
    return ckpt.save(path, tensors, {"config": cfg.to_dict(), "epoch": 0, "step": 0, **meta})


def _bad_checkpoint(kind: str, d: Path) -> Path:
    f = d / f"{kind}.safetensors"
    good = _tiny_checkpoint(d / "good.safetensors").read_bytes()
    if kind == "truncated":
        f.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        f.write_bytes(b"")
    elif kind == "text":
        f.write_text("this is not a checkpoint\n")
    elif kind == "random-bytes":
        f.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    elif kind == "plain-safetensors":
        save_file({"w": torch.zeros(2)}, str(f))
    elif kind == "future-version":
        tensors, meta = ckpt.load(d / "good.safetensors")
        ckpt.save(f, tensors, {**meta, "version": ckpt.VERSION + 1})
    elif kind == "other-architecture":  # config says widths [8, 16], weights are [8, 32]
        tensors, meta = ckpt.load(_tiny_checkpoint(d / "o.safetensors", widths=(8, 32)))
        meta["config"] = json.loads(json.dumps(ckpt.load(d / "good.safetensors")[1]["config"]))
        ckpt.save(f, tensors, meta)
    elif kind == "pickle":
        f.write_bytes(pickle.dumps(_Payload(d / "pwned")))
    elif kind == "torch-save":
        f = d / "model.pt"
        torch.save({"ema": _Payload(d / "pwned")}, f)
    elif kind == "empty-folder":
        f = d / "not-a-run"
        f.mkdir()
    return f


BAD_CHECKPOINTS = {
    "truncated": "not a readable animeddim checkpoint",
    "empty": "not a readable animeddim checkpoint",
    "text": "not a readable animeddim checkpoint",
    "random-bytes": "not a readable animeddim checkpoint",
    "plain-safetensors": "not an animeddim checkpoint",
    "future-version": "upgrade animeddim",
    "other-architecture": "does not match",
    "pickle": "not a readable animeddim checkpoint",
    "torch-save": "not a readable animeddim checkpoint",
    "empty-folder": "holds no checkpoint",
}


@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINTS))
def test_sample_from_bad_checkpoint_exits_2_and_runs_no_code(kind, tmp_path, capsys):
    f = _bad_checkpoint(kind, tmp_path)
    grid = tmp_path / "grid.png"
    rc, _, err = run_main(capsys, "sample", "--run", f, "--n", "1", "--steps", "1", "--grid", grid)
    assert rc == 2
    _one_line_error(err, BAD_CHECKPOINTS[kind])
    assert not (tmp_path / "pwned").exists()
    assert not grid.exists()


def test_pickle_payload_never_runs_through_the_real_cli(tmp_path):
    f = _bad_checkpoint("torch-save", tmp_path)  # a .pt file whose unpickling creates a file
    p = run_cli("sample", "--run", str(f), "--grid", str(tmp_path / "g.png"), check=False)
    assert p.returncode == 2
    _one_line_error(p.stderr, "not a readable animeddim checkpoint")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("model", "image_size", 32, "model.image_size is 16 there and 32 in config.json"),
        ("model", "widths", [8, 32], "model.widths is [8, 16] there and [8, 32]"),
        ("schedule", "min_signal_rate", 0.05, "schedule.min_signal_rate is 0.02 there"),
        # config.json edited by hand (before: the seed and batch size were taken, the learning
        # rate silently not, as AdamW's comes from the checkpoint; config.json then said so)
        ("train", "seed", 5, "train.seed is 0 there and 5 in config.json"),
        ("train", "learning_rate", 0.5, "train.learning_rate is 0.001 there and 0.5"),
        ("train", "batch_size", 4, "train.batch_size is 6 there and 4 in config.json"),
        ("data", "val_fraction", 0.5, "data.val_fraction is 0.25 there and 0.5"),
    ],
)
def test_resume_with_a_checkpoint_of_another_run_exits_2(
    avatars16, tmp_path, capsys, section, key, value, message
):
    """A checkpoint whose network, schedule, objective, split, optimiser or seed differ from
    config.json's (another run's checkpoint, or config.json edited by hand): exit 2 naming
    the setting and both values, config.json and the checkpoint as they were."""
    run = tmp_path / "run"
    train(tiny_config(avatars16, max_steps=1), run, **QUIET)
    d = json.loads((run / "config.json").read_text())
    d[section][key] = value
    if key == "image_size":
        d["data"]["image_size"] = value
    (run / "config.json").write_text(json.dumps(d))
    edited = (run / "config.json").read_bytes()
    rc, _, err = run_main(capsys, "train", "--resume", run, "--quiet")
    assert rc == 2
    _one_line_error(err, "belongs to another run", message, "back in config.json")
    assert (run / "config.json").read_bytes() == edited


def test_resume_from_an_exported_model_in_the_checkpoints_folder_exits_2(
    avatars16, tmp_path, capsys
):
    """An exported model copied over last.safetensors (before: 'the network does not match the
    network its config describes: 31 missing (e.g. down.0.0.conv1.bias)', naming no file)."""
    run = tmp_path / "run"
    train(tiny_config(avatars16, max_steps=1), run, **QUIET)
    last = run / "checkpoints" / "last.safetensors"
    rc, _, err = run_main(capsys, "export", "--run", run, "--out", tmp_path / "e.safetensors")
    assert rc == 0, err
    shutil.copyfile(tmp_path / "e.safetensors", last)
    rc, _, err = run_main(capsys, "train", "--resume", run, "--quiet", "--max-steps", "0")
    assert rc == 2
    _one_line_error(err, f"'{last}' is not a training checkpoint", "'ema-weights'")


def test_config_json_edited_where_a_resume_may_differ_still_resumes(avatars16, tmp_path, capsys):
    """What a resumed run may hold otherwise than its checkpoint: the resumable settings, the
    data folder's place (data moved, config.json edited to say where), the --init record."""
    data = tmp_path / "moved"
    run = tmp_path / "run"
    train(tiny_config(avatars16, max_steps=1), run, **QUIET)
    shutil.copytree(avatars16, data)
    d = json.loads((run / "config.json").read_text())
    d["data"].update(path=str(data), abs_path=str(data.resolve()))
    d["train"].update(max_steps=0, log_every=1, init="avatars-64")
    (run / "config.json").write_text(json.dumps(d))
    rc, out, err = run_main(capsys, "train", "--resume", run, "--quiet")
    assert rc == 0, err
    assert "resuming" in out and (run / "metrics.csv").is_file()


def _conditional_run_whose_data_moved(cond_data, tmp_path):
    """A run trained one step on a copy of `cond_data` (data/, its labels.csv in it), the
    folder then moved to moved/: (data, moved, run)."""
    data, moved, run = tmp_path / "data", tmp_path / "moved", tmp_path / "run"
    shutil.copytree(cond_data, data)
    cfg = tiny_config(data, max_steps=1)
    cfg.data.labels = str(data / "labels.csv")
    train(cfg.validate(), run, **QUIET)
    shutil.move(data, moved)
    return data, moved, run


def test_a_conditional_run_whose_data_moved_with_its_labels_still_resumes(
    cond_data, tmp_path, capsys
):
    """A conditional run's labels.csv lies in its data folder, so moving the data moves it
    too: config.json edited to say where both are now resumes, as the data folder's place
    alone did (before: refused, 'data.labels is .../labels.csv there and ... in config.json').
    Which source the labels are (none, 'folders' or a CSV file) stays as the run started."""
    data, moved, run = _conditional_run_whose_data_moved(cond_data, tmp_path)
    d = json.loads((run / "config.json").read_text())
    d["data"].update(path=str(moved), abs_path=str(moved.resolve()))
    d["data"]["labels"] = str(moved / "labels.csv")
    d["train"].update(max_steps=0)
    (run / "config.json").write_text(json.dumps(d))
    rc, out, err = run_main(capsys, "train", "--resume", run, "--quiet")
    assert rc == 0, err
    assert "resuming" in out and (run / "metrics.csv").is_file()
    cfg = load_run_config(run)
    cfg.data.labels = "folders"  # another source of labels: another run
    with pytest.raises(ckpt.CheckpointError, match="belongs to another run: data.labels is"):
        latest_checkpoint(run, cfg, log=lambda s: None)


def test_a_conditional_run_resumed_with_its_moved_data_reads_its_labels_there(
    cond_data, tmp_path, capsys
):
    """`--resume RUN --data NEW` of a conditional run whose labels.csv moved with its data
    folder (before: refused, '--data cannot change when resuming'; config.json had to be
    edited by hand, the labels' place too): the labels are read at their place in NEW and
    config.json records both; a labels file given with --labels at another place is taken."""
    data, moved, run = _conditional_run_whose_data_moved(cond_data, tmp_path)
    resume = ["train", "--resume", run, "--data", moved, "--quiet"]
    rc, out, err = run_main(capsys, *resume, "--max-steps", "2")
    assert rc == 0, err
    assert f"note: the run's data folder moved from '{data}' to '{moved}'" in out
    stored = load_run_config(run).data
    assert (stored.path, stored.labels) == (str(moved), str(moved / "labels.csv"))
    shutil.copyfile(moved / "labels.csv", tmp_path / "labels.csv")
    rc, out, err = run_main(
        capsys, *resume, "--labels", tmp_path / "labels.csv", "--max-steps", "3"
    )
    assert rc == 0, err
    assert load_run_config(run).data.labels == str(tmp_path / "labels.csv")


def test_a_run_given_a_relative_labels_file_resumes_from_another_directory(
    cond_data, tmp_path, tiny_json, capsys, monkeypatch
):
    """`train --labels rel/labels.csv`, resumed from another working directory: the run
    records its labels file's absolute place, as it does its data folder's (before: 'rel/
    labels.csv' was kept as given, and the resume exited 2, 'labels file ... does not
    exist'). The labels it reads there are still checked against those it trained on."""
    start, other, run = tmp_path / "start", tmp_path / "other", tmp_path / "run"
    (start / "rel").mkdir(parents=True), other.mkdir()
    labels = start / "rel" / "labels.csv"
    shutil.copyfile(cond_data / "labels.csv", labels)
    monkeypatch.chdir(start)
    args = _train_args(cond_data, run, tiny_json, "--labels", "rel/labels.csv")
    rc, _, err = run_main(capsys, *args, "--max-steps", "1")
    assert rc == 0, err
    assert load_run_config(run).data.labels == str(labels.resolve())
    monkeypatch.chdir(other)
    rc, _, err = run_main(capsys, "train", "--resume", run, "--max-steps", "2", "--quiet")
    assert rc == 0, err
    header, first, *rows = labels.read_text().splitlines()
    other_colour = first.replace("red", "blue") if "red" in first else first.replace("blue", "red")
    labels.write_text("\n".join([header, other_colour, *rows]) + "\n")
    _refused_writing_nothing(
        capsys,
        run,
        ["train", "--resume", run, "--max-steps", "3", "--quiet"],
        f"the labels in '{labels.resolve()}' differ from those the run trained on",
    )


def _refused_writing_nothing(capsys, run: Path, args: list, message: str) -> None:
    """`animeddim ARGS` exits 2 with one line holding `message`; no file of `run` changed."""
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    rc, _, err = run_main(capsys, *args)
    assert rc == 2
    _one_line_error(err, message)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


def test_a_conditional_run_resumed_on_other_labels_is_refused_unless_allowed(
    cond_data, tmp_path, capsys
):
    """A resume whose labels file (given with --labels, or moved with the data folder) labels
    one image otherwise than the labels the run trained on (before: taken silently, its
    vocabulary alone checked): one line naming the file, nothing written. The same labels
    re-saved with their rows reordered resume; --allow-changed-data trains on the new ones
    and records their digest."""
    data, moved, run = _conditional_run_whose_data_moved(cond_data, tmp_path)
    header, *rows = (moved / "labels.csv").read_text().splitlines()
    recorded = load_run_config(run).data.labels_digest
    assert len(recorded) == 64
    changed = tmp_path / "changed.csv"
    first = rows[0].split(",")
    first[1] = "blue" if first[1] == "red" else "red"  # one image's colour
    changed.write_text("\n".join([header, ",".join(first), *rows[1:]]) + "\n")
    resume = ["train", "--resume", run, "--data", moved, "--quiet"]
    _refused_writing_nothing(
        capsys,
        run,
        [*resume, "--labels", changed, "--max-steps", "2"],
        f"cannot resume on changed labels: the labels in '{changed}' differ from those the run "
        f"trained on; give --labels the run's labels file ('{data / 'labels.csv'}'), or resume "
        "with --allow-changed-data to train on these labels",
    )
    # the labels file moved with the data folder, and edited there: refused as well
    shutil.copyfile(changed, moved / "labels.csv")
    _refused_writing_nothing(
        capsys,
        run,
        [*resume, "--max-steps", "2"],
        f"the labels in '{moved / 'labels.csv'}' differ from those the run trained on",
    )
    # the same labels, re-saved: rows reversed, quoted, CRLF line ends
    same = tmp_path / "same.csv"
    quoted_rows = ['"' + r.replace(",", '","') + '"' for r in [header, *reversed(rows)]]
    same.write_bytes(("\r\n".join(quoted_rows) + "\r\n").encode())
    rc, _, err = run_main(capsys, *resume, "--labels", same, "--max-steps", "2")
    assert rc == 0, err
    assert load_run_config(run).data.labels_digest == recorded
    rc, out, err = run_main(
        capsys, *resume, "--labels", changed, "--max-steps", "3", "--allow-changed-data"
    )
    assert rc == 0, err
    assert f"note: resuming on changed labels (the labels in '{changed}' differ" in out
    stored = load_run_config(run).data
    assert stored.labels == str(changed) and stored.labels_digest not in ("", recorded)


def _as_recorded_before_labels_digests(run: Path, **data) -> None:
    """RUN's config.json and checkpoints as a run started before labels were digested (and
    labels files recorded by their absolute place) wrote them: no data.labels_digest, and
    the data settings `data` (such as a labels file as given: relative)."""

    def before(config: dict) -> None:
        del config["data"]["labels_digest"]
        config["data"].update(data)

    d = json.loads((run / "config.json").read_text())
    before(d)
    (run / "config.json").write_text(json.dumps(d))
    for f in (run / "checkpoints").glob("*.safetensors"):
        tensors, meta = ckpt.load(f)
        before(meta["config"])
        ckpt.save(f, tensors, meta)


def _relabelled(labels: Path, out: Path) -> Path:
    """A copy of labels CSV `labels` at `out`, its first image's colour the other one."""
    header, first, *rows = labels.read_text().splitlines()
    name, colour, band = first.split(",")
    first = ",".join([name, {"red": "blue", "blue": "red"}[colour], band])
    out.write_text("\n".join([header, first, *rows]) + "\n")
    return out


def test_an_old_conditional_run_resumes_on_labels_its_own_file_vouches_for(
    cond_data, tmp_path, capsys
):
    """A run started before labels were digested, given --labels at another place: its own
    labels file, still where it read it, gives the codes it trained on, and those of the file
    given are compared with them (before: refused whatever they held, 'cannot be checked').
    The same labels (rows reordered) go on, their digest recorded; others are refused, naming
    the run's file; its own file resumes as before."""
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(cond_data, data)
    cfg = tiny_config(data, max_steps=1)
    cfg.data.labels = str(data / "labels.csv")
    train(cfg.validate(), run, **QUIET)
    recorded = load_run_config(run).data.labels_digest
    _as_recorded_before_labels_digests(run)
    in_place = copy_run(run, tmp_path / "in-place")
    relabelled = _relabelled(data / "labels.csv", tmp_path / "relabelled.csv")
    resume = ["train", "--resume", run, "--quiet", "--max-steps", "2"]
    _refused_writing_nothing(
        capsys,
        run,
        [*resume, "--labels", relabelled],
        f"cannot resume on changed labels: the labels in '{relabelled}' differ from those in "
        f"the run's labels file; give --labels the run's labels file ('{data / 'labels.csv'}'), "
        "or resume with --allow-changed-data",
    )
    header, *rows = (data / "labels.csv").read_text().splitlines()
    reordered = tmp_path / "reordered.csv"
    reordered.write_text("\n".join([header, *reversed(rows)]) + "\n")
    rc, _, err = run_main(capsys, *resume, "--labels", reordered)
    assert rc == 0, err
    assert load_run_config(run).data.labels_digest == recorded
    rc, _, err = run_main(capsys, "train", "--resume", in_place, "--quiet", "--max-steps", "2")
    assert rc == 0, err
    assert load_run_config(in_place).data.labels_digest == recorded


def test_an_old_conditional_run_whose_data_moved_with_its_labels_resumes_there(
    cond_data, tmp_path, capsys
):
    """A run started before labels were digested, its data folder moved with its labels.csv,
    resumed with --data NEW (before: refused, 'cannot be checked', until --allow-changed-data):
    the labels file at its place in the moved folder, whose images are the run's by their
    fingerprint, stands for the one the run read where it holds each attribute's values the
    run knew; it goes on with a note, the digest recorded from then on. One whose values
    differ is refused; a labels file elsewhere, the run's own gone, cannot be checked."""
    data, moved, run = _conditional_run_whose_data_moved(cond_data, tmp_path)
    recorded = load_run_config(run).data.labels_digest
    _as_recorded_before_labels_digests(run)
    resume = ["train", "--resume", run, "--data", moved, "--quiet", "--max-steps", "2"]
    labels = (moved / "labels.csv").read_text()
    (moved / "labels.csv").write_text(labels.replace(",blue,", ",red,"))  # no image blue
    _refused_writing_nothing(
        capsys,
        run,
        resume,
        f"the labels in '{moved / 'labels.csv'}' differ from those the run trained on: their "
        "colour values are 'red', the run's 'blue', 'red'; restore them, or resume with "
        "--allow-changed-data",
    )
    (moved / "labels.csv").write_text(labels)
    elsewhere = tmp_path / "elsewhere.csv"
    shutil.copyfile(moved / "labels.csv", elsewhere)
    _refused_writing_nothing(
        capsys,
        run,
        [*resume, "--labels", elsewhere],
        f"cannot resume on changed labels: the labels in '{elsewhere}' cannot be checked: the "
        f"run started before its labels were recorded, and read them from "
        f"'{data / 'labels.csv'}', which is gone; nothing else it recorded can vouch for them; "
        "put that file back there (a copy will do), or resume with --allow-changed-data",
    )
    rc, out, err = run_main(capsys, *resume)
    assert rc == 0, err
    assert (
        f"note: the run's labels file moved with its data folder, from '{data / 'labels.csv'}' "
        f"to '{moved / 'labels.csv'}'"
    ) in out
    stored = load_run_config(run).data
    assert (stored.labels, stored.labels_digest) == (str(moved / "labels.csv"), recorded)


def test_an_old_run_that_recorded_its_labels_file_relative_resumes_from_another_directory(
    cond_data, tmp_path, tiny_json, capsys, monkeypatch
):
    """A run started before labels files were recorded by their absolute place kept
    `--labels data/labels.csv` as given, relative to the directory it started in; resumed
    from another one (before: read from there: 'does not exist', or a same-named file
    there, labelling otherwise, trained on without a word), the file is found from its
    data folder's recorded place, with a note. Where that cannot tell (an absolute --data, the
    labels outside it): one line naming the path and the remedy, --labels with its place."""
    start, other, run = tmp_path / "start", tmp_path / "other", tmp_path / "run"
    shutil.copytree(cond_data, start / "data")
    (other / "data").mkdir(parents=True)
    _relabelled(start / "data" / "labels.csv", other / "data" / "labels.csv")  # not the run's
    monkeypatch.chdir(start)
    args = _train_args(Path("data"), run, tiny_json, "--labels", "data/labels.csv")
    rc, _, err = run_main(capsys, *args, "--max-steps", "1")
    assert rc == 0, err
    recorded = load_run_config(run).data.labels_digest
    _as_recorded_before_labels_digests(run, labels="data/labels.csv")
    monkeypatch.chdir(other)
    place = start / "data" / "labels.csv"
    place.rename(tmp_path / "aside.csv")
    _refused_writing_nothing(
        capsys,
        run,
        ["train", "--resume", run, "--max-steps", "2", "--quiet"],
        f"labels file '{place}' does not exist: the run's labels file, recorded as "
        "'data/labels.csv' relative to the directory it started in; put it back there, or "
        "resume with --labels and its place now and --allow-changed-data",
    )
    (tmp_path / "aside.csv").rename(place)
    rc, out, err = run_main(capsys, "train", "--resume", run, "--max-steps", "2", "--quiet")
    assert rc == 0, err
    assert (
        "note: the run's labels file 'data/labels.csv', recorded relative to the directory it "
        f"started in, is read from '{place}'"
    ) in out
    stored = load_run_config(run).data
    assert (stored.labels, stored.labels_digest) == (str(place), recorded)

    (start / "rel").mkdir()
    shutil.copyfile(place, start / "rel" / "labels.csv")
    monkeypatch.chdir(start)
    run = tmp_path / "run-2"
    args = _train_args(start / "data", run, tiny_json, "--labels", "rel/labels.csv")
    rc, _, err = run_main(capsys, *args, "--max-steps", "1")
    assert rc == 0, err
    _as_recorded_before_labels_digests(run, labels="rel/labels.csv")
    monkeypatch.chdir(other)
    resume = ["train", "--resume", run, "--max-steps", "2", "--quiet"]
    _refused_writing_nothing(
        capsys,
        run,
        resume,
        f"labels file 'rel/labels.csv' does not exist in '{other}': the run recorded it "
        "relative to the directory it started in, which it did not record; resume from that "
        "directory, or give --labels with the file's place",
    )
    rc, _, err = run_main(capsys, *resume, "--labels", start / "rel" / "labels.csv")
    assert rc == 0, err
    assert load_run_config(run).data.labels_digest == recorded


# --------------------------------------------------------------------------------------------
# bad options of every command: one table


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--run", "{run}", "--eta", "-0.1", "--grid", "g.png"], "eta must be"),
        (["sample", "--run", "{run}", "--steps", "ten", "--grid", "g.png"], "steps must be an"),
        (["sample", "--run", "{run}", "--batch-size", "0", "--grid", "g.png"], "batch-size"),
        (["sample", "--run", "{run}", "--device", "tpu", "--grid", "g.png"], "unknown device"),
        (["sample", "--run", "{run}"], "give --out DIR"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--epochs", "0"], "epochs must be"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--lr", "nan"], "learning_rate"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--lr", "-1"], "learning_rate"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--val-fraction", "1"], "val_fraction"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--seed", "-1"], "seed"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--seed", str(2**64)], "seed"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--widths", "8"], "model.widths"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--image-size", "4"], "image-size"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--time-limit", "-1"], "time_limit"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--nan-policy", "go"], "nan-policy"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--keep-checkpoints", "0"], "keep"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--config", "{list}"], "not a list"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--config", "{binary}"], "not valid"),
        (["train", "--data", "{data}", "--out", "{run}"], "already holds files"),
        (
            ["train", "--data", "{data}", "--out", "{tmp}/r", "--batch-size", "99", "--quiet"],
            "larger",
        ),
        (["train", "--resume", "{tmp}"], "not an animeddim run folder"),
        (["train", "--resume", "{run}", "--data", "{data}"], "cannot change when resuming"),
        (["train", "--resume", "{run}", "--out", "{tmp}/r"], "not both"),
        (["train", "--data", "{data}"], "give --out RUN"),
        (["train", "--data", "{empty}", "--out", "{tmp}/r"], "no usable image"),
        (["train", "--data", "{tmp}/nope", "--out", "{tmp}/r"], "does not exist"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--image-size", "20"], "multiple of"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--device", "tpu"], "unknown device"),
        (["train", "--data", "{data}", "--out", "{tmp}/r", "--kid-images", "1"], "kid_images"),
        (["train", "--resume", "{tmp}/nope"], "not an animeddim run folder"),
        # a run's own file (before: "'RUN/config.json' is not an animeddim run folder (no
        # config.json)"): the folder is named
        (["train", "--resume", "{run}/config.json"], "is a file; give the run folder that holds"),
        (["train", "--resume", "{list}"], "list.json' is a file; give the run folder"),
        (["sample", "--run", "{tmp}/nope", "--grid", "{tmp}/g.png"], "neither a run folder"),
        (["sample", "--run", "{tmp}", "--steps", "0", "--grid", "g.png"], "steps must be"),
        (["sample", "--run", "{tmp}", "--steps", "1001", "--grid", "g.png"], "steps must be"),
        (["sample", "--run", "{tmp}", "--eta", "1.5", "--grid", "g.png"], "eta must be"),
        (["sample", "--run", "{tmp}", "--n", "0", "--grid", "g.png"], "n must be"),
    ],
)
def test_bad_options_exit_2_with_one_line(args, message, avatars16, tmp_path, capsys):
    run = tmp_path / "a-run"
    run.mkdir()
    (run / "config.json").write_text(RunConfig().to_json())
    (run / "metrics.csv").write_text("epoch\n1\n")  # a run that has started
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    fill = {"tmp": tmp_path, "run": run, "data": avatars16, "empty": empty}
    fill |= {"list": tmp_path / "list.json", "binary": tmp_path / "binary.json"}
    rc, _, err = run_main(capsys, *[a.format(**fill) for a in args])
    assert rc == 2, err
    _one_line_error(err, message)


# Property-based: any dict of settings is either a valid, usable config or a ConfigError.

_FIELDS = {
    section: [f.name for f in dataclasses.fields(getattr(RunConfig(), section))]
    for section in ("data", "model", "schedule", "train")
}
_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 1),
    st.text(max_size=6),
    st.lists(st.integers(-2, 64), max_size=5),
    st.sampled_from(["auto", "cpu", "fp32", "stop", "skip-batch", "memory"]),
)


def _section(name: str):
    keys = st.one_of(st.sampled_from(_FIELDS[name]), st.text(max_size=4))
    return st.dictionaries(keys, _LEAF, max_size=6)


_CONFIG_DICTS = st.one_of(
    st.fixed_dictionaries({}, optional={s: st.one_of(_section(s), _LEAF) for s in _FIELDS}),
    st.dictionaries(st.text(max_size=5), _LEAF, max_size=3),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=_CONFIG_DICTS)
def test_config_from_any_dict_is_valid_or_config_error(d):
    try:
        cfg = RunConfig.from_dict(d).validate()
    except ConfigError as e:
        assert str(e)
        return
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg  # survives its own JSON
    # Seeds and fractions that validate are usable by the data pipeline and torch.
    batches_mod.epoch_order(4, cfg.train.seed, 0)
    data_mod.split_indices(4, cfg.data.val_fraction, cfg.data.split_seed)
    torch.Generator().manual_seed(cfg.train.seed)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=200), suffix=st.sampled_from([".json", ".toml"]))
def test_config_file_of_any_bytes_is_a_dict_or_config_error(tmp_path_factory, payload, suffix):
    f = tmp_path_factory.mktemp("cfgfile") / f"c{suffix}"
    f.write_bytes(payload)
    try:
        d = load_config_file(f)
    except ConfigError:
        return
    assert isinstance(d, dict)


# --------------------------------------------------------------------------------------------
# determinism


def test_same_seed_gives_bitwise_same_samples_in_separate_processes(reference_run, tmp_path):
    outs = []
    for name in ("a", "b"):
        out, grid = tmp_path / name, tmp_path / f"{name}.png"
        args = ("--n", "4", "--steps", "5", "--eta", "0.5", "--seed", "3", "--device", "cpu")
        run_cli(
            "sample", "--run", str(reference_run), *args, "--out", str(out), "--grid", str(grid)
        )
        outs.append([f.read_bytes() for f in (*sorted(out.glob("*.png")), grid)])
    assert len(outs[0]) == 5 and outs[0] == outs[1]
    assert len(set(outs[0][:4])) == 4  # four different images, not one repeated


def test_same_settings_give_bitwise_same_training_in_another_process(reference_run, tmp_path):
    """The CLI run of the reference fixture, repeated in this process: same checkpoints."""
    again = tmp_path / "again"
    train(load_run_config(reference_run), again, **QUIET)
    a, b = _checkpoints(reference_run), _checkpoints(again)
    assert sorted(a) == sorted(b)
    for name in a:
        _assert_same_tensors(a[name][0], b[name][0])
    assert _metric_rows(again) == _metric_rows(reference_run)
