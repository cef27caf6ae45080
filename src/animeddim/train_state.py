"""Training state: networks, optimiser and counters; building, restoring and saving it.

A checkpoint holds exactly a `TrainState` (and the data statistics), so a resumed run goes
on bit for bit where it stopped. `Runtime` is where and how the steps run.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import distributed
from .config import RunConfig
from .resume_labels import find_recorded_labels
from .run_folder import (
    check_left_to_train,
    latest_checkpoint,
    prepare_run_dir,
    recorded_data,
    truncate_metrics,
)
from .runtime import default_compile, fused_adamw_supported, maybe_compile, uses_cuda_graphs
from .train_data import TrainData
from .train_maths import ema_decay_at
from .unet import UNet, is_cond_parameter
from .words import counted


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the message names the step."""


def float_state(module: torch.nn.Module) -> list[torch.Tensor]:
    # Parameters and BatchNorm running statistics: Keras averages every weight it holds,
    # non-trainable ones included, so the EMA network's statistics are averaged too.
    return [t for t in module.state_dict(keep_vars=True).values() if t.is_floating_point()]


def _training_tensors(model, ema, optimizer, mean, std) -> dict[str, torch.Tensor]:
    tensors = {
        **ckpt.with_prefix(model.state_dict(), "model"),
        **ckpt.with_prefix(ema.state_dict(), "ema"),
        "norm.mean": mean,
        "norm.std": std,
    }
    for i, state in optimizer.state_dict()["state"].items():
        for k, v in state.items():
            tensors[f"optim.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors


def _restore_optimizer(optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in ckpt.prefixed(tensors, "optim").items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    # Checkpoints hold contiguous tensors; the moments must take their parameter's memory
    # layout (channels_last), or fused AdamW pairs the wrong elements on resume.
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    optimizer.state[p][name] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _moments(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimiser's floating-point state (AdamW's moments): a squared gradient can overflow
    to inf while the weights are still finite."""
    return [
        v
        for per_param in optimizer.state.values()
        for v in per_param.values()
        if torch.is_tensor(v) and v.is_floating_point()
    ]


@dataclass
class TrainState:
    """What a checkpoint holds: networks, optimiser, counters and running losses."""

    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    acc: torch.Tensor  # running sums this epoch: noise loss, image loss, batch count
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_kid: float = math.inf
    best_standard_kid: float = math.inf  # of the --eval-every measurements
    # Training images and seconds since the last metrics row: its images_per_s and
    # epoch_seconds. Kept in checkpoints, so a run stopped between an epoch's steps and its
    # row (in validation or KID) writes them when resumed; None: not known (a checkpoint
    # from before they were kept, taken between two rows).
    row_images: int = 0
    row_seconds: float | None = 0.0


@dataclass
class Runtime:
    """Where and how the steps run: device, precision, memory layout, this rank's batch slice."""

    device: torch.device
    precision: str
    precision_ctx: Any
    channels_last: bool
    lo: int
    hi: int
    net: Any = None  # the network the steps call: compiled and/or DDP-wrapped model
    ema_tensors: list[torch.Tensor] | None = None  # float state of the EMA net ...
    live_tensors: list[torch.Tensor] | None = None  # ... and of the trained one, for ema_update


def build_state(cfg: RunConfig, rt: Runtime, init_state, data: TrainData) -> TrainState:
    """A fresh network (or one from `init_state`), its EMA copy and the AdamW optimiser."""
    model = UNet(cfg.model)
    if init_state is not None:  # a resumed run takes its weights from its own checkpoint
        ckpt.load_state_strict(  # the conditioning path may be new: it starts at zero
            model, init_state, f"the initial weights from {cfg.train.init!r}", is_cond_parameter
        )
    model = model.to(rt.device)
    # channels_last pays off with cuDNN and with oneDNN's convolutions on the CPU
    # (`runtime.default_channels_last`, docs/benchmarks.md).
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    # Under torchrun: BatchNorm statistics of the global batch, as in one process.
    model = distributed.sync_batchnorm(model)
    fused = fused_adamw_supported(rt.device)  # else foreach: still no loop over parameters
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.train.learning_rate,
        weight_decay=cfg.train.weight_decay,
        **({"fused": True} if fused else {"foreach": True}),
    )
    acc = torch.zeros(3, dtype=torch.float64, device=rt.device)
    return TrainState(model, ema, optimizer, acc)


def resume_point(
    run_dir: Path, cfg: RunConfig, allow_changed_data: bool, log
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The newest checkpoint of `run_dir` (tensors, metadata), read on every process before
    any image is (the folder made ready first: `prepare_run_dir`): a run with nothing left
    to train is refused here, in seconds, not after the data and the Inception network are
    loaded.

    Whether a run stopped at --max-steps has its epoch end still to do depends on the
    epoch's length: the checkpoint says it (`steps_per_epoch`); one written before it did,
    or a resume that may find other data (`allow_changed_data`), is decided by `restore`.
    """

    def read() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = latest_checkpoint(run_dir, cfg, log)
        # the run reads its images as it began, whatever config it is resumed with (the
        # Python API's may be a fresh one): with the colour profiles applied, or without
        cfg.data.colour_profiles = recorded_data(meta, "colour_profiles")
        batch, per_epoch = meta["batch_in_epoch"], meta.get("steps_per_epoch")
        # at an epoch's start, an epoch of any length has its steps to do
        if not batch or (per_epoch and not allow_changed_data):
            check_left_to_train(run_dir, cfg, meta["epoch"], meta["step"], batch, per_epoch or 1)
        find_recorded_labels(cfg, meta, log)  # recorded relative: from where the run started
        return tensors, meta

    # the temporary files of a process killed while it wrote, removed before any is read
    distributed.on_main(lambda: prepare_run_dir(run_dir, cfg, resume=True))
    return distributed.on_every(read)


def restore(
    state: TrainState, data: TrainData, saved: tuple, run_dir: Path, cfg: RunConfig, rt, log
) -> None:
    """Load the checkpoint `saved` (`resume_point`) into `state` (and its statistics into
    `data`); RunFolderError if the run has nothing left to train on this data."""
    tensors, meta = saved
    ckpt.load_state_strict(state.model, ckpt.prefixed(tensors, "model"), "the network")
    ckpt.load_state_strict(state.ema, ckpt.prefixed(tensors, "ema"), "the EMA network")
    _restore_optimizer(state.optimizer, tensors, meta["param_groups"])
    data.mean, data.std = tensors["norm.mean"], tensors["norm.std"]
    state.step, state.epoch = meta["step"], meta["epoch"]
    state.batch_in_epoch = meta["batch_in_epoch"]
    state.acc = tensors["train.acc"].to(rt.device)
    if not distributed.is_main():
        state.acc.zero_()  # the checkpoint holds the sum over all ranks; rank 0 carries it
    for key in ("best_kid", "best_standard_kid"):  # None: not measured yet
        setattr(state, key, math.inf if meta.get(key) is None else meta[key])
    at_a_row = state.batch_in_epoch == 0 and state.epoch % cfg.train.epoch_end_every == 0
    state.row_images = meta.get("row_images", 0)
    state.row_seconds = meta.get("row_seconds", 0.0 if at_a_row else None)
    check_left_to_train(  # before metrics.csv is touched: a refused resume writes nothing
        run_dir, cfg, state.epoch, state.step, state.batch_in_epoch, data.steps_per_epoch
    )
    if distributed.is_main():
        truncate_metrics(run_dir, state.epoch)
    log(f"resuming {run_dir} at epoch {state.epoch + 1}, step {state.step}")


def compiled_network(state: TrainState, cfg: RunConfig, rt: Runtime, steps_per_epoch: int):
    """The network the steps call: compiled where that pays off, DDP-wrapped under torchrun."""
    tc = cfg.train
    do_compile = tc.compile
    if do_compile is None:
        planned = tc.max_steps or tc.epochs * steps_per_epoch
        do_compile = default_compile(
            rt.device,
            planned - state.step,
            tc.time_limit_minutes or 0.0,
            distributed.world_size(),
            precision=rt.precision,
        )
        # gloo on CUDA (GPUs shared for testing): its synchronised BatchNorm runs eager
        do_compile = do_compile and not (rt.device.type == "cuda" and distributed.uses_gloo())
    net = _compiled_or_eager(
        state.model, do_compile, tc, rt.device, rt.precision_ctx, rt.channels_last
    )
    return distributed.wrap_ddp(net, rt.device)  # under torchrun: gradients averaged over ranks


def save_checkpoint(
    path: Path,
    extra: dict[str, Any] | None = None,
    *,
    state: TrainState,
    data: TrainData,
    cfg: RunConfig,
    rt: Runtime,
    collective: bool = True,
) -> None:
    """Write `state` to `path`; TrainingDiverged instead of writing non-finite weights.

    Under torchrun every rank calls this (collective=True) and rank 0 writes while the others
    wait; collective=False (Ctrl-C: ranks may stop at different points) lets rank 0 write
    alone, with its own share of the running losses standing for all ranks'.
    """
    acc = distributed.reduced_sum(state.acc) if collective else state.acc * distributed.world_size()
    # Never let NaN weights, optimiser moments or losses overwrite a good checkpoint.
    checked = [*float_state(state.model), *float_state(state.ema), *_moments(state.optimizer)]
    if not (_all_finite(checked) and bool(acc.isfinite().all())):
        raise TrainingDiverged(
            f"weights or loss became non-finite by step {state.step}; training stopped without "
            f"writing {path.name}, the last good checkpoint is kept "
            "(lower the learning rate or use --nan-policy skip-batch)"
        )
    if distributed.is_main():
        tensors = _training_tensors(state.model, state.ema, state.optimizer, data.mean, data.std)
        tensors["train.acc"] = acc.detach().cpu()
        meta = {
            "kind": "training",
            "config": cfg.to_dict(),
            "epoch": state.epoch,
            "step": state.step,
            "batch_in_epoch": state.batch_in_epoch,
            "best_kid": state.best_kid if math.isfinite(state.best_kid) else None,
            "best_standard_kid": state.best_standard_kid
            if math.isfinite(state.best_standard_kid)
            else None,
            "param_groups": state.optimizer.state_dict()["param_groups"],
            "row_images": state.row_images,
            "row_seconds": state.row_seconds,
            "steps_per_epoch": data.steps_per_epoch,  # read by `resume_point`
            "precision": rt.precision,
            **(extra or {}),
        }
        ckpt.save(path, tensors, meta)
    if collective:
        distributed.barrier()


def initial_weights(spec: str, log: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """The EMA weights of another model, to start a new run from.

    The new run keeps its own data statistics for normalisation; the architecture must match
    (the image size may differ: every layer is convolutional).
    """
    from .pretrained import weights_path

    source = ckpt.load_model(weights_path(spec))
    step = source.meta.get("step")
    trained = counted(step, "step") if isinstance(step, int) else "? steps"
    log(f"starting from the weights of {spec} (trained {trained})")
    return source.model.state_dict()


def _compiled_or_eager(model, do_compile: bool, tc, device, precision_ctx, channels_last: bool):
    """torch.compile the network where asked, proving it works on one trial step first.

    Compilation happens at the first call, so a broken toolchain would otherwise fail
    inside the loop. The trial's effect on BatchNorm statistics and gradients is undone.
    """
    net = maybe_compile(model, do_compile, device, tc.compile_mode)
    if net is model:
        return model
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    size, c = model.cfg.image_size, model.cfg.channels
    n = tc.batch_size // distributed.world_size()  # this process's share of the global batch
    x = torch.zeros(n, c, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        if uses_cuda_graphs(tc.compile_mode, device):
            torch.compiler.cudagraph_mark_step_begin()
        with precision_ctx:
            out = net(x, torch.full((n,), 0.5, device=device), raw=True)  # as training calls it
        out.float().mean().backward()
    except Exception as e:  # noqa: BLE001 - any backend failure means: run eagerly
        warnings.warn(f"torch.compile failed ({type(e).__name__}); training eagerly", stacklevel=2)
        net = model
    model.load_state_dict(saved)
    model.zero_grad(set_to_none=True)
    return net


def save_step_checkpoint(save_checkpoint, run_dir: Path, step: int, keep: int) -> None:
    d = run_dir / "checkpoints"
    save_checkpoint(d / f"step-{step:08d}.safetensors")
    save_checkpoint(d / "last.safetensors")
    old = sorted(d.glob("step-*.safetensors"))
    for f in old[:-keep] if distributed.is_main() else []:
        f.unlink(missing_ok=True)


def untrained_ema_note(tc, steps: int) -> str:
    """One line when the EMA weights, which sampling, validation and the KID use, are still
    more than a tenth the untrained network a run started from ("" otherwise, and for a
    run started from trained weights: `train.init`). Without warm-up each step keeps
    `ema_decay` of the average, so after 136 steps at 0.999 the start is 87% of it."""
    if tc.init:
        return ""
    share = 1.0
    for step in range(steps):
        share *= ema_decay_at(step, tc.ema_decay, tc.ema_warmup)
        if share <= 0.1:
            return ""
    enough = math.ceil(math.log(0.1) / math.log(tc.ema_decay)) if tc.ema_decay > 0 else 1
    return (
        f"note: after {counted(steps, 'step')} the EMA weights (decay {tc.ema_decay:g}), "
        f"which sampling, validation and the KID use, are still {share * 100:.1f}% the "
        f"untrained start, so they draw noise; train longer ({enough:,} steps bring that "
        "under 10%), or start the run with --ema-warmup"
    )
