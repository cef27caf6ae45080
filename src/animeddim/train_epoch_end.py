"""The work at an epoch's end: validation of the EMA network, KID, the sample grid and the
metrics row; then the epoch counted done, the best-KID checkpoints it earns, and its log line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from . import distributed
from .io import save_grid
from .runtime import prepare_inference
from .train_kid import draw
from .train_state import TrainingDiverged

GRID_IMAGES = 18  # 3 x 6 sample grid per epoch, as in the Keras example


def end_of_epoch(
    state,
    data,
    cfg,
    rt,
    kid_metric,
    run_dir: Path,
    standard_kid_metric=None,
    last=False,
    *,
    validate: Callable[..., tuple[float | None, float | None]],
) -> dict[str, Any]:
    """Validation of the EMA network, KID and the sample grid of the epoch after
    `state.epoch`; its metrics row (`close_epoch` then counts the epoch done).
    `standard_kid_metric`: the --eval-every measure (`train_kid.make_standard_kid`), or None,
    taken every eval_every epochs and at the run's last epoch (`last`: it stops early).
    `validate`: `train.validate`, which shares the loss (`train.losses`) with the steps."""
    nl, il, cnt = distributed.reduced_sum(state.acc).tolist()
    if not (math.isfinite(nl) and math.isfinite(il)):
        raise TrainingDiverged(f"loss became non-finite by step {state.step}")
    mean_d, std_d = data.mean.to(rt.device), data.std.to(rt.device)
    images, val_idx = data.imageset.images, data.val_idx
    val_noise, val_image = validate(
        state.ema, data.pixels, val_idx, cfg, mean_d, std_d, rt.device, rt.precision_ctx
    )
    # Sampling copy of the EMA net: BatchNorm folded, weights cast once.
    infer = prepare_inference(state.ema, rt.device, rt.precision)
    kid, t_kid = None, time.perf_counter()
    if kid_metric is not None:
        kid = kid_metric(infer, images, val_idx, cfg, data.mean, data.std, rt.device, nullcontext())
    row = {
        "epoch": state.epoch + 1,
        "step": state.step,
        "train_noise_loss": nl / max(cnt, 1),
        "train_image_loss": il / max(cnt, 1),
        "val_noise_loss": val_noise,
        "val_image_loss": val_image,
        "kid": kid,
        "learning_rate": state.optimizer.param_groups[0]["lr"],
        "kid_seconds": time.perf_counter() - t_kid if kid is not None else None,
    }
    tc, epoch = cfg.train, state.epoch + 1
    last = last or epoch == tc.epochs
    if standard_kid_metric is not None and (epoch % tc.eval_every == 0 or last):
        t_std = time.perf_counter()
        row["standard_kid"] = standard_kid_metric(infer, data, rt.device)
        row["standard_kid_seconds"] = time.perf_counter() - t_std
    grid = draw(  # sharded by image index, gathered on rank 0
        cfg, infer, data, rt.device, n=GRID_IMAGES, seed=cfg.train.seed, steps=20,
        batch_size=GRID_IMAGES,
    )  # fmt: skip
    if grid is not None:
        save_grid(grid, run_dir / "samples" / f"epoch-{state.epoch + 1:04d}.png", cols=6)
    return row


def close_epoch(state, row: dict[str, Any], run_dir: Path) -> list[Path]:
    """Count the epoch of `row` as done in `state` (called once its metrics row is written);
    the best-KID checkpoints it improves on, to be written next, holding this state."""
    state.epoch += 1
    state.batch_in_epoch = 0
    state.acc.zero_()
    state.row_images, state.row_seconds = 0, 0.0
    best = []
    if row["kid"] is not None and row["kid"] < state.best_kid:
        state.best_kid = row["kid"]
        best.append(run_dir / "checkpoints" / "best-kid.safetensors")
    standard_kid = row.get("standard_kid")
    if standard_kid is not None and standard_kid < state.best_standard_kid:
        state.best_standard_kid = standard_kid
        best.append(run_dir / "checkpoints" / "best-standard-kid.safetensors")
    return best


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """The log line of one epoch; a validation loss or KID that was not measured is left out."""
    line = f"epoch {row['epoch']}/{epochs}: noise loss {row['train_noise_loss']:.4f}"
    if row["val_noise_loss"] is not None:
        line += f" (val {row['val_noise_loss']:.4f})"
    line += f", image loss {row['train_image_loss']:.4f}"
    if row["val_image_loss"] is not None:
        line += f" (val {row['val_image_loss']:.4f})"
    if row["kid"] is not None:
        line += f", KID (paper protocol) {row['kid']:.4f}"
    if row.get("standard_kid") is not None:
        line += f", standard KID {row['standard_kid']:.4f}"
    if row["images_per_s"] is None:  # resumed from a checkpoint that did not keep the time
        return line
    return line + f", {row['images_per_s']:.1f} img/s"
