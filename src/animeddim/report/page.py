"""The report page: blocks rendered as Markdown and HTML, and `write_report`."""

from __future__ import annotations

import hashlib
import html
import math
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..io import save_grid, write_bytes_atomic, write_text_atomic
from ..outputs import REPORT_PENDING
from ..run_folder import DASH, RunFiles, RunFolderError, read_run, unique_names
from ..words import counted
from .figures import (
    first_reference_image,
    plot_forward,
    plot_kid,
    plot_losses,
    plot_reverse,
    plot_standard_kid,
    plot_steps,
)
from .tables import (
    LOSSES,
    PAPER_KID,
    evals_table,
    protocol_description,
    steps_table,
    table1,
    table1_display,
    table2,
    to_html,
    to_markdown,
    write_csv,
)

ReportError = RunFolderError  # a run folder cannot be reported on; the message says why
SAMPLE_ROWS, SAMPLE_COLS = 4, 8  # sample grid of the EMA network


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
    from ..checkpoint import CheckpointError, load_model

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
    plot_reverse(out / rev, loaded, steps, seed, device)
    blocks += [
        ("img", rev, f"Reverse diffusion, run {run.name}"),
        (
            "p",
            f"Reverse process: deterministic DDIM (eta = 0), {counted(steps, 'step')} from the "
            f"noise of "
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
    from ..diffusion.generation import generate

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
            f"images 0..{SAMPLE_ROWS * SAMPLE_COLS - 1} of seed {seed}, DDIM "
            f"{counted(steps, 'step')}, "
            "eta = 0."
        )
        blocks = [("h3", f"Run {run.name}"), ("img", name, f"Samples, run {run.name}"), ("p", text)]
        return blocks + _attribute_grids(run, loaded, out, seed, steps, device)
    grids = sorted((run.path / "samples").glob("epoch-*.png"))
    if not grids:
        return [("h3", f"Run {run.name}"), ("p", "No checkpoint and no sample grids.")]
    write_bytes_atomic(out / name, grids[-1].read_bytes())
    text = (
        f"No usable checkpoint: copy of the training run's last sample grid "
        f"(samples/{grids[-1].name}, EMA network, 20 DDIM steps)."
    )
    return [("h3", f"Run {run.name}"), ("img", name, f"Samples, run {run.name}"), ("p", text)]


PENDING_TEXT = (  # what the note of a report being written says to whoever finds it
    "A report is being written into this folder. If this file stays, that report was stopped "
    "before its end: `animeddim report` writes the folder again without --force.\n"
)
GRID_MAX_VALUES = 16  # attributes with more values get no grid (too tall to read)


def grid_file_names(run_name: str, attributes: Sequence[str]) -> dict[str, str]:
    """The file of each attribute's grid: ``samples-RUN-by-NAME.png``, NAME the attribute's
    name with every character outside letters, digits, ``_ . -`` made ``_``.

    Two attributes whose names are alike that way ('hair color' and 'hair/color'; 'Hair' and
    'hair', one file on a disk that ignores case) would write one file, the second grid over
    the first: each of those gets ``-`` and the first 8 hex digits of its name's SHA-256
    appended (the same however the vocabulary is ordered); the other names stay plain.
    """

    def key(slug: str) -> str:  # one file on a disk that ignores case and Unicode form
        return unicodedata.normalize("NFC", slug).casefold()

    slugs = {a: re.sub(r"[^\w.-]", "_", a) for a in attributes}
    alike = Counter(key(slug) for slug in slugs.values())
    names: dict[str, str] = {}
    taken: set[str] = set()
    for a, slug in slugs.items():
        if alike[key(slug)] > 1:
            slug += "-" + hashlib.sha256(a.encode("utf-8")).hexdigest()[:8]
        unique, k = slug, 2
        while key(unique) in taken:  # a plain name spelled like another's suffixed one
            unique, k = f"{slug}-{k}", k + 1
        taken.add(key(unique))
        names[a] = f"samples-{run_name}-by-{unique}.png"
    return names


def _attribute_grids(run: RunFiles, loaded, out: Path, seed: int, steps: int, device):
    """A conditional model's attribute grids: per attribute of at most GRID_MAX_VALUES
    values, one row per value and SAMPLE_COLS columns (the same starting noises in every
    row), as `sample --grid-by` draws it, each in its own file (`grid_file_names`)."""
    from ..pipelines import attribute_grid, resolve_settings, vocabulary

    vocab = vocabulary(loaded)
    if not vocab:
        return []
    s = resolve_settings(device, "fp32", steps=steps, sampler="ddim", seed=seed)
    files = grid_file_names(run.name, list(vocab))
    blocks: list[Block] = []
    for attr, values in vocab.items():
        if len(values) > GRID_MAX_VALUES:
            blocks.append(
                ("p", f"No grid for {attr}: {len(values)} values (at most {GRID_MAX_VALUES}).")
            )
            continue
        images, _ = attribute_grid(loaded, attr, SAMPLE_COLS, s)
        name = files[attr]
        save_grid(images, out / name, cols=SAMPLE_COLS)
        text = (
            f"By {attr}: rows {', '.join(values)} (top to bottom); columns images "
            f"0..{SAMPLE_COLS - 1} of seed {seed}, the same starting noise down each column; "
            f"DDIM {counted(steps, 'step')}, eta = 0, plain conditional sampling (guidance 1), "
            f"the other "
            "attributes not asked."
        )
        blocks += [("img", name, f"Samples by {attr}, run {run.name}"), ("p", text)]
    return blocks


def _refuse_a_run_given_twice(paths: Sequence[Path]) -> None:
    """ReportError if two of `paths` are one folder (spelt alike or not: `run`, `./run/`, a
    link to it): its figures and tables would be written twice, under two names."""
    seen: dict[str, Path] = {}
    for p in paths:
        key = os.path.realpath(p)
        if key in seen:
            spelt = "" if str(seen[key]) == str(p) else f" (as {str(seen[key])!r} and {str(p)!r})"
            raise ReportError(f"run folder {str(p)!r} is given twice{spelt}; give each run once")
        seen[key] = p


def write_report(
    runs: Sequence[str | Path] | str | Path,
    out: str | Path,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    steps: int = 20,
) -> Path:
    """Write the paper's figures and tables for `runs` into `out`; return out/report.md.

    Also writes out/report.html (same content, self-contained), fig1-forward-<run>.png,
    fig1-reverse-<run>.png, samples-<run>.png (and samples-<run>-by-<attribute>.png for a
    conditional model, see `grid_file_names`), fig3-kid.png (if any run has KID),
    fig3-standard-kid.png (if any run was trained with --eval-every), fig4-losses.png,
    table1.md/.csv, table2-<run>.md/.csv, and steps-table.md/.csv with fig-steps.png when
    a run has steps.csv. Only files in the run folders are read. From the first file to the
    last, out/.animeddim-report-pending says a report is being written: one stopped before
    its end leaves it, and `animeddim report` then writes the folder again without --force.

    :param runs: run folders written by `animeddim train` (a list; one folder alone may be
        given as a str or Path).
    :param device: where the EMA networks sample (Fig. 1 reverse, sample grids).
    :param seed: seed of the forward-process noise and of the sampled images.
    :param steps: DDIM steps of the reverse figure and the sample grids.
    :raises ReportError: a folder is missing or lacks config.json / metrics.csv; steps,
        seed or device of a kind or value it cannot use, a run folder given twice (before
        any folder is read).
    """
    from ..config import ConfigError, as_integer
    from ..runtime import resolve_device

    if isinstance(runs, (str, os.PathLike)):  # not its characters, one by one
        runs = [runs]
    if not runs:
        raise ReportError("no run folders given")
    n_steps, n_seed = as_integer(steps), as_integer(seed)  # "5" failed in a comparison
    if n_steps is None or n_steps < 1:
        raise ReportError(f"invalid steps = {steps!r}: expected an integer >= 1")
    if n_seed is None or not 0 <= n_seed < 2**63:  # the seed of a torch generator
        raise ReportError(f"invalid seed = {seed!r}: expected an integer in 0 .. 2**63 - 1")
    steps, seed = n_steps, n_seed
    try:  # "gpu" failed in torch's device parser once the first network was loaded
        if not isinstance(device, torch.device):
            device = resolve_device(device, host_memory=False)
    except ConfigError as e:
        raise ReportError(str(e)) from None
    paths = [Path(r) for r in runs]
    _refuse_a_run_given_twice(paths)
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
            f"Protocols. KID (paper): {PAPER_KID}. KID (standard) and FID: "
            f"{protocol_description('standard')}. Losses: {LOSSES}; train losses are the "
            "epoch means of the live network's batches, validation losses the EMA network's.",
        ),
    ]
    loaded = {r.name: _load(r, device) for r in data}
    # From here until the page is written `out` holds part of a report; a call stopped in
    # between leaves this note, and `animeddim report` then writes it again without --force.
    pending = out / REPORT_PENDING
    write_text_atomic(pending, PENDING_TEXT)

    # Fig. 1, then the sample grids
    blocks.append(("h2", "Fig. 1. Forward and reverse diffusion"))
    for run in data:
        blocks += _figure1(run, loaded[run.name], out, seed, steps, device)
    blocks.append(("h2", "Samples"))
    for run in data:
        blocks += _samples(run, loaded[run.name], out, seed, steps, device)

    blocks += _table_blocks(data, out)
    blocks += _curve_blocks(data, out)

    page = out / "report.md"
    write_text_atomic(page, render_markdown(blocks))
    write_text_atomic(out / "report.html", render_html(blocks, "animeddim report"))
    pending.unlink(missing_ok=True)
    return page


def _table_blocks(data: Sequence[RunFiles], out: Path) -> list[Block]:
    """Tables I and II (and the evaluations), written as .md and .csv too."""
    blocks: list[Block] = []
    # Table I, Table II
    t1 = table1(data)
    write_csv(t1, out / "table1.csv")
    write_text_atomic(out / "table1.md", to_markdown(table1_display(t1)))
    blocks += [("h2", "Table I. KID scores on different datasets"), ("table", table1_display(t1))]
    blocks.append(("h2", "Table II. Validation results"))
    for run in data:
        t2 = table2(run)
        write_csv(t2, out / f"table2-{run.name}.csv")
        write_text_atomic(out / f"table2-{run.name}.md", to_markdown(t2))
        blocks.append(("table", t2))
    if any(r.evals for r in data):
        blocks += [("h2", "Evaluations"), ("table", evals_table(data))]
    return blocks


def _curve_blocks(data: Sequence[RunFiles], out: Path) -> list[Block]:
    """Fig. 3, Fig. 4 and the steps study."""
    blocks: list[Block] = []
    # Fig. 3, Fig. 4
    blocks.append(("h2", "Fig. 3. KID versus epochs"))
    if any(r.has_kid for r in data):
        plot_kid(out / "fig3-kid.png", data)
        blocks += [
            ("img", "fig3-kid.png", "KID versus epochs"),
            (
                "p",
                f"Per-epoch KID of the EMA network, {PAPER_KID}. Runs without KID values "
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
    if any(r.has_standard_kid for r in data):
        plot_standard_kid(out / "fig3-standard-kid.png", data)
        blocks += [
            ("h2", "Standard KID during training"),
            ("img", "fig3-standard-kid.png", "Standard KID versus epochs"),
            (
                "p",
                "KID (standard protocol, as `evaluate`) of the EMA network's samples against "
                "the run's --eval-real folder, every --eval-every epochs (`train --eval-every`; "
                "sample count, sampler and steps in each run's config.json). Not in the paper.",
            ),
        ]
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
            f"Losses: {LOSSES}. Solid: train (epoch mean, live network); dashed: validation (EMA "
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
    return blocks
