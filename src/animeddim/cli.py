"""Command line: options -> configs -> library calls. No maths here.

Every user error becomes one line on stderr and exit code 2 (no traceback); a diverged
training run exits with 3; Ctrl-C saves and exits with 130.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


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


STEPS = _positive_int("steps", 1, 1000)
ETA = _unit_float("eta")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument(
        "--precision",
        default=None,
        choices=["auto", "fp32", "bf16", "fp16"],
        help="autocast precision; auto = bf16 where the hardware does it well (default auto)",
    )


def _add_sampling(p: argparse.ArgumentParser, n_default: int) -> None:
    p.add_argument(
        "--n",
        type=_positive_int("n"),
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
    _add_runtime(p)


# --- parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="animeddim",
        description="Train denoising diffusion implicit models on image folders and measure "
        "them like the research does.",
    )
    parser.add_argument("--version", action="version", version=f"animeddim {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    # data
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
    p.set_defaults(func=cmd_data_flowers102)

    # train
    p = sub.add_parser("train", help="train a DDIM on an image folder")
    p.add_argument("--data", help="image folder (searched recursively)")
    p.add_argument("--out", help="new run folder")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder")
    p.add_argument("--config", help="JSON or TOML file with data/model/schedule/train sections")
    p.add_argument("--image-size", type=_positive_int("image-size", 8), help="pixels (default 64)")
    p.add_argument("--epochs", type=_positive_int("epochs"), help="epochs (default 1)")
    p.add_argument(
        "--batch-size", type=_positive_int("batch-size"), help="global batch size (default 64)"
    )
    p.add_argument("--lr", type=float, dest="learning_rate", help="AdamW learning rate (1e-3)")
    p.add_argument("--seed", type=int, help="training seed (default 0)")
    p.add_argument("--widths", type=_int_list, help="U-Net widths (default 32,64,96,128)")
    p.add_argument("--block-depth", type=_positive_int("block-depth"), help="(default 2)")
    p.add_argument("--val-fraction", type=float, help="validation share (default 0.2)")
    p.add_argument(
        "--checkpoint-every",
        type=_positive_int("checkpoint-every", 0),
        help="also checkpoint every N steps (default 0: epoch ends only)",
    )
    p.add_argument(
        "--keep-checkpoints",
        type=_positive_int("keep-checkpoints"),
        help="step checkpoints kept (default 2)",
    )
    p.add_argument("--nan-policy", choices=["stop", "skip-batch"], help="(default stop)")
    p.add_argument(
        "--kid",
        dest="kid",
        action="store_true",
        default=None,
        help="per-epoch paper-protocol KID (default on)",
    )
    p.add_argument("--no-kid", dest="kid", action="store_false")
    p.add_argument(
        "--kid-images",
        type=_positive_int("kid-images", 0),
        help="validation images for per-epoch KID (default 0: all)",
    )
    p.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="torch.compile the network (default: on CUDA)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument(
        "--strict", action="store_true", default=None, help="any undecodable image is an error"
    )
    p.add_argument("--max-steps", type=_positive_int("max-steps", 0), help="stop after N steps")
    p.add_argument(
        "--time-limit",
        type=float,
        dest="time_limit_minutes",
        metavar="MINUTES",
        help="stop at the first epoch end after this many minutes",
    )
    p.add_argument(
        "--log-every",
        type=_positive_int("log-every"),
        help="steps between progress updates (default 10)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_runtime(p)
    p.set_defaults(func=cmd_train)

    # sample
    p = sub.add_parser("sample", help="generate images with DDIM")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run", help="run folder or checkpoint file")
    src.add_argument("--model", default=None, help="a shipped model, e.g. avatars-64")
    _add_sampling(p, 64)
    p.add_argument("--out", help="folder for one PNG per image")
    p.add_argument("--grid", help="write all images tiled into this PNG")
    p.set_defaults(func=cmd_sample)

    # bench
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
        help="compile the tuned path (default on)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument(
        "--no-kid", dest="kid", action="store_false", help="skip the Inception feature throughput"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_bench)
    return parser


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(a.image_size, a.batch_size, a.device, a.iters, a.json, a.compile, a.kid)


# --- commands -----------------------------------------------------------------------------


def cmd_data_avatars(a: argparse.Namespace) -> int:
    from .datasets import generate_avatars

    t = time.perf_counter()
    out = generate_avatars(a.out, n=a.n, size=a.size, seed=a.seed, workers=a.workers, progress=True)
    print(
        f"{a.n} avatars ({a.size}px, seed {a.seed}) in {out} "
        f"({time.perf_counter() - t:.1f}s); credits in {Path(out) / 'CREDITS.md'}"
    )
    return 0


def cmd_data_prepare(a: argparse.Namespace) -> int:
    from .datasets import prepare

    out = prepare(a.src, a.out, size=a.size)
    print(f"prepared images in {out}")
    return 0


def cmd_data_flowers102(a: argparse.Namespace) -> int:
    from .datasets import download_flowers102

    kw = {"url": a.url} if a.url else {}
    out = download_flowers102(a.out, size=a.size, **kw)
    print(f"Oxford Flowers 102 images in {out}")
    return 0


TRAIN_FLAGS = {  # CLI dest -> (config section, field)
    "data": ("data", "path"),
    "val_fraction": ("data", "val_fraction"),
    "strict": ("data", "strict"),
    "widths": ("model", "widths"),
    "block_depth": ("model", "block_depth"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "learning_rate": ("train", "learning_rate"),
    "seed": ("train", "seed"),
    "device": ("train", "device"),
    "precision": ("train", "precision"),
    "compile": ("train", "compile"),
    "checkpoint_every": ("train", "checkpoint_every"),
    "keep_checkpoints": ("train", "keep_checkpoints"),
    "nan_policy": ("train", "nan_policy"),
    "kid": ("train", "kid"),
    "kid_images": ("train", "kid_images"),
    "max_steps": ("train", "max_steps"),
    "time_limit_minutes": ("train", "time_limit_minutes"),
    "log_every": ("train", "log_every"),
}


def train_config_from_args(a: argparse.Namespace) -> Any:
    """defaults < --config file < explicit flags."""
    from .config import RunConfig, load_config_file, merge

    d = RunConfig().to_dict()
    if a.config:
        d = merge(d, load_config_file(a.config))
    for dest, (section, field) in TRAIN_FLAGS.items():
        v = getattr(a, dest, None)
        if v is not None:
            d[section][field] = v
    if a.image_size is not None:
        d["data"]["image_size"] = d["model"]["image_size"] = a.image_size
    elif d["data"]["image_size"] != d["model"]["image_size"]:
        # A config file that sets one of them sets both.
        size = (
            d["model"]["image_size"] if d["data"]["image_size"] == 64 else d["data"]["image_size"]
        )
        d["data"]["image_size"] = d["model"]["image_size"] = size
    return RunConfig.from_dict(d).validate()


RESUME_FLAGS = (  # train settings that may change when a run is resumed
    "epochs",
    "device",
    "precision",
    "compile",
    "kid",
    "kid_images",
    "max_steps",
    "checkpoint_every",
    "keep_checkpoints",
    "nan_policy",
)


def resume_config_from_args(a: argparse.Namespace) -> Any:
    """The run's own config.json, with the explicitly given resumable flags applied."""
    from .train import load_run_config

    fixed = [
        f"--{d.replace('_', '-')}"
        for d in (
            "data",
            "image_size",
            "widths",
            "block_depth",
            "batch_size",
            "learning_rate",
            "seed",
            "val_fraction",
            "config",
        )
        if getattr(a, d, None) is not None
    ]
    if fixed:
        raise CliError(f"{', '.join(fixed)} cannot change when resuming; the run keeps its own")
    cfg = load_run_config(Path(a.resume))
    for dest in RESUME_FLAGS:
        v = getattr(a, dest, None)
        if v is not None:
            setattr(cfg.train, dest, v)
    return cfg.validate()


def cmd_train(a: argparse.Namespace) -> int:
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
        res = train(cfg, run_dir, resume=bool(a.resume), progress=not a.quiet)
    except TrainingDiverged as e:
        print(f"animeddim: training diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    if res.interrupted:
        return EXIT_INTERRUPTED
    print(
        f"run folder: {run_dir} (metrics.csv, samples/, checkpoints/) "
        f"after {time.perf_counter() - t:.0f}s"
    )
    return 0


def load_for_sampling(run: str | None, model: str | None, device_name: str | None):
    from .checkpoint import load_model
    from .runtime import resolve_device

    device = resolve_device(device_name or "auto")
    if run:
        return load_model(run, device), device
    from .pretrained import pretrained_path

    return load_model(pretrained_path(model or "avatars-64"), device), device


def cmd_sample(a: argparse.Namespace) -> int:
    from .runtime import autocast, resolve_precision
    from .sampling import generate
    from .train import save_grid

    if not a.out and not a.grid:
        raise CliError("give --out DIR and/or --grid FILE.png")
    loaded, device = load_for_sampling(a.run, a.model, a.device)
    precision = resolve_precision(a.precision or "auto", device)
    cfg = loaded.config
    t = time.perf_counter()
    images = generate(
        loaded.model,
        mean=loaded.mean,
        std=loaded.std,
        schedule=cfg.schedule,
        image_size=cfg.model.image_size,
        channels=cfg.model.channels,
        n=a.n,
        seed=a.seed,
        steps=a.steps,
        eta=a.eta,
        batch_size=a.batch_size,
        device=device,
        autocast=autocast(device, precision),
    )
    dt = time.perf_counter() - t
    if a.out:
        write_pngs(images, Path(a.out), a.seed)
        print(f"{a.n} images in {a.out}")
    if a.grid:
        Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, Path(a.grid), cols=min(8, a.n))
        print(f"grid: {a.grid}")
    print(f"{a.n} images, {a.steps} steps, eta {a.eta}: {dt:.1f}s ({a.n / dt:.2f} images/s)")
    return 0


def write_pngs(images_u8, out: Path, seed: int, first_index: int = 0) -> None:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images_u8.numpy()):
        Image.fromarray(im).save(out / f"seed{seed}-{first_index + i:06d}.png")


# --- entry point --------------------------------------------------------------------------


def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .train import RunFolderError

    errs: list[type[BaseException]] = [
        CliError,
        ConfigError,
        DataError,
        CheckpointError,
        RunFolderError,
    ]
    try:
        from .metrics import InceptionWeightsMissing

        errs.append(InceptionWeightsMissing)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    errors = _user_errors()
    try:
        return args.func(args)
    except errors as e:
        print(f"animeddim: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("animeddim: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        print(
            f"animeddim: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
