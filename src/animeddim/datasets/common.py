"""What the dataset makers share: the note a run leaves until it ends, the output folder's
checks, and the names of the images they write."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from animeddim.data import DataError
from animeddim.io import file_in_the_way

PENDING = ".animeddim-pending.json"  # arguments of a generation run that has not finished
OUTPUT_NAME = re.compile(r"\d{6}\.png")  # what prepare() writes, bar manifest.json
AVATAR_NAME = re.compile(r"avatar-\d{6}\.png")


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
