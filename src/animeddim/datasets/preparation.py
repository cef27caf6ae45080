"""``prepare``: an archive or folder of images -> a folder of square PNGs and a manifest."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from tqdm import tqdm

from animeddim.data import (
    BadImage,
    DataError,
    Listing,
    ProfileWarning,
    Skipped,
    SkippedFilesWarning,
    _decode,
    _pool_context,
    n_files,
    note_passed_over,
    passed_over_note,
    shown,
    skip_summary,
    unconverted_note,
)
from animeddim.enlarged import Enlarged
from animeddim.io import is_temp_name, png_bytes, write_bytes_atomic, write_text_atomic
from animeddim.words import counted

from .archives import Member, read_members
from .common import (
    MANIFEST,
    PENDING,
    SPLIT_UNDER_WAY,
    check_out_creatable,
    output_index,
    output_name,
    read_json,
    split_refusal,
    unfinished_split_refusal,
    write_manifest,
)


class _Prepared(NamedTuple):
    """One member prepared: its PNG (None when skipped, ``reason`` saying why), why its
    colour profile was not applied, its width x height as shown upright, and the digest of
    its prepared pixels."""

    png: bytes | None
    reason: str | None
    notes: list[str]
    source_size: tuple[int, int] = (0, 0)
    digest: str = ""


def _prepare_one(data: bytes, size: int) -> _Prepared:
    """Decode, centre-crop and resize one image (see :class:`_Prepared`)."""
    notes: list[str] = []
    source: list[tuple[int, int]] = []
    try:
        pixels = _decode(data, size, notes=notes, source=source)
    except BadImage as exc:
        return _Prepared(None, exc.reason, [])
    # Duplicates are told by the prepared pixels, not by the source's bytes: the same bytes
    # always prepare to the same pixels, so every byte-for-byte copy is found, and so are
    # copies whose bytes differ but not their pixels (the same picture saved again with other
    # metadata, compression or without its EXIF; a PNG and a lossless WebP of it). What trains
    # twice, and leaks into a held-out set, is the pixels, not the file.
    digest = hashlib.sha256(pixels.tobytes()).hexdigest()
    return _Prepared(png_bytes(pixels), None, notes, source[0], digest)


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
    src: str | Path,
    out: str | Path,
    size: int = 64,
    *,
    workers: int | None = None,
    progress: bool = False,
) -> Path:
    """Turn an archive (.zip/.tar/.tgz/.tar.gz) or folder of images into ``out/{i:06d}.png``.

    Each image is centre-cropped to its largest square and resized to ``size`` exactly as
    :func:`animeddim.data.load_image` does; outputs are numbered 0, 1, ... over the usable images
    in archive order (sorted path order for a folder). Members are read into memory one by one,
    never extracted by name, so '..' or absolute member paths cannot write outside ``out``.
    Skipped members are warned about; no usable image raises :class:`DataError`. An image whose
    prepared pixels repeat an earlier one's is left out (``duplicate_of`` in the manifest:
    left-out member -> the one kept); the images smaller than ``size``, enlarged, are counted
    there too (``enlarged``, ``smallest_enlarged``; :func:`prepared_notes` says both). A
    name an archive holds more than once (appended to) is prepared from its last member, as
    extracting it does (the earlier ones counted in ``replaced``).
    Re-running with the same source and size returns at once. An existing ``out`` must be
    empty, or hold what a prepare of the same source and size wrote there (finished, or
    interrupted: done again, from its first member); anything else raises
    :class:`DataError`. ``progress``: a tqdm bar on stderr, one step per member read. Returns
    ``out``.
    """
    src, out = Path(src), Path(out)
    wanted = _check_prepare(src, out, size)
    if wanted is None:
        return out  # same archive, same size: already done
    manifest_path, pending_path = out / MANIFEST, out / PENDING
    out.mkdir(parents=True, exist_ok=True)
    interrupted = pending_path.is_file()  # an earlier call's images may lie here
    write_text_atomic(pending_path, json.dumps(wanted))

    workers = max(1, workers or os.cpu_count() or 1)
    written = 0  # images a first pass wrote, when a second one is needed
    passed: dict[str, int] = {}  # images in hidden or system folders, not prepared
    members, total = read_members(src, passed)
    with tqdm(total=total, desc="prepare", unit="img", disable=not progress) as bar:
        tally = _prepare_members(members, out, size, workers, bar)
    if tally.superseded:
        # A name repeats (an archive appended to: `tar -r`, `tar -u`): extracting it keeps
        # the last member of each name, so that one alone is prepared. Which members come
        # later is known only at the end of a stream: prepared again, without the others.
        passed, superseded, written = {}, tally.superseded, tally.count
        members, total = read_members(src, passed)
        with tqdm(total=total, desc="prepare again", unit="img", disable=not progress) as bar:
            tally = _prepare_members(members, out, size, workers, bar, superseded)
    count, tried, skipped, unconverted = tally.count, tally.tried, tally.skipped, tally.unconverted

    passed = dict(sorted(passed.items()))  # by folder, as a folder walk gives them
    if count == 0:
        # Nothing written here by an interrupted call; by this one, only a first pass's images
        # (the last member of each repeated name unusable), into a folder that held none.
        if not interrupted and not (written and manifest_path.exists()):
            for i in range(written):
                (out / output_name(i)).unlink(missing_ok=True)
            pending_path.unlink(missing_ok=True)  # the folder is as it was
        first = f" (first: {shown(skipped[0].path)}: {skipped[0].reason})" if skipped else ""
        also = f"; {passed_over_note(Listing([], passed))}" if passed else ""
        raise DataError(
            f"no usable image in '{src}': {n_files(tried)} tried, {len(skipped)} skipped"
            f"{first}{also}"
        )
    # Files from an earlier run of this source that had more usable images would mix in.
    for stale in out.iterdir():
        if (i := output_index(stale.name)) is not None and i >= count:
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
        **tally.manifest(),
    }
    write_manifest(manifest_path, manifest)
    pending_path.unlink(missing_ok=True)
    return out


def _check_prepare(src: Path, out: Path, size: int) -> dict[str, Any] | None:
    """The source id (:func:`_source_id`) a prepare of ``src`` into ``out`` records, or None
    when ``out`` holds a finished prepare of the same archive at this size; DataError for a
    missing source, a bad size or an ``out`` it may not write into."""
    if not src.exists():
        raise DataError(f"source '{src}' does not exist")
    if size < 1:
        raise DataError(f"image size must be a positive integer, got {size}")
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise DataError(f"output folder '{out}' must not be inside the source folder '{src}'")
    check_out_creatable(out)
    if (refused := unfinished_split_refusal(out)) is not None:
        raise DataError(refused)  # a data split's held-out folder, part-filled
    wanted = _source_id(src, size)
    # The manifest says a prepare finished here, the pending file that one was interrupted;
    # without either, numbered PNGs are someone's own files (video frames, 000000.png ...).
    finished = read_json(out / MANIFEST)
    previous = finished or read_json(out / PENDING)
    if previous is not None:
        if any(previous.get(k) != wanted[k] for k in ("source", "size")):
            raise DataError(
                f"folder '{out}' already holds images prepared from {previous.get('source')} at "
                f"size {previous.get('size')}; use another folder"
            )
        done = finished and {k: finished.get(k) for k in wanted} == wanted
        if done and src.is_file() and SPLIT_UNDER_WAY not in finished:
            return None  # done (and perhaps split since: kept as it is; one under way is not)
        if (refused := split_refusal(out, finished)) is not None:
            raise DataError(refused)
    elif out.exists() and any(not is_temp_name(p.name) for p in out.iterdir()):
        raise DataError(
            f"folder '{out}' is not empty (it holds files animeddim did not prepare there); "
            "prepare into a new or empty folder"
        )
    return wanted


@dataclass
class _Tally:
    """What a prepare made of its source's members."""

    count: int = 0  # images written, 000000.png ...
    tried: int = 0  # members read or noted
    skipped: list[Skipped] = field(default_factory=list)
    unconverted: list[Skipped] = field(default_factory=list)  # profile not applied
    enlarged: Enlarged = field(default_factory=Enlarged)  # images written, enlarged
    first_of: dict[str, str] = field(default_factory=dict)  # pixel digest -> member
    duplicates: dict[str, str] = field(default_factory=dict)  # member left out -> earlier one
    # members in stream order by name: a name met again supersedes its earlier members
    places: dict[str, list[int]] = field(default_factory=dict)
    replaced: dict[str, int] = field(default_factory=dict)  # name -> earlier members left out

    @property
    def superseded(self) -> frozenset[int]:
        """The places of the members a later one of the same name supersedes."""
        return frozenset(k for at in self.places.values() for k in at[:-1])

    def add(self, name: str, done: _Prepared, out: Path, size: int) -> None:
        """Write member ``name`` as the next image, unless it was skipped or repeats the
        pixels of an earlier one."""
        self.unconverted += [Skipped(name, note) for note in done.notes]
        if done.png is None:
            self.skipped.append(Skipped(name, done.reason or ""))
            return
        if (first := self.first_of.setdefault(done.digest, name)) != name:
            self.duplicates[name] = first
            return
        write_bytes_atomic(out / output_name(self.count), done.png)
        self.count += 1
        self.enlarged.add(*done.source_size, name, size)

    def manifest(self) -> dict[str, Any]:
        """The manifest's record of the enlarged images and the duplicates left out."""
        return {
            "enlarged": self.enlarged.count,
            **({"smallest_enlarged": list(self.enlarged.smallest)} if self.enlarged.count else {}),
            "duplicates": len(self.duplicates),
            **({"duplicate_of": self.duplicates} if self.duplicates else {}),
            **({"replaced": self.replaced} if self.replaced else {}),
        }


def _prepare_members(
    members: Iterator[Member],
    out: Path,
    size: int,
    workers: int,
    bar: tqdm,
    superseded: frozenset[int] = frozenset(),
) -> _Tally:
    """Prepare each member into ``out`` in turn (``workers`` processes), a step of ``bar``
    each, but those at the places (in stream order) ``superseded`` names (left out, counted
    in ``replaced``)."""
    tally = _Tally()
    members = _placed(members, tally, superseded, bar)
    pool = (
        concurrent.futures.ProcessPoolExecutor(workers, mp_context=_pool_context())
        if workers > 1
        else None
    )
    try:
        # Work in windows so memory holds at most a few hundred encoded images at once.
        for window in _windows(members, 64 * workers):
            tally.tried += len(window)
            todo = [(name, data) for name, data, _ in window if data is not None]
            tally.skipped += [
                Skipped(name, why or "") for name, data, why in window if data is None
            ]
            bar.update(len(window) - len(todo))
            blobs = [data for _, data in todo]
            results = (
                pool.map(_prepare_one, blobs, [size] * len(blobs), chunksize=8)
                if pool is not None
                else (_prepare_one(b, size) for b in blobs)
            )
            for (name, _), done in zip(todo, results, strict=True):
                bar.update(1)
                tally.add(name, done, out, size)
    finally:
        if pool is not None:
            pool.shutdown()
    return tally


def _placed(
    members: Iterator[Member], tally: _Tally, superseded: frozenset[int], bar: tqdm
) -> Iterator[Member]:
    """``members`` but those at the places ``superseded`` names (a step of ``bar`` each), each
    member's place recorded under its name in ``tally.places``, each left out in
    ``tally.replaced``."""
    for place, member in enumerate(members):
        # './a.png' and 'a.png' are one file once extracted
        tally.places.setdefault(PurePosixPath(member[0]).as_posix(), []).append(place)
        if place in superseded:
            tally.replaced[member[0]] = tally.replaced.get(member[0], 0) + 1
            bar.update(1)
            continue
        yield member


def prepared_notes(manifest: dict[str, Any]) -> list[str]:
    """The notes a prepare's ``manifest`` gives at its end, one line each: the images smaller
    than its size, enlarged, and the duplicates left out (none for a manifest written before
    they were recorded)."""
    notes, size = [], manifest.get("size")
    if enlarged := manifest.get("enlarged", 0):
        record = Enlarged.from_json([enlarged, *manifest["smallest_enlarged"]])
        notes.append(record.note(size, "--size"))
    if duplicates := manifest.get("duplicate_of", {}):
        pairs = [f"{shown(d)} = {shown(first)}" for d, first in list(duplicates.items())[:3]]
        more = ", ..." if len(duplicates) > 3 else ""
        notes.append(
            f"left out {counted(len(duplicates), 'duplicate')}: "
            f"{'its' if len(duplicates) == 1 else 'their'} pixels repeat an earlier image's "
            f"(trained twice, and leaked into a held-out set): {', '.join(pairs)}{more}"
        )
    if replaced := manifest.get("replaced", {}):
        names = ", ".join(shown(name) for name in list(replaced)[:3])
        more = ", ..." if len(replaced) > 3 else ""
        left = sum(replaced.values())
        notes.append(
            f"left out {counted(left, 'archive member')} that a later member of the same name "
            f"replaces, as extracting the archive does (it was appended to): {names}{more}"
        )
    return notes


def _windows(items: Iterator[Any], n: int) -> Iterator[list[Any]]:
    window: list[Any] = []
    for item in items:
        window.append(item)
        if len(window) == n:
            yield window
            window = []
    if window:
        yield window
