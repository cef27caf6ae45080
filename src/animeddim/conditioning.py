"""Attribute conditioning outside the network: asked values -> codes, the training-time drop.

A conditional model's vocabulary (``model.vocabulary``: attribute -> values in code order)
says what it can be asked. Codes are an [N x A] int64 tensor in the vocabulary's attribute
order, :data:`NULL` (-1) for an attribute not asked (or dropped in training).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .config import ConfigError
from .labels import canonical, quoted

NULL = -1  # labels.NULL, unet.NULL


class UnknownAttribute(ConfigError):
    """An attribute or value the model does not know, or a malformed NAME=VALUE (a user
    error); the message lists the known ones."""


def parse_assignments(items: Sequence[str], flag: str = "--attr") -> dict[str, str]:
    """``["hair_color=#ab2a18", "glasses=yes"]`` -> ``{"hair_color": "#ab2a18", ...}``
    (names and values stripped and in NFC, as labels are read: `labels.canonical`)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = (canonical(x.strip()) for x in item.partition("="))
        if not sep or not name or not value:
            raise UnknownAttribute(f"{flag} {item!r}: expected NAME=VALUE")
        if name in out:
            raise UnknownAttribute(f"{flag}: {name} is given twice")
        out[name] = value
    return out


def parse_attribute_weights(text: str) -> dict[str, float]:
    """'hair_len=16,skin=10' -> {'hair_len': 16.0, 'skin': 10.0}: per-attribute guidance
    weights (`diffusion.guidance.Guided`); 'none' or '' -> {} (every attribute at w).

    :raises ConfigError: an item that is not NAME=W with W a number >= 0, or a name twice."""
    out: dict[str, float] = {}
    if str(text).strip().lower() in ("", "none"):
        return out
    for item in str(text).split(","):
        name, sep, value = (x.strip() for x in item.partition("="))
        try:
            w = float(value) if sep and name else math.nan
        except ValueError:
            w = math.nan
        if not (math.isfinite(w) and w >= 0.0):
            raise ConfigError(
                f"a per-attribute guidance weight is NAME=W with W a number >= 0 (e.g. "
                f"hair_len=16), got {item.strip()!r}"
            )
        if name in out:
            raise ConfigError(f"per-attribute guidance weights: {name} is given twice")
        out[name] = w
    return out


def attribute_weights_text(weights: dict[str, float]) -> str:
    """{'hair_len': 16.0} -> 'hair_len=16' (what `parse_attribute_weights` reads); {} -> 'none'."""
    return ",".join(f"{k}={w:g}" for k, w in weights.items()) or "none"


def check_attribute(vocab: Mapping[str, Sequence[str]], name: str) -> None:
    if not vocab:
        raise UnknownAttribute(
            f"the model is unconditional: it knows no attributes (asked for {name!r})"
        )
    if name not in vocab:
        raise UnknownAttribute(
            f"the model knows no attribute {name!r}; known attributes: {quoted(vocab)}"
        )


def encode(vocab: Mapping[str, Sequence[str]], asked: Mapping[str, str]) -> torch.Tensor:
    """The [A] codes of one set of asked values (NULL where an attribute is not asked); names
    and values match in NFC (`labels.canonical`), whichever form the vocabulary holds."""
    codes = torch.full((len(vocab),), NULL, dtype=torch.long)
    names = list(vocab)
    spelled = {canonical(n): n for n in names}
    for name, value in asked.items():
        name = spelled.get(canonical(name), name)
        check_attribute(vocab, name)
        values = [canonical(v) for v in vocab[name]]
        value = canonical(value)
        if value not in values:
            raise UnknownAttribute(
                f"the model knows no {name} value {value!r}; known {name} values: {quoted(values)}"
            )
        codes[names.index(name)] = values.index(value)
    return codes


def drop_generator(
    seed: int, epoch: int, batch: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """The generator of the attribute drops of global training batch `batch` of `epoch`, on
    the device of the codes it drops (a CUDA draw needs no copy from the host, which would
    wait for the GPU at every step)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_033 + epoch * 104_729 + batch * 31 + 5) % 2**63)
    return g


def drop_attributes(
    codes: torch.Tensor,
    p: float,
    generator: torch.Generator,
    *,
    global_rows: int | None = None,
    first_row: int = 0,
) -> torch.Tensor:
    """Codes with each entry set to NULL independently with probability p.

    :param codes: [b x A] codes: rows first_row .. first_row + b - 1 of a global batch of
        `global_rows` rows (default b). One number is drawn per entry of the global batch, so
        the drops of a row do not depend on the number of processes.
    """
    rows, attrs = codes.shape
    draws = torch.rand((global_rows or rows, attrs), generator=generator, device=generator.device)
    drop = draws[first_row : first_row + rows].to(codes.device) < p
    return torch.where(drop, torch.full_like(codes, NULL), codes)
