"""Files on disk: atomic writes, PNG / grid / GIF writing, digests.

Every file animeddim writes goes through :func:`atomic_file`: the bytes go to a temporary
name beside the target (".NAME.tmp-PID", so two processes never share one), are fsynced,
and the name is then swapped in with a rename. A crash or a full disk leaves either the old
file or the new one, never half of one and never a 0-byte file under the final name; the
error names the user's path, not the temporary one.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

TEMP_GLOB = ".*.tmp*"  # what temp_path() names look like (for cleaning up after a kill)


def read_safetensors(path: str | Path, tensors: bool = True) -> tuple[dict, dict[str, str]]:
    """The tensors (name -> torch.Tensor) and the metadata of a safetensors file, copied into
    memory this process owns.

    `safetensors.safe_open` maps the file privately, and a tensor taken from it still reads the
    file's pages: a file rewritten in place (`cp` over it, same inode) while a model loaded from
    it is in use would silently change that model's tensors (its normalisation, say) in the
    middle of a job. Reading the bytes once rules that out.

    :param tensors: False: read only the header (the metadata), not the tensor data.
    :raises safetensors.SafetensorError, ValueError, OSError: an unreadable or malformed file.
    """
    path = Path(path)
    with path.open("rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        data = f.read() if tensors else f.read(8)  # the whole file once, or just the header
        size = int.from_bytes(data[:8], "little")
        if file_size < 8 or size > file_size - 8:
            raise ValueError(f"'{path}' is not a safetensors file (or is truncated)")
        head = data[8 : 8 + size] if tensors else f.read(size)
    header = json.loads(head)
    if not isinstance(header, dict):
        raise ValueError(f"'{path}' has no safetensors header")
    try:
        data_end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (TypeError, KeyError, IndexError) as e:
        raise ValueError(f"'{path}' has a malformed safetensors header ({e})") from None
    if file_size != 8 + size + data_end:
        raise ValueError(f"'{path}' is truncated or has trailing bytes")
    out: dict = {}
    if tensors:
        from safetensors.torch import load

        out = load(data)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"'{path}' has a malformed metadata entry")
    return out, meta


def file_in_the_way(path: str | Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is not a folder (a file, so nothing
    can be created under it), else None. `path` itself is not looked at."""
    for parent in Path(path).parents:  # as given: a relative path ends at "."
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def missing_folders(path: str | Path) -> list[Path]:
    """The folders a ``mkdir(parents=True)`` of `path` would make: `path` and each ancestor
    that does not exist, innermost first (empty when `path` exists)."""
    missing = []
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def remove_empty_folders(folders: Sequence[Path]) -> None:
    """Remove `folders` (as :func:`missing_folders` lists them, innermost first) while they
    are empty: what a call that failed before writing anything made goes, and a folder that
    holds a file stops the removal (it holds the folders above it too)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def temp_path(path: str | Path) -> Path:
    """The temporary name this process writes `path` under: ".NAME.tmp-PID" beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_temp_name(name: str) -> bool:
    """True for names that temp_path() makes (or the ".NAME.PID.tmp" of older versions)."""
    return name.startswith(".") and (".tmp-" in name or name.endswith(".tmp"))


@contextmanager
def atomic_file(
    path: str | Path, *, before_rename: Callable[[], None] | None = None
) -> Iterator[BinaryIO]:
    """Open a binary file that replaces `path` when the block ends without an error.

    On an error the temporary file is removed and `path` is untouched; an OSError names
    `path`. `before_rename` runs after the fsync, just before the rename (a test hook).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException as e:
        _remove_temp(tmp)
        failed = _write_error(e)
        if failed is None:
            raise
        if failed.filename is None or str(failed.filename) == str(tmp):
            raise OSError(failed.errno, failed.strerror or str(failed), str(path)) from None
        if failed is not e:
            raise failed from None
        raise
    fsync_dir(path.parent)


def _write_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed write: `e` itself, or the one torch's writers
    (`torch.save`, `torch.jit.save`) were handling when their own clean-up raised a
    RuntimeError ("unexpected pos 64 vs 0") over it, which would otherwise end the command in
    a traceback where a full disk should be one line naming the file."""
    if isinstance(e, OSError):
        return e
    if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError):
        return e.__context__
    return None


def _remove_temp(tmp: Path) -> None:
    """Remove a temporary file after a failed write, if it is there; a failure to (a read-only
    file system refuses even the unlink of a name that does not exist) is not the error to
    report: the write's own is."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Replace `path` with `data` (temporary name, fsync, rename)."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace `path` with UTF-8 `text` (temporary name, fsync, rename).

    A file name that is not UTF-8 (Latin-1 from an old archive) reaches `text` as Python's
    surrogate escapes; it is written as the bytes the file system holds, not refused.
    """
    return write_bytes_atomic(path, text.encode("utf-8", "surrogateescape"))


def fsync_dir(d: str | Path) -> None:
    """Make a rename inside `d` durable (where the platform has directory descriptors)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete temporary files a killed process left in `folder`; return them.

    Only call this when no other process writes into `folder` (e.g. under a run's lock).
    """
    removed = []
    for f in Path(folder).glob(TEMP_GLOB):
        if f.is_file() and is_temp_name(f.name):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- images --------------------------------------------------------------------------------


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG encoding of uint8 [H x W x C] pixels (C = 1 or 3)."""
    from PIL import Image

    pixels = np.asarray(pixels)
    buf = io.BytesIO()
    Image.fromarray(
        pixels.squeeze(-1) if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels
    ).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str | Path, pixels: np.ndarray) -> Path:
    """Write uint8 [H x W x C] pixels as one PNG, atomically."""
    return write_bytes_atomic(path, png_bytes(pixels))


def tile(images_u8: np.ndarray, cols: int) -> np.ndarray:
    """uint8 [N x H x W x C] images tiled row by row into one image (white where none)."""
    n, h, w, c = images_u8.shape
    rows = math.ceil(n / cols)
    grid = np.full((rows * h, cols * w, c), 255, dtype=np.uint8)
    for i, im in enumerate(images_u8):
        r, k = divmod(i, cols)
        grid[r * h : (r + 1) * h, k * w : (k + 1) * w] = im
    return grid


def save_grid(images_u8, path: str | Path, cols: int) -> Path:
    """Tile uint8 [N x H x W x C] images (tensor or array) into one PNG, atomically."""
    return save_png(path, tile(_numpy(images_u8), cols))


def save_gif(path: str | Path, frames_u8, duration_ms: int = 80) -> Path:
    """Write uint8 [N x H x W x C] frames as a looping animated GIF, atomically."""
    from PIL import Image

    pics = [Image.fromarray(f) for f in _numpy(frames_u8)]
    buf = io.BytesIO()
    pics[0].save(
        buf, format="GIF", save_all=True, append_images=pics[1:], duration=duration_ms, loop=0
    )
    return write_bytes_atomic(path, buf.getvalue())


def save_pngs(images_u8, folder: str | Path, names: Sequence[str]) -> list[Path]:
    """One PNG per image, `folder / names[i]`, each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [save_png(folder / name, im) for im, name in zip(_numpy(images_u8), names, strict=True)]


def _numpy(images) -> np.ndarray:
    return images.numpy() if hasattr(images, "numpy") else np.asarray(images)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/animeddim`` or ``~/.cache/animeddim``: never inside the user's data."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "animeddim"
