"""`animeddim tour` (alias `demo`): the whole pipeline on the built-in avatars, in minutes.

1. renders avatars (a training set, and a held-out set with seeds never used in training),
2. samples a grid from the shipped avatars-64 model,
3. evaluates it (standard KID/FID and paper KID) against the held-out avatars,
4. runs a short training on the built-in avatars,
5. writes the paper's report (figures and tables) for the shipped model and the short run,
and prints where everything is.

The tour sizes itself to the machine: it first times the shipped model's sampling and one
training step, then picks the sampler, the number of evaluation samples and the size of the
short training so that the whole tour takes about ten minutes or less, and says what it
scaled and why. `quick=True` is a seconds-long version on tiny settings (for tests).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

from ..checkpoint import load_model
from ..io import write_bytes_atomic, write_text_atomic
from ..pretrained import pretrained_path
from ..runtime import autocast, resolve_device, resolve_precision
from ..words import counted

TRAIN_SEED, EVAL_SEED = 0, 1  # avatar seeds: the held-out set never overlaps training
EVAL_BUDGET_S = 150.0  # sampling seconds the evaluation may take
EPOCH_BUDGET_S = 60.0  # one epoch of the short run (the time limit ends it at an epoch end)
TINY_MODEL = {"image_size": 16, "widths": [8, 16], "block_depth": 1, "embedding_dims": 8}


@dataclass
class TourPlan:
    """What the tour does; `scaled` says what differs from the full tour and why."""

    train_avatars: int = 2000
    avatar_size: int = 64
    eval_n: int = 300
    sampler: str = "ddim"
    steps: int = 20
    grid_n: int = 64
    train_minutes: float = 3.0
    kid_images: int = 128
    report_steps: int = 20
    train: dict[str, Any] = field(default_factory=dict)  # extra train settings
    model: dict[str, Any] = field(default_factory=dict)  # network settings (default: 64 px)
    scaled: list[str] = field(default_factory=list)


def quick_plan() -> TourPlan:
    """Seconds instead of minutes: tiny data, a tiny network, two sampling steps."""
    return TourPlan(
        train_avatars=48,
        avatar_size=16,
        eval_n=10,
        sampler="dpmpp-2m",
        steps=2,
        grid_n=8,
        train_minutes=0.0,
        kid_images=8,
        report_steps=2,
        train={"batch_size": 16, "kid": False, "epochs": 1},  # one epoch: 2 steps
        model=dict(TINY_MODEL),
        scaled=["quick mode: tiny data and network, 2 sampling steps"],
    )


def plan_for(sample_rate: float, train_rate: float, train_minutes: float, eval_n: int) -> TourPlan:
    """The tour's settings for a machine that samples `sample_rate` image-steps/s with the
    shipped model and trains `train_rate` images/s (64 px, default network)."""
    p = TourPlan(train_minutes=train_minutes, eval_n=eval_n)
    if p.eval_n * p.steps / sample_rate > EVAL_BUDGET_S:
        # DPM-Solver++(2M) at 10 steps ties DDIM at 20 on the shipped model (docs/sampling.md).
        p.sampler, p.steps = "dpmpp-2m", 10
        p.scaled.append(
            f"sampling with DPM-Solver++(2M), 10 steps, instead of DDIM, 20 steps: this machine "
            f"samples {sample_rate:.0f} image-steps/s"
        )
    fits = int(EVAL_BUDGET_S * sample_rate / p.steps) // 50 * 50
    if fits < p.eval_n:
        p.eval_n = max(100, fits)
        p.scaled.append(
            f"{p.eval_n} evaluation samples instead of {eval_n}, to sample in about "
            f"{EVAL_BUDGET_S:.0f}s (KID/FID from fewer samples are noisier)"
        )
    epoch_images = int(EPOCH_BUDGET_S * train_rate)
    if epoch_images < 0.8 * p.train_avatars:  # 80% of the avatars are the training split
        # The time limit ends the run at an epoch end and the report needs one: epochs short.
        p.train_avatars = max(128, math.ceil(epoch_images / 0.8 / 64) * 64)
        p.kid_images = 64
        p.scaled.append(
            f"short run on {p.train_avatars} avatars instead of 2000 (per-epoch KID on 64): "
            f"this machine trains {train_rate:.1f} images/s, so an epoch takes about "
            f"{0.8 * p.train_avatars / train_rate:.0f}s"
        )
    return p


def measure(loaded, settings, device, precision: str) -> tuple[float, float]:
    """Image-steps/s of the shipped model's sampling and images/s of one training step."""
    import torch

    from ..config import RunConfig
    from ..pipelines import draw, sampling_net
    from ..train import losses
    from ..unet import UNet

    s = replace(settings, steps=2)
    net = sampling_net(loaded, s, 32)
    draw(loaded, 8, replace(s, steps=1), net=net)  # warm-up
    t = time.perf_counter()
    draw(loaded, 16, s, net=net)
    sample_rate = 32 / (time.perf_counter() - t)

    cfg = RunConfig()
    model = UNet(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(8, 3, 64, 64, device=device)
    ctx = autocast(device, precision)
    times = []
    for _ in range(2):  # the first is the warm-up
        t = time.perf_counter()
        t_ = torch.rand(8, device=device, dtype=torch.float64)
        loss, _ = losses(model, x, torch.randn_like(x), t_, cfg, ctx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return sample_rate, 8 / times[-1]


def _step(msg: str) -> float:
    print(f"\n== {msg}", flush=True)
    return time.perf_counter()


def _shipped_run_folder(out: Path, reference_src: Path) -> Path:
    """A run folder for the shipped model (config, its training metrics, weights), so the
    report can show it beside the short run."""
    run = out / "avatars-64-model"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    # each file whole or not at all (a full disk leaves no half checkpoint for the report)
    weights = pretrained_path("avatars-64")
    write_bytes_atomic(run / "checkpoints" / "last.safetensors", weights.read_bytes())
    model_dir = files("animeddim").joinpath("models")
    for name, dest in (
        ("avatars-64.config.json", "config.json"),
        ("avatars-64.metrics.csv", "metrics.csv"),
    ):
        write_bytes_atomic(run / dest, model_dir.joinpath(name).read_bytes())
    if reference_src.exists():
        write_bytes_atomic(run / "reference.png", reference_src.read_bytes())
    return run


def run_tour(
    out: Path, *, train_minutes: float = 3.0, eval_n: int = 300, quick: bool = False
) -> int:
    """Run the tour into `out`; return the exit code.

    :raises ConfigError: `train_minutes` not a finite number > 0 (0 would be training's "no
        limit": 100 epochs; nan, inf or < 0 failed only at the training step, minutes in),
        or `out` an existing file.
    """
    from ..config import ConfigError
    from ..pipelines import SampleSettings

    if not (math.isfinite(train_minutes) and train_minutes > 0):
        raise ConfigError(f"--train-minutes must be a number > 0, got {train_minutes:g}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder")
    t_all = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device("auto")
    precision = resolve_precision("auto", device)
    print(f"animeddim tour: device {device}, precision {precision}, output in {out}")
    loaded = load_model(pretrained_path("avatars-64"), device)
    settings = SampleSettings(steps=20, seed=0, device=device, precision=precision)
    if quick:
        plan = quick_plan()
    else:
        t = _step("0/5 timing this machine (sampling and one training step)")
        sample_rate, train_rate = measure(loaded, settings, device, precision)
        plan = plan_for(sample_rate, train_rate, train_minutes, eval_n)
        print(
            f"   {sample_rate:.0f} image-steps/s sampling, {train_rate:.0f} images/s training "
            f"({time.perf_counter() - t:.0f}s)"
        )
    for line in plan.scaled or ["nothing scaled down: this machine runs the full tour"]:
        print(f"   scaled: {line}" if plan.scaled else f"   {line}")
    settings = replace(settings, sampler=plan.sampler, steps=plan.steps)
    train_data, held_out = _avatars(out, plan)
    grid = _grid(out, loaded, settings, plan)
    shipped_run = _shipped_run_folder(out, out / "short-run" / "reference.png")
    ev = _evaluate(loaded, held_out, settings, plan, shipped_run, device)
    run = _short_run(out, train_data, plan, shipped_run)

    from ..report import write_report

    t = _step("5/5 writing the report (Fig. 1, 3, 4; Tables I and II)")
    page = write_report([shipped_run, run], out / "report", device=device, steps=plan.report_steps)
    print(f"   {time.perf_counter() - t:.0f}s")
    summary = {
        "grid": str(grid),
        "report": str(page),
        "report_html": str(page.with_suffix(".html")),
        "short_run": str(run),
        "evaluation": ev,
        "plan": asdict(plan),
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    write_text_atomic(out / "demo-summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"\ndone in {summary['seconds']:.0f}s")
    print(f"sample grid (shipped model): {grid}")
    print(f"report: {page.with_suffix('.html')} (and {page})")
    print(f"short training run: {run}")
    return 0


def _avatars(out: Path, plan: TourPlan) -> tuple[Path, Path]:
    from ..datasets import generate_avatars

    t = _step("1/5 rendering built-in DiceBear 'adventurer' avatars (CC BY 4.0, see CREDITS.md)")
    size = plan.avatar_size
    train_dir = out / f"avatars-train-{plan.train_avatars}-{size}px"
    held_dir = out / f"avatars-heldout-{2 * plan.eval_n}-{size}px"
    train_data = generate_avatars(
        train_dir, n=plan.train_avatars, size=size, seed=TRAIN_SEED, progress=True
    )
    held_out = generate_avatars(
        held_dir, n=2 * plan.eval_n, size=size, seed=EVAL_SEED, progress=True
    )
    print(f"   {time.perf_counter() - t:.0f}s")
    return train_data, held_out


def _grid(out: Path, loaded, settings, plan: TourPlan) -> Path:
    from ..io import save_grid
    from ..pipelines import draw

    t = _step(f"2/5 sampling a grid from the shipped avatars-64 model ({_sampler(plan)})")
    grid = out / "avatars-64-grid.png"
    save_grid(draw(loaded, plan.grid_n, settings), grid, cols=8)
    print(f"   {grid} ({time.perf_counter() - t:.0f}s)")
    return grid


def _sampler(plan: TourPlan) -> str:
    name = "DDIM" if plan.sampler == "ddim" else "DPM-Solver++(2M)"
    return counted(plan.steps, f"{name} step")


def _evaluate(loaded, held_out: Path, settings, plan: TourPlan, shipped_run: Path, device):
    from .. import metrics
    from ..pipelines import evaluate

    t = _step(
        f"3/5 evaluating the shipped model: {counted(plan.eval_n, 'sample')} ({_sampler(plan)}) vs "
        f"{2 * plan.eval_n} held-out avatars"
    )
    try:
        extractor = metrics.InceptionFeatures(device=device)
    except metrics.InceptionWeightsMissing as e:
        print(f"   skipped: {e}")
        return None
    ev = evaluate(
        loaded,
        held_out,
        n=plan.eval_n,
        settings=settings,
        extractor=extractor,
        out=shipped_run / "eval-demo.json",
    )
    print(
        f"   KID (standard protocol) {ev['kid_mean']:.4f} ± {ev['kid_std']:.4f}, "
        f"FID {ev['fid']:.2f}; KID (paper protocol) {ev['paper']['kid']:.4f} "
        f"({time.perf_counter() - t:.0f}s)"
    )
    return ev


def _short_run(out: Path, train_data: Path, plan: TourPlan, shipped_run: Path) -> Path:
    from ..config import RunConfig
    from ..train import train

    length = f"{plan.train_minutes:g} min" if plan.train_minutes else "a few steps"
    t = _step(f"4/5 a short training run ({length}) on {plan.train_avatars} built-in avatars")
    run = out / "short-run"
    if (run / "config.json").exists():
        shutil.rmtree(run)  # the tour always starts its short run afresh
    train_settings = {
        "epochs": 100,
        "time_limit_minutes": plan.train_minutes,
        "kid_images": plan.kid_images,
        "log_every": 5,
        # A run of minutes: with the constant decay its EMA network would still be mostly
        # the random start (docs/coverage.md, "The EMA warm-up": at 3,500 steps
        # its KID was 0.34 with the constant decay, 0.065 with the warm-up).
        "ema_warmup": True,
        **plan.train,
    }
    cfg = RunConfig.from_dict(
        {"data": {"path": str(train_data)}, "model": plan.model, "train": train_settings}
    ).validate()
    train(cfg, run, progress=True)
    if (run / "reference.png").exists():
        write_bytes_atomic(shipped_run / "reference.png", (run / "reference.png").read_bytes())
    print(f"   {time.perf_counter() - t:.0f}s")
    return run
