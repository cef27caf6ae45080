"""Commands that sample a model: sample, invert, interpolate; what kid, evaluate and steps
share with them (loading, settings, memory checks, the Inception extractor)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .. import conditional_cli, outputs
from ..words import counted
from .common import (
    EXIT_INTERRUPTED,
    CliError,
    _Bars,
    _close_bars,
    _is_main,
)
from .sample_folder import SampleFolder, folder_settings


def load_for_sampling(run: str | None, model: str | None, device_name: str | None):
    from ..pipelines import load_for_sampling as load
    from ..runtime import resolve_device

    # the command's own device: on the CPU its allocator keeps freed memory (the API's doesn't)
    loaded = load(run, model, resolve_device(device_name or "auto"))
    if run is None and model is None and _is_main():
        # Else a command on one's own data that forgot --run measures the avatars in silence.
        print(
            "note: no --run or --model: using the shipped model avatars-64 "
            "(--run RUN for a model you trained)",
            file=sys.stderr,
        )
    return loaded


def fill_sampling(a: argparse.Namespace, loaded) -> None:
    """Set the --sampler and --steps left out (None) to what the model file recommends
    (`pipelines.default_sampling`). An --eta > 0 without --sampler keeps DDIM, the sampler
    that takes it; the file's step count goes with the file's sampler, else 20."""
    from ..diffusion.sampler_names import SAMPLER_INFO
    from ..pipelines import DEFAULT_SAMPLING, default_sampling

    sampler, steps = default_sampling(loaded)
    if a.sampler is None:
        stochastic = SAMPLER_INFO[sampler].stochastic
        a.sampler = sampler if a.eta == 0 or stochastic else DEFAULT_SAMPLING[0]
    if a.steps is None:
        a.steps = steps if a.sampler == sampler else DEFAULT_SAMPLING[1]


def _settings(a: argparse.Namespace, device, loaded=None, **over):
    """Sampling options -> checked `pipelines.SampleSettings` (the list-valued options of
    `steps` are its own); with the `loaded` model, the options left out first take its
    file's recommendation (`fill_sampling`)."""
    from ..pipelines import resolve_settings

    if loaded is not None:
        fill_sampling(a, loaded)
    kw = {
        k: getattr(a, k)
        for k in ("steps", "eta", "sampler", "seed", "batch_size")
        if isinstance(getattr(a, k, None), (int, float, str))
    }
    kw.update(compile=getattr(a, "compile", None), clip=getattr(a, "clip_x0", None))
    kw.update(guidance_interval=getattr(a, "guidance_interval", None))
    kw.update(attribute_guidance=getattr(a, "attr_guidance", None))
    kw.update(over)
    return resolve_settings(device, getattr(a, "precision", None) or "auto", **kw)


def cmd_sample(a: argparse.Namespace) -> int:
    from ..distributed import check_same, is_main
    from ..io import save_grid
    from ..pipelines import trajectory
    from ..pipelines.folder import draw_job, image_job

    if not a.out and not a.grid and not a.trajectory:
        raise CliError("give --out DIR, --grid FILE.png and/or --trajectory FILE.png")
    conditional_cli.check_guidance_has_conditions(
        a.guidance,
        bool(a.attr or a.grid_by or a.attrs_from),
        "--attr NAME=VALUE, --grid-by NAME or --attrs-from FILE.csv",
        a.guidance_interval,
        a.attr_guidance,
    )
    if a.attrs_from and a.grid_by:
        raise CliError("--attrs-from sets every image's attributes: give it without --grid-by")
    for flag, value in (("--grid", a.grid), ("--trajectory", a.trajectory)):
        if value:  # 'g.png/' would lose its slash to Path and write g.png
            outputs.file_name(value, flag)
    loaded, device = load_for_sampling(a.run, a.model, a.device)
    check_same(_options(a))  # under torchrun each process draws its share of the same images
    # the grid's images are held until it is written; --out writes them as drawn, their names
    # listed first (a count no memory holds would take it all before the first image)
    check_fits_in_memory(a.n, loaded.config.model.image_size, names_only=not a.grid)
    settings = _settings(a, device, loaded)
    files = [(f, Path(v)) for f, v in (("--grid", a.grid), ("--trajectory", a.trajectory)) if v]
    outputs.distinct(files)
    for flag, path in files:
        if path.suffix.lower() != ".png":  # written as PNG whatever the name says
            raise CliError(f"{flag} {str(path)!r}: images are written as PNG; name it .png")
    if a.attr or a.grid_by or a.attrs_from:
        job, asked, said = conditional_cli.sample_conditional(a, loaded, settings)
    else:
        names = outputs.sample_names(a.seed, a.n)
        job, asked, said = image_job(loaded, settings, names, min(8, a.n)), {}, []
    held = folder_settings(a.out, a.n, loaded, settings, asked, job)
    folder = SampleFolder(a.out, a.force, files, job, held)
    if said and is_main():  # what the images are asked, once the outputs are found fit
        print("\n".join(said))
    try:
        if a.trajectory and is_main():
            strips = trajectory(loaded, a.trajectory, settings=settings, progress=_Bars("step"))
            print(f"trajectory: {strips}")
        if a.trajectory and not a.out and not a.grid:
            return 0
        t = time.perf_counter()
        images, drawn = draw_job(
            job,
            a.out,
            settings.batch_size,
            kept=folder.kept,
            progress=_Bars(),
            keep_images=bool(a.grid),
            before_write=folder.begin if folder.earlier else None,
        )
    except KeyboardInterrupt:
        if not a.out:
            raise
        _close_bars()
        if is_main():
            kept = folder.count_kept()
            rest = len(job.names) - kept
            print(
                f"interrupted: {kept} of {counted(len(job.names), 'image')} kept in {a.out!r}; "
                "the same command again goes on from there "
                f"({f'draws the other {rest}' if rest else 'none left to draw'})"
            )
        return EXIT_INTERRUPTED
    except Exception:
        folder.abandon()
        raise
    if not is_main():
        return 0
    dt = time.perf_counter() - t
    if a.out:
        print(f"{counted(len(job.names), 'image')} in {a.out}")
    if a.grid:
        Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, Path(a.grid), cols=job.cols)
        print(f"grid: {a.grid}")
    folder.finish()
    print(drawn_line(drawn, settings, dt))  # --grid-by draws --n per value
    return 0


def drawn_line(n: int, settings, seconds: float) -> str:
    """What `sample` says it drew: the sampler (the model file may have chosen it, and an
    --eta > 0 keeps DDIM), its steps, eta and clipping, as `evaluate` says them."""
    from ..diffusion.samplers import resolve_clip

    clipped = ", x0 clipped" if resolve_clip(settings.clip, settings.sampler) else ""
    compiled = settings.compiles(n * settings.steps)
    # the first network call compiles (seconds): the rate is then not the sampler's alone
    rate = f"{n / seconds:.2f} images/s{', compilation included' if compiled else ''}"
    return (
        f"{counted(n, 'image')}, {counted(settings.steps, settings.sampler + ' step')}, "
        f"eta {settings.eta:g}{clipped}: "
        f"{seconds:.1f}s ({rate})"
    )


def _options(a: argparse.Namespace) -> dict[str, Any]:
    """The command's options by flag (`--n`: 4), to compare between processes."""
    plain = (str, int, float, bool, list, tuple, type(None))
    return {f"--{k.replace('_', '-')}": v for k, v in vars(a).items() if isinstance(v, plain)}


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation on Linux: MemAvailable, or less where
    a cgroup (v2) limit leaves less to this process; None elsewhere."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max" and free is not None:
            used = int((cgroup / "memory.current").read_text())
            free = min(free, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return free


# Measured: `sample --out` lists the file names of its --n images, and which are drawn, before
# the first is (`pipelines.folder`): 75 bytes an image, twice that with a stopped call's kept.
SAMPLE_NAME_BYTES = 150


def check_fits_in_memory(n: int, image_size: int, names_only: bool = False) -> None:
    """CliError when --n images cannot be held in memory until they are written (the drawn
    uint8 images and their joined copy; `names_only`: their file names alone, as `sample
    --out` without --grid holds them), instead of failing after hours of drawing, or taking
    every byte of memory before the first image."""
    per_image = SAMPLE_NAME_BYTES if names_only else 2 * image_size * image_size * 3
    need, free = n * per_image, available_memory()
    if free is not None and need > free:
        held = " (their file names alone)" if names_only else ""
        raise CliError(
            f"--n {n} images of {image_size}x{image_size} px need {need / 2**30:,.1f} GiB of "
            f"memory until they are written{held}, and {free / 2**30:,.1f} GiB are available: "
            f"draw at most about {max(1, free // per_image):,} per call (other --seed values "
            "give other images)"
        )


# Measured: interpolating 1,500 frames of 64 px took 734 MB more at its peak than 2 frames,
# 40 bytes per value: slerp's float64 copies of both ends, two products and their sum, all
# frames at once (`diffusion.inversion.slerp`); the decoded frames, strip and GIF hold less.
INTERPOLATE_BYTES_PER_VALUE = 40


def check_frames_fit_in_memory(frames: int, image_size: int) -> None:
    """CliError when `interpolate --frames` cannot be held in memory (its starting noises are
    interpolated at once), instead of a traceback from the allocation or hours of drawing."""
    per_frame = INTERPOLATE_BYTES_PER_VALUE * image_size * image_size * 3
    need, free = frames * per_frame, available_memory()
    if free is not None and need > free:
        raise CliError(
            f"--frames {frames} of {image_size}x{image_size} px need {need / 2**30:,.1f} GiB "
            f"of memory (their starting noises are interpolated at once, in float64), and "
            f"{free / 2**30:,.1f} GiB are available: give at most about "
            f"{max(2, free // per_frame):,} frames"
        )


def _extractor(a: argparse.Namespace):
    from ..metrics import InceptionFeatures
    from ..runtime import resolve_device

    device = resolve_device(a.device or "auto")
    try:
        return InceptionFeatures(a.inception_weights, device=device)
    except ValueError as e:  # a file that is not TorchScript: the message names it
        raise CliError(f"Inception weights: {e}") from None


def cmd_invert(a: argparse.Namespace) -> int:
    from ..pipelines import invert

    outputs.not_inside(a.out, [a.images], "--out", outputs.images_what(a.images))
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
        f"mean PSNR {r['mean_psnr_db']:.2f} dB over {counted(len(r['psnr_db']), 'image')} "
        f"({counted(a.steps, 'step')}); latents, reconstructions and side-by-side.png in "
        f"{a.out}"
    )
    return 0


def cmd_interpolate(a: argparse.Namespace) -> int:
    from ..pipelines import interpolate

    if a.images and (a.sampler != "ddim" or a.clip_x0):
        raise CliError(
            "--images are inverted with DDIM and decoded with the same unclipped DDIM: "
            "drop --sampler and --clip-x0"
        )
    same = (a.seeds and a.seeds[0] == a.seeds[1]) or (
        a.images and Path(a.images[0]).resolve() == Path(a.images[1]).resolve()
    )
    if same:  # both ends one noise: every frame would be the same image
        given = f"--seeds {a.seeds[0]} {a.seeds[1]}" if a.seeds else f"--images {a.images[0]} twice"
        what = "seeds" if a.seeds else "images"
        raise CliError(
            f"{given}: both ends are the same, so every frame would be one image; give two "
            f"different {what}"
        )
    if a.steps is None:  # inverted ends need more steps than a decode from seeds
        a.steps = 50 if a.images else 20
    outputs.file_name(a.out)  # 'interp/' would write interp.png and interp.gif beside it
    ends = [Path(a.out).with_suffix(".png"), Path(a.out).with_suffix(".gif")]
    for end in ends:
        outputs.new_file(end, a.force)
        for image in a.images or ():
            outputs.distinct([("--out", end), ("--images", Path(image))])
    loaded, device = load_for_sampling(a.run, a.model, a.device)
    check_frames_fit_in_memory(a.frames, loaded.config.model.image_size)
    strip, gif = interpolate(
        loaded,
        a.out,
        seeds=tuple(a.seeds) if a.seeds else None,
        images=tuple(a.images) if a.images else None,
        frames=a.frames,
        settings=_settings(a, device, eta=0.0),
        invert_steps=a.steps,
        progress=_Bars(),
    )
    print(f"interpolation: {strip} and {gif}")
    return 0
