"""``sample --attr/--guidance/--grid-by`` and ``edit``: options -> `pipelines` calls (see
cli.py's conventions: a user error is one line and exit 2)."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _guidance(text: str) -> float:
    try:
        w = float(text)
    except ValueError:
        w = math.nan
    if not (math.isfinite(w) and w >= 0.0):
        raise argparse.ArgumentTypeError(f"--guidance must be a number >= 0, got {text!r}")
    return w


def add_sample_options(p: argparse.ArgumentParser) -> None:
    """Conditioning options of `sample` (and of `edit`'s regeneration)."""
    p.add_argument(
        "--attr",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="ask a conditional model for this attribute value (repeatable; default: none, "
        "unconditional)",
    )
    p.add_argument(
        "--guidance",
        type=_guidance,
        default=1.0,
        metavar="W",
        help="classifier-free guidance weight: eps_null + W (eps_cond - eps_null); 1 = plain "
        "conditional, 0 = null (default 1)",
    )


def add_edit_parser(sub: Any, setup: Callable[[argparse.ArgumentParser], None], steps) -> None:
    """Register ``edit``; `setup` adds the model source and runtime options."""
    p = sub.add_parser("edit", help="change attributes of images (DDIM inversion, regeneration)")
    setup(p)
    p.add_argument("--images", required=True, help="folder of images to edit")
    p.add_argument(
        "--set",
        action="append",
        required=True,
        dest="changes",
        metavar="NAME=VALUE",
        help="the attribute value to give every image (repeatable)",
    )
    p.add_argument(
        "--labels",
        metavar="FILE.csv|folders",
        help="the images' own labels, inverted under (default: none, inverted under null)",
    )
    p.add_argument("--steps", type=steps, default=50, help="DDIM steps (default 50)")
    p.add_argument(
        "--guidance", type=_guidance, default=1.0, metavar="W", help="of the regeneration (1)"
    )
    p.add_argument("--out", required=True, help="new output folder")
    p.add_argument("--batch-size", type=int, default=64)


def asked(a: argparse.Namespace) -> dict[str, str]:
    from .conditioning import parse_assignments

    return parse_assignments(a.attr, "--attr")


def sample_conditional(a: argparse.Namespace, loaded, settings, bars) -> Any:
    """Images of `sample` with --attr/--grid-by: uint8 [N x H x W x C] (None on the other
    ranks under torchrun, where each rank draws a block of image indices) and the number of
    grid columns."""
    from .distributed import is_main, shard_images
    from .pipelines import attribute_grid, draw_conditional

    if a.grid_by:
        images, values = attribute_grid(
            loaded, a.grid_by, a.n, settings, asked(a), a.guidance, progress=bars
        )
        if not is_main():
            return None, a.n
        print(f"rows: {a.grid_by} = {', '.join(values)}; columns: images 0..{a.n - 1}")
        return images, a.n
    attrs = asked(a)
    images = shard_images(
        lambda count, first: draw_conditional(
            loaded, count, settings, attrs, a.guidance, first, progress=bars
        ),
        a.n,
    )
    return images, min(8, a.n)


def cmd_edit(a: argparse.Namespace, load, settings_of, bars) -> int:
    from .conditioning import parse_assignments
    from .config import ConfigError
    from .pipelines import edit

    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {a.out} already exists and is not empty: choose a new folder")
    changes = parse_assignments(a.changes, "--set")
    loaded, device = load(a.run, a.model, a.device)
    t = time.perf_counter()
    r = edit(
        loaded,
        a.images,
        out,
        changes,
        steps=a.steps,
        guidance=a.guidance,
        labels=a.labels,
        settings=settings_of(a, device),
        progress=bars,
    )
    what = ", ".join(f"{k}={v}" for k, v in changes.items())
    print(
        f"{r['images']} images edited ({what}, {a.steps} steps) in "
        f"{time.perf_counter() - t:.0f}s: after/, pairs/ (before | after) and grid.png in {out}"
    )
    return 0
