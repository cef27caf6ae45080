"""Typed settings, one dataclass per concern, stored with every run and checkpoint.

Nothing here imports torch: a config can be read, validated and written anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import operator
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .diffusion.sampler_names import SAMPLER_NAMES
from .words import counted


class ConfigError(ValueError):
    """A setting has a value animeddim cannot use; the message names it."""


# One list per kind of choice (samplers: `diffusion.samplers.SAMPLERS`).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # autocast precisions; auto picks per device
KID_PROTOCOLS = ("standard", "paper")  # metrics.kid_folders: torch-fidelity / Keras per batch
NAN_POLICIES = ("stop", "skip-batch")
CACHES = ("memory", "disk", "auto")
LABELS_MISSING = ("error", "null")  # data.labels_missing: an image without a label row
PROFILES_TO_SRGB = "srgb"  # data.colour_profiles of a run that applies embedded ICC profiles
COND_AT = ("blocks", "input", "both")  # model.cond_at: after each block's conv1 / the input
PREDICTIONS = ("eps", "v")  # model.prediction: what the network outputs (diffusion.objectives)
LOSSES = ("mae", "mse")  # train.loss: the Keras example's / the paper's eq. 4
LOSS_WEIGHTS = ("none", "min-snr")  # train.loss_weight: per noise level (Hang et al. 2023)
# train.compile_mode: torch.compile's modes; reduce-overhead and max-autotune replay CUDA graphs
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DATA_ON_DEVICE = ("auto", "yes", "no")  # train.data_on_device
IMAGE_CHANNELS = 3  # images are decoded to RGB

GUIDE_ALWAYS = (0.0, math.inf)  # the guidance interval (in sigma) that guides at every step


def as_integer(value: object) -> int | None:
    """`value` as an int if it is one integer: an int, a numpy integer, or a 0-d integer array
    or tensor (``torch.tensor(20)``, what a count computed in torch is); None for a bool (True
    is not 1 step), a float (even 20.0), a string, or an array or tensor of any shape but ().

    Reads what it is given through ``operator.index``, so torch need not be imported here.
    """
    if isinstance(value, bool) or getattr(value, "ndim", 0) != 0:
        return None
    item = getattr(value, "item", None)  # a 0-d bool tensor: operator.index makes it 1
    if callable(item) and isinstance(item(), bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_guidance_interval(interval: tuple[float, float]) -> tuple[float, float]:
    """(lo, hi) as floats with 0 <= lo < hi (hi may be inf): the noise levels
    sigma = noise_rate / signal_rate in (lo, hi] where classifier-free guidance applies.

    :raises ConfigError: naming the interval."""
    lo, hi = (float(x) for x in interval)
    if not 0.0 <= lo < hi:  # also refuses nan
        raise ConfigError(
            f"a guidance interval needs 0 <= LO < HI (HI may be inf), got {lo:g},{hi:g}"
        )
    return lo, hi


def parse_guidance_interval(text: str) -> tuple[float, float]:
    """'LO,HI' (e.g. '1,inf') -> a checked (lo, hi); see `check_guidance_interval`.

    :raises ConfigError: text that is not two numbers, or a bad interval."""
    parts = str(text).split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        interval = float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(
            f"a guidance interval is LO,HI in sigma (e.g. 1,inf), got {text!r}"
        ) from None
    return check_guidance_interval(interval)


def guidance_interval_words(interval: tuple[float, float]) -> str:
    """(1.0, inf) -> 'noise levels sigma in (1, inf]' (what the CLI and reports print)."""
    lo, hi = interval
    return f"noise levels sigma in ({lo:g}, {hi:g}]"


def guidance_interval_text(interval: tuple[float, float]) -> str:
    """(1.0, inf) -> '1,inf' (what `parse_guidance_interval` reads)."""
    return ",".join(f"{x:g}" for x in interval)


def setting(
    default: Any,
    help: str,
    *,
    resume: bool = False,
    flag: str | tuple[str, ...] | None = None,
    choices: tuple[str, ...] | None = None,
    minimum: int | None = None,
    metavar: str | None = None,
    cli: bool = True,
    path: bool = False,
) -> Any:
    """A config field with what the CLI needs to offer it as an option.

    :param help: one line; the CLI adds the default.
    :param resume: the value may change when a run is resumed (`train --resume`).
    :param flag: option name(s); default ``--`` + the field name with dashes.
    :param choices: the accepted strings; `minimum`: the smallest accepted integer.
    :param cli: False for settings only a config file sets.
    :param path: the value may be a file or folder: a leading ``~`` is the home folder, on
        the command line and in a config file (`config_files.expand_user`).
    """
    meta = {
        "help": help,
        "resume": resume,
        "flags": (flag,) if isinstance(flag, str) else flag,
        "choices": choices,
        "minimum": minimum,
        "metavar": metavar,
        "cli": cli,
        "path": path,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    path: str = setting(
        "",
        "image folder (searched recursively) to train on; with --resume, where the run's "
        "images are now if they moved",
        flag="--data",
        metavar="DIR",
        path=True,
    )
    val_fraction: float = setting(
        0.2, "share of images held out for validation (Keras example: 80/20)"
    )
    split_seed: int = setting(0, "seed of the train/validation split")
    flip: bool = setting(True, "random horizontal flips of training images")
    cache: str = setting(
        "auto",
        "where decoded images live (auto: disk above 4 GiB)",
        choices=CACHES,
        resume=True,
    )
    strict: bool = setting(False, "any undecodable image is an error instead of being skipped")
    labels: str = setting(
        "",
        "train a conditional model on these labels: a CSV (file, attribute columns) or "
        "'folders' (the first-level subfolder is the class)",
        metavar="FILE.csv|folders",
        path=True,
    )
    labels_missing: str = setting(
        "error",
        "an image without a label row, or an empty entry: error, or null (trained as "
        "unlabelled for every attribute, or for that one)",
        choices=LABELS_MISSING,
    )
    attributes: str = setting(
        "", "comma-separated attributes of the labels to train on (default: all)", metavar="A,B"
    )
    # Set by `train`, checked on resume: the absolute folder, digests of its images and labels.
    abs_path: str = setting("", "absolute path of the data folder", cli=False)
    fingerprint: str = setting("", "digest of the image list (names, sizes)", cli=False)
    labels_digest: str = setting("", "sha256 of the images' attribute codes", cli=False)
    # Set by a new run: "srgb". A run started before colour profiles were applied has none
    # ("") and reads its images as it began, the numbers taken as sRGB whatever their profile.
    colour_profiles: str = setting("", "embedded colour profiles: srgb (applied) or ''", cli=False)

    @property
    def profiles_applied(self) -> bool:
        """Whether the run reads its images with their embedded colour profiles applied."""
        return self.colour_profiles == PROFILES_TO_SRGB

    def validate(self) -> None:
        _check_declared(self, "data.")
        profiles = self.colour_profiles
        _check(profiles in ("", PROFILES_TO_SRGB), "data.colour_profiles", profiles, "srgb or ''")
        _check(0.0 <= self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "in [0, 1)")
        _check(
            0 <= self.split_seed < 2**63,
            "data.split_seed",
            self.split_seed,
            "an integer in 0 .. 2**63 - 1",
        )


@dataclass
class ScheduleConfig:
    min_signal_rate: float = setting(0.02, "signal rate at t = 1 (pure noise end)")
    max_signal_rate: float = setting(0.95, "signal rate at t = 0 (clean end)")

    def validate(self) -> None:
        ok = 0.0 < self.min_signal_rate < self.max_signal_rate < 1.0
        _check(
            ok,
            "schedule.min_signal_rate/max_signal_rate",
            (self.min_signal_rate, self.max_signal_rate),
            "0 < min_signal_rate < max_signal_rate < 1",
        )


@dataclass
class UNetConfig:
    image_size: int = setting(
        64,
        "pixels: images are centre-cropped to square and resized to this; the network's size",
        minimum=8,
    )
    widths: list[int] = setting(
        [32, 64, 96, 128], "U-Net channels per resolution level (comma-separated)"
    )
    block_depth: int = setting(2, "residual blocks per level", minimum=1)
    embedding_dims: int = setting(32, "size of the sinusoidal noise-variance embedding")
    embedding_max_frequency: float = setting(1000.0, "embedding frequencies span 1 .. this")
    vocabulary: dict[str, list[str]] = setting(
        {},
        "attribute -> its values in code order (set from --labels; empty: unconditional)",
        cli=False,
    )
    cond_dims: int = setting(64, "width of each attribute's embedding (summed)", minimum=1)
    cond_at: str = setting(
        "blocks",
        "where attributes enter: after each block's first conv, the noise embedding, or both",
        choices=COND_AT,
    )

    prediction: str = setting(
        "eps",
        "what the network predicts: eps (the noise; the paper's) or v = alpha eps - sigma x0; "
        "samplers always get eps",
        choices=PREDICTIONS,
    )

    @property
    def channels(self) -> int:
        """Image channels: always RGB (not a setting)."""
        return IMAGE_CHANNELS

    def validate(self) -> None:
        _check_vocabulary(self.vocabulary)
        _check_declared(self, "model.")
        _check(
            len(self.widths) >= 2 and all(w > 0 for w in self.widths),
            "model.widths",
            self.widths,
            "at least two positive integers",
        )
        _check(
            self.embedding_dims >= 2 and self.embedding_dims % 2 == 0,
            "model.embedding_dims",
            self.embedding_dims,
            "an even integer >= 2",
        )
        _check(
            0 < self.embedding_max_frequency < math.inf,
            "model.embedding_max_frequency",
            self.embedding_max_frequency,
            "a positive number",
        )
        factor = 2 ** (len(self.widths) - 1)
        _check(
            self.image_size % factor == 0,
            "image_size",
            self.image_size,
            f"a multiple of {factor} (the network halves the image {len(self.widths) - 1} times)",
        )


@dataclass
class TrainConfig:
    epochs: int = setting(1, "passes over the training split", minimum=1, resume=True)
    batch_size: int = setting(64, "global batch (summed over all processes)", minimum=1)
    learning_rate: float = setting(1e-3, "AdamW learning rate", flag=("--lr", "--learning-rate"))
    weight_decay: float = setting(1e-4, "AdamW decoupled weight decay")
    ema_decay: float = setting(0.999, "exponential moving average of the weights")
    ema_warmup: bool = setting(
        False,
        "EMA decay min(ema_decay, (1 + step) / (10 + step)), so a short run's average forgets "
        "its untrained start (off: the Keras example's constant decay)",
    )
    seed: int = setting(0, "seed of noise, times, shuffling and flips")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps", resume=True, metavar="DEVICE")
    precision: str = setting(
        "auto",
        "autocast precision; auto = bf16 where the hardware does it well (losses stay fp32)",
        choices=PRECISIONS,
        resume=True,
    )
    compile: bool | None = setting(
        None, "torch.compile the network (default: where it pays off)", resume=True
    )
    compile_mode: str = setting(
        "default",
        "torch.compile mode of the compiled network: reduce-overhead replays CUDA graphs (no "
        "launch cost per kernel), max-autotune also tunes kernels (minutes to compile)",
        choices=COMPILE_MODES,
        resume=True,
    )
    data_on_device: str = setting(
        "auto",
        "keep the uint8 image cache on the device and gather, flip and normalise batches there "
        "(auto: on CUDA when it takes under a quarter of the free memory)",
        choices=DATA_ON_DEVICE,
        resume=True,
    )
    lr_warmup_images: int = setting(
        0,
        "raise the learning rate linearly from 0 over the first N training images (0: none), "
        "for large batches with a scaled --lr",
        minimum=0,
        metavar="N",
    )
    epoch_end_every: int = setting(
        1,
        "epochs between the epoch-end work (validation, KID, sample grid, metrics row, "
        "checkpoint; always after the last epoch and at a time limit): raise it where epochs "
        "take a second (a GPU, a small dataset) and that work would cost as much",
        minimum=1,
        resume=True,
        metavar="N",
    )
    checkpoint_every: int = setting(
        0, "also checkpoint every N steps (0: at epoch ends only)", minimum=0, resume=True
    )
    keep_checkpoints: int = setting(2, "step checkpoints kept", minimum=1, resume=True)
    kid: bool = setting(True, "paper-protocol KID of the EMA network each epoch", resume=True)
    kid_steps: int = setting(5, "DDIM steps for the per-epoch KID images (Keras example: 5)")
    kid_images: int = setting(
        0, "validation images for the per-epoch KID (0: the whole split)", minimum=0, resume=True
    )
    eval_every: int = setting(
        0,
        "every N epochs (and the last), the standard-protocol KID of --eval-images samples "
        "against --eval-real; the best is kept as checkpoints/best-standard-kid.safetensors "
        "(0: never; with --epoch-end-every, only at epochs where both fall)",
        minimum=0,
        resume=True,
        metavar="N",
    )
    eval_real: str = setting(
        "",
        "real images for --eval-every: a folder (default: the validation split)",
        metavar="DIR",
        resume=True,
        path=True,
    )
    eval_images: int = setting(1000, "samples per --eval-every KID", minimum=2, resume=True)
    eval_sampler: str = setting(
        "dpmpp-2m", "sampler of the --eval-every samples", choices=SAMPLER_NAMES, resume=True
    )
    eval_steps: int = setting(10, "steps of the --eval-every samples", minimum=1, resume=True)
    nan_policy: str = setting(
        "stop", "what a non-finite loss does", choices=NAN_POLICIES, resume=True
    )
    log_every: int = setting(
        10, "steps between progress updates (reads losses from the device)", minimum=1, resume=True
    )
    max_steps: int = setting(
        0, "stop after this many optimiser steps (0: no limit)", minimum=0, resume=True
    )
    time_limit_minutes: float = setting(
        0.0,
        "stop at the first epoch end after this many minutes (0: no limit)",
        flag="--time-limit",
        metavar="MINUTES",
        resume=True,
    )
    init: str = setting(
        "",
        "start from these weights: a run folder, checkpoint, exported file or shipped model "
        "name (avatars-64); the architecture must match (default: random)",
        metavar="MODEL",
        path=True,
    )
    cond_drop: float = setting(0.15, "each attribute is dropped to null with this probability")
    loss: str = setting(
        "mse",
        "loss between prediction and target: mse (the paper's eq. 4) or mae (the Keras "
        "example's, which erases rare thin features such as glasses: docs/coverage.md)",
        choices=LOSSES,
    )
    loss_weight: str = setting(
        "none",
        "weight per noise level: none, or min-snr (Hang et al. 2023; with --loss mse)",
        choices=LOSS_WEIGHTS,
    )
    min_snr_gamma: float = setting(5.0, "gamma of --loss-weight min-snr: SNRs above it are capped")
    noise_focus: str = setting(
        "",
        "draw --noise-focus-share of each batch's noise levels uniformly in time from the "
        "levels sigma = noise/signal rate in (LO, HI] (e.g. 1.5,10, where the avatars' "
        "attributes are decided), the rest from all of them (default: none)",
        metavar="LO,HI",
    )
    noise_focus_share: float = setting(
        0.0, "the share of each batch drawn from --noise-focus, in [0, 1]", metavar="P"
    )

    def validate(self) -> None:
        _check_declared(self)
        _check(
            self.learning_rate > 0 and math.isfinite(self.learning_rate),
            "learning_rate (--lr)",
            self.learning_rate,
            "a positive number",
        )
        _check(
            0 <= self.weight_decay < math.inf, "weight_decay", self.weight_decay, "a number >= 0"
        )
        _check(0.0 <= self.ema_decay < 1.0, "ema_decay", self.ema_decay, "in [0, 1)")
        _check(1 <= self.eval_steps <= 1000, "eval_steps", self.eval_steps, "in 1..1000")
        _check(1 <= self.kid_steps <= 1000, "kid_steps", self.kid_steps, "in 1..1000")
        _check(0.0 <= self.cond_drop <= 1.0, "cond_drop", self.cond_drop, "in [0, 1]")
        _check(
            self.loss_weight != "min-snr" or self.loss == "mse",
            "loss_weight",
            self.loss_weight,
            "none with loss mae (min-SNR weights are derived for the squared error: "
            "use --loss mse)",
        )
        _check(
            0 < self.min_snr_gamma < math.inf,
            "min_snr_gamma",
            self.min_snr_gamma,
            "a positive number",
        )
        _check(
            0.0 <= self.noise_focus_share <= 1.0,
            "noise_focus_share",
            self.noise_focus_share,
            "in [0, 1]",
        )
        if self.noise_focus or self.noise_focus_share > 0:
            try:
                parse_guidance_interval(self.noise_focus)
            except ConfigError:
                _check(False, "noise_focus", self.noise_focus, "LO,HI in sigma, 0 <= LO < HI")
        _check(0 <= self.seed < 2**63, "seed", self.seed, "an integer in 0 .. 2**63 - 1")
        _check(
            self.kid_images == 0 or self.kid_images >= 2,
            "kid_images",
            self.kid_images,
            "0 (the whole split) or >= 2 (KID compares batches of at least 2 images)",
        )
        _check(
            0 <= self.time_limit_minutes < math.inf,
            "time_limit_minutes (--time-limit)",
            self.time_limit_minutes,
            "a number >= 0",
        )


SECTIONS = ("data", "model", "schedule", "train")  # RunConfig's parts, in file order


@dataclass
class RunConfig:
    """Everything a training run needs; written to RUN/config.json."""

    data: DataConfig = field(default_factory=DataConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> RunConfig:
        """Check every setting (`_coerce`: a numpy number or a tuple from Python is converted)."""
        for f in fields(self):
            part, cls = getattr(self, f.name), type(_default(f))
            _check(isinstance(part, cls), f.name, part, f"a {cls.__name__} (or use from_dict)")
            part.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        from .config_upgrade import upgrade

        return _build(cls, upgrade(d), "")


def settings() -> list[tuple[str, dataclasses.Field]]:
    """Every leaf setting as (section, field), in file order: what the CLI offers."""
    out = []
    for part in fields(RunConfig):
        out += [(part.name, f) for f in fields(part.default_factory())]  # type: ignore[misc]
    return out


def _check(ok: bool, name: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"invalid {name} = {value!r}: expected {accepted}")


def _check_declared(part: Any, prefix: str = "") -> None:
    """The checks a config's settings declare: type (`_coerce`), `choices`, `minimum`."""
    for f in fields(part):
        name, choices, minimum = prefix + f.name, f.metadata["choices"], f.metadata["minimum"]
        value = _coerce(getattr(part, f.name), _default(f), name)
        setattr(part, f.name, value)
        if choices is not None:
            accepted = " or ".join(choices) if len(choices) == 2 else ", ".join(choices)
            _check(value in choices, name, value, accepted)
        if minimum is not None:
            _check(value >= minimum, name, value, f"an integer >= {minimum}")


def _check_vocabulary(vocab: Any) -> None:
    ok = isinstance(vocab, dict) and all(
        isinstance(a, str)
        and a
        and isinstance(v, list)
        and v
        and all(isinstance(x, str) for x in v)
        and len(set(v)) == len(v)
        for a, v in vocab.items()
    )
    _check(ok, "model.vocabulary", vocab, "attribute -> a list of distinct value strings")


def _build(cls: type, d: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types by name."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'} must be a table/object, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(
            f"{counted(len(unknown), 'unknown setting')} {', '.join(prefix + k for k in unknown)}; "
            f"known in this section: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in d.items():
        default = _default(known[name])
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, default, f"{prefix}{name}")
    return cls(**kwargs)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _coerce(value: Any, default: Any, name: str) -> Any:
    """Check a leaf value against its default's type, converting a tuple, numpy number or Path."""
    integral = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)  # noqa: E731
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)  # true is not 1.0
    if isinstance(value, (list, tuple)):
        value = [int(v) if integral(v) else v for v in value]
    elif integral(value) or (real and isinstance(default, float)):
        value = int(value) if integral(value) else float(value)
    elif isinstance(value, os.PathLike) and isinstance(default, str):
        value = os.fspath(value)
    if isinstance(default, bool) or default is None:  # None: compile's "where it pays off"
        if not isinstance(value, bool) and value is not None:
            raise ConfigError(f"invalid {name} = {value!r}: expected true or false")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"invalid {name} = {value!r}: expected an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"invalid {name} = {value!r}: expected a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"invalid {name} = {value!r}: expected a string")
        return value
    if isinstance(default, list):
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"invalid {name} = {value!r}: expected a list of integers")
        return list(value)
    return value
