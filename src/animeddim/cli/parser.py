"""The argument parser: one function per command's options."""

from __future__ import annotations

import argparse

from .. import conditional_cli
from ..config import COMPILE_MODES, KID_PROTOCOLS
from ..diffusion.sampler_names import SAMPLER_NAMES
from . import sampling
from .commands import (
    cmd_bench,
    cmd_data_avatars,
    cmd_data_flowers102,
    cmd_data_prepare,
    cmd_data_split,
    cmd_export,
    cmd_report,
    cmd_serve,
    cmd_tour,
    cmd_train,
)
from .common import _Bars, _Parser
from .evaluation import cmd_evaluate, cmd_kid, cmd_steps
from .options import (
    PATH,
    SEED,
    STEPS,
    _add_batch_size,
    _add_clip,
    _add_force,
    _add_metrics,
    _add_model_source,
    _add_runtime,
    _add_sample_compile,
    _add_sampler,
    _add_sampling,
    _add_settings,
    _float_list,
    _int_list,
    _positive_int,
    _unit_float,
)
from .sampling import (
    _settings,
    cmd_interpolate,
    cmd_invert,
    cmd_sample,
    load_for_sampling,
)


def _add_data_command(sub) -> None:
    """`animeddim data`."""
    p_data = sub.add_parser("data", help="make or prepare datasets")
    data_sub = p_data.add_subparsers(
        dest="data_command", required=True, metavar="WHAT", parser_class=_Parser
    )
    p = data_sub.add_parser("avatars", help="render built-in DiceBear 'adventurer' avatars")
    p.add_argument("--out", type=PATH, required=True, help="folder to write PNGs into")
    p.add_argument("--n", type=_positive_int("n"), default=10000, help="how many (default 10000)")
    p.add_argument(  # DiceBear draws 1..4096 px (larger ended in its validation traceback)
        "--size",
        type=_positive_int("size", 8, 4096),
        default=64,
        help="pixels, 8 to 4096 (default 64)",
    )
    p.add_argument(  # DiceBear takes any string; the range is every other command's
        "--seed", type=SEED, default=0, help="same seed, same images, 0 .. 2**63 - 1 (default 0)"
    )
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
    p.add_argument("src", type=PATH, help="a .zip/.tar/.tgz archive you downloaded, or a folder")
    p.add_argument("--out", type=PATH, required=True, help="folder to write PNGs into")
    p.add_argument("--size", type=_positive_int("size", 8), default=64, help="pixels (default 64)")
    p.set_defaults(func=cmd_data_prepare)
    p = data_sub.add_parser(
        "split", help="move a random choice of a folder's images into a held-out folder"
    )
    p.add_argument("folder", type=PATH, help="a prepared folder (data prepare, data avatars)")
    p.add_argument(
        "--held-out",
        type=_positive_int("held-out"),
        required=True,
        metavar="N",
        help="how many images to move; labels.csv rows go with them",
    )
    p.add_argument("--out", type=PATH, required=True, help="new or empty held-out folder")
    p.add_argument(
        "--seed", type=SEED, default=0, help="same seed, same choice, 0 .. 2**63 - 1 (default 0)"
    )
    p.set_defaults(func=cmd_data_split)
    p = data_sub.add_parser("flowers102", help="download and prepare Oxford Flowers 102")
    p.add_argument("--out", type=PATH, required=True, help="folder for the archive and images/")
    p.add_argument("--size", type=_positive_int("size", 8), default=64, help="pixels (default 64)")
    p.add_argument("--url", default=None, help="mirror of 102flowers.tgz (default: official)")
    p.add_argument(
        "--md5", default=None, help="expected MD5 of the archive (default: the official one's)"
    )
    p.set_defaults(func=cmd_data_flowers102)


def _add_train_command(sub) -> None:
    """`animeddim train`."""
    p = sub.add_parser("train", help="train a DDIM on an image folder")
    p.add_argument("--out", type=PATH, help="new run folder")
    p.add_argument(
        "--resume",
        type=PATH,
        metavar="RUN",
        help="continue the run in this folder; --data and --labels may name where its images "
        "and labels moved or were copied to (checked to be the same images and labels; the run "
        "records the new places), the other settings that may not change on --resume "
        "(options or a --config file's) may be given with the run's own values only",
    )
    p.add_argument(
        "--config",
        type=PATH,
        help="JSON or TOML file with data/model/schedule/train sections; relative paths in it "
        "are read from the working folder, as on the command line, not from the file's folder",
    )
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
    p.add_argument("--out", type=PATH, help="folder for one PNG per image")
    p.add_argument("--grid", type=PATH, help="write all images tiled into this PNG")
    p.add_argument(
        "--trajectory",
        type=PATH,
        metavar="FILE.png",
        help="also save x_t and predicted-x0 strips of the reverse process",
    )
    _add_force(p, "earlier samples in --out and existing --grid/--trajectory files")
    conditional_cli.add_sample_options(p)
    p.add_argument(
        "--grid-by", metavar="ATTR", help="a grid: one row per value of ATTR, --n seeds per row"
    )
    p.add_argument(
        "--attrs-from",
        type=PATH,
        metavar="FILE.csv",
        help="image i is asked the attributes of row i of this labels CSV (cycling), e.g. a "
        "labelled folder's labels.csv, or of the model's own training labels ('training'): "
        "the data's own mix of attributes; an --attr is set in every row",
    )
    p.set_defaults(func=cmd_sample)


def _add_kid_command(sub) -> None:
    """`animeddim kid`."""
    p = sub.add_parser("kid", help="KID (and FID) between two image folders")
    p.add_argument(
        "dir_a", type=PATH, help="first folder (torch-fidelity's input 1, e.g. generated)"
    )
    p.add_argument("dir_b", type=PATH, help="second folder (e.g. real images)")
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
    p.add_argument("--real", type=PATH, required=True, help="folder of real images")
    _add_sampling(p, 1000, n_min=2)  # KID and FID need two images a side
    _add_sampler(p)
    p.add_argument(
        "--protocols",
        default="standard,paper",
        help="comma-separated: standard, paper (default both)",
    )
    p.add_argument("--out", type=PATH, help="JSON file (default RUN/eval-<date>.json)")
    p.add_argument(
        "--coverage",
        type=PATH,
        nargs="?",
        const="shipped",
        metavar="CLASSIFIER",
        help="also classify the samples' attributes against --real's labels.csv (TV per "
        "attribute; files beside --out); CLASSIFIER: a file (default: the shipped avatar one)",
    )
    p.add_argument(
        "--samples-out",
        type=PATH,
        metavar="DIR",
        help="also write the samples drawn as PNGs here (named as `sample --out` names "
        "them), e.g. to judge the same images with another classifier later",
    )
    conditional_cli.add_evaluate_options(p)
    _add_force(p, "an existing --out file (and earlier samples in --samples-out)")
    _add_metrics(p)
    p.set_defaults(func=cmd_evaluate)

    def guidance_source(p: argparse.ArgumentParser) -> None:
        _add_model_source(p)
        _add_sampling(p, 1000, n_min=2)
        _add_sampler(p)
        _add_metrics(p)

    conditional_cli.add_guidance_parser(sub, guidance_source)
    sub.choices["guidance"].set_defaults(
        func=lambda a: conditional_cli.cmd_guidance(
            a, load_for_sampling, _settings, sampling._extractor, _Bars()
        )
    )


def _add_steps_command(sub) -> None:
    """`animeddim steps`."""
    p = sub.add_parser("steps", help="steps study: standard KID vs reverse steps, per eta")
    _add_model_source(p)
    p.add_argument("--real", type=PATH, required=True, help="folder of real images")
    p.add_argument(
        "--steps",
        type=_int_list,
        default=[5, 10, 20, 50, 100],
        help="comma-separated step counts (default 5,10,20,50,100)",
    )
    p.add_argument(
        "--eta", type=_float_list, default=[0.0, 1.0], help="comma-separated etas (default 0,1)"
    )
    p.add_argument(
        "--samplers",
        default="ddim",
        help=f"comma-separated: {', '.join(SAMPLER_NAMES)} (default ddim)",
    )
    _add_clip(p)
    p.add_argument(
        "--n", type=_positive_int("n", 2), default=1000, help="images per setting (default 1000)"
    )
    p.add_argument("--seed", type=SEED, default=0, help="0 .. 2**63 - 1 (default 0)")
    _add_batch_size(p)
    p.add_argument(
        "--out", type=PATH, help="folder for steps.csv/.md/.png (default: the run folder)"
    )
    _add_force(p, "an earlier steps study in that folder")
    _add_sample_compile(p)
    _add_runtime(p)
    _add_metrics(p)
    p.set_defaults(func=cmd_steps)


def _add_invert_command(sub) -> None:
    """`animeddim invert`."""
    p = sub.add_parser("invert", help="DDIM inversion of real images, then regeneration")
    _add_model_source(p)
    p.add_argument(
        "--images", type=PATH, required=True, help="folder of images to invert, or one image file"
    )
    p.add_argument("--steps", type=STEPS, default=50, help="(default 50)")
    p.add_argument("--out", type=PATH, required=True, help="output folder")
    _add_batch_size(p)
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
    ends.add_argument("--seeds", type=int, nargs=2, metavar=("A", "B"), help="two seeds")
    ends.add_argument(
        "--images", type=PATH, nargs=2, metavar=("X", "Y"), help="two images (inverted)"
    )
    p.add_argument("--frames", type=_positive_int("frames", 2), default=16, help="(default 16)")
    p.add_argument("--steps", type=STEPS, help="(default 20; 50 for --images)")
    _add_sampler(p, recommended=False)
    p.add_argument("--out", type=PATH, required=True, help="FILE.png or FILE.gif: both are written")
    _add_batch_size(p)
    _add_force(p, "existing FILE.png / FILE.gif")
    _add_runtime(p)
    p.set_defaults(func=cmd_interpolate)


def _add_report_command(sub) -> None:
    """`animeddim report`."""
    p = sub.add_parser("report", help="paper figures and tables from run folders")
    p.add_argument(
        "--run", type=PATH, action="append", required=True, help="run folder (repeatable)"
    )
    p.add_argument(
        "--out", type=PATH, required=True, help="folder for report.md/.html, figures, tables"
    )
    p.add_argument(
        "--steps", type=STEPS, default=20, help="DDIM steps for Fig. 1 and samples (default 20)"
    )
    p.add_argument("--seed", type=SEED, default=0, help="0 .. 2**63 - 1 (default 0)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N | mps (default cpu)")
    _add_force(p, "an earlier report in --out")
    p.set_defaults(func=cmd_report)


def _add_export_command(sub) -> None:
    """`animeddim export`."""
    p = sub.add_parser("export", help="small sampling-only file: EMA weights in fp16 + config")
    p.add_argument("--run", type=PATH, required=True, help="run folder or checkpoint file")
    p.add_argument("--out", type=PATH, required=True, help="FILE.safetensors")
    p.add_argument(
        "--dtype",
        choices=["fp16", "bf16", "fp32"],
        default="fp16",
        help="weight precision (default fp16)",
    )
    p.add_argument(
        "--guidance",
        type=conditional_cli._guidance,
        metavar="W",
        help="a conditional model's recommended guidance weight, stored in the file: the "
        "default of conditional sampling from it (default: none stored, sampling uses 1)",
    )
    conditional_cli.add_guidance_interval(p, "none stored, sampling guides every step")
    conditional_cli.add_attribute_guidance(p, "none stored")
    p.add_argument(
        "--edit-guidance",
        type=conditional_cli._guidance,
        metavar="W",
        help="the guidance weight `edit` regenerates with from this file (a lower one keeps "
        "more of each face; default: none stored, edit uses --guidance's)",
    )
    p.add_argument(
        "--sampler",
        choices=list(SAMPLER_NAMES),
        help="the sampler the file recommends, stored in it: the default of sample, evaluate "
        "and the web app for it (with --steps; default: none stored, sampling uses ddim)",
    )
    p.add_argument(
        "--steps",
        type=STEPS,
        help="the step count the file recommends with --sampler (default: none stored, 20)",
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
    p.add_argument("--out", type=PATH, default="demo-out", help="output folder (default demo-out)")
    p.add_argument(
        "--train-minutes",
        type=float,
        default=3.0,
        help="length of the short training run (default 3)",
    )
    p.add_argument(
        "--eval-n",
        type=_positive_int("eval-n", 2),  # KID compares at least 2 images
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
    p.add_argument(
        "--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)"
    )
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
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="torch.compile mode of the tuned path (reduce-overhead: CUDA graphs; default default)",
    )
    p.add_argument(
        "--sample-batch-size",
        type=_positive_int("sample-batch-size"),
        default=None,
        help="images per sampling batch (default: --batch-size)",
    )
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddim", help="(default ddim)")
    p.add_argument(
        "--steps", type=_positive_int("steps"), default=20, help="sampling steps (default 20)"
    )
    p.add_argument(
        "--no-kid", dest="kid", action="store_false", help="skip the Inception feature throughput"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..attributes_cli import add_parsers as add_attributes_parsers

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
    p.add_argument(
        "--runs", type=PATH, metavar="DIR", help="also offer the run folders directly under DIR"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        type=_listen_host,
        help="address to listen on (default 127.0.0.1: this machine only; another warns)",
    )
    p.add_argument(
        "--port",
        type=_positive_int("port", 0, 65535),
        default=7860,
        help="port to listen on (default 7860; 0 picks a free one)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        dest="allow_hosts",
        metavar="NAME",
        type=_host_name,
        default=[],
        help="a name to answer to besides localhost and loopback addresses, and whose pages may "
        "post jobs: a reverse proxy's (repeat for several; default: none)",
    )
    _add_runtime(p)
    p.set_defaults(func=cmd_serve)


def _host_name(text: str) -> str:
    """A host name as a Host header carries it, without port (`example.org`, `::1`)."""
    name = text.strip().lower()
    if not name or any(c in name for c in "/: \t@") and not _is_ipv6(name):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a host name (give it without scheme or port: example.org)"
        )
    return name


def _listen_host(text: str) -> str:
    """An address or name of this machine to listen on (`127.0.0.1`, `0.0.0.0`, `::1`, also
    written `[::1]`); a URL, a port or nothing is refused (an empty host listened on every
    interface, a URL or `host:port` failed only once the app was set up)."""
    name = text.strip()
    if name.startswith("[") and name.endswith("]") and _is_ipv6(name[1:-1]):
        name = name[1:-1]
    try:
        return _host_name(name)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an address to listen on: give an address or name of this machine "
            "alone, without scheme or port (127.0.0.1: this machine only; 0.0.0.0: every "
            "network interface); the port goes in --port"
        ) from None


def _is_ipv6(name: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(name).version == 6
    except ValueError:
        return False
