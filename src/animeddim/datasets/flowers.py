"""The Oxford 102 flowers: downloaded (checksum, resumable) and prepared."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from animeddim.data import DataError
from animeddim.io import file_digest

from .preparation import prepare

FLOWERS102_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz"
FLOWERS102_MD5 = "52808999861908f626f3c1f4e79d11fa"


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
    return prepare(archive, images, size, progress=progress)


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
