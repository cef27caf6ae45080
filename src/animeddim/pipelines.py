"""The Python API every front end calls (the CLI, a web app): model + data + metrics.

1. `load_for_sampling` loads a model once (a run folder, checkpoint, exported file or a
   shipped model by name);
2. `resolve_settings` checks and resolves how to sample (sampler, eta, clipping, precision)
   into a plain `SampleSettings`;
3. each long operation -- `draw`, `evaluate`, `steps_study`, `invert`, `interpolate`,
   `trajectory` -- takes the loaded model and the settings, writes its files and returns a
   JSON-able summary (every KID/FID number beside the name of its protocol), and reports
   progress through an optional `Progress` callback.

Plain functions and dataclasses: no argparse, no HTTP, no printing (except `steps_study`'s
`log`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics
from .checkpoint import LoadedModel
from .config import ConfigError
from .diffusion.generation import denormalize, generate, image_generators
from .diffusion.inversion import ddim_invert, interpolation_noises, psnr
from .diffusion.samplers import (
    SAMPLERS,
    check_sampler,
    randn_per_image,
    resolve_clip,
    sample,
    sampler_x0_range,
)
from .io import save_gif, save_grid, save_pngs, write_bytes_atomic, write_text_atomic
from .runtime import InferenceNet, default_compile_sampler, prepare_inference, resolve_precision
from .runtime import autocast as runtime_autocast

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): `done` of `total` units (images, frames, batches) of the
named stage are finished. Each stage starts with done = 0 and ends with done == total;
stages come one after another (e.g. "sample", then "features (generated)")."""


def _tell(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def _counter(progress: Progress | None, stage: str, total: int) -> Callable[[int], None]:
    """A per-batch callback (images just finished) that reports the running total."""
    done = 0
    _tell(progress, stage, 0, total)

    def add(k: int) -> None:
        nonlocal done
        done += k
        _tell(progress, stage, done, total)

    return add


def load_for_sampling(
    run: str | Path | None = None, model: str | None = None, device: str | torch.device = "auto"
) -> tuple[LoadedModel, torch.device]:
    """Load a model for sampling, once, and the device it is on.

    :param run: a run folder, checkpoint or exported file; None: the shipped `model`.
    :param model: a shipped model's name (`pretrained.SHIPPED`; default avatars-64).
    :param device: auto | cpu | cuda | cuda:N | mps; under torchrun each process joins the
        process group and gets its own GPU.
    :return: (the loaded model with its config and normalisation, its torch.device).
    :raises ConfigError, CheckpointError: an unknown device, a missing or unreadable model.
    """
    from .checkpoint import load_model
    from .distributed import setup
    from .pretrained import pretrained_path

    dev = setup(_device(device))
    source = run if run else pretrained_path(model or "avatars-64")
    return load_model(source, dev), dev


def _device(device: str | torch.device | None) -> torch.device:
    from .runtime import resolve_device

    return device if isinstance(device, torch.device) else resolve_device(device or "auto")


@dataclass
class SampleSettings:
    """How images are drawn from a model (see `resolve_settings` to build a checked one)."""

    steps: int = 20  # network evaluations of the sampler
    eta: float = 0.0  # 0: deterministic; 1: DDPM-like (stochastic samplers only)
    sampler: str = "ddim"  # a name in diffusion.samplers.SAMPLERS
    clip: bool | None = None  # clip x0_hat to the data range; None: the sampler's default
    seed: int = 0  # image i depends on (seed, i) only
    batch_size: int = 64  # images per forward pass
    device: str | torch.device = "cpu"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (resolved; `resolve_settings` resolves auto)
    compile: bool | None = None  # torch.compile the sampling net; None: where it pays off

    def autocast(self) -> contextlib.AbstractContextManager:
        """A fresh autocast context for this precision and device (nullcontext for fp32)."""
        return runtime_autocast(torch.device(self.device), self.precision)


def resolve_settings(
    device: str | torch.device = "auto",
    precision: str = "auto",
    *,
    steps: int = 20,
    eta: float = 0.0,
    sampler: str = "ddim",
    clip: bool | None = None,
    seed: int = 0,
    batch_size: int = 64,
    compile: bool | None = None,
) -> SampleSettings:
    """Checked `SampleSettings` on a resolved device (auto | cpu | cuda | cuda:N | mps): the
    sampler must be registered and allow `eta` (`diffusion.samplers.SAMPLERS`), and
    precision "auto" becomes bf16 where the hardware does it well, else fp32.

    :raises ConfigError: naming the bad value (unknown sampler, eta > 0 for a deterministic
        one, steps or batch size < 1, eta outside [0, 1], fp16 on the CPU).
    """
    dev = _device(device)
    try:
        check_sampler(sampler, eta)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if steps < 1 or batch_size < 1 or not 0.0 <= eta <= 1.0:
        raise ConfigError(
            f"steps ({steps}) and batch size ({batch_size}) must be >= 1, eta ({eta}) in [0, 1]"
        )
    return SampleSettings(
        steps=steps,
        eta=eta,
        sampler=sampler,
        clip=clip,
        seed=seed,
        batch_size=batch_size,
        device=dev,
        precision=resolve_precision(precision, dev),
        compile=compile,
    )


def sampling_net(loaded: LoadedModel, s: SampleSettings, evaluations: int) -> InferenceNet:
    """A copy of the network prepared for inference (BatchNorm folded, weights cast once,
    the layout and chunk size that measured fastest, compiled where that pays off for
    `evaluations` image-steps): see `runtime.prepare_inference`."""
    device = torch.device(s.device)
    compile = s.compile
    if compile is None:
        compile = default_compile_sampler(device, evaluations)
    return prepare_inference(loaded.model, device, s.precision, compile=compile)


def draw(
    loaded: LoadedModel,
    n: int,
    s: SampleSettings,
    first_index: int = 0,
    net: InferenceNet | None = None,
    progress: Progress | None = None,
    cond: Any = None,
) -> torch.Tensor:
    """n generated images, uint8 [n x H x W x C] on the CPU: images first_index ..
    first_index + n - 1 of `s.seed`.

    :param net: the `sampling_net` to use (made for this call when None); pass one to
        share its preparation and compilation between calls.
    :param progress: told ("sample", images done, n) after each batch.
    :param cond: per-image conditioning (one row per image), passed to the network.
    """
    cfg = loaded.config
    if net is None:
        net = sampling_net(loaded, s, n * s.steps)
    return generate(
        net,
        mean=loaded.mean,
        std=loaded.std,
        schedule=cfg.schedule,
        image_size=cfg.model.image_size,
        channels=cfg.model.channels,
        n=n,
        seed=s.seed,
        steps=s.steps,
        eta=s.eta,
        sampler=s.sampler,
        clip=s.clip,
        batch_size=s.batch_size,
        device=s.device,
        first_index=first_index,
        progress=_counter(progress, "sample", n) if progress else None,
        cond=cond,
    )


def _nchw(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.permute(0, 3, 1, 2).contiguous()


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
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Generate n images and compare them with the real folder.

    standard: KID (mean, std over 100 subsets) and FID, torch-fidelity protocol;
    paper: Keras per-batch KID between batches of generated and real images, the real ones
    shuffled with a fixed seed first (`metrics.paper_order`), then the first n used.
    Real-image features are cached on disk, keyed by the folder's content.
    :param attributes: an attribute classifier: also report coverage (`coverage.coverage`)
        against the real folder's labels.csv, written beside `out` as OUT-coverage/.

    :param progress: told about the stages "sample", "features (real)", "features
        (generated)" and "paper KID" (batches).
    :return: the summary, also written to `out` (JSON) when given.
    """
    t0 = time.perf_counter()
    fake = draw(loaded, n, settings, progress=progress)
    t_gen = time.perf_counter() - t0
    result: dict[str, Any] = {
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
    if "standard" in protocols:
        t1 = time.perf_counter()
        f_real, f_fake = _standard_features(real, fake, extractor, cache_dir, progress)
        kid_mean, kid_std = metrics.kid_standard(f_real, f_fake)
        result.update(
            protocol="standard",
            protocol_description=metrics.PROTOCOL_DESCRIPTIONS["standard"],
            kid_mean=kid_mean,
            kid_std=kid_std,
            fid=metrics.fid_from_features(f_real, f_fake),
            n_real=len(f_real),
            subset_size=metrics.kid_subset_size(len(f_real), len(f_fake)),
            standard_seconds=round(time.perf_counter() - t1, 2),
        )
    if "paper" in protocols:
        t2 = time.perf_counter()
        from .data import DataError, load_folder

        size = loaded.config.model.image_size
        real_images = load_folder(real, size).images
        order = metrics.paper_order(len(real_images))[:n]
        real_u8 = torch.from_numpy(np.asarray(real_images[order]))
        if len(real_u8) < 2:
            raise DataError(f"KID needs at least 2 images, '{real}' has {len(real_u8)} usable")
        acc = metrics.PaperKID(extractor)
        starts = range(0, min(len(real_u8), n), paper_batch)
        for k, i in enumerate(starts):
            _tell(progress, "paper KID", k, len(starts))
            acc.update(_nchw(real_u8[i : i + paper_batch]), _nchw(fake[i : i + paper_batch]))
        _tell(progress, "paper KID", len(starts), len(starts))
        result["paper"] = {
            "protocol": "paper",
            "protocol_description": metrics.PROTOCOL_DESCRIPTIONS["paper"],
            "kid": acc.compute(),
            "batches": len(acc.values),
            "batch_size": paper_batch,
            "seconds": round(time.perf_counter() - t2, 2),
        }
    if attributes is not None:
        from .coverage import coverage, real_set, write_coverage

        result["coverage"] = coverage(attributes, fake.numpy(), *real_set(attributes, real))
        if out is not None:
            write_coverage(result["coverage"], Path(out).with_name(Path(out).stem + "-coverage"))
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if out is not None:
        write_text_atomic(Path(out), json.dumps(result, indent=2) + "\n")
    return result


def _standard_features(
    real: str | Path,
    fake_u8: torch.Tensor,
    extractor: metrics.FeatureExtractor,
    cache_dir: Path | None,
    progress: Progress | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard-protocol features of the real folder (cached) and of generated images."""

    def stage(name: str):
        return None if progress is None else (lambda d, t: progress(name, d, t))

    f_real = metrics.folder_features(
        Path(real), extractor, "standard", cache_dir=cache_dir, progress=stage("features (real)")
    )
    f_fake = metrics.features_with_progress(
        extractor, _nchw(fake_u8), "standard", stage("features (generated)")
    )
    return f_real, f_fake


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
    """
    out_dir = Path(out_dir)
    f_real = metrics.folder_features(
        Path(real),
        extractor,
        "standard",
        cache_dir=cache_dir,
        progress=None if progress is None else (lambda d, t: progress("features (real)", d, t)),
    )
    rows = []
    # One prepared (and maybe compiled) network for the whole study, warmed up on a full
    # batch and the last batch's size, so that no setting's time includes compilation.
    net = sampling_net(loaded, settings, n * sum(steps) * len(etas) * len(samplers))
    for size in {min(n, settings.batch_size), n % settings.batch_size or settings.batch_size}:
        draw(loaded, size, replace(settings, steps=1), net=net)
    for sampler in samplers:
        for eta in etas:
            if eta > 0 and not SAMPLERS[sampler].stochastic:
                continue  # a deterministic sampler runs at eta 0 only
            for s in steps:
                cfg = replace(settings, steps=s, eta=eta, sampler=sampler)
                name = f"{sampler} eta {eta:g}, {s} steps"
                t = time.perf_counter()
                fake = draw(loaded, n, cfg, net=net, progress=_prefixed(progress, name))
                spi = (time.perf_counter() - t) / n
                f_fake = metrics.features_with_progress(
                    extractor,
                    _nchw(fake),
                    "standard",
                    None
                    if progress is None
                    else (lambda d, t, k=name: progress(f"{k}: features", d, t)),
                )
                kid_mean, kid_std = metrics.kid_standard(f_real, f_fake)
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
                    f"{sampler}{clipped} eta {eta:g} steps {s}: KID (standard) {kid_mean:.4f} "
                    f"± {kid_std:.4f}, {spi:.3f} s/image"
                )
    write_steps(rows, out_dir)
    return rows


def _prefixed(progress: Progress | None, prefix: str) -> Progress | None:
    """progress with every stage name prefixed: "PREFIX: stage"."""
    if progress is None:
        return None
    return lambda stage, done, total: progress(f"{prefix}: {stage}", done, total)


def write_steps(rows: list[dict[str, Any]], out_dir: Path) -> None:
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
    write_text_atomic(out_dir / "steps.md", "\n".join(lines) + "\n")
    from .report import Table, plot_steps, sampler_label

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


def _load_images(folder: str | Path, size: int) -> tuple[torch.Tensor, list[str]]:
    from .data import load_folder

    s = load_folder(folder, size)
    return torch.from_numpy(np.asarray(s.images)), s.paths


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
    """DDIM-invert the images of a folder to starting noise, regenerate, measure PSNR.

    Writes out/latents.safetensors, out/reconstructions/*.png and out/side-by-side.png
    (originals above, reconstructions below).

    :param progress: told ("invert", images done, total) after each batch.
    """
    from safetensors.torch import save as st_save

    out = Path(out)
    (out / "reconstructions").mkdir(parents=True, exist_ok=True)
    cfg = loaded.config
    real_u8, paths = _load_images(images, cfg.model.image_size)
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
    save_pngs(rec, out / "reconstructions", reconstruction_names(paths, images))
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

    :param progress: told ("invert", images done, 2) for inverted ends, then
        ("interpolate", frames done, frames).
    """

    cfg = loaded.config
    shape = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    if seeds is not None:
        a = randn_per_image(image_generators(seeds[0], [0]), shape, settings.device)
        b = randn_per_image(image_generators(seeds[1], [0]), shape, settings.device)
    elif images is not None:
        from .data import BadImage, DataError, load_image

        ends = []
        inverted = _counter(progress, "invert", 2)
        for p in images:
            try:
                im = torch.tensor(load_image(Path(p), cfg.model.image_size))[None]
            except BadImage as e:
                raise DataError(f"cannot interpolate from '{p}': {e.reason}") from None
            x0 = _normalised(loaded, im, settings.device)
            with settings.autocast():
                ends.append(ddim_invert(loaded.model, x0, invert_steps, cfg.schedule).float())
            inverted(1)
        a, b = ends
        # the inverted noises belong to unclipped DDIM with the inversion's steps
        settings = replace(settings, steps=invert_steps, sampler="ddim", eta=0.0, clip=False)
    else:
        raise ValueError("give two seeds or two images")
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


@torch.no_grad()
def trajectory(
    loaded: LoadedModel,
    path: str | Path,
    *,
    settings: SampleSettings,
    n: int = 4,
    columns: int = 10,
) -> Path:
    """Reverse-process strips: for n images, x_t (upper row) and predicted x0 (lower row)
    at up to `columns` evenly spaced steps of the chosen sampler (the paper's Fig. 1)."""
    cfg = loaded.config
    shape = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    gens = image_generators(settings.seed, range(n))
    noise = randn_per_image(gens, shape, settings.device)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(step, t, xt, x0):
        seen.append((xt.float().cpu(), x0.float().cpu()))

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
    pick = np.unique(np.linspace(0, len(seen) - 1, min(columns, len(seen))).round().astype(int))
    # x_t is shown with the data's normalisation too: at t = 1 that is (almost) pure noise.
    rows = []
    for i in range(n):
        rows.append(
            torch.stack(
                [denormalize(seen[k][0][i : i + 1], loaded.mean, loaded.std)[0] for k in pick]
            )
        )
        rows.append(
            torch.stack(
                [denormalize(seen[k][1][i : i + 1], loaded.mean, loaded.std)[0] for k in pick]
            )
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(torch.cat(rows), path, cols=len(pick))
    return path


# --- for interactive front ends (the web app): load once, settings, progress ---------------


def open_model(spec: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """A shipped model's name, or a run folder / checkpoint file, loaded for sampling."""
    from .checkpoint import load_model
    from .pretrained import weights_path

    return load_model(weights_path(str(spec)), device)


class _Observed(torch.nn.Module):
    def __init__(self, net: torch.nn.Module, on_eval):
        super().__init__()
        self.net, self.on_eval = net, on_eval

    def forward(
        self, noisy_images: torch.Tensor, noise_variances: torch.Tensor, cond: Any = None
    ) -> torch.Tensor:
        self.on_eval(noisy_images.shape[0])
        return self.net(noisy_images, noise_variances, cond)


def observed(net: torch.nn.Module, on_eval) -> torch.nn.Module:
    """`net` calling on_eval(batch_images) before each network evaluation: for progress, and
    for stopping work early (on_eval may raise; the exception leaves the sampler)."""
    return _Observed(net, on_eval)


def invert_evaluations(steps: int) -> int:
    """Network evaluations `ddim_invert` makes per batch with its default iterations."""
    import inspect

    p = inspect.signature(ddim_invert).parameters
    return p["start_iterations"].default + (steps - 1) * (1 + p["step_iterations"].default)
