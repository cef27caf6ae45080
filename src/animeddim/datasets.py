"""Built-in and paper datasets: DiceBear avatars, user-downloaded archives, Oxford flowers.

Every function here writes a plain folder of square RGB PNGs plus a ``manifest.json`` that says
how it was made, so :func:`animeddim.data.load_folder` can train on it like any other folder.
Decoding and cropping reuse :mod:`animeddim.data`; nothing is duplicated.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import json
import os
import re
import tarfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from animeddim.avatar_labels import (
    LABELS_FILE,
    avatar_options,
    forced_components,
    label_rows,
    write_labels_csv,
)
from animeddim.data import (
    IMAGE_EXTENSIONS,
    BadImage,
    DataError,
    Listing,
    ProfileWarning,
    Skipped,
    SkippedFilesWarning,
    _decode,
    _pool_context,
    list_images,
    n_files,
    note_passed_over,
    passed_over_note,
    read_error_reason,
    shown,
    skip_summary,
    unconverted_note,
)
from animeddim.image_files import HEIC_EXTENSIONS, HEIC_REASON, hidden, passed_over_folder
from animeddim.io import (
    file_digest,
    file_in_the_way,
    is_temp_name,
    png_bytes,
    save_png,
    write_bytes_atomic,
    write_text_atomic,
)

AVATAR_STYLE = "adventurer"
FLOWERS102_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz"
FLOWERS102_MD5 = "52808999861908f626f3c1f4e79d11fa"

# An archive member larger than this is skipped unread: no training image is 256 MB, and reading
# one into memory is how a zip bomb would hurt.
MAX_MEMBER_BYTES = 256 * 1024**2

# Member names looked at: images, and HEIC photos (noted as skipped, with the reason).
_LOOKED_AT = IMAGE_EXTENSIONS + HEIC_EXTENSIONS

_PENDING = ".animeddim-pending.json"  # arguments of a generation run that has not finished
_OUTPUT_NAME = re.compile(r"\d{6}\.png")  # what prepare() writes, bar manifest.json
_AVATAR_NAME = re.compile(r"avatar-\d{6}\.png")


# --------------------------------------------------------------------------------------------
# DiceBear avatars

_style_cache: dict[str, Any] = {}  # one parsed Style per worker process


def _style() -> Any:
    """The DiceBear "adventurer" style, parsed once per process."""
    if AVATAR_STYLE not in _style_cache:
        from dicebear import Style

        _style_cache[AVATAR_STYLE] = Style(_style_json())
    return _style_cache[AVATAR_STYLE]


def _style_json() -> dict[str, Any]:
    text = files("dicebear_styles").joinpath(f"{AVATAR_STYLE}.json").read_text("utf-8")
    return json.loads(text)


def avatar_seed(seed: int, i: int) -> str:
    """DiceBear seed string of avatar ``i``: a pure function of ``(seed, i)``."""
    return f"animeddim-{seed}-{i}"


def _render_avatar(seed: int, i: int, size: int, forced: tuple[str, ...] = ()) -> np.ndarray:
    """Avatar ``i`` of set ``seed`` as a ``(size, size, 3)`` uint8 RGB array on white, with the
    ``forced`` rare components drawn (see :mod:`animeddim.avatar_labels`)."""
    import cairosvg
    from dicebear import Avatar

    svg = Avatar(_style(), avatar_options(avatar_seed(seed, i), size, forced)).to_string()
    png = cairosvg.svg2png(bytestring=svg.encode(), output_width=size, output_height=size)
    return _decode(png, None)  # composites the transparent background on white


def _render_chunk(out: str, seed: int, size: int, indices: list[int], balanced: float = 0.0) -> int:
    """Render and write ``avatar-{i:06d}.png`` for each index; returns how many were written."""
    for i in indices:
        forced = forced_components(seed, i, balanced)
        pixels = _render_avatar(seed, i, size, forced) if forced else _render_avatar(seed, i, size)
        save_png(Path(out) / f"avatar-{i:06d}.png", pixels)
    return len(indices)


def _avatar_manifest(n: int, size: int, seed: int, balanced: float = 0.0) -> dict[str, Any]:
    # "balanced" only when set, so the manifests of plain sets made before it still match.
    return {
        **({"balanced": balanced} if balanced > 0 else {}),
        "style": AVATAR_STYLE,
        "n": n,
        "size": size,
        "seed": seed,
        "dicebear_core": importlib.metadata.version("dicebear-core"),
        "dicebear_styles": importlib.metadata.version("dicebear-styles"),
    }


def _credits_text() -> str:
    meta = _style_json().get("meta", {})
    lic, creator, source = meta.get("license", {}), meta.get("creator", {}), meta.get("source", {})
    return (
        "# Credits\n\n"
        f"The avatars in this folder are rendered from the DiceBear style "
        f'"{source.get("name", AVATAR_STYLE)}" ({source.get("url", "")}) '
        f"by {creator.get('name', 'unknown')} ({creator.get('url', '')}), "
        f"licensed under {lic.get('name', 'unknown')} ({lic.get('url', '')}).\n\n"
        f"{lic.get('text', '')}\n\n"
        "Rendered with DiceBear (https://www.dicebear.com, MIT licence) and CairoSVG.\n"
    )


def generate_avatars(
    out: str | Path,
    n: int = 10000,
    size: int = 64,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = False,
    balanced: float = 0.0,
) -> Path:
    """Render ``n`` DiceBear "adventurer" avatars as ``out/avatar-{i:06d}.png`` (RGB, on white),
    and their attributes, read from DiceBear's resolved options, as ``out/labels.csv``.

    Image ``i`` depends only on ``(seed, i, size)`` and the DiceBear versions, so the same seed
    gives the same set and different seeds give fresh faces. ``workers`` processes render in
    chunks (None = one per CPU). Idempotent: a finished set with the same arguments returns at
    once; an interrupted one renders only its missing files; a folder holding a different set
    raises :class:`DataError` rather than mixing two sets. ``balanced`` > 0 forces each rare
    component (glasses, earrings, details) on in that share of the avatars; labels.csv says
    which were forced. Returns ``out``.
    """
    if n < 1 or size < 1:
        raise DataError(f"need n >= 1 and size >= 1 avatars, got n={n}, size={size}")
    if not 0 <= balanced <= 1:
        raise DataError(f"balanced must be a share in [0, 1], got {balanced}")
    out = Path(out)
    _check_out_creatable(out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = _avatar_manifest(n, size, seed, balanced)
    manifest_path, pending_path = out / "manifest.json", out / _PENDING
    names = [f"avatar-{i:06d}.png" for i in range(n)]

    for previous_path in (manifest_path, pending_path):
        previous = _read_json(previous_path)
        if previous is not None and previous != wanted:
            raise DataError(
                f"folder '{out}' already holds a different avatar set ({previous}); "
                f"asked for {wanted}. Use another folder, or empty this one."
            )
    if manifest_path.exists() and all((out / name).exists() for name in names):
        if not (out / LABELS_FILE).exists():  # a set made before labels were written
            _write_labels(out, names, seed, size, balanced, progress)
        return out
    if not pending_path.exists() and not manifest_path.exists():
        _check_only_avatars(out, size)

    # Record the arguments first, so an interrupted run is resumed only with the same ones
    # (atomically: a note cut short by a full disk, unreadable, let the next call render
    # into a folder of other files, which the note's absence has it refuse).
    write_text_atomic(pending_path, json.dumps(wanted))
    missing = [i for i, name in enumerate(names) if not (out / name).exists()]
    _render_missing(out, seed, size, missing, workers, progress, balanced)
    _write_labels(out, names, seed, size, balanced, progress)
    write_text_atomic(out / "CREDITS.md", _credits_text())
    # The manifest is written last: its presence means every image is complete.
    write_text_atomic(manifest_path, json.dumps(wanted, indent=2) + "\n")
    pending_path.unlink()
    return out


def _check_out_creatable(out: Path) -> None:
    """DataError for an output folder that is a file or lies under one."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out '{out}' is a file, not a folder")
    if (blocker := file_in_the_way(out)) is not None:
        raise DataError(f"--out '{out}' cannot be created: '{blocker}' is a file, not a folder")


def _check_only_avatars(out: Path, size: int) -> None:
    """Without a manifest, accept only leftovers of an avatar run of this size (else DataError)."""
    for path in out.iterdir():
        if path.name in ("CREDITS.md", LABELS_FILE) or is_temp_name(path.name):
            continue
        if not _AVATAR_NAME.fullmatch(path.name):
            raise DataError(
                f"folder '{out}' is not empty and holds no avatar set ('{path.name}'); "
                "use a new or empty folder"
            )
        with Image.open(path) as im:
            if im.size != (size, size):
                raise DataError(
                    f"folder '{out}' holds avatars of size {im.size[0]}, not {size}; "
                    "use another folder"
                )


def _write_labels(
    out: Path, names: list[str], seed: int, size: int, balanced: float, progress: bool
) -> None:
    forced = [forced_components(seed, i, balanced) for i in range(len(names))]
    seeds = [avatar_seed(seed, i) for i in range(len(names))]
    write_labels_csv(out / LABELS_FILE, label_rows(names, seeds, forced, size, progress))


def _render_missing(
    out: Path,
    seed: int,
    size: int,
    missing: list[int],
    workers: int | None,
    progress: bool,
    balanced: float = 0.0,
) -> None:
    workers = max(1, min(workers or os.cpu_count() or 1, len(missing) // 2 or 1))
    chunk = max(1, min(256, len(missing) // (workers * 4) or 1))
    chunks = [missing[k : k + chunk] for k in range(0, len(missing), chunk)]
    with tqdm(total=len(missing), desc="avatars", unit="img", disable=not progress) as bar:
        if workers == 1:
            for part in chunks:
                bar.update(_render_chunk(str(out), seed, size, part, balanced))
            return
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
            futures = [
                pool.submit(_render_chunk, str(out), seed, size, part, balanced) for part in chunks
            ]
            for future in concurrent.futures.as_completed(futures):
                bar.update(future.result())


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Archives and folders -> square PNGs


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


def _folder_members(
    src: Path, passed: dict[str, int]
) -> Iterator[tuple[str, bytes | None, str | None]]:
    listing = list_images(src)
    passed.update(listing.passed_over)
    for s in listing.unread:  # HEIC photos, unreadable folders
        yield s.path, None, s.reason
    for path in listing.files:
        name = path.relative_to(src).as_posix()
        try:
            yield name, path.read_bytes(), None
        except OSError as exc:
            yield name, None, read_error_reason(path, exc)


def _prepare_one(data: bytes, size: int) -> tuple[bytes | None, str | None, list[str]]:
    """Decode, centre-crop and resize one image; returns ``(png_bytes, None, notes)`` or
    ``(None, reason, [])``; ``notes``: why its colour profile was not applied."""
    notes: list[str] = []
    try:
        pixels = _decode(data, size, notes=notes)
    except BadImage as exc:
        return None, exc.reason, []
    return png_bytes(pixels), None, notes


def _source_id(src: Path, size: int) -> dict[str, Any]:
    """What identifies a prepared folder: source path, its byte size and mtime, and size."""
    st = src.stat()
    return {
        "source": str(src.resolve()),
        "source_bytes": st.st_size if src.is_file() else None,
        "source_mtime_ns": st.st_mtime_ns if src.is_file() else None,
        "size": size,
    }


def prepare(
    src: str | Path, out: str | Path, size: int = 64, *, workers: int | None = None
) -> Path:
    """Turn an archive (.zip/.tar/.tgz/.tar.gz) or folder of images into ``out/{i:06d}.png``.

    Each image is centre-cropped to its largest square and resized to ``size`` exactly as
    :func:`animeddim.data.load_image` does; outputs are numbered 0, 1, ... over the usable images
    in archive order (sorted path order for a folder). Members are read into memory one by one,
    never extracted by name, so '..' or absolute member paths cannot write outside ``out``.
    Skipped members are warned about; no usable image raises :class:`DataError`. Re-running with
    the same source and size returns at once. An existing ``out`` must be empty, or hold what a
    prepare of the same source and size wrote there (finished, or interrupted: done again);
    anything else raises :class:`DataError`. Returns ``out``.
    """
    src, out = Path(src), Path(out)
    if not src.exists():
        raise DataError(f"source '{src}' does not exist")
    if size < 1:
        raise DataError(f"image size must be a positive integer, got {size}")
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise DataError(f"output folder '{out}' must not be inside the source folder '{src}'")
    _check_out_creatable(out)
    wanted = _source_id(src, size)
    manifest_path, pending_path = out / "manifest.json", out / _PENDING
    # The manifest says a prepare finished here, the pending file that one was interrupted;
    # without either, numbered PNGs are someone's own files (video frames, 000000.png ...).
    finished = _read_json(manifest_path)
    previous = finished or _read_json(pending_path)
    if previous is not None:
        if any(previous.get(k) != wanted[k] for k in ("source", "size")):
            raise DataError(
                f"folder '{out}' already holds images prepared from {previous.get('source')} at "
                f"size {previous.get('size')}; use another folder"
            )
        if finished and src.is_file() and {k: finished.get(k) for k in wanted} == wanted:
            return out  # same archive, same size: already done
    elif out.exists() and any(not is_temp_name(p.name) for p in out.iterdir()):
        raise DataError(
            f"folder '{out}' is not empty (it holds files animeddim did not prepare there); "
            "prepare into a new or empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    interrupted = pending_path.is_file()  # an earlier call's images may lie here
    write_text_atomic(pending_path, json.dumps(wanted))

    passed: dict[str, int] = {}  # images in hidden or system folders, not prepared
    members = _folder_members(src, passed) if src.is_dir() else _archive_members(src, passed)
    count, tried, skipped, unconverted = 0, 0, [], []
    workers = max(1, workers or os.cpu_count() or 1)
    pool = (
        concurrent.futures.ProcessPoolExecutor(workers, mp_context=_pool_context())
        if workers > 1
        else None
    )
    try:
        # Work in windows so memory holds at most a few hundred encoded images at once.
        for window in _windows(members, 64 * workers):
            tried += len(window)
            todo = [(name, data) for name, data, reason in window if data is not None]
            skipped += [Skipped(name, why or "") for name, data, why in window if data is None]
            blobs = [data for _, data in todo]
            results = (
                pool.map(_prepare_one, blobs, [size] * len(blobs), chunksize=8)
                if pool is not None
                else (_prepare_one(b, size) for b in blobs)
            )
            for (name, _), (png, reason, notes) in zip(todo, results, strict=True):
                unconverted += [Skipped(name, note) for note in notes]
                if png is None:
                    skipped.append(Skipped(name, reason or ""))
                    continue
                write_bytes_atomic(out / f"{count:06d}.png", png)
                count += 1
    finally:
        if pool is not None:
            pool.shutdown()

    passed = dict(sorted(passed.items()))  # by folder, as a folder walk gives them
    if count == 0:
        if not interrupted:  # nothing written here, by this call or an interrupted one
            pending_path.unlink(missing_ok=True)  # the folder is as it was
        first = f" (first: {shown(skipped[0].path)}: {skipped[0].reason})" if skipped else ""
        also = f"; {passed_over_note(Listing([], passed))}" if passed else ""
        raise DataError(
            f"no usable image in '{src}': {n_files(tried)} tried, {len(skipped)} skipped"
            f"{first}{also}"
        )
    # Files from an earlier run of this source that had more usable images would mix in.
    for stale in out.iterdir():
        if _OUTPUT_NAME.fullmatch(stale.name) and int(stale.name[:6]) >= count:
            stale.unlink()
    if skipped:
        warnings.warn(skip_summary(skipped, tried), SkippedFilesWarning, stacklevel=2)
    if unconverted:
        warnings.warn(unconverted_note(unconverted), ProfileWarning, stacklevel=2)
    note_passed_over(Listing([], passed))
    manifest = {
        **wanted,
        "count": count,
        "skipped": [[s.path, s.reason] for s in skipped],
        **({"passed_over": passed} if passed else {}),
        # the images' embedded colour profiles were applied (a folder prepared before has
        # none of this: its images were read as sRGB; it is kept as it is)
        "colour_profiles": "srgb",
        **({"unconverted": [[s.path, s.reason] for s in unconverted]} if unconverted else {}),
    }
    write_bytes_atomic(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    pending_path.unlink(missing_ok=True)
    return out


def _windows(items: Iterator[Any], n: int) -> Iterator[list[Any]]:
    window: list[Any] = []
    for item in items:
        window.append(item)
        if len(window) == n:
            yield window
            window = []
    if window:
        yield window


# --------------------------------------------------------------------------------------------
# Oxford 102 flowers


def download_flowers102(
    out: str | Path,
    *,
    url: str = FLOWERS102_URL,
    md5: str = FLOWERS102_MD5,
    size: int = 64,
    progress: bool = True,
) -> Path:
    """Download Oxford 102 flowers (8189 images) and prepare them as ``out/images``.

    The archive goes to ``out/102flowers.tgz.part`` (an existing .part is resumed with an HTTP
    Range request), is checked against ``md5`` (a mismatch deletes the .part and raises
    :class:`DataError`), renamed to ``out/102flowers.tgz`` and passed to :func:`prepare`.
    Network failures raise :class:`DataError` saying how to do it by hand. Returns the folder of
    prepared images.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    archive = out / "102flowers.tgz"
    part = archive.with_name(archive.name + ".part")
    images = out / "images"
    by_hand = (
        f"download {url} yourself and run "
        f"`animeddim data prepare {archive} --out {images} --size {size}`"
    )
    if not (archive.exists() and file_digest(archive, "md5") == md5):
        try:
            _download(url, part, progress)
        except (urllib.error.URLError, OSError) as exc:
            raise DataError(f"download failed: {exc}; {by_hand}") from None
        got = file_digest(part, "md5")
        if got != md5:
            part.unlink()
            raise DataError(
                f"download of {url} has md5 {got}, expected {md5}; the partial file was "
                f"deleted, try again or {by_hand}"
            )
        os.replace(part, archive)
    return prepare(archive, images, size)


def _download(url: str, part: Path, progress: bool) -> None:
    """Fetch ``url`` into ``part``, continuing from its current length when the server agrees."""
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "animeddim"}
    if start:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:
            return  # range past the end: the .part is already complete; the md5 will tell
        raise
    with response:
        resumed = response.status == 206
        if not resumed:
            start = 0  # the server ignored the range: start over
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with (
            open(part, "ab" if resumed else "wb") as f,
            tqdm(
                total=total, initial=start, unit="B", unit_scale=True, disable=not progress
            ) as bar,
        ):
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
                bar.update(len(block))
