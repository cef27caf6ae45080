"""A decoded folder's disk cache: the key its files are named by, and the record beside them.

``KEY.u8`` holds the ``(N, size, size, 3)`` uint8 pixels, ``KEY.json`` what else decoding
found (skip reasons, profiles not applied, the images enlarged), so that a folder read again
unchanged is neither decoded nor walked for those a second time. `data.load_folder` writes
and reads them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .enlarged import Enlarged

# Bump when decoding changes, so disk caches made by older code are not reused.
CACHE_VERSION = 1


def cache_key(root: Path, rels: list[str], files: list[Path], size: int, profiles: bool) -> str:
    """Hash of everything that determines the decoded array: folder, size, whether colour
    profiles are applied, and each file's relative path, byte size and mtime (a changed, added
    or removed file gives a new key). Without profiles, the key animeddim gave before."""
    entries = []
    for rel, path in zip(rels, files, strict=True):
        try:
            st = path.stat()
            entries.append([rel, st.st_size, st.st_mtime_ns])
        except OSError:
            entries.append([rel, -1, -1])
    applied = ["icc->srgb"] if profiles else []
    blob = json.dumps([CACHE_VERSION, str(root.resolve()), size, entries, *applied])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def read_cache(
    data_path: Path, meta_path: Path, key: str, size: int
) -> tuple[np.ndarray, list[str | None], list[tuple[str, str]], Enlarged] | None:
    """The cached array, skip reasons, the files whose colour profile was not applied (path
    below the folder, reason) and the images enlarged (the smallest named below the folder;
    none recorded by a cache written before they were), or None when absent or inconsistent."""
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
        count = int(meta["count"])
        if meta["key"] != key or meta["size"] != size or count < 1:
            return None
        if data_path.stat().st_size != count * size * size * 3:
            return None
        images = np.memmap(data_path, dtype=np.uint8, mode="r", shape=(count, size, size, 3))
        unconverted = [(str(rel), str(reason)) for rel, reason in meta.get("unconverted", [])]
        enlarged = Enlarged.from_json(meta.get("enlarged", []))
        return images, list(meta["reasons"]), unconverted, enlarged
    except (OSError, ValueError, KeyError, TypeError):
        return None
