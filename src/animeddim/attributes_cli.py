"""``animeddim attributes train|coverage``: options -> library calls (see cli.py's conventions)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import LABELS_MISSING
from .config_files import expand_user as PATH
from .words import counted


def add_parsers(sub: Any, positive_int: Callable[..., Callable[[str], int]]) -> None:
    """Register ``attributes train`` and ``attributes coverage`` on the CLI's subparsers."""
    from .attributes_config import ClassifierConfig, TrainSettings

    d, c = TrainSettings(), ClassifierConfig()
    p_attr = sub.add_parser("attributes", help="attribute classifier and mode coverage")
    attr_sub = p_attr.add_subparsers(
        dest="attributes_command", required=True, metavar="WHAT", parser_class=type(p_attr)
    )
    p = attr_sub.add_parser("train", help="train an attribute classifier on labelled images")
    p.add_argument(
        "--data", type=PATH, nargs="+", required=True, metavar="DIR", help="labelled folder(s)"
    )
    p.add_argument(
        "--labels",
        type=PATH,
        help="'folders' (first-level subfolder = class) or FILE.csv (file, attribute columns) "
        "(default: DIR/labels.csv)",
    )
    p.add_argument(
        "--labels-missing",
        choices=LABELS_MISSING,
        default="error",
        help="an image without a label row, or an empty entry: error, or null (left out of "
        "the loss of every attribute, or of that one) (default error)",
    )
    p.add_argument(
        "--out",
        type=PATH,
        default="attributes.safetensors",
        help="classifier file to write; its accuracy goes beside it as .json "
        "(default attributes.safetensors)",
    )
    p.add_argument(
        "--held-out", type=PATH, metavar="DIR", help="labelled folder to measure accuracy on"
    )
    p.add_argument(
        "--image-size",
        type=positive_int("image-size", 8),
        default=c.image_size,
        help=f"pixels (default {c.image_size})",
    )
    p.add_argument(
        "--epochs", type=positive_int("epochs"), default=d.epochs, help=f"(default {d.epochs})"
    )
    p.add_argument(
        "--batch-size",
        type=positive_int("batch-size"),
        default=d.batch_size,
        help=f"(default {d.batch_size})",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=d.learning_rate,
        help=f"AdamW peak learning rate (default {d.learning_rate})",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help=f"share held out of --data (default {d.val_fraction})",
    )
    p.add_argument(
        "--seed",
        type=positive_int("seed", 0, 2**63 - 1),
        default=d.seed,
        help=f"in 0 .. 2**63 - 1 (default {d.seed})",
    )
    p.add_argument(
        "--final-stride",
        type=int,
        choices=[1, 2],
        default=c.final_stride,
        help=f"stride of the last stage; 1 pools from a 2x finer map (default {c.final_stride})",
    )
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=d.flip,
        help="mirror half the training images, as `train` does by default: a model trained "
        "with flips draws mirrored faces; --no-flip where left and right differ in meaning "
        "(default on)",
    )
    p.add_argument(
        "--crop",
        action="append",
        default=[],
        metavar="ATTR=TOP,LEFT,HEIGHT,WIDTH",
        help="read ATTR from this region (pixels at --image-size) with its own full-resolution "
        "CNN, and from the mirrored region with --flip: for a feature of a few pixels at a "
        "known place, e.g. the avatars' earrings=22,40,28,20 (repeatable)",
    )
    p.add_argument(
        "--init",
        type=PATH,
        metavar="CLASSIFIER",
        help="start from this classifier file ('attributes-avatars': the shipped one): its "
        "trunk and every attribute it already reads the same way are kept unchanged; only the "
        "--crop attributes are trained (its image size, widths and final stride are used)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_train)

    p = attr_sub.add_parser(
        "coverage", help="classified attribute histograms of generated images vs real labels"
    )
    p.add_argument("samples", type=PATH, help="folder of generated images")
    p.add_argument("--real", type=PATH, required=True, help="folder of real images with labels.csv")
    p.add_argument(
        "--classifier", type=PATH, help="classifier file (default: the shipped avatar one)"
    )
    p.add_argument(
        "--out", type=PATH, help="folder for coverage.json/.csv/.md/.png (default SAMPLES-coverage)"
    )
    p.add_argument(
        "--force", action="store_true", help="replace an earlier coverage in the --out folder"
    )
    p.set_defaults(func=cmd_coverage)


def cmd_train(a: argparse.Namespace) -> int:
    from .attributes import save_classifier
    from .cli import CliError
    from .cli.common import EXIT_INTERRUPTED, EXIT_TERMINATED, _prog, need_folder
    from .interrupts import Terminated, deferred
    from .io import write_text_atomic
    from .outputs import distinct, new_file

    if not 0 <= a.val_fraction < 1:
        raise CliError(f"--val-fraction must be in [0, 1), got {a.val_fraction}")
    if not (math.isfinite(a.lr) and a.lr > 0):  # inf trained to NaN weights and saved them
        raise CliError(f"--lr must be a finite number > 0, got {a.lr}")
    out_json = Path(a.out).with_suffix(".json")
    distinct([("--out", Path(a.out)), ("its accuracy JSON", out_json)])
    new_file(a.out, a.force)
    new_file(out_json, a.force)
    for d in [*a.data, *([a.held_out] if a.held_out else [])]:
        need_folder(d)
    crops = parse_crops(a.crop)
    t = time.perf_counter()
    pending = pending_path(a.out)
    done: list[int] = []  # the epochs the pending file holds
    try:
        net, summary, n_images = _train(a, crops, pending, done)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        stop = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        kept = (
            f"the training so far is kept (epoch {done[-1]} of {a.epochs}, in {pending}); "
            "run the same command again to go on from there"
            if done
            else f"nothing saved (stopped in the first epoch; {a.out} was not written); run "
            "the same command again to train it"
        )
        print(f"{_prog()}: {stop}: {kept}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED
    with deferred():  # the classifier and its JSON are written together
        save_classifier(a.out, net, {"training": summary})
        write_text_atomic(out_json, json.dumps(summary, indent=2) + "\n")
    pending.unlink(missing_ok=True)
    print(
        f"classifier: {a.out} ({counted(n_images, 'image')}, "
        f"{summary['train_seconds']:.0f}s training, {time.perf_counter() - t:.0f}s in all); "
        f"accuracy in {out_json}"
    )
    for what in ("held_out_accuracy", "val_accuracy"):
        if what in summary:
            print(
                f"{what.replace('_', ' ')}: "
                + ", ".join(f"{k} {100 * v:.1f}%" for k, v in summary[what].items())
            )
            break
    return 0


def pending_path(out: str | Path) -> Path:
    """Where `attributes train --out OUT` keeps its training state after each epoch until the
    classifier is written: a stopped call's work, which the same command goes on from."""
    return Path(out).with_name(f".{Path(out).name}.animeddim-pending.pt")


def _train(
    a: argparse.Namespace, crops: dict[str, tuple[int, int, int, int]], pending: Path, done: list
) -> tuple[Any, dict[str, Any], int]:
    """Read the labelled folders, train the classifier and measure it: the network, the
    summary its JSON holds and the number of images read. Only the `pending` training state
    is written, after each epoch (its epoch appended to `done`); one of the same images and
    options found there is gone on from."""
    from .attributes import (
        ClassifierConfig,
        TrainSettings,
        config_record,
        labelled_folders,
        train_classifier,
    )
    from .cli import CliError

    init = None
    if a.init:
        from .attributes import SHIPPED_CLASSIFIER, load_classifier

        init, _ = load_classifier(None if a.init == SHIPPED_CLASSIFIER else a.init)
        a.image_size = init.config.image_size
        if not crops:
            raise CliError("--init keeps what the classifier reads: give a --crop to train")
    images, codes, vocab = labelled_folders(
        a.data,
        a.image_size,
        labels=a.labels,
        missing=a.labels_missing,
        vocab=dict(init.config.vocab) if init is not None else None,
    )
    settings = TrainSettings(
        epochs=a.epochs,
        batch_size=a.batch_size,
        learning_rate=a.lr,
        val_fraction=a.val_fraction,
        seed=a.seed,
        flip=a.flip,
    )
    net, summary = train_classifier(
        images,
        codes,
        vocab,
        config=ClassifierConfig(image_size=a.image_size, final_stride=a.final_stride, crops=crops),
        settings=settings,
        init=init,
        progress=True,
        **_resumable(a, images, codes, vocab, pending, done),
    )
    summary["data"] = [str(Path(d).resolve()) for d in a.data]
    if a.init:
        summary["init"] = a.init
    cfg = net.config
    summary["config"] = {
        **config_record(cfg),
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    if a.held_out:
        summary.update(held_out_accuracy(net, a.held_out))
    return net, summary, len(images)


def _resumable(a: argparse.Namespace, images, codes, vocab, pending: Path, done: list) -> dict:
    """`train_classifier`'s resume (the state in `pending` when it was saved for the same
    images, labels and options) and on_epoch (saving the state there)."""
    import hashlib

    import torch

    from .interrupts import deferred
    from .io import atomic_file

    digest = hashlib.sha256(images.tobytes())
    digest.update(codes.tobytes() + json.dumps(vocab, sort_keys=True).encode())
    options = ("epochs", "batch_size", "lr", "val_fraction", "seed", "flip", "image_size")
    options += ("final_stride", "crop", "init")
    key = json.dumps(
        {"images": digest.hexdigest(), **{k: getattr(a, k, None) for k in options}},
        sort_keys=True,
    )
    resume = None
    if pending.is_file():
        try:
            held = torch.load(pending, weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged or foreign file: trained from the start
            held = {}
        if not isinstance(held, dict):  # a file of that name saved by something else
            held = {}
        if held.get("key") == key:
            resume = held["state"]
            done.append(int(resume["epoch"]))
            note = f"going on from epoch {done[-1]} of {a.epochs} ({pending})"
            print(f"note: {note}", file=sys.stderr)
        else:
            print(
                f"note: {pending} holds the training of other images or options: "
                "training from the start (it is replaced)",
                file=sys.stderr,
            )

    def on_epoch(state: dict) -> None:
        with deferred():  # a stop lands after both: the stop's line names the epoch kept
            with atomic_file(pending) as f:
                torch.save({"key": key, "state": state}, f)
            done.append(state["epoch"])

    return {"resume": resume, "on_epoch": on_epoch}


def parse_crops(specs: list[str]) -> dict[str, tuple[int, int, int, int]]:
    """``["earrings=22,40,28,20", ...]`` -> ``{"earrings": (22, 40, 28, 20)}``."""
    from .cli import CliError

    crops: dict[str, tuple[int, int, int, int]] = {}
    for spec in specs:
        name, _, box = spec.partition("=")
        try:
            numbers = tuple(int(v) for v in box.split(","))
        except ValueError:
            numbers = ()
        if not name or len(numbers) != 4:
            raise CliError(
                f"--crop {spec!r}: expected ATTR=TOP,LEFT,HEIGHT,WIDTH in whole pixels, "
                "e.g. earrings=22,40,28,20"
            )
        if name in crops:
            raise CliError(f"--crop {name!r} is given twice")
        crops[name] = numbers  # type: ignore[assignment]
    return crops


def held_out_accuracy(net: Any, folder: str | Path) -> dict[str, Any]:
    """Accuracy per attribute on a labelled folder (its labels.csv), as rendered and mirrored
    (a model trained with flips draws both)."""
    from .attributes import accuracy, classify
    from .coverage import real_set

    images, codes = real_set(net, folder)
    mirrored = images[:, :, ::-1].copy()
    return {
        "held_out": str(Path(folder).resolve()),
        "held_out_images": len(images),
        "held_out_accuracy": accuracy(classify(net, images), codes, net.config.vocab),
        "held_out_accuracy_mirrored": accuracy(classify(net, mirrored), codes, net.config.vocab),
    }


def cmd_coverage(a: argparse.Namespace) -> int:
    from .attributes import load_classifier
    from .cli import CliError
    from .cli.common import need_folder
    from .coverage import coverage_of_folders, write_coverage

    for d in (a.samples, a.real):
        need_folder(d)
    if not (Path(a.real) / "labels.csv").is_file():
        raise CliError(f"real folder {a.real!r} has no labels.csv")
    from .outputs import COVERAGE_NAMES, earlier_outputs, not_inside

    samples = Path(a.samples)
    out = Path(a.out) if a.out else samples.with_name(samples.name + "-coverage")
    not_inside(out, [samples], "--out", "the samples folder")
    not_inside(out, [a.real], "--out", "the --real folder")
    earlier_outputs(out, COVERAGE_NAMES, a.force)  # each is replaced whole
    net, _ = load_classifier(a.classifier)
    result = coverage_of_folders(net, a.samples, a.real)
    write_coverage(result, out)
    print(coverage_summary(result))
    print(f"written: {out}/coverage.json, .csv, .md, .png")
    return 0


def coverage_summary(result: dict[str, Any]) -> str:
    """One line per attribute: TV and the classifier's floor."""
    from .coverage import summary_rows

    lines = [
        f"coverage: {result['n_samples']} generated vs {counted(result['n_real'], 'real image')}"
    ]
    for r in summary_rows(result):
        floor = "" if r["tv_floor"] is None else f" (floor {r['tv_floor']:.3f})"
        lines.append(f"  {r['attribute']:<12} TV {r['tv']:.3f}{floor}")
    return "\n".join(lines)
