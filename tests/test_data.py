"""Tests for animeddim.data: decoding odd files, folders, caches, splits and batches."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import struct
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from animeddim import data
from animeddim import io as animeddim_io
from animeddim.batches import device_images, epoch_order, iterate_batches, num_batches
from animeddim.data import (
    BadImage,
    DataError,
    Skipped,
    SkippedFilesWarning,
    channel_stats,
    find_images,
    list_images,
    load_folder,
    load_image,
    split_indices,
)

RED, WHITE = (255, 0, 0), (255, 255, 255)


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, pixels: np.ndarray, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kwargs)
    return path


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _fake_size_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR (with a correct CRC) claims ``width`` x ``height``."""
    raw = bytearray(_png_bytes(np.zeros((1, 1, 3), np.uint8)))
    # Signature (8) + length (4) + b"IHDR" (4), then width and height as big-endian uint32.
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


# --------------------------------------------------------------------------------------------
# load_image: formats and modes


@pytest.mark.parametrize("ext", [".png", ".bmp", ".webp"])
def test_lossless_formats_roundtrip_exactly(tmp_path: Path, ext: str) -> None:
    pixels = _rgb(12, 20)
    kwargs = {"lossless": True} if ext == ".webp" else {}
    out = load_image(_save(tmp_path / f"a{ext}", pixels, **kwargs), None)
    assert out.dtype == np.uint8 and out.shape == (12, 20, 3)
    np.testing.assert_array_equal(out, pixels)


def test_jpeg_decodes_close_to_source(tmp_path: Path) -> None:
    pixels = np.full((16, 16, 3), (200, 40, 90), np.uint8)
    out = load_image(_save(tmp_path / "a.JPG", pixels, quality=95), None)
    assert np.abs(out.astype(int) - pixels).max() <= 4


def test_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = load_image(path, None)
    assert out.shape == (8, 8, 3)
    assert (out == RED).all()


@pytest.mark.parametrize(("orientation", "red_at"), [(6, "top"), (8, "bottom")])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, red_at: str) -> None:
    pixels = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 tall: red left half, blue right
    pixels[:, :20] = RED
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(tmp_path / "r.jpg", pixels, quality=95, exif=exif.tobytes())
    out = load_image(path, None)
    # Orientation 6 = rotate 90 degrees clockwise to display: the left half goes to the top;
    # 8 = counter-clockwise: it goes to the bottom.
    assert out.shape == (40, 20, 3)
    top, bottom = out[5, 10].astype(int), out[35, 10].astype(int)
    red, other = (top, bottom) if red_at == "top" else (bottom, top)
    assert red[0] > 200 and red[2] < 50
    assert other[2] > 200 and other[0] < 50


def test_a_decodable_image_with_corrupt_metadata_is_read_without_a_warning(
    tmp_path: Path,
) -> None:
    """Camera photos often carry EXIF that Pillow calls corrupt; it warned "Corrupt EXIF data"
    without naming the file (decoding workers printed it with a line of Pillow's source, once
    per worker). The pixels decode whole and are all that is used, so nothing is said."""
    pixels = np.full((8, 12, 3), (200, 40, 90), np.uint8)
    # An IFD that claims one more entry than its bytes hold.
    exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\xff\xff\xff\xff"
    path = _save(tmp_path / "photo.jpg", pixels, quality=95, exif=exif)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = load_image(path, None)
    assert [str(w.message) for w in caught] == []
    assert out.shape == (8, 12, 3) and np.abs(out.astype(int) - pixels).max() <= 4


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = load_image(_save(tmp_path / "g.png", gray), None)
    assert out.shape == (8, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    wide = np.array([[0, 32768, 65535, 257]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I")
    out = load_image(path, None)
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255, 1])


def test_16bit_grey_png_with_a_transparent_value_composites_on_white(tmp_path: Path) -> None:
    """A 16-bit grey PNG marks one value transparent (tRNS); its pixels kept that grey (1000 ->
    4) where every other transparent background is composited on white."""
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[1000, 65535, 0, 1001]], np.uint16)).save(path, transparency=1000)
    out = load_image(path, None)
    np.testing.assert_array_equal(out[0, :, 0], [255, 255, 0, 4])
    assert (out == out[..., :1]).all()


def test_palette_with_transparency_composites_on_white(tmp_path: Path) -> None:
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 0)  # index 0 is the transparent one
    path = tmp_path / "p.png"
    im.save(path, transparency=0)
    out = load_image(path, None)
    assert tuple(out[0, 0]) == WHITE
    assert tuple(out[1, 1]) == RED


def test_rgba_and_la_composite_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # fully transparent red -> white
    rgba[0, 1] = (255, 0, 0, 255)  # opaque red
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    out = load_image(_save(tmp_path / "a.png", rgba), None)
    assert tuple(out[0, 0]) == WHITE
    assert tuple(out[0, 1]) == RED
    assert np.all(np.abs(out[1, 0].astype(int) - 127) <= 1)

    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    la.save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png", None)
    assert tuple(out[0, 0]) == WHITE
    assert tuple(out[0, 1]) == (0, 0, 0)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=95)
    out = load_image(path, None)
    assert out.shape == (8, 8, 3)
    r, g, b = out[4, 4].astype(int)
    assert r > 220 and g < 40 and b < 40


def test_tiff_images_are_read_and_float_ones_refused_with_the_reason(tmp_path: Path) -> None:
    """TIFF files were passed over without a word (not an image extension). 8- and 16-bit
    TIFFs decode as PNGs do; 32-bit float samples have no range to read them in, and decoded
    all black, so such a file is skipped with the reason."""
    pixels = _rgb(6, 6)
    _save(tmp_path / "a.tif", pixels)
    _save(tmp_path / "b.TIFF", pixels[..., 0].astype(np.uint16) * 257)  # 16-bit grey
    Image.fromarray(pixels[..., 0].astype(np.float32) / 255).save(tmp_path / "c.tif")
    assert [p.name for p in find_images(tmp_path)] == ["a.tif", "b.TIFF", "c.tif"]
    assert np.array_equal(load_image(tmp_path / "a.tif", None), pixels)
    grey = load_image(tmp_path / "b.TIFF", None)
    assert np.array_equal(grey, np.repeat(pixels[..., :1], 3, axis=2))
    with pytest.warns(SkippedFilesWarning):
        s = load_folder(tmp_path, 6, workers=1)
    assert [Path(p).name for p in s.paths] == ["a.tif", "b.TIFF"]
    reasons = {Path(k.path).name: k.reason for k in s.skipped}
    assert reasons == {"c.tif": "floating-point pixels (mode F): save it with 8- or 16-bit samples"}


def test_tiffs_with_32_bit_or_signed_integer_samples_are_refused_with_the_reason(
    tmp_path: Path,
) -> None:
    """A TIFF of 32-bit integer samples (a scientific camera's, a depth map) opens as mode I,
    read as 16-bit data: every value above 65535 was clipped, so the image trained as all
    white; signed samples lost their negative half to black. Such files are skipped with the
    reason; 16-bit data that Pillow hands over as mode I (values 0..65535) is read as before."""
    grey = np.arange(36, dtype=np.int32).reshape(6, 6)
    Image.fromarray(grey * 1_000_000).save(tmp_path / "wide.tif")
    Image.fromarray(grey - 20).save(tmp_path / "signed.tif")
    Image.fromarray(grey * 1800).save(tmp_path / "i16.tif")  # mode I, 0 .. 63,000
    assert Image.open(tmp_path / "wide.tif").mode == "I"
    with pytest.warns(SkippedFilesWarning):
        s = load_folder(tmp_path, 6, workers=1)
    assert [Path(p).name for p in s.paths] == ["i16.tif"]
    assert np.array_equal(s.images[0, ..., 0], np.rint(grey * 1800 / 257).astype(np.uint8))
    reasons = {Path(k.path).name: k.reason for k in s.skipped}
    assert reasons == {
        "signed.tif": "32-bit or signed integer pixels (mode I, values -20..15): save it with "
        "8- or 16-bit samples",
        "wide.tif": "32-bit or signed integer pixels (mode I, values 0..35000000): save it with "
        "8- or 16-bit samples",
    }


def test_jfif_jpe_avif_and_apng_files_are_images(tmp_path: Path) -> None:
    """JPEGs saved by a browser as .jfif or .jpe, AVIF photos and animated PNGs (.apng) were
    passed over without a word (not an image extension), though Pillow reads them all."""
    pixels = np.full((8, 8, 3), (200, 40, 90), np.uint8)
    _save(tmp_path / "a.jfif", pixels, format="JPEG", quality=95)
    _save(tmp_path / "b.JPE", pixels, format="JPEG", quality=95)
    _save(tmp_path / "c.apng", pixels, format="PNG")
    names = ["a.jfif", "b.JPE", "c.apng"]
    if features.check("avif"):  # Pillow's wheels have it; a build without it skips the file
        _save(tmp_path / "d.avif", pixels, quality=95)
        names.append("d.avif")
    assert [p.name for p in find_images(tmp_path)] == names
    s = load_folder(tmp_path, 8, workers=1)
    assert [Path(p).name for p in s.paths] == names and s.skipped == []
    assert np.abs(s.images.astype(int) - pixels).max() <= 8


def test_one_pixel_image_is_resized_up(tmp_path: Path) -> None:
    out = load_image(_save(tmp_path / "dot.png", np.full((1, 1, 3), 77, np.uint8)), 16)
    assert out.shape == (16, 16, 3)
    assert (out == 77).all()


def test_centre_crop_keeps_the_centre(tmp_path: Path) -> None:
    pixels = np.zeros((16, 48, 3), np.uint8)  # 48 wide: left and right thirds red, centre green
    pixels[:, :16] = RED
    pixels[:, 32:] = RED
    pixels[:, 16:32] = (0, 255, 0)
    out = load_image(_save(tmp_path / "wide.png", pixels), 8)
    assert out.shape == (8, 8, 3)
    assert (out == (0, 255, 0)).all()


def test_resize_is_antialiased(tmp_path: Path) -> None:
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255  # 1-pixel stripes: a point-sampling resize would give 0 or 255
    out = load_image(_save(tmp_path / "s.png", stripes), 8)
    assert np.abs(out.astype(int) - 127).max() <= 10


# --------------------------------------------------------------------------------------------
# load_image: files that must be refused


def _reason(path: Path) -> str:
    with pytest.raises(BadImage) as info:
        load_image(path, 8)
    return info.value.reason


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "z.png").write_bytes(b"")
    assert "empty" in _reason(tmp_path / "z.png")


def test_text_named_png(tmp_path: Path) -> None:
    (tmp_path / "t.png").write_text("definitely not a picture\n")
    assert "not an image" in _reason(tmp_path / "t.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused(tmp_path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert "truncated" in _reason(path)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path / "locked.png", _rgb(4, 4))
    if os.geteuid() == 0:
        # root reads anything whatever the mode bits, so simulate what open() would raise.
        def deny(*args: object, **kwargs: object) -> None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(data, "open", deny, raising=False)
    else:
        path.chmod(0)
    try:
        assert _reason(path) == "permission denied"
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (9000, 9000)])
def test_decompression_bomb_is_refused_without_allocating(
    tmp_path: Path, width: int, height: int
) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_fake_size_png(width, height))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        reason = _reason(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "too large" in reason and "bomb" in reason
    assert peak < 100 * 1024**2
    assert time.perf_counter() - start < 5


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.binary(max_size=4096),
    prefix=st.sampled_from([b"", "png-header", "png-half"]),
    size=st.sampled_from([None, 8]),
)
def test_random_bytes_decode_or_raise_bad_image(
    payload: bytes, prefix: bytes | str, size: int | None
) -> None:
    valid = _png_bytes(_rgb(6, 5))
    head = {"png-header": valid[:33], "png-half": valid[: len(valid) // 2]}.get(prefix, b"")
    try:
        out = data._decode(bytes(head) + payload, size)
    except BadImage as exc:
        assert exc.reason
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    if size is not None:
        assert out.shape == (size, size, 3)


# --------------------------------------------------------------------------------------------
# Folders


def test_find_images_recurses_sorted_case_insensitive(tmp_path: Path) -> None:
    for rel in ["b.PNG", "a/z.jpg", "a/c.JpEg", "A2/x.gif", "notes.txt", "a/deep/d.webp"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    rels = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert rels == ["A2/x.gif", "a/c.JpEg", "a/deep/d.webp", "a/z.jpg", "b.PNG"]


def test_find_images_survives_symlink_loop(tmp_path: Path) -> None:
    _save(tmp_path / "sub" / "img.png", _rgb(4, 4))
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)
    found = find_images(tmp_path)
    assert [p.name for p in found] == ["img.png"]


def test_broken_links_are_reported_not_hidden(tmp_path: Path) -> None:
    """A link whose target is gone (an unmounted drive) was left out without a word: a folder
    of them said "no files with extensions .png, ... found"."""
    _save(tmp_path / "ok.png", _rgb(4, 4))
    (tmp_path / "gone.png").symlink_to(tmp_path / "elsewhere" / "gone.png")
    (tmp_path / "self.jpg").symlink_to(tmp_path / "self.jpg")  # a link to itself
    (tmp_path / "notes.txt").symlink_to(tmp_path / "missing.txt")  # no image name: not listed
    assert [p.name for p in find_images(tmp_path)] == ["gone.png", "ok.png", "self.jpg"]
    with pytest.warns(SkippedFilesWarning) as caught:
        s = load_folder(tmp_path, 4, workers=1)
    assert [Path(p).name for p in s.paths] == ["ok.png"]
    reasons = {Path(k.path).name: k.reason for k in s.skipped}
    assert reasons["gone.png"] == f"broken symbolic link (to '{tmp_path}/elsewhere/gone.png')"
    assert "Too many levels of symbolic links" in reasons["self.jpg"]
    assert "broken symbolic link" in str(caught[0].message)
    os.remove(tmp_path / "ok.png")
    with pytest.raises(DataError, match=r"2 files tried, 2 skipped \(first: .*broken symbolic"):
        load_folder(tmp_path, 4, workers=1)


def test_links_that_lead_nowhere_leave_the_data_fingerprint_as_it_was(tmp_path: Path) -> None:
    """Listing broken links (for their skip note) must not change a run's data fingerprint:
    a run started before they were listed was refused on --resume as "changed data"."""
    from animeddim.run_folder import data_fingerprint

    _save(tmp_path / "a.png", _rgb(4, 4))
    _save(tmp_path / "b.png", _rgb(4, 4))
    before = data_fingerprint(find_images(tmp_path), tmp_path)
    (tmp_path / "gone.png").symlink_to(tmp_path / "elsewhere" / "gone.png")
    (tmp_path / "self.jpg").symlink_to(tmp_path / "self.jpg")
    assert len(find_images(tmp_path)) == 4
    assert data_fingerprint(find_images(tmp_path), tmp_path) == before
    (tmp_path / "c.png").symlink_to(tmp_path / "a.png")  # a link to an image is an image
    assert data_fingerprint(find_images(tmp_path), tmp_path) != before


def test_a_file_name_that_is_not_utf8_is_read_and_fingerprinted(tmp_path: Path) -> None:
    """A name in Latin-1 (b'caf\\xe9.png', from an old archive or a Windows share) is not UTF-8:
    `train` ended in a UnicodeEncodeError traceback while taking the data's fingerprint. It is
    read like any image, and UTF-8 names keep the fingerprint earlier runs recorded."""
    from animeddim.run_folder import data_fingerprint

    _save(tmp_path / "grün.png", _rgb(4, 4))
    size = (tmp_path / "grün.png").stat().st_size
    expected = hashlib.sha256(f"grün.png\0{size}\n".encode()).hexdigest()[:32]
    assert data_fingerprint(find_images(tmp_path), tmp_path) == f"1:{expected}"
    try:
        _save(Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.png")), _rgb(4, 4, 1))
    except (OSError, UnicodeError):
        pytest.skip("this file system takes UTF-8 names only")
    assert len(load_folder(tmp_path, 4, workers=1).paths) == 2
    assert data_fingerprint(find_images(tmp_path), tmp_path).startswith("2:")


def test_find_images_missing_or_not_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        find_images(tmp_path / "f.png")


def _mixed_folder(root: Path) -> None:
    _save(root / "a.png", _rgb(10, 12, 1))
    _save(root / "sub" / "b.jpg", _rgb(12, 10, 2), quality=95)
    _save(root / "sub" / "deeper" / "c.bmp", _rgb(8, 8, 3))
    (root / "sub" / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("hello")


def test_load_folder_skips_and_warns(tmp_path: Path) -> None:
    _mixed_folder(tmp_path)
    with pytest.warns(SkippedFilesWarning, match="skipped 2 of 5") as record:
        result = load_folder(tmp_path, 8, workers=1)
    message = str(record[0].message)
    assert "empty.png" in message and "text.png" in message
    assert result.images.shape == (3, 8, 8, 3) and result.images.dtype == np.uint8
    assert [Path(p).name for p in result.paths] == ["a.png", "b.jpg", "c.bmp"]
    assert sorted(Path(s.path).name for s in result.skipped) == ["empty.png", "text.png"]
    np.testing.assert_array_equal(result.images[0], load_image(tmp_path / "a.png", 8))


def test_a_skipped_file_whose_name_holds_a_newline_is_noted_on_one_line(tmp_path: Path) -> None:
    """A newline may be part of a file name; the skip note (one line, as every note) broke in
    two at it. Control characters are shown escaped, other characters as they are."""
    _save(tmp_path / "good.png", _rgb(4, 4))
    (tmp_path / "bad\nnäme\t.png").write_text("not a picture")
    with pytest.warns(SkippedFilesWarning) as record:
        load_folder(tmp_path, 4, workers=1)
    (message,) = [str(w.message) for w in record]
    assert "\n" not in message and "\t" not in message
    assert f"{tmp_path}/bad\\nnäme\\t.png: not an image" in message
    (tmp_path / "good.png").unlink()
    with pytest.raises(DataError, match=r"\(first: .*/bad\\nnäme\\t\.png: not an image"):
        load_folder(tmp_path, 4, workers=1)


def test_load_folder_strict_raises(tmp_path: Path) -> None:
    _mixed_folder(tmp_path)
    with pytest.raises(DataError, match="empty.png"):
        load_folder(tmp_path, 8, workers=1, strict=True)


def test_load_folder_without_usable_images(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"no usable image in folder '{tmp_path}'"):
        load_folder(tmp_path, 8)
    (tmp_path / "x.png").write_text("nope")
    (tmp_path / "y.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="2 files tried, 2 skipped"):
        load_folder(tmp_path, 8)
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "missing", 8)


def test_one_file_tried_is_said_in_the_singular(tmp_path: Path) -> None:
    """A folder holding one undecodable file said "1 files tried" (and the skip note with an
    unreadable subfolder "skipped 1 of 1 files"); one file is "1 file"."""
    (tmp_path / "x.png").write_text("nope")
    with pytest.raises(DataError, match=r"': 1 file tried, 1 skipped \(first: "):
        load_folder(tmp_path, 8)
    one = [Skipped("x.png", "empty file"), Skipped("sub/", "folder not read: permission denied")]
    note = "skipped 1 of 1 file that could not be decoded and could not read 1 folder: "
    assert data.skip_summary(one, 2).startswith(note)
    assert data.skip_summary(one[:1], 2).startswith("skipped 1 of 2 files that could not be ")


def test_load_folder_with_process_pool_matches_serial(tmp_path: Path) -> None:
    for i in range(40):
        _save(tmp_path / f"{i:02d}.png", _rgb(9, 11, i))
    serial = load_folder(tmp_path, 8, workers=1)
    pooled = load_folder(tmp_path, 8, workers=2)
    np.testing.assert_array_equal(serial.images, pooled.images)
    assert serial.paths == pooled.paths


def test_disk_cache_is_reused_and_invalidated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    for i in range(4):
        _save(root / f"{i}.png", _rgb(10, 10, i))
    first = load_folder(root, 8, cache="disk", cache_dir=cache)
    assert isinstance(first.images, np.memmap)
    expected = np.array(first.images)

    def refuse(path: str, size: int, profiles: bool = True) -> None:
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(data, "_decode_path", refuse)
    again = load_folder(root, 8, cache="disk", cache_dir=cache)
    np.testing.assert_array_equal(again.images, expected)
    assert again.paths == first.paths
    monkeypatch.undo()

    _save(root / "4.png", _rgb(10, 10, 4))  # a new file: new cache entry
    grown = load_folder(root, 8, cache="disk", cache_dir=cache)
    assert len(grown.images) == 5
    _save(root / "0.png", _rgb(10, 10, 99))  # changed content (size/mtime): decoded afresh
    os.utime(root / "0.png", ns=(1, 1))
    changed = load_folder(root, 8, cache="disk", cache_dir=cache)
    np.testing.assert_array_equal(changed.images[0], load_image(root / "0.png", 8))
    assert not [p for p in cache.iterdir() if animeddim_io.is_temp_name(p.name)]


def test_disk_cache_decodes_under_the_io_temp_name_and_leaves_nothing_on_failure(
    tmp_path: Path, monkeypatch
) -> None:
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    root.mkdir()
    for i in range(3):
        _save(root / f"{i}.png", _rgb(10, 10, i))
    seen: list[str] = []

    def fail(mm, files, size, workers, progress, profiles):
        seen.extend(p.name for p in cache.iterdir())
        raise RuntimeError("decoding stopped")

    monkeypatch.setattr(data, "_decode_into", fail)
    with pytest.raises(RuntimeError, match="decoding stopped"):
        load_folder(root, 8, cache="disk", cache_dir=cache)
    assert len(seen) == 1 and seen[0].endswith(f".u8.tmp-{os.getpid()}"), seen
    assert animeddim_io.is_temp_name(seen[0])
    assert not list(cache.iterdir())


def test_a_disk_cache_whose_record_cannot_be_written_leaves_no_pixels_behind(
    tmp_path: Path, monkeypatch
) -> None:
    """A full disk as the record (KEY.json: skip reasons, the images enlarged) is written,
    after the pixels (KEY.u8) are in place: the error names the record, and the pixels,
    which no read takes without it, go (before: left behind, as large as the decoded folder,
    on the disk that had filled up)."""
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    root.mkdir()
    for i in range(3):
        _save(root / f"{i}.png", _rgb(10, 10, i))
    real = open

    def full(path, mode="r", *a, **kw):
        if "w" in mode and str(path).endswith(f".json.tmp-{os.getpid()}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, mode, *a, **kw)

    monkeypatch.setattr(animeddim_io, "open", full, raising=False)
    with pytest.raises(OSError, match="No space left on device") as failed:
        load_folder(root, 8, cache="disk", cache_dir=cache)
    assert failed.value.filename.endswith(".json") and Path(failed.value.filename).parent == cache
    assert not list(cache.iterdir())
    monkeypatch.undo()
    assert len(load_folder(root, 8, cache="disk", cache_dir=cache).paths) == 3
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".u8"]


def test_disk_cache_remembers_skipped(tmp_path: Path) -> None:
    _mixed_folder(tmp_path / "imgs")
    with pytest.warns(SkippedFilesWarning):
        load_folder(tmp_path / "imgs", 8, cache="disk", cache_dir=tmp_path / "c")
    with pytest.warns(SkippedFilesWarning, match="skipped 2 of 5"):
        again = load_folder(tmp_path / "imgs", 8, cache="disk", cache_dir=tmp_path / "c")
    assert len(again.images) == 3 and len(again.skipped) == 2


# --------------------------------------------------------------------------------------------
# Splits and statistics


def test_split_is_deterministic_disjoint_and_complete() -> None:
    train, val = split_indices(100, 0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(100))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    again = split_indices(100, 0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, split_indices(100, 0.2, seed=4)[1])


def test_split_edge_cases() -> None:
    assert [len(a) for a in split_indices(2, 0.01, 0)] == [1, 1]  # at least one validation image
    assert [len(a) for a in split_indices(5, 0.0, 0)] == [5, 0]
    assert [len(a) for a in split_indices(1, 0.5, 0)] == [1, 0]  # training keeps at least one
    assert [len(a) for a in split_indices(3, 0.9, 0)] == [1, 2]
    with pytest.raises(DataError):
        split_indices(10, 1.0, 0)


def test_channel_stats_match_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.random.default_rng(0).integers(0, 256, (30, 6, 6, 3), dtype=np.uint8)
    images[..., 2] //= 4  # channels differ
    idx = np.array([3, 1, 7, 20, 29])
    mean, std = channel_stats(images, idx)
    ref = images[idx].astype(np.float64) / 255
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std, ref.std(axis=(0, 1, 2)), rtol=1e-9)


# --------------------------------------------------------------------------------------------
# Batches


def _batches(images: np.ndarray, idx: np.ndarray, bs: int, **kw: object) -> list[torch.Tensor]:
    opts: dict = {"seed": 1, "epoch": 0, "shuffle": True, "flip": True, "drop_last": False}
    opts.update(kw)
    return list(iterate_batches(images, idx, bs, **opts))


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (50, 6, 6, 3), dtype=np.uint8)


def test_batches_are_float_nchw_in_unit_range(images: np.ndarray) -> None:
    batches = _batches(images, np.arange(10, 30), 8, shuffle=False, flip=False)
    assert [b.shape for b in batches] == [(8, 3, 6, 6), (8, 3, 6, 6), (4, 3, 6, 6)]
    first = batches[0]
    assert first.dtype == torch.float32 and first.is_contiguous()
    expected = torch.from_numpy(images[10:18]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(first, expected)


def test_batches_are_deterministic_and_epochs_differ(images: np.ndarray) -> None:
    idx = np.arange(50)
    a, b = _batches(images, idx, 16), _batches(images, idx, 16)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = _batches(images, idx, 16, epoch=1)
    assert not torch.equal(a[0], c[0])
    assert np.array_equal(epoch_order(50, 1, 0), epoch_order(50, 1, 0))
    assert sorted(epoch_order(50, 1, 0)) == list(range(50))


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_concatenate_to_the_single_process_batch(
    images: np.ndarray, world_size: int
) -> None:
    idx = np.arange(3, 47)
    single = _batches(images, idx, 8, drop_last=True)
    per_rank = [
        _batches(images, idx, 8, drop_last=True, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    assert all(len(r) == len(single) for r in per_rank)
    for b, whole in enumerate(single):
        assert torch.equal(torch.cat([r[b] for r in per_rank]), whole)


def test_start_batch_equals_dropping_batches(images: np.ndarray) -> None:
    idx = np.arange(50)
    full = _batches(images, idx, 8)
    resumed = _batches(images, idx, 8, start_batch=3)
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(x, y) for x, y in zip(full[3:], resumed, strict=True))


def test_flips_happen_about_half_the_time() -> None:
    images = np.random.default_rng(0).integers(0, 256, (400, 4, 4, 3), dtype=np.uint8)
    batches = _batches(images, np.arange(400), 32, shuffle=False)
    x = torch.cat(batches)
    plain = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    flipped = (x == plain.flip(3)).flatten(1).all(1)
    unflipped = (x == plain).flatten(1).all(1)
    assert bool((flipped ^ unflipped).all())  # each image is exactly one of the two
    assert 140 < int(flipped.sum()) < 260


def test_drop_last_and_num_batches(images: np.ndarray) -> None:
    idx = np.arange(10)
    assert len(_batches(images, idx, 4, drop_last=True)) == num_batches(10, 4, True) == 2
    assert len(_batches(images, idx, 4, drop_last=False)) == num_batches(10, 4, False) == 3
    assert num_batches(8, 4, False) == num_batches(8, 4, True) == 2


def test_batch_size_must_divide_by_world_size(images: np.ndarray) -> None:
    with pytest.raises(DataError, match="divisible"):
        _batches(images, np.arange(10), 6, world_size=4)


def test_memmap_images_batch_like_arrays(tmp_path: Path, images: np.ndarray) -> None:
    mm = np.memmap(tmp_path / "x.u8", dtype=np.uint8, mode="w+", shape=images.shape)
    mm[:] = images
    mm.flush()
    ro = np.memmap(tmp_path / "x.u8", dtype=np.uint8, mode="r", shape=images.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "non-writable array" warning
        a = _batches(ro, np.arange(50), 16)
    b = _batches(images, np.arange(50), 16)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("drop_last", [True, False])
def test_a_cache_on_the_device_gives_the_host_batches(
    images: np.ndarray, world_size: int, drop_last: bool
) -> None:
    """The same order, flips, rank slices, resume point and label codes from a uint8 cache
    copied to the device once (`device_images`) as from the host array, bit for bit."""
    codes = np.random.default_rng(1).integers(0, 4, (50, 2)).astype(np.int64)
    on_device = device_images(images, torch.device("cpu"))
    assert on_device.dtype == torch.uint8 and on_device.shape == (50, 6, 6, 3)
    for rank in range(world_size):
        kw = {"drop_last": drop_last, "rank": rank, "world_size": world_size}
        kw |= {"codes": codes, "start_batch": 1, "epoch": 3}
        host = _batches(images, np.arange(3, 47), 8, **kw)
        device = _batches(on_device, np.arange(3, 47), 8, **kw)
        assert len(host) == len(device) == num_batches(44, 8, drop_last) - 1
        for (x, cx), (y, cy) in zip(host, device, strict=True):
            assert y.dtype == torch.float32 and y.is_contiguous()
            assert torch.equal(x, y) and torch.equal(cx, cy)
    flipped = _batches(on_device, np.arange(50), 50, shuffle=False)[0]
    plain = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert 0 < int((flipped == plain.flip(3)).flatten(1).all(1).sum()) < 50  # some, not all


def _nas_folder(root: Path) -> Path:
    """Two images, one in a subfolder, beside what a NAS, a desktop and zip tools add."""
    _save(root / "a.png", _rgb(8, 8, 1))
    _save(root / "sub" / "b.png", _rgb(8, 8, 2))
    for i, name in enumerate(
        [
            ".Trash-1000/files/old.png",
            "@eaDir/a.png/SYNOPHOTO_THUMB_M.jpg",
            "@eaDir/a.png/SYNOPHOTO_THUMB_S.jpg",
            "__MACOSX/sub/b.png",
            "sub/.thumbnails/normal/b.png",
            ".git/shot.png",
            "sub/#recycle/c.png",
        ]
    ):
        _save(root / name, _rgb(8, 8, 10 + i))
    return root


def test_hidden_and_system_folders_are_passed_over_with_a_note(tmp_path: Path) -> None:
    """A folder copied from a NAS or a desktop holds '.Trash-1000/', '@eaDir/' (Synology's
    thumbnails), '__MACOSX/', '.thumbnails/', '.git/': their images were trained on without a
    word. They are passed over, counted in one note per folder walked (not a skip: --strict
    takes it)."""
    from animeddim.data import PassedOverWarning
    from animeddim.image_files import list_images

    root = _nas_folder(tmp_path / "d")
    assert [p.relative_to(root).as_posix() for p in find_images(root)] == ["a.png", "sub/b.png"]
    assert list_images(root).passed_over == {
        ".Trash-1000/": 1,
        ".git/": 1,
        "@eaDir/": 2,
        "__MACOSX/": 1,
        "sub/#recycle/": 1,
        "sub/.thumbnails/": 1,
    }
    assert len(find_images(root, everything=True)) == 9  # as they were listed before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = load_folder(root, 4, workers=1, strict=True)
    assert [Path(p).name for p in s.paths] == ["a.png", "b.png"] and s.skipped == []
    assert [(w.category, str(w.message)) for w in caught] == [
        (
            PassedOverWarning,
            "passed over 7 image files in hidden or system folders (thumbnails, trash, zip "
            "leftovers; not data): .Trash-1000/ (1), .git/ (1), @eaDir/ (2), __MACOSX/ (1), "
            "sub/#recycle/ (1), and 1 more",
        )
    ]
    # Only passed-over images: the error says where they are.
    only = tmp_path / "only"
    _save(only / "@eaDir" / "x.jpg", _rgb(8, 8))
    with pytest.raises(DataError, match=r"found \(passed over 1 image file in .*@eaDir/ \(1\)\)"):
        load_folder(only, 4, workers=1)
    # The folder given may itself be hidden; only what lies below it is passed over.
    hidden_root = tmp_path / ".cache" / "faces"
    _save(hidden_root / "x.png", _rgb(8, 8))
    assert [p.name for p in find_images(hidden_root)] == ["x.png"]


def test_a_folder_linked_from_a_hidden_one_is_still_read(tmp_path: Path) -> None:
    """A real folder is walked once: a link to it from a hidden folder must not take its
    images out of the data."""
    _save(tmp_path / "faces" / "x.png", _rgb(8, 8))
    (tmp_path / ".backup").mkdir()
    (tmp_path / ".backup" / "faces").symlink_to(tmp_path / "faces")
    (tmp_path / ".aaa").symlink_to(tmp_path / "faces")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == ["faces/x.png"]


# `train` options of a one-step run of a tiny network on 8-px images
TINY_TRAIN = ["--max-steps", 1, "--image-size", 16, "--widths", "8,16", "--block-depth", 1,
              "--batch-size", 2, "--no-kid", "--quiet", "--device", "cpu"]  # fmt: skip


def test_train_passes_over_hidden_folders_and_resumes_a_run_that_read_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train` notes what it passed over. A run started before hidden and system folders were
    passed over recorded the fingerprint of every image: it resumes on the images it began
    with (not refused as changed data), with a note; a folder changed since is still refused."""
    from conftest import run_main

    from animeddim.run_folder import data_fingerprint

    root = tmp_path / "d"
    for i in range(6):
        _save(root / f"{i}.png", _rgb(8, 8, i))
    _save(root / "@eaDir" / "0.png" / "SYNOPHOTO_THUMB_M.jpg", _rgb(8, 8, 9))
    _save(root / ".Trash-1000" / "files" / "z.png", _rgb(8, 8, 10))
    run = tmp_path / "run"
    rc, _, err = run_main(capsys, "train", "--data", root, "--out", run, *TINY_TRAIN)
    assert rc == 0, err
    assert "note: passed over 2 image files in hidden or system folders" in err
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["fingerprint"] == data_fingerprint(find_images(root), root)
    assert config["data"]["fingerprint"].startswith("6:")
    # What an earlier animeddim recorded for this folder: every image, hidden ones too.
    config["data"]["fingerprint"] = data_fingerprint(find_images(root, everything=True), root)
    (run / "config.json").write_text(json.dumps(config))
    rc, _, err = run_main(capsys, "train", "--resume", run, "--max-steps", 2, "--quiet")
    assert rc == 0, err
    assert f"this run started on '{root}' before its hidden files and hidden and system" in err
    assert json.loads((run / "config.json").read_text())["data"]["fingerprint"].startswith("8:")
    _save(root / "6.png", _rgb(8, 8, 6))
    rc, _, err = run_main(capsys, "train", "--resume", run, "--max-steps", 3, "--quiet")
    assert rc == 2 and "cannot resume on changed data" in err, err


def test_a_run_started_before_jfif_files_were_read_resumes_on_its_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """.jfif, .jpe, .avif and .apng files were not read before; a run started then on a folder
    holding some (and a NAS's thumbnails, read then) recorded the fingerprint of the images it
    read, and its resume was refused as changed data. It resumes on those images, with a note
    naming what a new run would also read; a folder changed since is still refused."""
    from conftest import run_main

    from animeddim.image_files import EARLIER_EXTENSIONS
    from animeddim.run_folder import data_fingerprint

    root = tmp_path / "d"
    for i in range(6):
        _save(root / f"{i}.png", _rgb(8, 8, i))
    _save(root / "x.jfif", _rgb(8, 8, 7), format="JPEG")
    _save(root / "@eaDir" / "0.png" / "SYNOPHOTO_THUMB_M.jpg", _rgb(8, 8, 9))
    run = tmp_path / "run"
    rc, _, err = run_main(capsys, "train", "--data", root, "--out", run, *TINY_TRAIN)
    assert rc == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["fingerprint"].startswith("7:")  # six PNGs and the .jfif
    # What an earlier animeddim recorded for this folder: the thumbnail, not the .jfif.
    earlier = [
        p for p in find_images(root, everything=True) if p.suffix.lower() in EARLIER_EXTENSIONS
    ]
    config["data"]["fingerprint"] = data_fingerprint(earlier, root)
    (run / "config.json").write_text(json.dumps(config))
    rc, _, err = run_main(capsys, "train", "--resume", run, "--max-steps", 2, "--quiet")
    assert rc == 0, err
    assert f"this run started on '{root}' before" in err and "x.jfif" in err
    assert json.loads((run / "config.json").read_text())["data"]["fingerprint"] == (
        data_fingerprint(earlier, root)
    )
    _save(root / "6.png", _rgb(8, 8, 6))
    rc, _, err = run_main(capsys, "train", "--resume", run, "--max-steps", 3, "--quiet")
    assert rc == 2 and "cannot resume on changed data" in err, err


def test_macos_appledouble_files_are_passed_over_not_skipped(tmp_path: Path, monkeypatch) -> None:
    """A folder copied from a Mac holds '._a.png' beside 'a.png' (a few hundred bytes of
    metadata): each was skipped as "not an image", a note as long as the folder, and --strict
    refused the folder. They are passed over like any hidden file, counted in one note; a run
    that started on the folder before resumes on it."""
    from animeddim.config import RunConfig
    from animeddim.data import PassedOverWarning
    from animeddim.run_folder import data_fingerprint
    from animeddim.train_data import _image_list_of_the_run

    for i in range(3):
        _save(tmp_path / "sub" / f"{i}.png", _rgb(8, 8, i))
        (tmp_path / "sub" / f"._{i}.png").write_bytes(b"\x00\x05\x16\x07" + bytes(200))
    _save(tmp_path / ".cover.png", _rgb(8, 8, 7))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = load_folder(tmp_path, 4, workers=1, strict=True)
    assert len(s.paths) == 3 and s.skipped == []
    assert [(w.category, str(w.message)) for w in caught] == [
        (
            PassedOverWarning,
            "passed over 4 hidden image files (such as macOS's '._' metadata; not data): "
            ".cover.png, sub/._0.png, sub/._1.png, sub/._2.png",
        )
    ]
    _save(tmp_path / "@eaDir" / "t.jpg", _rgb(8, 8))
    with pytest.warns(PassedOverWarning, match=r"passed over 5 image files, hidden or in hidden "):
        load_folder(tmp_path, 4, workers=1)
    # A run started on the folder before recorded them in its fingerprint: not changed data.
    cfg = RunConfig()
    cfg.data.fingerprint = data_fingerprint(find_images(tmp_path, everything=True), tmp_path)
    assert cfg.data.fingerprint.startswith("8:")
    earlier = list_images(tmp_path, everything=True)  # the walk decoded: made once
    with pytest.warns(PassedOverWarning, match="goes on with the images it began with"):
        assert _image_list_of_the_run(cfg, tmp_path) == (earlier, cfg.data.fingerprint)
    with monkeypatch.context() as m, warnings.catch_warnings():  # under torchrun: said once
        m.setattr("animeddim.distributed.is_main", lambda: False)
        warnings.simplefilter("error", PassedOverWarning)
        assert _image_list_of_the_run(cfg, tmp_path) == (earlier, cfg.data.fingerprint)
    cfg.data.fingerprint = data_fingerprint(find_images(tmp_path), tmp_path)
    assert _image_list_of_the_run(cfg, tmp_path) == (list_images(tmp_path), cfg.data.fingerprint)


def test_heic_photos_and_unreadable_folders_are_noted_not_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HEIC photos (an iPhone's, which Pillow cannot read without a plugin) and a subfolder
    that cannot be read (permission denied) were left out without a word. Both are listed in
    the skip note with the reason (--strict refuses them); hidden and system folders are
    passed over as before, whatever they hold."""
    _save(tmp_path / "a.png", _rgb(8, 8, 1))
    _save(tmp_path / "b.png", _rgb(8, 8, 2))
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    (tmp_path / "c.heif").write_bytes(b"\x00\x00\x00\x18ftypheif" + bytes(64))
    _save(tmp_path / "sub" / "private" / "d.png", _rgb(8, 8, 3))
    (tmp_path / "@eaDir").mkdir()
    (tmp_path / "@eaDir" / "e.heic").write_bytes(bytes(8))
    (tmp_path / "._c.heic").write_bytes(bytes(8))
    real_scandir = os.scandir

    def scandir(path):  # root ignores permission bits: the refusal is injected
        if Path(path).name in ("private", "@eaDir"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    heic = (
        "HEIC/HEIF photo, not read: Pillow needs the pillow-heif plugin for it; convert it to "
        "JPEG or PNG"
    )
    with pytest.warns(SkippedFilesWarning) as caught:
        s = load_folder(tmp_path, 4, workers=1)
    assert [Path(p).name for p in s.paths] == ["a.png", "b.png"]
    assert str(caught[0].message) == (
        f"skipped 2 of 4 files that could not be decoded and could not read 1 folder: "
        f"{tmp_path}/IMG_0001.HEIC: {heic}; {tmp_path}/c.heif: {heic}; "
        f"{tmp_path}/sub/private/: folder not read: permission denied"
    )
    with pytest.raises(DataError, match=r"--strict: skipped 2 of 4 files .* 1 folder"):
        load_folder(tmp_path, 4, workers=1, strict=True)
    for name in ("a.png", "b.png", "IMG_0001.HEIC", "c.heif"):
        os.remove(tmp_path / name)
    with pytest.raises(DataError, match=r"': could not read 1 folder, its images not found: "):
        load_folder(tmp_path, 4, workers=1)
    monkeypatch.setattr(os, "scandir", real_scandir)
    only_heic = tmp_path / "phone"
    only_heic.mkdir()
    (only_heic / "IMG_0002.heic").write_bytes(bytes(8))
    with pytest.raises(DataError, match=r"1 file tried, 1 skipped \(first: .*pillow-heif"):
        load_folder(only_heic, 4, workers=1)


def test_an_unreadable_image_folder_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder given cannot be read: it said "no files with extensions .png, ... found"."""
    _save(tmp_path / "a.png", _rgb(8, 8))

    def scandir(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=f"cannot read image folder '{tmp_path}': permission"):
        load_folder(tmp_path, 4, workers=1)
