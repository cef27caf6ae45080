"""``sample --attr/--guidance/--grid-by``, ``edit``, ``evaluate --attr`` and ``guidance``:
options -> `pipelines` calls (see the cli package's conventions: a user error is one line and
exit 2)."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config_files import expand_user as PATH
from .words import counted


def _guidance(text: str) -> float:
    try:
        w = float(text)
    except ValueError:
        w = math.nan
    if not (math.isfinite(w) and w >= 0.0):
        raise argparse.ArgumentTypeError(f"--guidance must be a number >= 0, got {text!r}")
    return w


def _guidance_interval(text: str) -> tuple[float, float]:
    from .config import ConfigError, parse_guidance_interval

    try:
        return parse_guidance_interval(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(f"--guidance-interval: {e}") from None


def add_guidance_interval(p: argparse.ArgumentParser, default: str) -> None:
    """--guidance-interval LO,HI: the noise levels where the guidance weight applies."""
    p.add_argument(
        "--guidance-interval",
        type=_guidance_interval,
        default=None,
        metavar="LO,HI",
        help="apply the guidance weight only at noise levels sigma = noise/signal rate in "
        "(LO, HI], plain conditional elsewhere (Kynkaanniemi et al. 2024); e.g. 1,inf skips "
        f"the last, low-noise steps; 0,inf guides every step (default: {default})",
    )


def _attribute_weights(text: str) -> dict[str, float]:
    from .conditioning import parse_attribute_weights
    from .config import ConfigError

    try:
        return parse_attribute_weights(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(f"--attr-guidance: {e}") from None


FILE_WEIGHTS = "the ones the model file recommends, if --guidance is the file's weight, else none"


def add_attribute_guidance(p: argparse.ArgumentParser, default: str) -> None:
    """--attr-guidance NAME=W,...: per-attribute guidance weights."""
    p.add_argument(
        "--attr-guidance",
        type=_attribute_weights,
        default=None,
        metavar="NAME=W,...",
        help="give these attributes their own guidance weight in place of --guidance's (e.g. "
        "hair_len=16: that attribute is pushed harder, given the others; one more network "
        "call per step for each); 'none': every attribute at --guidance's weight "
        f"(default: {default})",
    )


def _guidance_list(text: str) -> list[float]:
    """--w: weights >= 0; an empty item ('0,,3') is refused, not dropped: which was meant?"""
    try:
        return [_guidance(x.strip()) for x in text.split(",")]
    except argparse.ArgumentTypeError:  # its words name --guidance, not the --w typed
        raise argparse.ArgumentTypeError(
            f"--w needs comma-separated weights >= 0 (e.g. 0,1,2,3,5), got {text!r}"
        ) from None


def _batch_size(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"batch-size must be an integer >= 1, got {text!r}")
    return n


def _add_classifier(
    p: argparse.ArgumentParser, does: str = "judges the samples", when: str = ""
) -> None:
    p.add_argument(
        "--classifier",
        type=PATH,
        metavar="FILE",
        help=f"attribute classifier that {does} (default: the shipped avatar one{when})",
    )


def add_evaluate_options(p: argparse.ArgumentParser) -> None:
    """`evaluate --attr/--guidance/--classifier`: attribute accuracy and KID against the real
    images with the asked values."""
    add_sample_options(p)
    p.set_defaults(attr=[])
    for action in p._actions:
        if action.dest == "attr":
            action.help = (
                "draw a conditional model under NAME=VALUE (repeatable) and also report "
                "attribute accuracy (the classifier's own accuracy beside it) and KID against "
                "the --real images whose labels.csv has that value"
            )
    p.add_argument(
        "--attrs-from",
        type=PATH,
        metavar="FILE.csv",
        help="draw image i of a conditional model under row i of this labels CSV (cycling; "
        "e.g. --real's own labels.csv; 'training': the model's own training labels) and also "
        "report, per attribute, the share drawn as asked (overall and per value)",
    )
    _add_classifier(p)


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
        default=None,
        metavar="W",
        help="classifier-free guidance weight: eps_null + W (eps_cond - eps_null); 1 = plain "
        "conditional, 0 = null (default: the weight the model file recommends, else 1)",
    )
    add_guidance_interval(p, "the interval the model file recommends, else 0,inf")
    add_attribute_guidance(p, FILE_WEIGHTS)


def add_edit_parser(sub: Any, setup: Callable[[argparse.ArgumentParser], None], steps) -> None:
    """Register ``edit``; `setup` adds the model source and runtime options."""
    p = sub.add_parser("edit", help="change attributes of images (DDIM inversion, regeneration)")
    setup(p)
    p.add_argument(
        "--images", type=PATH, required=True, help="folder of images to edit, or one image file"
    )
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
        type=PATH,
        metavar="FILE.csv|folders",
        help="the images' own labels, inverted under (default: none, inverted under null)",
    )
    p.add_argument("--steps", type=steps, default=50, help="DDIM steps (default 50)")
    p.add_argument(
        "--guidance",
        type=_guidance,
        default=None,
        metavar="W",
        help="of the regeneration (default: the model file's recommended weight for edits, "
        "else for sampling, else 1)",
    )
    add_guidance_interval(p, "the interval the model file recommends, else 0,inf")
    add_attribute_guidance(p, FILE_WEIGHTS)
    p.add_argument(
        "--out",
        type=PATH,
        required=True,
        help="folder for after/, pairs/, grid.png and edit_summary.json",
    )
    p.add_argument("--batch-size", type=_batch_size, default=64, help="(default 64)")
    _add_classifier(p, "judges what the edits keep", ", if it knows the model's attributes")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier edit in --out (default: an existing output is an error)",
    )


def asked(a: argparse.Namespace) -> dict[str, str]:
    from .conditioning import parse_assignments

    return parse_assignments(a.attr, "--attr")


def sample_conditional(a: argparse.Namespace, loaded, settings) -> Any:
    """The `pipelines.folder.Job` of `sample` with --attr/--grid-by/--attrs-from; what its
    images are asked, for the note of an unfinished --out: {"attributes": the options and a
    digest of the codes they give, "guidance": its words}; and the lines that say so (printed
    once the outputs are found fit: a refused one is then the only line)."""
    from .outputs import sample_names
    from .pipelines import attribute_codes, guidance_words, rows_from
    from .pipelines.conditional import grid_rows
    from .pipelines.folder import image_job

    resolve_guidance(a, loaded)
    words = guidance_words(loaded, settings, a.guidance)
    said = [words]
    if a.grid_by:
        codes, values = grid_rows(loaded, a.grid_by, asked(a))
        said.append(f"rows: {a.grid_by} = {', '.join(values)}; columns: images 0..{a.n - 1}")
        names = grid_names(a.grid_by, values, a.seed, a.n)
        job = image_job(loaded, settings, names, a.n, codes, a.guidance, row_length=a.n)
        given = f"--grid-by {a.grid_by}"
    else:
        if a.attrs_from:
            fixed_values = asked(a)
            codes = rows_from(loaded, a.attrs_from, fixed_values)
            where = "the model's training labels" if a.attrs_from == "training" else a.attrs_from
            fixed = "".join(f", {k}={v} in every row" for k, v in fixed_values.items())
            said.append(
                f"attributes: {counted(len(codes), 'row')} of {where}{fixed}, image i gets "
                f"row i mod {len(codes)}"
            )
        else:
            codes = attribute_codes(loaded, asked(a))[None]  # --attr: one row for every image
        names = sample_names(a.seed, a.n)
        job = image_job(loaded, settings, names, min(8, a.n), codes, a.guidance)
        given = f"--attrs-from {a.attrs_from}" if a.attrs_from else ""
    return job, asked_note(a, given, codes, words), said


def asked_note(a: argparse.Namespace, given: str, codes, words: str) -> dict[str, str]:
    """What the images of `sample --out` or `evaluate --samples-out` are asked, for the note
    of an unfinished folder: {"attributes": the options (`given`, then each --attr) and a
    digest of the codes they give, "guidance": its words}."""
    import hashlib

    given = " ".join([given, *(f"--attr {x}" for x in a.attr or ())]).strip()
    digest = hashlib.sha256(codes.cpu().numpy().tobytes()).hexdigest()[:16]
    return {"attributes": f"{given} (codes sha256:{digest})", "guidance": words}


def grid_names(attribute: str, values: list[str], seed: int, n: int) -> list[str]:
    """PNG names of a --grid-by grid, row by row: ATTR-VALUE-seedS-IIIIII.png (image index
    I of seed S drawn with ATTR=VALUE). Characters a file name should not hold become '_'
    ('#' of a colour is dropped); values that then coincide get their row number."""
    import re

    def slug(text: str) -> str:
        return re.sub(r"[^\w.-]", "_", text.lstrip("#")) or "_"

    slugs = [slug(v) for v in values]
    if len(set(slugs)) < len(slugs):
        slugs = [f"{k:02d}_{s}" for k, s in enumerate(slugs)]
    return [f"{slug(attribute)}-{s}-seed{seed}-{i:06d}.png" for s in slugs for i in range(n)]


def cmd_edit(a: argparse.Namespace, load, settings_of, bars) -> int:
    from . import outputs
    from .conditioning import parse_assignments
    from .pipelines import edit, guidance_words
    from .pipelines.conditional import EDIT_NAMES, attribute_codes

    changes = parse_assignments(a.changes, "--set")
    outputs.not_inside(a.out, [a.images], "--out", outputs.images_what(a.images))
    earlier = outputs.signature(
        outputs.earlier_outputs(a.out, EDIT_NAMES, a.force, recursive_in=("after", "pairs"))
    )
    loaded, device = load(a.run, a.model, a.device)
    attribute_codes(loaded, changes)  # an attribute it lacks: refused before the line below
    if a.guidance is None:  # the file's weight for edits, else for sampling, else 1
        from .pipelines import default_edit_guidance

        a.guidance = default_edit_guidance(loaded)
    print(f"regenerating with {guidance_words(loaded, settings_of(a, device), a.guidance)}")
    classifier = _edit_classifier(a, loaded)
    t = time.perf_counter()
    r = edit(
        loaded,
        a.images,
        a.out,
        changes,
        steps=a.steps,
        guidance=a.guidance,
        labels=a.labels,
        settings=settings_of(a, device),
        classifier=classifier,
        progress=bars,
    )
    outputs.remove_unchanged(earlier)  # --force: no edit of an earlier image is left
    what = ", ".join(f"{k}={v}" for k, v in changes.items())
    print(
        f"{counted(r['images'], 'image')} edited ({what}, {counted(a.steps, 'step')}) in "
        f"{time.perf_counter() - t:.0f}s: after/, pairs/ (before | after), grid.png and "
        f"edit_summary.json in {a.out}"
    )
    if "preservation" in r:
        print("\n".join(preservation_lines(r["preservation"])))
    elif classifier is None:
        print(
            "preservation not measured: the shipped avatar classifier knows none of the "
            "model's attributes (give --classifier FILE)"
        )
    return 0


def _edit_classifier(a: argparse.Namespace, loaded) -> Any:
    """The classifier that judges an edit: --classifier, else the shipped avatar one when it
    knows one of the model's attributes, else None."""
    from .attributes import load_classifier
    from .pipelines import vocabulary

    if a.classifier:
        return load_classifier(a.classifier)[0]
    net = load_classifier(None)[0]
    return net if set(net.config.vocab) & set(vocabulary(loaded)) else None


def preservation_lines(p: dict[str, Any]) -> list[str]:
    """What `edit` prints of its preservation summary."""
    lines = []
    if p["preserved"]:
        per = ", ".join(f"{k} {100 * v:.1f}%" for k, v in p["preserved"].items())
        lines.append(
            f"untouched attributes classified the same before and after: "
            f"{100 * p['preserved_overall']:.1f}% overall ({per})"
        )
    for k, v in p["changed_to_value"].items():
        lines.append(f"edits classified with the set {k}: {100 * v:.1f}%")
    return lines


def resolve_guidance(a: argparse.Namespace, loaded) -> float:
    """--guidance as given, else the model's recommended weight (`default_guidance`); sets
    a.guidance and returns it."""
    from .pipelines import default_guidance

    if a.guidance is None:
        a.guidance = default_guidance(loaded)
    return a.guidance


def check_guidance_has_conditions(
    guidance: float | None,
    conditioned: bool,
    needs: str,
    interval: Any = None,
    weights: dict[str, float] | None = None,
) -> None:
    """A guidance weight other than 1, or a guidance interval, on an unconditional draw is
    refused, not ignored (a weight not given is the model's default, which only conditional
    sampling uses)."""
    from .conditioning import attribute_weights_text
    from .config import ConfigError, guidance_interval_text

    if guidance is not None and guidance != 1.0 and not conditioned:
        raise ConfigError(
            f"--guidance {guidance:g} needs {needs}: without it the model draws "
            "unconditionally and guidance has nothing to weigh"
        )
    if interval is not None and not conditioned:
        raise ConfigError(
            f"--guidance-interval {guidance_interval_text(interval)} needs {needs}: without "
            "it the model draws unconditionally and there is no guidance to place"
        )
    if weights and not conditioned:
        raise ConfigError(
            f"--attr-guidance {attribute_weights_text(weights)} needs {needs}: without it the "
            "model draws unconditionally and no attribute is asked to weigh"
        )


def evaluate_target(a: argparse.Namespace, loaded) -> tuple[Any, Any]:
    """The `pipelines.ControlTarget` of `evaluate --attr` or the `pipelines.MixTarget` of
    `--attrs-from` (with any --attr set in every row), the other None, checked before any
    image is drawn."""
    check_guidance_has_conditions(
        a.guidance,
        bool(a.attr or a.attrs_from),
        "--attr NAME=VALUE or --attrs-from FILE.csv",
        a.guidance_interval,
        a.attr_guidance,
    )
    from .pipelines import control_target, mix_target

    if a.attr or a.attrs_from:
        resolve_guidance(a, loaded)
    else:
        a.guidance = 1.0
    if a.attrs_from:
        return None, mix_target(loaded, a.attrs_from, a.classifier, asked(a))
    if not a.attr:
        return None, None
    from .distributed import is_main

    # process 0 alone measures the real side, so it alone reads --real's labels: the others
    # draw under what is asked, and --real need be on process 0's node only
    return control_target(loaded, a.real, asked(a), a.classifier, read_labels=is_main()), None


def control_lines(c: dict[str, Any]) -> list[str]:
    """What `evaluate --attr` prints of its "attributes_asked" summary."""
    on = c["classifier_accuracy_on"]
    lines = []
    for attr, acc in c["accuracy"].items():
        ceiling = c["classifier_accuracy"].get(attr)
        beside = "?" if ceiling is None else f"{100 * ceiling:.1f}%"
        lines.append(
            f"attribute accuracy {attr}={c['asked'][attr]}: {100 * acc:.1f}% of the samples "
            f"(the classifier's own {on} accuracy on real images: {beside})"
        )
    what = ", ".join(f"{k}={v}" for k, v in c["asked"].items())
    lines.append(
        f"KID (standard protocol) against the {c['n_real']} real images with {what}: "
        f"{c['kid_mean']:.5f} ± {c['kid_std']:.5f}"
    )
    return lines


def mix_lines(m: dict[str, Any]) -> list[str]:
    """What `evaluate --attrs-from` prints of its "attributes_from" summary."""
    on = m["classifier_accuracy_on"]
    lines = [f"attributes asked per image from {m['labels']} ({counted(m['rows'], 'row')}):"]
    for attr, r in m["attributes"].items():
        if r["accuracy"] is None:
            lines.append(f"  {attr}: no image was asked a value the classifier knows")
            continue
        worst = min(r["per_value"].items(), key=lambda kv: kv[1][0])
        ceiling = m["classifier_accuracy"].get(attr)
        beside = "?" if ceiling is None else f"{100 * ceiling:.1f}%"
        lines.append(
            f"  attribute accuracy {attr}: {100 * r['accuracy']:.1f}% of "
            f"{counted(r['n'], 'sample')}, "
            f"{100 * r['mean_per_value']:.1f}% averaged over its "
            f"{counted(len(r['per_value']), 'value')} "
            f"(lowest {worst[0]}: {100 * worst[1][0]:.1f}% of {worst[1][1]}); the "
            f"classifier's own {on} accuracy on real images: {beside}"
        )
    return lines


def add_guidance_parser(sub: Any, setup: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``guidance``; `setup` adds the model source, sampling, runtime and metrics
    options."""
    p = sub.add_parser(
        "guidance", help="guidance study: attribute accuracy and standard KID per weight w"
    )
    setup(p)
    p.add_argument("--real", type=PATH, required=True, help="folder of real images with labels.csv")
    p.add_argument(
        "--attr",
        action="append",
        required=True,
        metavar="NAME=VALUE",
        help="the attribute value asked (repeatable)",
    )
    p.add_argument(
        "--w",
        type=_guidance_list,
        default=[0.0, 1.0, 2.0, 3.0, 5.0],
        dest="weights",
        metavar="W,W,...",
        help="comma-separated guidance weights (default 0,1,2,3,5)",
    )
    add_guidance_interval(p, "the interval the model file recommends, else 0,inf")
    add_attribute_guidance(p, "none: each weight of --w guides every attribute")
    _add_classifier(p)
    p.add_argument("--out", type=PATH, help="folder for guidance.csv/.md (default: the run folder)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier guidance study in that folder (default: an existing output "
        "is an error)",
    )


def cmd_guidance(a: argparse.Namespace, load, settings_of, extractor_of, bars) -> int:
    from . import outputs
    from .checkpoint import no_run_to_write_into
    from .cli.common import need_folder, once
    from .config import ConfigError
    from .pipelines import GUIDANCE_NAMES, control_target, guidance_study

    once(a.weights, "--w")  # a weight twice would be drawn and measured twice, two rows
    out = Path(a.out) if a.out else (Path(a.run) if a.run and Path(a.run).is_dir() else None)
    if out is None:
        raise ConfigError(no_run_to_write_into("--out DIR", a.run))
    need_folder(a.real, "real-image folder")  # missing, a file, an archive, ...
    outputs.earlier_outputs(out, GUIDANCE_NAMES, a.force)  # each is replaced whole
    if a.attr_guidance is None:  # a sweep of w: every attribute at each w unless told
        a.attr_guidance = {}
    loaded, device = load(a.run, a.model, a.device)
    target = control_target(loaded, a.real, asked(a), a.classifier)
    t = time.perf_counter()
    guidance_study(
        loaded,
        target,
        weights=a.weights,
        n=a.n,
        settings=settings_of(a, device, loaded),
        extractor=extractor_of(a),
        out_dir=out,
        cache_dir=Path(a.cache_dir) if a.cache_dir else None,
        progress=bars,
    )
    print(
        f"guidance study ({counted(len(a.weights), 'weight')}, {counted(a.n, 'image')} each, "
        f"{time.perf_counter() - t:.0f}s): {out / 'guidance.csv'}, {out / 'guidance.md'}"
    )
    return 0
