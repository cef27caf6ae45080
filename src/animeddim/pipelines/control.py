"""Measuring control: how often a conditional model draws what it is asked (attribute
accuracy, judged by an attribute classifier whose own held-out accuracy is the ceiling), KID
against the real images that have the asked values, and the guidance study (both per
classifier-free guidance weight w)."""

from __future__ import annotations

import csv
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import metrics
from ..checkpoint import LoadedModel
from ..conditioning import UnknownAttribute, encode
from ..config import GUIDE_ALWAYS
from ..config import guidance_interval_words as words
from ..data import DataError
from ..io import write_text_atomic
from ..labels import quoted
from ..words import counted
from .conditional import draw_conditional, guidance_interval, per_image_codes, vocabulary
from .core import Progress, SampleSettings, _nchw, sampling_net


@dataclass
class ControlTarget:
    """What is asked of a conditional model and how it is judged.

    :param asked: attribute -> value, known to the model and to the classifier.
    :param classifier: an `attributes.AttributeNet`.
    :param ceiling: per asked attribute, the classifier's own accuracy on real images
        (None where its file records none); `ceiling_kind` says which split it was.
    :param real_files: the real images labelled with every asked value (sorted); empty
        where the labels were not read (`control_target`'s read_labels).
    """

    asked: dict[str, str]
    classifier: Any
    ceiling: dict[str, float | None]
    ceiling_kind: str
    real: Path
    real_files: list[Path]

    def describe(self) -> str:
        return ", ".join(f"{a}={v}" for a, v in self.asked.items())


def control_target(
    loaded: LoadedModel,
    real: str | Path,
    asked: Mapping[str, str],
    classifier: str | Path | None = None,
    read_labels: bool = True,
) -> ControlTarget:
    """Check what is asked against the model, the classifier and the real folder's labels.

    :param classifier: a classifier file (None: the shipped avatar one).
    :param read_labels: False: the real folder is not looked at (no check of its labels,
        `real_files` empty), for a process that only draws under what is asked (under
        torchrun `evaluate` reads them on process 0 alone, which measures the real side).
    :raises UnknownAttribute: an unconditional model, or an attribute or value the model or
        the classifier does not know.
    :raises DataError: the real folder has no labels.csv, no such column, or fewer than 2
        images with the asked values.
    """
    from ..attributes import load_classifier

    if not asked:
        raise UnknownAttribute("give at least one --attr NAME=VALUE")
    vocab = vocabulary(loaded)
    if not vocab:
        raise UnknownAttribute(
            "the model is unconditional: attribute accuracy needs a model trained with labels"
        )
    encode(vocab, asked)
    real = Path(real)
    labels = real / "labels.csv"
    if read_labels and not labels.is_file():
        raise DataError(
            f"real folder '{real}' has no labels.csv: --attr compares with the real images "
            "that have the asked values"
        )
    net, meta = load_classifier(classifier)
    for a, v in asked.items():
        known = net.config.vocab.get(a)
        if known is None:
            raise UnknownAttribute(
                f"the attribute classifier knows no attribute {a!r}; it knows "
                f"{quoted(net.config.vocab)} (give --classifier FILE)"
            )
        if v not in known:
            raise UnknownAttribute(
                f"the attribute classifier knows no {a} value {v!r}; known: {quoted(known)}"
            )
    ceiling, kind = _ceiling(meta, asked)
    return ControlTarget(
        asked=dict(asked),
        classifier=net,
        ceiling=ceiling,
        ceiling_kind=kind,
        real=real,
        real_files=_files_with(real, labels, asked) if read_labels else [],
    )


def _ceiling(meta: Mapping[str, Any], attrs: Any) -> tuple[dict[str, float | None], str]:
    """The classifier's own accuracy per attribute, as its file records it, and on what.

    Where the file also records it on the mirrored held-out images (`attributes train`
    does), the lower of the two: a model trained with flips draws faces both ways."""
    training = meta.get("training", {})
    kind = "held-out" if "held_out_accuracy" in training else "validation"
    accuracy = training.get("held_out_accuracy") or training.get("val_accuracy") or {}
    mirrored = training.get("held_out_accuracy_mirrored") if kind == "held-out" else None
    if not mirrored:
        return {a: accuracy.get(a) for a in attrs}, kind

    def lower(a: str) -> float | None:
        return min((d[a] for d in (accuracy, mirrored) if d.get(a) is not None), default=None)

    return {a: lower(a) for a in attrs}, "held-out (the lower of plain and mirrored)"


@dataclass
class MixTarget:
    """Per-image asks (`evaluate --attrs-from`): image i is asked row i mod R of `codes`, and
    each attribute the model and the classifier both know is judged.

    :param codes: [R x A] in the model's vocabulary (`codes_from_labels`; NULL: not asked).
    :param vocab: the model's vocabulary.
    :param judged: the attributes judged (model and classifier know them), model order.
    """

    labels: str
    codes: torch.Tensor
    vocab: dict[str, list[str]]
    classifier: Any
    judged: list[str]
    ceiling: dict[str, float | None]
    ceiling_kind: str


def mix_target(
    loaded: LoadedModel,
    labels: str | Path,
    classifier: str | Path | None = None,
    asked: Mapping[str, str] | None = None,
) -> MixTarget:
    """Check a labels CSV (or "training"; `asked` set in every row: `rows_from`) against the
    model and the classifier.

    :raises UnknownAttribute: an unconditional model, a bad labels file, or a classifier that
        knows none of the model's attributes.
    """
    from ..attributes import load_classifier
    from .conditional import rows_from

    codes = rows_from(loaded, labels, asked)
    vocab = vocabulary(loaded)
    net, meta = load_classifier(classifier)
    judged = [a for a in vocab if a in net.config.vocab]
    if not judged:
        raise UnknownAttribute(
            f"the attribute classifier knows none of the model's attributes "
            f"({quoted(vocab)}); it knows {quoted(net.config.vocab)} (give --classifier)"
        )
    ceiling, kind = _ceiling(meta, judged)
    return MixTarget(str(labels), codes, vocab, net, judged, ceiling, kind)


def mix_accuracy(target: MixTarget, images_u8: torch.Tensor) -> dict[str, Any]:
    """How often image i (asked row i mod R) is classified as asked, per judged attribute:
    over the images asked a value the classifier knows ("accuracy", "n"), per asked value
    ("per_value": value -> [accuracy, n]) and their mean ("mean_per_value", which a rare
    value weighs as much as a common one)."""
    from ..attributes import classify

    clf_vocab = target.classifier.config.vocab
    predicted = classify(target.classifier, images_u8.numpy())
    rows = per_image_codes(target.codes, len(images_u8)).numpy()
    names = list(target.vocab)
    out: dict[str, Any] = {}
    for a in target.judged:
        values, known = target.vocab[a], list(clf_vocab[a])
        asked = [values[c] if c >= 0 else None for c in rows[:, names.index(a)]]
        got = [known[c] for c in predicted[:, list(clf_vocab).index(a)]]
        pairs = [(x, y) for x, y in zip(asked, got, strict=True) if x in known]
        per_value = {}
        for v in sorted({x for x, _ in pairs}, key=values.index):
            hits = [x == y for x, y in pairs if x == v]
            per_value[v] = [float(np.mean(hits)), len(hits)]
        out[a] = {
            "accuracy": float(np.mean([x == y for x, y in pairs])) if pairs else None,
            "n": len(pairs),
            "per_value": per_value,
            "mean_per_value": float(np.mean([acc for acc, _ in per_value.values()]))
            if per_value
            else None,
        }
    return {
        "labels": target.labels,
        "rows": len(target.codes),
        "attributes": out,
        "classifier_accuracy": target.ceiling,
        "classifier_accuracy_on": target.ceiling_kind,
    }


def _files_with(real: Path, labels: Path, asked: Mapping[str, str]) -> list[Path]:
    """The images of `real` whose labels.csv row has every asked value."""
    from ..data import find_images
    from ..labels import canonical, read_csv_rows

    names, rows = read_csv_rows(labels, missing="null")  # an empty entry matches no value
    missing = [a for a in asked if a not in names]
    if missing:
        raise DataError(
            f"'{labels}' has no column {missing[0]!r} (its attributes: {quoted(names)})"
        )
    col = {n: k for k, n in enumerate(names)}
    wanted = {
        canonical(Path(f).as_posix())  # in NFC, as the file names on disk (NFD on macOS)
        for _, f, v in rows
        if all(v[col[a]] == x for a, x in asked.items())
    }
    files = [p for p in find_images(real) if canonical(p.relative_to(real).as_posix()) in wanted]
    what = ", ".join(f"{a}={v}" for a, v in asked.items())
    if not files:
        a = next(iter(asked))
        found = sorted({v[col[a]] for _, _, v in rows} - {None})
        raise DataError(
            f"no image in '{real}' has {what} (its labels.csv {a} values: {quoted(found)})"
        )
    if len(files) < 2:
        raise DataError(f"KID needs at least 2 real images with {what}; '{real}' has 1")
    return files


def attribute_accuracy(target: ControlTarget, images_u8: torch.Tensor) -> dict[str, float]:
    """Per asked attribute, the share of uint8 [N x H x W x C] images the classifier judges
    to have the asked value."""
    from ..attributes import classify

    vocab = target.classifier.config.vocab
    predicted = classify(target.classifier, images_u8.numpy())
    out = {}
    for a, v in target.asked.items():
        k = list(vocab).index(a)
        out[a] = float((predicted[:, k] == vocab[a].index(v)).mean())
    return out


def real_features(
    target: ControlTarget,
    extractor: metrics.FeatureExtractor,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard-protocol features of the whole real folder (cached) and of its images with
    the asked values (rows of the former; computed apart when files were skipped)."""
    from ..data import find_images

    def stage(name: str):
        return None if progress is None else (lambda d, t: progress(name, d, t))

    f_all = metrics.folder_features(
        target.real, extractor, "standard", cache_dir=cache_dir, progress=stage("features (real)")
    )
    files = find_images(target.real)
    if len(files) == len(f_all):  # row i is file i (sorted)
        keep = set(target.real_files)
        rows = [i for i, p in enumerate(files) if p in keep]
        return f_all, f_all[rows]
    from ..data import BadImage, load_image

    usable = []
    for p in target.real_files:
        try:
            usable.append(load_image(p, size=None))
        except BadImage:  # skipped in f_all too, with its reason in that note
            continue
    if len(usable) < 2:
        raise DataError(
            f"KID needs at least 2 real images with {target.describe()}; "
            f"'{target.real}' has {len(usable)} usable"
        )
    images = torch.from_numpy(np.stack(usable))
    f_sub = metrics.features_with_progress(
        extractor, _nchw(images), "standard", stage("features (real, asked values)")
    )
    return f_all, f_sub


def control_summary(
    target: ControlTarget,
    fake: torch.Tensor,
    f_fake: torch.Tensor,
    f_subset: torch.Tensor,
    generated: str = "generated images",
) -> dict[str, Any]:
    """The attribute part of an evaluation: accuracy per asked attribute with the classifier's
    ceiling beside it, and standard KID against the real images with the asked values (with
    the caution, under "notes", where either set is small: `metrics.few_images_note`;
    `generated`: what the caution calls the generated images)."""
    kid_mean, kid_std = metrics.kid_standard(f_subset, f_fake)
    what = ", ".join(f"{k}={v}" for k, v in target.asked.items())
    sets = [(len(f_subset), f"real images with {what}"), (len(f_fake), generated)]
    return {
        "asked": target.asked,
        "accuracy": attribute_accuracy(target, fake),
        "classifier_accuracy": target.ceiling,
        "classifier_accuracy_on": target.ceiling_kind,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "n_real": len(f_subset),
        "protocol": "standard",
        "notes": metrics.warn_few_images(sets, fid=False),
    }


def guidance_study(
    loaded: LoadedModel,
    target: ControlTarget,
    *,
    weights: Sequence[float],
    n: int,
    settings: SampleSettings,
    extractor: metrics.FeatureExtractor,
    out_dir: str | Path,
    cache_dir: Path | None = None,
    log=print,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Attribute accuracy and standard KID (against all real images and against those with
    the asked values) per guidance weight w, the same seeds for every w; writes
    guidance.csv and guidance.md.

    :param progress: told about "features (real)", then per w the stages "w W: sample" and
        "w W: features".
    """
    f_all, f_sub = real_features(target, extractor, cache_dir, progress)
    net = sampling_net(loaded, settings, 2 * n * settings.steps * len(weights))
    rows, notes = [], []
    for w in weights:
        name = f"w {w:g}"
        stage = _prefixed(progress, name)
        t = time.perf_counter()
        fake = draw_conditional(loaded, n, settings, target.asked, w, progress=stage, net=net)
        spi = (time.perf_counter() - t) / n
        f_fake = metrics.features_with_progress(
            extractor,
            _nchw(fake),
            "standard",
            None if stage is None else partial(stage, "features"),
        )
        c = control_summary(target, fake, f_fake, f_sub, GENERATED_PER_W)
        sets = [(len(f_all), "real images"), (n, GENERATED_PER_W)]
        notes = [*metrics.warn_few_images(sets, False), *c["notes"]]  # the same for every w
        kid_mean, kid_std = metrics.kid_standard(f_all, f_fake)
        row = {"guidance": w}
        row.update({f"accuracy_{a}": acc for a, acc in c["accuracy"].items()})
        row.update(kid_mean=kid_mean, kid_std=kid_std)
        row.update(kid_asked_mean=c["kid_mean"], kid_asked_std=c["kid_std"])
        row.update(seconds_per_image=spi, protocol="standard")
        rows.append(row)
        acc = ", ".join(f"{a} {100 * v:.1f}%" for a, v in c["accuracy"].items())
        log(
            f"w {w:g}: accuracy {acc}; KID (standard) {kid_mean:.4f} ± {kid_std:.4f}, "
            f"against {target.describe()} {c['kid_mean']:.4f} ± {c['kid_std']:.4f}"
        )
    interval = guidance_interval(loaded, settings)
    write_guidance(rows, target, n, settings, Path(out_dir), interval, notes)
    return rows


def _prefixed(progress: Progress | None, prefix: str) -> Progress | None:
    """progress with every stage named "PREFIX: stage"."""
    if progress is None:
        return None
    return lambda stage, done, total: progress(f"{prefix}: {stage}", done, total)


GUIDANCE_NAMES = ("guidance.csv", "guidance.md")
GENERATED_PER_W = "generated images per w"  # the caution's words, as the header counts them


def write_guidance(
    rows: list[dict[str, Any]],
    target: ControlTarget,
    n: int,
    settings: SampleSettings,
    out_dir: Path,
    interval: tuple[float, float] = GUIDE_ALWAYS,
    notes: Sequence[str] = (),
) -> None:
    """guidance.csv (one row per w) and guidance.md (the same table, the classifier's
    accuracy as the ceiling of each accuracy column; `interval`: where w applied; `notes`
    under it: the few-images caution)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    f = StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out_dir / "guidance.csv", f.getvalue())
    asked = list(target.asked)

    def ceiling(a: str) -> str:
        c = target.ceiling.get(a)
        return "?" if c is None else f"{100 * c:.1f}%"

    head = [f"{a}={target.asked[a]} accuracy (ceiling {ceiling(a)})" for a in asked]
    lines = [
        f"Guidance study: {counted(n, 'generated image')} per w, "
        f"{counted(settings.steps, settings.sampler + ' step')}, seed "
        f"{settings.seed}; accuracy judged by the attribute classifier (ceiling: its own "
        f"{target.ceiling_kind} accuracy on real images); KID standard protocol "
        f"(torch-fidelity 0.4.0) against all {target.real.name} images and against the "
        f"{len(target.real_files)} with {target.describe()}."
        + ("" if interval == GUIDE_ALWAYS else f" The weight w applied at {words(interval)} only."),
        "",
        "| w | " + " | ".join(head) + " | KID | ± std | KID vs asked | ± std | s/image |",
        "|---:|" + "---:|" * len(asked) + "---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        accs = " | ".join(f"{100 * r[f'accuracy_{a}']:.1f}%" for a in asked)
        lines.append(
            f"| {r['guidance']:g} | {accs} | {r['kid_mean']:.4f} | {r['kid_std']:.4f} | "
            f"{r['kid_asked_mean']:.4f} | {r['kid_asked_std']:.4f} | "
            f"{r['seconds_per_image']:.3f} |"
        )
    lines += ["", *(f"Note: {note}." for note in notes)] if notes else []  # not in the CSV
    write_text_atomic(out_dir / "guidance.md", "\n".join(lines) + "\n")


def edit_preservation(
    classifier: Any,
    before_u8: torch.Tensor,
    after_u8: torch.Tensor,
    changes: Mapping[str, str],
) -> dict[str, Any]:
    """How well an edit keeps what it was not asked to change, judged by `classifier`:
    per attribute the classifier knows and `changes` leaves alone, the share of images
    classified the same before and after (and overall: over all such image-attribute
    pairs); per changed attribute it knows, the share of edits classified as the set value.

    :param before_u8, after_u8: uint8 [N x H x W x C], image i before and after its edit.
    """
    from ..attributes import classify

    vocab = classifier.config.vocab
    before = classify(classifier, before_u8.numpy())
    after = classify(classifier, after_u8.numpy())
    kept = {
        a: float((before[:, k] == after[:, k]).mean())
        for k, a in enumerate(vocab)
        if a not in changes
    }
    reached = {
        a: float((after[:, list(vocab).index(a)] == vocab[a].index(v)).mean())
        for a, v in changes.items()
        if a in vocab and v in vocab[a]
    }
    return {
        "images": len(before),
        "preserved": kept,
        "preserved_overall": float(np.mean(list(kept.values()))) if kept else None,
        "changed_to_value": reached,
    }
