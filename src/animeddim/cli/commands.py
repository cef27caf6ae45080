"""Commands that make data, train, report, export and run the apps."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .. import outputs
from ..words import counted
from .common import EXIT_DIVERGED, EXIT_INTERRUPTED, CliError, _is_main, _prog, need_folder
from .options import _flags, _given_settings


def cmd_data_avatars(a: argparse.Namespace) -> int:
    from ..datasets import generate_avatars
    from ..datasets.avatars import avatars_on_disk

    before = avatars_on_disk(a.out, a.n)[0]  # of a stopped run, or a finished one
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
    there, others = avatars_on_disk(out, a.n)  # said as they are now, not as asked
    made = (
        ""
        if not before
        else ": all there already, none rendered"
        if before == there
        else f": {there - before} rendered, {before} there already"
    )
    print(
        f"{counted(there, 'avatar')} ({a.size}px, seed {a.seed}) in {out}{made} "
        f"({time.perf_counter() - t:.1f}s); labels in {Path(out) / 'labels.csv'}, "
        f"credits in {Path(out) / 'CREDITS.md'}"
    )
    if others:
        print(
            f"note: '{out}' also holds {counted(others, 'other image')}, not among these "
            f"{counted(a.n, 'avatar')} nor in labels.csv, which a run on the folder reads too: "
            "move them out, or use a new folder",
            file=sys.stderr,
        )
    return 0


def cmd_data_prepare(a: argparse.Namespace) -> int:
    from ..datasets import prepare

    out = prepare(a.src, a.out, size=a.size, progress=True)
    manifest = json.loads((out / "manifest.json").read_text())
    print(
        f"prepared {counted(manifest['count'], 'image')} in {out} ({a.size}x{a.size}: the "
        "largest centred square of each, resized)"
    )
    _say_prepared_notes(manifest)
    return 0


def _say_prepared_notes(manifest: dict) -> None:
    """The notes of a prepare (`datasets.prepared_notes`: enlarged images, duplicates left
    out), from its manifest: a re-run that returns at once says them again."""
    from ..datasets import prepared_notes

    for note in prepared_notes(manifest):
        print(f"note: {note}", file=sys.stderr)


def cmd_data_split(a: argparse.Namespace) -> int:
    from ..datasets import split_held_out

    moved = split_held_out(a.folder, a.out, a.held_out, seed=a.seed, progress=True)
    labels = " with their labels.csv rows" if (Path(a.out) / "labels.csv").is_file() else ""
    print(
        f"moved {counted(len(moved), 'image')} of {a.folder} (seed {a.seed}){labels} into "
        f"{a.out}, held out"
    )
    return 0


def cmd_data_flowers102(a: argparse.Namespace) -> int:
    from ..datasets import download_flowers102

    kw = {k: v for k, v in (("url", a.url), ("md5", a.md5)) if v}
    out = download_flowers102(a.out, size=a.size, **kw)
    print(f"Oxford Flowers 102 images in {out}")
    _say_prepared_notes(json.loads((out / "manifest.json").read_text()))  # as data prepare
    return 0


def train_config_from_args(a: argparse.Namespace) -> Any:
    """defaults < --config file < explicit flags."""
    from ..config import RunConfig

    return _config_from_args(a, RunConfig().to_dict()).validate()


def _config_from_args(a: argparse.Namespace, base: dict[str, Any]) -> Any:
    """The settings `base` < the --config file < the options given (not yet `validate`d)."""
    from ..config import RunConfig, settings
    from ..config_files import check_paths_found, load_config_file, merge

    given = _given_settings(a)
    d = base
    if a.config:
        file = load_config_file(a.config)
        check_paths_found(  # the path settings the options given do not replace
            a.config,
            {
                (s, f.name): v
                for s, f in settings()
                if f.metadata["path"]
                and (s, f.name) not in given
                and isinstance(v := file.get(s, {}).get(f.name), str)
            },
        )
        d = merge(base, file)
    for (section, name), v in given.items():
        d[section][name] = v
    return RunConfig.from_dict(d)


def resume_config_from_args(a: argparse.Namespace) -> Any:
    """The run's own config.json, with the resumable settings given (in --config, then as
    options) applied. A setting the run keeps may be given with the run's own value (the data
    folder it trained on however spelt, the config file it started from); another value is
    refused, naming the setting and both values. The data folder (and a labels file) may be
    given at another place, moved or copied there: `train` checks its images are the run's."""
    from ..config import settings
    from ..run_folder import load_run_config, resume_changes, take_moved_data

    cfg = load_run_config(Path(a.resume))
    asked = _config_from_args(a, cfg.to_dict())  # checked once the run's own are kept
    fields = {(s, f.name): f for s, f in settings()}
    if changed := resume_changes(cfg, asked):
        raise CliError(_refused_changes(a, cfg, asked, [(k, fields[k]) for k in changed]))
    for (section, name), f in fields.items():
        if f.metadata["resume"]:
            setattr(getattr(cfg, section), name, getattr(getattr(asked, section), name))
    take_moved_data(cfg, asked)
    return cfg.validate()


def _refused_changes(a: argparse.Namespace, cfg: Any, asked: Any, changed: list) -> str:
    """One line naming the settings a resume was given other values of, with both values;
    `changed`: ((section, name), field) of each."""
    from ..run_folder import compared

    given, names, said = _given_settings(a), [], []
    for (section, name), f in changed:
        label = _flags(f)[0] if (section, name) in given else f"{section}.{name}"
        mine, theirs = compared(cfg, asked, section, f)
        names.append(label if (section, name) in given else f"{label} (in {a.config!r})")
        said.append(f"{label} is {mine!r} in the run, {theirs!r} given")
    return (
        f"{', '.join(names)} cannot change when resuming: {'; '.join(said)}; leave "
        f"{'it' if len(changed) == 1 else 'them'} out (the run keeps its own) or start a new "
        "run with --out"
    )


def cmd_train(a: argparse.Namespace) -> int:
    from ..data import SkippedFilesWarning
    from ..runtime import resolve_device
    from ..train import TrainingDiverged, train
    from ..train_state import untrained_ema_note

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
        made = "metrics.csv, samples/, checkpoints/"
        if not (run_dir / "metrics.csv").is_file():  # --max-steps stopped it inside epoch 1
            made = (
                f"checkpoints/ only: stopped at step {res.step}, before the first epoch end "
                f"writes metrics.csv and a sample grid; --resume {run_dir} --max-steps 0 (or a "
                "higher --max-steps) continues the epoch"
            )
        print(f"run folder: {run_dir} ({made}) after {time.perf_counter() - t:.0f}s")
        if note := untrained_ema_note(cfg.train, res.step):
            print(note)
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from ..report import write_report
    from ..runtime import resolve_device

    out = Path(a.out)
    for run, data in _data_folders(a.run):  # its figures there would be trained on
        outputs.not_inside(
            out, [data], "--out", "the data folder",
            f"run {run!r} trained on it, and training on it again would read the report's "
            "figures as images",
        )  # fmt: skip
    # a report stopped before its end (Ctrl-C, a kill) is written again without --force
    replace = a.force or outputs.unfinished(out, outputs.REPORT_PENDING)
    earlier = outputs.signature(outputs.earlier_outputs(out, outputs.REPORT_NAMES, replace))
    if earlier and not a.force:
        print(
            f"note: {str(out)!r} holds a report stopped before its end: written again",
            file=sys.stderr,
        )
    page = write_report(a.run, out, device=resolve_device(a.device), seed=a.seed, steps=a.steps)
    outputs.remove_unchanged(earlier)  # --force: no figure of an earlier report is left
    print(f"report: {page} and {page.with_suffix('.html')}")
    return 0


def _data_folders(runs: list[str]) -> list[tuple[str, str]]:
    """(run, the folder it trained on) for each run whose config.json reads (the report
    refuses the others itself, in its own words)."""
    from ..config import ConfigError
    from ..run_folder import RunFolderError, load_run_config

    found = []
    for run in runs:
        try:
            data = load_run_config(Path(run)).data
        except (RunFolderError, ConfigError, OSError):
            continue
        if data.abs_path or data.path:
            found.append((run, data.abs_path or data.path))
    return found


def cmd_export(a: argparse.Namespace) -> int:
    import os

    import torch

    from ..checkpoint import export_weights, load_model, resolve
    from ..conditioning import attribute_weights_text
    from ..config import guidance_interval_words

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    source = resolve(a.run)
    outputs.distinct([("--run", source), ("--out", Path(a.out))])
    if Path(a.run).is_dir():  # a run's checkpoints are what --resume needs: never replaced
        ckpts = [Path(a.run) / "checkpoints"]
        outputs.not_inside(a.out, ckpts, "--out", "the run's checkpoints", "resume needs them")
    if a.guidance_interval is not None and a.guidance is None:
        raise CliError("--guidance-interval needs --guidance W: the weight it applies")
    if a.attr_guidance and a.guidance is None:
        raise CliError("--attr-guidance needs --guidance W: the weight of the other attributes")
    if a.edit_guidance is not None and a.guidance is None:
        raise CliError("--edit-guidance needs --guidance W: a model to guide recommends both")
    if (a.sampler is None) != (a.steps is None):
        raise CliError("--sampler and --steps go together: the file recommends both")
    sampling = (a.sampler, a.steps) if a.sampler else None
    loaded = load_model(source)
    rows = _training_rows(loaded, a.guidance)
    out = export_weights(
        loaded,
        outputs.new_file(a.out, a.force),
        dtype,
        rows,
        a.guidance,
        a.guidance_interval,
        sampling,
        a.attr_guidance,
        a.edit_guidance,
    )
    print(f"exported EMA weights ({a.dtype}) to {out} ({os.path.getsize(out) / 2**20:.1f} MiB)")
    if rows is not None:
        rows_ = counted(len(rows), "row")
        print(f"with the {rows_} of its training labels (sample --attrs-from training)")
    if a.guidance is not None:
        where = ""
        if a.guidance_interval:
            where = f", at {guidance_interval_words(a.guidance_interval)}"
        if a.attr_guidance:
            where += f", {attribute_weights_text(a.attr_guidance)}"
        print(f"recommended guidance {a.guidance:g}{where}: conditional sampling's default")
        if a.edit_guidance is not None:
            print(f"recommended guidance for edits {a.edit_guidance:g}: edit's default")
    if sampling:
        steps = counted(a.steps, f"{a.sampler} step")
        print(f"recommended sampling: {steps} (the default for this file)")
    return 0


def _training_rows(loaded: Any, guidance: float | None) -> Any:
    """A conditional checkpoint's training-label codes for its export (None: unconditional,
    or its labels are not at hand, which is said); a guidance weight for an unconditional
    one is refused."""
    from ..conditioning import UnknownAttribute
    from ..pipelines import training_rows, vocabulary

    if not vocabulary(loaded):
        if guidance is not None:
            raise CliError(f"--guidance: {loaded.path} is unconditional, it has nothing to guide")
        return None
    try:
        return training_rows(loaded)
    except UnknownAttribute as e:
        print(
            f"note: the export holds no training labels, so --attrs-from training will not "
            f"work with it: {e}"
        )
        return None


def cmd_tour(a: argparse.Namespace) -> int:
    from ..apps.tour import run_tour

    return run_tour(Path(a.out), train_minutes=a.train_minutes, eval_n=a.eval_n, quick=a.quick)


def cmd_bench(a: argparse.Namespace) -> int:
    from ..apps.bench import main as bench_main

    try:
        return bench_main(
            a.image_size,
            a.batch_size,
            a.device,
            a.iters,
            a.json,
            a.compile,
            a.kid,
            a.sample_batch_size,
            a.sampler,
            a.steps,
            a.compile_mode,
        )
    except RuntimeError as e:  # out of memory (cli.main says it): name what needs less
        e.remedy = _bench_memory_remedy(a.image_size, a.batch_size)  # type: ignore[attr-defined]
        raise


def _bench_memory_remedy(image_size: int, batch_size: int) -> str:
    """What helps a bench that ran out of memory: a batch takes memory in proportion to its
    images and to the square of their size; where one image alone needs more than the host
    has (or the batch is one image), only a smaller --image-size does."""
    from .sampling import available_memory

    one, free = 3 * image_size**2 * 4, available_memory()  # one float32 image, before the network
    if batch_size == 1 or (free is not None and one > free):
        return (
            f"a smaller --image-size needs less (one {image_size}x{image_size} px image is "
            f"{one / 2**30:,.1f} GiB as float32 before the network, so a smaller --batch-size "
            "cannot help; memory goes with the square of the size)"
        )
    return (
        "a smaller --image-size (memory goes with the square of the size) or --batch-size "
        "(images per forward pass) needs less"
    )


def cmd_serve(a: argparse.Namespace) -> int:
    from ..apps.web import WEB_EXTRA_HINT, missing_extra

    missing = missing_extra()
    if missing:
        raise CliError(f"{WEB_EXTRA_HINT} ({missing} is not installed)")
    from ..apps.web import serve
    from ..apps.web.checks import RequestError
    from ..pretrained import SHIPPED
    from ..runtime import resolve_device

    if a.runs:
        need_folder(a.runs, "--runs", images=False)  # a folder of run folders
        if (Path(a.runs) / "config.json").is_file():  # its own subfolders hold no run
            raise CliError(
                f"--runs {a.runs!r} is a run folder; give the folder that holds it "
                f"(--runs {str(Path(a.runs).resolve().parent)!r}): the run folders directly "
                "under it are offered"
            )
    resolve_device(a.device or "auto")  # checked; on the CPU the allocator keeps freed memory
    try:
        serve(
            a.models or list(SHIPPED),
            a.runs,
            a.host,
            a.port,
            a.device or "auto",
            a.precision or "auto",
            allowed_hosts=tuple(a.allow_hosts),
        )
    except RequestError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        if e.errno in (98, 48, 10048):  # address in use (Linux, macOS, Windows)
            raise CliError(
                f"port {a.port} on {a.host} is in use: choose another with --port"
            ) from None
        if isinstance(e, socket.gaierror) or e.errno in (99, 49, 10049):  # not found, not ours
            raise CliError(
                f"--host {a.host!r} is not an address of this machine ({e.strerror}): give one of "
                "its own, 127.0.0.1 (this machine only) or 0.0.0.0 (every network interface)"
            ) from None
        raise
    return 0
