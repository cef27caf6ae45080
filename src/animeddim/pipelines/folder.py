"""Drawing many images into a folder batch by batch: a job stopped part-way (Ctrl-C, a
signal, a kill) keeps every batch it finished, and the same job again draws only the rest.

Image i depends only on (seed, i) and its conditioning, never on the batch it was drawn in
(`diffusion.generation`), so a job finished in several calls writes the same files as one
call. Under torchrun each round of ``batch_size x processes`` images is split over the
processes (`distributed.shard_images`) and process 0 writes it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import LoadedModel
from .core import Progress, SampleSettings, _counter


@dataclass
class Job:
    """The images of one call: image p (0 .. len(names) - 1) is written as ``names[p]``;
    ``make(count, first)`` draws images first .. first + count - 1 (uint8 [count x H x W x
    C] on the CPU, each depending on p alone); ``cols``: the columns of their grid."""

    names: list[str]
    make: Callable[[int, int], torch.Tensor]
    cols: int
    compiled: bool = False  # whether its network is compiled (its images' rounding)
    codes: torch.Tensor | None = None  # the attribute codes asked ([R x A]; None: none)


def image_job(
    loaded: LoadedModel,
    s: SampleSettings,
    names: list[str],
    cols: int,
    codes: torch.Tensor | None = None,
    guidance: float = 1.0,
    row_length: int | None = None,
) -> Job:
    """The `Job` of `names`: image p is image p of `s.seed`, unconditional (`codes` None)
    or asked row p mod R of the [R x A] `codes` under guidance weight `guidance`; with
    `row_length` L (a grid by value) image p mod L, asked row p // L. The sampling network
    is prepared once, at the first draw; whether it is compiled (which changes the images'
    rounding) is decided by the whole job's size, so that neither the number of processes
    nor how much a resumed job has left changes it (`SampleSettings.decided`)."""
    from .conditional import draw_per_image, guided_calls
    from .core import draw, sampling_net

    calls = 1 if codes is None else guided_calls(loaded, s, guidance)
    s = s.decided(calls * len(names) * s.steps)
    net: list = []
    size, channels = loaded.config.model.image_size, loaded.config.model.channels

    def piece(count: int, first: int, rows: torch.Tensor | None) -> torch.Tensor:
        if not net:
            net.append(sampling_net(loaded, s, calls * len(names) * s.steps))
        if rows is None:
            return draw(loaded, count, s, first, net=net[0])
        return draw_per_image(loaded, count, s, rows, guidance, first, net=net[0])

    def make(count: int, first: int) -> torch.Tensor:
        if row_length is None or codes is None:
            return piece(count, first, codes)
        parts = [torch.empty(0, size, size, channels, dtype=torch.uint8)]
        for p in range(first, first + count):  # one piece per row the images fall in
            row, i = divmod(p, row_length)
            if p == first or i == 0:
                k = min(row_length - i, first + count - p)
                parts.append(piece(k, i, codes[row : row + 1]))
        return torch.cat(parts)

    return Job(names, make, cols, bool(s.compile), codes)


def complete_files(folder: str | Path, names: Sequence[str], size: int) -> set[str]:
    """The `names` that `folder` holds as PNGs of size x size px: the images a stopped job
    finished (files are written whole or not at all: `io.atomic_file`)."""
    from PIL import Image

    folder, whole = Path(folder), set()
    for name in names:
        try:
            with Image.open(folder / name) as im:
                if im.format == "PNG" and im.size == (size, size):
                    whole.add(name)
        except (OSError, ValueError):  # absent, or not an image: drawn again
            continue
    return whole


@dataclass(frozen=True)
class Kept:
    """The images of a job that a stopped call left whole in `folder` (`complete_files`),
    by index (image p is ``names[p]``): read back (PNG is lossless) instead of drawn."""

    folder: Path
    names: Sequence[str]
    indices: frozenset[int]

    def take(self, make: Callable[[int, int], torch.Tensor], lo: int, hi: int) -> torch.Tensor:
        """Images lo .. hi - 1, the kept ones read, the others drawn by `make` run by run
        (image p depends on p alone, so the pixels are those of one uninterrupted draw)."""
        parts, p = [], lo
        while p < hi:
            q, kept = p, p in self.indices
            while q < hi and (q in self.indices) == kept:
                q += 1
            parts.append(_read(self.folder, self.names[p:q]) if kept else make(q - p, p))
            p = q
        return torch.cat(parts)

    def check_readable(self, lo: int, hi: int) -> None:
        """DataError unless this process can read the kept images lo .. hi - 1 (under torchrun
        each process reads those of its own block, which needs the folder process 0 found
        them in: a folder shared by the nodes)."""
        from ..data import DataError
        from ..distributed import rank

        missing = [self.names[p] for p in sorted(self.indices) if lo <= p < hi]
        missing = [name for name in missing if not (self.folder / name).is_file()]
        if missing:
            raise DataError(
                f"{str(self.folder)!r} holds {len(self.indices)} images of a stopped call "
                f"that process {rank()} cannot read (e.g. {missing[0]}: a folder not shared "
                "by the nodes); go on in processes that share it (one node, or without "
                "torchrun), or give another folder"
            )


class BatchWriter:
    """Writes batches of images into `out` as they are drawn, image i as ``names[i]``
    (`draw_job`; `evaluate --samples-out` through `draw_blocks`' on_batch): called with
    uint8 [k x H x W x C] images and the index of the first; `before_write` is called once,
    just before the first PNG is written; `written` counts the images written. Images
    named in `kept` (already whole there: `Kept`) are not written again."""

    def __init__(
        self,
        out: str | Path,
        names: Sequence[str],
        before_write: Callable[[], None] | None,
        kept: Collection[str] = frozenset(),
    ) -> None:
        self.out, self.names, self.before_write, self.written = Path(out), names, before_write, 0
        self.kept = kept

    def __call__(self, images: torch.Tensor, first: int) -> None:
        from ..io import save_pngs

        names = self.names[first : first + len(images)]
        new = [i for i, name in enumerate(names) if name not in self.kept]
        if not new:
            return
        if self.before_write is not None:
            self.before_write()
            self.before_write = None
        if len(new) < len(names):
            images, names = images[new], [names[i] for i in new]
        save_pngs(images, self.out, names)
        self.written += len(images)


def draw_blocks(
    make: Callable[[int, int], torch.Tensor],
    n: int,
    batch_size: int,
    on_batch: Callable[[torch.Tensor, int], None] | None = None,
    progress: Progress | None = None,
    kept: Kept | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images 0 .. n - 1 of `make` (as `Job.make`), each process drawing its contiguous
    block (`distributed.shard`) `batch_size` at a time, in rounds of one batch a process.

    :param on_batch: called on process 0 after each round with each process's batch of it
        (uint8 [k x H x W x C]) and the index of its first image, a signal held until it
        returns: a `BatchWriter` then loses at most one round to a stop.
    :param progress: told ("sample", images done, this process's block) after each batch.
    :param kept: images a stopped call left (the same on every process): each process
        reads those of its block instead of drawing them, checked readable first.
    :return: (this process's block, as `distributed.own_block` draws it; every image in
        order on process 0, as `distributed.shard_images` gathers them, None elsewhere).
    """
    from ..distributed import gather_to_main, is_main, on_every, rank, shard, world_size
    from ..interrupts import deferred

    blocks = [shard(n, r) for r in range(world_size())]
    lo, hi = blocks[rank()]
    if kept is not None:  # an error said once, by every process, before any drawing
        on_every(lambda: kept.check_readable(lo, hi))
    add = _counter(progress, "sample", hi - lo)
    mine, every = [], []
    for k in range(0, max(1, *(b - a for a, b in blocks)), batch_size):  # one round
        a, b = min(hi, lo + k), min(hi, lo + k + batch_size)
        part = make(b - a, a) if kept is None or b == a else kept.take(make, a, b)
        mine.append(part if b > a else part.to(torch.uint8))  # empty may come as float
        add(b - a)
        gathered = gather_to_main(mine[-1])
        if not is_main():
            continue
        at = 0
        for r_lo, r_hi in blocks:  # each process's batch of the round, in rank order
            first, count = min(r_hi, r_lo + k), min(r_hi, r_lo + k + batch_size)
            piece, at = gathered[at : at + count - first], at + count - first
            if count > first:
                every.append((first, piece))
                if on_batch is not None:
                    with deferred():  # a signal lands between batches: each is written whole
                        on_batch(piece, first)
    drawn = torch.cat([p for _, p in sorted(every, key=lambda e: e[0])]) if is_main() else None
    return torch.cat(mine), drawn


def draw_job(
    job: Job,
    out: str | Path | None,
    batch_size: int,
    *,
    kept: Collection[str] = frozenset(),
    progress: Progress | None = None,
    keep_images: bool = False,
    before_write: Callable[[], None] | None = None,
) -> tuple[torch.Tensor | None, int]:
    """Draw the images of `job` that `kept` does not name, writing each round's PNGs into
    `out` (None: none written) as soon as it is drawn.

    :param batch_size: images per forward pass of each process; a round is that many per
        process, so a stop loses at most one round.
    :param kept: names already whole in `out` (`complete_files`): not drawn again.
    :param progress: told ("sample", images done, total) after each round, kept ones first.
    :param keep_images: return every image (the kept ones read back from `out`) for a grid.
    :param before_write: called once, just before the first PNG is written.
    :return: (uint8 [N x H x W x C] with `keep_images` on process 0, else None; the
        number of images drawn by this call).
    """
    from ..distributed import all_gather_object, is_main, shard_images, world_size
    from ..interrupts import deferred

    write = None if out is None else BatchWriter(out, job.names, before_write)
    n, step = len(job.names), batch_size * world_size()
    todo = all_gather_object(_rounds(job.names, set(kept), step))[0]  # process 0 looked
    count = sum(hi - lo for lo, hi in todo)
    add = _counter(progress, "sample", n)
    if count < n:
        add(n - count)
    images: dict[int, torch.Tensor] = {}  # the images drawn, by their first index
    for lo, hi in todo:
        drawn = shard_images(job.make, hi - lo, lo)
        if drawn is None:  # another process: process 0 writes
            continue
        if write is not None:
            with deferred():  # a signal lands between rounds: each is kept whole
                write(drawn, lo)
        if keep_images:
            images[lo] = drawn
        add(hi - lo)
    if not keep_images or not is_main():
        return None, count
    parts, p = [], 0
    for lo, hi in [*todo, (n, n)]:  # the kept images before each round, read back
        if p < lo:
            parts.append(_read(Path(out), job.names[p:lo]))
        if lo < hi:
            parts.append(images[lo])
        p = hi
    return torch.cat(parts), count


def _rounds(names: Sequence[str], kept: set[str], step: int) -> list[tuple[int, int]]:
    """The (lo, hi) ranges of images to draw, at most `step` each: the images not `kept`,
    run by run (image p depends on p alone, so drawing only them changes none)."""
    rounds, p = [], 0
    while p < len(names):
        if names[p] in kept:
            p += 1
            continue
        hi = p
        while hi < min(len(names), p + step) and names[hi] not in kept:
            hi += 1
        rounds.append((p, hi))
        p = hi
    return rounds


def _read(folder: Path, names: Sequence[str]) -> torch.Tensor:
    """The uint8 [N x H x W x C] pixels of PNGs this module wrote (PNG is lossless)."""
    from PIL import Image

    pixels = []
    for name in names:
        with Image.open(folder / name) as im:
            a = np.asarray(im)
        pixels.append(a[..., None] if a.ndim == 2 else a)
    return torch.from_numpy(np.stack(pixels))
