"""Models shipped inside the package (EMA weights in half precision, config, normalisation)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from .checkpoint import CheckpointError

SHIPPED = {
    "avatars-64": "avatars-64.safetensors",  # DiceBear 'adventurer' avatars, 64 px
    # the same, conditional on 8 of their attributes (docs/models/avatars-64-cond)
    "avatars-64-cond": "avatars-64-cond.safetensors",
}


def pretrained_path(name: str) -> Path:
    """Path of a shipped model file; CheckpointError naming the choices if unknown/missing."""
    if name not in SHIPPED:
        raise CheckpointError(
            f"unknown model {name!r}: shipped models are {', '.join(sorted(SHIPPED))}"
        )
    path = Path(str(files("animeddim").joinpath("models", SHIPPED[name])))
    if not path.is_file():
        raise CheckpointError(
            f"the shipped model {name!r} is missing from this installation ({path}); "
            "reinstall animeddim or sample from your own run with --run RUN"
        )
    return path


def weights_path(spec: str) -> Path:
    """A shipped model's name, or a run folder / checkpoint / exported file, as a file path.

    :raises CheckpointError: neither a shipped name nor an existing path (naming both kinds),
        a run folder without a checkpoint, a shipped file missing from the installation."""
    from .checkpoint import resolve

    if spec in SHIPPED:
        return pretrained_path(spec)
    if str(spec).strip() and not Path(spec).exists():  # an empty one: resolve's error
        raise CheckpointError(
            f"unknown model {spec!r}: shipped models are {', '.join(sorted(SHIPPED))}; "
            "otherwise give a run folder, a checkpoint or an exported .safetensors file"
        )
    return resolve(spec)
