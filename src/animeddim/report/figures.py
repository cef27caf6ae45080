"""Fig. 1 (forward and reverse diffusion), Fig. 3 (KID), Fig. 4 (losses) and the steps plot,
drawn with matplotlib's object API (no pyplot, no global backend)."""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ScheduleConfig
from ..io import write_bytes_atomic
from ..run_folder import RunFiles
from ..words import counted
from .tables import Table, cell_text

FORWARD_TIMES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)  # Fig. 1 forward-process times
REVERSE_COLUMNS = 7  # reverse steps shown in Fig. 1 (first and last always included)


def save_figure(fig, path: Path, dpi: float | None = None) -> None:
    """A matplotlib figure as a PNG, written atomically like every other output."""
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_bytes_atomic(path, buf.getvalue())


def _figure(width: float, height: float):
    """A matplotlib Figure not attached to pyplot (Agg renders it on savefig)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _show(ax, image_u8: np.ndarray) -> None:
    """Draw one [H x W x C] uint8 image, pixels as squares (16-px images stay readable)."""
    gray = image_u8.shape[-1] == 1
    ax.imshow(
        image_u8[..., 0] if gray else image_u8,
        cmap="gray" if gray else None,
        vmin=0,
        vmax=255,
        interpolation="nearest",
    )
    ax.set_xticks([])
    ax.set_yticks([])


def plot_image_rows(
    path: Path,
    rows: Sequence[Sequence[np.ndarray]],
    col_titles: Sequence[str],
    row_labels: Sequence[str],
    title: str,
) -> None:
    """Save a grid of images with a title above each column and a label left of each row."""
    nrows, ncols = len(rows), len(rows[0])
    fig = _figure(1.45 * ncols + 0.4, 1.55 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            _show(axes[r][c], image)
            if r == 0:
                axes[r][c].set_title(col_titles[c], fontsize=8)
        axes[r][0].set_ylabel(row_labels[r], fontsize=9)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def first_reference_image(path: Path, channels: int) -> np.ndarray:
    """The first image of reference.png (images side by side, each as tall as the strip)."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    a = a[..., None] if a.ndim == 2 else a
    return np.ascontiguousarray(a[:, : a.shape[0]])


def _normalise(image_u8: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [H x W x C] -> normalised float [1 x C x H x W], as training saw it."""
    x = torch.from_numpy(image_u8).permute(2, 0, 1).float().div(255.0)
    return ((x - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)).unsqueeze(0)


def plot_forward(
    path: Path,
    image_u8: np.ndarray,
    mean: torch.Tensor,
    std: torch.Tensor,
    schedule: ScheduleConfig,
    seed: int,
) -> None:
    """Fig. 1 (forward): x_t = signal_rate x_0 + noise_rate eps at FORWARD_TIMES, one eps."""
    from ..diffusion.generation import denormalize
    from ..diffusion.schedule import diffuse

    x0 = _normalise(image_u8, mean, std)
    n = len(FORWARD_TIMES)
    # One eps for every t, so the strip shows a single forward trajectory of the image.
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor(FORWARD_TIMES, dtype=torch.float64)
    x_t, signal_rate, noise_rate = diffuse(
        x0.expand(n, -1, -1, -1), noise.expand(n, -1, -1, -1), t, schedule
    )
    shown = denormalize(x_t, mean, std).numpy()
    titles = ["x_0 (clean)"] + [
        f"t = {tv:g}\nsignal {float(s):.2f}\nnoise {float(nr):.2f}"
        for tv, s, nr in zip(FORWARD_TIMES, signal_rate.view(-1), noise_rate.view(-1), strict=True)
    ]
    plot_image_rows(path, [[image_u8, *shown]], titles, ["x_t"], "Forward diffusion")


@torch.no_grad()
def plot_reverse(
    path: Path,
    loaded: Any,
    steps: int,
    seed: int,
    device: torch.device | str,
    progress: Any = None,
) -> None:
    """Fig. 1 (reverse): DDIM from noise; x_t entering each shown step and its predicted x_0.

    :param loaded: a `checkpoint.LoadedModel` (EMA network, normalisation, schedule).
    :param progress: a `pipelines.Progress`, told ("trajectory", evaluations done, steps).
    """
    from ..pipelines import SampleSettings, reverse_steps

    # Image 0 of `seed`, unclipped DDIM at eta 0 in fp32: the same noise and the same
    # process as `animeddim sample --seed SEED --steps STEPS --precision fp32`.
    settings = SampleSettings(steps=steps, seed=seed, device=device, clip=False)
    r = reverse_steps(loaded, settings=settings, n=1, columns=REVERSE_COLUMNS, progress=progress)
    titles = [f"step {k + 1}/{steps}\nt = {t:.3g}" for k, t in zip(r.steps, r.times, strict=True)]
    labels = ["x_t", "predicted x_0"]
    title = f"Reverse diffusion (DDIM, {counted(steps, 'step')}, eta = 0)"
    plot_image_rows(
        path, [list(r.noisy[0].numpy()), list(r.pred[0].numpy())], titles, labels, title
    )


def _colour(i: int) -> str:
    return f"C{i % 10}"  # matplotlib's default cycle: the same run has one colour in all plots


def _epochs(rows: Sequence[dict[str, float | None]], key: str) -> tuple[list[float], list[float]]:
    pairs = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _integer_epochs(ax) -> None:
    """Epoch axis with whole-number ticks only (a 3-epoch run would otherwise show 1.25, ...)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def plot_kid(path: Path, runs: Sequence[RunFiles]) -> None:
    """Fig. 3: per-epoch KID (paper protocol), one line per run that has KID values."""
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    for i, run in enumerate(runs):
        if run.has_kid:
            ax.plot(*_epochs(run.rows, "kid"), marker="o", color=_colour(i), label=run.name)
    _integer_epochs(ax)
    ax.set_ylabel("KID (paper protocol)")
    ax.set_title("KID versus epochs")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_standard_kid(path: Path, runs: Sequence[RunFiles]) -> None:
    """The standard KID measured while training (`train --eval-every`), one line per run that
    has it; the paper's Fig. 3 shows the paper-protocol KID."""
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    for i, run in enumerate(runs):
        if run.has_standard_kid:
            points = _epochs(run.rows, "standard_kid")
            ax.plot(*points, marker="o", color=_colour(i), label=run.name)
    _integer_epochs(ax)
    ax.set_ylabel("KID (standard protocol)")
    ax.set_title("Standard KID during training")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_losses(path: Path, runs: Sequence[RunFiles]) -> None:
    """Fig. 4: (a) noise loss, (b) image loss; solid train, dashed validation, colour per run."""
    fig = _figure(11.0, 4.0)
    panels = fig.subplots(1, 2)
    for ax, kind, letter in zip(panels, ("noise", "image"), "ab", strict=True):
        for i, run in enumerate(runs):
            ax.plot(
                *_epochs(run.rows, f"train_{kind}_loss"),
                color=_colour(i),
                linestyle="-",
                marker=".",
                label=f"{run.name} train",
            )
            if run.has_val:
                ax.plot(
                    *_epochs(run.rows, f"val_{kind}_loss"),
                    color=_colour(i),
                    linestyle="--",
                    marker=".",
                    label=f"{run.name} validation",
                )
        _integer_epochs(ax)
        ax.set_ylabel(f"{kind} loss (" + ("the run's --loss" if kind == "noise" else "MAE") + ")")
        ax.set_title(f"({letter}) Train and validation {kind} loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_steps(path: Path, table: Table) -> None:
    """KID vs sampling steps, one line (with KID std as error bars) per (run, sampler, eta)."""
    groups: dict[tuple[str, Any, Any], list[tuple[int, float, float | None]]] = {}
    for run, sampler, eta, steps, kid, kid_std, _ in table.rows:
        if steps is not None and kid is not None:
            groups.setdefault((run, sampler, eta), []).append((steps, kid, kid_std))
    several_runs = len({g[0] for g in groups}) > 1
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    for i, ((run, sampler, eta), pts) in enumerate(sorted(groups.items(), key=str)):
        pts.sort()
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        err = [p[2] or 0.0 for p in pts] if any(p[2] is not None for p in pts) else None
        label = f"{sampler or 'ddim'}, eta = {cell_text(eta)}"
        ax.errorbar(
            xs,
            ys,
            yerr=err,
            marker="o",
            capsize=3,
            color=_colour(i),
            label=f"{run}: {label}" if several_runs else label,
        )
    steps_seen = sorted({r[3] for r in table.rows if r[3]})
    if steps_seen and max(steps_seen) >= 10 * min(steps_seen):
        ax.set_xscale("log")  # steps studies usually double: equal spacing per doubling
        ax.minorticks_off()
    if steps_seen:  # ticks at the measured step counts, printed as plain integers
        ax.set_xticks(steps_seen, labels=[str(s) for s in steps_seen])
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("KID")
    ax.set_title("KID versus sampling steps")
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=8)
    save_figure(fig, path)
