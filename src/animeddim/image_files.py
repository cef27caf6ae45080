"""Which files of an image folder are images: the folder walk, apart from decoding; and the
one-line notes on what was passed over or skipped.

No Pillow, numpy or torch here: what `data` decodes, `datasets` prepares and `metrics` measures
is found the same way.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .words import counted

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
# What animeddim read before .jfif, .jpe, .avif and .apng files were images: a run started
# then resumes on the images it read (`train_data`).
EARLIER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataError(ValueError):
    """A user-facing data problem; the message names the folder or file and what went wrong."""


@dataclass
class Skipped:
    path: str  # the file (or archive member) as found
    reason: str  # short reason, e.g. "empty file (0 bytes)"


# Photos Pillow decodes only with a plugin animeddim does not use: named in the skip note.
HEIC_EXTENSIONS = (".heic", ".heif")
HEIC_REASON = (
    "HEIC/HEIF photo, not read: Pillow needs the pillow-heif plugin for it; convert it to JPEG "
    "or PNG"
)

# Folders that NAS boxes, operating systems and zip tools add beside the data: Synology's
# thumbnails, the resource forks of a zip made on macOS, recycle bins and snapshots. Hidden
# folders ('.Trash-1000', '.thumbnails', '.git') are passed over by their leading dot.
SYSTEM_FOLDERS = frozenset(
    name.casefold()
    for name in (
        "@eaDir",
        "__MACOSX",
        "#recycle",
        "#snapshot",
        "@Recycle",
        "$RECYCLE.BIN",
        "System Volume Information",
    )
)


def hidden(name: str) -> bool:
    """True for a hidden file or folder: '.x', macOS's AppleDouble files ('._x.png', a few
    hundred bytes of metadata beside each file copied from a Mac) among them."""
    return name.startswith(".") and name not in (".", "..")


def passed_over_folder(name: str) -> bool:
    """True for a folder whose images are not data: hidden ('.x') or a system folder."""
    return hidden(name) or name.casefold() in SYSTEM_FOLDERS


@dataclass
class Listing:
    """What a folder walk found."""

    files: list[Path]  # the image files to read, sorted by relative posix path
    # image files passed over: hidden ones ('a/._x.png': 1), and those in hidden or system
    # folders, counted per folder ('@eaDir/': 12, 'a/.thumbnails/': 3)
    passed_over: dict[str, int] = field(default_factory=dict)
    # what was found but cannot be read, with the reason: HEIC photos ('a/b.heic') and
    # unreadable folders ('a/private/'), by relative posix path
    unread: list[Skipped] = field(default_factory=list)

    def unread_in(self, root: Path) -> list[Skipped]:
        """``unread`` with paths under ``root`` (as skip notes name files), folders ending in /."""
        return [
            Skipped(
                f"{Path(root) / s.path.rstrip('/')}{'/' if s.path.endswith('/') else ''}", s.reason
            )
            for s in self.unread
        ]


def folder_problem(path: str | Path, images: bool = True) -> str | None:
    """Why ``path`` is not a folder, to follow its name in a message ('does not exist', 'is a
    file, not a folder', 'is a broken symbolic link (to ...)'); None for a folder. An archive
    is said to be one (`archive_problem`; ``images``: a folder of images is wanted, which
    `data prepare` makes of it, else one to unpack, as `serve --runs`'s)."""
    p = Path(path)
    if p.is_dir():
        return None
    if p.is_symlink() and not p.exists():
        return f"is a broken symbolic link (to {str(p.readlink())!r})"
    if not p.exists():
        return "does not exist"
    return (
        archive_problem(p, images)
        or f"is {'a file' if p.is_file() else 'not a regular file'}, not a folder"
    )


def archive_problem(path: Path, images: bool = True) -> str | None:
    """For a .zip or .tar(.gz) archive given where a folder of images is read: that it is one,
    and how to make a folder of its images (``images`` False, a folder of anything else:
    to unpack it); None for any other path."""
    import tarfile
    import zipfile

    try:
        archive = path.is_file() and (zipfile.is_zipfile(path) or tarfile.is_tarfile(path))
    except OSError:  # unreadable: said where it is read
        return None
    if not archive:
        return None
    if not images:
        return "is an archive, not a folder: unpack it and give the folder it holds"
    return (
        "is an archive, not a folder: make a folder of its images with `animeddim data "
        f"prepare {shlex.quote(str(path))} --out DIR` (or unpack it) and give that folder"
    )


def find_images(
    root: Path, *, everything: bool = False, extensions: tuple[str, ...] = IMAGE_EXTENSIONS
) -> list[Path]:
    """The image files under ``root`` that are read (:func:`list_images`)."""
    return list_images(root, everything=everything, extensions=extensions).files


def list_images(
    root: Path, *, everything: bool = False, extensions: tuple[str, ...] = IMAGE_EXTENSIONS
) -> Listing:
    """All image files under ``root``, recursively, sorted by relative posix path; hidden ones
    (:func:`hidden`) and those in hidden and system folders (:func:`passed_over_folder`) only
    counted, unless ``everything`` (how animeddim listed a folder before it passed them over).

    Extensions are matched case-insensitively against ``extensions`` (:data:`IMAGE_EXTENSIONS`;
    :data:`EARLIER_EXTENSIONS` lists a folder as animeddim did before). Directory
    symlinks are followed, but each real directory is visited once, so symlink loops terminate;
    passed-over folders are walked last, so a folder also linked from one is read.
    A broken symlink with an image name is listed (`data.load_image` then says it is broken).
    HEIC photos and unreadable folders are listed in ``unread`` with the reason. A missing
    ``root``, one that is not a folder or cannot be read raises :class:`DataError`.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder '{root}' does not exist")
    if not root.is_dir():
        if (problem := archive_problem(root)) is not None:
            raise DataError(f"'{root}' {problem}")
        raise DataError(f"'{root}' is not a folder (expected a folder of images)")
    found: list[tuple[str, Path]] = []
    passed: dict[str, int] = {}
    unread: list[Skipped] = []
    visited: set[str] = set()
    # (folder, its path below root, the passed-over folder it lies in or None)
    stack: list[tuple[Path, str, str | None]] = [(root, "", None)]
    later: list[tuple[Path, str, str | None]] = []  # passed-over folders, walked last
    while stack or later:
        folder, rel, within = stack.pop() if stack else later.pop()
        real = os.path.realpath(folder)
        if real in visited:
            continue
        visited.add(real)
        try:
            with os.scandir(folder) as entries:
                entries_list = list(entries)
        except OSError as exc:
            reason = "permission denied" if isinstance(exc, PermissionError) else exc.strerror
            if not rel:
                raise DataError(f"cannot read image folder '{root}': {reason}") from None
            if within is None or everything:
                unread.append(Skipped(f"{rel}/", f"folder not read: {reason}"))
            continue
        for entry in entries_list:
            entry_rel = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if entry.is_dir(follow_symlinks=True):
                    if within is None and passed_over_folder(entry.name) and not everything:
                        later.append((folder / entry.name, entry_rel, f"{entry_rel}/"))
                    else:
                        stack.append((folder / entry.name, entry_rel, within))
                    continue
            except OSError:
                pass  # a link to itself (ELOOP): listed below if it has an image name
            try:
                # A broken link is listed too, so that loading reports it instead of hiding it.
                listed = entry.is_symlink() or entry.is_file()
            except OSError:
                continue  # vanished entry
            if listed and entry.name.lower().endswith(HEIC_EXTENSIONS):
                if (within is None and not hidden(entry.name)) or everything:
                    unread.append(Skipped(entry_rel, HEIC_REASON))
            elif listed and entry.name.lower().endswith(extensions):
                if within is not None:
                    passed[within] = passed.get(within, 0) + 1
                elif hidden(entry.name) and not everything:
                    passed[entry_rel] = 1
                else:
                    found.append((entry_rel, folder / entry.name))
    found.sort(key=lambda item: item[0])
    unread.sort(key=lambda item: item.path)
    return Listing([path for _, path in found], dict(sorted(passed.items())), unread)


# --------------------------------------------------------------------------------------------
# Notes: what a folder walk or decoding passed over, skipped or read otherwise, one line each


def passed_over_note(listing: Listing, limit: int = 5) -> str:
    """One line: how many image files were passed over, and which or where (the first
    ``limit`` hidden files and folders)."""
    where = list(listing.passed_over.items())
    total = sum(n for _, n in where)
    folders = any(name.endswith("/") for name, _ in where)
    files = not all(name.endswith("/") for name, _ in where)
    listed = ", ".join(
        f"{shown(name)} ({n})" if name.endswith("/") else shown(name) for name, n in where[:limit]
    )
    more = f", and {len(where) - limit} more" if len(where) > limit else ""
    if not files:
        why = "in hidden or system folders (thumbnails, trash, zip leftovers; not data)"
        what = f"{counted(total, 'image file')} {why}"
    elif not folders:
        what = f"{counted(total, 'hidden image file')} (such as macOS's '._' metadata; not data)"
    else:
        why = "macOS's '._' metadata, thumbnails, trash, zip leftovers; not data"
        what = f"{counted(total, 'image file')}, hidden or in hidden or system folders ({why})"
    return f"passed over {what}: {listed}{more}"


def skip_summary(skipped: Sequence[Skipped], tried: int, limit: int = 5) -> str:
    """One line: how many files were skipped and the first ``limit`` with their reasons.

    ``tried`` counts the skipped entries; those that are folders (a path ending in '/': it
    could not be read) are counted apart, as folders.
    """
    listed, more = _listed(skipped, limit)
    folders = sum(s.path.endswith("/") for s in skipped)
    files, tried = len(skipped) - folders, tried - folders
    read = f"could not read {counted(folders, 'folder')}" if folders else ""
    if not files:
        return f"{read}, {'their' if folders != 1 else 'its'} images not found: {listed}{more}"
    also = f" and {read}" if folders else ""
    return f"skipped {files} of {n_files(tried)} that could not be decoded{also}: {listed}{more}"


def unconverted_note(unconverted: Sequence[Skipped], limit: int = 5) -> str:
    """One line: how many images were read as sRGB because their embedded colour profile
    could not be applied, and the first ``limit`` with the reason."""
    listed, more = _listed(unconverted, limit)
    n = len(unconverted)
    return (
        f"read {n_files(n)} as sRGB, {'its' if n == 1 else 'their'} embedded colour profile "
        f"not applied: {listed}{more}"
    )


def _listed(entries: Sequence[Skipped], limit: int) -> tuple[str, str]:
    """The first ``limit`` entries as 'path: reason; ...', and '; and N more' (or '')."""
    listed = "; ".join(f"{shown(s.path)}: {s.reason}" for s in entries[:limit])
    return listed, f"; and {len(entries) - limit} more" if len(entries) > limit else ""


def n_files(n: int) -> str:
    """'1 file', '2 files': a count of files as a sentence says it."""
    return counted(n, "file")


def shown(name: str) -> str:
    """A file name on one line: control characters (a newline is allowed in a name) escaped
    as Python writes them ('bad\\nname.png'), so a note stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)
