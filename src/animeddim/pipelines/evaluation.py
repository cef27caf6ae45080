"""Evaluation against real images: `evaluate` (KID/FID, both protocols) and the steps
study (`steps_study`, standard KID per sampler, eta and number of steps)."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed, metrics
from ..checkpoint import LoadedModel
from ..config import ConfigError, guidance_interval_text
from ..diffusion.samplers import (
    SAMPLERS,
    resolve_clip,
)
from ..io import write_text_atomic
from ..words import counted
from .conditional import (
    attribute_codes,
    attribute_guidance,
    guidance_interval,
)
from .control import ControlTarget, MixTarget, control_summary, mix_accuracy, real_features
from .core import (
    Progress,
    SampleSettings,
    _nchw,
    _stage,
    _tell,
    check_count,
    check_guidance,
    check_loaded,
    check_sampling,
    check_settings,
    draw,
    sampling_net,
)
from .folder import Job, Kept, draw_blocks, image_job
from .real_folder import real_folder_features


def evaluate(
    loaded: LoadedModel,
    real: str | Path,
    *,
    n: int = 1000,
    settings: SampleSettings,
    extractor: metrics.FeatureExtractor,
    out: str | Path | None = None,
    protocols: Sequence[str] = ("standard", "paper"),
    cache_dir: Path | None = None,
    paper_batch: int = 64,
    attributes: Any = None,
    control: ControlTarget | None = None,
    mix: MixTarget | None = None,
    guidance: float = 1.0,
    progress: Progress | None = None,
    on_samples: Callable[[torch.Tensor, int], None] | None = None,
    kept: Kept | None = None,
) -> dict[str, Any]:
    """Generate n images and compare them with the real folder.

    standard: KID (mean, std over 100 subsets) and FID, torch-fidelity protocol;
    paper: Keras per-batch KID between batches of generated and real images, the real ones
    shuffled with a fixed seed first (`metrics.paper_order`), then the first n used.
    Real-image features are cached on disk, keyed by the folder's content.
    :param attributes: an attribute classifier: also report coverage (`coverage.coverage`)
        against the real folder's labels.csv, written beside `out` as OUT-coverage/.
    :param control: draw under its asked attributes (guidance weight `guidance`) and also
        report attribute accuracy and KID against the real images with the asked values
        (`control.control_summary`, under "attributes_asked").
    :param mix: draw image i under row i of its codes (guidance weight `guidance`) and also
        report how often each attribute is drawn as asked (`control.mix_accuracy`, under
        "attributes_from"); not with `control`.

    :param on_samples: called on process 0 with each batch of samples as soon as it is
        drawn (uint8 [k x H x W x 3]) and the index of its first image, a signal held until
        it returns (`evaluate --samples-out` writes them: `folder.BatchWriter`).
    :param kept: images of these n that a stopped call wrote (`evaluate --samples-out`, the
        same on every process): read back instead of drawn; the summary is the one an
        uninterrupted call gives (image i depends on the seed and i alone, PNG is lossless).
    :param progress: told about the stages "features (real)", "sample", "features
        (generated)" and "paper KID" (batches). The real folder is read (and its features
        computed, its labels matched for `attributes`) before any image is drawn.
    :return: the summary, also written to `out` (JSON) when given.

    Under torchrun (joined by `load_for_sampling`) every process calls it with the same
    arguments: each draws a contiguous block of the n images (image i is the same whatever
    the number of processes) and computes their standard features; the real folder's are
    read first (process 0 reads and writes the feature cache; on a miss each process
    measures a block of the folder where all see it: `real_folder_features`), the paper
    and coverage real sets by process 0 alone, which then gathers the images and features,
    computes every metric and writes the files. Every process returns the summary.
    :raises ConfigError, TypeError: n < 2, guidance < 0, ... before the real side is read.
    """
    if control is not None and mix is not None:
        raise ValueError("give control or mix, not both")
    loaded, settings = check_loaded(loaded), check_settings(settings)
    n, guidance = check_count(n, "n", 2), check_guidance(guidance)
    # The real side first, on process 0 (the one process that reads and writes the feature
    # cache): a folder that cannot be measured (too few usable images, mixed sizes, labels
    # that do not fit) is refused by every process before minutes of drawing, not after.
    t_start = time.perf_counter()  # "seconds": the whole evaluation, the real side included
    standard = "standard" in protocols or control is not None
    t_real = time.perf_counter()  # every process measures a block of it (on a cache miss)
    f_real = real_folder_features(real, extractor, cache_dir, progress) if standard else None
    t_real = time.perf_counter() - t_real
    reals = distributed.on_main(
        lambda: (f_real, t_real, *_real_side(loaded, real, n, protocols, attributes))
    )
    t0 = time.perf_counter()
    make = evaluation_job(loaded, settings, control, mix, guidance, n).make
    # each batch handed to on_samples as soon as it is drawn: a stop or a failure keeps them
    part, fake = draw_blocks(make, n, settings.batch_size, on_samples, progress, kept)
    t_gen = time.perf_counter() - t0
    t1 = time.perf_counter()
    f_fake = _gathered_features(extractor, part, progress, "features (generated)", standard)

    def summary() -> dict[str, Any]:  # on process 0, with every image and feature
        f_real, t_real, paper_real, coverage_real = reals
        result = _what_was_measured(loaded, real, n, settings, extractor, t_gen)
        if control is not None or mix is not None:
            _conditional_summary(
                result, loaded, settings, control, mix, guidance, fake, f_fake,
                extractor, cache_dir,
            )  # fmt: skip
        if "standard" in protocols:
            result.update(_standard(f_real, f_fake, time.perf_counter() - t1 + t_real))
        if paper_real is not None:
            result["paper"] = _paper_kid(paper_real, fake, n, extractor, paper_batch, progress)
        if attributes is not None:
            from ..coverage import coverage, write_coverage

            result["coverage"] = coverage(attributes, fake.numpy(), *coverage_real)
            if out is not None:
                write_coverage(
                    result["coverage"], Path(out).with_name(Path(out).stem + "-coverage")
                )
        result["seconds"] = round(time.perf_counter() - t_start, 2)
        if out is not None:
            write_text_atomic(Path(out), json.dumps(result, indent=2) + "\n")
        return result

    return distributed.from_main(summary)


def _what_was_measured(
    loaded: LoadedModel,
    real: str | Path,
    n: int,
    settings: SampleSettings,
    extractor: metrics.FeatureExtractor,
    t_gen: float,
) -> dict[str, Any]:
    """The head of `evaluate`'s summary: the model, the real folder, the sampling and the
    feature weights the numbers below it are of."""
    return {
        "checkpoint": str(loaded.path),
        "checkpoint_step": loaded.meta.get("step"),
        "real": str(Path(real).resolve()),
        "n": n,
        "steps": settings.steps,
        "eta": settings.eta,
        "sampler": settings.sampler,
        "clip_x0": resolve_clip(settings.clip, settings.sampler),
        "seed": settings.seed,
        "weights": extractor.weights_id,
        "generate_seconds": round(t_gen, 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _standard(f_real: torch.Tensor, f_fake: torch.Tensor, seconds: float) -> dict[str, Any]:
    """The standard protocol's part of `evaluate`'s summary: KID (mean, std), FID, and the
    caution where a set is small (`metrics.few_images_note`, under "notes"; also warned)."""
    kid_mean, kid_std = metrics.kid_standard(f_real, f_fake)
    return dict(
        protocol="standard",
        protocol_description=metrics.PROTOCOL_DESCRIPTIONS["standard"],
        kid_mean=kid_mean,
        kid_std=kid_std,
        fid=metrics.fid_from_features(f_real, f_fake),
        n_real=len(f_real),
        subset_size=metrics.kid_subset_size(len(f_real), len(f_fake)),
        standard_seconds=round(seconds, 2),
        notes=metrics.warn_few_images(
            [(len(f_real), "real images"), (len(f_fake), "generated images")]
        ),
    )


def _real_side(
    loaded: LoadedModel,
    real: str | Path,
    n: int,
    protocols: Sequence[str],
    attributes: Any,
) -> tuple[torch.Tensor | None, Any]:
    """What `evaluate` compares with besides the standard features, read on process 0
    before any image is drawn: the paper protocol's real images and the coverage's
    labelled real set (None where not asked)."""
    paper_real = _paper_real(loaded, real, n) if "paper" in protocols else None
    coverage_real = None
    if attributes is not None:
        from ..coverage import real_set

        coverage_real = real_set(attributes, real)
    return paper_real, coverage_real


def evaluation_job(
    loaded: LoadedModel,
    settings: SampleSettings,
    control: ControlTarget | None,
    mix: MixTarget | None,
    guidance: float,
    n: int,
) -> Job:
    """The `n` images as `evaluate` draws them (named as `sample --out` names them), under
    `control`'s asked attributes, `mix`'s row per image, or unconditioned (the network
    prepared once, at the first draw, and compiled or not as the whole job decides:
    `image_job`)."""
    from ..outputs import sample_names

    codes = None
    if control is not None:
        asked = attribute_codes(loaded, control.asked)  # None: nothing asked, unconditioned
        codes = None if asked is None else asked[None]
    elif mix is not None:
        codes = mix.codes
    names = sample_names(settings.seed, n)
    return image_job(loaded, settings, names, min(8, n), codes, guidance)


def _gathered_features(
    extractor: metrics.FeatureExtractor,
    part: torch.Tensor,
    progress: Progress | None,
    stage: str,
    wanted: bool = True,
) -> torch.Tensor | None:
    """Standard features of this process's uint8 [N x H x W x 3] images, every process's
    gathered in order on process 0 (None elsewhere, and when not `wanted`). Each process
    measures its own block: under torchrun the work is shared."""
    if not wanted:
        return None
    f_part = metrics.features_with_progress(
        extractor, _nchw(part), "standard", _stage(progress, stage)
    )
    return distributed.gather_to_main(f_part)


def _conditional_summary(
    result: dict[str, Any],
    loaded: LoadedModel,
    settings: SampleSettings,
    control: ControlTarget | None,
    mix: MixTarget | None,
    guidance: float,
    fake: torch.Tensor,
    f_fake: torch.Tensor | None,
    extractor: metrics.FeatureExtractor,
    cache_dir: Path | None,
) -> None:
    """Add what `evaluate --attr` (`control`) or `--attrs-from` (`mix`) reports to `result`:
    the accuracy of the asked attributes and the guidance they were drawn under."""
    if control is not None:
        f_asked = real_features(control, extractor, cache_dir)[1]  # the same cached features
        result["attributes_asked"] = control_summary(control, fake, f_fake, f_asked)
    if mix is not None:
        result["attributes_from"] = mix_accuracy(mix, fake)
    result["guidance"] = guidance
    result["attribute_guidance"] = attribute_guidance(loaded, settings, guidance)
    if guidance != 1.0 or result["attribute_guidance"]:  # where w applied (in sigma)
        interval = guidance_interval(loaded, settings)
        result["guidance_interval"] = guidance_interval_text(interval)


def _paper_real(loaded: LoadedModel, real: str | Path, n: int) -> torch.Tensor:
    """The paper protocol's real images: the first n in `metrics.paper_order`, at the model's
    size, [n x H x W x 3] uint8."""
    from ..data import DataError, load_folder

    size = loaded.config.model.image_size
    real_images = load_folder(real, size).images
    order = metrics.paper_order(len(real_images))[:n]
    real_u8 = torch.from_numpy(np.asarray(real_images[order]))
    if len(real_u8) < 2:
        raise DataError(f"KID needs at least 2 images, '{real}' has {len(real_u8)} usable")
    return real_u8


def _paper_kid(
    real_u8: torch.Tensor,
    fake: torch.Tensor,
    n: int,
    extractor: metrics.FeatureExtractor,
    paper_batch: int,
    progress: Progress | None,
) -> dict[str, Any]:
    """The paper protocol: Keras per-batch KID of the generated images against the real ones
    (`_paper_real`)."""
    t2 = time.perf_counter()
    acc = metrics.PaperKID(extractor)
    starts = range(0, min(len(real_u8), n), paper_batch)
    for k, i in enumerate(starts):
        _tell(progress, "paper KID", k, len(starts))
        acc.update(_nchw(real_u8[i : i + paper_batch]), _nchw(fake[i : i + paper_batch]))
    _tell(progress, "paper KID", len(starts), len(starts))
    return {
        "protocol": "paper",
        "protocol_description": metrics.PROTOCOL_DESCRIPTIONS["paper"],
        "kid": acc.compute(),
        "batches": len(acc.values),
        "batch_size": paper_batch,
        "seconds": round(time.perf_counter() - t2, 2),
    }


STEPS_COLUMNS = [
    "steps",
    "eta",
    "sampler",
    "clip_x0",
    "kid_mean",
    "kid_std",
    "seconds_per_image",
    "protocol",
]


def steps_study(
    loaded: LoadedModel,
    real: str | Path,
    *,
    steps: Sequence[int],
    etas: Sequence[float],
    samplers: Sequence[str],
    n: int,
    settings: SampleSettings,
    extractor: metrics.FeatureExtractor,
    out_dir: str | Path,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Standard KID vs number of steps for each (sampler, eta); writes steps.csv/.md/.png.

    :param progress: told about "features (real)", then for each setting a stage named
        after it ("ddim eta 0, 10 steps: sample", "...: features").
    :raises ConfigError: a deterministic sampler with no eta 0 among `etas` (it would get no
        row), an unknown sampler, an eta outside [0, 1], steps not integers >= 1, n not an
        integer >= 2: before any work.
    """
    loaded, settings = check_loaded(loaded), check_settings(settings)
    n = check_count(n, "n", 2)
    steps = [check_count(k, "steps") for k in steps]
    etas = [check_sampling("ddim", eta) for eta in etas]
    for sampler in samplers:
        check_sampling(sampler, 0.0)
    for sampler in samplers:  # a deterministic sampler runs at eta 0 only (the loop below)
        if not SAMPLERS[sampler].stochastic and 0.0 not in etas:
            raise ConfigError(
                f"{sampler} is deterministic, it runs at eta 0 only, and the etas "
                f"{','.join(f'{e:g}' for e in etas)} have no 0: the study would measure "
                f"nothing for it; add eta 0 (e.g. --eta 0,{etas[0]:g}) or leave {sampler} out"
            )
    out_dir = Path(out_dir)
    f_real = real_folder_features(real, extractor, cache_dir, progress)
    rows: list[dict[str, Any]] = []  # on process 0
    notes: list[str] = []  # the few-images caution, on process 0
    lo, hi = distributed.shard(n)  # this process's block of each setting's n images
    # One prepared (and maybe compiled) network for the whole study, warmed up on a full
    # batch and the last batch's size, so that no setting's time includes compilation.
    # compiled or not by the whole study's size, whatever share of it this process draws
    net = sampling_net(loaded, settings, n * sum(steps) * len(etas) * len(samplers))
    bs = settings.batch_size
    for size in {min(hi - lo, bs), (hi - lo) % bs or bs} - {0}:
        draw(loaded, size, replace(settings, steps=1), net=net)
    for sampler in samplers:
        for eta in etas:
            if eta > 0 and not SAMPLERS[sampler].stochastic:
                continue  # a deterministic sampler runs at eta 0 only
            for s in steps:
                cfg = replace(settings, steps=s, eta=eta, sampler=sampler)
                name = f"{sampler} eta {eta:g}, {counted(s, 'step')}"
                t = time.perf_counter()
                part = draw(loaded, hi - lo, cfg, lo, net=net, progress=_prefixed(progress, name))
                # the slowest process's drawing time: the study's wall time for n images
                drawn = distributed.gather_to_main(torch.tensor([time.perf_counter() - t]))
                f_fake = _gathered_features(extractor, part, progress, f"{name}: features")

                def measure(s=s, eta=eta, sampler=sampler, drawn=drawn, f_fake=f_fake) -> None:
                    if not rows:  # the counts are those of every setting: said once
                        sets = [(len(f_real), "real images"), (n, "generated images per setting")]
                        notes.extend(metrics.warn_few_images(sets, fid=False))
                    kid_mean, kid_std = metrics.kid_standard(f_real, f_fake)
                    spi = float(drawn.max()) / n
                    row = {
                        "steps": s,
                        "eta": eta,
                        "sampler": sampler,
                        "clip_x0": resolve_clip(settings.clip, sampler),
                        "kid_mean": kid_mean,
                        "kid_std": kid_std,
                        "seconds_per_image": spi,
                        "protocol": "standard",
                    }
                    rows.append(row)
                    clipped = ", x0 clipped" if row["clip_x0"] else ""
                    log(
                        f"{sampler}{clipped} eta {eta:g} steps {s}: KID (standard) "
                        f"{kid_mean:.4f} ± {kid_std:.4f}, {spi:.3f} s/image"
                    )

                distributed.on_main(measure)

    def write() -> list[dict[str, Any]]:
        write_steps(rows, out_dir, notes)
        return rows

    return distributed.from_main(write)


def _prefixed(progress: Progress | None, prefix: str) -> Progress | None:
    """progress with every stage name prefixed: "PREFIX: stage"."""
    if progress is None:
        return None
    return lambda stage, done, total: progress(f"{prefix}: {stage}", done, total)


def write_steps(rows: list[dict[str, Any]], out_dir: Path, notes: Sequence[str] = ()) -> None:
    """steps.csv, steps.md (the same table, `notes` under it: the few-images caution) and
    steps.png of a study's `rows`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    f = StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=STEPS_COLUMNS)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out_dir / "steps.csv", f.getvalue())
    lines = [
        "| steps | sampler | x0 clipped | eta | KID (standard) | ± std | s/image |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        clipped = "yes" if r.get("clip_x0") else "no"
        lines.append(
            f"| {r['steps']} | {r['sampler']} | {clipped} | {r['eta']:g} | {r['kid_mean']:.4f} | "
            f"{r['kid_std']:.4f} | {r['seconds_per_image']:.3f} |"
        )
    lines += ["", *(f"Note: {note}." for note in notes)] if notes else []  # not in the CSV
    write_text_atomic(out_dir / "steps.md", "\n".join(lines) + "\n")
    from ..report import Table, plot_steps, sampler_label

    table = Table(
        ["Run", "Sampler", "eta", "Steps", "KID", "KID std", "s/image"],
        [
            [
                out_dir.name,
                sampler_label(r["sampler"], r.get("clip_x0")),
                r["eta"],
                r["steps"],
                r["kid_mean"],
                r["kid_std"],
                r["seconds_per_image"],
            ]
            for r in rows
        ],
        "KID: standard protocol (torch-fidelity 0.4.0)",
    )
    plot_steps(out_dir / "steps.png", table)
