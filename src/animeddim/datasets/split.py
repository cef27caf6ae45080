"""``split_held_out``: move a seeded random choice of a folder's images into a held-out folder.

Each image is moved by a rename (on one file system; across two, copied then removed), so it
is always in one of the two folders, never in none. The plan (which images, from where) is
written into the held-out folder before the first move; a split stopped part-way (Ctrl-C, a
kill, a full disk) is finished by the same command run again. Each folder keeps a
``labels.csv`` of its own images, a ``manifest.json`` that says what was split and a copy
of a ``CREDITS.md``.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from animeddim.avatar_labels import LABELS_FILE
from animeddim.data import DataError, list_images
from animeddim.io import is_temp_name, write_bytes_atomic, write_text_atomic
from animeddim.labels import canonical, read_csv_rows
from animeddim.words import counted

from .common import (
    CREDITS,
    MANIFEST,
    PENDING,
    PLAN,
    SPLIT_UNDER_WAY,
    check_out_creatable,
    finish_split_command,
    read_json,
    unfinished_split_refusal,
    write_manifest,
)


def split_held_out(
    folder: str | Path, out: str | Path, n: int, *, seed: int = 0, progress: bool = False
) -> list[str]:
    """Move ``n`` of the images of ``folder`` (chosen at random by ``seed``: the same folder
    and seed, the same choice) into the new folder ``out``, at the same paths below it.

    ``folder``'s ``labels.csv``, when it has one, is split with them: each folder keeps the
    rows of its own images, in the same columns (one train would refuse, as not UTF-8 or
    with ';' between its columns, is refused before any move: it could not be split). Its
    ``manifest.json`` (written by ``data prepare`` or ``data avatars``) records the split
    under ``held_out``, ``out``'s copy of it under ``split_from``; a prepared folder's
    ``count`` is its images' count. ``out`` must be new or empty, and ``n`` below the number
    of images; else :class:`DataError`. A split stopped part-way is finished by calling it
    again with the same arguments; until then ``folder``'s manifest says it is under way
    (``split_under_way``, written before the first move), so the command that made the folder
    refuses to make the moved images again there. Returns the moved images' paths below
    ``folder``, in its order.
    """
    folder, out = Path(folder), Path(out)
    plan = _plan(folder, out, n, seed)
    _mark_under_way(folder, out, n, seed)
    moved = plan["files"]
    with tqdm(total=len(moved), desc="split", unit="img", disable=not progress) as bar:
        for rel in moved:
            _move(folder / rel, out / rel)
            bar.update(1)
    if (folder / LABELS_FILE).is_file():
        _split_labels(folder, out, set(moved))
    if (folder / CREDITS).is_file() and not (out / CREDITS).exists():
        write_bytes_atomic(out / CREDITS, (folder / CREDITS).read_bytes())  # the licence's
    _split_manifests(folder, out, n, seed)
    (out / PLAN).unlink()
    return moved


def _plan(folder: Path, out: Path, n: int, seed: int) -> dict[str, Any]:
    """The split to do: the one begun in ``out`` with these arguments, or a new one, its plan
    written into ``out``; DataError for a split that may not be done."""
    where = _check_places(folder, out)
    wanted = {"from": where, "n": n, "seed": seed}
    begun = read_json(out / PLAN)
    if begun is not None:
        if {k: begun.get(k) for k in wanted} != wanted:
            raise DataError(
                f"'{out}' holds an unfinished split of '{begun.get('from')}' "
                f"(--held-out {begun.get('n')} --seed {begun.get('seed')}); run that command "
                "again to finish it, or give another --out"
            )
        _check_labels(folder)  # saved again since the stop (a spreadsheet's ';'): not split yet
        return begun
    if out.exists() and any(not is_temp_name(p.name) for p in out.iterdir()):
        raise DataError(f"--out '{out}' is not empty; give a new or empty folder")
    manifest = read_json(folder / MANIFEST) or {}
    if (finish := finish_split_command(folder, manifest)) is not None:
        other = manifest[SPLIT_UNDER_WAY].get("folder")
        if other != str(out.resolve()):  # its images would be taken from under it
            raise DataError(
                f"'{folder}' holds an unfinished data split into '{other}'; finish it "
                f"first (the same command finishes it): {finish}"
            )
    if (refused := unfinished_split_refusal(folder)) is not None:
        raise DataError(refused)  # the held-out folder of another split: its images would go
    if (folder / PENDING).exists():
        raise DataError(
            f"'{folder}' holds an unfinished data prepare or data avatars "
            f"({PENDING}); run it again to finish it first"
        )
    _check_labels(folder)
    files = [p.relative_to(folder).as_posix() for p in list_images(folder).files]
    if n < 1:
        raise DataError(f"--held-out must be at least 1, got {n}")
    if n >= len(files):
        raise DataError(
            f"--held-out {n} leaves no image to train on: '{folder}' has "
            f"{counted(len(files), 'image')}; hold out fewer"
        )
    chosen = np.sort(np.random.default_rng(seed).choice(len(files), size=n, replace=False))
    plan = {**wanted, "files": [files[k] for k in chosen]}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / PLAN, json.dumps(plan))  # before the first move: a re-run finds it
    return plan


def _check_labels(folder: Path) -> None:
    """``folder``'s labels.csv, when it has one, read as train reads it: its rows go with the
    images, so one that could not be split right (not UTF-8, ';' between its columns) is
    refused (LabelError, a DataError) before any move."""
    if (folder / LABELS_FILE).is_file():
        read_csv_rows(folder / LABELS_FILE, missing="null")


def _mark_under_way(folder: Path, out: Path, n: int, seed: int) -> None:
    """Record in ``folder``'s manifest, before the first move, that this split is under way:
    a data prepare or data avatars that made the folder would otherwise make the moved images
    again there if the split stopped before its end (`common.split_refusal` reads it)."""
    manifest = read_json(folder / MANIFEST)
    under_way = {"folder": str(out.resolve()), "n": n, "seed": seed}
    if manifest is None or manifest.get(SPLIT_UNDER_WAY) == under_way:
        return  # a folder of one's own images (nothing makes it again), or marked already
    if any(h.get("folder") == under_way["folder"] for h in manifest.get("held_out", [])):
        return  # recorded as finished: stopped only before the plan's removal
    manifest[SPLIT_UNDER_WAY] = under_way
    write_manifest(folder / MANIFEST, manifest)


def _check_places(folder: Path, out: Path) -> str:
    """``folder``'s absolute path, once it and ``out`` are checked to be two separate places
    (DataError otherwise)."""
    if not folder.is_dir():
        list_images(folder)  # raises: says what it is (missing, a file)
    check_out_creatable(out)
    here, there = folder.resolve(), out.resolve()
    if there.is_relative_to(here) or here.is_relative_to(there):
        raise DataError(
            f"--out '{out}' and '{folder}' lie one inside the other; the held-out images would "
            "still be read with the others: give a folder beside it"
        )
    return str(here)


def _move(src: Path, dst: Path) -> None:
    """Move one image; nothing to do when a stopped split moved it already."""
    if not src.exists():
        return  # moved before (the plan names only images that were there)
    if dst.exists():
        src.unlink()  # copied across file systems, then stopped before the removal
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # Another file system: a whole copy first (written atomically), then the removal.
        write_bytes_atomic(dst, src.read_bytes())
        src.unlink()


def _split_labels(folder: Path, out: Path, moved: set[str]) -> None:
    """``out``'s labels.csv with the rows of the moved images (written once: a re-run keeps
    it), then ``folder``'s without them."""
    text = (folder / LABELS_FILE).read_text("utf-8-sig")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        return
    header, body = rows[0], [r for r in rows[1:] if any(c.strip() for c in r)]
    names = {canonical(m) for m in moved}  # a row names its file in NFC or as on disk
    goes = [bool(r) and canonical(Path(r[0].strip()).as_posix()) in names for r in body]
    if not (out / LABELS_FILE).exists():
        theirs = [r for r, g in zip(body, goes, strict=True) if g]
        write_text_atomic(out / LABELS_FILE, _csv_text([header, *theirs]))
    if any(goes):
        ours = [r for r, g in zip(body, goes, strict=True) if not g]
        write_text_atomic(folder / LABELS_FILE, _csv_text([header, *ours]))


def _csv_text(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _split_manifests(folder: Path, out: Path, n: int, seed: int) -> None:
    """Record the split in each folder's manifest: ``out``'s first (from ``folder``'s as it
    was), then ``folder``'s; each written once, so a re-run records it once."""
    manifest = read_json(folder / MANIFEST)
    if manifest is None:
        return  # a folder of one's own images: nothing to keep true
    here, there = str(folder.resolve()), str(out.resolve())
    if not (out / MANIFEST).exists():
        theirs = {k: v for k, v in manifest.items() if k not in ("held_out", SPLIT_UNDER_WAY)}
        if "count" in theirs:
            theirs["count"] = n
        theirs["split_from"] = {"folder": here, "n": n, "seed": seed}
        write_manifest(out / MANIFEST, theirs)
    held = manifest.get("held_out", [])
    recorded = any(h.get("folder") == there for h in held)
    if not recorded or SPLIT_UNDER_WAY in manifest:
        if not recorded:
            if "count" in manifest:
                manifest["count"] -= n
            manifest["held_out"] = [*held, {"folder": there, "n": n, "seed": seed}]
        manifest.pop(SPLIT_UNDER_WAY, None)  # in the same write: finished, in one step
        write_manifest(folder / MANIFEST, manifest)
