"""Reading the images of an archive (.zip/.tar/.tgz/.tar.gz) or a folder, one member at a
time, as ``(name, bytes, None)`` or ``(name, None, why it is skipped)``."""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from animeddim.data import IMAGE_EXTENSIONS, DataError, Listing, list_images, read_error_reason
from animeddim.image_files import HEIC_EXTENSIONS, HEIC_REASON, hidden, passed_over_folder

# An archive member larger than this is skipped unread: no training image is 256 MB, and reading
# one into memory is how a zip bomb would hurt.
MAX_MEMBER_BYTES = 256 * 1024**2

# Member names looked at: images, and HEIC photos (noted as skipped, with the reason).
_LOOKED_AT = IMAGE_EXTENSIONS + HEIC_EXTENSIONS

Member = tuple[str, bytes | None, str | None]


def _safe_member_name(name: str) -> bool:
    """False for absolute paths and '..' components: names that would escape a folder."""
    path = PurePosixPath(name.replace("\\", "/"))
    parts = path.parts
    return bool(parts) and not path.is_absolute() and ".." not in parts and ":" not in parts[0]


def _passed_over_in(name: str) -> str | None:
    """The hidden or system folder an archive member lies in ('__MACOSX/'), or the member
    itself when it is hidden ('faces/._a.png', as macOS's tar adds them), as a folder walk
    passes them over (`image_files.list_images`); None for a member to read."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    for i, part in enumerate(parts[:-1]):
        if passed_over_folder(part):
            return "/".join(parts[: i + 1]) + "/"
    return "/".join(parts) if parts and hidden(parts[-1]) else None


def _not_read(name: str, passed: dict[str, int]) -> str | None:
    """None for an archive member to read; else "" for one passed over (an image counted in
    ``passed``, per folder), or why it is skipped (a HEIC photo), as a folder walk does."""
    heic = name.lower().endswith(HEIC_EXTENSIONS)
    if (folder := _passed_over_in(name)) is not None:
        if not heic:
            passed[folder] = passed.get(folder, 0) + 1
        return ""
    return HEIC_REASON if heic else None


def _archive_members(
    src: Path, passed: dict[str, int]
) -> Iterator[tuple[str, bytes | None, str | None]]:
    """Yield ``(name, bytes, None)`` per image member, or ``(name, None, reason)`` to skip it;
    the members in hidden or system folders are counted in ``passed``, per folder.

    Members are streamed one at a time in archive order (a .tgz is never extracted to disk),
    and their names are only reported, never used as output paths.
    """
    if zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as zf:
            for info in zf.infolist():
                if info.is_dir() or not info.filename.lower().endswith(_LOOKED_AT):
                    continue
                if (unread := _not_read(info.filename, passed)) is not None:
                    if unread:  # a HEIC photo: noted with the reason
                        yield info.filename, None, unread
                    continue
                yield _read_member(info.filename, info.file_size, lambda i=info: zf.open(i))
    elif tarfile.is_tarfile(src):
        # "r|*": a forward-only stream, so a gzip'd tar is decompressed exactly once.
        with tarfile.open(src, mode="r|*") as tf:
            for member in tf:
                if member.isdir() or not member.name.lower().endswith(_LOOKED_AT):
                    continue  # a folder named like an image ('2024.png/') is no file to skip
                if (unread := _not_read(member.name, passed)) is not None:
                    if unread:  # a HEIC photo: noted with the reason
                        yield member.name, None, unread
                    continue
                if not member.isfile():
                    yield member.name, None, "not a regular file (link or device)"
                    continue
                yield _read_member(member.name, member.size, lambda m=member: tf.extractfile(m))
    else:
        raise DataError(
            f"'{src}' is not a folder or a .zip/.tar/.tgz/.tar.gz archive animeddim can read"
        )


def _read_member(name: str, declared: int, opener: Any) -> tuple[str, bytes | None, str | None]:
    if not _safe_member_name(name):
        return name, None, "unsafe path in archive (absolute or '..'), ignored"
    if declared > MAX_MEMBER_BYTES:
        return name, None, f"member too large ({declared} bytes)"
    try:
        with opener() as f:
            # Read one byte past the limit: declared sizes can lie.
            data = f.read(MAX_MEMBER_BYTES + 1)
    except Exception as exc:  # noqa: BLE001 - a corrupt member is a skip, not a crash
        return name, None, f"cannot read member: {type(exc).__name__}: {exc}"
    if len(data) > MAX_MEMBER_BYTES:
        return name, None, "member too large"
    return name, data, None


def read_members(src: Path, passed: dict[str, int]) -> tuple[Iterator[Member], int | None]:
    """The members of folder or archive ``src`` (see :func:`_archive_members`), and how many
    it will yield when that is known without reading them: a folder's and a .zip's count,
    None for a .tar/.tgz (a stream: counting would decompress it twice). The members in
    hidden or system folders are counted in ``passed`` as they are met (a folder's at once)."""
    if src.is_dir():
        listing = list_images(src)
        passed.update(listing.passed_over)
        return _folder_members(src, listing), len(listing.unread) + len(listing.files)
    total = None
    if zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as zf:
            total = sum(1 for info in zf.infolist() if _yielded(info.filename, info.is_dir()))
    return _archive_members(src, passed), total


def _yielded(name: str, is_dir: bool) -> bool:
    """Whether :func:`_archive_members` yields the member ``name`` (read, or noted skipped)."""
    return not is_dir and name.lower().endswith(_LOOKED_AT) and _passed_over_in(name) is None


def _folder_members(src: Path, listing: Listing) -> Iterator[Member]:
    for s in listing.unread:  # HEIC photos, unreadable folders
        yield s.path, None, s.reason
    for path in listing.files:
        name = path.relative_to(src).as_posix()
        try:
            yield name, path.read_bytes(), None
        except OSError as exc:
            yield name, None, read_error_reason(path, exc)
