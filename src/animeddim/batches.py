"""Batches for training: the epoch's order, flips and rank slices of a uint8 image cache.

Everything here is a function of (seed, epoch, batch index): a batch's images and flips do not
depend on the number of processes, and a resumed run sees what an uninterrupted one would
have. Batches come from the host cache (`data.ImageSet.images`) or from a copy of it on the
device (`device_images`), with the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from .data import DataError

if TYPE_CHECKING:
    import torch

# Domain tags keep the random streams of shuffling and flipping independent of each other and
# of the train/validation split, even with equal seeds.
_ORDER_TAG = 0x0DE5
_FLIP_TAG = 0xF11B


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch, _ORDER_TAG]).permutation(n)


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """How many (global) batches :func:`iterate_batches` yields for ``n`` indices."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def _flip_seed(seed: int, epoch: int, batch: int) -> int:
    """A 63-bit torch seed that depends only on (seed, epoch, batch index)."""
    state = np.random.SeedSequence([seed, epoch, batch, _FLIP_TAG]).generate_state(1, np.uint64)
    return int(state[0]) & (2**63 - 1)


def _flips(seed: int, epoch: int, batch: int, n: int) -> np.ndarray:
    """Which of the ``n`` images of global batch ``batch`` are flipped: a bool mask."""
    import torch

    gen = torch.Generator().manual_seed(_flip_seed(seed, epoch, batch))
    return (torch.rand(n, generator=gen) < 0.5).numpy()


def iterate_batches(
    images: np.ndarray | torch.Tensor,
    indices: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    flip: bool,
    drop_last: bool,
    device: torch.device | str = "cpu",
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    codes: np.ndarray | None = None,
) -> Iterator[torch.Tensor]:
    """Yield float32 ``(B, 3, H, W)`` batches in [0, 1] on ``device`` from uint8 ``images``.

    ``images`` is ``(N, H, W, 3)`` uint8: a host array, whose batches are gathered on the host
    and sent as uint8, or the same cache as a tensor on ``device`` (:func:`device_images`),
    gathered and flipped there with no copy from the host per batch; both give the same
    numbers. ``indices`` selects the images of this split. The
    order is ``indices`` (shuffled by :func:`epoch_order` when ``shuffle``) cut into global
    batches of ``batch_size``; this process gets the contiguous slice
    ``[rank * b / world_size, (rank + 1) * b / world_size)`` of each global batch of length
    ``b``. Horizontal flips are drawn per global batch from (seed, epoch, batch index), so a
    batch's content never depends on the number of processes. ``start_batch`` skips batches
    without reading them (resume mid-epoch). With ``world_size > 1`` use ``drop_last=True``:
    the incomplete last batch splits unevenly and may give a rank an empty ``(0, 3, H, W)``.
    ``codes`` (``(N, A)`` int64 labels of ``images``): yield ``(batch, codes of its rows)``.
    """
    import torch

    if batch_size < 1:
        raise DataError(f"batch size must be a positive integer, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not valid for world size {world_size}")
    if batch_size % world_size:
        raise DataError(
            f"batch size {batch_size} is not divisible by the number of processes {world_size}"
        )
    device = torch.device(device)
    order = np.asarray(indices, dtype=np.int64)
    if shuffle:
        order = order[epoch_order(len(order), seed, epoch)]
    batches = range(start_batch, num_batches(len(order), batch_size, drop_last))
    if isinstance(images, torch.Tensor):
        yield from _device_batches(
            images, order, batches, batch_size, seed, epoch, flip, rank, world_size, codes
        )
        return
    pin = device.type == "cuda"
    for b in batches:
        glob = order[b * batch_size : (b + 1) * batch_size]
        lo, hi = rank * len(glob) // world_size, (rank + 1) * len(glob) // world_size
        # Fancy indexing copies just these rows out of the (possibly memmapped) array.
        pixels = images[glob[lo:hi]]
        if flip:
            # One draw per image of the *global* batch, then this rank's slice: identical flips
            # whatever the world size. Flipping uint8 here moves 4x fewer bytes than on floats.
            mask = _flips(seed, epoch, b, len(glob))[lo:hi]
            pixels[mask] = pixels[mask, :, ::-1]
        batch = torch.from_numpy(np.ascontiguousarray(pixels))
        if pin:
            batch = batch.pin_memory()  # lets the uint8 copy overlap with GPU work
        # Transfer uint8 (4x fewer bytes than float32) and convert on the device.
        x = batch.to(device, non_blocking=pin).permute(0, 3, 1, 2)
        x = x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
        if codes is None:
            yield x
        else:
            rows = torch.from_numpy(codes[glob[lo:hi]])
            yield x, (rows.pin_memory() if pin else rows).to(device, non_blocking=pin)


def device_images(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """The uint8 ``(N, H, W, 3)`` cache as one tensor on ``device``, copied once, for
    :func:`iterate_batches` to gather batches from without a host copy per batch."""
    import torch

    pixels = np.ascontiguousarray(images)
    if not pixels.flags.writeable:  # a read-only disk cache: torch wants its own copy
        pixels = pixels.copy()
    return torch.from_numpy(pixels).to(device)


def _device_batches(images, order, batches, batch_size, seed, epoch, flip, rank, world_size, codes):
    """:func:`iterate_batches` from a cache on the device: the epoch's order, flips and codes
    go to the device once, then each batch is an index_select and a flip there."""
    import torch

    device = images.device
    n_glob = [min(batch_size, len(order) - b * batch_size) for b in batches]
    order_d = torch.from_numpy(order).to(device)
    if flip:  # the host path's masks, drawn per global batch, sent in one copy
        masks = [_flips(seed, epoch, b, n) for b, n in zip(batches, n_glob, strict=True)]
        flips_d = torch.from_numpy(np.concatenate(masks or [np.zeros(0, bool)])).to(device)
    codes_d = (
        torch.from_numpy(np.ascontiguousarray(codes)).to(device) if codes is not None else None
    )
    offset = 0  # where batch b's masks start in flips_d
    for b, n in zip(batches, n_glob, strict=True):
        lo, hi = rank * n // world_size, (rank + 1) * n // world_size
        rows = order_d[b * batch_size + lo : b * batch_size + hi]
        pixels = images.index_select(0, rows)
        if flip:
            mask = flips_d[offset + lo : offset + hi].view(-1, 1, 1, 1)
            pixels = torch.where(mask, pixels.flip(2), pixels)
            offset += n
        x = pixels.permute(0, 3, 1, 2)
        x = x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
        yield x if codes_d is None else (x, codes_d.index_select(0, rows))
