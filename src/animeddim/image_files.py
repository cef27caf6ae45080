"""Which files of an image folder are images: the folder walk, apart from decoding.

No Pillow, numpy or torch here: what `data` decodes, `datasets` prepares and `metrics` measures
is found the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# All read by Pillow; .jfif and .jpe are JPEGs as some browsers save them, .apng animated PNGs.
IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".jfif",
    ".jpe",
    ".webp",
    ".avif",
    ".bmp",
    ".gif",
    ".apng",
    ".tif",
    ".tiff",
)


class DataError(ValueError):
    """A user-facing data problem; the message names the folder or file and what went wrong."""


@dataclass
class Skipped:
    path: str  # the file (or archive member) as found
    reason: str  # short reason, e.g. "empty file (0 bytes)"


def find_images(root: Path) -> list[Path]:
    """All image files under ``root``, recursively, sorted by relative posix path.

    Extensions are matched case-insensitively against :data:`IMAGE_EXTENSIONS`. Directory
    symlinks are followed, but each real directory is visited once, so symlink loops terminate.
    A broken symlink with an image name is listed (`data.load_image` then says it is broken).
    Unreadable directories are skipped. A missing ``root`` or one that is not a folder raises
    :class:`DataError`.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder '{root}' does not exist")
    if not root.is_dir():
        raise DataError(f"'{root}' is not a folder (expected a folder of images)")
    found: list[tuple[str, Path]] = []
    visited: set[str] = set()
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        folder, rel = stack.pop()
        real = os.path.realpath(folder)
        if real in visited:
            continue
        visited.add(real)
        try:
            with os.scandir(folder) as entries:
                entries_list = list(entries)
        except OSError:
            continue  # unreadable folder: its images are simply not found
        for entry in entries_list:
            entry_rel = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if entry.is_dir(follow_symlinks=True):
                    stack.append((folder / entry.name, entry_rel))
                    continue
            except OSError:
                pass  # a link to itself (ELOOP): listed below if it has an image name
            try:
                # A broken link is listed too, so that loading reports it instead of hiding it.
                listed = entry.is_symlink() or entry.is_file()
            except OSError:
                continue  # vanished entry
            if listed and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((entry_rel, folder / entry.name))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]
