"""Loading a model for sampling, sampling settings, progress reporting and drawing images:
the part of the API every front end needs first (see the package's docstring)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import LoadedModel, recommended_sampling
from ..config import ConfigError, as_integer, check_guidance_interval
from ..diffusion.generation import generate
from ..diffusion.inversion import ddim_invert
from ..diffusion.samplers import (
    check_sampler,
)
from ..runtime import InferenceNet, default_compile_sampler, prepare_inference, resolve_precision
from ..runtime import autocast as runtime_autocast

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
    :param model: a shipped model's name (`pretrained.SHIPPED`; default avatars-64), or a path
        as `run` takes.
    :param device: auto | cpu | cuda | cuda:N | mps; under torchrun each process joins the
        process group and gets its own GPU.
    :return: (the loaded model with its config and normalisation, its torch.device).
    :raises ConfigError, CheckpointError: an unknown device, a missing or unreadable model.
    """
    from ..checkpoint import load_model
    from ..distributed import setup
    from ..pretrained import weights_path

    dev = setup(_device(device))
    # an empty run or model is an error (`checkpoint.resolve`), never the default
    source = run if run is not None else weights_path("avatars-64" if model is None else model)
    return load_model(source, dev), dev


DEFAULT_SAMPLING = ("ddim", 20)  # the paper's DDIM (Algorithm 1), 20 steps


def default_sampling(loaded: LoadedModel) -> tuple[str, int]:
    """The (sampler, steps) sampling from `loaded` uses unless told: the pair an exported file
    recommends (`animeddim export --sampler --steps`), else `DEFAULT_SAMPLING`.

    :raises CheckpointError: a stored recommendation that is unusable."""
    return recommended_sampling(loaded.meta) or DEFAULT_SAMPLING


def _device(device: str | torch.device | None) -> torch.device:
    """The checked device. A library call leaves the process's C allocator as it is (the
    programs built on the API, `animeddim` and its web app, make it keep freed memory:
    `runtime.keep_freed_memory`)."""
    from ..runtime import resolve_device

    if isinstance(device, torch.device):
        return device
    return resolve_device(device or "auto", host_memory=False)


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
    # noise levels (lo, hi] in sigma = noise/signal rate where classifier-free guidance
    # applies (plain conditional elsewhere); None: the model file's recommended, else always
    guidance_interval: tuple[float, float] | None = None
    # attribute -> its own guidance weight in place of w (`diffusion.guidance.Guided`); {}:
    # none; None: the model file's recommended ones where w is the file's weight, else none
    attribute_guidance: dict[str, float] | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """A fresh autocast context for this precision and device (nullcontext for fp32)."""
        return runtime_autocast(torch.device(self.device), self.precision)

    def compiles(self, evaluations: int) -> bool:
        """Whether a job of `evaluations` image-steps compiles the sampling network: `compile`,
        else where that pays off (`runtime.default_compile_sampler`)."""
        if self.compile is not None:
            return self.compile
        return default_compile_sampler(torch.device(self.device), evaluations)


SEED_LIMIT = 2**63  # a seed of images is in 0 .. 2**63 - 1, as training's seed


def check_seed(seed: int, name: str = "seed") -> int:
    """`seed` if it is an integer in 0 .. 2**63 - 1, else ConfigError naming it: outside
    that range image i's generator seed wraps around, so two seeds would draw the same
    images (-1 those of 2**63 - 1, 2**63 those of 0). numpy's integers and 0-d integer
    tensors are integers too (`config.as_integer`)."""
    value = as_integer(seed)
    if value is None or not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{name} must be an integer in 0 .. 2**63 - 1, got {seed!r}")
    return value


def check_count(value: int, name: str, least: int = 1) -> int:
    """`value` as an int if it is an integer >= `least` (numpy's, or a 0-d integer tensor,
    too: `config.as_integer`), else ConfigError naming it (a float such as 2.5 steps, or a
    string, would fail deep inside torch)."""
    count = as_integer(value)
    if count is None or count < least:
        raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
    return count


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
    guidance_interval: tuple[float, float] | None = None,
    attribute_guidance: dict[str, float] | None = None,
) -> SampleSettings:
    """Checked `SampleSettings` on a resolved device (auto | cpu | cuda | cuda:N | mps): the
    sampler must be registered and allow `eta` (`diffusion.samplers.SAMPLERS`), and
    precision "auto" becomes bf16 where the hardware does it well, else fp32.

    :raises ConfigError: naming the bad value (unknown sampler, eta > 0 for a deterministic
        one, steps or batch size not an integer >= 1, eta not a number in [0, 1], an unknown
        precision or fp16 on the CPU, a guidance interval that is not 0 <= lo < hi, a seed
        outside 0 .. 2**63 - 1).
    """
    seed = check_seed(seed)
    steps, batch_size = check_count(steps, "steps"), check_count(batch_size, "batch_size")
    dev = _device(device)
    try:
        check_sampler(sampler, eta)
    except ValueError as e:
        raise ConfigError(str(e)) from None
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
        guidance_interval=(
            None if guidance_interval is None else check_guidance_interval(guidance_interval)
        ),
        attribute_guidance=None if attribute_guidance is None else dict(attribute_guidance),
    )


def sampling_net(loaded: LoadedModel, s: SampleSettings, evaluations: int) -> InferenceNet:
    """A copy of the network prepared for inference (BatchNorm folded, weights cast once,
    the layout and chunk size that measured fastest, compiled where that pays off for
    `evaluations` image-steps): see `runtime.prepare_inference`."""
    return prepare_inference(
        loaded.model, torch.device(s.device), s.precision, compile=s.compiles(evaluations)
    )


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
    :raises ConfigError: n not an integer >= 0 or first_index not one >= 0.
    """
    n, first_index = check_count(n, "n", 0), check_count(first_index, "first_index", 0)
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


# --- for interactive front ends (the web app): load once, settings, progress ---------------


def open_model(spec: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """A shipped model's name, or a run folder / checkpoint file, loaded for sampling."""
    from ..checkpoint import load_model
    from ..pretrained import weights_path

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
