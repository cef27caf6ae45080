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
            "data": {"path": str(data), "image_size": 16, "val_fraction": 0.25},
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
