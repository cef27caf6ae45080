"""Embedded ICC colour profiles, applied as an image is decoded (`data`): its colours in sRGB.

A phone's photo (Display P3), a camera's Adobe RGB, a CMYK JPEG from print work or a grey
scan holds a profile that says what its numbers mean; read as sRGB numbers its colours are
off (Display P3's red 128 is sRGB's 141). The model trains, samples and is measured in sRGB,
so decoding converts them with LittleCMS (Pillow's ImageCms).

The rendering intent is perceptual, ICC's intent for photographs and Pillow's default. For
the matrix/shaper profiles of phones, cameras and grey scans LittleCMS reads it as relative
colorimetric: colours inside sRGB keep their measured values, those outside are clipped to
its edge. For the table-based profiles of CMYK print work it takes the perceptual table the
profile was made with for photographs, which maps the print gamut smoothly into sRGB.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageCms

INTENT = ImageCms.Intent.PERCEPTUAL
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))

# The colour space a profile must describe for each image mode (Pillow's names); other modes
# (LAB, HSV, 32-bit integer or float samples) are not converted.
_SPACES = {
    "RGB": "RGB",
    "RGBA": "RGB",
    "RGBX": "RGB",
    "P": "RGB",  # a palette is RGB
    "PA": "RGB",
    "L": "GRAY",
    "LA": "GRAY",
    "1": "GRAY",
    "CMYK": "CMYK",
}


class ProfileNotApplied(Exception):
    """The embedded profile cannot be used; ``reason`` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def to_srgb(im: Image.Image, icc: bytes) -> Image.Image:
    """``im`` with its embedded ICC profile ``icc`` applied: RGB, or RGBA when it has
    transparency (an alpha channel or a transparent colour), the alpha kept as it was.

    ``im`` itself, untouched, when the profile describes sRGB (:func:`_describes_srgb`), so such
    images decode exactly as images without a profile. Raises :class:`ProfileNotApplied` for a
    profile that cannot be read, or describes other colours than the image's (a grey profile on
    an RGB image), or an image mode that is not converted.
    """
    space = _SPACES.get(im.mode)
    if space is None:
        raise ProfileNotApplied(f"no colour conversion for {im.mode} images")
    alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
    if _describes_srgb(icc, space):
        return im  # the numbers are already sRGB
    if space == "GRAY":
        grey = im.convert("LA" if alpha else "L")
        rgb = ImageCms.applyTransform(
            grey.getchannel("L") if alpha else grey, _transform(icc, space, "L")
        )
        if alpha:
            rgb.putalpha(grey.getchannel("A"))
        return rgb
    mode = "CMYK" if space == "CMYK" else "RGBA" if alpha else "RGB"
    return ImageCms.applyTransform(im.convert(mode), _transform(icc, space, mode))


@functools.lru_cache(maxsize=16)
def _describes_srgb(icc: bytes, space: str) -> bool:
    """True for a profile whose transform to sRGB moves no colour of a lattice through the
    cube (the grey ramp for a grey profile) by more than one level. That takes in every
    flavour of sRGB profile (IEC 61966-2.1's, the compact ones of browsers and phones,
    Apple's) without a list of their names. Raises ProfileNotApplied as `to_srgb` says."""
    if space == "CMYK":
        _transform(icc, space, "CMYK")  # a broken one is said so
        return False
    probe = _probe(space)
    transform = _transform(icc, space, "L" if space == "GRAY" else "RGB")
    moved = np.asarray(ImageCms.applyTransform(Image.fromarray(probe), transform))
    expected = probe if space == "RGB" else np.repeat(probe[..., None], 3, axis=-1)
    return int(np.abs(moved.astype(np.int16) - expected.astype(np.int16)).max()) <= 1


@functools.lru_cache(maxsize=16)
def _transform(icc: bytes, space: str, mode: str) -> ImageCms.ImageCmsTransform:
    """The transform from ``icc`` to sRGB for images of ``mode`` (to RGB, or RGBA from RGBA),
    made once per profile and mode in a process."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (OSError, ImageCms.PyCMSError) as exc:
        raise ProfileNotApplied(f"unreadable ICC profile ({exc})") from None
    described = profile.profile.xcolor_space.strip()
    if described != space:
        raise ProfileNotApplied(f"its ICC profile describes {described} colours, not {space}")
    try:
        return ImageCms.buildTransform(
            profile, _SRGB, mode, "RGBA" if mode == "RGBA" else "RGB", INTENT
        )
    except (OSError, ValueError, ImageCms.PyCMSError) as exc:
        raise ProfileNotApplied(f"unusable ICC profile ({exc})") from None


def _probe(space: str) -> np.ndarray:
    """Test colours: a 16^3 lattice of RGB (0, 17, ..., 255), or the 256 greys."""
    if space == "GRAY":
        return np.arange(256, dtype=np.uint8)[None]
    levels = np.arange(0, 256, 17, dtype=np.uint8)
    return np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(1, -1, 3)
