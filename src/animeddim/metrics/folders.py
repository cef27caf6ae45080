"""Folder features with an on-disk cache, and folder-to-folder KID/FID."""

from __future__ import annotations

import hashlib
import json
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save

from .. import io
from ..config import ConfigError
from ..data import (
    BadImage,
    DataError,
    ProfileWarning,
    Skipped,
    SkippedFilesWarning,
    list_images,
    load_image,
    note_passed_over,
    skip_summary,
    unconverted_note,
)
from ..io import file_digest, read_safetensors
from ..words import counted
from .inception import (
    PROTOCOL_DESCRIPTIONS,
    PROTOCOLS,
    RESIZE_NAMES,
    TORCH_FIDELITY_SEED,
    FeatureExtractor,
    InceptionFeatures,
)
from .kid import (
    PAPER_SHUFFLE_SEED,
    fid_from_features,
    kid_standard,
    kid_subset_size,
    mmd2_unbiased,
    paper_order,
    warn_few_images,
)

_CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/animeddim/features`` (``~/.cache`` without it), beside the image cache."""
    return io.default_cache_dir() / "features"


def _folder_cache_key(
    folder: Path,
    files: Sequence[Path],
    protocol: str,
    extractor: FeatureExtractor,
    profiles: bool = True,
) -> str:
    """sha256 over protocol, weights identity, whether colour profiles are applied and each
    file's relative path and content hash (without profiles: the key animeddim gave before).

    Content, not mtime: a copied folder hits the cache, a rewritten file misses it.
    """
    entries = []
    for path in files:
        try:
            digest = file_digest(path)
        except OSError as e:  # unreadable or a broken link: skipped when loading, as training does
            digest = f"unreadable: {e.strerror or e}"
        entries.append([path.relative_to(folder).as_posix(), digest])
    payload = {
        "format": _CACHE_FORMAT,
        "protocol": protocol,
        "weights": extractor.cache_token,
        "files": entries,
    }
    if profiles:  # the features of images read with their colour profiles applied
        payload["colour_profiles"] = "srgb"
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _load_batches(
    folder: Path,
    files: Sequence[Path],
    batch_size: int,
    skipped: list[Skipped],
    unconverted: list[Skipped],
    profiles: bool = True,
) -> Iterator[tuple[torch.Tensor, tuple[int, int]]]:
    """Yield ([B x 3 x H x W] uint8, (H, W)); every image must share the first one's size.

    A file that does not decode is left out and appended to `skipped`, as training does; one
    whose colour profile is not applied (``profiles``: they are) goes to `unconverted`.
    """
    first: tuple[Path, tuple[int, int]] | None = None
    for start in range(0, len(files), batch_size):
        arrays = []
        for path in files[start : start + batch_size]:
            try:
                array = load_image(path, size=None, profiles=profiles, notes=unconverted)
            except BadImage as error:
                skipped.append(Skipped(str(path), error.reason))
                continue
            size = (int(array.shape[0]), int(array.shape[1]))
            if first is None:
                first = (path, size)
            elif size != first[1]:
                # torch-fidelity batches a folder as one tensor, so sizes must agree
                # (said width x height, as image viewers say them; `size` is rows, columns).
                raise DataError(_sizes_differ(folder, first, (path, size)))
            arrays.append(array)
        if arrays:
            batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
            yield batch, first[1]  # type: ignore[index]


def folder_features_with_size(
    folder: Path,
    extractor: FeatureExtractor,
    protocol: str = "standard",
    cache_dir: Path | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    profiles: bool = True,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """:func:`folder_features` plus the folders' common image size (H, W)."""
    plan = plan_folder(folder, extractor, protocol, cache_dir, profiles)
    cached = cached_features(plan)
    if cached is not None:
        return cached
    block = block_features(plan.folder, plan.files, extractor, protocol, batch_size, progress,
                           profiles)  # fmt: skip
    return finish_features(plan, extractor, [block], block.features)


@dataclass
class FolderPlan:
    """A folder to measure: its image files (sorted by relative path, so feature row i is
    stable), the folders that could not be read and its cache file."""

    folder: Path
    files: list[Path]
    unread: list[Skipped]
    protocol: str
    profiles: bool
    cache_file: Path


@dataclass
class Block:
    """The features of a run of a folder's files (`block_features`): [k x D] float64, the
    first usable image's path and size (H, W), the files skipped and those read without
    their colour profile."""

    features: torch.Tensor
    first: tuple[str, tuple[int, int]] | None
    skipped: list[Skipped]
    unconverted: list[Skipped]


def plan_folder(
    folder: Path,
    extractor: FeatureExtractor,
    protocol: str = "standard",
    cache_dir: Path | None = None,
    profiles: bool = True,
) -> FolderPlan:
    """List `folder` and find its cache file (the key reads every file's bytes).

    :raises DataError: a folder with fewer than 2 image files."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}', expected one of {PROTOCOLS}")
    folder = Path(folder)
    listing = list_images(folder)
    note_passed_over(listing)
    unread = listing.unread_in(folder)  # HEIC photos, unreadable folders: noted as skipped
    if len(listing.files) < 2:
        raise DataError(
            _too_few(folder, len(listing.files), len(listing.files) + len(unread), unread)
        )
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _folder_cache_key(folder, listing.files, protocol, extractor, profiles)
    cache_file = cache_dir / f"{protocol}-{key[:40]}.safetensors"
    return FolderPlan(folder, list(listing.files), unread, protocol, profiles, cache_file)


def cached_features(plan: FolderPlan) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """The cached features and image size of `plan`'s folder (with their notes), or None."""
    cached = _read_feature_cache(plan.cache_file)
    if cached is None:
        return None
    features, size, skipped, unconverted = cached
    _note_skipped(plan.unread + skipped, len(plan.files) + len(plan.unread), unconverted)
    _note_not_square(plan.folder, size)
    return features, size


def block_features(
    folder: Path,
    files: Sequence[Path],
    extractor: FeatureExtractor,
    protocol: str = "standard",
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    profiles: bool = True,
) -> Block:
    """The features of `files` (some of `folder`'s, in their order), in batches of
    `batch_size`; progress(done, len(files)). :raises DataError: images of two sizes."""
    chunks, skipped, unconverted = [], [], []
    size, done = None, 0
    if progress is not None:
        progress(0, len(files))
    for batch, hw in _load_batches(folder, files, batch_size, skipped, unconverted, profiles):
        size = hw  # every image's (H, W): checked by _load_batches
        chunks.append(extractor.features(batch, protocol, batch_size=batch_size))
        done += len(batch)
        if progress is not None:
            progress(done, len(files))
    if progress is not None and done < len(files):
        progress(len(files), len(files))  # skipped files count as done
    features = torch.cat(chunks).to(torch.float64) if chunks else torch.empty(0, 0)
    left_out = {s.path for s in skipped}
    first = next((str(f) for f in files if str(f) not in left_out), None)
    return Block(features, None if size is None else (first, size), skipped, unconverted)


def finish_features(
    plan: FolderPlan,
    extractor: FeatureExtractor,
    blocks: Sequence[Block],
    features: torch.Tensor,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """The folder's features from its `blocks` in file order (`features`: theirs, joined;
    a block's own may be left out) and their common image size: checked, noted and cached.
    :raises DataError: blocks of two image sizes, fewer than 2 usable images."""
    firsts = [b.first for b in blocks if b.first is not None]
    for path, hw in firsts[1:]:
        if hw != firsts[0][1]:
            raise DataError(_sizes_differ(plan.folder, firsts[0], (path, hw)))
    skipped = [s for b in blocks for s in b.skipped]
    unconverted = [s for b in blocks for s in b.unconverted]
    tried, unread = len(plan.files) + len(plan.unread), plan.unread
    if len(features) < 2:
        raise DataError(_too_few(plan.folder, len(features), tried, unread + skipped))
    _note_skipped(unread + skipped, tried, unconverted)
    features = features.to(torch.float64).contiguous()
    size = firsts[0][1]
    meta = {
        "protocol": plan.protocol,
        "weights": extractor.cache_token,
        "folder": str(plan.folder),
        "count": str(len(features)),
        "height": str(size[0]),
        "width": str(size[1]),
        "skipped": json.dumps([[s.path, s.reason] for s in skipped]),
        "unconverted": json.dumps([[s.path, s.reason] for s in unconverted]),
    }
    try:
        _save_atomic(plan.cache_file, features, meta)
    except OSError as e:  # the cache only saves time: go on without it
        warnings.warn(
            f"feature cache not written ({e.strerror or e}: "
            f"{e.filename or plan.cache_file.parent}); computed without it",
            CacheWarning,
            stacklevel=2,
        )
    _note_not_square(plan.folder, size)
    return features, size


class NotSquareWarning(UserWarning):
    """A folder's images are not square: Inception sees them squashed, not centre-cropped."""


def _note_not_square(folder: Path, size: tuple[int, int]) -> None:
    """Say so when a folder's images are not square: both protocols resize an image whole to
    Inception's square (torch-fidelity's rule), while training and sampling use centre
    squares, so a folder of 178x218 photos measured against a model's samples compares
    squashed faces with unsquashed ones."""
    h, w = size
    if h and w and h != w:
        warnings.warn(
            f"the images of '{folder}' are {w}x{h}, not square: they are resized whole for "
            "Inception (squashed, as torch-fidelity does), not centre-cropped as training "
            f"reads them; for a like-for-like reference make square copies (animeddim data "
            f"prepare '{folder}' --out NEW --size {min(h, w)})",
            NotSquareWarning,
            stacklevel=3,
        )


class CacheWarning(UserWarning):
    """The feature cache could not be read or written; the features were computed anyway."""


def _sizes_differ(folder: Path, first: tuple, other: tuple) -> str:
    """Two (path, (H, W)) of one folder in two sizes, said width x height (as image viewers
    say them): torch-fidelity batches a folder as one tensor, so sizes must agree."""
    (a, (ha, wa)), (b, (hb, wb)) = first, other
    return (
        f"images in '{folder}' differ in size: '{a}' is {wa}x{ha}, '{b}' is {wb}x{hb}; KID and "
        "FID compare folders of one image size (resize them, e.g. with "
        "`animeddim data prepare FOLDER --out NEW --size N`)"
    )


def _too_few(folder: Path, usable: int, found: int, skipped: Sequence[Skipped] = ()) -> str:
    detail = skip_summary(skipped, found) if skipped else f"{counted(found, 'image file')} found"
    return f"KID and FID need at least 2 images, '{folder}' has {usable} usable ({detail})"


def _note_skipped(
    skipped: Sequence[Skipped], tried: int, unconverted: Sequence[Skipped] = ()
) -> None:
    """The notes on the files skipped, and on those read without their colour profile."""
    if skipped:
        warnings.warn(skip_summary(skipped, tried), SkippedFilesWarning, stacklevel=3)
    if unconverted:
        warnings.warn(unconverted_note(unconverted), ProfileWarning, stacklevel=3)


def _read_feature_cache(
    cache_file: Path,
) -> tuple[torch.Tensor, tuple[int, int], list[Skipped], list[Skipped]] | None:
    """Features, image size, skipped files and those read without their colour profile from a
    cache entry; None when there is none.

    A damaged entry (truncated, foreign, rows missing) counts as none: it is computed again
    and replaced, with a warning.
    """
    if not cache_file.is_file():
        return None
    try:
        tensors, meta = read_safetensors(cache_file)
        features = tensors["features"]
        size = (int(meta["height"]), int(meta["width"]))
        skipped = [Skipped(p, r) for p, r in json.loads(meta.get("skipped", "[]"))]
        unconverted = [Skipped(p, r) for p, r in json.loads(meta.get("unconverted", "[]"))]
        if features.ndim != 2 or len(features) != int(meta["count"]):
            raise ValueError(f"{len(features)} rows, {meta['count']} expected")
    except Exception as e:  # noqa: BLE001 - any damage means: compute again
        warnings.warn(
            f"feature cache file '{cache_file}' is damaged ({type(e).__name__}); computed again",
            CacheWarning,
            stacklevel=3,
        )
        return None
    return features, size, skipped, unconverted


def folder_features(
    folder: Path,
    extractor: FeatureExtractor,
    protocol: str = "standard",
    cache_dir: Path | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    profiles: bool = True,
) -> torch.Tensor:
    """Inception features of every image in a folder, cached on disk.

    Images come from ``animeddim.data.find_images`` (sorted) and ``load_image(size=None)``; all
    must share one size. The cache key hashes the protocol, the weights (name, size), whether
    colour profiles are applied and every file's relative path and bytes, so a second call on
    unchanged content runs no network.

    :param folder: image folder.
    :param extractor: an :class:`InceptionFeatures`.
    :param protocol: "standard" (299 px TF1 resize) or "paper" (75 px).
    :param cache_dir: where safetensors files go; default ``~/.cache/animeddim/features``.
    :param progress: called with (images done, total) while features are computed (not on
        a cache hit).
    :param profiles: the images' embedded colour profiles are applied (False: their numbers
        read as sRGB, as animeddim read them before; a run started then measures so).
    :return: [N x 2048] float64 features in sorted file order.
    """
    features, _ = folder_features_with_size(
        folder, extractor, protocol, cache_dir, batch_size, progress, profiles
    )
    return features


def _save_atomic(path: Path, features: torch.Tensor, meta: dict[str, str]) -> None:
    """Write to a temporary file beside ``path`` and rename, so readers never see half a file."""
    io.write_bytes_atomic(path, st_save({"features": features}, metadata=meta))


def kid_folders(
    dir_a: str | Path,
    dir_b: str | Path,
    protocol: str = "standard",
    *,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    cache_dir: Path | None = None,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = TORCH_FIDELITY_SEED,
    extractor: FeatureExtractor | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """KID (and FID for "standard") between two image folders, with the protocol beside it.

    "standard": torch-fidelity subsets (``dir_a`` is input 1). "paper": each folder is shuffled
    with a fixed seed (`paper_order`, seeds PAPER_SHUFFLE_SEED and PAPER_SHUFFLE_SEED + 1, so
    that two folders laid out alike are not paired file by file), the two are zipped
    (truncated to the shorter) into batches of ``batch_size`` pairs, the remainder dropped
    like the Keras example's ``drop_remainder=True`` (one short batch if fewer pairs than a
    batch), and the per-batch KIDs averaged.

    :param dir_a: reference (real) images.
    :param dir_b: generated images.
    :param device: auto | cpu | cuda | cuda:N | mps, where Inception runs.
    :param batch_size: images per Inception batch; "paper": also the KID batch.
    :param subsets, subset_size: "standard": KID over `subsets` random subsets of
        min(subset_size, n_a, n_b) images of each folder.
    :param extractor: a ready extractor (skips loading ``weights``).
    :param progress: called with (stage, images done, total) while features are computed
        (not for a folder whose features are cached), stages "features (first folder)" and
        "features (second folder)".
    :return: JSON-able dict: protocol, protocol_description, kid_mean, kid_std (standard),
        fid (standard), n_a, n_b, subsets, subset_size, image_size_a/b, resize, weights,
        feature_dim.
    :raises ConfigError: an unknown protocol or device, batch_size or subsets < 1, or
        subset_size < 2 (subsets 0 gave a NaN KID). DataError: a folder with under 2
        usable images.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol '{protocol}', expected one of {PROTOCOLS}")
    for name, value, least in [("batch_size", batch_size, 1), ("subsets", subsets, 1),
                               ("subset_size", subset_size, 2)]:  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
    if extractor is None:
        from ..runtime import resolve_device

        dev = (
            device
            if isinstance(device, torch.device)
            else resolve_device(device, host_memory=False)
        )
        extractor = InceptionFeatures(weights, dev)
    f_a, size_a = folder_features_with_size(
        Path(dir_a), extractor, protocol, cache_dir, batch_size, _stage(progress, "first")
    )
    f_b, size_b = folder_features_with_size(
        Path(dir_b), extractor, protocol, cache_dir, batch_size, _stage(progress, "second")
    )
    result: dict = {
        "protocol": protocol,
        "protocol_description": PROTOCOL_DESCRIPTIONS[protocol],
        "n_a": len(f_a),
        "n_b": len(f_b),
        "image_size_a": list(size_a),
        "image_size_b": list(size_b),
        "resize": RESIZE_NAMES[protocol],
        "weights": extractor.weights_id,
        "feature_dim": int(f_a.shape[1]),
    }
    if protocol == "standard":
        used = kid_subset_size(len(f_a), len(f_b), subset_size)
        kid_mean, kid_std = kid_standard(f_a, f_b, subsets, subset_size, seed)
        result |= {
            "kid_mean": kid_mean,
            "kid_std": kid_std,
            "fid": fid_from_features(f_a, f_b),
            "subsets": subsets,
            "subset_size": used,
            "seed": seed,
            # a caution where a set is small (also warned): the values are as computed
            "notes": warn_few_images(
                [(len(f_a), f"images in '{dir_a}'"), (len(f_b), f"images in '{dir_b}'")]
            ),
        }
        return result
    f_a = f_a[paper_order(len(f_a), PAPER_SHUFFLE_SEED)]
    f_b = f_b[paper_order(len(f_b), PAPER_SHUFFLE_SEED + 1)]
    pairs = min(len(f_a), len(f_b))
    per_batch = min(batch_size, pairs)
    starts = range(0, pairs - per_batch + 1, per_batch)
    kids = [mmd2_unbiased(f_a[s : s + per_batch], f_b[s : s + per_batch]) for s in starts]
    result |= {"kid_mean": float(np.mean(kids)), "subsets": len(kids), "subset_size": per_batch}
    return result


def _stage(progress: Callable[[str, int, int], None] | None, which: str):
    """progress(stage, done, total) -> a (done, total) callback for one folder's features."""
    if progress is None:
        return None
    return lambda done, total: progress(f"features ({which} folder)", done, total)
