"""Mode coverage: the attribute histogram of generated images against the real one.

KID says how far two image distributions are; it does not say which faces a generator leaves
out. Here an attribute classifier (:mod:`animeddim.attributes`) labels the generated images, and
per attribute the share of each value is set beside the real share (from the real folder's
labels). The distance per attribute is the total variation

    TV(p, q) = 1/2 * sum_v |p_v - q_v|   (0: same histogram, 1: disjoint),

and the floor it can be judged to is the classifier's own TV on the real images: the histogram
of its predictions on them against their true labels.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from .attributes import AttributeNet, accuracy, align_labels, classify
from .labels import NULL, csv_labels

COVERAGE_FILES = ("coverage.json", "coverage.csv", "coverage.md", "coverage.png")


def histogram(codes: np.ndarray, n_values: int) -> np.ndarray:
    """Shares of each code 0..n_values-1 among the labelled entries (NULL left out)."""
    codes = np.asarray(codes)
    codes = codes[codes != NULL]
    if len(codes) == 0:
        return np.zeros(n_values)
    return np.bincount(codes, minlength=n_values)[:n_values] / len(codes)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Total variation distance between two histograms over the same values, in [0, 1]."""
    return float(0.5 * np.abs(np.asarray(p, float) - np.asarray(q, float)).sum())


def coverage_table(
    vocab: dict[str, tuple[str, ...]],
    real_codes: np.ndarray,
    sample_codes: np.ndarray,
    real_predicted: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per attribute: values, real / samples (/ real as classified) shares, TV and floor.

    All code arrays are ``(N, A)`` with columns in ``vocab`` order; ``real_codes`` are the true
    labels, the others classifier predictions.
    """
    out: dict[str, Any] = {}
    for k, (a, values) in enumerate(vocab.items()):
        real = histogram(real_codes[:, k], len(values))
        samples = histogram(sample_codes[:, k], len(values))
        row: dict[str, Any] = {
            "values": list(values),
            "real": real.tolist(),
            "samples": samples.tolist(),
            "tv": total_variation(samples, real),
        }
        if real_predicted is not None:
            classified = histogram(real_predicted[:, k], len(values))
            row["real_classified"] = classified.tolist()
            row["tv_floor"] = total_variation(classified, real)
        out[a] = row
    return out


def coverage(
    net: AttributeNet,
    samples_u8: np.ndarray,
    real_u8: np.ndarray,
    real_labels_codes: np.ndarray,
) -> dict[str, Any]:
    """Coverage of generated uint8 ``(N, H, W, 3)`` images against real ones and their codes
    (in the classifier's vocabulary, see :func:`attributes.align_labels`)."""
    vocab = net.config.vocab
    predicted_real = classify(net, real_u8)
    table = coverage_table(vocab, real_labels_codes, classify(net, samples_u8), predicted_real)
    return {
        "n_samples": len(samples_u8),
        "n_real": len(real_u8),
        "classifier_accuracy_real": accuracy(predicted_real, real_labels_codes, vocab),
        "attributes": table,
    }


def real_set(
    net: AttributeNet, real_dir: str | Path, size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A labelled real folder (``labels.csv`` inside) as images at `size` (default the
    classifier's) and their codes in the classifier's vocabulary."""
    from .data import load_folder

    real_dir = Path(real_dir)
    s = load_folder(real_dir, size or net.config.image_size)
    remedy = "move such images out of the folder (the real set is its labelled images)"
    labels = csv_labels(real_dir / "labels.csv", real_dir, s.paths, remedy=remedy)
    return np.asarray(s.images), align_labels(labels, net.config.vocab)


def coverage_of_folders(
    net: AttributeNet, samples_dir: str | Path, real_dir: str | Path
) -> dict[str, Any]:
    """:func:`coverage` of a folder of generated images against a labelled real folder."""
    from .data import load_folder

    samples = np.asarray(load_folder(samples_dir, net.config.image_size).images)
    real, codes = real_set(net, real_dir)
    result = coverage(net, samples, real, codes)
    result.update(samples=str(Path(samples_dir).resolve()), real=str(Path(real_dir).resolve()))
    return result


# --------------------------------------------------------------------------------------------
# Writing


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per attribute: TV, floor and the classifier's accuracy on the real images."""
    acc = result.get("classifier_accuracy_real", {})
    return [
        {
            "attribute": a,
            "tv": row["tv"],
            "tv_floor": row.get("tv_floor"),
            "classifier_accuracy": acc.get(a),
        }
        for a, row in result["attributes"].items()
    ]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def to_markdown(result: dict[str, Any]) -> str:
    """The summary table, then per attribute the real/classified/samples share of each value."""
    lines = [
        f"Coverage of {result['n_samples']} generated images against {result['n_real']} real "
        "ones (total variation per attribute; floor: the classifier's own TV on the real "
        "images).",
        "",
        "| attribute | TV | floor | classifier accuracy (real) |",
        "|---|---:|---:|---:|",
    ]
    for r in summary_rows(result):
        floor = "" if r["tv_floor"] is None else f"{r['tv_floor']:.3f}"
        acc = "" if r["classifier_accuracy"] is None else _pct(r["classifier_accuracy"])
        lines.append(f"| {r['attribute']} | {r['tv']:.3f} | {floor} | {acc} |")
    for a, row in result["attributes"].items():
        lines += ["", f"**{a}**", "", "| value | real | real, classified | samples |"]
        lines.append("|---|---:|---:|---:|")
        classified = row.get("real_classified", [None] * len(row["values"]))
        for v, r, c, s in zip(row["values"], row["real"], classified, row["samples"], strict=True):
            lines.append(f"| `{v}` | {_pct(r)} | {'' if c is None else _pct(c)} | {_pct(s)} |")
    return "\n".join(lines) + "\n"


def to_csv(result: dict[str, Any]) -> str:
    """Long format: attribute, value, real, real_classified, samples, then tv/floor per row."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["attribute", "value", "real", "real_classified", "samples", "tv", "tv_floor"])
    for a, row in result["attributes"].items():
        classified = row.get("real_classified", [""] * len(row["values"]))
        for v, r, c, s in zip(row["values"], row["real"], classified, row["samples"], strict=True):
            w.writerow(
                [
                    a,
                    v,
                    f"{r:.6f}",
                    c if c == "" else f"{c:.6f}",
                    f"{s:.6f}",
                    f"{row['tv']:.6f}",
                    f"{row['tv_floor']:.6f}" if "tv_floor" in row else "",
                ]
            )
    return buf.getvalue()


def plot_coverage(path: Path, result: dict[str, Any]) -> None:
    """Real and generated histograms side by side, one panel per attribute."""
    from .report import _figure, save_figure

    attrs = list(result["attributes"].items())
    cols = 2
    rows = (len(attrs) + cols - 1) // cols
    fig = _figure(14, 2.6 * rows)
    for k, (a, row) in enumerate(attrs):
        ax = fig.add_subplot(rows, cols, k + 1)
        x = np.arange(len(row["values"]))
        ax.bar(x - 0.2, row["real"], 0.4, label="real (labels)", color="C0")
        ax.bar(x + 0.2, row["samples"], 0.4, label="generated (classified)", color="C1")
        ax.set_title(
            f"{a}: TV {row['tv']:.3f}"
            + (f" (floor {row['tv_floor']:.3f})" if "tv_floor" in row else ""),
            fontsize=9,
        )
        ax.set_xticks(x)
        ax.set_xticklabels([_short(v) for v in row["values"]], rotation=90, fontsize=6)
        ax.tick_params(axis="y", labelsize=7)
        if k == 0:
            ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)


def _short(value: str) -> str:
    return value.replace("variant", "v")


def write_coverage(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Write coverage.json, .csv, .md and .png into ``out_dir``; returns it."""
    from .io import write_text_atomic

    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "coverage.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(out_dir / "coverage.csv", to_csv(result))
    write_text_atomic(out_dir / "coverage.md", to_markdown(result))
    plot_coverage(out_dir / "coverage.png", result)
    return out_dir
