"""Values that settings and options share, read and written as text: one integer
(`as_integer`), and a classifier-free guidance interval in sigma ('LO,HI').
"""

from __future__ import annotations

import operator

from .config_fields import ConfigError


def as_integer(value: object) -> int | None:
    """`value` as an int if it is one integer: an int, a numpy integer, or a 0-d integer array
    or tensor (``torch.tensor(20)``, what a count computed in torch is); None for a bool (True
    is not 1 step), a float (even 20.0), a string, or an array or tensor of any shape but ().

    Reads what it is given through ``operator.index``, so torch need not be imported here.
    """
    if isinstance(value, bool) or getattr(value, "ndim", 0) != 0:
        return None
    item = getattr(value, "item", None)  # a 0-d bool tensor: operator.index makes it 1
    if callable(item) and isinstance(item(), bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_guidance_interval(interval: tuple[float, float]) -> tuple[float, float]:
    """(lo, hi) as floats with 0 <= lo < hi (hi may be inf): the noise levels
    sigma = noise_rate / signal_rate in (lo, hi] where classifier-free guidance applies.

    :raises ConfigError: naming the interval."""
    lo, hi = (float(x) for x in interval)
    if not 0.0 <= lo < hi:  # also refuses nan
        raise ConfigError(
            f"a guidance interval needs 0 <= LO < HI (HI may be inf), got {lo:g},{hi:g}"
        )
    return lo, hi


def parse_guidance_interval(text: str) -> tuple[float, float]:
    """'LO,HI' (e.g. '1,inf') -> a checked (lo, hi); see `check_guidance_interval`.

    :raises ConfigError: text that is not two numbers, or a bad interval."""
    parts = str(text).split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        interval = float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(
            f"a guidance interval is LO,HI in sigma (e.g. 1,inf), got {text!r}"
        ) from None
    return check_guidance_interval(interval)


def guidance_interval_words(interval: tuple[float, float]) -> str:
    """(1.0, inf) -> 'noise levels sigma in (1, inf]' (what the CLI and reports print)."""
    lo, hi = interval
    return f"noise levels sigma in ({lo:g}, {hi:g}]"


def guidance_interval_text(interval: tuple[float, float]) -> str:
    """(1.0, inf) -> '1,inf' (what `parse_guidance_interval` reads)."""
    return ",".join(f"{x:g}" for x in interval)
