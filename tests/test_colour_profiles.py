"""Embedded ICC colour profiles: applied when images are decoded, so that their colours are the
sRGB colours the model trains on and is measured in; images without one, or with an sRGB one,
decode as before; a run started before profiles were applied resumes on the pixels it began
with.

The profiles are built here byte by byte (ICC.1 v2: a header, a tag table, XYZ colorants and
tone curves, or an 8-bit lookup table for CMYK), from published primaries, so the expected
sRGB values come from the published matrices, not from LittleCMS.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from animeddim import data
from animeddim.data import ProfileWarning, load_folder, load_image

# --------------------------------------------------------------------------------------------
# ICC profiles, byte by byte

D50 = np.array([0.9642, 1.0, 0.8249])  # the ICC profile connection space's white
D65_XY = (0.3127, 0.3290)
BRADFORD = np.array(
    [[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]]
)
DISPLAY_P3 = [(0.680, 0.320), (0.265, 0.690), (0.150, 0.060)]  # red, green, blue (x, y)
SRGB = [(0.640, 0.330), (0.300, 0.600), (0.150, 0.060)]

# CSS Color 4's matrices (w3.org/TR/css-color-4, "Sample code for color conversions"):
# linear Display P3 -> XYZ (D65), and XYZ (D65) -> linear sRGB.
P3_TO_XYZ = np.array(
    [
        [0.4865709486482162, 0.26566769316909306, 0.1982172852343625],
        [0.2289745640697488, 0.6917385218365064, 0.079286914093745],
        [0.0, 0.04511338185890264, 1.043944368900976],
    ]
)
XYZ_TO_SRGB = np.array(
    [
        [3.2409699419045226, -1.537383177570094, -0.4986107602930034],
        [-0.9692436362808796, 1.8759675015077202, 0.04155505740717559],
        [0.05563007969699366, -0.20397695888897652, 1.0569715142428786],
    ]
)


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _xyz(xyz) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15(v) for v in xyz)


def _srgb_curve() -> bytes:
    """parametricCurveType, function 3: the sRGB transfer function (Display P3 shares it)."""
    g, a, b, c, d = 2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045
    return b"para\0\0\0\0" + struct.pack(">HH", 3, 0) + b"".join(_s15(v) for v in (g, a, b, c, d))


def _gamma_curve(gamma: float) -> bytes:
    return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256))


def _profile(cls: bytes, space: bytes, pcs: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    text = b"animeddim test profile\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + bytes(12 + 67)
    tags = [(b"desc", desc), (b"wtpt", _xyz(D50)), *tags]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for sig, tag in tags:
        tag += bytes(-len(tag) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(tag))
        body += tag
    header = (
        struct.pack(">I", offset + len(body))
        + b"lcms"
        + bytes([2, 0x10, 0, 0])
        + cls
        + space
        + pcs
        + bytes(12)
        + b"acsp"
        + bytes(24)
        + bytes(4)  # rendering intent: perceptual
        + b"".join(_s15(v) for v in D50)
        + bytes(48)
    )
    return header + struct.pack(">I", len(tags)) + table + body


def rgb_profile(primaries: list[tuple[float, float]], nudge: float = 0.0) -> bytes:
    """A matrix/shaper RGB profile: D65 white, the sRGB curve, colorants adapted to D50
    (``nudge`` added to red's X and taken from green's Y: rounded otherwise)."""

    def xyz(x: float, y: float) -> np.ndarray:
        return np.array([x / y, 1.0, (1 - x - y) / y])

    white = xyz(*D65_XY)
    m = np.stack([xyz(*p) for p in primaries], axis=1)
    m = m * np.linalg.solve(m, white)  # RGB (1, 1, 1) is white
    adapt = np.linalg.inv(BRADFORD) @ np.diag((BRADFORD @ D50) / (BRADFORD @ white)) @ BRADFORD
    colorants = adapt @ m + np.array([[nudge, 0, 0], [0, -nudge, 0], [0, 0, 0]])
    tags = [(sig, _xyz(colorants[:, i])) for i, sig in enumerate((b"rXYZ", b"gXYZ", b"bXYZ"))]
    tags += [(sig, _srgb_curve()) for sig in (b"rTRC", b"gTRC", b"bTRC")]
    return _profile(b"mntr", b"RGB ", b"XYZ ", tags)


def grey_profile(gamma: float) -> bytes:
    return _profile(b"mntr", b"GRAY", b"XYZ ", [(b"kTRC", _gamma_curve(gamma))])


def cmyk_profile(corners: dict[tuple[int, int, int, int], tuple[int, int, int]]) -> bytes:
    """A CMYK printer profile whose A2B0 (lut8Type, 2 grid points per ink) takes each corner
    of the ink cube (0 or 1 of each ink) to the Lab colour of the sRGB colour given for it,
    and the others to the plain (1 - c)(1 - k), ... mix."""
    clut = b""
    for c, m, y, k in np.ndindex(2, 2, 2, 2):  # the first input varies slowest
        default = [round(255 * (1 - v) * (1 - k)) for v in (c, m, y)]
        lab = srgb_to_lab(np.array(corners.get((c, m, y, k), default), float))
        clut += bytes([round(lab[0] * 255 / 100), round(lab[1]) + 128, round(lab[2]) + 128])
    identity = b"".join(_s15(float(i == j)) for i in range(3) for j in range(3))
    ramp = bytes(range(256))
    lut = b"mft1\0\0\0\0" + bytes([4, 3, 2, 0]) + identity + ramp * 4 + clut + ramp * 3
    return _profile(b"prtr", b"CMYK", b"Lab ", [(b"A2B0", lut)])


# --------------------------------------------------------------------------------------------
# The published arithmetic the decoded values are checked against


def srgb_decode(v: np.ndarray) -> np.ndarray:
    """sRGB values 0..255 -> linear light 0..1 (IEC 61966-2-1)."""
    v = np.asarray(v, float) / 255
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def srgb_encode(lin: np.ndarray) -> np.ndarray:
    """Linear light -> sRGB values 0..255, clipped to the sRGB gamut as colorimetric rendering
    of a matrix/shaper profile does."""
    lin = np.clip(lin, 0, 1)
    return 255 * np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)


def p3_to_srgb(rgb: np.ndarray) -> np.ndarray:
    """Display P3 values (..., 3) -> sRGB values, by CSS Color 4's matrices."""
    lin = srgb_decode(rgb)  # Display P3 has the sRGB transfer function
    return srgb_encode(lin @ (XYZ_TO_SRGB @ P3_TO_XYZ).T)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB values -> CIELAB (D50, the ICC connection space), by CSS Color 4's arithmetic."""
    xyz65 = np.linalg.inv(XYZ_TO_SRGB) @ srgb_decode(rgb)
    d65 = np.array([0.3127 / 0.3290, 1.0, (1 - 0.3127 - 0.3290) / 0.3290])
    xyz = np.linalg.inv(BRADFORD) @ np.diag((BRADFORD @ D50) / (BRADFORD @ d65)) @ BRADFORD @ xyz65
    f = np.cbrt(xyz / D50)
    f = np.where(xyz / D50 > 216 / 24389, f, (24389 / 27 * xyz / D50 + 16) / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


# --------------------------------------------------------------------------------------------
# Images with profiles

COLOURS = np.array(  # pure red, half red, a skin tone, mid grey, pure green, white, black
    [[255, 0, 0], [128, 0, 0], [200, 150, 100], [128, 128, 128], [0, 255, 0], [255] * 3, [0] * 3],
    np.uint8,
)


def _blocks(colours: np.ndarray, side: int = 8) -> np.ndarray:
    """A row of flat side x side blocks, one per colour (flat, so JPEG keeps them)."""
    return np.repeat(np.repeat(colours[None], side, axis=0), side, axis=1)


def _centres(pixels: np.ndarray, n: int, side: int = 8) -> np.ndarray:
    return pixels[side // 2, side // 2 :: side][:n].astype(float)


def _save(path: Path, pixels: np.ndarray, icc: bytes | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"icc_profile": icc} if icc is not None else {}
    Image.fromarray(pixels).save(path, **extra, **kwargs)
    return path


def test_a_display_p3_photo_is_converted_to_srgb(tmp_path: Path) -> None:
    """A phone's photo in Display P3: its numbers are P3 numbers, and decoding converts them to
    the sRGB colours CSS Color 4's matrices give (P3's half red 128 is sRGB's 141), within a
    level for a PNG; pure red stays pure red (clipped to sRGB's edge). The JPEG, as a phone
    saves it, is checked against its own decoded P3 numbers."""
    p3 = rgb_profile(DISPLAY_P3)
    png = _save(tmp_path / "p3.png", _blocks(COLOURS), p3)
    got = _centres(load_image(png, None), len(COLOURS))
    want = p3_to_srgb(COLOURS)
    np.testing.assert_allclose(got, want, atol=1.0)
    assert got[1].tolist() == [141, 0, 0]  # read as sRGB numbers it was 128
    assert got[0].tolist() == [255, 0, 0] and got[4].tolist() == [0, 255, 0]

    jpeg = _save(tmp_path / "p3.jpg", _blocks(COLOURS), p3, quality=100)
    as_numbers = _centres(load_image(jpeg, None, profiles=False), len(COLOURS))
    np.testing.assert_allclose(_centres(load_image(jpeg, None), 7), p3_to_srgb(as_numbers), atol=1)
    # at the model's size too (the central square, resized, of the converted image)
    square = _save(tmp_path / "sq.png", np.full((32, 32, 3), (128, 0, 0), np.uint8), p3)
    assert load_image(square, 8)[4, 4].tolist() == [141, 0, 0]


def test_transparency_grey_and_palette_images_keep_their_alpha_when_converted(
    tmp_path: Path,
) -> None:
    """A P3 RGBA PNG: its colours converted, its transparent pixels still white. A grey image
    with a linear (gamma 1) grey profile: 128 is half the light, sRGB's 188; with alpha too."""
    rgba = np.array([[[128, 0, 0, 255], [128, 0, 0, 0]]], np.uint8)
    got = load_image(_save(tmp_path / "a.png", rgba, rgb_profile(DISPLAY_P3)), None)
    assert got.tolist() == [[[141, 0, 0], [255, 255, 255]]]
    palette = Image.fromarray(_blocks(COLOURS[:3], 2)).quantize(3)
    palette.save(tmp_path / "p.png", icc_profile=rgb_profile(DISPLAY_P3))
    got = _centres(load_image(tmp_path / "p.png", None), 3, 2)
    np.testing.assert_allclose(got, p3_to_srgb(COLOURS[:3]), atol=1.0)

    linear = grey_profile(1.0)
    grey = np.array([[0, 64, 128, 255]], np.uint8)
    want = np.round(srgb_encode(grey[0] / 255))  # linear light, encoded as sRGB
    got = load_image(_save(tmp_path / "g.png", grey, linear), None)
    np.testing.assert_allclose(got[0], np.repeat(want[:, None], 3, axis=1), atol=1.0)
    la = Image.fromarray(np.array([[[128, 255], [128, 0]]], np.uint8), mode="LA")
    la.save(tmp_path / "la.png", icc_profile=linear)
    got = load_image(tmp_path / "la.png", None)
    assert abs(int(got[0, 0, 0]) - int(want[2])) <= 1 and got[0, 1].tolist() == [255] * 3


def test_a_cmyk_jpeg_is_read_by_its_profile(tmp_path: Path) -> None:
    """A CMYK JPEG from print work: its profile says what its inks look like. Pure cyan ink
    printed as sRGB (30, 150, 210) and magenta as (230, 40, 140) decode so, where the plain
    conversion gives (0, 255, 255) and (255, 0, 255); the other ink corners of this profile
    are the plain mix."""
    cyan, magenta = (30, 150, 210), (230, 40, 140)
    icc = cmyk_profile({(1, 0, 0, 0): cyan, (0, 1, 0, 0): magenta})
    inks = [[255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 0, 0], [0, 0, 0, 255], [0, 255, 255, 0]]
    path = tmp_path / "print.jpg"
    cmyk = Image.fromarray(_blocks(np.array(inks, np.uint8)), mode="CMYK")
    cmyk.save(path, icc_profile=icc, quality=100)
    got = _centres(load_image(path, None), 5)
    np.testing.assert_allclose(got, [cyan, magenta, [255] * 3, [0] * 3, [255, 0, 0]], atol=3)
    plain = _centres(load_image(path, None, profiles=False), 2)
    assert plain.tolist() == [[0, 255, 255], [255, 0, 255]]


def test_images_without_a_profile_or_with_an_srgb_one_decode_as_before(tmp_path: Path) -> None:
    """No profile, Pillow's built-in sRGB profile, one made from sRGB's primaries (as phones
    and browsers embed), or one whose colorants are rounded otherwise (2e-4 off, as profile
    makers' differ; converted, it would move some colours by a level): the pixels are those
    read before profiles were applied, exactly, in every mode and format; a PNG's are its own
    numbers."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    builtin = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    made, rounded = rgb_profile(SRGB), rgb_profile(SRGB, nudge=2e-4)
    for name, icc in [("none", None), ("builtin", builtin), ("made", made), ("rounded", rounded)]:
        for ext, kwargs in [(".png", {}), (".jpg", {"quality": 90}), (".webp", {})]:
            path = _save(tmp_path / f"{name}{ext}", pixels, icc, **kwargs)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # and no note
                now = load_image(path, None)
            assert np.array_equal(now, load_image(path, None, profiles=False)), path
            assert np.array_equal(load_image(path, 8), load_image(path, 8, profiles=False))
            if ext == ".png":
                assert np.array_equal(now, pixels)
        rgba = np.dstack([pixels, rng.integers(0, 256, (24, 20), dtype=np.uint8)])
        path = _save(tmp_path / f"{name}-a.png", rgba, icc)
        assert np.array_equal(load_image(path, None), load_image(path, None, profiles=False))


def test_a_broken_profile_is_noted_once_and_the_image_read_as_before(tmp_path: Path) -> None:
    """A profile that cannot be read (cut short by a tool), or describes grey colours on an RGB
    image: the image is read as sRGB numbers, as before, not dropped; a folder's note lists the
    files with the reason, once."""
    root = tmp_path / "d"
    pixels = np.full((8, 8, 3), (128, 0, 0), np.uint8)
    _save(root / "ok.png", pixels, rgb_profile(DISPLAY_P3))
    cut = _save(root / "cut.png", pixels, rgb_profile(DISPLAY_P3)[:100])
    _save(root / "grey.png", pixels, grey_profile(2.2))
    with pytest.warns(ProfileWarning) as caught:
        folder = load_folder(root, 8, workers=1)
    notes = [str(w.message) for w in caught if w.category is ProfileWarning]
    assert len(notes) == 1, notes
    assert notes[0].startswith("read 2 files as sRGB, their embedded colour profile not applied")
    assert "cut.png: unreadable ICC profile" in notes[0]
    assert "grey.png: its ICC profile describes GRAY colours, not RGB" in notes[0]
    assert [Path(p).name for p in folder.paths] == ["cut.png", "grey.png", "ok.png"]
    assert [Path(s.path).name for s in folder.unconverted] == ["cut.png", "grey.png"]
    before = load_folder(root, 8, profiles=False)
    assert np.array_equal(folder.images[:2], before.images[:2])
    assert not np.array_equal(folder.images[2], before.images[2])  # ok.png was converted
    with pytest.warns(ProfileWarning, match=r"read 1 file as sRGB, its .*cut\.png"):
        assert np.array_equal(load_image(cut, None), load_image(cut, None, profiles=False))


def test_the_disk_cache_keeps_the_two_decodings_apart(tmp_path: Path) -> None:
    """The decoded-image cache on disk: a folder read with profiles and without them is two
    entries, each with its own pixels (an old run's cache entry is still its own)."""
    root, cache = tmp_path / "d", tmp_path / "cache"
    _save(root / "p3.png", np.full((8, 8, 3), (128, 0, 0), np.uint8), rgb_profile(DISPLAY_P3))
    for profiles in (True, False, True, False):
        got = load_folder(root, 8, cache="disk", cache_dir=cache, profiles=profiles)
        assert got.images[0, 4, 4].tolist() == ([141, 0, 0] if profiles else [128, 0, 0])
    assert len(list(cache.glob("*.u8"))) == 2


def test_the_feature_cache_keeps_the_two_decodings_apart(tmp_path: Path) -> None:
    """KID's cached Inception features of a folder: those of its images read with profiles and
    without them (a run started before profiles were applied) are two cache entries."""
    from test_metrics import FakeExtractor

    from animeddim.metrics import folder_features

    root, cache, fake = tmp_path / "d", tmp_path / "cache", FakeExtractor()
    for i in range(2):
        _save(root / f"{i}.png", _blocks(COLOURS[i : i + 1] // 2), rgb_profile(DISPLAY_P3))
    new = folder_features(root, fake, "standard", cache)
    old = folder_features(root, fake, "standard", cache, profiles=False)
    assert fake.calls == 2 and not np.allclose(new.numpy(), old.numpy())
    assert torch_equal(folder_features(root, fake, "standard", cache, profiles=False), old)
    assert torch_equal(folder_features(root, fake, "standard", cache), new)
    assert fake.calls == 2 and len(list(cache.iterdir())) == 2


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


# `train` options of a one-step run of a tiny network on 16-px images
TINY_TRAIN = ["--max-steps", 1, "--image-size", 16, "--widths", "8,16", "--block-depth", 1,
              "--batch-size", 2, "--no-kid", "--quiet", "--device", "cpu"]  # fmt: skip


def test_a_new_run_applies_profiles_and_one_started_before_resumes_on_its_pixels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new run records `data.colour_profiles: srgb` and trains on converted colours. A run
    started before profiles were applied (no record in its config.json or checkpoints) resumes
    on the very pixels it began with, the numbers read as sRGB, not refused as another run."""
    from conftest import run_main

    from animeddim import train_data

    root, rng = tmp_path / "d", np.random.default_rng(0)
    for i in range(6):
        _save(
            root / f"{i}.png", rng.integers(0, 256, (16, 16, 3), np.uint8), rgb_profile(DISPLAY_P3)
        )
    converted = data.load_folder(root, 16).images
    as_numbers = data.load_folder(root, 16, profiles=False).images
    assert not np.array_equal(converted, as_numbers)
    seen: list[np.ndarray] = []  # the images each run trains on
    load = data.load_folder

    def record(*args, **kwargs):
        imageset = load(*args, **kwargs)
        seen.append(np.array(imageset.images))
        return imageset

    monkeypatch.setattr(data, "load_folder", record)

    new = tmp_path / "new"
    rc, _, err = run_main(capsys, "train", "--data", root, "--out", new, *TINY_TRAIN)
    assert rc == 0, err
    assert json.loads((new / "config.json").read_text())["data"]["colour_profiles"] == "srgb"
    assert np.array_equal(seen[-1], converted)

    # A run as animeddim started it before profiles were applied: nothing recorded.
    with monkeypatch.context() as before:
        before.setattr(train_data, "PROFILES_TO_SRGB", "")
        old = tmp_path / "old"
        rc, _, err = run_main(capsys, "train", "--data", root, "--out", old, *TINY_TRAIN)
        assert rc == 0, err
    assert np.array_equal(seen[-1], as_numbers)
    config = json.loads((old / "config.json").read_text())
    del config["data"]["colour_profiles"]
    (old / "config.json").write_text(json.dumps(config))
    rc, _, err = run_main(capsys, "train", "--resume", old, "--max-steps", 2, "--quiet")
    assert rc == 0, err
    assert np.array_equal(seen[-1], as_numbers)
    assert json.loads((old / "config.json").read_text())["data"]["colour_profiles"] == ""


def test_data_prepare_applies_profiles_and_keeps_a_folder_prepared_before(tmp_path: Path) -> None:
    """`data prepare` writes the converted colours, notes a broken profile once and says so in
    its manifest. A folder it prepared from an archive before profiles were applied (its
    manifest says nothing of them) is kept as it is on a second prepare: runs trained on it
    resume on its files."""
    import zipfile

    from animeddim.datasets import prepare

    half_red = np.full((8, 8, 3), (128, 0, 0), np.uint8)
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, icc in [("p3.png", rgb_profile(DISPLAY_P3)), ("cut.png", b"acsp" * 8)]:
            buf = io.BytesIO()
            Image.fromarray(half_red).save(buf, format="PNG", icc_profile=icc)
            zf.writestr(name, buf.getvalue())
    out = tmp_path / "out"
    note = r"read 1 file as sRGB, its embedded colour profile not applied: cut\.png: unreadable"
    with pytest.warns(ProfileWarning, match=note):
        prepare(archive, out, size=8, workers=1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["colour_profiles"] == "srgb"
    assert [name for name, _ in manifest["unconverted"]] == ["cut.png"]
    written = [np.asarray(Image.open(out / f"{i:06d}.png"))[4, 4].tolist() for i in range(2)]
    assert written == [[141, 0, 0], [128, 0, 0]]  # archive order: p3.png, cut.png

    # The manifest of an earlier animeddim: prepared, profiles not applied.
    del manifest["colour_profiles"], manifest["unconverted"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    Image.fromarray(half_red).save(out / "000000.png")  # what it wrote for p3.png
    assert prepare(archive, out, size=8, workers=1) == out
    assert np.asarray(Image.open(out / "000000.png"))[4, 4].tolist() == [128, 0, 0]
