"""Loading a model for sampling, sampling settings, progress reporting and drawing images:
the part of the API every front end needs first (see the package's docstring)."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import LoadedModel, recommended_sampling
from ..config import ConfigError, as_integer, check_guidance_interval, parse_guidance_interval
from ..diffusion.generation import generate
from ..diffusion.inversion import ddim_invert
from ..diffusion.samplers import (
    check_sampler,
)
from ..runtime import (
    PRECISIONS,
    InferenceNet,
    default_compile_sampler,
    prepare_inference,
    resolve_precision,
)
from ..runtime import autocast as runtime_autocast
from ..words import counted

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): `done` of `total` units (images, frames, batches) of the
named stage are finished. Each stage starts with done = 0 and ends with done == total;
stages come one after another (e.g. "sample", then "features (generated)")."""


def _tell(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def _stage(progress: Progress | None, name: str) -> Callable[[int, int], None] | None:
    """progress(name, done, total) as a (done, total) callback."""
    return None if progress is None else (lambda d, t: progress(name, d, t))


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
    if device is not None and not isinstance(device, str):  # 0 is not 'auto', nor cuda:0
        raise ConfigError(
            f"device must be a string (auto, cpu, cuda, cuda:N or mps) or a torch.device, "
            f"got {device!r}"
        )
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

    def __post_init__(self) -> None:
        """Checks the fields as `resolve_settings` checks its arguments (ConfigError naming
        the bad value), so that a hand-made one fails here, not deep inside sampling or, as a
        seed of -1 or clip="no" would, silently: "no" is true, a seed of -1 draws the images
        of seed 2**63 - 1. A guidance interval or attribute weights may be given as the CLI
        writes them ("1,inf", "hair_len=11")."""
        self.steps = check_count(self.steps, "steps")
        self.batch_size = check_count(self.batch_size, "batch_size")
        self.seed = check_seed(self.seed)
        self.eta = check_sampling(self.sampler, self.eta)
        self.device = _parsed_device(self.device)
        if not isinstance(self.precision, str) or self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be fp32, bf16 or fp16 (resolve_settings also resolves auto), "
                f"got {self.precision!r}"
            )
        for name, value in (("clip", self.clip), ("compile", self.compile)):
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"{name} must be True, False or None, got {value!r}")
        self.guidance_interval = _checked_interval(self.guidance_interval)
        self.attribute_guidance = _checked_weights(self.attribute_guidance)

    def autocast(self) -> contextlib.AbstractContextManager:
        """A fresh autocast context for this precision and device (nullcontext for fp32)."""
        return runtime_autocast(torch.device(self.device), self.precision)

    def compiles(self, evaluations: int) -> bool:
        """Whether a job of `evaluations` image-steps compiles the sampling network: `compile`,
        else where that pays off (`runtime.default_compile_sampler`)."""
        if self.compile is not None:
            return self.compile
        return default_compile_sampler(torch.device(self.device), evaluations)

    def decided(self, evaluations: int) -> SampleSettings:
        """These settings with `compile` decided for a whole job of `evaluations` image-steps:
        a compiled network rounds otherwise than the eager one (bf16: pixels apart), so the
        decision is taken once for the job, not by each process for its share."""
        return replace(self, compile=self.compiles(evaluations))


def check_sampling(sampler: str, eta: float) -> float:
    """eta as a float if `sampler` is registered and allows it (`samplers.check_sampler`),
    else ConfigError naming the bad one."""
    try:
        check_sampler(sampler, eta)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return float(eta)


def _parsed_device(device: str | torch.device) -> torch.device:
    """A device torch can name (cpu, cuda, cuda:N, mps, ...), else ConfigError naming it."""
    if isinstance(device, torch.device):
        return device
    try:
        if not isinstance(device, str):
            raise TypeError
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"unknown device {device!r}: expected cpu, cuda, cuda:N or mps (a string or a "
            "torch.device; resolve_settings also takes auto)"
        ) from None


def _checked_interval(interval: Any) -> tuple[float, float] | None:
    """None, (lo, hi) or 'LO,HI' as the CLI writes it -> a checked (lo, hi) or None."""
    if interval is None:
        return None
    if isinstance(interval, str):
        return parse_guidance_interval(interval)
    try:
        lo, hi = (_number(x) for x in interval)
    except (TypeError, ValueError):  # not two numbers
        raise ConfigError(
            f"guidance_interval must be (LO, HI) in sigma with 0 <= LO < HI (e.g. (1, inf)), "
            f"got {interval!r}"
        ) from None
    return check_guidance_interval((lo, hi))


def _number(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError
    return float(x)


def _checked_weights(weights: Any) -> dict[str, float] | None:
    """None, {attribute: weight} or 'NAME=W,...' as the CLI writes it -> {name: float} with
    every weight a finite number >= 0 (a NaN weight made every image black)."""
    if weights is None:
        return None
    if isinstance(weights, str):
        from ..conditioning import parse_attribute_weights

        return parse_attribute_weights(weights)
    if not isinstance(weights, Mapping):
        raise ConfigError(
            f"attribute_guidance must be a dict of attribute -> weight >= 0 (e.g. "
            f"{{'hair_len': 11}}), got {weights!r}"
        )
    out = {}
    for name, w in weights.items():
        try:
            out[name] = _number(w)
        except TypeError:
            out[name] = math.nan
        if not isinstance(name, str) or not (math.isfinite(out[name]) and out[name] >= 0):
            raise ConfigError(
                f"attribute_guidance must map attribute names to weights >= 0, got {name!r}: {w!r}"
            )
    return out


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
        outside 0 .. 2**63 - 1, clip or compile not a bool or None, an attribute weight that
        is not a number >= 0: `SampleSettings` checks its fields).
    """
    dev = _device(device)
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
        guidance_interval=guidance_interval,
        attribute_guidance=attribute_guidance,
    )


def check_loaded(loaded: Any) -> LoadedModel:
    """`loaded` if it is a `LoadedModel`, else TypeError saying what it is (the pair that
    `load_for_sampling` returns, unpacked by mistake, would fail deep inside otherwise)."""
    if isinstance(loaded, LoadedModel):
        return loaded
    got = (
        "a tuple: load_for_sampling returns (loaded, device); unpack it"
        if isinstance(loaded, tuple)
        else f"{type(loaded).__name__} {_short(loaded)}"
    )
    raise TypeError(
        f"expected a loaded model (pipelines.load_for_sampling or open_model), got {got}"
    )


def _short(value: Any) -> str:
    """repr(value) on one line, at most 80 characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


def check_guidance(guidance: Any, name: str = "guidance") -> float:
    """`guidance` as a float if it is a finite number >= 0 (1: plain conditional; 0: the
    unconditional prediction), else ConfigError naming it: a NaN or infinite weight drew
    black images without a word, and the CLI takes only these."""
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real):
        w = math.nan
    else:
        w = float(guidance)
    if not (math.isfinite(w) and w >= 0):
        raise ConfigError(f"{name} must be a number >= 0 (1: plain conditional), got {guidance!r}")
    return w


def check_settings(s: Any) -> SampleSettings:
    """`s` if it is a `SampleSettings`, else TypeError saying what it is."""
    if not isinstance(s, SampleSettings):
        raise TypeError(
            f"expected SampleSettings (pipelines.resolve_settings), got {type(s).__name__} "
            f"{_short(s)}"
        )
    return s


def check_codes(loaded: LoadedModel, codes: Any, name: str, rows: int | None = None) -> None:
    """Refuse attribute codes `loaded` cannot take, naming the bad value: an unconditional
    model; anything but an integer tensor [R x A] with A the model's attributes and R =
    `rows` (>= 1 when None); a code outside -1 (not asked) .. values - 1 (the embedding
    would fail on it, or, for a float or another negative one, silently read null).

    :raises ConfigError, TypeError: naming `name` and what is accepted."""
    from ..conditioning import NULL

    vocab = loaded.config.model.vocabulary
    if not vocab:
        raise ConfigError(f"{name} given, but '{loaded.path}' is an unconditional model")
    if (
        not isinstance(codes, torch.Tensor)
        or codes.dtype.is_floating_point
        or codes.dtype
        in (
            torch.bool,
            torch.complex64,
            torch.complex128,
        )
    ):
        what = f"{codes.dtype} tensor" if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(
            f"{name} must be an integer tensor of attribute codes (e.g. codes_from_labels), "
            f"got a {what}"
        )
    width, want = len(vocab), "R" if rows is None else str(rows)
    fits = codes.ndim == 2 and codes.shape[1] == width
    if not fits or (len(codes) != rows if rows is not None else len(codes) < 1):
        raise ConfigError(
            f"{name} must have shape [{want} x {width}]{' with R >= 1' if rows is None else ''} "
            f"(one row per image, one column per attribute: {', '.join(vocab)}), got "
            f"[{' x '.join(map(str, codes.shape))}]"
        )
    sizes = torch.tensor([len(v) for v in vocab.values()], device=codes.device)
    bad = ((codes < NULL) | (codes >= sizes)).nonzero()
    if len(bad):
        i, a = bad[0].tolist()
        attr = list(vocab)[a]
        raise ConfigError(
            f"{name}[{i}, {a}] is {int(codes[i, a])}: attribute {attr!r} takes codes 0 .. "
            f"{len(vocab[attr]) - 1} (its values in order) or {NULL} (not asked)"
        )


def _net_config(net: Any) -> Any:
    """The `ModelConfig` of the network inside `net` (an `InferenceNet`, a guidance or
    progress wrapper, or the network itself), or None when there is none to be found."""
    from ..unet import UNet

    for _ in range(8):
        if isinstance(net, UNet):
            return net.cfg
        net = getattr(net, "net", None) or getattr(net, "model", None)
    return None


def check_net(loaded: LoadedModel, net: Any) -> None:
    """ConfigError when `net` holds a network of another configuration than `loaded`'s (a
    `sampling_net` made from another model): it would run on this model's noise shape and
    normalisation without complaint (convolutions take any image size) and draw nonsense."""
    got, want = _net_config(net), loaded.config.model
    if got is not None and got != want:
        raise ConfigError(
            f"net was made from another model ({_net_words(got)}) than the one given "
            f"({_net_words(want)}, '{loaded.path}'): make it with sampling_net(loaded, ...)"
        )


def _net_words(cfg: Any) -> str:
    widths = ",".join(map(str, cfg.widths))
    attrs = f", {counted(len(cfg.vocabulary), 'attribute')}" if cfg.vocabulary else ""
    return f"{cfg.image_size} px, widths {widths}{attrs}"


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
    :param cond: per-image attribute codes, int [n x A] (`check_codes`), passed to the network.
    :raises ConfigError: n not an integer >= 0 or first_index not one >= 0; cond the model
        cannot take; a `net` made from another model. TypeError: `loaded` or `s` of
        another type.
    """
    loaded, s = check_loaded(loaded), check_settings(s)
    n, first_index = check_count(n, "n", 0), check_count(first_index, "first_index", 0)
    if cond is not None:
        check_codes(loaded, cond, "cond", rows=n)
    cfg = loaded.config
    if net is None:
        net = sampling_net(loaded, s, n * s.steps)
    check_net(loaded, net)
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
