"""Config files: reading a JSON or TOML file into a settings dict, and merging dicts.

The CLI reads `--config FILE` here and merges the command line's settings over it; the result
goes to `config.RunConfig.from_dict`, which checks every value.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from .config import ConfigError, settings
from .config_upgrade import upgrade

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None


def expand_user(path: str) -> str:
    """A path as typed, with a leading ``~`` or ``~user`` made the home folder: the shell
    leaves it alone after ``--out=`` and in quotes, and a config file never has a shell (a
    folder named ``~`` would be made in the current one). Used by every path option and for
    the path settings of a config file."""
    return os.path.expanduser(path) if path.startswith("~") else path


def loads_json(text: str) -> Any:
    """`json.loads`, refusing a key given twice in one object (ConfigError naming it): JSON
    readers keep the last one, so `{"train": {...}, "train": {...}}` would drop the first
    section's settings without a word (TOML refuses it too)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ConfigError(
                f"{key!r} is given twice in one object (the first would be ignored); give it once"
            )
        seen.add(key)
    return dict(pairs)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML config file into a plain dict (sections data/model/schedule/train),
    in today's layout (`upgrade`); a path setting's leading ``~`` is the home folder."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a folder; give a .json or .toml file")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if p.suffix.lower() in (".yaml", ".yml", ".ini", ".cfg"):
        raise ConfigError(
            f"config file {str(p)!r}: {p.suffix} is not read; write it as JSON (.json, or any "
            "other name) or TOML (.toml)"
        )
    try:
        text = p.read_text(encoding="utf-8")  # UnicodeDecodeError is a ValueError too
        if p.suffix.lower() == ".toml":
            if tomllib is None:  # pragma: no cover
                raise ConfigError("TOML config files need Python 3.11+; use JSON")
            d = tomllib.loads(text)
        else:
            d = loads_json(text)
    except ValueError as e:
        kind = "TOML" if p.suffix.lower() == ".toml" else "JSON"
        if isinstance(e, ConfigError):
            raise ConfigError(f"config file {str(p)!r}: {e}") from None
        raise ConfigError(f"config file {str(p)!r} is not valid {kind}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(
            f"config file {str(p)!r} must hold an object with sections "
            f"data/model/schedule/train, not a {type(d).__name__}"
        )
    for section in dict.fromkeys(section for section, _ in settings()):
        if section in d and not isinstance(d[section], dict):  # `train = 5`, "train": null
            raise ConfigError(
                f"config file {str(p)!r}: {section!r} must be a section ([{section}] in TOML, "
                f"an object in JSON) of settings, got {json.dumps(d[section], default=str)[:40]}"
            )
    d = upgrade(d)
    for section, f in settings():
        part = d.get(section)
        if f.metadata["path"] and isinstance(part, dict) and isinstance(part.get(f.name), str):
            part[f.name] = expand_user(part[f.name])
    return d


def check_paths_found(config: str | Path, values: dict[tuple[str, str], str]) -> None:
    """ConfigError for a relative path setting of config file `config` ((section, name) ->
    value) that does not exist from the working folder but does beside the config file.
    Relative paths in a config file are read from the working folder, as on the command line
    (a run records them so, and its resumes read them so); this names the place meant."""
    folder = Path(config).parent
    for (section, name), value in values.items():
        p = Path(value)
        if not value or p.is_absolute() or p.exists() or folder == Path("."):
            continue
        if (folder / p).exists():
            raise ConfigError(
                f"config file {str(config)!r}: {section}.{name} {value!r} does not exist in "
                f"the working folder {os.getcwd()!r}, where relative paths in a config file "
                f"are read from; {str(folder / p)!r}, beside the config file, does: write that "
                "path (or an absolute one) in the config file"
            )


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base` (override wins)."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out
