"""Multi-process training and sampling under torchrun (2 CPU processes, gloo).

Each torchrun call is a real launch, as a user would type it; OMP_NUM_THREADS=1 keeps two
processes from fighting over the CI machine's cores.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, copy_run, shared_dir
from PIL import Image

from animeddim import checkpoint as ckpt
from animeddim import distributed, run_folder
from animeddim.config import ConfigError

TOLERANCE = 1e-5  # float32 weights after 6 AdamW steps; measured differences are ~2e-7


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def animeddim(
    *args: str, nproc: int = 1, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m animeddim ARGS`, or the same under `torchrun --nproc_per_node nproc`."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "animeddim", *args]
    else:
        # "--" ends torchrun's own options: it would read --run or --n as abbreviations of its
        # --run-path or --nnodes.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", str(nproc), "-m", "--", "animeddim", *args]
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**_env(), **(env or {})}
    )
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def train_args(data: Path, tmp: Path, out: str, *extra: str, device: str = "cpu") -> list[str]:
    cfg = tmp / "tiny.json"
    cfg.write_text(json.dumps({"model": TINY_MODEL, "data": {"val_fraction": 0.25}}))
    return [
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp / out),
        "--config",
        str(cfg),
        "--epochs",
        "2",
        "--batch-size",
        "6",  # the global batch: 3 images per process
        "--no-kid",
        "--quiet",
        "--precision",
        "fp32",
        "--device",
        device,
        *extra,
    ]


def max_differences(run_a: Path, run_b: Path) -> dict[str, float]:
    """Largest |a - b| over the network's and the EMA network's float tensors."""
    a, ma = ckpt.load(run_a / "checkpoints" / "last.safetensors")
    b, mb = ckpt.load(run_b / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys()
    assert (ma["step"], ma["epoch"]) == (mb["step"], mb["epoch"])
    out = {}
    for prefix in ("model", "ema"):
        keys = [k for k in a if k.startswith(prefix + ".") and a[k].is_floating_point()]
        out[prefix] = max((a[k].double() - b[k].double()).abs().max().item() for k in keys)
    return out


@pytest.fixture(scope="module")
def one_process_run(avatars16, tmp_path_factory) -> Path:
    def build(tmp: Path) -> Path:
        animeddim(*train_args(avatars16, tmp, "run"))
        return tmp / "run"

    return shared_dir(tmp_path_factory, "single", build)


def test_two_processes_train_like_one(avatars16, one_process_run, tmp_path):
    p = animeddim(*train_args(avatars16, tmp_path, "run"), nproc=2)
    assert p.stdout.count("run folder:") == 1  # rank 0 alone reports
    assert p.stdout.count("epoch 2/2") == 1
    diff = max_differences(one_process_run, tmp_path / "run")
    assert diff["model"] < TOLERANCE and diff["ema"] < TOLERANCE, diff
    rows_1 = list(csv.DictReader(open(one_process_run / "metrics.csv")))
    rows_2 = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [r["step"] for r in rows_2] == ["3", "6"]
    for r1, r2 in zip(rows_1, rows_2, strict=True):
        for k in ("train_noise_loss", "train_image_loss", "val_noise_loss", "val_image_loss"):
            assert float(r2[k]) == pytest.approx(float(r1[k]), rel=1e-4), k
    assert (tmp_path / "run" / "samples" / "epoch-0002.png").is_file()


def test_resume_with_another_number_of_processes(avatars16, one_process_run, tmp_path):
    # 2 processes stop mid-epoch 2 (3 steps per epoch), 1 process finishes the run.
    animeddim(*train_args(avatars16, tmp_path, "run", "--max-steps", "4"), nproc=2)
    _, meta = ckpt.load(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert (meta["step"], meta["batch_in_epoch"]) == (4, 1)
    animeddim("train", "--resume", str(tmp_path / "run"), "--max-steps", "0", "--quiet")
    diff = max_differences(one_process_run, tmp_path / "run")
    assert diff["model"] < TOLERANCE and diff["ema"] < TOLERANCE, diff


def test_two_process_sample_equals_one_process(one_process_run, tmp_path):
    common = ["sample", "--run", str(one_process_run), "--n", "7", "--steps", "3"]
    animeddim(*common, "--out", str(tmp_path / "one"), "--grid", str(tmp_path / "one.png"))
    p = animeddim(
        *common, "--out", str(tmp_path / "two"), "--grid", str(tmp_path / "two.png"), nproc=2
    )
    assert p.stdout.count("images in") == 1
    names = sorted(f.name for f in (tmp_path / "one").glob("*.png"))
    assert len(names) == 7
    assert names == sorted(f.name for f in (tmp_path / "two").glob("*.png"))
    for name in [*names, "../one.png"]:
        a = np.asarray(Image.open(tmp_path / "one" / name))
        b = np.asarray(Image.open(tmp_path / "two" / name.replace("../one", "../two")))
        assert np.array_equal(a, b), name


def _have_inception() -> bool:
    from animeddim import metrics

    try:
        metrics.find_inception_weights()
    except metrics.InceptionWeightsMissing:
        return False
    return True


needs_weights = pytest.mark.skipif(not _have_inception(), reason="no FID Inception weights")

# Each process computes the Inception features of its own block of images, in other batches
# than one process does (3 + 3 images, not 6), where float32 convolutions may round otherwise
# (up to 1.8e-6 of features up to 4.3, measured in one process on 2 CPU threads), so KID and
# FID may differ by that rounding. Measured here (CPU, 1 thread per process): no difference
# (printed by `pytest -s`).
METRIC_TOLERANCE = 1e-4


def _real_folder(avatars16: Path, tmp: Path, count: int = 4) -> Path:
    real = tmp / "real"
    real.mkdir()
    for f in sorted(avatars16.glob("*.png"))[:count]:
        shutil.copy(f, real / f.name)
    return real


def _same_pngs(a: Path, b: Path) -> list[str]:
    names = sorted(f.name for f in a.glob("*.png"))
    assert names == sorted(f.name for f in b.glob("*.png"))
    for name in names:
        assert np.array_equal(np.asarray(Image.open(a / name)), np.asarray(Image.open(b / name)))
    return names


@needs_weights
def test_two_process_evaluate_equals_one_process(one_process_run, avatars16, tmp_path):
    """Each process draws and measures its block of the images; process 0 reads the real
    folder (and writes its cached features: one file), gathers and writes what one process
    writes. Before: refused under torchrun ('evaluate' runs in one process)."""
    real, cache = _real_folder(avatars16, tmp_path), tmp_path / "cache"
    common = ["evaluate", "--run", str(one_process_run), "--real", str(real), "--n", "6"]
    common += ["--steps", "2", "--cache-dir", str(cache), "--device", "cpu"]
    two = animeddim(*common, "--out", str(tmp_path / "two.json"),
                    "--samples-out", str(tmp_path / "two"), nproc=2)  # fmt: skip
    assert two.stdout.count("written:") == 1 and two.stdout.count("KID (paper") == 1, two.stdout
    assert len(list(cache.iterdir())) == 1  # the real features, written once
    animeddim(*common, "--out", str(tmp_path / "one.json"), "--samples-out", str(tmp_path / "one"))
    assert len(_same_pngs(tmp_path / "one", tmp_path / "two")) == 6
    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    timings = {"seconds", "generate_seconds", "standard_seconds", "date"}
    assert {
        k: v for k, v in one.items() if k not in timings | {"kid_mean", "kid_std", "fid", "paper"}
    } == {
        k: v for k, v in two.items() if k not in timings | {"kid_mean", "kid_std", "fid", "paper"}
    }
    assert one["paper"]["kid"] == two["paper"]["kid"]  # measured on process 0, as one process
    differences = {k: abs(one[k] - two[k]) / abs(one[k]) for k in ("kid_mean", "kid_std", "fid")}
    print(f"evaluate, 2 processes vs 1: relative differences {differences}")
    assert max(differences.values()) < METRIC_TOLERANCE, differences


def test_a_sample_stopped_in_one_process_is_finished_by_two(
    one_process_run, tmp_path, capsys, monkeypatch
):
    """`sample --out` stopped (Ctrl-C) after its first batch in one process, then the same
    command under torchrun: the two processes draw only the rest (in rounds of 2 x 2 that
    do not line up with the first call's batches), rank 0 writes it, and the folder and
    grid equal those of one uninterrupted process, byte for byte."""
    from conftest import run_main

    from animeddim import io as animeddim_io

    common = ["sample", "--run", str(one_process_run), "--n", "7", "--steps", "3"]
    common += ["--batch-size", "2"]  # rounds of 2 images per process
    animeddim(*common, "--out", str(tmp_path / "one"), "--grid", str(tmp_path / "one.png"))
    argv = [*common, "--out", str(tmp_path / "two"), "--grid", str(tmp_path / "two.png")]
    real = animeddim_io.save_pngs

    def stop_at_second(images, folder, names):
        if names[0] != "seed0-000000.png":
            raise KeyboardInterrupt  # as the SIGINT handler does
        return real(images, folder, names)

    monkeypatch.setattr(animeddim_io, "save_pngs", stop_at_second)
    rc, stdout, err = run_main(capsys, *argv)
    assert rc == 130 and "interrupted: 2 of 7 images kept" in stdout, (stdout, err)
    monkeypatch.undo()
    p = animeddim(*argv, nproc=2)
    assert p.stdout.count("images in") == 1 and "5 images, 3 ddim steps" in p.stdout, p.stdout
    one = {f.name: f.read_bytes() for f in (tmp_path / "one").iterdir()}
    assert one == {f.name: f.read_bytes() for f in (tmp_path / "two").iterdir()}
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()


@needs_weights
def test_an_evaluate_stopped_in_one_process_is_finished_by_two(
    one_process_run, avatars16, tmp_path, capsys, monkeypatch
):
    """`evaluate --samples-out` stopped (Ctrl-C) in one process while it wrote its third
    batch (5 of 7 samples kept), then the same command under torchrun: each process reads
    the kept samples of its block (process 0's are all kept: it draws none) and draws the
    rest, and the folder and every number of the JSON equal those of an uninterrupted
    two-process call exactly (each process measures the same block of the same images)."""
    from conftest import run_main
    from test_command_faults import _stop_at_write

    real, cache = _real_folder(avatars16, tmp_path), tmp_path / "cache"
    common = ["evaluate", "--run", str(one_process_run), "--real", str(real), "--n", "7"]
    common += ["--steps", "2", "--batch-size", "2", "--cache-dir", str(cache), "--device", "cpu"]
    animeddim(*common, "--out", str(tmp_path / "whole.json"),
              "--samples-out", str(tmp_path / "whole"), nproc=2)  # fmt: skip
    argv = [*common, "--out", str(tmp_path / "e.json"), "--samples-out", str(tmp_path / "s")]
    _stop_at_write(monkeypatch, 3, 1)  # Ctrl-C once the third batch's first PNG is written
    rc, stdout, err = run_main(capsys, *argv)
    assert rc == 130 and "interrupted: 5 of 7 samples kept" in stdout, (stdout, err)
    monkeypatch.undo()
    p = animeddim(*argv, nproc=2)
    assert p.stdout.count("7 samples in") == 1, p.stdout
    assert p.stderr.count("holds 5 of 7 samples of this evaluation") == 1, p.stderr
    assert len(_same_pngs(tmp_path / "whole", tmp_path / "s")) == 7
    assert not list((tmp_path / "s").glob(".*"))  # the pending note is gone
    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("whole", "e"))
    timings = {"seconds", "generate_seconds", "standard_seconds", "date"}
    for r in (one, two):
        r["paper"].pop("seconds")
    assert {k: v for k, v in one.items() if k not in timings} == {
        k: v for k, v in two.items() if k not in timings
    }


@needs_weights
def test_two_process_steps_study_equals_one_process(one_process_run, avatars16, tmp_path):
    """Every setting's images drawn and measured in blocks over the processes; process 0
    writes steps.csv/.md/.png. Before: refused under torchrun ('steps' runs in one process)."""
    real = _real_folder(avatars16, tmp_path)
    common = ["steps", "--run", str(one_process_run), "--real", str(real), "--n", "4"]
    common += ["--steps", "1,2", "--eta", "0,1", "--cache-dir", str(tmp_path / "c")]
    two = animeddim(*common, "--out", str(tmp_path / "two"), nproc=2)
    assert two.stdout.count("steps study:") == 1 and two.stdout.count("ddim eta 1 steps") == 2
    animeddim(*common, "--out", str(tmp_path / "one"))
    rows = [list(csv.DictReader(open(tmp_path / k / "steps.csv"))) for k in ("one", "two")]
    assert len(rows[0]) == 2 * 2 and (tmp_path / "two" / "steps.png").is_file()
    for r1, r2 in zip(*rows, strict=True):
        assert float(r2.pop("seconds_per_image")) > 0  # a timing: never the same twice
        r1.pop("seconds_per_image")
        assert r1.keys() == r2.keys() and all(
            r1[k] == r2[k] or float(r1[k]) == pytest.approx(float(r2[k]), rel=METRIC_TOLERANCE)
            for k in r1
        ), (r1, r2)


def test_an_evaluate_or_steps_option_every_process_refuses_is_said_once(one_process_run, tmp_path):
    # Each process checks the options (its file system may differ); process 0 says it.
    for command in ("evaluate", "steps"):
        p = animeddim(command, "--run", str(one_process_run), "--real", str(tmp_path / "none"),
                      "--out", str(tmp_path / "out"), nproc=2, check=False)  # fmt: skip
        said = [
            line for line in p.stderr.splitlines() if line.startswith(("animeddim:", "animeddim ["))
        ]
        assert len(said) == 1 and said[0].startswith("animeddim: error: "), p.stderr
        assert f"folder {str(tmp_path / 'none')!r} does not exist" in said[0], said
        assert "exitcode  : 2" in p.stderr and not (tmp_path / "out").exists()


def test_global_batch_must_divide_into_processes(avatars16, tmp_path):
    args = train_args(avatars16, tmp_path, "run")
    args[args.index("--batch-size") + 1] = "5"
    p = animeddim(*args, nproc=2, check=False)
    assert p.returncode != 0  # torchrun's own code; both workers exit with 2
    assert "exitcode  : 2" in p.stderr
    # One line, from rank 0, although every rank finds the error.
    assert p.stderr.count("error: --batch-size 5 is the global batch and must be divisible") == 1
    assert "use 4 or 6" in p.stderr


def test_world_size_set_without_torchrun_is_one_line(avatars16, tmp_path):
    # A WORLD_SIZE left by a scheduler (before: a traceback from torch's rendezvous naming one
    # variable); each process checks its own environment, before any work.
    args = train_args(avatars16, tmp_path, "run")
    for env, named in (
        ({"WORLD_SIZE": "2"}, "RANK, MASTER_ADDR, MASTER_PORT are not"),
        ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
         "RANK='2' with WORLD_SIZE=2: expected 0 .. 1"),
    ):  # fmt: skip
        p = animeddim(*args, check=False, env=env)
        assert p.returncode == 2, p.stderr
        assert p.stderr.splitlines() == [p.stderr.strip()] and named in p.stderr, p.stderr
        assert "Traceback" not in p.stderr and not (tmp_path / "run").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_ends_a_wait_for_processes_that_never_join(avatars16, tmp_path, sig):
    """Process 0 of 2 started by hand, process 1 never: torch waits 30 min for it in C++ code
    where Python's handlers never run (before: Ctrl-C and SIGTERM did nothing for 30 min)."""
    port = _free_port()
    env = {**_env(), "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "animeddim", *train_args(avatars16, tmp_path, "run")]
    p = subprocess.Popen(cmd, env={**env, "MASTER_PORT": str(port)}, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:  # rank 0 listens on MASTER_PORT once it waits for the others
            assert p.poll() is None and time.monotonic() < deadline, p.poll()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        time.sleep(0.5)
        p.send_signal(sig)
        assert p.wait(timeout=15) == -sig  # the default action: nothing was done to save
    finally:
        p.kill()
        p.wait()
    assert not (tmp_path / "run").exists()


def test_a_run_folder_in_use_is_one_line_from_every_rank(one_process_run, tmp_path):
    """A second torchrun job on a run folder another process holds. Before: rank 0 said so and
    rank 1 went on to its next collective, so the job ended in rank 1's gloo traceback
    ('Connection reset by peer'), reported by torchrun as the root cause (exit 1)."""
    run = tmp_path / "run"
    shutil.copytree(one_process_run, run)
    with run_folder.lock(run):
        p = animeddim("train", "--resume", str(run), "--epochs", "3", nproc=2, check=False)
    # torchrun's summary: the first process to exit (2), the other stopped by it or exit 2
    assert p.returncode != 0 and "exitcode  : 2" in p.stderr, p.stderr
    assert p.stderr.count(f"error: run folder {str(run)!r} is in use by process") == 1
    assert "[rank" not in p.stderr, p.stderr  # no traceback from any process
    assert max_differences(one_process_run, run) == {"model": 0.0, "ema": 0.0}


def by_hand(
    args_of_rank: list[list[str]],
    cwds: list[Path],
    env: dict[str, str] | None = None,
    main_wait_s: float | None = None,
    program: list[str] | None = None,
) -> list[subprocess.CompletedProcess]:
    """Processes started by hand as a scheduler starts them (RANK, WORLD_SIZE, MASTER_*), each
    with its own arguments and working directory; `main_wait_s`: the CLI's
    MAIN_PROCESS_WAIT_S set to it in each process; `program`: run instead of the CLI."""
    env = {**_env(), **(env or {}), "WORLD_SIZE": str(len(args_of_rank))}
    env["MASTER_ADDR"] = "127.0.0.1"
    env["MASTER_PORT"] = str(_free_port())
    procs = [
        subprocess.Popen(
            [*(program or _cli(main_wait_s)), *args],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r, (args, cwd) in enumerate(zip(args_of_rank, cwds, strict=True))
    ]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [
        subprocess.CompletedProcess(p.args, p.returncode, *o)
        for p, o in zip(procs, outs, strict=True)
    ]


def _cli(main_wait_s: float | None) -> list[str]:
    if main_wait_s is None:
        return [sys.executable, "-m", "animeddim"]
    code = (
        "import sys; from animeddim.cli import common, main; "
        f"common.MAIN_PROCESS_WAIT_S = {main_wait_s}; sys.exit(main(sys.argv[1:]))"
    )
    return [sys.executable, "-c", code]


def test_processes_started_with_other_settings_are_refused(avatars16, tmp_path):
    """Before: ranks with another --seed trained on other shuffles without a word (each took
    its slice of another order); another --epochs ended the one in a gloo traceback while the
    other reported success."""
    args = train_args(avatars16, tmp_path, "run")
    p0, p1 = by_hand([args, [*args, "--seed", "5"]], [tmp_path, tmp_path])
    assert (p0.returncode, p1.returncode) == (2, 2), (p0.stderr, p1.stderr)
    assert p0.stderr.strip() == (
        "animeddim: error: process 1 of 2 has train.seed = 5, process 0 has 0: start every "
        "process with the same command and options (torchrun does, on each node)"
    )
    assert p1.stderr == "" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("node_b", ["no folder", "other images"])
def test_a_data_folder_that_one_process_sees_otherwise_is_refused(avatars16, tmp_path, node_b):
    """The same command on two 'nodes' (working directories) where 'data' is not the same
    folder. Before: the process without it said so, and the other ended in a gloo traceback
    ('Connection closed by peer'); other images trained on without a word."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "data").symlink_to(avatars16)
    if node_b == "other images":
        shutil.copytree(avatars16, b / "data")
        next((b / "data").glob("*.png")).unlink()
    args = train_args(Path("data"), tmp_path, "run")
    p0, p1 = by_hand([args, args], [a, b])
    assert (p0.returncode, p1.returncode) == (2, 2), (p0.stderr, p1.stderr)
    assert p1.stderr == "" and "Traceback" not in p0.stderr, p0.stderr
    assert len(p0.stderr.splitlines()) == 1, p0.stderr
    if node_b == "no folder":
        assert "error: process 1 of 2: image folder 'data' does not exist" in p0.stderr
    else:
        assert "error: process 1 of 2 has the fingerprint of the images in 'data' = " in p0.stderr
        assert "every process must read the same images" in p0.stderr
    assert not any((tmp_path / "run").glob("checkpoints/*"))


def test_a_labels_file_that_one_process_reads_otherwise_is_refused(cond_data, tmp_path):
    """The same command on two 'nodes' (working directories) whose 'labels.csv' labels one
    image otherwise. Before: each process trained on its own labels without a word."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    header, first, *rows = (cond_data / "labels.csv").read_text().splitlines()
    other = first.replace("red", "blue") if "red" in first else first.replace("blue", "red")
    (a / "labels.csv").write_text("\n".join([header, first, *rows]) + "\n")
    (b / "labels.csv").write_text("\n".join([header, other, *rows]) + "\n")
    args = train_args(cond_data, tmp_path, "run", "--labels", "labels.csv")
    p0, p1 = by_hand([args, args], [a, b])
    assert (p0.returncode, p1.returncode) == (2, 2), (p0.stderr, p1.stderr)
    assert p1.stderr == "" and len(p0.stderr.splitlines()) == 1, p0.stderr
    assert "process 1 of 2 has the digest of the labels in 'labels.csv' = " in p0.stderr
    assert "every process must read the same labels" in p0.stderr
    assert not any((tmp_path / "run").glob("checkpoints/*"))


@pytest.mark.parametrize("node_b", ["the same images", "other images"])
def test_a_run_whose_data_moved_resumes_there_in_two_processes(
    one_process_run, avatars16, tmp_path, node_b
):
    """`--resume RUN --data moved` on two 'nodes' (working directories), each with its own
    copy of the run's data folder at 'moved': the run goes on there, one note from process
    0, config.json recording the new place; where one node's copy holds other images every
    process refuses it, one line, before any step."""
    run = copy_run(one_process_run, tmp_path / "run")
    a, b = tmp_path / "a", tmp_path / "b"
    for node in (a, b):
        node.mkdir()
        shutil.copytree(avatars16, node / "moved")
    if node_b == "other images":
        next((b / "moved").glob("*.png")).unlink()
    args = ["train", "--resume", str(run), "--data", "moved", "--epochs", "3", "--quiet"]
    p0, p1 = by_hand([args, args], [a, b])
    assert p1.stdout == p1.stderr == "", (p1.stdout, p1.stderr)
    if node_b == "other images":
        assert (p0.returncode, p1.returncode) == (2, 2), (p0.stderr, p1.stderr)
        assert len(p0.stderr.splitlines()) == 1, p0.stderr
        assert "process 1 of 2 has the fingerprint of the images in 'moved' = " in p0.stderr
        assert ckpt.read_meta(run / "checkpoints" / "last.safetensors")["epoch"] == 2
        return
    assert (p0.returncode, p1.returncode) == (0, 0), (p0.stderr, p1.stderr)
    notes = [
        line
        for line in p0.stdout.splitlines()
        if line.startswith("note:") and "EMA weights" not in line
    ]
    assert notes == [
        f"note: the run's data folder moved from '{avatars16.resolve()}' to '{a / 'moved'}'"
    ], p0.stdout
    stored = json.loads((run / "config.json").read_text())["data"]
    assert (stored["path"], stored["abs_path"]) == ("moved", str(a / "moved"))
    assert ckpt.read_meta(run / "checkpoints" / "last.safetensors")["epoch"] == 3


def test_a_process_killed_mid_run_leaves_the_others_one_line(avatars16, tmp_path):
    """Process 0 SIGKILLed while it writes its 2nd checkpoint (process 1 waits at the barrier
    after it), as a node lost outside torchrun's watch. Before: process 1's gloo traceback
    ('Connection reset by peer', a wall of torch frames)."""
    args = train_args(avatars16, tmp_path, "run", "--checkpoint-every", "1")
    env = {ckpt.KILL_AT_SAVE_ENV: "2:write"}  # counted in process 0, the one that writes
    p0, p1 = by_hand([args, args], [tmp_path, tmp_path], env)
    assert p0.returncode == -signal.SIGKILL and p1.returncode == 1, (p0.stderr, p1.stderr)
    assert p1.stderr.startswith("animeddim [rank 1]: error: lost contact with another process")
    assert len(p1.stderr.splitlines()) == 1 and "Traceback" not in p1.stderr, p1.stderr
    _, meta = ckpt.load(tmp_path / "run" / "checkpoints" / "step-00000001.safetensors")
    assert meta["step"] == 1  # what was written before survives


def test_an_elastic_restart_after_a_kill_resumes_the_run(one_process_run, tmp_path):
    """torchrun --max-restarts 1, process 0 SIGKILLed once its epoch-4 checkpoint is written:
    torchrun stops process 1 and starts both again, and the same command resumes from that
    checkpoint. Before: the restarted processes read the killed attempt's addresses from
    torchrun's store and failed, 'Gloo connectFullMesh failed ... Connection refused'."""
    run = tmp_path / "run"
    shutil.copytree(one_process_run, run)  # 2 epochs of 3 steps
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    cmd += ["2", "--max-restarts", "1", "-m", "--", "animeddim", "train", "--resume", str(run)]
    env = {**_env(), ckpt.KILL_AT_SAVE_ENV: "2:done"}  # the restart makes 1 save: no 2nd kill
    p = subprocess.run(
        [*cmd, "--epochs", "5"], capture_output=True, text=True, timeout=120, env=env
    )
    assert p.returncode == 0, p.stderr
    assert "Connection refused" not in p.stderr
    starts = [line for line in p.stdout.splitlines() if line.startswith("resuming")]
    assert starts == [f"resuming {run} at epoch 3, step 6", f"resuming {run} at epoch 5, step 12"]
    _, meta = ckpt.load(run / "checkpoints" / "last.safetensors")
    assert (meta["epoch"], meta["step"]) == (5, 15)


@pytest.mark.parametrize("case", ["undecodable", "batch too large", "1x1 BatchNorm"])
def test_an_error_every_process_finds_is_said_once(avatars16, tmp_path, case):
    """Before: each process printed it ('animeddim [rank 1]: error: ...' under rank 0's line),
    and a folder of undecodable files stopped rank 0 inside the disk-cache turn while rank 1
    waited at its barrier, which then said it lost contact."""
    data = avatars16
    if case == "undecodable":
        data = tmp_path / "bad"
        data.mkdir()
        for name in ("a.png", "b.png"):
            (data / name).write_text("not an image")
    args = train_args(data, tmp_path, "run")
    if case == "batch too large":
        args[args.index("--batch-size") + 1] = "40"
    if case == "1x1 BatchNorm":
        args += ["--image-size", "8", "--widths", "8,8,8,8", "--batch-size", "2"]
    p = animeddim(*args, nproc=2, check=False)
    said = [
        line for line in p.stderr.splitlines() if line.startswith(("animeddim:", "animeddim ["))
    ]
    assert len(said) == 1 and said[0].startswith("animeddim: error: "), p.stderr
    expected = {
        "undecodable": "no usable image in folder",
        "batch too large": "batch_size 40 is larger than the training split",
        "1x1 BatchNorm": "gives BatchNorm one value per channel",
    }
    assert expected[case] in said[0] and "exitcode  : 2" in p.stderr, p.stderr
    assert not any((tmp_path / "run").glob("checkpoints/*"))


@pytest.mark.parametrize("case", ["nothing to train", "no --init file"])
def test_a_resume_or_init_every_process_refuses_is_said_once(
    avatars16, one_process_run, tmp_path, case
):
    # Before: 'animeddim [rank 1]: error: ...' under rank 0's line.
    if case == "nothing to train":
        shutil.copytree(one_process_run, tmp_path / "run")
        args = ["train", "--resume", str(tmp_path / "run"), "--quiet"]
    else:
        args = train_args(avatars16, tmp_path, "run", "--init", str(tmp_path / "none.safetensors"))
    p = animeddim(*args, nproc=2, check=False)
    said = [
        line for line in p.stderr.splitlines() if line.startswith(("animeddim:", "animeddim ["))
    ]
    assert len(said) == 1 and said[0].startswith("animeddim: error: "), p.stderr
    assert ("nothing to train" if case == "nothing to train" else "none.safetensors") in said[0]
    assert "exitcode  : 2" in p.stderr, p.stderr


def test_a_global_batch_below_the_number_of_processes_names_one_value(monkeypatch):
    # Before: '--batch-size 1 ... (2): use 2 or 2'.
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match=r"number of processes \(2\): use 2$"):
        distributed.check_global_batch(1)
    with pytest.raises(ConfigError, match=r"\(2\): use 4 or 6$"):
        distributed.check_global_batch(5)


def test_sample_processes_started_with_other_options_are_refused(one_process_run, tmp_path):
    """Before: each process drew its block of its own --n (or --seed) and rank 0 wrote what
    came: '--n 4' and '--n 6' gave 5 images, the last three those of indices 3..5 named 2..4."""
    common = ["sample", "--run", str(one_process_run), "--steps", "2", "--out", str(tmp_path / "s")]
    p0, p1 = by_hand([[*common, "--n", "4"], [*common, "--n", "6"]], [tmp_path, tmp_path])
    assert (p0.returncode, p1.returncode) == (2, 2), (p0.stderr, p1.stderr)
    assert p0.stderr.strip() == (
        "animeddim: error: process 1 of 2 has --n = 6, process 0 has 4: start every process "
        "with the same command and options (torchrun does, on each node)"
    )
    assert p1.stderr == "" and not (tmp_path / "s").exists()


def test_helpers_are_identities_in_one_process():
    assert not distributed.is_distributed() and distributed.is_main()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    assert distributed.shard(10) == (0, 10)
    t = torch.arange(4.0)
    assert distributed.reduced_sum(t) is t and distributed.gather_to_main(t) is t
    assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.arange(4.0))
    assert distributed.any_true(True) and not distributed.all_true(False)
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    device = torch.device("cpu")
    assert distributed.setup(device) == device
    module = torch.nn.BatchNorm2d(3)
    assert distributed.sync_batchnorm(module) is module
    assert distributed.wrap_ddp(module, device) is module
    distributed.check_global_batch(7)


def test_the_backend_is_nccl_on_cuda_gloo_on_the_cpu_or_gloo_when_asked(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(distributed.BACKEND_ENV, raising=False)
    assert (distributed.backend_for(cpu), distributed.backend_for(cuda)) == ("gloo", "nccl")
    monkeypatch.setenv(distributed.BACKEND_ENV, " GLOO ")
    assert (distributed.backend_for(cpu), distributed.backend_for(cuda)) == ("gloo", "gloo")
    monkeypatch.setenv(distributed.BACKEND_ENV, "nccl")
    assert distributed.backend_for(cuda) == "nccl"
    with pytest.raises(ConfigError, match="ANIMEDDIM_DDP_BACKEND=nccl needs CUDA"):
        distributed.backend_for(cpu)
    monkeypatch.setenv(distributed.BACKEND_ENV, "mpi")
    with pytest.raises(ConfigError, match="ANIMEDDIM_DDP_BACKEND='mpi': use nccl or gloo"):
        distributed.backend_for(cuda)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_gloo_processes_sharing_one_gpu_train_like_one(avatars16, tmp_path):
    """NCCL refuses two ranks on one GPU; over gloo (CUDA tensors all-reduced through the CPU,
    BatchNorm synchronised by `_GlooSyncBatchNorm2d`) two processes share it. Compared with one
    process on the same GPU; the bound allows for cuDNN's TF32 convolutions (PyTorch's default
    for fp32), and the differences are printed (`pytest -s`) for the record."""
    animeddim(*train_args(avatars16, tmp_path, "one", "--no-compile", device="cuda"))
    p = animeddim(*train_args(avatars16, tmp_path, "two", "--no-compile", device="cuda"),
                  nproc=2, env={distributed.BACKEND_ENV: "gloo"})  # fmt: skip
    assert p.stdout.count("epoch 2/2") == 1
    diff = max_differences(tmp_path / "one", tmp_path / "two")
    print(f"two gloo processes on one GPU vs one process: {diff}")
    assert diff["model"] < 1e-3 and diff["ema"] < 1e-3, diff


@pytest.mark.parametrize(
    "command",
    [["kid", ".", "."], ["report", "--run", ".", "--out", "r"],
     ["data", "avatars", "--out", "x"], ["attributes", "coverage", ".", "--real", "."],
     ["invert", "--images", ".", "--out", "i"], ["interpolate", "--seeds", "1", "2", "--out", "i"],
     ["edit", "--images", ".", "--set", "hair=red", "--out", "e"]],
)  # fmt: skip
def test_a_one_process_command_under_torchrun_is_refused_once(command, monkeypatch, capsys):
    """Under torchrun every process of kid, report, data, attributes, invert, interpolate or
    edit ran the whole job and wrote the same files. Only train, sample, evaluate and steps
    share their work; any other command started with WORLD_SIZE > 1 is refused before any
    work: one line from process 0, exit 2 from every process. The others end at once: their
    error is a copy of process 0's, so they do not wait to be stopped as for an option error
    the first process may not have said yet (before: 20 s each)."""
    from conftest import run_main

    import animeddim.cli as cli

    waits = []
    monkeypatch.setattr(cli, "_said_by_another_process", lambda: waits.append(1) or False)
    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        rc, out, err = run_main(capsys, *command)
        assert rc == 2, err
        assert "Traceback" not in err and out == ""
        if said:
            assert len(err.strip().splitlines()) == 1, err
            assert f"'{command[0]}' runs in one process" in err and "WORLD_SIZE=2" in err
            assert "(train, sample, evaluate and steps share their work" in err
        else:
            assert err == "", err
    assert waits == [1], waits  # process 0's check alone; process 1 did not wait


@pytest.mark.parametrize(
    ("command", "said"),
    [(["sample", "--n", "-1", "--out", "s"], "argument --n: n must be >= 1, got -1"),
     (["evaluate", "--run", ".", "--steps", "0"], "argument --steps: steps must be in 1..1000"),
     (["train", "--data", ".", "--out", "r", "--epochs", "-1"], "epochs must be >= 1, got -1"),
     (["train", "--data", "."], "give --out RUN for a new run"),
     (["train", "--data", ".", "--out", "r", "--image-size", "15"], "image_size = 15")],
)  # fmt: skip
def test_a_bad_option_under_torchrun_is_said_once(command, said, monkeypatch, capsys):
    """An error of the options found before the processes join (argparse's, a missing --out,
    a setting's check) was printed by every process of a torchrun launch, the same line once
    per process. Now the first process on each node (LOCAL_RANK 0) says it at once; the
    others first wait to be stopped by torchrun, which stops them when the first fails (not
    stopped here: after the wait they say it themselves); a process with no LOCAL_RANK goes
    by its RANK."""
    import time

    from conftest import run_main

    from animeddim.cli.common import FIRST_PROCESS_WAIT_S

    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    for env, speaks in (
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, True),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, False),
        ({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}, True),  # another node's first
        ({"WORLD_SIZE": "2", "RANK": "1"}, False),
    ):
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        waits.clear()
        rc, out, err = run_main(capsys, *command)
        assert rc == 2 and out == "", (env, err)
        assert len(err.strip().splitlines()) == 1 and said in err, (env, err)
        assert waits == ([] if speaks else [FIRST_PROCESS_WAIT_S]), env


def test_a_bad_option_is_said_once_by_a_torchrun_launch(tmp_path):
    """Said once, by the first process: the second, exiting at once in silence, had torchrun
    stop the first before it said anything (no line at all, now and then)."""
    p = animeddim("sample", "--n", "-1", "--out", str(tmp_path / "s"), nproc=2, check=False)
    assert p.stderr.count("error: argument --n: n must be >= 1, got -1") == 1, p.stderr
    # torchrun's summary: the first process to exit (2), the other stopped by it or exit 2
    assert "exitcode  : 2" in p.stderr and not (tmp_path / "s").exists(), p.stderr


def _said(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("animeddim:", "animeddim ["))]


def test_an_error_found_after_joining_is_said_once_by_a_torchrun_launch(tmp_path):
    """A missing --run is found by every process once they have joined (loading the
    model). Before: said by each, 'animeddim [rank 1]: error: ...' under process 0's line."""
    missing = str(tmp_path / "none")
    p = animeddim("sample", "--run", missing, "--n", "4", "--out", str(tmp_path / "s"),
                  nproc=2, check=False)  # fmt: skip
    assert _said(p.stderr) == [
        f"animeddim: error: {missing!r} is neither a run folder nor a checkpoint file"
    ], p.stderr
    # torchrun's summary: the first process to exit (2), the other stopped by it or exit 2
    assert "exitcode  : 2" in p.stderr and not (tmp_path / "s").exists(), p.stderr


def test_an_error_found_after_joining_by_hand_is_said_once(tmp_path):
    """The same, started by hand (env://): process 0 holds the job's store, and keeps it
    until process 1 has heard that the error was said (else process 1 said it again)."""
    missing = str(tmp_path / "none")
    args = ["sample", "--run", missing, "--n", "4", "--out", str(tmp_path / "s")]
    p0, p1 = by_hand([args, args], [tmp_path, tmp_path])
    assert (p0.returncode, p1.returncode) == (2, 2), (p0.stderr, p1.stderr)
    assert _said(p0.stderr) == [
        f"animeddim: error: {missing!r} is neither a run folder nor a checkpoint file"
    ], p0.stderr
    assert p1.stderr == "", p1.stderr


@pytest.mark.parametrize("fails", [0, 1])
def test_an_error_one_process_alone_finds_after_joining_is_said(one_process_run, tmp_path, fails):
    """--run 'run' is a run folder in one process's working directory alone (another node's
    file system): that process says why, the other, waiting for it in a collective, says it
    lost contact, and both exit non-zero (no process waits for a word that never comes)."""
    ok, bad = tmp_path / "ok", tmp_path / "bad"
    ok.mkdir(), bad.mkdir()
    (ok / "run").symlink_to(one_process_run)
    args = ["sample", "--run", "run", "--n", "4", "--steps", "1", "--out", str(tmp_path / "s")]
    cwds = [bad, ok] if fails == 0 else [ok, bad]
    t = time.perf_counter()
    procs = by_hand([args, args], cwds, main_wait_s=1)
    print(f"process {fails} alone fails: both ended after {time.perf_counter() - t:.1f} s")
    failed, other = procs[fails], procs[1 - fails]
    assert failed.returncode == 2 and other.returncode == 1, (procs[0].stderr, procs[1].stderr)
    tag = "animeddim" if fails == 0 else "animeddim [rank 1]"
    assert _said(failed.stderr) == [
        f"{tag}: error: 'run' is neither a run folder nor a checkpoint file"
    ], failed.stderr
    assert len(_said(other.stderr)) == 1 and "lost contact" in other.stderr, other.stderr
    assert "Traceback" not in other.stderr and not (tmp_path / "s").exists()


# Each process measures its block of the real folder with a test double of the Inception
# network (per-channel means and deviations: the same whatever the batches), counting the
# images it measured and recording what it tells its progress bar; process 0 saves the
# features. Run twice: the second finds the cache.
REAL_FEATURES_SCRIPT = """
import json, sys, torch
from pathlib import Path
from animeddim import distributed
from animeddim.pipelines.real_folder import real_folder_features

class Counting:
    cache_token, weights_id, count = "test-colour-moments", "test", 0
    def features(self, images, protocol, batch_size=64, bf16=False):
        self.count += len(images)
        x = images.double()
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)

real, cache, out = sys.argv[1:4]
distributed.setup(torch.device("cpu"))
counts, told = [], []
for _ in range(2):
    extractor = Counting()
    f = real_folder_features(real, extractor, Path(cache), lambda *said: told.append(said))
    counts.append(extractor.count)
    if distributed.is_main():
        torch.save(f, Path(out) / "features.pt")
    else:
        assert f is None
Path(out, f"rank{distributed.rank()}.json").write_text(json.dumps([counts, told]))
distributed.cleanup()
"""


def _colour_moments(real: Path, tmp: Path) -> torch.Tensor:
    """The test double's features of `real`, measured in this process."""
    from animeddim import metrics

    class Moments:
        cache_token, weights_id = "test-colour-moments", "test"

        def features(self, images, protocol, batch_size=64, bf16=False):
            x = images.double()
            return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)

    return metrics.folder_features(real, Moments(), cache_dir=tmp / "one-process-cache")


def test_a_real_folder_every_process_sees_is_measured_in_blocks(avatars16, tmp_path):
    """On a feature-cache miss under torchrun each process measures its block of the real
    folder (12 + 12 of 24 images) and process 0 writes the cache once; the features are
    one process's. Before: process 0 measured all 24 while the other waited. Each one's
    progress bar counts its block and says so, and of how many (before: 'features (real)',
    12 of 12, under torchrun as if the folder held 12)."""
    script, out, cache = tmp_path / "real.py", tmp_path / "out", tmp_path / "cache"
    script.write_text(REAL_FEATURES_SCRIPT)
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(script), str(avatars16), str(cache), str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert p.returncode == 0, p.stderr
    (counts, told), (counts_1, told_1) = [
        json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)
    ]
    assert [counts, counts_1] == [[12, 0], [12, 0]]  # a block each, then the cache
    assert told == [["features (real, process 0's 12 of 24)", d, 12] for d in (0, 12)], told
    assert told_1 == [["features (real, process 1's 12 of 24)", d, 12] for d in (0, 12)]
    assert len(list(cache.iterdir())) == 1
    features = torch.load(out / "features.pt")
    assert torch.equal(features, _colour_moments(avatars16, tmp_path))


def test_a_real_folder_one_process_lacks_is_measured_by_process_0(avatars16, tmp_path):
    """'real' is the folder in process 0's working directory alone (nodes without shared
    storage): process 0 measures it whole, as in one process, and nobody waits."""
    script, out, cache = tmp_path / "real.py", tmp_path / "out", tmp_path / "cache"
    script.write_text(REAL_FEATURES_SCRIPT)
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (out, a, b):
        d.mkdir()
    (a / "real").symlink_to(avatars16)
    args = ["real", str(cache), str(out)]
    p0, p1 = by_hand([args, args], [a, b], program=[sys.executable, str(script)])
    assert (p0.returncode, p1.returncode) == (0, 0), (p0.stderr, p1.stderr)
    (counts, told), (counts_1, told_1) = [
        json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)
    ]
    assert [counts, counts_1] == [[24, 0], [0, 0]]
    assert told == [["features (real)", d, 24] for d in (0, 24)] and told_1 == [], told
    assert torch.equal(torch.load(out / "features.pt"), _colour_moments(avatars16, tmp_path))


def _by_hand_and_in_one(
    common: list[str], real: Path, cache: Path, tmp: Path
) -> tuple[dict, dict, subprocess.CompletedProcess]:
    """`common` with --real 'real' in two processes started by hand, 'real' a link to `real`
    in process 0's working directory alone (another node's disks) (written to
    tmp/two.json), then in one with --real `real` (tmp/one.json): both JSONs and process
    0's output; process 1 says nothing."""
    a, b = tmp / "a", tmp / "b"
    a.mkdir(), b.mkdir()
    (a / "real").symlink_to(real)
    args = [*common, "--real", "real", "--cache-dir", str(cache), "--out", str(tmp / "two.json")]
    p0, p1 = by_hand([args, args], [a, b])
    assert (p0.returncode, p1.returncode) == (0, 0), (p0.stderr, p1.stderr)
    assert p1.stdout == "", p1.stdout
    animeddim(*common, "--real", str(real), "--cache-dir", str(tmp / "c1"),
              "--out", str(tmp / "one.json"))  # fmt: skip
    one, two = (json.loads((tmp / f"{k}.json").read_text()) for k in ("one", "two"))
    return one, two, p0


@needs_weights
def test_evaluate_with_a_real_folder_process_0_alone_sees(one_process_run, avatars16, tmp_path):
    """--real 'real' is a folder in process 0's working directory alone (another node's
    disks): process 0 measures it, each process draws its block, and the summary is one
    process's. Before: refused, 'process 1 of 2: real-image folder 'real' does not exist'."""
    real, cache = _real_folder(avatars16, tmp_path), tmp_path / "cache"
    common = ["evaluate", "--run", str(one_process_run), "--n", "4", "--steps", "1",
              "--protocols", "standard", "--device", "cpu"]  # fmt: skip
    one, two, p0 = _by_hand_and_in_one(common, real, cache, tmp_path)
    assert p0.stdout.count("written:") == 1, p0.stdout
    assert one["real"] == two["real"] == str(real.resolve()) and one["n_real"] == 4
    differences = {k: abs(one[k] - two[k]) / abs(one[k]) for k in ("kid_mean", "kid_std", "fid")}
    assert max(differences.values()) < METRIC_TOLERANCE, differences


def _labelled_real(cond_data: Path, tmp: Path) -> Path:
    """8 of `cond_data`'s images (4 red, 4 blue) and their rows of its labels.csv."""
    real = tmp / "labelled"
    real.mkdir()
    rows = (cond_data / "labels.csv").read_text().splitlines()
    kept = [rows[0]] + [rows[1 + i] for i in range(0, 96, 12)]
    for row in kept[1:]:
        shutil.copy(cond_data / row.split(",")[0], real)
    (real / "labels.csv").write_text("\n".join(kept) + "\n")
    return real


@needs_weights
def test_evaluate_attr_with_a_real_folder_process_0_alone_sees(
    cond_run, cond_data, cond_classifier, tmp_path
):
    """evaluate --attr with --real 'real' in process 0's working directory alone: process 0
    reads its labels.csv and measures it, each process draws its block under the asked
    colour, and the summary is one process's. Before: refused, 'process 1 of 2: real folder
    'real' has no labels.csv: --attr compares with the real images that have the asked
    values', every process reading the labels."""
    real = _labelled_real(cond_data, tmp_path)
    common = ["evaluate", "--run", str(cond_run), "--classifier", str(cond_classifier),
              "--attr", "colour=red", "--guidance", "3", "--n", "4", "--steps", "2",
              "--protocols", "standard", "--device", "cpu", "--precision", "fp32"]  # fmt: skip
    one, two, p0 = _by_hand_and_in_one(common, real, tmp_path / "c2", tmp_path)
    assert p0.stdout.count("attribute accuracy colour=red:") == 1, p0.stdout
    asked_1, asked_2 = one["attributes_asked"], two["attributes_asked"]
    assert asked_1["n_real"] == asked_2["n_real"] == 4  # the red ones of the 8
    assert asked_1["accuracy"] == asked_2["accuracy"], (asked_1, asked_2)
    for r1, r2 in ((one, two), (asked_1, asked_2)):
        differences = {k: abs(r1[k] - r2[k]) / abs(r1[k]) for k in ("kid_mean", "kid_std")}
        assert max(differences.values()) < METRIC_TOLERANCE, differences


@needs_weights
@pytest.mark.parametrize("node_b", ["no folder", "an earlier file"])
def test_evaluate_out_is_checked_and_written_on_process_0s_node(
    one_process_run, avatars16, tmp_path, node_b
):
    """--out 'evals/e.json' (relative), whose folder is in process 0's working directory;
    process 1's (another node's disks) has no 'evals', or an 'evals/e.json' of an earlier
    evaluation there. Process 0 alone checks --out and writes it; process 1's files stay
    as they were. Before: every process checked --out, so the earlier file on process 1's
    node refused the call, 'process 1 of 2: --out 'evals/e.json' already exists'."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "evals").mkdir()
    if node_b == "an earlier file":
        (b / "evals").mkdir()
        (b / "evals" / "e.json").write_text("{}\n")
    args = ["evaluate", "--run", str(one_process_run), "--real", str(avatars16), "--n", "4",
            "--steps", "1", "--protocols", "standard", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--out", "evals/e.json"]  # fmt: skip
    p0, p1 = by_hand([args, args], [a, b])
    assert (p0.returncode, p1.returncode) == (0, 0), (p0.stderr, p1.stderr)
    assert "written: evals/e.json" in p0.stdout and p1.stdout == "", p0.stdout
    assert json.loads((a / "evals" / "e.json").read_text())["n"] == 4
    held = {str(f.relative_to(b)): f.read_text() for f in b.rglob("*") if f.is_file()}
    assert held == ({} if node_b == "no folder" else {"evals/e.json": "{}\n"}), held


@needs_weights
def test_steps_out_is_checked_and_written_on_process_0s_node(one_process_run, avatars16, tmp_path):
    """steps --out 'study' (relative): process 1's working directory (another node's disks)
    holds an earlier study there. Process 0 alone looks for earlier outputs and writes the
    study; process 1's files stay as they were. Before: every process looked, so the
    earlier study on process 1's node refused the call."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), (b / "study").mkdir(parents=True)
    (b / "study" / "steps.csv").write_text("earlier\n")
    args = ["steps", "--run", str(one_process_run), "--real", str(avatars16), "--n", "4",
            "--steps", "1", "--eta", "0", "--samplers", "ddim", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--out", "study"]  # fmt: skip
    p0, p1 = by_hand([args, args], [a, b])
    assert (p0.returncode, p1.returncode) == (0, 0), (p0.stderr, p1.stderr)
    assert "steps study: study/steps.csv" in p0.stdout and p1.stdout == "", p0.stdout
    assert (a / "study" / "steps.md").is_file()
    held = {str(f.relative_to(b)): f.read_text() for f in b.rglob("*") if f.is_file()}
    assert held == {"study/steps.csv": "earlier\n"}, held
