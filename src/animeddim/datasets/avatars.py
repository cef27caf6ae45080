"""The built-in DiceBear "adventurer" avatars: rendered, labelled and credited in a folder."""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import json
import os
from importlib.resources import files
from pathlib import Path
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
from animeddim.data import DataError, _decode, _pool_context, list_images
from animeddim.io import is_temp_name, save_png, write_text_atomic
from animeddim.words import counted

from .common import (
    CREDITS,
    MANIFEST,
    PENDING,
    avatar_index,
    avatar_name,
    check_out_creatable,
    read_json,
    split_refusal,
    unfinished_split_refusal,
    write_manifest,
)

AVATAR_STYLE = "adventurer"

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
        save_png(Path(out) / avatar_name(i), pixels)
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
    check_out_creatable(out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = _avatar_manifest(n, size, seed, balanced)
    manifest_path, pending_path = out / MANIFEST, out / PENDING
    names = [avatar_name(i) for i in range(n)]

    manifest = read_json(manifest_path)
    for refused in (unfinished_split_refusal(out), split_refusal(out, manifest)):
        if refused is not None:
            raise DataError(refused)
    for previous in (manifest, read_json(pending_path)):
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
        _check_only_avatars(out, size, n)

    # Record the arguments first, so an interrupted run is resumed only with the same ones
    # (atomically: a note cut short by a full disk, unreadable, let the next call render
    # into a folder of other files, which the note's absence has it refuse).
    write_text_atomic(pending_path, json.dumps(wanted))
    missing = [i for i, name in enumerate(names) if not (out / name).exists()]
    _render_missing(out, seed, size, missing, workers, progress, balanced)
    _write_labels(out, names, seed, size, balanced, progress)
    write_text_atomic(out / CREDITS, _credits_text())
    # The manifest is written last: its presence means every image is complete.
    write_manifest(manifest_path, wanted)
    pending_path.unlink()
    return out


def avatars_on_disk(out: str | Path, n: int) -> tuple[int, int]:
    """What folder ``out`` holds now: (how many of the set's first ``n`` avatars, how many
    other images, which a run on the folder reads too); (0, 0) for no folder."""
    out = Path(out)
    if not out.is_dir():
        return 0, 0
    names = {avatar_name(i) for i in range(n)}
    files = [p.relative_to(out).as_posix() for p in list_images(out).files]
    ours = sum(f in names for f in files)
    return ours, len(files) - ours


def _check_only_avatars(out: Path, size: int, n: int) -> None:
    """Without a manifest, accept only leftovers of an avatar run of this size among the
    first ``n`` (else DataError): one numbered past them would stay in the folder, read by a
    run on it, without a row in labels.csv."""
    past = []
    for path in out.iterdir():
        if path.name in (CREDITS, LABELS_FILE) or is_temp_name(path.name):
            continue
        if (i := avatar_index(path.name)) is None:
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
        if i >= n:
            past.append(i)
    if past:
        past.sort()
        names = [avatar_name(i) for i in past]
        shown = ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]}"
        them = "it" if len(past) == 1 else "them"
        raise DataError(
            f"folder '{out}' holds {counted(len(past), 'avatar')} numbered past --n {n} "
            f"({shown}), left by an earlier set whose manifest.json is gone; a run on the "
            f"folder would read {them} without a row in labels.csv: use a new folder, or "
            f"--n {past[-1] + 1} to take {them} into this set"
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
