"""Commands that measure a model against real images: kid, evaluate, steps."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .. import conditional_cli, outputs
from ..config import KID_PROTOCOLS
from ..diffusion.sampler_names import SAMPLER_NAMES
from ..words import counted
from . import sampling
from .common import (
    EXIT_INTERRUPTED,
    CliError,
    _Bars,
    _close_bars,
    _is_main,
    _names,
    need_folder,
    once,
    shown,
)
from .sample_folder import SampleFolder, folder_settings
from .sampling import _options, _settings, check_fits_in_memory, load_for_sampling


def cmd_kid(a: argparse.Namespace) -> int:
    import json

    from ..metrics import kid_folders

    for d in (a.dir_a, a.dir_b):
        need_folder(d)
    r = kid_folders(
        a.dir_a,
        a.dir_b,
        a.protocol,
        extractor=sampling._extractor(a),
        cache_dir=Path(a.cache_dir) if a.cache_dir else None,
        progress=_Bars(),
    )
    if a.json:
        print(json.dumps(r, indent=2))
    elif a.protocol == "standard":
        print(
            f"KID ({r['protocol']} protocol) {shown(r['kid_mean'], '.5f')} ± "
            f"{r['kid_std']:.5f}, FID {shown(r['fid'], '.3f')}  (n {r['n_a']} vs {r['n_b']}, "
            f"subsets {r['subsets']} of "
            f"{r['subset_size']})"
        )
    else:
        print(
            f"KID ({r['protocol']} protocol) {shown(r['kid_mean'], '.5f')}  "
            f"({counted(r['subsets'], 'batch', 'batches')} of {r['subset_size']})"
        )
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from ..distributed import check_same, on_every
    from ..pipelines import evaluate

    loaded, device = load_for_sampling(a.run, a.model, a.device)
    check_same(_options(a))  # under torchrun each process draws its share of the same images
    plan = on_every(lambda: _evaluate_plan(a, loaded, device))  # an error said once
    folder = _samples_folder(a, loaded, plan)  # None without --samples-out
    cache = Path(a.cache_dir) if a.cache_dir else None
    try:
        r = evaluate(loaded, a.real, n=a.n, cache_dir=cache, progress=_Bars(), **plan)
    except KeyboardInterrupt:
        if folder is None:
            raise
        _close_bars()
        if _is_main():  # the batches drawn so far are written, each whole
            kept = folder.count_kept()
            rest = f"draws the other {a.n - kept}, then measures" if kept < a.n else "measures"
            print(f"interrupted: {kept} of {counted(a.n, 'sample')} kept in "
                  f"{a.samples_out!r}, nothing measured; the same command again goes on "
                  f"from there ({rest})")  # fmt: skip
        return EXIT_INTERRUPTED
    except Exception:
        if folder is not None:
            folder.abandon()
        raise
    if not _is_main():
        return 0
    if folder is not None:
        folder.finish()  # measured and written: a whole set, refused as any finished output
        print(f"{counted(a.n, 'sample')} in {a.samples_out}")
    if "kid_mean" in r:
        print(
            f"KID (standard protocol) {shown(r['kid_mean'], '.5f')} ± {r['kid_std']:.5f}, FID "
            f"{shown(r['fid'], '.3f')}  ({counted(a.n, 'image')}, "
            f"{counted(a.steps, a.sampler + ' step')}, eta {a.eta:g}"
            f"{', x0 clipped' if r['clip_x0'] else ''})"
        )
    if "paper" in r:
        kid = shown(r["paper"]["kid"], ".5f")
        print(f"KID (paper protocol) {kid}  ({counted(r['paper']['batches'], 'batch', 'batches')})")
    if "attributes_asked" in r:
        print("\n".join(conditional_cli.control_lines(r["attributes_asked"])))
    if "attributes_from" in r:
        print("\n".join(conditional_cli.mix_lines(r["attributes_from"])))
    if "coverage" in r:
        from ..attributes_cli import coverage_summary

        print(coverage_summary(r["coverage"]))
    print(f"written: {plan['out']} ({r['seconds']:.0f}s)")
    return 0


def _evaluate_plan(a: argparse.Namespace, loaded, device) -> dict[str, Any]:
    """`evaluate`'s options, checked before any work, as `pipelines.evaluate`'s arguments
    (out, protocols, settings, extractor, attributes, control, mix, guidance; on_samples and
    kept are `_samples_folder`'s)."""
    check_fits_in_memory(a.n, loaded.config.model.image_size)
    protocols = _names(a.protocols, KID_PROTOCOLS, "protocol")
    # process 0 alone reads --real where another process lacks it (another node's disks:
    # pipelines.real_features), so process 0 alone checks it (said once, on every process)
    if _is_main():
        need_folder(a.real, "real-image folder")  # missing, a file, an archive, ...
    # process 0 alone writes the JSON, on its node, so it alone looks at --out there (another
    # node may hold another file of that name, or lack its folder); the others (None) agree
    # on its outcome through `on_every`
    out = _out_file(a) if _is_main() else None
    attributes = None
    if a.coverage:
        from ..attributes import load_classifier

        if _is_main() and not (Path(a.real) / "labels.csv").is_file():
            raise CliError(f"--coverage needs labels: {a.real!r} has no labels.csv")
        attributes = load_classifier(None if a.coverage == "shipped" else a.coverage)[0]
    control, mix = conditional_cli.evaluate_target(a, loaded)
    if a.samples_out:  # the folder itself is looked at by `_samples_folder`
        outputs.not_inside(a.samples_out, [a.real], "--samples-out", "the --real folder")
    settings = _settings(a, device, loaded)
    if (control is not None or mix is not None) and _is_main():
        from ..pipelines import guidance_words

        print(guidance_words(loaded, settings, a.guidance))
    return dict(
        out=out,
        protocols=protocols,
        settings=settings,
        extractor=sampling._extractor(a),
        attributes=attributes,
        control=control,
        mix=mix,
        guidance=a.guidance,
        on_samples=None,
        kept=None,
    )


def _out_file(a: argparse.Namespace) -> Path:
    """`evaluate`'s JSON file, checked on process 0 (which writes it): --out, or a new name
    in the run folder; with `--coverage`'s folder beside it and apart from --samples-out."""
    if a.out:
        out = outputs.new_file(a.out, a.force)
    elif a.run and Path(a.run).is_dir():  # a new name, never an earlier evaluation's
        stem, k = f"eval-{time.strftime('%Y%m%d-%H%M%S')}", 1
        while (out := Path(a.run) / f"{stem}{f'-{k}' if k > 1 else ''}.json").exists():
            k += 1
        outputs.new_file(out, False, "the default --out")  # a run folder that can be written
    else:
        from ..checkpoint import no_run_to_write_into  # here: it loads torch

        raise CliError(no_run_to_write_into("--out FILE.json", a.run))
    if a.coverage:
        outputs.earlier_outputs(out.parent, outputs.COVERAGE_NAMES, a.force, "--coverage beside")
    if a.samples_out:
        outputs.distinct([("--out", out), ("--samples-out", Path(a.samples_out))])
    return out


def _samples_folder(a: argparse.Namespace, loaded, plan: dict[str, Any]) -> SampleFolder | None:
    """`evaluate --samples-out DIR`, looked at (on process 0) once every process has checked
    the options: as `sample --out` does, a stopped call's samples with the same settings
    are kept (read back, not drawn: `plan`'s kept), other settings refused, and each batch
    drawn is written as soon as it is (`plan`'s on_samples), the pending note left in DIR
    until the evaluation is written. None (and nothing set) without --samples-out."""
    from ..distributed import from_main
    from ..pipelines import guidance_words
    from ..pipelines.evaluation import evaluation_job
    from ..pipelines.folder import BatchWriter, Kept

    if not a.samples_out:
        return None
    settings = plan["settings"]
    job = evaluation_job(loaded, settings, plan["control"], plan["mix"], a.guidance, a.n)
    asked = {}
    if job.codes is not None:  # what the images are asked, as sample's note holds it
        given = f"--attrs-from {a.attrs_from}" if a.attrs_from else ""
        words = guidance_words(loaded, settings, a.guidance)
        asked = conditional_cli.asked_note(a, given, job.codes, words)
    held = folder_settings(a.samples_out, a.n, loaded, settings, asked, job)
    what = ("sample", "evaluation")
    folder = SampleFolder(a.samples_out, a.force, [], job, held, "--samples-out", what)
    kept = from_main(lambda: sorted(folder.kept))  # process 0 looked; each reads its block
    before = folder.begin if folder.earlier else None  # --force: the earlier samples go
    plan["on_samples"] = BatchWriter(a.samples_out, job.names, before, set(kept))
    if kept:
        index = {name: i for i, name in enumerate(job.names)}
        plan["kept"] = Kept(Path(a.samples_out), job.names, frozenset(index[k] for k in kept))
    return folder


def cmd_steps(a: argparse.Namespace) -> int:
    from ..distributed import check_same, on_every
    from ..pipelines import steps_study

    loaded, device = load_for_sampling(a.run, a.model, a.device)
    check_same(_options(a))  # under torchrun each process draws its share of the same images
    samplers, out = on_every(lambda: _steps_plan(a, loaded))  # an error said once
    steps_study(
        loaded,
        a.real,
        steps=a.steps,
        etas=a.eta,
        samplers=samplers,
        n=a.n,
        settings=_settings(a, device, steps=1, eta=0.0),
        extractor=sampling._extractor(a),
        out_dir=out,
        cache_dir=Path(a.cache_dir) if a.cache_dir else None,
        progress=_Bars(),
    )
    if _is_main():
        print(f"steps study: {out / 'steps.csv'}, {out / 'steps.md'}, {out / 'steps.png'}")
    return 0


def _steps_plan(a: argparse.Namespace, loaded) -> tuple[list[str], Path]:
    """`steps`' samplers and output folder, its options checked before any work."""
    samplers = _names(a.samplers, SAMPLER_NAMES, "sampler")
    if any(not 1 <= s <= 1000 for s in a.steps) or not a.steps:
        raise CliError(f"steps must be in 1..1000, got {a.steps}")
    once(a.steps, "--steps"), once(a.eta, "--eta")
    check_fits_in_memory(a.n, loaded.config.model.image_size)  # each setting's --n images
    out = Path(a.out) if a.out else (Path(a.run) if a.run and Path(a.run).is_dir() else None)
    if out is None:
        from ..checkpoint import no_run_to_write_into  # here: it loads torch

        raise CliError(no_run_to_write_into("--out DIR", a.run))
    # steps.png in the real folder: the next KID on it reads the plot as a real image
    outputs.not_inside(out, [a.real], "--out", "the --real folder")
    # process 0 alone writes the study, on its node, so it alone looks for earlier outputs
    # there (another node may hold an earlier study in a folder of that name)
    if _is_main():
        outputs.earlier_outputs(out, outputs.STEPS_NAMES, a.force)  # each is replaced whole
    return samplers, out
