"""`animeddim demo`: the whole pipeline on the built-in avatars, in minutes on a laptop CPU.

1. renders avatars (a training set, and a held-out set with seeds never used in training),
2. samples a grid from the shipped avatars-64 model,
3. evaluates it (standard KID/FID and paper KID) against the held-out avatars,
4. runs a short training on the built-in avatars,
5. writes the paper's report (figures and tables) for the shipped model and the short run,
and prints where everything is.
"""

from __future__ import annotations

import json
import shutil
import time
from importlib.resources import files
from pathlib import Path

from .checkpoint import load_model
from .pretrained import pretrained_path
from .runtime import resolve_device, resolve_precision

TRAIN_SEED, EVAL_SEED = 0, 1  # avatar seeds: the held-out set never overlaps training


def _step(msg: str) -> float:
    print(f"\n== {msg}", flush=True)
    return time.perf_counter()


def _shipped_run_folder(out: Path, reference_src: Path) -> Path:
    """A run folder for the shipped model (config, its training metrics, weights), so the
    report can show it beside the short run."""
    run = out / "avatars-64-model"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    weights = pretrained_path("avatars-64")
    shutil.copyfile(weights, run / "checkpoints" / "last.safetensors")
    model_dir = files("animeddim").joinpath("models")
    for name, dest in (
        ("avatars-64.config.json", "config.json"),
        ("avatars-64.metrics.csv", "metrics.csv"),
    ):
        (run / dest).write_bytes(model_dir.joinpath(name).read_bytes())
    if reference_src.exists():
        shutil.copyfile(reference_src, run / "reference.png")
    return run


def run_demo(out: Path, *, train_minutes: float = 3.0, eval_n: int = 300) -> int:
    from . import metrics
    from .datasets import generate_avatars
    from .io import save_grid
    from .pipelines import SampleSettings, draw, evaluate
    from .report import write_report
    from .train import train

    t_all = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device("auto")
    precision = resolve_precision("auto", device)
    print(f"animeddim demo: device {device}, precision {precision}, output in {out}")

    t = _step("1/5 rendering built-in DiceBear 'adventurer' avatars (CC BY 4.0, see CREDITS.md)")
    train_data = generate_avatars(
        out / "avatars-train", n=2000, size=64, seed=TRAIN_SEED, progress=True
    )
    held_out = generate_avatars(
        out / "avatars-heldout", n=2 * eval_n, size=64, seed=EVAL_SEED, progress=True
    )
    print(f"   {time.perf_counter() - t:.0f}s")

    t = _step("2/5 sampling a grid from the shipped avatars-64 model (20 DDIM steps)")
    loaded = load_model(pretrained_path("avatars-64"), device)
    settings = SampleSettings(steps=20, seed=0, device=device, precision=precision)
    grid = out / "avatars-64-grid.png"
    save_grid(draw(loaded, 64, settings), grid, cols=8)
    print(f"   {grid} ({time.perf_counter() - t:.0f}s)")

    t = _step(
        f"3/5 evaluating the shipped model: {eval_n} samples vs {2 * eval_n} held-out avatars"
    )
    shipped_run = _shipped_run_folder(out, out / "short-run" / "reference.png")
    ev = None
    try:
        extractor = metrics.InceptionFeatures(device=device)
    except metrics.InceptionWeightsMissing as e:
        print(f"   skipped: {e}")
    else:
        ev = evaluate(
            loaded,
            held_out,
            n=eval_n,
            settings=settings,
            extractor=extractor,
            out=shipped_run / "eval-demo.json",
        )
        print(
            f"   KID (standard protocol) {ev['kid_mean']:.4f} ± {ev['kid_std']:.4f}, "
            f"FID {ev['fid']:.2f}; KID (paper protocol) {ev['paper']['kid']:.4f} "
            f"({time.perf_counter() - t:.0f}s)"
        )

    t = _step(f"4/5 a short training run ({train_minutes:g} min) on the built-in avatars")
    run = out / "short-run"
    if (run / "config.json").exists():
        shutil.rmtree(run)  # the demo always starts its short run afresh
    from .config import RunConfig

    cfg = RunConfig.from_dict(
        {
            "data": {"path": str(train_data)},
            "train": {
                "epochs": 100,
                "time_limit_minutes": train_minutes,
                "kid_images": 128,
                "log_every": 5,
            },
        }
    ).validate()
    train(cfg, run, progress=True)
    shutil.copyfile(run / "reference.png", shipped_run / "reference.png")
    print(f"   {time.perf_counter() - t:.0f}s")

    t = _step("5/5 writing the report (Fig. 1, 3, 4; Tables I and II)")
    page = write_report([shipped_run, run], out / "report", device=device)
    print(f"   {time.perf_counter() - t:.0f}s")

    summary = {
        "grid": str(grid),
        "report": str(page),
        "report_html": str(page.with_suffix(".html")),
        "short_run": str(run),
        "evaluation": ev,
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ndone in {summary['seconds']:.0f}s")
    print(f"sample grid (shipped model): {grid}")
    print(f"report: {page.with_suffix('.html')} (and {page})")
    print(f"short training run: {run}")
    return 0
