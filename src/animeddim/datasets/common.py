"""What the dataset makers share: the note a run leaves until it ends, the output folder's
checks, and the names of the images they write."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

from animeddim.data import DataError
from animeddim.io import file_in_the_way, write_text_atomic
from animeddim.words import counted

MANIFEST = "manifest.json"  # how a folder was made, written last: its presence means done
CREDITS = "CREDITS.md"  # the avatars' credit, which their licence asks to go with them
PENDING = ".animeddim-pending.json"  # arguments of a generation run that has not finished
# The plan of a data split (which images, from where), in its held-out folder until it ends.
PLAN = ".animeddim-split.json"
# The manifest's record of a data split begun from the folder and not yet finished (its
# held-out folder, n and seed), written before the first image moves.
SPLIT_UNDER_WAY = "split_under_way"

# Image i is named with at least 6 digits: 000000.png ... 999999.png, then 1000000.png (as
# f"{i:06d}" writes it; the sample names of `outputs` are numbered the same way).
_NUMBER = r"(\d{6}|[1-9]\d{6,})"
_OUTPUT_NAME = re.compile(_NUMBER + r"\.png")  # what prepare() writes, bar manifest.json
_AVATAR_NAME = re.compile(r"avatar-" + _NUMBER + r"\.png")


def check_out_creatable(out: Path) -> None:
    """DataError for an output folder that is a file or lies under one."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out '{out}' is a file, not a folder")
    if (blocker := file_in_the_way(out)) is not None:
        raise DataError(f"--out '{out}' cannot be created: '{blocker}' is a file, not a folder")


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` to ``path`` atomically, as indented JSON."""
    write_text_atomic(path, json.dumps(manifest, indent=2) + "\n")


def output_name(i: int) -> str:
    """The file name of prepared image ``i``: '000000.png', ..., '1000000.png'."""
    return f"{i:06d}.png"


def avatar_name(i: int) -> str:
    """The file name of avatar ``i``: 'avatar-000000.png', ..., 'avatar-1000000.png'."""
    return f"avatar-{i:06d}.png"


def output_index(name: str) -> int | None:
    """``i`` for the name :func:`output_name` gives image ``i``, else None."""
    return _index(_OUTPUT_NAME, name)


def avatar_index(name: str) -> int | None:
    """``i`` for the name :func:`avatar_name` gives avatar ``i``, else None."""
    return _index(_AVATAR_NAME, name)


def _index(pattern: re.Pattern[str], name: str) -> int | None:
    match = pattern.fullmatch(name)
    return int(match[1]) if match else None


def split_refusal(out: Path, manifest: dict[str, Any] | None) -> str | None:
    """Why ``out`` may not be made again: a folder `animeddim data split` took images from or
    put them into (a prepare or render done again there would bring them back, or mix them);
    None for any other."""
    if not manifest:
        return None
    if (finish := finish_split_command(out, manifest)) is not None:
        return (
            f"folder '{out}' holds an unfinished data split (its images part-way moved to "
            f"'{manifest[SPLIT_UNDER_WAY].get('folder')}'); making it again would bring them "
            f"back: the same command finishes the split: {finish}"
        )
    if held := manifest.get("held_out"):
        moved = ", ".join(f"{counted(h.get('n', 0), 'image')} to '{h.get('folder')}'" for h in held)
        why = f"had images moved out by data split ({moved})"
    elif (source := manifest.get("split_from")) is not None:
        why = f"holds images data split moved from '{source.get('folder')}'"
    else:
        return None
    return f"folder '{out}' {why}; making it again would bring them back: use a new folder"


def finish_split_command(folder: Path, manifest: dict[str, Any] | None) -> str | None:
    """The `animeddim data split` command that finishes the split begun from ``folder``
    (recorded in its manifest under ``split_under_way``), or None when none is under way."""
    begun = (manifest or {}).get(SPLIT_UNDER_WAY)
    if not isinstance(begun, dict):
        return None
    return _split_command(folder.resolve(), begun.get("n"), begun.get("folder"), begun.get("seed"))


def unfinished_split_refusal(out: Path) -> str | None:
    """Why ``out`` may not be written into or split: it is the held-out folder of a data
    split not yet finished (it holds the split's plan), with the command that finishes it;
    None for any other folder."""
    if not (out / PLAN).exists():
        return None
    plan = read_json(out / PLAN)
    if plan is None:  # written atomically: unreadable only if damaged since
        return f"folder '{out}' holds the damaged plan of an unfinished data split ({PLAN})"
    source = plan.get("from")
    finish = _split_command(source, plan.get("n"), out.resolve(), plan.get("seed"))
    return (
        f"folder '{out}' holds an unfinished data split (images part-way moved into it from "
        f"'{source}'); the same command finishes the split, run it first: {finish}"
    )


def _split_command(folder: object, n: object, out: object, seed: object) -> str:
    """The `animeddim data split` command line; the folders absolute, as the split records
    them, so it runs from any directory."""
    return (
        f"animeddim data split {shlex.quote(str(folder))} --held-out {n} "
        f"--out {shlex.quote(str(out))} --seed {seed}"
    )
