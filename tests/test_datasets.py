"""Tests for animeddim.datasets: avatars, archive preparation, resumable downloads (local only)."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, run_here, run_main
from PIL import Image

from animeddim.data import DataError, SkippedFilesWarning, list_images, load_folder, load_image
from animeddim.datasets import avatars as avatars_module
from animeddim.datasets import download_flowers102, generate_avatars, preparation, prepare
from animeddim.datasets.common import (
    PENDING,
    avatar_index,
    avatar_name,
    output_index,
    output_name,
)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(seed: int, h: int = 20, w: int = 30) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(pixels))


def _said(err: str) -> list[str]:
    """The lines of a `data prepare`'s stderr, without its progress bar (which tqdm redraws
    with carriage returns)."""
    lines = re.split(r"[\r\n]+", err)
    bars = ("prepare:", "prepare again:")
    return [line for line in lines if line.strip() and not line.startswith(bars)]


def _read_all(folder: Path) -> np.ndarray:
    return np.stack([load_image(p, None) for p in sorted(folder.glob("*.png"))])


# --------------------------------------------------------------------------------------------
# Avatars


@pytest.fixture(scope="module")
def avatars(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_avatars(tmp_path_factory.mktemp("av") / "set", n=6, size=32, workers=2)


def test_avatars_are_rgb_pngs_with_credits(avatars: Path) -> None:
    pngs = sorted(avatars.glob("*.png"))
    assert [p.name for p in pngs] == [f"avatar-{i:06d}.png" for i in range(6)]
    for p in pngs:
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
    pixels = _read_all(avatars)
    assert len({p.tobytes() for p in pixels}) == 6  # six different faces
    assert (pixels[:, 0, 0] == 255).all()  # transparent background composited on white
    credits = (avatars / "CREDITS.md").read_text("utf-8")
    assert "CC BY 4.0" in credits and "Wischofsky" in credits and "DiceBear" in credits
    manifest = (avatars / "manifest.json").read_text("utf-8")
    assert '"style": "adventurer"' in manifest and '"n": 6' in manifest


def test_avatars_depend_only_on_seed(avatars: Path, tmp_path: Path) -> None:
    same = generate_avatars(tmp_path / "same", n=3, size=32, workers=1)
    np.testing.assert_array_equal(_read_all(same), _read_all(avatars)[:3])
    other = generate_avatars(tmp_path / "other", n=3, size=32, seed=1, workers=1)
    assert not any(np.array_equal(a, b) for a in _read_all(other) for b in _read_all(avatars)[:3])


def test_avatar_rerun_is_a_noop_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = generate_avatars(tmp_path / "a", n=3, size=16, workers=1)
    first = _read_all(out)

    def refuse(seed: int, i: int, size: int) -> np.ndarray:
        raise AssertionError(f"rendered avatar {i} again")

    monkeypatch.setattr(avatars_module, "_render_avatar", refuse)
    assert generate_avatars(out, n=3, size=16, workers=1) == out
    monkeypatch.undo()

    # An interrupted run (no manifest, one file missing) renders only what is missing.
    (out / "manifest.json").unlink()
    (out / "avatar-000001.png").unlink()
    rendered: list[int] = []
    real = avatars_module._render_avatar

    def spy(seed: int, i: int, size: int) -> np.ndarray:
        rendered.append(i)
        return real(seed, i, size)

    monkeypatch.setattr(avatars_module, "_render_avatar", spy)
    generate_avatars(out, n=3, size=16, workers=1)
    assert rendered == [1]
    np.testing.assert_array_equal(_read_all(out), first)


def test_avatars_refuse_to_mix_sets(tmp_path: Path) -> None:
    out = generate_avatars(tmp_path / "a", n=2, size=16, workers=1)
    with pytest.raises(DataError, match="different avatar set"):
        generate_avatars(out, n=2, size=24, workers=1)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="not empty"):
        generate_avatars(tmp_path / "b", n=2, size=16, workers=1)


# --------------------------------------------------------------------------------------------
# prepare


def _members() -> list[tuple[str, bytes]]:
    return [
        ("faces/a.png", _png(_pixels(1))),
        ("faces/b.PNG", _png(_pixels(2, 30, 20))),
        ("faces/broken.jpg", b"\xff\xd8\xff garbage"),
        ("../evil.png", _png(_pixels(3))),
        ("readme.txt", b"not an image, not an image member"),
    ]


def _write_source(path: Path, fmt: str, members: list[tuple[str, bytes]]) -> Path:
    """`members` (name, bytes) written as `data prepare` reads them: a "zip", a "tgz" or a
    "folder" at `path`."""
    if fmt == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, blob in members:
                zf.writestr(name, blob)
    elif fmt == "tgz":
        with tarfile.open(path, "w:gz") as tf:
            for name, blob in members:
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    else:
        for name, blob in members:
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(blob)
    return path


def _make_zip(path: Path) -> Path:
    return _write_source(path, "zip", _members())


def _make_tgz(path: Path) -> Path:
    return _write_source(path, "tgz", _members())


@pytest.mark.parametrize("make", [_make_zip, _make_tgz], ids=["zip", "tgz"])
def test_prepare_archive(tmp_path: Path, make: object, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make(tmp_path / ("src.zip" if make is _make_zip else "src.tgz"))  # type: ignore[operator]
    out = tmp_path / "deep" / "out"
    with pytest.warns(SkippedFilesWarning, match="skipped 2 of 4") as record:
        assert prepare(archive, out, size=16, workers=1) == out
    message = str(record[0].message)
    assert "broken.jpg" in message and "evil.png" in message and "unsafe" in message
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "manifest.json"]
    assert not (tmp_path / "deep" / "evil.png").exists() and not (tmp_path / "evil.png").exists()
    expected = [load_image_bytes(_pixels(1), 16), load_image_bytes(_pixels(2, 30, 20), 16)]
    np.testing.assert_array_equal(_read_all(out), np.stack(expected))

    # Same archive again: nothing to do, even with the decoder gone.
    def refuse(data: bytes, size: int) -> None:
        raise AssertionError("prepared again")

    monkeypatch.setattr(preparation, "_prepare_one", refuse)
    assert prepare(archive, out, size=16, workers=1) == out


@pytest.mark.parametrize("fmt", ["zip", "tgz"])
def test_a_folder_named_like_an_image_in_an_archive_is_a_folder(tmp_path: Path, fmt: str) -> None:
    """A folder 'shots.png/' in a .tgz was noted as a skipped file ('not a regular file (link
    or device)'); in a .zip or a folder it is a folder, as it is now in a .tgz too."""
    src = tmp_path / "src"
    (src / "shots.png").mkdir(parents=True)
    (src / "shots.png" / "a.png").write_bytes(_png(_pixels(1)))
    archive = tmp_path / f"src.{fmt}"
    if fmt == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            zf.write(src / "shots.png", "shots.png")
            zf.write(src / "shots.png" / "a.png", "shots.png/a.png")
    else:
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(src / "shots.png", "shots.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedFilesWarning)
        out = prepare(archive, tmp_path / "out", size=8, workers=1)
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "manifest.json"]
    assert json.loads((out / "manifest.json").read_text())["skipped"] == []


def load_image_bytes(pixels: np.ndarray, size: int) -> np.ndarray:
    """What data.load_image makes of these pixels saved as PNG."""
    from animeddim.data import _decode

    return _decode(_png(pixels), size)


def test_prepare_folder_with_pool_and_reload(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(5):
        (src / "x").mkdir(parents=True, exist_ok=True)
        (src / "x" / f"{i}.png").write_bytes(_png(_pixels(i)))
    out = prepare(src, tmp_path / "out", size=8, workers=2)
    loaded = load_folder(out, 8, workers=1)
    assert loaded.images.shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(loaded.images[3], load_image_bytes(_pixels(3), 8))


def test_prepare_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path / "missing.zip", tmp_path / "out")
    (tmp_path / "junk.zip").write_bytes(b"not an archive")
    with pytest.raises(DataError, match="archive"):
        prepare(tmp_path / "junk.zip", tmp_path / "out")
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("a.png", b"nope")
    with pytest.raises(DataError, match="no usable image in .*: 1 file tried, 1 skipped"):
        prepare(bad, tmp_path / "out2")  # not "1 files tried"


# --------------------------------------------------------------------------------------------
# download_flowers102 against a local server


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    requests: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not self.path.endswith("/102flowers.tgz"):
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        type(self).requests.append(rng)
        body, status = self.payload, 200
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.end_headers()
                return
            body, status = body[start:], 206
            self.send_response(status)
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/*")
        else:
            self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass  # keep test output clean


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, type]]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    blob = _make_tgz(tmp_path / "served.tgz").read_bytes()
    handler = type("Handler", (_RangeHandler,), {"payload": blob, "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/102flowers.tgz", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_download_resumes_and_prepares(tmp_path: Path, server: tuple[str, type]) -> None:
    url, handler = server
    md5 = hashlib.md5(handler.payload).hexdigest()
    out = tmp_path / "flowers"
    out.mkdir()
    (out / "102flowers.tgz.part").write_bytes(handler.payload[:100])
    with pytest.warns(SkippedFilesWarning):
        images = download_flowers102(out, url=url, md5=md5, size=16, progress=False)
    assert handler.requests == ["bytes=100-"]
    assert images == out / "images"
    assert (out / "102flowers.tgz").read_bytes() == handler.payload
    assert not (out / "102flowers.tgz.part").exists()
    assert len(list(images.glob("*.png"))) == 2
    # Already downloaded and prepared: no request at all.
    download_flowers102(out, url=url, md5=md5, size=16, progress=False)
    assert handler.requests == ["bytes=100-"]


def test_download_checksum_mismatch(tmp_path: Path, server: tuple[str, type]) -> None:
    url, _ = server
    with pytest.raises(DataError, match="expected 0+"):
        download_flowers102(tmp_path, url=url, md5="0" * 32, progress=False)
    assert not (tmp_path / "102flowers.tgz.part").exists()
    assert not (tmp_path / "102flowers.tgz").exists()


def test_download_network_failure_is_a_data_error(tmp_path: Path, server: tuple[str, type]) -> None:
    url, _ = server
    with pytest.raises(DataError, match="download failed.*404.*animeddim data prepare") as err:
        download_flowers102(tmp_path, url=url + ".gone", md5="0" * 32, size=16, progress=False)
    # The command it suggests is one `data prepare` takes, at the size asked.
    command = str(err.value).split("`")[1].split()
    archive, images = str(tmp_path / "102flowers.tgz"), str(tmp_path / "images")
    assert command == ["animeddim", "data", "prepare", archive, "--out", images, "--size", "16"]
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match="download failed"):
        download_flowers102(tmp_path, url=f"http://127.0.0.1:{port}/x.tgz", progress=False)


# --------------------------------------------------------------------------------------------
# The `data` commands, run as a user runs them


def test_data_avatars_command(tmp_path: Path) -> None:
    out = tmp_path / "av"
    args = ["data", "avatars", "--out", str(out), "--n", "3", "--size", "16", "--workers", "1"]
    p = run_cli(*args)
    assert f"3 avatars (16px, seed 0) in {out}" in p.stdout
    assert sorted(f.name for f in out.glob("*.png")) == [f"avatar-{i:06d}.png" for i in range(3)]
    assert run_here(*args).returncode == 0  # a rerun with the same arguments is a no-op
    p = run_cli(*args[:-4], "--size", "32", check=False)
    assert p.returncode == 2 and "size" in p.stderr and "Traceback" not in p.stderr


def test_data_avatars_says_what_the_folder_holds(tmp_path: Path, capsys) -> None:
    """`data avatars` said 'N avatars ... (0.0s)' from --n, as if it had rendered them, after
    a run that found them there (a finished set, or a stopped one it finished), and said
    nothing of other images in the folder (avatars beyond --n of an earlier set whose
    manifest was removed), which a run on it reads too. The line says what the folder holds
    once it is done, and how many were rendered."""
    out = tmp_path / "av"
    args = ["data", "avatars", "--out", out, "--n", 3, "--size", 16, "--workers", 1]
    rc, stdout, err = run_main(capsys, *args)
    assert rc == 0 and stdout.startswith(f"3 avatars (16px, seed 0) in {out} ("), err
    rc, stdout, err = run_main(capsys, *args)
    said = f"3 avatars (16px, seed 0) in {out}: all there already, none rendered ("
    assert rc == 0 and stdout.startswith(said), stdout
    (out / "avatar-000001.png").unlink()  # one of the set gone: rendered again
    rc, stdout, err = run_main(capsys, *args)
    said = f"3 avatars (16px, seed 0) in {out}: 1 rendered, 2 there already ("
    assert rc == 0 and stdout.startswith(said), stdout
    Image.new("RGB", (16, 16)).save(out / "mine.png")  # another image put in the folder
    rc, stdout, err = run_main(capsys, *args)
    assert rc == 0 and stdout.startswith(f"3 avatars (16px, seed 0) in {out}: all there"), err
    assert err.splitlines()[-1] == (
        f"note: '{out}' also holds 1 other image, not among these 3 avatars nor in labels.csv, "
        "which a run on the folder reads too: move them out, or use a new folder"
    )
    assert len(list_images(out).files) == 4


def test_data_avatars_refuses_leftovers_numbered_past_n(tmp_path: Path, capsys) -> None:
    """`data avatars --n 2` in a folder holding avatar-000000.png .. avatar-000003.png and no
    manifest (an earlier set of 4 whose manifest.json was removed) took the first two as a
    start and left the other two beside them (before: exit 0 and a closing note), so the
    folder held 4 images and labels.csv 2 rows, and a run on it read 2 images without a
    label. It is refused before any work, naming them and the remedies; nothing in the
    folder changes, and an --n that covers them takes them into the set."""
    out = tmp_path / "av"
    args = ["data", "avatars", "--out", out, "--size", 16, "--workers", 1]
    assert run_main(capsys, *args, "--n", 4)[0] == 0
    (out / "manifest.json").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, stdout, err = run_main(capsys, *args, "--n", 2)
    assert rc == 2 and stdout == "", stdout
    assert err.splitlines() == [
        f"animeddim: error: folder '{out}' holds 2 avatars numbered past --n 2 "
        "(avatar-000002.png, avatar-000003.png), left by an earlier set whose manifest.json "
        "is gone; a run on the folder would read them without a row in labels.csv: use a "
        "new folder, or --n 4 to take them into this set"
    ]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "avatar-000002.png").unlink()  # one past --n 3: said in the singular
    rc, _, err = run_main(capsys, *args, "--n", 3)
    assert rc == 2 and "holds 1 avatar numbered past --n 3 (avatar-000003.png)" in err, err
    assert "would read it without a row" in err and "--n 4 to take it into" in err
    rc, stdout, err = run_main(capsys, *args, "--n", 4)
    assert rc == 0 and stdout.startswith(f"4 avatars (16px, seed 0) in {out}: 1 rendered"), err
    rows = (out / "labels.csv").read_text().splitlines()[1:]
    files = sorted(p.name for p in list_images(out).files)
    assert [row.split(",")[0] for row in rows] == files == [f"avatar-{i:06d}.png" for i in range(4)]


def test_data_prepare_command(tmp_path: Path) -> None:
    archive = _make_tgz(tmp_path / "src.tgz")
    out = tmp_path / "prepared"
    p = run_here("data", "prepare", str(archive), "--out", str(out), "--size", "16")
    said = f"prepared 2 images in {out} (16x16: the largest centred square of each, resized)"
    assert p.stdout == said + "\n" and "skipped 2 of 4" in p.stderr
    assert [load_image(f, None).shape for f in sorted(out.glob("*.png"))] == [(16, 16, 3)] * 2
    p = run_here("data", "prepare", str(tmp_path / "nope.zip"), "--out", str(out), check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("fmt", ["folder", "zip", "tgz"])
def test_data_prepare_shows_progress(
    tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture
) -> None:
    """`data prepare` showed nothing until its end (minutes for 60,000 photos); it shows a
    bar like `data avatars`, one step per file read: out of the total for a folder or a .zip,
    a count for a .tgz (a stream: its total is known only at its end)."""
    src = tmp_path / ("src" if fmt == "folder" else f"src.{fmt}")
    src.mkdir() if fmt == "folder" else None
    members = [(f"faces/{i}.png", _png(_pixels(i))) for i in range(5)]
    _write_source(src, fmt, members + [("faces/bad.png", b"not an image")])
    out = tmp_path / "out"
    p = run_here("data", "prepare", str(src), "--out", str(out), "--size", "8")
    assert p.stdout.startswith("prepared 5 images")
    bar = p.stderr.replace("\r", "\n").splitlines()
    done = "prepare: 6img" if fmt == "tgz" else "prepare: 100%|"
    assert any(line.startswith(done) for line in bar), p.stderr
    if fmt != "tgz":
        assert any("6/6" in line for line in bar), p.stderr
    capsys.readouterr()
    with pytest.warns(SkippedFilesWarning):
        prepare(src, tmp_path / "quiet", size=8, workers=1)  # the function: no bar unless asked
    assert capsys.readouterr().err == ""


def test_prepare_says_one_enlarged_image_and_one_duplicate_in_the_singular(
    tmp_path: Path,
) -> None:
    """The notes of one enlarged image and one duplicate said "1 image ... was enlarged to it,
    blurring them (the smallest: ...)" and "left out 1 duplicate: their pixels repeat": the
    words now agree with the count."""
    src = tmp_path / "src"
    _save_png(src / "a.png", _pixels(1))
    (src / "c.png").write_bytes((src / "a.png").read_bytes())
    _save_png(src / "s1.png", _pixels(2, 10, 6))
    p = run_here("data", "prepare", src, "--out", tmp_path / "out", "--size", 16)
    assert _said(p.stderr) == [
        "note: 1 image smaller than 16x16 (its centred square) was enlarged to it, blurring it "
        "(s1.png, 6x10); a smaller --size keeps it sharp",
        "note: left out 1 duplicate: its pixels repeat an earlier image's (trained twice, and "
        "leaked into a held-out set): c.png = a.png",
    ]


def _with_duplicates_and_small_images(src: Path) -> Path:
    """A folder of 6 photos: 'a.png', its copy 'c.png', 'd.png' (a's pixels saved again with
    other bytes: metadata and compression), two smaller than 16 px ('s1.png' 6x10, 's2.png'
    12x11) and 'z.png'."""
    from PIL import PngImagePlugin

    _save_png(src / "a.png", _pixels(1))
    (src / "c.png").write_bytes((src / "a.png").read_bytes())
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "saved again")
    Image.fromarray(_pixels(1)).save(src / "d.png", pnginfo=info, compress_level=1)
    assert (src / "d.png").read_bytes() != (src / "a.png").read_bytes()
    _save_png(src / "s1.png", _pixels(2, 10, 6))
    _save_png(src / "s2.png", _pixels(3, 11, 12))
    _save_png(src / "z.png", _pixels(4, 30, 20))
    return src


def test_prepare_leaves_out_duplicates_and_notes_enlarged_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`data prepare` wrote byte-for-byte copies and re-saved copies of a photo as images of
    their own (trained twice, and leaked into a held-out set) and enlarged photos smaller than
    --size without a word. Duplicates by their prepared pixels are left out and both are
    said in a note each and recorded in the manifest; a re-run says the same."""
    src = _with_duplicates_and_small_images(tmp_path / "src")
    out = tmp_path / "out"
    p = run_here("data", "prepare", src, "--out", out, "--size", 16)
    assert p.stdout.startswith("prepared 4 images in")
    notes = [
        "note: 2 images smaller than 16x16 (the centred square of each) were enlarged to it, "
        "blurring them (the smallest: s1.png, 6x10); a smaller --size keeps them sharp",
        "note: left out 2 duplicates: their pixels repeat an earlier image's (trained twice, "
        "and leaked into a held-out set): c.png = a.png, d.png = a.png",
    ]
    assert _said(p.stderr) == notes
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 4 and manifest["enlarged"] == 2 and manifest["duplicates"] == 2
    assert manifest["smallest_enlarged"] == [6, 10, "s1.png"]
    assert manifest["duplicate_of"] == {"c.png": "a.png", "d.png": "a.png"}
    names = ["a.png", "s1.png", "s2.png", "z.png"]
    expected = [load_image(src / n, 16) for n in names]
    np.testing.assert_array_equal(_read_all(out), np.stack(expected))

    # Run again, and after an interruption: the same images, notes and manifest.
    p = run_here("data", "prepare", src, "--out", out, "--size", 16)
    assert _said(p.stderr) == notes
    again = _interrupted_after_one_image(src, tmp_path / "again", monkeypatch, 16)
    p = run_here("data", "prepare", src, "--out", again, "--size", 16)
    assert _said(p.stderr) == notes
    assert json.loads((again / "manifest.json").read_text()) == manifest
    np.testing.assert_array_equal(_read_all(again), _read_all(out))
    # An archive prepared before returns at once, and says them again from its manifest.
    archive = _write_source(
        tmp_path / "src.zip", "zip", [(n, (src / n).read_bytes()) for n in sorted(os.listdir(src))]
    )
    run_here("data", "prepare", archive, "--out", tmp_path / "z", "--size", 16)
    p = run_here("data", "prepare", archive, "--out", tmp_path / "z", "--size", 16)
    assert _said(p.stderr) == notes


@pytest.mark.parametrize("fmt", ["tgz", "zip"])
def test_a_name_an_archive_holds_twice_is_prepared_from_its_last_member(
    fmt: str, tmp_path: Path
) -> None:
    """An archive appended to (`tar -r`, `tar -u`) holds a name more than once; extracting
    it keeps the last member of each name. `data prepare` compared duplicates by member name,
    so 'a.png' added again with the same pixels was written twice (trained twice), both
    versions of an updated 'b.png' were prepared, and 'd.png' was left out as a duplicate of
    b's first version, which extraction replaces. Each name is prepared once, from its last
    member, with a note; the folder holds what the extracted archive holds."""
    pixels = {k: _pixels(i) for i, k in enumerate(("a", "b1", "b2", "c1", "c2"))}
    members = [("a", "a"), ("b", "b1"), ("d", "b1"), ("a", "a"), ("c", "c1"), ("b", "b2")]
    members.append(("./c", "c2"))  # the same file as 'c.png' once extracted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name"
        archive = _write_source(
            tmp_path / f"src.{fmt}", fmt, [(f"{n}.png", _png(pixels[k])) for n, k in members]
        )
    out = tmp_path / "out"
    p = run_here("data", "prepare", archive, "--out", out, "--size", 8)
    assert p.stdout.startswith("prepared 4 images in"), p.stdout
    note = (
        "note: left out 3 archive members that a later member of the same name replaces, "
        "as extracting the archive does (it was appended to): a.png, b.png, c.png"
    )
    assert _said(p.stderr) == [note]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 4 and manifest["duplicates"] == 0
    assert manifest["replaced"] == {"a.png": 1, "b.png": 1, "c.png": 1}
    extracted = tmp_path / "extracted"
    for name, key in (("0", "b1"), ("1", "a"), ("2", "b2"), ("3", "c2")):  # d, a, b, ./c
        _save_png(extracted / f"{name}.png", pixels[key])
    want = [load_image(f, 8) for f in sorted(extracted.glob("*.png"))]
    np.testing.assert_array_equal(_read_all(out), np.stack(want))
    p = run_here("data", "prepare", archive, "--out", out, "--size", 8)  # said again
    assert _said(p.stderr) == [note]


def test_an_archive_whose_repeated_name_is_last_unusable_leaves_its_folder_as_it_was(
    tmp_path: Path,
) -> None:
    """'a.png' added again as a damaged file: the first pass wrote 000000.png from the
    replaced member, the second found no usable image, and the refusal (before: it removed
    the pending note alone) left that image behind, so the same command, even on a mended
    archive, was refused as 'not empty (it holds files animeddim did not prepare there)'.
    The folder is left as it was: the mended archive's prepare takes it."""
    out, good = tmp_path / "out", _png(_pixels(0))
    archive = _write_source(tmp_path / "src.tgz", "tgz", [("a.png", good), ("a.png", b"bad")])
    p = run_here("data", "prepare", archive, "--out", out, "--size", 8, check=False)
    assert p.returncode == 2 and "no usable image" in p.stderr, p.stderr
    assert _said(p.stderr) == [p.stderr.splitlines()[-1]]
    assert list(out.iterdir()) == []
    mended = _write_source(tmp_path / "mended.tgz", "tgz", [("a.png", b"bad"), ("a.png", good)])
    p = run_here("data", "prepare", mended, "--out", out, "--size", 8)
    assert p.stdout.startswith("prepared 1 image in"), p.stdout


def test_prepare_without_duplicates_or_small_images_says_nothing_more(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(3):
        _save_png(src / f"{i}.png", _pixels(i))
    p = run_here("data", "prepare", src, "--out", tmp_path / "out", "--size", 16)
    assert _said(p.stderr) == []
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["enlarged"], manifest["duplicates"]) == (0, 0)


def test_prepare_says_nothing_of_an_images_damaged_metadata(tmp_path: Path) -> None:
    """A JPEG whose EXIF is damaged (a tag's data past its end) decodes, and its metadata
    warnings are silenced where it is decoded; reading its upright size for the note on
    enlarged images printed Pillow's warning again, with its source line and no file named,
    from each worker process."""
    exif = Image.Exif()
    exif[0x010E] = "x" * 200  # ImageDescription: its data lies past the tag table
    buf = io.BytesIO()
    Image.fromarray(_pixels(1)).save(buf, "JPEG", exif=exif.tobytes()[:-150])
    src = tmp_path / "src"
    src.mkdir()
    (src / "damaged.jpg").write_bytes(buf.getvalue())
    _save_png(src / "ok.png", _pixels(2))
    p = run_cli("data", "prepare", str(src), "--out", str(tmp_path / "out"), "--size", "16")
    assert _said(p.stderr) == [], p.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 2


def _interrupted_after_one_image(
    src: Path, out: Path, monkeypatch: pytest.MonkeyPatch, size: int = 8
) -> Path:
    """`out` as a prepare of `src` leaves it when Ctrl-C lands on its second image."""
    real, calls = preparation._prepare_one, []

    def stop_at_second(data: bytes, size: int) -> tuple[bytes | None, str | None]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(data, size)

    monkeypatch.setattr(preparation, "_prepare_one", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, out, size=size, workers=1)
    monkeypatch.setattr(preparation, "_prepare_one", real)
    return out


def test_prepare_never_writes_over_numbered_images_it_did_not_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder of one's own numbered images (video frames, 000000.png ...) was taken for an
    interrupted prepare: `data prepare SRC --out frames` wrote over them and deleted the rest.
    Only a folder holding a prepare's manifest, or the note a prepare leaves until it ends, is
    written into; an interrupted prepare is still done again with the same source."""
    frames = tmp_path / "frames"
    for i in range(4):
        _save_png(frames / f"{i:06d}.png", _pixels(10 + i))
    before = {p.name: p.read_bytes() for p in frames.iterdir()}
    src = _make_tgz(tmp_path / "src.tgz")
    p = run_here("data", "prepare", str(src), "--out", str(frames), "--size", "8", check=False)
    assert p.returncode == 2 and "is not empty" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in frames.iterdir()} == before

    # Interrupted after its first image: the same source goes on, another one is refused.
    out = _interrupted_after_one_image(src, tmp_path / "out", monkeypatch)
    assert (out / "000000.png").exists() and not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="already holds images prepared from"):
        prepare(_make_zip(tmp_path / "other.zip"), out, size=8, workers=1)
    with pytest.warns(SkippedFilesWarning):
        prepare(src, out, size=8, workers=1)
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "manifest.json"]


def test_image_names_past_a_million_are_read_back() -> None:
    """Image 1,000,000 is written as '1000000.png' (f"{i:06d}"), which the name patterns
    (six digits) did not match: prepare left such a file of an earlier, longer run in its
    folder, and an avatar folder's check took one for someone else's file."""
    for i in (0, 999_999, 1_000_000, 12_345_678):
        assert output_index(output_name(i)) == i and avatar_index(avatar_name(i)) == i
    assert output_name(1_000_000) == "1000000.png"
    assert avatar_name(1_000_000) == "avatar-1000000.png"
    for name in ("0000000.png", "00000.png", "1000000.jpg", "avatar-1000000.png", "a000001.png"):
        assert output_index(name) is None, name
    for name in ("avatar-0000000.png", "avatar-00001.png", "1000000.png", "avatar-1e6.png"):
        assert avatar_index(name) is None, name


def test_prepare_removes_a_stale_image_numbered_past_a_million(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupted prepare of a source that had more usable images (here: its image
    1,000,000) is done again without it: the files past the new count are removed, whatever
    their number of digits."""
    src = tmp_path / "src"
    for i in range(2):
        _save_png(src / f"{i}.png", _pixels(i))
    out = _interrupted_after_one_image(src, tmp_path / "out", monkeypatch)
    _save_png(out / "1000000.png", _pixels(9))
    _save_png(out / "999999.png", _pixels(9))
    prepare(src, out, size=8, workers=1)
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "manifest.json"]


def test_a_prepare_that_finds_no_image_keeps_an_interrupted_ones_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prepare interrupted after its first image leaves it and the note that says so; a
    second call that found no usable image removed that note with its own, so the folder's
    image was then taken for someone else's and every later prepare into it was refused. The
    note stays, and the same source is prepared there once it has images again."""
    src = tmp_path / "src"
    for i in range(2):
        _save_png(src / f"{i}.png", _pixels(i))
    out = _interrupted_after_one_image(src, tmp_path / "out", monkeypatch)
    saved = {p.name: p.read_bytes() for p in src.iterdir()}
    for p in src.iterdir():
        p.write_bytes(b"not an image")
    with pytest.raises(DataError, match="no usable image"):
        prepare(src, out, size=8, workers=1)
    assert (out / "000000.png").exists() and (out / PENDING).exists()
    for name, blob in saved.items():
        (src / name).write_bytes(blob)
    prepare(src, out, size=8, workers=1)
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "manifest.json"]


def test_a_folder_name_that_is_not_utf8_is_printed_not_a_traceback(tmp_path: Path) -> None:
    """Where stdout is strict UTF-8 (most desktops' locales), printing a name in Latin-1
    (b'caf\\xe9', from an old archive) ended `data prepare`, `invert`, ... in a
    UnicodeEncodeError traceback after their files were written; it prints as `ls` does."""
    src = tmp_path / "src"
    _save_png(src / "a.png", _pixels(1))
    try:
        out = os.fsencode(tmp_path) + b"/caf\xe9"
        os.mkdir(out)
    except (OSError, UnicodeError):
        pytest.skip("this file system takes UTF-8 names only")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    command = [sys.executable, "-m", "animeddim", "data", "prepare", os.fsencode(src)]
    p = subprocess.run([*command, b"--out", out, b"--size", b"8"], capture_output=True, env=env)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    assert (
        p.stdout
        == b"prepared 1 image in " + out + b" (8x8: the largest centred square of each, resized)\n"
    )
    assert sorted(os.listdir(out)) == [b"000000.png", b"manifest.json"]


def test_data_flowers102_command(tmp_path: Path, server: tuple[str, type]) -> None:
    url, handler = server
    md5 = hashlib.md5(handler.payload).hexdigest()
    out = tmp_path / "flowers"
    args = ["--out", str(out), "--url", url, "--md5", md5, "--size", "16"]
    p = run_here("data", "flowers102", *args)
    assert f"Oxford Flowers 102 images in {out / 'images'}" in p.stdout
    assert len(list((out / "images").glob("*.png"))) == 2
    p = run_here("data", "flowers102", "--out", str(tmp_path / "f2"), "--url", url, check=False)
    assert p.returncode == 2 and "md5" in p.stderr and "Traceback" not in p.stderr


def test_data_flowers102_says_the_notes_data_prepare_says(
    tmp_path: Path, server: tuple[str, type]
) -> None:
    """`data flowers102` prepares its archive as `data prepare` does, but said nothing of the
    images it enlarged or the duplicates it left out (recorded in the manifest alone)."""
    url, handler = server
    md5 = hashlib.md5(handler.payload).hexdigest()
    args = ["--out", str(tmp_path / "flowers"), "--url", url, "--md5", md5, "--size", "32"]
    p = run_here("data", "flowers102", *args)
    (note,) = [line for line in _said(p.stderr) if "enlarged" in line]
    assert note.startswith("note: 2 images smaller than 32x32"), p.stderr


@pytest.mark.parametrize("fmt", ["zip", "tgz", "folder"])
def test_prepare_passes_over_hidden_and_system_folders(tmp_path: Path, fmt: str) -> None:
    """A zip made on macOS holds '__MACOSX/', a NAS copy '@eaDir/' thumbnails, a desktop one
    '.Trash-1000/': their images were prepared as data. They are passed over, in archives as in
    folders, counted in one note; the manifest records them."""
    members = [
        ("faces/a.png", _png(_pixels(1))),
        ("__MACOSX/faces/a.png", _png(_pixels(2))),
        ("faces/@eaDir/a.png/SYNOPHOTO_THUMB_M.png", _png(_pixels(3))),
        (".Trash-1000/files/old.png", _png(_pixels(4))),
        ("./faces/b.png", _png(_pixels(5))),  # tar's './': not a hidden folder
        ("./faces/._b.png", b"\x00\x05\x16\x07" + bytes(200)),  # macOS's tar adds these
    ]
    src = _write_source(tmp_path / (f"src.{fmt}" if fmt != "folder" else "src"), fmt, members)
    out = tmp_path / "out"
    p = run_here("data", "prepare", src, "--out", out, "--size", 8)
    assert sorted(x.name for x in out.iterdir()) == ["000000.png", "000001.png", "manifest.json"]
    assert _said(p.stderr) == [
        "note: passed over 4 image files, hidden or in hidden or system folders (macOS's '._' "
        "metadata, thumbnails, trash, zip leftovers; not data): .Trash-1000/ (1), __MACOSX/ (1), "
        "faces/._b.png, faces/@eaDir/ (1)"
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == []
    assert manifest["passed_over"] == {
        ".Trash-1000/": 1,
        "__MACOSX/": 1,
        "faces/._b.png": 1,
        "faces/@eaDir/": 1,
    }


@pytest.mark.parametrize("fmt", ["zip", "tgz", "folder"])
def test_prepare_notes_heic_photos(tmp_path: Path, fmt: str) -> None:
    """An iPhone's HEIC photos were left out of `data prepare` without a word: they are noted
    as skipped, with the reason; those in hidden or system folders stay passed over."""
    members = [
        ("photos/a.png", _png(_pixels(1))),
        ("photos/IMG_0001.HEIC", b"\x00\x00\x00\x18ftypheic" + bytes(64)),
        ("__MACOSX/photos/._IMG_0001.HEIC", bytes(200)),
    ]
    src = _write_source(tmp_path / (f"src.{fmt}" if fmt != "folder" else "src"), fmt, members)
    out = tmp_path / "out"
    p = run_here("data", "prepare", src, "--out", out, "--size", 8)
    heic = (
        "HEIC/HEIF photo, not read: Pillow needs the pillow-heif plugin for it; convert it to "
        "JPEG or PNG"
    )
    assert _said(p.stderr) == [
        f"note: skipped 1 of 2 files that could not be decoded: photos/IMG_0001.HEIC: {heic}"
    ]
    assert sorted(x.name for x in out.iterdir()) == ["000000.png", "manifest.json"]
    assert json.loads((out / "manifest.json").read_text())["skipped"] == [
        ["photos/IMG_0001.HEIC", heic]
    ]
