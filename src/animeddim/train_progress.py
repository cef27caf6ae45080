"""The training loop's clock and progress: the progress bar, the time limit, and the tally of
images and seconds that each metrics row reports.
"""

from __future__ import annotations

import math
import time

from . import distributed
from .train_state import TrainingDiverged, TrainState


def tally(state: TrainState, images: int, since: float) -> float:
    """Add `images` and the seconds since `since` to the tally of the next metrics row in
    `state` (a checkpoint holds it; see `TrainState.row_seconds`); return the time now."""
    now = time.perf_counter()
    state.row_images += images
    if state.row_seconds is not None:
        state.row_seconds += now - since
    return now


def log_progress(state: TrainState, tc, bar, images_per_s: float) -> None:
    """Read the running losses (the loop's only device->host read); stop if they diverged."""
    nl, il, cnt = distributed.reduced_sum(state.acc).tolist()
    if not (math.isfinite(nl) and math.isfinite(il)):
        raise TrainingDiverged(
            f"loss became non-finite by step {state.step} (epoch {state.epoch + 1}); "
            "training stopped, the last good checkpoint is kept "
            "(lower the learning rate or use --nan-policy skip-batch)"
        )
    if bar is not None:
        bar.set_postfix_str(
            f"ep {state.epoch + 1}/{tc.epochs} noise {nl / max(cnt, 1):.4f} "
            f"image {il / max(cnt, 1):.4f} {images_per_s:.1f} img/s"
        )
        bar.update(state.step - bar.n)


def time_limit_reached(tc, t_start: float) -> bool:
    """Whether --time-limit has passed (all ranks agree: their clocks differ)."""
    return bool(tc.time_limit_minutes) and distributed.any_true(
        time.perf_counter() - t_start > 60 * tc.time_limit_minutes
    )


def bar_total(tc, steps_per_epoch: int) -> int | None:
    if tc.time_limit_minutes:
        return None  # the clock ends the run: steps and rate, no misleading ETA
    total = tc.epochs * steps_per_epoch
    return min(total, tc.max_steps) if tc.max_steps else total


def progress_bar(enabled: bool, total: int | None, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)
