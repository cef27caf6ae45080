"""Validation noise loss of two training runs at the same number of images seen.

    python benchmarks/quality_at_equal_images.py REF/metrics.csv OTHER/metrics.csv

Each run's metrics.csv has one row per epoch (`step`, `val_noise_loss`) and its config.json
beside it the batch size. For each epoch end of OTHER, the reference's loss at the same number
of images seen is interpolated linearly between its own epoch ends (log-linear in images would
be within the noise at these spacings); printed as JSON with OTHER's relative gap, the number a
batch-size change must keep within 2%.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np


def curve(metrics: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(images seen, validation noise loss) at each epoch end, and the run's batch size."""
    batch = json.loads((metrics.parent / "config.json").read_text())["train"]["batch_size"]
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("val_noise_loss")]
    images = np.array([int(r["step"]) * batch for r in rows], dtype=float)
    loss = np.array([float(r["val_noise_loss"]) for r in rows])
    return images, loss, batch


def compare(ref_csv: Path, other_csv: Path) -> dict:
    ref_images, ref_loss, ref_batch = curve(ref_csv)
    images, loss, batch = curve(other_csv)
    inside = (images >= ref_images[0]) & (images <= ref_images[-1])
    at = np.interp(images[inside], ref_images, ref_loss)
    gaps = loss[inside] / at - 1
    return {
        "reference_batch": ref_batch,
        "batch": batch,
        "points": [
            {"images": int(i), "val_noise_loss": float(v), "reference": float(r), "gap": float(g)}
            for i, v, r, g in zip(images[inside], loss[inside], at, gaps, strict=True)
        ],
        "gap_at_last_common_point": float(gaps[-1]) if len(gaps) else None,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print(json.dumps(compare(Path(argv[0]), Path(argv[1])), indent=2))
    except (FileNotFoundError, KeyError, ValueError) as e:  # a run that did not finish
        print(f"quality_at_equal_images: cannot compare: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
