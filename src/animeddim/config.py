"""Typed settings, one dataclass per concern, stored with every run and checkpoint.

Nothing here imports torch: a config can be read, validated and written anywhere. How a
setting is declared and its value checked: `config_fields`; shared values: `config_values`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .config_fields import ConfigError, build, check, check_declared, default_of, setting
from .config_values import (  # the first four re-exported: callers import them from here
    as_integer,  # noqa: F401
    check_guidance_interval,  # noqa: F401
    guidance_interval_text,  # noqa: F401
    guidance_interval_words,  # noqa: F401
    parse_guidance_interval,
)
from .diffusion.sampler_names import SAMPLER_NAMES

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
        check_declared(self, "data.")
        profiles = self.colour_profiles
        check(profiles in ("", PROFILES_TO_SRGB), "data.colour_profiles", profiles, "srgb or ''")
        check(0.0 <= self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "in [0, 1)")
        check(
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
        check(
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
        check_declared(self, "model.")
        check(
            len(self.widths) >= 2 and all(w > 0 for w in self.widths),
            "model.widths",
            self.widths,
            "at least two positive integers",
        )
        check(
            self.embedding_dims >= 2 and self.embedding_dims % 2 == 0,
            "model.embedding_dims",
            self.embedding_dims,
            "an even integer >= 2",
        )
        check(
            0 < self.embedding_max_frequency < math.inf,
            "model.embedding_max_frequency",
            self.embedding_max_frequency,
            "a positive number",
        )
        factor = 2 ** (len(self.widths) - 1)
        check(
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
        check_declared(self)
        check(
            self.learning_rate > 0 and math.isfinite(self.learning_rate),
            "learning_rate (--lr)",
            self.learning_rate,
            "a positive number",
        )
        check(0 <= self.weight_decay < math.inf, "weight_decay", self.weight_decay, "a number >= 0")
        check(0.0 <= self.ema_decay < 1.0, "ema_decay", self.ema_decay, "in [0, 1)")
        check(1 <= self.eval_steps <= 1000, "eval_steps", self.eval_steps, "in 1..1000")
        check(1 <= self.kid_steps <= 1000, "kid_steps", self.kid_steps, "in 1..1000")
        check(0.0 <= self.cond_drop <= 1.0, "cond_drop", self.cond_drop, "in [0, 1]")
        check(
            self.loss_weight != "min-snr" or self.loss == "mse",
            "loss_weight",
            self.loss_weight,
            "none with loss mae (min-SNR weights are derived for the squared error: "
            "use --loss mse)",
        )
        check(
            0 < self.min_snr_gamma < math.inf,
            "min_snr_gamma",
            self.min_snr_gamma,
            "a positive number",
        )
        check(
            0.0 <= self.noise_focus_share <= 1.0,
            "noise_focus_share",
            self.noise_focus_share,
            "in [0, 1]",
        )
        if self.noise_focus or self.noise_focus_share > 0:
            try:
                parse_guidance_interval(self.noise_focus)
            except ConfigError:
                check(False, "noise_focus", self.noise_focus, "LO,HI in sigma, 0 <= LO < HI")
        check(0 <= self.seed < 2**63, "seed", self.seed, "an integer in 0 .. 2**63 - 1")
        check(
            self.kid_images == 0 or self.kid_images >= 2,
            "kid_images",
            self.kid_images,
            "0 (the whole split) or >= 2 (KID compares batches of at least 2 images)",
        )
        check(
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
        """Check every setting (`config_fields.coerce` converts a numpy number or a tuple)."""
        for f in fields(self):
            part, cls = getattr(self, f.name), type(default_of(f))
            check(isinstance(part, cls), f.name, part, f"a {cls.__name__} (or use from_dict)")
            part.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        from .config_upgrade import upgrade

        return build(cls, upgrade(d), "")


def settings() -> list[tuple[str, dataclasses.Field]]:
    """Every leaf setting as (section, field), in file order: what the CLI offers."""
    out = []
    for part in fields(RunConfig):
        out += [(part.name, f) for f in fields(part.default_factory())]  # type: ignore[misc]
    return out


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
    check(ok, "model.vocabulary", vocab, "attribute -> a list of distinct value strings")
