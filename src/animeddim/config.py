"""Typed settings, one dataclass per concern, stored with every run and checkpoint.

Nothing here imports torch: a config can be read, validated and written anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None


class ConfigError(ValueError):
    """A setting has a value animeddim cannot use; the message names it."""


@dataclass
class DataConfig:
    path: str = ""  # image folder (searched recursively) to train on
    image_size: int = 64  # images are centre-cropped to square and resized to this many pixels
    val_fraction: float = 0.2  # share of images held out for validation (Keras example: 80/20)
    split_seed: int = 0  # seed of the train/validation split
    flip: bool = True  # random horizontal flips of training images
    cache: str = "auto"  # where decoded images live: memory | disk | auto (disk above 4 GiB)
    strict: bool = False  # any undecodable file is an error instead of being skipped

    def validate(self) -> None:
        _check(self.image_size >= 8, "data.image_size", self.image_size, "an integer >= 8")
        _check(0.0 <= self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "in [0, 1)")
        _check(
            0 <= self.split_seed < 2**63,
            "data.split_seed",
            self.split_seed,
            "an integer in 0 .. 2**63 - 1",
        )
        _check(
            self.cache in ("memory", "disk", "auto"),
            "data.cache",
            self.cache,
            "memory, disk or auto",
        )


@dataclass
class ScheduleConfig:
    min_signal_rate: float = 0.02  # signal rate at t = 1 (pure noise end)
    max_signal_rate: float = 0.95  # signal rate at t = 0 (clean end)

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
    image_size: int = 64  # side of the square images the network is built for
    channels: int = 3  # image channels
    widths: list[int] = field(default_factory=lambda: [32, 64, 96, 128])  # per resolution level
    block_depth: int = 2  # residual blocks per level
    embedding_dims: int = 32  # sinusoidal noise-variance embedding size
    embedding_max_frequency: float = 1000.0  # embedding frequencies span 1 .. this

    def validate(self) -> None:
        _check(
            len(self.widths) >= 2 and all(w > 0 for w in self.widths),
            "model.widths",
            self.widths,
            "at least two positive integers",
        )
        _check(self.block_depth >= 1, "model.block_depth", self.block_depth, "an integer >= 1")
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
    epochs: int = 1  # passes over the training split
    batch_size: int = 64  # global batch (summed over all processes)
    learning_rate: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    ema_decay: float = 0.999  # exponential moving average of the weights
    seed: int = 0  # seed of noise, times, shuffling and flips
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast; maths of losses stays fp32)
    compile: bool | None = None  # torch.compile the network; None = where it pays off
    checkpoint_every: int = 0  # also write a checkpoint every N steps (0: at epoch ends only)
    keep_checkpoints: int = 2  # how many step checkpoints to keep
    kid: bool = True  # paper-protocol KID of the EMA network each epoch
    kid_steps: int = 5  # DDIM steps for the per-epoch KID images (Keras example: 5)
    kid_images: int = 0  # validation images used for the per-epoch KID (0 = whole split)
    nan_policy: str = "stop"  # stop | skip-batch when a loss is not finite
    log_every: int = 10  # steps between progress-bar updates (reads losses from the device)
    max_steps: int = 0  # stop after this many optimiser steps (0: no limit); for smoke tests
    time_limit_minutes: float = 0.0  # stop at the first epoch end past this (0: no limit)
    init: str = ""  # start from these weights (run, checkpoint, export or shipped model name)

    def validate(self) -> None:
        _check(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _check(
            self.learning_rate > 0 and math.isfinite(self.learning_rate),
            "learning_rate",
            self.learning_rate,
            "a positive number",
        )
        _check(
            0 <= self.weight_decay < math.inf, "weight_decay", self.weight_decay, "a number >= 0"
        )
        _check(0.0 <= self.ema_decay < 1.0, "ema_decay", self.ema_decay, "in [0, 1)")
        _check(
            self.precision in ("auto", "fp32", "bf16", "fp16"),
            "precision",
            self.precision,
            "auto, fp32, bf16 or fp16",
        )
        _check(
            self.nan_policy in ("stop", "skip-batch"),
            "nan_policy",
            self.nan_policy,
            "stop or skip-batch",
        )
        _check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, ">= 0")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, ">= 1")
        _check(1 <= self.kid_steps <= 1000, "kid_steps", self.kid_steps, "in 1..1000")
        _check(self.log_every >= 1, "log_every", self.log_every, ">= 1")
        _check(0 <= self.seed < 2**63, "seed", self.seed, "an integer in 0 .. 2**63 - 1")
        _check(self.max_steps >= 0, "max_steps", self.max_steps, ">= 0")
        _check(self.kid_images >= 0, "kid_images", self.kid_images, ">= 0")
        _check(
            0 <= self.time_limit_minutes < math.inf,
            "time_limit_minutes",
            self.time_limit_minutes,
            "a number >= 0",
        )


@dataclass
class RunConfig:
    """Everything a training run needs; written to RUN/config.json."""

    data: DataConfig = field(default_factory=DataConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> RunConfig:
        if self.model.image_size != self.data.image_size:
            raise ConfigError(
                f"model.image_size ({self.model.image_size}) differs from data.image_size "
                f"({self.data.image_size}); set them equal (the CLI's --image-size sets both)"
            )
        for part in (self.data, self.model, self.schedule, self.train):
            part.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return _build(cls, d, "")


def _check(ok: bool, name: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"invalid {name} = {value!r}: expected {accepted}")


def _build(cls: type, d: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types by name."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'} must be a table/object, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(prefix + k for k in unknown)}; "
            f"known in this section: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in d.items():
        f = known[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, default, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, default: Any, name: str) -> Any:
    """Check a leaf value against the type of its default."""
    if isinstance(default, bool) or (default is None and isinstance(value, bool)):
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


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML config file into a plain dict (sections data/model/schedule/train)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")  # UnicodeDecodeError is a ValueError too
        if p.suffix.lower() == ".toml":
            if tomllib is None:  # pragma: no cover
                raise ConfigError("TOML config files need Python 3.11+; use JSON")
            d = tomllib.loads(text)
        else:
            d = json.loads(text)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(
            f"config file {str(p)!r} is not valid {p.suffix[1:] or 'JSON'}: {e}"
        ) from None
    if not isinstance(d, dict):
        raise ConfigError(
            f"config file {str(p)!r} must hold an object with sections "
            f"data/model/schedule/train, not a {type(d).__name__}"
        )
    return d


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base` (override wins)."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out
