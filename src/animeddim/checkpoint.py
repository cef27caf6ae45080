"""Self-describing, safe-to-load checkpoint files.

A checkpoint is one safetensors file: tensors (network, EMA network, optimiser moments,
random states, normalisation) plus a JSON header entry "animeddim" holding the run
config and counters. safetensors holds no code, so loading one never executes anything.
Files are written to a temporary name, fsynced and renamed: a crash leaves either the
old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save as st_save

from .conditioning import attribute_weights_text, parse_attribute_weights
from .config import (
    GUIDE_ALWAYS,
    ConfigError,
    RunConfig,
    guidance_interval_text,
    parse_guidance_interval,
)
from .io import atomic_file, read_safetensors
from .unet import UNet

FORMAT = "animeddim-checkpoint"
VERSION = 1
ATTRIBUTE_ROWS = "attrs.rows"  # an export's [R x A] int16 training-label codes


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, foreign or incompatible; the message says which."""


def save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write tensors and metadata to `path` (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"animeddim": json.dumps({"format": FORMAT, "version": VERSION, **meta})}
    data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, header)
    global _saves
    _saves += 1

    def before_rename() -> None:
        if _kill_requested("rename"):  # test hook: die with the temporary file complete
            _die()

    with atomic_file(path, before_rename=before_rename) as f:
        if _kill_requested("write"):  # test hook: die with half the file written
            f.write(data[: len(data) // 2])
            f.flush()
            _die()
        f.write(data)
    if _kill_requested("done"):
        _die()
    return path


# Fault injection for tests/test_reliability.py (see docs/reliability.md): with
# ANIMEDDIM_TEST_KILL_AT_SAVE="N:PHASE" the process SIGKILLs itself during its N-th save, at
# PHASE "write" (half of the temporary file written), "rename" (temporary file complete and
# fsynced, not yet renamed) or "done" (renamed). Unset, it costs one environment lookup.
KILL_AT_SAVE_ENV = "ANIMEDDIM_TEST_KILL_AT_SAVE"
_saves = 0  # saves by this process


def _kill_requested(phase: str) -> bool:
    return os.environ.get(KILL_AT_SAVE_ENV) == f"{_saves}:{phase}"


def _die() -> None:  # pragma: no cover - the process ends here
    os.kill(os.getpid(), signal.SIGKILL)


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint's tensors and metadata; CheckpointError if it is not a valid one."""
    return _read(Path(path), tensors=True)


def read_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's metadata alone (its header: no tensor is read); errors as `load`."""
    return _read(Path(path), tensors=False)[1]


def recommended_guidance(meta: dict[str, Any]) -> float:
    """The guidance weight an export recommends (`export_weights(guidance=)`), else 1.

    :raises CheckpointError: a stored weight that is not a number >= 0."""
    return _stored_weight(meta, "guidance", 1.0)


def _stored_weight(meta: dict[str, Any], key: str, default: float) -> float:
    raw = meta.get(key, default)
    try:
        w = float(raw)
    except (TypeError, ValueError):
        w = math.nan
    if not (math.isfinite(w) and w >= 0.0):
        raise CheckpointError(f"the stored {key.replace('_', ' ')} weight is unusable: {raw!r}")
    return w


def recommended_guidance_interval(meta: dict[str, Any]) -> tuple[float, float]:
    """The noise levels (lo, hi] in sigma where an export recommends guiding
    (`export_weights(guidance_interval=)`), else every level (`config.GUIDE_ALWAYS`)."""
    text = meta.get("guidance_interval")
    if text is None:
        return GUIDE_ALWAYS
    try:
        return parse_guidance_interval(text)
    except ConfigError as e:
        raise CheckpointError(f"the stored guidance interval is unusable: {e}") from None


def recommended_edit_guidance(meta: dict[str, Any]) -> float:
    """The guidance weight an export recommends for editing (`export_weights(edit_guidance=)`),
    else its sampling weight (`recommended_guidance`).

    :raises CheckpointError: a stored weight that is not a number >= 0."""
    return _stored_weight(meta, "edit_guidance", recommended_guidance(meta))


def recommended_attribute_guidance(meta: dict[str, Any]) -> dict[str, float]:
    """The per-attribute guidance weights an export recommends with its weight
    (`export_weights(attribute_guidance=)`; attribute -> w_a), else {}."""
    text = meta.get("attribute_guidance")
    if text is None:
        return {}
    try:
        return parse_attribute_weights(text)
    except ConfigError as e:
        raise CheckpointError(f"the stored per-attribute guidance is unusable: {e}") from None


def recommended_sampling(meta: dict[str, Any]) -> tuple[str, int] | None:
    """The (sampler, steps) an export recommends (`export_weights(sampling=)`), else None.

    :raises CheckpointError: a stored sampler that is not registered, or a step count that
        is not a whole number >= 1.
    """
    from .diffusion.sampler_names import SAMPLER_NAMES

    if "sampler" not in meta and "sampling_steps" not in meta:
        return None
    sampler, steps = meta.get("sampler"), meta.get("sampling_steps")
    if sampler not in SAMPLER_NAMES or type(steps) is not int or steps < 1:
        raise CheckpointError(
            f"the stored sampling recommendation is unusable: sampler {sampler!r} (known: "
            f"{', '.join(SAMPLER_NAMES)}), steps {steps!r} (a whole number >= 1)"
        )
    return sampler, steps


def _read(path: Path, tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        out, header = read_safetensors(path, tensors)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{str(path)!r} is not a readable animeddim checkpoint (safetensors): {e}"
        ) from None
    try:
        meta = json.loads(header["animeddim"])
        ok = meta.get("format") == FORMAT
    except (KeyError, json.JSONDecodeError, AttributeError):
        ok = False
    if not ok:
        raise CheckpointError(
            f"{str(path)!r} is a safetensors file but not an animeddim checkpoint"
        )
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint format version {meta['version']}; this animeddim "
            f"reads up to version {VERSION}: upgrade animeddim"
        )
    return out, meta


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.` with the prefix stripped."""
    p = prefix + "."
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}


def with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def load_state_strict(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    what: str,
    may_miss: Callable[[str], bool] | None = None,
) -> None:
    """Load a state dict, turning key or shape mismatches into one clear CheckpointError.

    :param may_miss: keys of the module the state may lack (they keep their initial values).
    """
    own = module.state_dict()
    missing = sorted(k for k in set(own) - set(state) if not (may_miss and may_miss(k)))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            detail.append(
                f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
                f"{tuple(own[k].shape)} in the network)"
            )
        raise CheckpointError(
            f"{what} does not match the network its config describes: " + "; ".join(detail)
        )
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=not may_miss)


@dataclass
class LoadedModel:
    """An EMA network ready to sample, with everything needed to use it."""

    model: UNet
    config: RunConfig
    mean: torch.Tensor  # [C] per-channel mean of the training images, in [0, 1]
    std: torch.Tensor  # [C] per-channel std of the training images
    meta: dict[str, Any]
    path: Path
    # [R x A] attribute codes of the training labels (a conditional model's export), or None
    attribute_rows: torch.Tensor | None = None


def holding_run(path: str | Path) -> Path | None:
    """The run folder (one holding config.json) that `path` lies in, one or two levels up:
    for a run's checkpoints/ folder, a checkpoint in it or its config.json, the run folder;
    None for a run folder itself or a path in none."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        return None
    return next((d for d in p.parents[:2] if (d / "config.json").is_file()), None)


def not_a_run_folder(path: str | Path) -> str | None:
    """What to say of `path`, given where a run folder is asked (--run, --resume), when it is a
    file or a folder inside a run ('RUN/checkpoints'): which run folder to give. None when it
    is neither (the caller says what is wrong with it)."""
    p, holder = Path(path), holding_run(path)
    if p.exists() and not p.is_dir():
        return f"{str(p)!r} is a file; give the run folder" + (
            f" that holds it: {str(holder)!r}" if holder is not None else ""
        )
    if holder is None or not p.is_dir():
        return None
    what = "the checkpoints folder of a run" if p.name == "checkpoints" else "inside a run"
    return f"{str(p)!r} is {what}, not a run folder; give the run folder {str(holder)!r}"


def no_run_to_write_into(out: str, run: str | Path | None) -> str:
    """The refusal of a command that writes into the --run folder by default and was given a
    checkpoint file: `out` is the option to give instead, or the run folder that holds it."""
    if not run:  # a shipped model (--model)
        return f"give {out} (no run folder to write into)"
    holder = holding_run(run)
    into = f", or --run {str(holder)!r} (its run folder)" if holder else ""
    return (
        f"--run {str(run)!r} is a file, so there is no run folder to write into: give {out}{into}"
    )


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (its checkpoints/last.safetensors)."""
    if not str(path).strip():  # Path("") is the working folder: never taken silently
        raise CheckpointError("no model given (an empty path): give a run folder or a checkpoint")
    p = Path(path)
    if p.is_dir():
        f = p / "checkpoints" / "last.safetensors"
        if not f.is_file():
            raise CheckpointError(
                not_a_run_folder(p)
                or f"run folder {str(p)!r} holds no checkpoint (expected {str(f)!r}); "
                "is it an animeddim run folder?"
            )
        return f
    if not p.exists():
        raise CheckpointError(f"{str(p)!r} is neither a run folder nor a checkpoint file")
    return p


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the EMA network described by a checkpoint (file or run folder), eval mode."""
    f = resolve(path)
    tensors, meta = load(f)
    try:
        config = RunConfig.from_dict(meta["config"]).validate()
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{str(f)!r} has no usable config: {e}") from None
    model = UNet(config.model)
    ema = prefixed(tensors, "ema")
    if not ema:
        raise CheckpointError(f"{str(f)!r} holds no EMA network weights")
    load_state_strict(model, ema, f"the EMA weights in {str(f)!r}")
    if "norm.mean" not in tensors or "norm.std" not in tensors:
        raise CheckpointError(f"{str(f)!r} holds no normalisation statistics")
    model.eval().to(device)
    return LoadedModel(
        model=model,
        config=config,
        mean=tensors["norm.mean"].float(),
        std=tensors["norm.std"].float(),
        meta=meta,
        path=f,
        attribute_rows=tensors[ATTRIBUTE_ROWS].long() if ATTRIBUTE_ROWS in tensors else None,
    )


def export_weights(
    src: str | Path | LoadedModel,
    out: str | Path,
    dtype: torch.dtype = torch.float16,
    attribute_rows: torch.Tensor | None = None,
    guidance: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
    sampling: tuple[str, int] | None = None,
    attribute_guidance: dict[str, float] | None = None,
    edit_guidance: float | None = None,
) -> Path:
    """Write a small sampling-only file: EMA weights (in `dtype`), normalisation and config.

    :param src: a checkpoint or run folder, or the model `load_model` made of one.
    :param attribute_rows: [R x A] codes of a conditional model's training labels, stored
        so that the file can be sampled with the data's own mix of attributes.
    :param guidance: a conditional model's recommended classifier-free guidance weight (the
        default of conditional sampling from the file; 1 when absent).
    :param guidance_interval: the noise levels (lo, hi] in sigma where that weight applies
        (default of sampling from the file; every level when absent).
    :param attribute_guidance: attribute -> its own weight, in place of `guidance` for that
        attribute given the others (`diffusion.guidance.Guided`), used with that weight.
    :param edit_guidance: the weight `edit` regenerates with (default of editing from the
        file; `guidance` when absent): editing keeps more of a face at a lower weight.
    :param sampling: the (sampler, steps) sampling from the file uses when not told
        (`recommended_sampling`); absent: DDIM, 20 steps."""
    loaded = src if isinstance(src, LoadedModel) else load_model(src)
    state = {
        k: v.to(dtype) if v.is_floating_point() else v for k, v in loaded.model.state_dict().items()
    }
    tensors = {**with_prefix(state, "ema"), "norm.mean": loaded.mean, "norm.std": loaded.std}
    if attribute_rows is not None:
        tensors[ATTRIBUTE_ROWS] = attribute_rows.to(torch.int16).contiguous()
    meta = {k: loaded.meta[k] for k in ("config", "epoch", "step") if k in loaded.meta}
    meta["kind"] = "ema-weights"
    if guidance is not None:
        meta["guidance"] = float(guidance)
    if guidance_interval is not None:
        meta["guidance_interval"] = guidance_interval_text(guidance_interval)
    if edit_guidance is not None:
        meta["edit_guidance"] = float(edit_guidance)
    if attribute_guidance:
        vocab = loaded.config.model.vocabulary
        unknown = [a for a in attribute_guidance if a not in vocab]
        if unknown:
            raise ConfigError(
                f"per-attribute guidance for {', '.join(unknown)}: the model knows "
                f"{', '.join(vocab) or 'no attributes'}"
            )
        meta["attribute_guidance"] = attribute_weights_text(attribute_guidance)
    if sampling is not None:
        meta["sampler"], meta["sampling_steps"] = sampling[0], int(sampling[1])
        recommended_sampling(meta)  # refuse to write what could not be read back
    return save(out, tensors, meta)
