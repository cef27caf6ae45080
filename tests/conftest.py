"""Shared tiny fixtures: a few 16-px avatars and a tiny network config.

The suite runs in parallel (pytest-xdist, `-n 2` in pyproject.toml); `-p no:xdist` or `-n 0`
runs it in one process. A session fixture that trains or renders is built once per run even
then (`shared_dir`), and each worker keeps torch to one thread.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

TINY_MODEL = {"image_size": 16, "widths": [8, 16], "block_depth": 1, "embedding_dims": 8}

XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
_process_threads: list[int] = []  # torch's own thread count in this process, before ours


def pytest_configure(config) -> None:
    if XDIST_WORKER:
        # Tiny networks run several times faster on one thread than on two busy ones, and
        # each core has a worker; the commands tests start inherit the setting.
        import torch

        _process_threads.append(torch.get_num_threads())
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture
def process_threads():
    """The test runs on torch's own thread count for one process, as without xdist."""
    import torch

    if not _process_threads:
        yield
        return
    torch.set_num_threads(_process_threads[0])
    yield
    torch.set_num_threads(1)


def shared_dir(tmp_path_factory, name: str, build: Callable[[Path], Path]) -> Path:
    """`build(empty folder)`'s result, built once per test run.

    In one process that is one call. Under xdist the first worker to ask builds it in the
    run's common temporary folder while a file lock holds the others, which then read what
    it built (the pattern of the pytest-xdist docs). `build` returns a path inside its
    folder; what it builds is read-only to the tests.
    """
    if not XDIST_WORKER:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / "shared"
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed part-way
            folder.mkdir()
            result = build(folder)
            done.write_text(str(result.relative_to(folder)))
        return folder / done.read_text()


@pytest.fixture(scope="session")
def avatars16(tmp_path_factory) -> Path:
    """24 built-in avatars at 16 px (rendered once per test session)."""
    from animeddim.datasets import generate_avatars

    return shared_dir(
        tmp_path_factory,
        "avatars16",
        lambda out: generate_avatars(out, n=24, size=16, seed=0, workers=1),
    )


def tiny_config(data: Path, **train):
    from animeddim.config import RunConfig

    return RunConfig.from_dict(
        {
            "data": {"path": str(data), "val_fraction": 0.25},
            "model": TINY_MODEL,
            "train": {"batch_size": 6, "kid": False, "precision": "fp32", **train},
        }
    ).validate()


@pytest.fixture(scope="session")
def trained_tiny(avatars16, tmp_path_factory) -> Path:
    """`tiny_config(avatars16, epochs=2)` trained once per session. Read-only: a test that
    writes into a run folder takes its own copy (`copy_run`)."""
    from animeddim.train import train

    def build(out: Path) -> Path:
        train(tiny_config(avatars16, epochs=2), out / "tiny", progress=False, log=lambda s: None)
        return out / "tiny"

    return shared_dir(tmp_path_factory, "trained", build)


def copy_run(run: Path, dst: Path) -> Path:
    """A copy of run folder `run` at `dst` (a run folder holds no path of its own)."""
    shutil.copytree(run, dst)
    return dst


class UnoptimisedInception:
    """The real FID Inception, run without TorchScript's graph optimisations.

    The optimising executor re-specialises the graph for every new batch shape (seconds
    each on a CPU), which tests -- many tiny batches of changing sizes -- pay over and over;
    the features are bitwise the same (test_metrics checks it).
    """

    def __init__(self, inner) -> None:
        self.inner = inner
        self.cache_token, self.weights_id = inner.cache_token, inner.weights_id

    def features(self, images_u8, protocol, batch_size=64, bf16=False):
        import torch

        with torch.jit.optimized_execution(False):
            return self.inner.features(images_u8, protocol, batch_size, bf16)


@pytest.fixture(scope="session")
def fast_inception() -> UnoptimisedInception | None:
    """One real Inception extractor per session (`UnoptimisedInception`); None without the
    weights."""
    from animeddim import metrics

    try:
        return UnoptimisedInception(metrics.InceptionFeatures(metrics.find_inception_weights()))
    except metrics.InceptionWeightsMissing:
        return None


def run_cli(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m animeddim ARGS` the way a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "animeddim", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def run_here(*args: str, check: bool = True, timeout: float | None = None):
    """`animeddim ARGS` through `cli.main` in this process, as `run_cli` returns it.

    For tests of what a command does rather than of its process: no interpreter and torch
    start-up per call. Each command family keeps tests that start a real process too.
    """
    import contextlib
    import io
    import warnings

    from animeddim import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        with warnings.catch_warnings():  # the interpreter's own filters, not pytest's
            warnings.simplefilter("default")
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning):
                warnings.simplefilter("ignore", quiet)
            warnings.simplefilter("ignore", ResourceWarning)
            rc = _main_exit_code(cli.main, [str(a) for a in args])
    p = subprocess.CompletedProcess(["animeddim", *args], rc, out.getvalue(), err.getvalue())
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def _main_exit_code(main: Callable[[list[str]], int], argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse: --help, usage errors
        return e.code if isinstance(e.code, int) else int(e.code is not None)


COLOURS = {"red": (200, 40, 40), "blue": (40, 40, 200)}


@pytest.fixture(scope="session")
def cond_data(tmp_path_factory) -> Path:
    """96 labelled 16-px images and their labels.csv: colour (red | blue, the whole image)
    and band (top | bottom: a light band across that third)."""
    return shared_dir(tmp_path_factory, "cond", _cond_images)


def _cond_images(out: Path) -> Path:
    import numpy as np
    from PIL import Image

    root = out / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = ["file,colour,band"]
    for colour, rgb in COLOURS.items():
        for band in ("top", "bottom"):
            for _ in range(24):
                im = np.array(rgb, float)[None, None, :] + rng.normal(0, 10, (16, 16, 3))
                rows_ = slice(0, 6) if band == "top" else slice(10, 16)
                im[rows_] = im[rows_] * 0.3 + 180
                name = f"{len(rows) - 1:03d}.png"
                Image.fromarray(np.clip(im, 0, 255).astype(np.uint8)).save(root / name)
                rows.append(f"{name},{colour},{band}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def cond_run(cond_data, tmp_path_factory) -> Path:
    """A tiny conditional model trained on `cond_data` (96 steps): asked for a colour, it
    draws it; the band it has barely learnt."""
    return shared_dir(tmp_path_factory, "cond_run", lambda out: _train_cond(cond_data, out))


def _train_cond(cond_data: Path, out: Path) -> Path:
    from animeddim.config import RunConfig
    from animeddim.train import train

    cfg = RunConfig.from_dict(
        {
            "data": {"path": str(cond_data), "val_fraction": 0.1},
            "model": TINY_MODEL,
            # The Keras example's MAE, which this 96-step budget was set for: trained with
            # the squared error, the edit tests' reconstruction of a red face came out blue.
            "train": {
                "batch_size": 8,
                "kid": False,
                "precision": "fp32",
                "epochs": 8,
                "loss": "mae",
            },
        }
    )
    cfg.data.labels = str(cond_data / "labels.csv")
    cfg.train.ema_decay, cfg.train.learning_rate = 0.9, 3e-3  # a fast EMA: 96 steps in all
    run = out / "run"
    train(cfg.validate(), run, progress=False, log=lambda s: None)
    return run


@pytest.fixture(scope="session")
def cond_classifier(cond_data, tmp_path_factory) -> Path:
    """A tiny attribute classifier of `cond_data`'s colour and band (16 px), as
    `attributes train` writes one (its held-out accuracy in the file)."""
    return shared_dir(tmp_path_factory, "classifier", lambda out: _classifier(cond_data, out))


def _classifier(cond_data: Path, out: Path) -> Path:
    from animeddim.attributes import (
        ClassifierConfig,
        TrainSettings,
        labelled_folders,
        save_classifier,
        train_classifier,
    )

    images, codes, vocab = labelled_folders([cond_data], 16)
    net, summary = train_classifier(
        images,
        codes,
        vocab,
        config=ClassifierConfig(image_size=16, widths=(8, 16), final_stride=1),
        settings=TrainSettings(epochs=6, batch_size=16, val_fraction=0.25, blur=0.0),
    )
    return save_classifier(out / "classifier.safetensors", net, {"training": summary})


@pytest.fixture(scope="session")
def web_runs(trained_tiny, cond_run, tmp_path_factory) -> Path:
    """A runs folder for the web app: a tiny trained run ('tiny'), one without a checkpoint
    ('empty'), a copy of 'tiny' whose config.json names attributes ('labelled') and the
    conditional `cond_run` ('colours')."""
    root = tmp_path_factory.mktemp("webruns")
    copy_run(trained_tiny, root / "tiny")
    (root / "empty").mkdir()
    (root / "empty" / "config.json").write_text("{}")
    # the same run, as a conditional model's folder would describe itself
    import json

    shutil.copytree(root / "tiny", root / "labelled")
    cfg = json.loads((root / "labelled" / "config.json").read_text())
    cfg["model"]["vocabulary"] = {"hair_color": ["black", "red"], "glasses": ["no", "yes"]}
    (root / "labelled" / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(cond_run, root / "colours")  # a conditional model
    return root


@pytest.fixture(scope="session")
def web_server(web_runs):
    """`animeddim serve --runs RUNS --port 0`, as a user starts it; yields its address."""
    pytest.importorskip("starlette", reason="the web extra is not installed: pip install '.[web]'")
    import queue
    import signal
    import threading

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "animeddim", "serve", "--runs", str(web_runs), "--port", "0"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for x in proc.stdout:
            lines.put(x)
        lines.put(None)  # the server ended

    threading.Thread(target=pump, daemon=True).start()
    url, seen = None, []
    while url is None:
        try:
            line = lines.get(timeout=180)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if "ready at " in line:
            url = line.split("ready at ", 1)[1].split()[0]
    if url is None:
        proc.kill()
        raise AssertionError("animeddim serve did not get ready:\n" + "".join(seen))
    url = url.rstrip("/")
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """`animeddim.cli.main` in this process: (exit code, stdout, stderr); argparse exits count."""
    from animeddim import cli

    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err
