"""How a setting is declared (`setting`: its help, option flags, choices, minimum) and how a
value given for it is checked and converted (`check_declared`, `coerce`, `build`).

Nothing here knows a particular setting or imports torch; `config` declares them.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import field, fields
from typing import Any

from .words import counted


class ConfigError(ValueError):
    """A setting has a value animeddim cannot use; the message names it."""


def setting(
    default: Any,
    help: str,
    *,
    resume: bool = False,
    flag: str | tuple[str, ...] | None = None,
    choices: tuple[str, ...] | None = None,
    minimum: int | None = None,
    metavar: str | None = None,
    cli: bool = True,
    path: bool = False,
) -> Any:
    """A config field with what the CLI needs to offer it as an option.

    :param help: one line; the CLI adds the default.
    :param resume: the value may change when a run is resumed (`train --resume`).
    :param flag: option name(s); default ``--`` + the field name with dashes.
    :param choices: the accepted strings; `minimum`: the smallest accepted integer.
    :param cli: False for settings only a config file sets.
    :param path: the value may be a file or folder: a leading ``~`` is the home folder, on
        the command line and in a config file (`config_files.expand_user`).
    """
    meta = {
        "help": help,
        "resume": resume,
        "flags": (flag,) if isinstance(flag, str) else flag,
        "choices": choices,
        "minimum": minimum,
        "metavar": metavar,
        "cli": cli,
        "path": path,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def check(ok: bool, name: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"invalid {name} = {value!r}: expected {accepted}")


def check_declared(part: Any, prefix: str = "") -> None:
    """The checks a config's settings declare: type (`coerce`), `choices`, `minimum`."""
    for f in fields(part):
        name, choices, minimum = prefix + f.name, f.metadata["choices"], f.metadata["minimum"]
        value = coerce(getattr(part, f.name), default_of(f), name)
        setattr(part, f.name, value)
        if choices is not None:
            accepted = " or ".join(choices) if len(choices) == 2 else ", ".join(choices)
            check(value in choices, name, value, accepted)
        if minimum is not None:
            check(value >= minimum, name, value, f"an integer >= {minimum}")


def build(cls: type, d: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types by name."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'} must be a table/object, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(
            f"{counted(len(unknown), 'unknown setting')} {', '.join(prefix + k for k in unknown)}; "
            f"known in this section: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in d.items():
        default = default_of(known[name])
        if dataclasses.is_dataclass(default):
            kwargs[name] = build(type(default), value, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(value, default, f"{prefix}{name}")
    return cls(**kwargs)


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def coerce(value: Any, default: Any, name: str) -> Any:
    """Check a leaf value against its default's type, converting a tuple, numpy number or Path."""
    integral = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)  # noqa: E731
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)  # true is not 1.0
    if isinstance(value, (list, tuple)):
        value = [int(v) if integral(v) else v for v in value]
    elif integral(value) or (real and isinstance(default, float)):
        value = int(value) if integral(value) else float(value)
    elif isinstance(value, os.PathLike) and isinstance(default, str):
        value = os.fspath(value)
    if isinstance(default, bool) or default is None:  # None: compile's "where it pays off"
        if not isinstance(value, bool) and value is not None:
            raise ConfigError(f"invalid {name} = {value!r}: expected true or false")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"invalid {name} = {value!r}: expected an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"invalid {name} = {value!r}: expected a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"invalid {name} = {value!r}: expected a string")
        return value
    if isinstance(default, list):
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"invalid {name} = {value!r}: expected a list of integers")
        return list(value)
    return value
