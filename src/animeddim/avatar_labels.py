"""Labels of the built-in DiceBear avatars, read from DiceBear's own resolved options.

DiceBear resolves every option of an avatar (hair style, colours, whether glasses are drawn...)
from its seed before it renders; ``Avatar(...).to_json()["options"]`` is that record. The labels
here are read from it, never guessed from pixels, so they are exactly what was drawn.

``--balanced`` forces the rare components (glasses, earrings, details: DiceBear draws each with
probability 10%) on for a share of the avatars by setting DiceBear's ``{name}Probability``
option to 100. DiceBear draws each option from its own seeded stream, so a forced avatar is the
plain one plus the forced component. The forced components are written beside the labels; the
labels themselves still come from the resolved options (earrings, for instance, are drawn only
under the hair styles that have an ear, so forcing them does not always show them).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Sequence
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

AVATAR_STYLE = "adventurer"
LABELS_FILE = "labels.csv"
FORCED_COLUMN = "forced"  # a note beside the labels, not an attribute
RARE = ("glasses", "earrings", "details")  # the components --balanced can force on
DEFAULT_BALANCED_SHARE = 0.5  # share of avatars each rare component is forced on in


@cache
def style_json() -> dict[str, Any]:
    """The style definition shipped in dicebear-styles (parsed once per process)."""
    text = files("dicebear_styles").joinpath(f"{AVATAR_STYLE}.json").read_text("utf-8")
    return json.loads(text)


def _variants(component: str) -> tuple[str, ...]:
    return tuple(style_json()["components"][component]["variants"])


def _colors(name: str) -> tuple[str, ...]:
    return tuple(style_json()["colors"][name]["values"])


@cache
def avatar_vocabulary() -> dict[str, tuple[str, ...]]:
    """Attribute -> its values in a fixed order, as users would type them."""
    return {
        "hair_color": (*_colors("hair"), "none"),  # none: a bald style (short19) shows no hair
        "skin": _colors("skin"),
        "hair_len": ("long", "short"),
        "hair": _variants("hair"),
        "glasses": ("no", "yes"),
        "earrings": ("no", "yes"),
        "details": ("none", *_variants("details")),
        "mouth": _variants("mouth"),
        "eyes": _variants("eyes"),
        "eyebrows": _variants("eyebrows"),
    }


AVATAR_ATTRIBUTES = tuple(avatar_vocabulary())


def _draw(seed: int, i: int, name: str) -> float:
    """A uniform number in [0, 1) that depends only on (seed, i, name)."""
    digest = hashlib.sha256(f"animeddim-balanced-{seed}-{i}-{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def forced_components(seed: int, i: int, share: float) -> tuple[str, ...]:
    """The rare components forced on for avatar ``i`` of set ``seed``: each independently, with
    probability ``share`` (0 = none, the plain DiceBear distribution)."""
    if share <= 0:
        return ()
    return tuple(name for name in RARE if _draw(seed, i, name) < share)


def avatar_options(seed: str, size: int, forced: Sequence[str] = ()) -> dict[str, Any]:
    """DiceBear options of one avatar: its seed string, size, and the forced components."""
    options: dict[str, Any] = {"seed": seed, "size": size}
    for name in forced:
        if name not in RARE:
            raise ValueError(f"cannot force {name!r}: choose from {', '.join(RARE)}")
        options[f"{name}Probability"] = 100
    return options


def labels_from_options(resolved: dict[str, Any]) -> dict[str, str]:
    """Attribute values of one avatar from DiceBear's resolved options (``to_json()["options"]``).

    A component that was not drawn has no ``{name}Variant`` entry in the resolved options, and a
    colour no drawn part uses (the hair colour under a bald style) has no ``{name}Color``.
    """
    hair = resolved["hairVariant"]
    return {
        "hair_color": resolved["hairColor"][0] if "hairColor" in resolved else "none",
        "skin": resolved["skinColor"][0],
        "hair_len": "long" if hair.startswith("long") else "short",
        "hair": hair,
        "glasses": "yes" if "glassesVariant" in resolved else "no",
        "earrings": "yes" if "earringsVariant" in resolved else "no",
        "details": resolved.get("detailsVariant", "none"),
        "mouth": resolved["mouthVariant"],
        "eyes": resolved["eyesVariant"],
        "eyebrows": resolved["eyebrowsVariant"],
    }


@cache
def _dicebear_style() -> Any:
    from dicebear import Style

    return Style(style_json())


def resolved_options(options: dict[str, Any]) -> dict[str, Any]:
    """DiceBear's resolved options of the avatar ``options`` describe."""
    from dicebear import Avatar

    return Avatar(_dicebear_style(), options).to_json()["options"]


def label_rows(
    names: Sequence[str],
    seeds: Sequence[str],
    forced: Sequence[Sequence[str]],
    size: int,
    progress: bool = False,
) -> list[dict[str, str]]:
    """One labels row per avatar: its file name, attribute values and forced components."""
    from tqdm import tqdm

    rows = []
    for name, seed, force in tqdm(
        list(zip(names, seeds, forced, strict=True)),
        desc="labels",
        unit="img",
        disable=not progress,
    ):
        labels = labels_from_options(resolved_options(avatar_options(seed, size, force)))
        rows.append({"file": name, **labels, FORCED_COLUMN: "+".join(force)})
    return rows


def write_labels_csv(path: Path, rows: list[dict[str, str]]) -> None:
    """Write ``file, <attributes...>, forced`` rows to ``path`` via a temporary file."""
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=["file", *AVATAR_ATTRIBUTES, FORCED_COLUMN], lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    from .io import write_text_atomic

    write_text_atomic(path, buf.getvalue())
