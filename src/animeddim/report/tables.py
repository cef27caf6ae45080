"""Tables I and II, the evaluations and the steps study: one value model (`Table`),
rendered as Markdown, CSV and HTML."""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

from ..io import write_text_atomic
from ..run_folder import DASH, RunFiles, RunFolderError, number_or_none

# Short protocol statements; the long ones come from animeddim.metrics when it imports.
PAPER_KID = (
    "paper protocol (Keras DDIM example): real validation images vs EMA-network DDIM samples, "
    "bilinear resize to 75 px, InceptionV3 features, unbiased MMD^2 per batch, averaged"
)
LOSSES = (
    "in normalised image space at seeded noises and uniformly drawn times t; noise loss "
    "(eps - eps_hat)^2 under --loss mse, |eps - eps_hat| under --loss mae; image loss "
    "|x_0 - x0_hat|"
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


# Below this a negative number is the float64 rounding of a difference (an FID of two equal
# sets computes as -3.6e-12): shown as 0, never '-3.638e-12'; the CSV keeps it as computed.
ROUNDING = 1e-9


def cell_text(v: Any) -> str:
    """How a cell prints: None or "" as a dash, floats to 4 significant digits (a negative
    within :data:`ROUNDING` of zero as 0)."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return DASH
    if isinstance(v, float):
        return "0" if -ROUNDING < v <= 0 else f"{v:.4g}"
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


def protocol_description(protocol: str) -> str:
    from ..metrics import PROTOCOL_DESCRIPTIONS  # what a protocol means is defined there

    return PROTOCOL_DESCRIPTIONS.get(protocol, protocol)


def _kid_protocol(run: RunFiles) -> str:
    tc = run.config.train
    images = "all validation images" if tc.kid_images <= 0 else f"{tc.kid_images} validation images"
    return f"{PAPER_KID}; {tc.kid_steps} DDIM steps, {images}"


def table2(run: RunFiles) -> Table:
    """Paper Table II for one run: per epoch KID (paper protocol) and validation losses."""
    rows = [
        [int(r["epoch"]), r.get("kid"), r.get("val_noise_loss"), r.get("val_image_loss")]
        for r in run.rows
    ]
    caption = (
        f"Table II. Validation results on {run.dataset} (run {run.name}). "
        f"KID: {_kid_protocol(run)}. Noise Loss and Image Loss: validation objective (the run's "
        f"--loss) and validation MAE on x0 of the EMA network ({LOSSES})."
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
    """KID mean, KID std, FID, n, sampler, steps, eta and the real folder (its last two path
    parts) of one eval-*.json (None where missing)."""
    real = ev.get("real")
    return [
        _num(ev, "kid_mean"),
        _num(ev, "kid_std"),
        _num(ev, "fid"),
        _num(ev, "n", "n_b"),
        sampler_label(ev.get("sampler"), ev.get("clip_x0")),
        _num(ev, "steps"),
        _num(ev, "eta"),
        _folder_end(real) if isinstance(real, str) and real else None,
    ]


def _folder_end(path: str) -> str:
    """'held/anime' for /home/me/held/anime: the parent too, since a held-out folder is often
    named as the training one (held/anime, data/anime)."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


EVAL_HEADERS = ["n", "Sampler", "Steps", "eta", "Real"]
EVAL_SAID = (
    "n images drawn with the given sampler, steps and eta, against the images of the folder "
    "under Real (the end of its path)"
)


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
        f"{PAPER_KID}. Noise Loss, Image Loss: last epoch, validation objective (the run's "
        "--loss) and MAE on x0 of the EMA network. "
        "KID (standard), KID std, FID: newest eval-*.json of the run with protocol "
        f"'standard' ({protocol_description('standard')}), {EVAL_SAID}."
    )
    headers = ["Run", "Dataset", "Epochs", "KID (paper)", "Noise Loss", "Image Loss"]
    headers += ["KID (standard)", "KID std (standard)", "FID (standard)", *EVAL_HEADERS]
    return Table(headers, rows, caption)


def table1_display(t: Table) -> Table:
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
    caption = f"Evaluations (animeddim evaluate): {EVAL_SAID}. " + " ".join(
        f"Protocol '{p}': {protocol_description(p)}." for p in protocols
    )
    headers = ["Run", "File", "Protocol", "KID", "KID std", "FID", *EVAL_HEADERS]
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
        said = " ".join(f"Protocol '{p}': {protocol_description(p)}." for p in named)
    else:
        said = "steps.csv records no protocol column; see the study that wrote it."
    caption = f"Sampling steps study (RUN/steps.csv): KID vs sampling steps. {said}"
    headers = ["Run", "Sampler", "eta", "Steps", "KID", "KID std", "s/image"]
    return Table(headers, rows, caption)


def _int_or_none(s: str | None) -> int | None:
    v = number_or_none(s)
    return None if v is None or not math.isfinite(v) else int(v)
