"""Where the training loop waits for the GPU: a short run under CUDA's sync debug mode.

    python benchmarks/sync_check.py --data DIR [--batch-size 1024] [--steps 40]
        [--compile-mode reduce-overhead] [--out syncs.json]

Trains configs/avatars-64.json from scratch for --steps optimiser steps (data on the device,
no KID, progress read once at the end) with `torch.cuda.set_sync_debug_mode("warn")`, and
counts each synchronising call by the animeddim line it came from. A line counted about once
per step is a host sync in the step itself (the loop should have none); the setup, the compile
trial and the final checkpoint account for the rest. On a machine without CUDA the mode does
nothing and the report is empty.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import traceback
import warnings
from pathlib import Path

import torch

from animeddim.config import RunConfig
from animeddim.config_files import load_config_file, merge
from animeddim.train import train

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--compile-mode", default="reduce-overhead")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="")
    a = p.parse_args()
    overrides = {
        "data": {"path": a.data},
        "train": {
            "batch_size": a.batch_size,
            "max_steps": a.steps,
            "epochs": 1000,
            "time_limit_minutes": 0,
            "log_every": 10**6,
            "kid": False,
            "data_on_device": "yes",
            "compile_mode": a.compile_mode,
            "device": a.device,
        },
    }
    cfg = RunConfig.from_dict(merge(load_config_file(REPO / "configs/avatars-64.json"), overrides))
    counts: collections.Counter[str] = collections.Counter()

    show = warnings.showwarning  # other warnings (an eager fall-back) are shown as usual

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing" not in str(message):
            show(message, category, filename, lineno, file, line)
            return
        ours = [f for f in traceback.extract_stack() if "/animeddim/" in f.filename]
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].line}" if ours else "?"
        counts[where] += 1

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
        train(cfg, Path(tmp) / "run", progress=False, log=lambda s: None)
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
    report = {"steps": a.steps, "syncs": dict(counts.most_common())}
    for where, n in counts.most_common():
        print(f"{n:6d}  {where}")
    print(f"{sum(counts.values())} synchronising calls in a {a.steps}-step run")
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
