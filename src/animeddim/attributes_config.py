"""Settings of the attribute classifier (no torch here: the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ClassifierConfig:
    """Architecture of an attribute classifier."""

    image_size: int = 64  # images are resized to this before classifying
    widths: tuple[int, ...] = (32, 48, 64, 96)  # a stride-2 4x4 stem, then stride-2 stages
    final_stride: int = 1  # stride of the last stage: 1 keeps a 2x finer map to pool from
    vocab: dict[str, tuple[str, ...]] = field(default_factory=dict)  # attribute -> values
    # attribute -> (top, left, height, width) at image_size: read by its own full-resolution
    # CNN on that region (and on the same region of the mirrored image when crop_mirror), for a
    # feature of a few pixels at a known place (an avatar's earring) that the trunk blurs away.
    crops: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    crop_widths: tuple[int, ...] = (32, 64, 64)  # a stride-1 stage, then stride-2 stages
    crop_mirror: bool = True  # also read the mirrored region (set from TrainSettings.flip)


@dataclass
class TrainSettings:
    """How a classifier is trained."""

    epochs: int = 32  # passes over the training images
    batch_size: int = 64  # images per step
    learning_rate: float = 3e-3  # AdamW peak rate (one-cycle schedule)
    weight_decay: float = 1e-4  # AdamW weight decay
    val_fraction: float = 0.1  # share of the images held out to report accuracy
    seed: int = 0  # initialisation, split, batches and augmentation
    shift: int = 2  # random translation of up to this many pixels (at image_size)
    noise: float = 0.04  # Gaussian pixel noise of standard deviation up to this (0..1 scale)
    blur: float = 0.8  # half the images blurred, Gaussian sigma up to this many pixels
    # Half the images mirrored: a model trained with flips (`train`'s default) draws mirrored
    # faces, and a mirrored mouth or braid is the same attribute. Off for data where left and
    # right differ in meaning.
    flip: bool = True
