"""Shared tiny fixtures: a few 16-px avatars and a tiny network config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY_MODEL = {"image_size": 16, "widths": [8, 16], "block_depth": 1, "embedding_dims": 8}


@pytest.fixture(scope="session")
def avatars16(tmp_path_factory) -> Path:
    """24 built-in avatars at 16 px (rendered once per test session)."""
    from animeddim.datasets import generate_avatars

    out = tmp_path_factory.mktemp("avatars16")
    return generate_avatars(out, n=24, size=16, seed=0, workers=1)


def tiny_config(data: Path, **train):
    from animeddim.config import RunConfig

    return RunConfig.from_dict(
        {
            "data": {"path": str(data), "val_fraction": 0.25},
            "model": TINY_MODEL,
            "train": {"batch_size": 6, "kid": False, "precision": "fp32", **train},
        }
    ).validate()


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


@pytest.fixture(scope="session")
def web_runs(avatars16, tmp_path_factory) -> Path:
    """A runs folder for the web app: a tiny trained run ('tiny'), one without a checkpoint
    ('empty') and a copy of 'tiny' whose config.json names attributes ('labelled')."""
    from animeddim.train import train

    root = tmp_path_factory.mktemp("webruns")
    train(tiny_config(avatars16, epochs=2), root / "tiny", progress=False, log=lambda s: None)
    (root / "empty").mkdir()
    (root / "empty" / "config.json").write_text("{}")
    # the same run, as a conditional model's folder would describe itself
    import json
    import shutil

    shutil.copytree(root / "tiny", root / "labelled")
    cfg = json.loads((root / "labelled" / "config.json").read_text())
    cfg["model"]["vocabulary"] = {"hair_color": ["black", "red"], "glasses": ["no", "yes"]}
    (root / "labelled" / "config.json").write_text(json.dumps(cfg))
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
