"""Image folders -> uint8 arrays -> float batches. Knows nothing about the model.

Every image is decoded once into an ``(N, size, size, 3)`` uint8 array (in memory or a
``np.memmap`` on disk), from which `batches` gathers the training batches. Files that cannot
be decoded are skipped and reported, never silently turned into grey squares.

No torch here: decoding worker processes start in a fraction of a second instead of paying for
a torch import each.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import io
import json
import multiprocessing
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from .colour_profiles import ProfileNotApplied, to_srgb
from .decoded_cache import cache_key, read_cache
from .enlarged import Enlarged

# The folder walk lives in image_files; its names are also read from here, as before.
from .image_files import (  # noqa: F401 - find_images and the note texts are read from here too
    IMAGE_EXTENSIONS,
    DataError,
    Listing,
    Skipped,
    find_images,
    list_images,
    n_files,
    passed_over_note,
    shown,
    skip_summary,
    unconverted_note,
)
from .io import default_cache_dir, temp_path, write_text_atomic

# 8192 x 8192: far beyond any training image, far below what would exhaust memory (a 64 Mpx RGBA
# image is 256 MB). Pillow's own limit (~179 Mpx) is too generous for a batch job.
MAX_PIXELS = 8192 * 8192

# Above this many bytes of decoded pixels, cache="auto" keeps them in a memmap on disk.
AUTO_DISK_BYTES = 4 * 1024**3


class BadImage(Exception):
    """A file could not be turned into an RGB image; ``reason`` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SkippedFilesWarning(UserWarning):
    """Some files in a folder or archive were skipped because they could not be decoded."""


class PassedOverWarning(UserWarning):
    """Image files in hidden or system folders (thumbnails, trash) were passed over, not read."""


class ProfileWarning(UserWarning):
    """Some images' embedded colour profiles could not be applied: they were read as sRGB."""


@dataclass
class ImageSet:
    images: np.ndarray  # (N, size, size, 3) uint8 RGB; a plain array or a read-only np.memmap
    paths: list[str]  # source file of each image, same order as ``images``
    skipped: list[Skipped] = field(default_factory=list)  # files that could not be used
    # files read as sRGB because their embedded colour profile could not be applied
    unconverted: list[Skipped] = field(default_factory=list)
    # the images smaller than the size they were read at (enlarged, blurred), and the smallest
    # (named below the folder)
    enlarged: Enlarged = field(default_factory=Enlarged)


# --------------------------------------------------------------------------------------------
# Finding and decoding single images


def load_image(
    path: Path,
    size: int | None,
    *,
    profiles: bool = True,
    notes: list[Skipped] | None = None,
    source: list[tuple[int, int]] | None = None,
) -> np.ndarray:
    """Decode one image file to sRGB.

    Returns an ``(H, W, 3)`` uint8 array in [0, 255]: the native size when ``size`` is None,
    else the largest central square resized (antialiased bicubic) to ``(size, size, 3)``.
    An embedded colour profile is applied (`colour_profiles.to_srgb`) unless ``profiles`` is
    False (how animeddim read images before: the numbers taken as sRGB); one that cannot be is
    noted in ``notes`` (a :class:`ProfileWarning` without it) and the image read as sRGB.
    Transparent pixels are composited on white; EXIF orientation is applied; 16-bit images are
    scaled (not clipped) to 8 bits; ``source`` gets the file's upright width x height. Raises
    :class:`BadImage` for anything that is not a whole, decodable image of at most
    :data:`MAX_PIXELS` pixels.
    """
    reasons: list[str] = []
    try:
        if os.stat(path).st_size == 0:
            raise BadImage("empty file (0 bytes)")
        with open(path, "rb") as f:
            pixels = _decode(f, size, profiles=profiles, notes=reasons, source=source)
    except OSError as exc:
        raise BadImage(read_error_reason(path, exc)) from None
    unconverted = [Skipped(str(path), reason) for reason in reasons]
    if notes is not None:
        notes += unconverted
    elif unconverted:
        warnings.warn(unconverted_note(unconverted), ProfileWarning, stacklevel=2)
    return pixels


def read_error_reason(path: Path, exc: OSError) -> str:
    """A few words on why `path` could not be read (a skip reason)."""
    if isinstance(exc, PermissionError):
        return "permission denied"
    if os.path.islink(path) and isinstance(exc, FileNotFoundError):
        return f"broken symbolic link (to '{os.readlink(path)}')"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    return f"cannot read: {type(exc).__name__}: {exc}"


def _decode(
    fileobj: IO[bytes] | bytes,
    size: int | None,
    *,
    profiles: bool = True,
    notes: list[str] | None = None,
    source: list[tuple[int, int]] | None = None,
) -> np.ndarray:
    """Decode an open binary file or bytes; same contract as :func:`load_image`, the reason
    an embedded profile was not applied appended to ``notes`` (dropped without it)."""
    if isinstance(fileobj, bytes | bytearray):
        if not fileobj:
            raise BadImage("empty file (0 bytes)")
        fileobj = io.BytesIO(fileobj)
    try:
        with warnings.catch_warnings():
            # Pillow's other warnings are about metadata of an image that still decodes
            # ("Corrupt EXIF data", a malformed MPO): they named no file, and decoding workers
            # printed each with a traceback line. The pixels are all that is used.
            warnings.simplefilter("ignore")
            # Pillow only warns between 89 and 179 Mpx; any bomb warning is a refusal here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fileobj) as im:
                width, height = im.size
                # Checked before load(): the header alone says how much memory decoding takes.
                if width * height > MAX_PIXELS:
                    raise BadImage(f"too large: {width}x{height} pixels (decompression bomb?)")
                if size is not None:
                    # JPEG can decode at 1/2..1/8 scale almost for free; keep >= 2x the target
                    # so the antialiased resize below still sets the final quality.
                    im.draft(None, (2 * size, 2 * size))
                # load() raises on truncated data because ImageFile.LOAD_TRUNCATED_IMAGES is
                # left False: a half-decoded image would otherwise be padded with grey.
                im.load()
                icc = im.info.get("icc_profile") if profiles else None
                drafted, im = im.size, ImageOps.exif_transpose(im)
                if source is not None:  # as shown: turned by its EXIF orientation
                    source.append((height, width) if im.size != drafted else (width, height))
                rgb = _to_rgb(im, icc, [] if notes is None else notes)
                if size is not None:
                    rgb = _centre_square(rgb, size)
                arr = np.asarray(rgb, dtype=np.uint8)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"too large (decompression bomb?): {exc}") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except Exception as exc:  # noqa: BLE001 - every decoder failure becomes a skip reason
        msg = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise BadImage(f"cannot decode: {type(exc).__name__}: {msg}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise BadImage(f"cannot decode: unexpected pixel array of shape {arr.shape}")
    return arr


def _to_rgb(im: Image.Image, icc: bytes | None, notes: list[str]) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB in sRGB by the embedded profile ``icc`` (None: the numbers
    are sRGB; the reason it cannot be applied goes to ``notes``), compositing transparency on
    white."""
    if im.mode == "F":  # TIFF's 32-bit float samples: no range to read them in (0..1? 0..255?)
        raise BadImage("floating-point pixels (mode F): save it with 8- or 16-bit samples")
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit samples: divide by 257 so 65535 -> 255 and 32768 -> 128 (convert("L") clips).
        # Mode "I" from files holds 16-bit data (PNG/TIFF), so the same scale applies.
        wide = np.asarray(im, dtype=np.float64)
        lo, hi = (wide.min(), wide.max()) if wide.size else (0, 0)
        if lo < 0 or hi > 65535:  # a TIFF's 32-bit or signed samples: clipped, all white
            raise BadImage(
                f"32-bit or signed integer pixels (mode I, values {lo:.0f}..{hi:.0f}): save "
                "it with 8- or 16-bit samples"
            )
        gray = Image.fromarray(np.rint(np.clip(wide, 0, 65535) / 257.0).astype(np.uint8), mode="L")
        if isinstance(im.info.get("transparency"), int):
            # A 16-bit grey PNG's tRNS: the pixels of exactly that value are transparent.
            opaque = (wide != im.info["transparency"]).astype(np.uint8) * 255
            gray.putalpha(Image.fromarray(opaque, mode="L"))
        im = gray
    if icc:
        try:
            im = to_srgb(im, icc)
        except ProfileNotApplied as exc:
            notes.append(exc.reason)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    if not has_alpha:
        return im if im.mode == "RGB" else im.convert("RGB")
    rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
    alpha = rgba[..., 3:4]
    # Straight-alpha "over" a white background, rounded: c*a + 255*(255-a), / 255.
    rgb = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8), mode="RGB")


def _centre_square(im: Image.Image, size: int) -> Image.Image:
    """Largest central square of ``im``, resized with antialiasing to ``size`` x ``size``."""
    width, height = im.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # Crop first: resize(box=...) would also sample pixels outside the box near its edges.
    # Pillow widens the bicubic kernel by the scale factor when shrinking: antialiased.
    square = im.crop((left, top, left + side, top + side))
    return square.resize((size, size), Image.Resampling.BICUBIC)


def _decode_path(path: str, size: int, profiles: bool = True) -> Decoded:
    """Worker-side wrapper: ``(pixels, None, notes, (width, height))`` or ``(None, reason, [],
    None)``, never raises BadImage; ``notes``: why the file's colour profile was not applied."""
    notes: list[Skipped] = []
    source: list[tuple[int, int]] = []
    try:
        pixels = load_image(Path(path), size, profiles=profiles, notes=notes, source=source)
        return pixels, None, notes, source[0]
    except BadImage as exc:
        return None, exc.reason, [], None


Decoded = tuple[np.ndarray | None, str | None, list[Skipped], tuple[int, int] | None]


# --------------------------------------------------------------------------------------------
# Whole folders


def load_folder(
    root: str | Path,
    size: int,
    *,
    cache: str = "memory",
    cache_dir: Path | None = None,
    workers: int = 0,
    strict: bool = False,
    progress: bool = False,
    listing: Listing | None = None,
    profiles: bool = True,
) -> ImageSet:
    """Decode every image under ``root`` once into an ``(N, size, size, 3)`` uint8 array.

    ``cache``: "memory" (plain array), "disk" (a read-only ``np.memmap`` in ``cache_dir``,
    default ``~/.cache/animeddim``, reused while the folder's files, sizes and mtimes are
    unchanged) or "auto" (disk when the pixels take more than 4 GiB). ``workers``: decoding
    processes, 0 = one per CPU. Skipped files are reported with a :class:`SkippedFilesWarning`;
    with ``strict`` they raise :class:`DataError`, as does a folder with no usable image.
    Images in hidden and system folders are passed over, with a :class:`PassedOverWarning`
    counting them. ``listing``: the walk of ``root`` (`image_files.list_images`) when the
    caller has made it (training lists the folder first, for its fingerprint): the folder is
    then not walked again. ``profiles``: embedded colour profiles are applied (False:
    read as sRGB, as before they were; `load_image`), those that cannot be noted in one
    :class:`ProfileWarning`.
    """
    root = Path(root)
    if size < 1:
        raise DataError(f"image size must be a positive integer, got {size}")
    if cache not in ("memory", "disk", "auto"):
        raise DataError(f"cache must be memory, disk or auto, got {cache!r}")
    if listing is None:
        listing = list_images(root)
    files = listing.files
    rels = [p.relative_to(root).as_posix() for p in files]
    if cache == "auto":
        cache = "disk" if len(files) * size * size * 3 > AUTO_DISK_BYTES else "memory"

    if not files:
        result = ImageSet(np.empty((0, size, size, 3), np.uint8), [], [])
    elif cache == "disk":
        result = _load_disk_cached(root, files, rels, size, cache_dir, workers, progress, profiles)
    else:
        out = np.empty((len(files), size, size, 3), dtype=np.uint8)
        reasons, notes, sources = _decode_into(out, files, size, workers, progress, profiles)
        keep = _compact(out, reasons)
        images = out[:keep] if keep == len(files) else out[:keep].copy()
        result = _image_set(root, images, rels, reasons, notes, Enlarged.of(rels, sources, size))

    # HEIC photos and unreadable folders, found but not read: listed with the skipped files
    result.skipped += listing.unread_in(root)
    _check_result(root, result, len(files) + len(listing.unread), strict, listing)
    return result


def load_images(path: str | Path, size: int) -> tuple[ImageSet, Path]:
    """The images of a folder (:func:`load_folder`), or one image file as a folder holding
    only it; with the folder their paths are below (a file's own folder).

    A file is read as a folder's files are: it needs an image extension (else
    :class:`DataError`, as a folder would not look at it), and one that cannot be decoded is
    a :class:`DataError` with the reason a folder's skip note gives.
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):  # not "image folder 'a.png'": either was meant
        raise DataError(f"'{shown(str(path))}' does not exist (an image file or folder)")
    if path.is_dir() or not (path.is_file() or path.is_symlink()):
        return load_folder(path, size), path  # a folder
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(
            f"'{shown(str(path))}' is not an image file: images have the extensions "
            f"{', '.join(IMAGE_EXTENSIONS)}"
        )
    if size < 1:
        raise DataError(f"image size must be a positive integer, got {size}")
    pixels, reason, notes, source = _decode_path(str(path), size)
    if pixels is None:
        raise DataError(f"no usable image in '{shown(str(path))}': {reason}")
    if notes:
        warnings.warn(unconverted_note(notes), ProfileWarning, stacklevel=2)
    images = np.empty((1, size, size, 3), dtype=np.uint8)  # writable, as a folder's are
    images[0] = pixels
    enlarged = Enlarged.of([path.name], [source], size)
    return ImageSet(images, [str(path)], unconverted=notes, enlarged=enlarged), path.parent


def _decode_into(
    out: np.ndarray, files: Sequence[Path], size: int, workers: int, progress: bool, profiles: bool
) -> tuple[list[str | None], list[Skipped], list[tuple[int, int] | None]]:
    """Decode ``files`` into rows of ``out``; returns per file None (ok) or the skip reason,
    the files whose colour profile was not applied (`load_image`) and per file its upright
    width x height (None: skipped)."""
    reasons: list[str | None] = [None] * len(files)
    sources: list[tuple[int, int] | None] = [None] * len(files)
    notes: list[Skipped] = []
    workers = workers or os.cpu_count() or 1
    # A process pool costs ~0.3 s to start; not worth it for a handful of files.
    workers = min(workers, max(1, len(files) // 16))
    bar = tqdm(total=len(files), desc="decoding", unit="img", disable=not progress)
    with bar:
        if workers > 1:
            try:
                ctx = _pool_context()
                chunk = max(1, min(64, len(files) // (workers * 4)))
                with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                    paths, n = [str(p) for p in files], len(files)
                    results = pool.map(
                        _decode_path, paths, [size] * n, [profiles] * n, chunksize=chunk
                    )
                    _fill(out, (reasons, notes, sources), results, bar)
                return reasons, notes, sources
            except concurrent.futures.process.BrokenProcessPool as exc:
                # Workers die at start-up when __main__ cannot be re-imported (a script piped
                # on stdin, a missing `if __name__ == "__main__":` guard): decode here instead.
                warnings.warn(f"decoding in one process: worker pool failed ({exc})", stacklevel=3)
                bar.reset()
        decoded = (_decode_path(str(p), size, profiles) for p in files)
        _fill(out, (reasons, notes, sources), decoded, bar)
    return reasons, notes, sources


def _pool_context() -> multiprocessing.context.BaseContext:
    """forkserver where available, else spawn: never plain fork, because the parent may hold
    torch/OpenMP threads whose locks a forked child would inherit in a locked state."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _fill(
    out: np.ndarray, found: tuple[list, list, list], results: Iterator[Decoded], bar: tqdm
) -> None:
    """Each of ``results`` into its row of ``out`` and ``found`` (`_decode_into`'s lists)."""
    reasons, notes, sources = found
    for i, (pixels, reason, unconverted, source) in enumerate(results):
        notes += unconverted
        if pixels is None:
            reasons[i] = reason
        else:
            out[i], sources[i] = pixels, source
        bar.update(1)


def _compact(out: np.ndarray, reasons: list[str | None]) -> int:
    """Move the good rows of ``out`` to the front, in order; returns how many there are."""
    keep = 0
    for i, reason in enumerate(reasons):
        if reason is None:
            if i != keep:
                out[keep] = out[i]
            keep += 1
    return keep


def _image_set(
    root: Path,
    images: np.ndarray,
    rels: list[str],
    reasons: list[str | None],
    unconverted: list[Skipped],
    enlarged: Enlarged,
) -> ImageSet:
    paths = [str(root / rel) for rel, r in zip(rels, reasons, strict=True) if r is None]
    skipped = [
        Skipped(str(root / rel), r) for rel, r in zip(rels, reasons, strict=True) if r is not None
    ]
    return ImageSet(images, paths, skipped, unconverted, enlarged)


def _check_result(root: Path, result: ImageSet, tried: int, strict: bool, listing: Listing) -> None:
    """Raise for no usable image or strict skips; otherwise warn about skips and about what
    was passed over."""
    skipped = result.skipped
    if len(result.paths) == 0:
        if tried == 0:
            passed = f" ({passed_over_note(listing)})" if listing.passed_over else ""
            raise DataError(
                f"no usable image in folder '{root}': no files with extensions "
                f"{', '.join(IMAGE_EXTENSIONS)} found{passed}"
            )
        first = f" (first: {shown(skipped[0].path)}: {skipped[0].reason})" if skipped else ""
        if any(s.path.endswith("/") for s in skipped):  # an unreadable folder is no file tried
            raise DataError(f"no usable image in folder '{root}': {skip_summary(skipped, tried)}")
        raise DataError(
            f"no usable image in folder '{root}': {n_files(tried)} tried, "
            f"{len(skipped)} skipped{first}"
        )
    if skipped and strict:
        raise DataError(f"--strict: {skip_summary(skipped, tried)}")
    if skipped:
        warnings.warn(skip_summary(skipped, tried), SkippedFilesWarning, stacklevel=3)
    if result.unconverted:
        warnings.warn(unconverted_note(result.unconverted), ProfileWarning, stacklevel=3)
    note_passed_over(listing)


def note_passed_over(listing: Listing) -> None:
    """A :class:`PassedOverWarning` saying what a folder walk passed over, if anything."""
    if listing.passed_over:
        warnings.warn(passed_over_note(listing), PassedOverWarning, stacklevel=4)


def _load_disk_cached(
    root: Path,
    files: list[Path],
    rels: list[str],
    size: int,
    cache_dir: Path | None,
    workers: int,
    progress: bool,
    profiles: bool,
) -> ImageSet:
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(root, rels, files, size, profiles)
    data_path, meta_path = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
    row = size * size * 3

    cached = read_cache(data_path, meta_path, key, size)
    if cached is not None:
        images, reasons, unconverted, enlarged = cached
        notes = [Skipped(str(root / rel), reason) for rel, reason in unconverted]
        return _image_set(root, images, rels, reasons, notes, enlarged)

    # Decode straight into a file-backed array (the data may not fit in memory), then publish it
    # with an atomic rename, and the metadata last: a crash leaves no half-valid cache entry.
    tmp = temp_path(data_path)  # ".KEY.u8.tmp-PID": a name io.is_temp_name knows
    try:
        mm = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(len(files), size, size, 3))
        reasons, notes, sources = _decode_into(mm, files, size, workers, progress, profiles)
        enlarged = Enlarged.of(rels, sources, size)
        keep = _compact(mm, reasons)
        mm.flush()
        del mm
        os.truncate(tmp, keep * row)
        if keep:
            os.replace(tmp, data_path)
            meta = {"key": key, "size": size, "count": keep, "reasons": reasons}
            meta["unconverted"] = [
                [Path(s.path).relative_to(root).as_posix(), s.reason] for s in notes
            ]
            meta["enlarged"] = enlarged.to_json()
            try:
                write_text_atomic(meta_path, json.dumps(meta))
            except BaseException:  # a full disk: the pixels, unread without it, give space back
                data_path.unlink(missing_ok=True)
                raise
    finally:
        if tmp.exists():
            tmp.unlink()
    if not keep:
        empty = np.empty((0, size, size, 3), np.uint8)
        return _image_set(root, empty, rels, reasons, notes, enlarged)
    images = np.memmap(data_path, dtype=np.uint8, mode="r", shape=(keep, size, size, 3))
    return _image_set(root, images, rels, reasons, notes, enlarged)


# --------------------------------------------------------------------------------------------
# Splits, statistics and batches


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation split of ``range(n)``; returns ``(train, val)``.

    Validation is the first ``round(n * val_fraction)`` entries of a seeded permutation, at
    least 1 when ``val_fraction > 0`` and ``n >= 2``, leaving at least 1 for training. Both are
    sorted int64 arrays; together they are a partition of ``range(n)``.
    """
    if n < 1:
        raise DataError(f"cannot split {n} images: need at least 1")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def channel_stats(images: np.ndarray, indices: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of ``images[indices] / 255``, each in [0, 1].

    ``images`` is ``(N, H, W, 3)`` uint8. Sums are exact integers over chunks of ~64 MB, so a
    memmap of many GB is read once without loading it whole.
    """
    indices = np.sort(np.asarray(indices, dtype=np.int64))  # sorted: sequential memmap reads
    if len(indices) == 0:
        raise DataError("channel_stats needs at least one image")
    per_image = int(np.prod(images.shape[1:]))
    chunk = max(1, (64 * 1024**2) // per_image)
    total = np.zeros(3, dtype=np.int64)
    total_sq = np.zeros(3, dtype=np.int64)
    for start in range(0, len(indices), chunk):
        block = np.asarray(images[indices[start : start + chunk]]).reshape(-1, 3)
        total += block.sum(axis=0, dtype=np.int64)
        wide = block.astype(np.int64)
        total_sq += np.einsum("ij,ij->j", wide, wide)
    count = len(indices) * per_image // 3
    mean = total / count
    var = np.maximum(total_sq / count - mean * mean, 0.0)
    return (mean / 255.0).tolist(), (np.sqrt(var) / 255.0).tolist()
