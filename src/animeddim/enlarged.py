"""Images smaller than the size they are read at: enlarged to it, and blurred by it.

Counted where each image is decoded (its upright width x height comes with its pixels, so
nothing is read twice), said in one note: by `data prepare` and by `train` at its start, and
as an :class:`EnlargedWarning` by the commands that read images at a model's size (`invert`,
`edit`, `interpolate --images`; the CLI prints it as a note).
No torch here: the decoding worker processes import `data`, which imports this.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .image_files import shown
from .words import counted


class EnlargedWarning(UserWarning):
    """Images smaller than the model's size were enlarged to it (:meth:`Enlarged.warn`)."""


@dataclass
class Enlarged:
    """How many images were smaller than the size they were read at, and the smallest."""

    count: int = 0  # images whose centred square was smaller than the size
    smallest: tuple[int, int, str] | None = None  # of those: (width, height, name), upright

    def add(self, width: int, height: int, name: str, size: int) -> None:
        """Count image ``name`` of ``width`` x ``height`` (upright) read at ``size``, if its
        centred square (``min(width, height)`` a side) is smaller."""
        if min(width, height) >= size:
            return
        self.count += 1
        if self.smallest is None or min(width, height) < min(self.smallest[:2]):
            self.smallest = (width, height, name)

    @classmethod
    def of(
        cls, names: Sequence[str], sizes: Sequence[tuple[int, int] | None], size: int
    ) -> Enlarged:
        """The images ``names`` of source ``sizes`` (None: not decoded) read at ``size``."""
        enlarged = cls()
        for name, source in zip(names, sizes, strict=True):
            if source is not None:
                enlarged.add(*source, name, size)
        return enlarged

    def to_json(self) -> list[Any]:
        """``[count, width, height, name]`` of the smallest (``[0]`` when none), as a decoded
        folder's disk cache records it."""
        return [self.count, *self.smallest] if self.smallest else [0]

    @classmethod
    def from_json(cls, record: list[Any]) -> Enlarged:
        """What :meth:`to_json` wrote."""
        if not record or not record[0]:
            return cls()
        count, width, height, name = record
        return cls(int(count), (int(width), int(height), str(name)))

    def note(self, size: int, option: str | None) -> str | None:
        """One line naming the images enlarged to ``size`` x ``size``, the smallest, and the
        remedy: a smaller ``option`` (the size option of the command), or with None (a
        model's size, fixed) images at least that large; None when none was enlarged."""
        if not self.count or self.smallest is None:
            return None
        width, height, name = self.smallest
        one = self.count == 1
        remedy = (
            f"a smaller {option} keeps {'it' if one else 'them'} sharp"
            if option
            else f"{size}x{size} is the model's size: images at least that large stay sharp"
        )
        if one:
            return (
                f"1 image smaller than {size}x{size} (its centred square) was enlarged to it, "
                f"blurring it ({shown(name)}, {width}x{height}); {remedy}"
            )
        return (
            f"{counted(self.count, 'image')} smaller than {size}x{size} (the centred square of "
            f"each) were enlarged to it, blurring them (the smallest: {shown(name)}, "
            f"{width}x{height}); {remedy}"
        )

    def warn(self, size: int) -> None:
        """:meth:`note` for images read at a model's ``size``, as an :class:`EnlargedWarning`
        (none when no image was enlarged)."""
        if note := self.note(size, None):
            warnings.warn(note, EnlargedWarning, stacklevel=3)
