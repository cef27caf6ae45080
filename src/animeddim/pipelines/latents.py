"""Working in noise space: DDIM inversion of images (`invert`), interpolation between two
starting noises (`interpolate`) and reverse-process strips (`trajectory`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import LoadedModel
from ..config import ConfigError
from ..diffusion.generation import denormalize, image_generators
from ..diffusion.inversion import ddim_invert, interpolation_noises, psnr
from ..diffusion.samplers import (
    randn_per_image,
    sample,
    sampler_x0_range,
)
from ..io import save_gif, save_grid, save_pngs, write_bytes_atomic
from .core import (
    Progress,
    SampleSettings,
    _counter,
    _nchw,
    check_count,
    check_loaded,
    check_seed,
    check_settings,
)


def _load_images(images: str | Path, size: int) -> tuple[torch.Tensor, list[str], Path]:
    """The images of a folder, or of one image file, at the model's `size` (those smaller
    enlarged to it: an `EnlargedWarning` says so); with the folder their paths are below."""
    from ..data import load_images

    s, root = load_images(images, size)
    s.enlarged.warn(size)
    return torch.from_numpy(np.asarray(s.images)), s.paths, root


def _normalised(loaded: LoadedModel, images_u8: torch.Tensor, device) -> torch.Tensor:
    x = _nchw(images_u8).float().to(device) / 255.0
    return (x - loaded.mean.view(1, -1, 1, 1).to(device)) / loaded.std.view(1, -1, 1, 1).to(device)


@torch.no_grad()
def invert(
    loaded: LoadedModel,
    images: str | Path,
    out: str | Path,
    *,
    steps: int = 50,
    settings: SampleSettings,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """DDIM-invert the images of a folder (or one image file: as a folder holding only it)
    to starting noise, regenerate, measure PSNR.

    Writes out/latents.safetensors, out/reconstructions/*.png (each named by its path below
    the folder, .png) and out/side-by-side.png (originals above, reconstructions below).

    :param steps: DDIM steps of the inversion and of the regeneration (an integer >= 1).
    :param settings: its batch size, device and precision are used (the sampler is DDIM).
    :param progress: told ("invert", images done, total) after each batch.
    :return: {"steps", "psnr_db": {image path: PSNR in dB}, "mean_psnr_db", "out"}.
    :raises ConfigError: steps not an integer >= 1. DataError: a missing folder, or one
        with no usable image; a file that is not a usable image.
    """
    from safetensors.torch import save as st_save

    loaded, settings = check_loaded(loaded), check_settings(settings)
    steps = check_count(steps, "steps")
    out = Path(out)
    cfg = loaded.config
    real_u8, paths, root = _load_images(images, cfg.model.image_size)  # before any folder
    (out / "reconstructions").mkdir(parents=True, exist_ok=True)
    latents, recon = [], []
    done = _counter(progress, "invert", len(real_u8))
    for i in range(0, len(real_u8), settings.batch_size):
        x0 = _normalised(loaded, real_u8[i : i + settings.batch_size], settings.device)
        with settings.autocast():
            z = ddim_invert(loaded.model, x0, steps, cfg.schedule)
            x = sample(loaded.model, z, steps, cfg.schedule)
        latents.append(z.float().cpu())
        recon.append(denormalize(x.float(), loaded.mean, loaded.std).cpu())
        done(len(x))
    z_all, rec = torch.cat(latents), torch.cat(recon)
    write_bytes_atomic(
        out / "latents.safetensors",
        st_save({"latents": z_all.contiguous()}, {"paths": json.dumps(paths), "steps": str(steps)}),
    )
    save_pngs(rec, out / "reconstructions", reconstruction_names(paths, root))
    save_grid(torch.cat([real_u8, rec]), out / "side-by-side.png", cols=len(real_u8))
    values = psnr(real_u8, rec).tolist()
    return {
        "steps": steps,
        "psnr_db": dict(zip(paths, values, strict=True)),
        "mean_psnr_db": float(np.mean(values)),
        "out": str(out),
    }


def reconstruction_names(paths: Sequence[str], root: str | Path) -> list[str]:
    """One distinct PNG name per input image: its path below `root` with the suffix .png
    ("sub/a.jpg" -> "sub/a.png"), or with .png added where two inputs would share a name
    (a.png and a.jpg -> a.png.png and a.jpg.png)."""
    rels = [Path(p).relative_to(root) if Path(p).is_relative_to(root) else Path(p) for p in paths]
    names = [r.with_suffix(".png").as_posix() for r in rels]
    clash = {n for n in names if names.count(n) > 1}
    names = [f"{r.as_posix()}.png" if n in clash else n for r, n in zip(rels, names, strict=True)]
    if len(set(names)) < len(names):  # only with names made to collide: number them all
        names = [f"{i:06d}-{r.name}.png" for i, r in enumerate(rels)]
    return names


@torch.no_grad()
def interpolate(
    loaded: LoadedModel,
    out: str | Path,
    *,
    seeds: tuple[int, int] | None = None,
    images: tuple[str | Path, str | Path] | None = None,
    frames: int = 16,
    settings: SampleSettings,
    invert_steps: int = 50,
    progress: Progress | None = None,
) -> tuple[Path, Path]:
    """Spherical interpolation between two starting noises, decoded with the sampler.

    The noises come from two seeds (image 0 of each) or from DDIM inversion of two images.
    Writes a strip (PNG) and an animated GIF with the same stem; returns both paths.

    :param seeds: (seed a, seed b); or `images`: (image file a, image file b), not both.
    :param frames: frames of the strip and the GIF, ends included (an integer >= 2).
    :param settings: how the frames are decoded from seeds; from images, DDIM with
        `invert_steps` steps (the inverted noises belong to it).
    :param progress: told ("invert", images done, 2) for inverted ends, then
        ("interpolate", frames done, frames).
    :return: (out with suffix .png: the frames side by side, out with suffix .gif).
    :raises ConfigError: not exactly two seeds or two images, a seed outside
        0 .. 2**63 - 1, frames or invert_steps out of range. DataError: an unusable image.
    """
    loaded, settings = check_loaded(loaded), check_settings(settings)
    frames = check_count(frames, "frames", 2)
    invert_steps = check_count(invert_steps, "invert_steps")
    ends = seeds if images is None else images
    if (seeds is None) == (images is None) or not _a_pair(ends):
        raise ConfigError(
            f"give two seeds or two images, not both: got seeds={seeds!r}, images={images!r}"
        )
    cfg = loaded.config
    shape = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    if seeds is not None:
        seeds = tuple(check_seed(seed) for seed in seeds)
        a = randn_per_image(image_generators(seeds[0], [0]), shape, settings.device)
        b = randn_per_image(image_generators(seeds[1], [0]), shape, settings.device)
    else:
        ends = []
        inverted = _counter(progress, "invert", 2)
        for im in _read_ends(images, cfg.model.image_size):
            x0 = _normalised(loaded, im, settings.device)
            with settings.autocast():
                ends.append(ddim_invert(loaded.model, x0, invert_steps, cfg.schedule).float())
            inverted(1)
        a, b = ends
        # the inverted noises belong to unclipped DDIM with the inversion's steps
        settings = replace(settings, steps=invert_steps, sampler="ddim", eta=0.0, clip=False)
    noises = interpolation_noises(a[0], b[0], frames)
    x0_range = sampler_x0_range(settings.clip, settings.sampler, loaded.mean, loaded.std)
    decoded = []
    decoded_frames = _counter(progress, "interpolate", frames)
    for i in range(0, frames, settings.batch_size):
        with settings.autocast():
            x = sample(
                loaded.model,
                noises[i : i + settings.batch_size],
                settings.steps,
                cfg.schedule,
                sampler=settings.sampler,
                x0_range=x0_range,
            )
        decoded.append(denormalize(x.float(), loaded.mean, loaded.std).cpu())
        decoded_frames(len(x))
    frames_u8 = torch.cat(decoded)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    strip, gif = out.with_suffix(".png"), out.with_suffix(".gif")
    save_grid(frames_u8, strip, cols=frames)
    # there and back, as in the Keras example's animation
    save_gif(gif, torch.cat([frames_u8, frames_u8.flip(0)[1:-1]]), duration_ms=80)
    return strip, gif


def _read_ends(images: Sequence[str | Path], size: int) -> list[torch.Tensor]:
    """The images of `interpolate`'s ends at the model's `size`, [1 x H x W x 3] uint8 each;
    those smaller enlarged to it, which one `EnlargedWarning` says for both."""
    from ..data import BadImage, DataError, load_image
    from ..enlarged import Enlarged

    ends, sources = [], []
    for p in images:
        try:
            ends.append(torch.tensor(load_image(Path(p), size, source=sources))[None])
        except BadImage as e:
            raise DataError(f"cannot interpolate from '{p}': {e.reason}") from None
    Enlarged.of([str(p) for p in images], sources, size).warn(size)
    return ends


def _a_pair(ends: Any) -> bool:
    """Whether `ends` is two things (a tuple or list of two, not a string or a number)."""
    return isinstance(ends, Sequence) and not isinstance(ends, str) and len(ends) == 2


def shown_steps(steps: int, columns: int) -> list[int]:
    """Up to `columns` step indices spread evenly over 0 .. steps - 1, first and last
    included (the last alone when columns is 1)."""
    if steps <= 1 or columns <= 1:
        return [steps - 1]
    return sorted({round(i * (steps - 1) / (columns - 1)) for i in range(columns)})


@dataclass
class ReverseSteps:
    """The reverse process of n images at the shown steps (`reverse_steps`).

    :param steps: the shown step indices, 0-based, of `settings.steps` evaluations.
    :param times: diffusion time t entering each shown step.
    :param noisy: uint8 [n x k x H x W x C]: x_t entering each shown step, de-normalised (at
        t = 1 that is (almost) pure noise).
    :param pred: uint8 [n x k x H x W x C]: the network's predicted x0 at that step.
    """

    steps: list[int]
    times: list[float]
    noisy: torch.Tensor
    pred: torch.Tensor


@torch.no_grad()
def reverse_steps(
    loaded: LoadedModel,
    *,
    settings: SampleSettings,
    n: int = 4,
    columns: int = 10,
    progress: Progress | None = None,
) -> ReverseSteps:
    """Sample images 0 .. n-1 of `settings.seed` with the chosen sampler and keep x_t and
    predicted x0 at up to `columns` evenly spaced steps (`shown_steps`).

    :param progress: told ("trajectory", network evaluations done, settings.steps) after each.
    :raises ConfigError: n or columns not an integer >= 1.
    """
    loaded, settings = check_loaded(loaded), check_settings(settings)
    n, columns = check_count(n, "n"), check_count(columns, "columns")
    cfg = loaded.config
    shape = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    gens = image_generators(settings.seed, range(n))
    noise = randn_per_image(gens, shape, settings.device)
    shown = shown_steps(settings.steps, columns)
    kept: dict[int, tuple[float, torch.Tensor, torch.Tensor]] = {}
    evaluated = _counter(progress, "trajectory", settings.steps)

    def keep(step, t, xt, x0):
        if step in shown:
            u8 = [denormalize(v.float().cpu(), loaded.mean, loaded.std) for v in (xt, x0)]
            kept[step] = (float(t), *u8)
        evaluated(1)

    with settings.autocast():
        sample(
            loaded.model,
            noise,
            settings.steps,
            cfg.schedule,
            sampler=settings.sampler,
            eta=settings.eta,
            generators=gens,
            callback=keep,
            x0_range=sampler_x0_range(settings.clip, settings.sampler, loaded.mean, loaded.std),
        )
    return ReverseSteps(
        steps=shown,
        times=[kept[k][0] for k in shown],
        noisy=torch.stack([kept[k][1] for k in shown], dim=1),
        pred=torch.stack([kept[k][2] for k in shown], dim=1),
    )


def trajectory(
    loaded: LoadedModel,
    path: str | Path,
    *,
    settings: SampleSettings,
    n: int = 4,
    columns: int = 10,
    progress: Progress | None = None,
) -> Path:
    """Reverse-process strips: for n images, x_t (upper row) and predicted x0 (lower row)
    at up to `columns` evenly spaced steps of the chosen sampler (the paper's Fig. 1).

    :param progress: told ("trajectory", network evaluations done, settings.steps) after each.
    """
    r = reverse_steps(loaded, settings=settings, n=n, columns=columns, progress=progress)
    rows = [strip for i in range(n) for strip in (r.noisy[i], r.pred[i])]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(torch.cat(rows), path, cols=len(r.steps))
    return path
