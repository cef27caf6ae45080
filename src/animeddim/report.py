"""Figures and tables of the paper, made from run folders on disk only.

`write_report` reads what `animeddim train` (and `evaluate`, and a steps study) left in
each run folder -- config.json, metrics.csv, reference.png, samples/, eval-*.json,
steps.csv, checkpoints/last.safetensors -- and writes the paper's Fig. 1, 3 and 4 and
Tables I and II next to a Markdown page and a self-contained HTML page. It never
touches live training state: what a report shows is what is on disk.

Every number travels with its protocol: the per-epoch KID in metrics.csv is the paper
(Keras-example) protocol, eval-*.json files name their own protocol, and the losses are
mean absolute errors, so the page says which is which beside each table and figure.

Figures are drawn with matplotlib's object API (`matplotlib.figure.Figure`, rendered by
the Agg canvas when saved to PNG): no pyplot, so no global backend is selected or
switched, nothing needs a display, and importing this module imports no matplotlib.
"""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO, StringIO
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ScheduleConfig
from .io import write_bytes_atomic, write_text_atomic
from .run_folder import DASH, RunFiles, RunFolderError, number_or_none, read_run, unique_names

FORWARD_TIMES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)  # Fig. 1 forward-process times
REVERSE_COLUMNS = 7  # reverse steps shown in Fig. 1 (first and last always included)
SAMPLE_ROWS, SAMPLE_COLS = 4, 8  # sample grid of the EMA network

# Short protocol statements; the long ones come from animeddim.metrics when it imports.
_PAPER_KID = (
    "paper protocol (Keras DDIM example): real validation images vs EMA-network DDIM samples, "
    "bilinear resize to 75 px, InceptionV3 features, unbiased MMD^2 per batch, averaged"
)
_LOSSES = (
    "mean absolute error in normalised image space at seeded noises and uniformly drawn "
    "times t; noise loss |eps - eps_hat|, image loss |x_0 - x0_hat|"
)


ReportError = RunFolderError  # a run folder cannot be reported on; the message says why


# ----------------------------------------------------------------------------------------------
# Tables: one value model, three renderings (Markdown, CSV, HTML)


@dataclass
class Table:
    """Headers, rows of cells (str, int, float or None) and the caption that states protocols."""

    headers: list[str]
    rows: list[list[Any]]
    caption: str


def cell_text(v: Any) -> str:
    """How a cell prints: None or "" as a dash, floats to 4 significant digits."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return DASH
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def to_markdown(table: Table) -> str:
    """Caption paragraph, then a GitHub-flavoured Markdown table."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [table.caption, "", line(table.headers), line(["---"] * len(table.headers))]
    out += [line([cell_text(v) for v in row]) for row in table.rows]
    return "\n".join(out) + "\n"


def write_csv(table: Table, path: Path) -> None:
    """Full-precision values; missing ones are empty cells so numeric readers see NaN."""
    f = StringIO(newline="")
    w = csv.writer(f)
    w.writerow(table.headers)
    for row in table.rows:
        w.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in row])
    write_text_atomic(path, f.getvalue())


def save_figure(fig, path: Path, dpi: float | None = None) -> None:
    """A matplotlib figure as a PNG, written atomically like every other output."""
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_bytes_atomic(path, buf.getvalue())


def to_html(table: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in table.headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(cell_text(v))}</td>" for v in row) + "</tr>"
        for row in table.rows
    )
    return (
        f"<table><caption>{esc(table.caption)}</caption>"
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def _protocol_description(protocol: str) -> str:
    try:  # the metrics module is the source of truth for what a protocol means
        from .metrics import PROTOCOL_DESCRIPTIONS
    except ImportError:  # pragma: no cover - metrics is part of the package
        return protocol
    return PROTOCOL_DESCRIPTIONS.get(protocol, protocol)


def _kid_protocol(run: RunFiles) -> str:
    tc = run.config.train
    images = "all validation images" if tc.kid_images <= 0 else f"{tc.kid_images} validation images"
    return f"{_PAPER_KID}; {tc.kid_steps} DDIM steps, {images}"


def table2(run: RunFiles) -> Table:
    """Paper Table II for one run: per epoch KID (paper protocol) and validation losses."""
    rows = [
        [int(r["epoch"]), r.get("kid"), r.get("val_noise_loss"), r.get("val_image_loss")]
        for r in run.rows
    ]
    caption = (
        f"Table II. Validation results on {run.dataset} (run {run.name}). "
        f"KID: {_kid_protocol(run)}. Noise Loss and Image Loss: validation MAE of the EMA "
        f"network ({_LOSSES})."
    )
    return Table(["Epoch", "KID", "Noise Loss", "Image Loss"], rows, caption)


def _standard_eval(run: RunFiles) -> tuple[str, dict[str, Any]] | None:
    """The newest eval-*.json measured with the standard protocol, if any."""
    for name, ev in reversed(run.evals):
        if ev.get("protocol", "standard") == "standard":
            return name, ev
    return None


def _num(d: dict[str, Any], *keys: str) -> Any:
    """The first of `keys` present in d with a non-null value (older files name n "n_b")."""
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def _eval_cells(ev: dict[str, Any]) -> list[Any]:
    """KID mean, KID std, FID, n, steps and eta of one eval-*.json (None where missing)."""
    return [
        _num(ev, "kid_mean"),
        _num(ev, "kid_std"),
        _num(ev, "fid"),
        _num(ev, "n", "n_b"),
        _num(ev, "steps"),
        _num(ev, "eta"),
    ]


def table1(runs: Sequence[RunFiles]) -> Table:
    """Paper Table I: one row per run, last epoch's numbers and the newest standard eval."""
    rows = []
    for run in runs:
        last = run.rows[-1] if run.rows else {}
        found = _standard_eval(run)
        ev = found[1] if found else {}
        rows.append(
            [
                run.name,
                run.dataset,
                int(last["epoch"]) if last.get("epoch") is not None else None,
                last.get("kid"),
                last.get("val_noise_loss"),
                last.get("val_image_loss"),
                *_eval_cells(ev),
            ]
        )
    caption = (
        "Table I. KID scores on different datasets. Epochs: epochs trained. KID: last epoch, "
        f"{_PAPER_KID}. Noise Loss, Image Loss: last epoch, validation MAE of the EMA network. "
        "KID (standard), KID std, FID: newest eval-*.json of the run with protocol "
        f"'standard' ({_protocol_description('standard')}), from n generated images sampled "
        "with the given DDIM steps and eta."
    )
    headers = ["Run", "Dataset", "Epochs", "KID (paper)", "Noise Loss", "Image Loss"]
    headers += ["KID (standard)", "KID std (standard)", "FID (standard)", "n", "Steps", "eta"]
    return Table(headers, rows, caption)


def _table1_display(t: Table) -> Table:
    """Table I for reading: KID (standard) shown as "mean ± std" in one column."""
    rows = []
    for r in t.rows:
        kid, std = r[6], r[7]
        merged = DASH if kid is None else cell_text(kid) + ("" if std is None else f" ± {std:.2g}")
        rows.append(r[:6] + [merged] + r[8:])
    return Table(t.headers[:6] + ["KID (standard) ± std"] + t.headers[8:], rows, t.caption)


def evals_table(runs: Sequence[RunFiles]) -> Table:
    """Every eval-*.json of every run, each with its own protocol."""
    rows = []
    for run in runs:
        for name, ev in run.evals:
            ckpt = ev.get("checkpoint")
            rows.append(
                [
                    run.name,
                    name,
                    ev.get("protocol"),
                    *_eval_cells(ev),
                    Path(ckpt).name if isinstance(ckpt, str) else ckpt,
                    _num(ev, "seconds"),
                ]
            )
    protocols = sorted({str(r[2]) for r in rows if r[2]})
    caption = "Evaluations (animeddim evaluate). " + " ".join(
        f"Protocol '{p}': {_protocol_description(p)}." for p in protocols
    )
    headers = ["Run", "File", "Protocol", "KID", "KID std", "FID", "n", "Steps", "eta"]
    return Table(headers + ["Checkpoint", "Seconds"], rows, caption)


def sampler_label(sampler: str | None, clip_x0: object = None) -> str | None:
    """'dpmpp-2m' or 'dpmpp-2m, x0 clipped' (clip_x0 as written to steps.csv: True/'True')."""
    if not sampler:
        return None
    return f"{sampler}, x0 clipped" if str(clip_x0).lower() in ("true", "1") else sampler


def steps_table(runs: Sequence[RunFiles]) -> Table:
    """All steps.csv rows of all runs, with the run's name in front."""
    rows = []
    protocols = set()
    for run in runs:
        for r in run.steps or []:
            protocols.add(r.get("protocol") or "")
            rows.append(
                [
                    run.name,
                    sampler_label(r.get("sampler"), r.get("clip_x0")),
                    number_or_none(r.get("eta")),
                    _int_or_none(r.get("steps")),
                    number_or_none(r.get("kid_mean")),
                    number_or_none(r.get("kid_std")),
                    number_or_none(r.get("seconds_per_image")),
                ]
            )
    named = sorted(p for p in protocols if p)
    if named:
        said = " ".join(f"Protocol '{p}': {_protocol_description(p)}." for p in named)
    else:
        said = "steps.csv records no protocol column; see the study that wrote it."
    caption = f"Sampling steps study (RUN/steps.csv): KID vs DDIM steps. {said}"
    headers = ["Run", "Sampler", "eta", "Steps", "KID", "KID std", "s/image"]
    return Table(headers, rows, caption)


def _int_or_none(s: str | None) -> int | None:
    v = number_or_none(s)
    return None if v is None or not math.isfinite(v) else int(v)


# ----------------------------------------------------------------------------------------------
# Figures


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
    from .diffusion.generation import denormalize
    from .diffusion.schedule import diffuse

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


def _evenly(steps: int, k: int) -> list[int]:
    """Up to k step indices spread over 0 .. steps - 1, first and last included."""
    if steps <= 1 or k <= 1:
        return [steps - 1]
    return sorted({round(i * (steps - 1) / (k - 1)) for i in range(k)})


@torch.no_grad()
def plot_reverse(
    path: Path,
    model: torch.nn.Module,
    mean: torch.Tensor,
    std: torch.Tensor,
    schedule: ScheduleConfig,
    shape: tuple[int, int, int],
    steps: int,
    seed: int,
    device: torch.device | str,
) -> None:
    """Fig. 1 (reverse): DDIM from noise; x_t entering each shown step and its predicted x_0."""
    from .diffusion.generation import denormalize, image_generators
    from .diffusion.samplers import ddim_sample, ddim_times, randn_per_image

    shown = set(_evenly(steps, REVERSE_COLUMNS))
    noisy: list[np.ndarray] = []
    preds: list[np.ndarray] = []
    titles: list[str] = []

    def record(step: int, t: float, noisy_images: torch.Tensor, pred_images: torch.Tensor):
        if step in shown:
            noisy.append(denormalize(noisy_images[:1].float().cpu(), mean, std)[0].numpy())
            preds.append(denormalize(pred_images[:1].float().cpu(), mean, std)[0].numpy())
            titles.append(f"step {step + 1}/{steps}\nt = {t:.3g}")

    # Image 0 of `seed`: the same noise `animeddim sample --seed` would start from.
    noise = randn_per_image(image_generators(seed, [0]), shape, device)
    ddim_sample(model, noise, ddim_times(steps), schedule, callback=record)
    labels = ["x_t", "predicted x_0"]
    title = f"Reverse diffusion (DDIM, {steps} steps, eta = 0)"
    plot_image_rows(path, [noisy, preds], titles, labels, title)


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
        ax.set_ylabel(f"{kind} loss (MAE)")
        ax.set_title(f"({letter}) Train and validation {kind} loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_steps(path: Path, table: Table) -> None:
    """KID vs DDIM steps, one line (with KID std as error bars) per (run, sampler, eta)."""
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
    ax.set_xlabel("DDIM steps")
    ax.set_ylabel("KID")
    ax.set_title("KID versus sampling steps")
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# The page: a list of blocks rendered twice, as Markdown and as HTML

# ("h1" | "h2" | "h3", text) | ("p", text) | ("img", file name, alt text) | ("table", Table)
Block = tuple[Any, ...]


def render_markdown(blocks: Sequence[Block]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})")
        elif kind == "table":
            out.append(to_markdown(b[1]).rstrip("\n"))
    return "\n\n".join(out) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
    "line-height:1.45}img{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}"
    "table{border-collapse:collapse;margin:1em 0}caption{caption-side:top;text-align:left;"
    "font-size:.9em;padding-bottom:.4em}th,td{border:1px solid #ccc;padding:.25em .6em;"
    "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
)


def render_html(blocks: Sequence[Block], title: str) -> str:
    """A self-contained page: inline CSS, images referenced relative to the page's folder."""
    esc = html.escape
    body = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{esc(b[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{esc(b[1])}</p>")
        elif kind == "img":
            body.append(f'<p><img src="{esc(b[1])}" alt="{esc(b[2])}"></p>')
        elif kind == "table":
            body.append(to_html(b[1]))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------------------------
# Putting it together


def _load(run: RunFiles, device: torch.device | str):
    """The run's EMA network, or None when its checkpoint is missing or unusable."""
    from .checkpoint import CheckpointError, load_model

    try:
        return load_model(run.path, device)
    except CheckpointError:
        return None


def _figure1(run: RunFiles, loaded, out: Path, seed: int, steps: int, device) -> list[Block]:
    cfg = run.config
    blocks: list[Block] = [("h3", f"Run {run.name}")]
    ref = run.path / "reference.png"
    if loaded is None:
        blocks.append(
            (
                "p",
                f"No usable checkpoint in {run.path / 'checkpoints'}: Fig. 1 needs "
                "the normalisation statistics and the EMA network.",
            )
        )
        return blocks
    if ref.is_file():
        image = first_reference_image(ref, cfg.model.channels)
        fwd = f"fig1-forward-{run.name}.png"
        plot_forward(out / fwd, image, loaded.mean, loaded.std, cfg.schedule, seed)
        blocks += [
            ("img", fwd, f"Forward diffusion, run {run.name}"),
            (
                "p",
                "Forward process x_t = signal_rate * x_0 + noise_rate * eps of the first "
                "reference (validation) image with one seeded eps, shown de-normalised and "
                "clipped to [0, 1]. The schedule's t = 0 still has noise rate "
                f"{math.sqrt(1 - cfg.schedule.max_signal_rate**2):.2f} (max_signal_rate "
                f"{cfg.schedule.max_signal_rate}), so the clean x_0 is shown first.",
            ),
        ]
    else:
        blocks.append(
            (
                "p",
                "No reference.png (the run had no validation split): no forward diffusion figure.",
            )
        )
    rev = f"fig1-reverse-{run.name}.png"
    shape = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    plot_reverse(
        out / rev, loaded.model, loaded.mean, loaded.std, cfg.schedule, shape, steps, seed, device
    )
    blocks += [
        ("img", rev, f"Reverse diffusion, run {run.name}"),
        (
            "p",
            f"Reverse process: deterministic DDIM (eta = 0), {steps} steps from the noise of "
            f"image 0 of seed {seed}, EMA network of {_ckpt_name(loaded)}. Top: x_t entering "
            "the step; bottom: the network's predicted x_0 at that step (the last one is the "
            "sample).",
        ),
    ]
    return blocks


def _ckpt_name(loaded) -> str:
    where = f"checkpoints/{loaded.path.name}"
    epoch, step = loaded.meta.get("epoch"), loaded.meta.get("step")
    return f"{where} (epoch {epoch}, step {step})" if epoch is not None else where


def _samples(run: RunFiles, loaded, out: Path, seed: int, steps: int, device) -> list[Block]:
    from .diffusion.generation import generate
    from .io import save_grid

    name = f"samples-{run.name}.png"
    cfg = run.config
    if loaded is not None:
        images = generate(
            loaded.model,
            mean=loaded.mean,
            std=loaded.std,
            schedule=cfg.schedule,
            image_size=cfg.model.image_size,
            channels=cfg.model.channels,
            n=SAMPLE_ROWS * SAMPLE_COLS,
            seed=seed,
            steps=steps,
            batch_size=SAMPLE_ROWS * SAMPLE_COLS,
            device=device,
        )
        save_grid(images, out / name, cols=SAMPLE_COLS)
        text = (
            f"{SAMPLE_ROWS * SAMPLE_COLS} samples of the EMA network of {_ckpt_name(loaded)}: "
            f"images 0..{SAMPLE_ROWS * SAMPLE_COLS - 1} of seed {seed}, DDIM {steps} steps, "
            "eta = 0."
        )
        return [("h3", f"Run {run.name}"), ("img", name, f"Samples, run {run.name}"), ("p", text)]
    grids = sorted((run.path / "samples").glob("epoch-*.png"))
    if not grids:
        return [("h3", f"Run {run.name}"), ("p", "No checkpoint and no sample grids.")]
    write_bytes_atomic(out / name, grids[-1].read_bytes())
    text = (
        f"No usable checkpoint: copy of the training run's last sample grid "
        f"(samples/{grids[-1].name}, EMA network, 20 DDIM steps)."
    )
    return [("h3", f"Run {run.name}"), ("img", name, f"Samples, run {run.name}"), ("p", text)]


def write_report(
    runs: Sequence[str | Path],
    out: str | Path,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    steps: int = 20,
) -> Path:
    """Write the paper's figures and tables for `runs` into `out`; return out/report.md.

    Also writes out/report.html (same content, self-contained), fig1-forward-<run>.png,
    fig1-reverse-<run>.png, samples-<run>.png, fig3-kid.png (if any run has KID),
    fig4-losses.png, table1.md/.csv, table2-<run>.md/.csv, and steps-table.md/.csv with
    fig-steps.png when a run has steps.csv. Only files in the run folders are read.

    :param runs: run folders written by `animeddim train`.
    :param device: where the EMA networks sample (Fig. 1 reverse, sample grids).
    :param seed: seed of the forward-process noise and of the sampled images.
    :param steps: DDIM steps of the reverse figure and the sample grids.
    :raises ReportError: a folder is missing or lacks config.json / metrics.csv.
    """
    if not runs:
        raise ReportError("no run folders given")
    if steps < 1:
        raise ReportError(f"invalid steps = {steps!r}: expected an integer >= 1")
    paths = [Path(r) for r in runs]
    # Read every folder before writing anything: a bad one fails fast with no half report.
    data = [read_run(p, name) for p, name in zip(paths, unique_names(paths), strict=True)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    blocks: list[Block] = [
        ("h1", "animeddim report"),
        (
            "p",
            "Figures and tables as in 'Exploring Denoising Diffusion Models for Realistic Anime "
            "Character Generation', made from the run folders alone. Empty values print as "
            f"{DASH}. Runs: " + "; ".join(f"{r.name} ({r.path})" for r in data) + ".",
        ),
        (
            "p",
            f"Protocols. KID (paper): {_PAPER_KID}. KID (standard) and FID: "
            f"{_protocol_description('standard')}. Losses: {_LOSSES}; train losses are the "
            "epoch means of the live network's batches, validation losses the EMA network's.",
        ),
    ]
    loaded = {r.name: _load(r, device) for r in data}

    # Fig. 1, then the sample grids
    blocks.append(("h2", "Fig. 1. Forward and reverse diffusion"))
    for run in data:
        blocks += _figure1(run, loaded[run.name], out, seed, steps, device)
    blocks.append(("h2", "Samples"))
    for run in data:
        blocks += _samples(run, loaded[run.name], out, seed, steps, device)

    # Table I, Table II
    t1 = table1(data)
    write_csv(t1, out / "table1.csv")
    write_text_atomic(out / "table1.md", to_markdown(_table1_display(t1)))
    blocks += [("h2", "Table I. KID scores on different datasets"), ("table", _table1_display(t1))]
    blocks.append(("h2", "Table II. Validation results"))
    for run in data:
        t2 = table2(run)
        write_csv(t2, out / f"table2-{run.name}.csv")
        write_text_atomic(out / f"table2-{run.name}.md", to_markdown(t2))
        blocks.append(("table", t2))
    if any(r.evals for r in data):
        blocks += [("h2", "Evaluations"), ("table", evals_table(data))]

    # Fig. 3, Fig. 4
    blocks.append(("h2", "Fig. 3. KID versus epochs"))
    if any(r.has_kid for r in data):
        plot_kid(out / "fig3-kid.png", data)
        blocks += [
            ("img", "fig3-kid.png", "KID versus epochs"),
            (
                "p",
                f"Per-epoch KID of the EMA network, {_PAPER_KID}. Runs without KID values "
                "(trained with --no-kid or without Inception weights) are left out.",
            ),
        ]
    else:
        blocks.append(
            (
                "p",
                "No run has per-epoch KID values (trained with --no-kid or without "
                "Inception weights), so there is no Fig. 3.",
            )
        )
    plot_losses(out / "fig4-losses.png", data)
    blocks += [
        (
            "h2",
            "Fig. 4. (a) Train and validation noise loss over epochs "
            "(b) Train and validation image loss over epochs",
        ),
        ("img", "fig4-losses.png", "Train and validation losses"),
        (
            "p",
            f"Losses: {_LOSSES}. Solid: train (epoch mean, live network); dashed: validation (EMA "
            "network, fixed noises and times); one colour per run.",
        ),
    ]

    # Steps study
    if any(r.steps for r in data):
        st = steps_table(data)
        write_csv(st, out / "steps-table.csv")
        write_text_atomic(out / "steps-table.md", to_markdown(st))
        plot_steps(out / "fig-steps.png", st)
        blocks += [
            ("h2", "Sampling steps"),
            ("img", "fig-steps.png", "KID versus sampling steps"),
            ("table", st),
        ]

    page = out / "report.md"
    write_text_atomic(page, render_markdown(blocks))
    write_text_atomic(out / "report.html", render_html(blocks, "animeddim report"))
    return page
