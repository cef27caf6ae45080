"""Training: the loop, losses, EMA, validation, per-epoch KID and checkpoint cadence.

One top-to-bottom function split by short section comments. Randomness is a pure
function of (seed, step) for noise and times and of (seed, epoch, batch) for data order
and flips, so a resumed run sees exactly what an uninterrupted one would have seen.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import data as data_mod
from . import distributed
from .config import ConfigError, RunConfig
from .diffusion.generation import generate
from .diffusion.schedule import diffuse, predict_x0
from .io import save_grid, write_text_atomic
from .run_folder import (
    append_metrics,
    latest_checkpoint,
    prepare_run_dir,
    truncate_metrics,
)
from .runtime import (
    autocast,
    default_channels_last,
    default_compile,
    fused_adamw_supported,
    maybe_compile,
    prepare_inference,
    resolve_device,
    resolve_precision,
)
from .unet import UNet

VAL_SEED = 0x5EED  # validation noise and times are the same every epoch
GRID_IMAGES = 18  # 3 x 6 sample grid per epoch, as in the Keras example


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the message names the step."""


@dataclass
class TrainResult:
    run_dir: Path
    epoch: int
    step: int
    interrupted: bool
    last_row: dict[str, Any] | None
    skipped_summary: str = ""  # one line: the data files skipped and why ("" if none)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of noises and times of optimiser step `step`."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + 17) % (2**63))
    return g


def ema_update(ema: list[torch.Tensor], live: list[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * live, for all tensors in one fused call."""
    torch._foreach_lerp_(ema, live, 1.0 - decay)


def _float_state(module: torch.nn.Module) -> list[torch.Tensor]:
    # Parameters and BatchNorm running statistics: Keras averages every weight it holds,
    # non-trainable ones included, so the EMA network's statistics are averaged too.
    return [t for t in module.state_dict(keep_vars=True).values() if t.is_floating_point()]


def losses(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    noises: torch.Tensor,
    t: torch.Tensor,
    cfg: RunConfig,
    precision_ctx,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE noise loss (the objective) and MAE image loss on x0_hat, both fp32 scalars."""
    noisy_images, signal_rate, noise_rate = diffuse(images, noises, t, cfg.schedule)
    with precision_ctx:
        pred_noises = model(noisy_images, (noise_rate**2).view(-1), None)
    pred_noises = pred_noises.float()
    pred_images = predict_x0(noisy_images, pred_noises, signal_rate, noise_rate)
    return F.l1_loss(pred_noises, noises), F.l1_loss(pred_images, images)


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


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


def _all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _float_state(module))


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train (or resume) a DDIM on cfg.data.path, writing everything to run_dir.

    To resume, pass `load_run_config(run_dir)` (settings of the data, model and schedule
    must stay as they were; epochs, device, precision and the like may change).

    :return: where training stopped; `interrupted` if Ctrl-C saved a checkpoint early.
    """
    run_dir = Path(run_dir)
    cfg.validate()
    tc = cfg.train
    # Under torchrun: join the process group, take this rank's GPU; rank 0 alone writes files.
    device = distributed.setup(resolve_device(tc.device))
    distributed.check_global_batch(tc.batch_size)

    def prepare() -> None:
        prepare_run_dir(run_dir, cfg, resume)
        if resume:  # the config may extend the run (more epochs) or move it (device, precision)
            write_text_atomic(run_dir / "config.json", cfg.to_json() + "\n")

    distributed.on_main(prepare)
    if not distributed.is_main():
        progress, log = False, lambda s: None
    precision = resolve_precision(tc.precision, device)
    precision_ctx = autocast(device, precision)
    torch.manual_seed(tc.seed)

    # Weights to start from, read before any image is decoded (a wrong file fails at once).
    init_state = _init_state(tc.init, log) if tc.init and not resume else None

    # --- data: decode once, split, statistics of the training split --------------------
    if not cfg.data.path:
        raise ConfigError("no training data: give --data DIR (or data.path in the config file)")
    with distributed.local_main_first():  # one process per node fills the disk cache
        imageset = data_mod.load_folder(
            cfg.data.path,
            cfg.data.image_size,
            cache=cfg.data.cache,
            strict=cfg.data.strict,
            progress=progress,
        )
    train_idx, val_idx = data_mod.split_indices(
        len(imageset.images), cfg.data.val_fraction, cfg.data.split_seed
    )
    mean_l, std_l = data_mod.channel_stats(imageset.images, train_idx)
    mean = torch.tensor(mean_l, dtype=torch.float32)
    std = torch.tensor(std_l, dtype=torch.float32).clamp(min=1e-3)
    steps_per_epoch = data_mod.num_batches(len(train_idx), tc.batch_size, drop_last=True)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size {tc.batch_size} is larger than the training split "
            f"({len(train_idx)} images): lower --batch-size"
        )

    # --- network, EMA copy, optimiser ---------------------------------------------------
    model = UNet(cfg.model)
    if init_state is not None:  # a resumed run takes its weights from its own checkpoint
        ckpt.load_state_strict(model, init_state, f"the initial weights from {tc.init!r}")
    model = model.to(device)
    # channels_last pays off with cuDNN and with oneDNN's bf16 convolutions on the CPU
    # (`runtime.default_channels_last`, docs/benchmarks.md).
    channels_last = default_channels_last(device, training=True, precision=precision)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    # Under torchrun: BatchNorm statistics of the global batch, as in one process.
    model = distributed.sync_batchnorm(model, device)
    fused = fused_adamw_supported(device)  # else foreach: still no loop over parameters
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=tc.learning_rate,
        weight_decay=tc.weight_decay,
        **({"fused": True} if fused else {"foreach": True}),
    )
    step, epoch, batch_in_epoch = 0, 0, 0
    acc = torch.zeros(3, dtype=torch.float64, device=device)  # noise loss, image loss, count
    best_kid = math.inf
    last_ckpt = run_dir / "checkpoints" / "last.safetensors"
    if resume:
        tensors, meta = latest_checkpoint(run_dir, cfg, log)
        ckpt.load_state_strict(model, ckpt.prefixed(tensors, "model"), "the network")
        ckpt.load_state_strict(ema, ckpt.prefixed(tensors, "ema"), "the EMA network")
        _restore_optimizer(optimizer, tensors, meta["param_groups"])
        mean, std = tensors["norm.mean"], tensors["norm.std"]
        step, epoch, batch_in_epoch = meta["step"], meta["epoch"], meta["batch_in_epoch"]
        acc = tensors["train.acc"].to(device)
        if not distributed.is_main():
            acc.zero_()  # the checkpoint holds the sum over all ranks; rank 0 carries it
        best_kid = meta.get("best_kid") or math.inf
        if distributed.is_main():
            truncate_metrics(run_dir, epoch)
        log(f"resuming {run_dir} at epoch {epoch + 1}, step {step}")
    mean_d, std_d = mean.to(device), std.to(device)
    do_compile = tc.compile
    if do_compile is None:
        planned = tc.max_steps or tc.epochs * steps_per_epoch
        do_compile = default_compile(
            device, planned - step, tc.time_limit_minutes or 0.0, distributed.world_size()
        )
    net = _compiled_or_eager(model, do_compile, tc, device, precision_ctx, channels_last)
    net = distributed.wrap_ddp(net, device)  # under torchrun: gradients averaged over ranks
    ema_state, live_state = _float_state(ema), _float_state(model)

    def save_checkpoint(
        path: Path, extra: dict[str, Any] | None = None, *, collective: bool = True
    ) -> None:
        # Under torchrun every rank calls this (collective=True) and rank 0 writes while the
        # others wait; collective=False (Ctrl-C: ranks may stop at different points) lets rank 0
        # write alone, with its own share of the running losses standing for all ranks'.
        if collective:
            acc_all = distributed.reduced_sum(acc)
        else:
            acc_all = acc * distributed.world_size()
        # Never let NaN weights (or losses) overwrite a good checkpoint.
        if not (_all_finite(model) and _all_finite(ema) and bool(torch.isfinite(acc_all).all())):
            raise TrainingDiverged(
                f"weights or loss became non-finite by step {step}; training stopped without "
                f"writing {path.name}, the last good checkpoint is kept "
                "(lower the learning rate or use --nan-policy skip-batch)"
            )
        if not distributed.is_main():
            if collective:
                distributed.barrier()
            return
        tensors = _training_tensors(model, ema, optimizer, mean, std)
        tensors["train.acc"] = acc_all.detach().cpu()
        meta = {
            "kind": "training",
            "config": cfg.to_dict(),
            "epoch": epoch,
            "step": step,
            "batch_in_epoch": batch_in_epoch,
            "best_kid": best_kid if math.isfinite(best_kid) else None,
            "param_groups": optimizer.state_dict()["param_groups"],
            "precision": precision,
            **(extra or {}),
        }
        ckpt.save(path, tensors, meta)
        if collective:
            distributed.barrier()

    # Reference images for the report's forward-diffusion figure: first validation images.
    ref = run_dir / "reference.png"
    if distributed.is_main() and not ref.exists() and len(val_idx):
        save_grid(torch.from_numpy(np.asarray(imageset.images[val_idx[:8]])), ref, cols=8)

    kid_metric = _make_kid(tc, device, log) if tc.kid and len(val_idx) else None
    bar_total: int | None = tc.epochs * steps_per_epoch
    if tc.max_steps:
        bar_total = min(bar_total, tc.max_steps)
    if tc.time_limit_minutes:
        bar_total = None  # the clock ends the run: steps and rate, no misleading ETA
    bar = _progress_bar(progress, bar_total, step)
    t_start = time.perf_counter()
    lo, hi = distributed.shard(tc.batch_size)  # this rank's slice of every global batch
    interrupted = False
    last_row = None
    try:
        while epoch < tc.epochs:
            # --- one epoch of optimiser steps -----------------------------------------
            model.train()
            t_epoch = time.perf_counter()
            images_seen = 0
            batches = data_mod.iterate_batches(
                imageset.images,
                train_idx,
                tc.batch_size,
                seed=tc.seed,
                epoch=epoch,
                shuffle=True,
                flip=cfg.data.flip,
                drop_last=True,
                device=device,
                start_batch=batch_in_epoch,
                rank=distributed.rank(),
                world_size=distributed.world_size(),
            )
            for batch in batches:
                images = _normalise(batch, mean_d, std_d)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                g = step_generator(tc.seed, step, device)
                # Draws for the global batch, then this rank's slice: the same numbers whatever
                # the number of processes (in one process lo:hi is the whole batch).
                shape = (tc.batch_size, *images.shape[1:])
                noises = torch.randn(shape, generator=g, device=device)[lo:hi]
                t = torch.rand(shape[0], generator=g, device=device, dtype=torch.float64)[lo:hi]
                noise_loss, image_loss = losses(net, images, noises, t, cfg, precision_ctx)
                if tc.nan_policy == "skip-batch" and not distributed.all_true(
                    torch.isfinite(noise_loss)
                ):
                    warnings.warn(
                        f"non-finite loss at step {step + 1}: batch skipped", stacklevel=1
                    )
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    batch_in_epoch += 1
                    continue
                optimizer.zero_grad(set_to_none=True)
                noise_loss.backward()
                optimizer.step()
                with torch.no_grad():
                    ema_update(ema_state, live_state, tc.ema_decay)
                    # Each rank adds its 1/world_size share: the sum over ranks is the global
                    # mean, so the checkpointed total does not depend on the number of ranks.
                    acc += (
                        torch.stack(
                            [
                                noise_loss.detach().double(),
                                image_loss.detach().double(),
                                torch.ones((), dtype=torch.float64, device=device),
                            ]
                        )
                        / distributed.world_size()
                    )
                step += 1
                batch_in_epoch += 1
                images_seen += images.shape[0] * distributed.world_size()  # global batch
                if step % tc.log_every == 0 or batch_in_epoch == steps_per_epoch:
                    # The only device->host read in the loop, once per log interval.
                    nl, il, cnt = distributed.reduced_sum(acc).tolist()
                    if not (math.isfinite(nl) and math.isfinite(il)):
                        raise TrainingDiverged(
                            f"loss became non-finite by step {step} (epoch {epoch + 1}); "
                            "training stopped, the last good checkpoint is kept "
                            "(lower the learning rate or use --nan-policy skip-batch)"
                        )
                    if bar is not None:
                        dt = time.perf_counter() - t_epoch
                        bar.set_postfix_str(
                            f"ep {epoch + 1}/{tc.epochs} noise {nl / max(cnt, 1):.4f} "
                            f"image {il / max(cnt, 1):.4f} {images_seen / max(dt, 1e-9):.1f} img/s"
                        )
                        bar.update(step - bar.n)
                if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                    _save_step_checkpoint(save_checkpoint, run_dir, step, tc.keep_checkpoints)
                if tc.max_steps and step >= tc.max_steps:
                    break
            epoch_seconds = time.perf_counter() - t_epoch
            if tc.max_steps and step >= tc.max_steps and batch_in_epoch < steps_per_epoch:
                save_checkpoint(last_ckpt)
                break

            # --- end of epoch: validation of the EMA network, KID, grid, checkpoint -----
            nl, il, cnt = distributed.reduced_sum(acc).tolist()
            if not (math.isfinite(nl) and math.isfinite(il)):
                raise TrainingDiverged(f"loss became non-finite by step {step}")
            val_noise, val_image = validate(
                ema, imageset.images, val_idx, cfg, mean_d, std_d, device, precision_ctx
            )
            # Sampling copy of the EMA net: BatchNorm folded, weights cast once.
            infer = prepare_inference(ema, device, precision)
            kid, t_kid = None, time.perf_counter()
            if kid_metric is not None:
                kid = kid_metric(
                    infer, imageset.images, val_idx, cfg, mean, std, device, nullcontext()
                )
            kid_seconds = time.perf_counter() - t_kid if kid is not None else None
            last_row = {
                "epoch": epoch + 1,
                "step": step,
                "train_noise_loss": nl / max(cnt, 1),
                "train_image_loss": il / max(cnt, 1),
                "val_noise_loss": val_noise,
                "val_image_loss": val_image,
                "kid": kid,
                "learning_rate": optimizer.param_groups[0]["lr"],
                "images_per_s": images_seen / max(epoch_seconds, 1e-9),
                "epoch_seconds": epoch_seconds,
                "wall_seconds": time.perf_counter() - t_start,
                "kid_seconds": kid_seconds,
            }
            grid = distributed.generate(  # sharded by image index, gathered on rank 0
                model=infer,
                mean=mean,
                std=std,
                schedule=cfg.schedule,
                image_size=cfg.model.image_size,
                channels=cfg.model.channels,
                n=GRID_IMAGES,
                seed=tc.seed,
                steps=20,
                batch_size=GRID_IMAGES,
                device=device,
            )
            if grid is not None:
                save_grid(grid, run_dir / "samples" / f"epoch-{epoch + 1:04d}.png", cols=6)
            epoch += 1
            batch_in_epoch = 0
            acc.zero_()
            if kid is not None and kid < best_kid:
                best_kid = kid
                save_checkpoint(run_dir / "checkpoints" / "best-kid.safetensors")
            # Metrics row first: a kill between the two resumes from an earlier checkpoint,
            # which drops this row and writes it again, instead of losing it.
            if distributed.is_main():
                append_metrics(run_dir, last_row)
            save_checkpoint(last_ckpt)
            log(
                f"epoch {epoch}/{tc.epochs}: noise loss {last_row['train_noise_loss']:.4f} "
                f"(val {val_noise:.4f}), image loss {last_row['train_image_loss']:.4f} "
                f"(val {val_image:.4f})"
                + (f", KID (paper protocol) {kid:.4f}" if kid is not None else "")
                + f", {last_row['images_per_s']:.1f} img/s"
            )
            if tc.max_steps and step >= tc.max_steps:
                break
            if tc.time_limit_minutes and distributed.any_true(  # rank clocks differ: agree
                time.perf_counter() - t_start > 60 * tc.time_limit_minutes
            ):
                log(f"time limit of {tc.time_limit_minutes:g} min reached after epoch {epoch}")
                break
    except KeyboardInterrupt:
        interrupted = True
        save_checkpoint(last_ckpt, collective=False)
        log(f"interrupted: checkpoint saved at step {step}; continue with --resume {run_dir}")
    finally:
        if bar is not None:
            bar.update(step - bar.n)  # the steps since the last log interval
            bar.close()
    skipped, tried = imageset.skipped, len(imageset.paths) + len(imageset.skipped)
    summary = data_mod.skip_summary(skipped, tried) if skipped else ""
    return TrainResult(run_dir, epoch, step, interrupted, last_row, summary)


def _init_state(spec: str, log: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """The EMA weights of another model, to start a new run from.

    The new run keeps its own data statistics for normalisation; the architecture must match
    (the image size may differ: every layer is convolutional).
    """
    from .pretrained import weights_path

    source = ckpt.load_model(weights_path(spec))
    log(f"starting from the weights of {spec} (trained {source.meta.get('step', '?')} steps)")
    return source.model.state_dict()


def _compiled_or_eager(model, do_compile: bool, tc, device, precision_ctx, channels_last: bool):
    """torch.compile the network where asked, proving it works on one trial step first.

    Compilation happens at the first call, so a broken toolchain would otherwise fail
    inside the loop. The trial's effect on BatchNorm statistics and gradients is undone.
    """
    net = maybe_compile(model, do_compile, device)
    if net is model:
        return model
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    size, c = model.cfg.image_size, model.cfg.channels
    n = tc.batch_size // distributed.world_size()  # this process's share of the global batch
    x = torch.zeros(n, c, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        with precision_ctx:
            out = net(x, torch.full((n,), 0.5, device=device))
        out.float().mean().backward()
    except Exception as e:  # noqa: BLE001 - any backend failure means: run eagerly
        warnings.warn(f"torch.compile failed ({type(e).__name__}); training eagerly", stacklevel=2)
        net = model
    model.load_state_dict(saved)
    model.zero_grad(set_to_none=True)
    return net


def _save_step_checkpoint(save_checkpoint, run_dir: Path, step: int, keep: int) -> None:
    d = run_dir / "checkpoints"
    save_checkpoint(d / f"step-{step:08d}.safetensors")
    save_checkpoint(d / "last.safetensors")
    old = sorted(d.glob("step-*.safetensors"))
    for f in old[:-keep] if distributed.is_main() else []:
        f.unlink(missing_ok=True)


def _progress_bar(enabled: bool, total: int | None, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)


@torch.no_grad()
def validate(
    ema: torch.nn.Module,
    images: np.ndarray,
    val_idx: np.ndarray,
    cfg: RunConfig,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    precision_ctx,
) -> tuple[float | None, float | None]:
    """Noise and image loss of the EMA network on the validation split.

    Noises and times are fixed (seeded by VAL_SEED and the batch index), so numbers are
    comparable between epochs. Returns (None, None) when there is no validation split.
    """
    if len(val_idx) == 0:
        return None, None
    ema.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    n = 0
    bs = cfg.train.batch_size
    for b, batch in enumerate(
        data_mod.iterate_batches(
            images,
            val_idx,
            bs,
            seed=0,
            epoch=0,
            shuffle=False,
            flip=False,
            drop_last=False,
            device=device,
            rank=distributed.rank(),
            world_size=distributed.world_size(),
        )
    ):
        # Under torchrun each rank takes its slice of the global batch and of its draws.
        n_global = min(bs, len(val_idx) - b * bs)
        lo, hi = distributed.shard(n_global)
        if hi == lo:  # the last, short batch may leave a rank nothing
            continue
        x = _normalise(batch, mean, std)
        g = step_generator(VAL_SEED, b, device)
        noises = torch.randn((n_global, *x.shape[1:]), generator=g, device=device)[lo:hi]
        t = torch.rand(n_global, generator=g, device=device, dtype=torch.float64)[lo:hi]
        nl, il = losses(ema, x, noises, t, cfg, precision_ctx)
        total += torch.stack([nl.double(), il.double()]) * x.shape[0]
        n += x.shape[0]
    sums = distributed.all_reduce_sum(torch.cat([total, total.new_tensor([n])]))
    nl, il = (sums[:2] / sums[2]).tolist()
    return nl, il


def _make_kid(tc, device: torch.device, log):
    """Per-epoch paper-protocol KID, or None (with a note) when no Inception weights exist."""
    try:
        from . import metrics
    except ImportError:  # pragma: no cover
        return None
    try:
        extractor = metrics.InceptionFeatures(metrics.find_inception_weights(), device=device)
    except metrics.InceptionWeightsMissing as e:
        log(f"note: per-epoch KID disabled: {e}")
        return None

    @torch.no_grad()
    def kid(ema, images, val_idx, cfg, mean, std, device, precision_ctx) -> float:
        idx = np.asarray(val_idx)[metrics.paper_order(len(val_idx))]  # not in file order
        idx = idx if tc.kid_images <= 0 else idx[: tc.kid_images]
        acc = metrics.PaperKID(extractor)
        bs = tc.batch_size
        values = []  # (batch index, its KID) of the batches this rank computed
        for b, start in enumerate(range(0, len(idx), bs)):
            if b % distributed.world_size() != distributed.rank():
                continue  # under torchrun whole batches go round-robin to the ranks
            real = torch.from_numpy(np.asarray(images[idx[start : start + bs]]))
            fake = generate(
                ema,
                mean=mean,
                std=std,
                schedule=cfg.schedule,
                image_size=cfg.model.image_size,
                channels=cfg.model.channels,
                n=len(real),
                seed=VAL_SEED,
                first_index=start,
                steps=tc.kid_steps,
                batch_size=bs,
                device=device,
                autocast=precision_ctx,
            )
            value = acc.update(real.permute(0, 3, 1, 2), fake.permute(0, 3, 1, 2))
            if value is not None:
                values.append((b, value))
        # Every rank gets all per-batch values, in batch order: the same mean everywhere.
        pairs = sorted(p for part in distributed.all_gather_object(values) for p in part)
        acc.values = [v for _, v in pairs]
        return acc.compute()

    return kid
