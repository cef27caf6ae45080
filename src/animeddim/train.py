"""Training: the loop, losses, EMA, validation, per-epoch KID and checkpoint cadence.

One top-to-bottom function split by short section comments. Randomness is a pure
function of (seed, step) for noise and times and of (seed, epoch, batch) for data order
and flips, so a resumed run sees exactly what an uninterrupted one would have seen.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import batches as batches_mod
from . import conditioning, distributed, interrupts, run_folder
from . import data as data_mod
from .config import RunConfig
from .diffusion.objectives import focus_times, objective, target_and_x0
from .diffusion.schedule import diffuse
from .run_folder import append_metrics, prepare_run_dir, write_config
from .runtime import (
    autocast,
    data_on_device,
    default_channels_last,
    resolve_device,
    resolve_precision,
    uses_cuda_graphs,
)
from .train_data import (
    check_batchnorm_batch,
    check_data,
    check_start,
    data_root,
    list_data,
    load_data,
    record_data,
    write_reference,
)
from .train_epoch_end import close_epoch, end_of_epoch, epoch_line
from .train_kid import (
    VAL_SEED,
    eval_real_features,
    make_kid,
    make_standard_kid,
    training_inception,
)
from .train_maths import ema_decay_at, ema_update, learning_rate_at, normalise, step_generator
from .train_progress import bar_total, log_progress, progress_bar, tally, time_limit_reached
from .train_state import (
    Runtime,
    TrainState,
    build_state,
    compiled_network,
    float_state,
    initial_weights,
    restore,
    resume_point,
    save_checkpoint,
    save_step_checkpoint,
)
from .train_state import TrainingDiverged as TrainingDiverged  # what `train` raises: said here

VAL_CHUNK = 256  # validation draws come in chunks of this many images (`validation_draws`)


@dataclass
class TrainResult:
    """Where `train` stopped: epochs and optimiser steps done, whether Ctrl-C (or SIGTERM
    under the CLI) stopped it, and the last metrics.csv row written (None if no epoch
    ended)."""

    run_dir: Path
    epoch: int
    step: int
    interrupted: bool
    last_row: dict[str, Any] | None
    skipped_summary: str = ""  # one line: the data files skipped and why ("" if none)


def losses(
    model: Callable[..., torch.Tensor],
    images: torch.Tensor,
    noises: torch.Tensor,
    t: torch.Tensor,
    cfg: RunConfig,
    precision_ctx,
    cond: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective and the MAE image loss on x0_hat, both fp32 scalars.

    The objective compares the network's own output (`raw=True`: eps_hat or v_hat, as
    cfg.model.prediction says) with its target, by cfg.train.loss and weighted by
    cfg.train.loss_weight (`diffusion.objectives`); by default the squared error of eps_hat,
    the paper's eq. 4 (`loss: mae` is the Keras example's). The image loss is the same MAE
    whatever the objective, so that runs with different objectives can be compared on it.
    """
    noisy_images, signal_rate, noise_rate = diffuse(images, noises, t, cfg.schedule)
    with precision_ctx:
        pred = model(noisy_images, (noise_rate**2).view(-1), cond, raw=True)
    pred = pred.float()
    target, pred_images = target_and_x0(
        cfg.model.prediction, images, noises, noisy_images, pred, signal_rate, noise_rate
    )
    return objective(pred, target, t, cfg), F.l1_loss(pred_images, images)


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    allow_changed_data: bool = False,
) -> TrainResult:
    """Train (or resume) a DDIM on cfg.data.path, writing everything to run_dir.

    To resume, pass `run_folder.load_run_config(run_dir)` (settings of the data, model and schedule
    must stay as they were; epochs, device, precision and the like may change). A resume
    on data that changed since the run started is an error unless `allow_changed_data`.
    Every setting that cannot work is refused before the run folder is touched.

    From 32 images on, decoding runs in worker processes (forkserver): a script must keep
    its top-level code under ``if __name__ == "__main__":``, or each worker runs it again
    (they then fail, and decoding falls back to this process with a warning).

    :param cfg: the run's settings (`RunConfig.from_dict` builds one from a dict, such as
        `config_files.load_config_file` reads from a JSON/TOML file).
    :param progress: a tqdm progress bar on stderr while decoding and training.
    :param log: called with each line a person would read (epoch summaries, notes); the
        default prints them to stdout, ``lambda line: None`` silences them.
    :return: where training stopped; `interrupted` if Ctrl-C saved a checkpoint early.
    :raises ConfigError, DataError, RunFolderError, CheckpointError: a setting, data
        folder, run folder or `train.init` model that cannot work.
    """
    # 1. Where: torchrun's process group, device, precision; rank 0 alone writes files.
    run_dir = Path(run_dir)
    cfg.validate()
    tc = cfg.train
    device = distributed.setup(resolve_device(tc.device))
    distributed.check_same({**cfg.to_dict(), "run folder": str(run_dir), "resume": resume})
    distributed.check_global_batch(tc.batch_size)
    check_batchnorm_batch(cfg, distributed.world_size())
    if not distributed.is_main():
        progress, log = False, _quiet
    precision = resolve_precision(tc.precision, device)
    channels_last = default_channels_last(device)
    lo, hi = distributed.shard(tc.batch_size)  # this rank's slice of every global batch
    rt = Runtime(device, precision, autocast(device, precision), channels_last, lo, hi)
    torch.manual_seed(tc.seed)
    distributed.on_main(lambda: check_start(cfg, run_dir, resume))

    # 2. Weights to start from, read before any image is decoded (a wrong file fails at once).
    init_state = None  # an error every rank finds is said once (as below: on_every)
    if tc.init and not resume:
        init_state = distributed.on_every(lambda: initial_weights(tc.init, log))

    with distributed.held_on_main(lambda: run_folder.lock(run_dir, log)):
        # 3. Data: decode once, split, statistics; refuse what cannot train before writing
        #    (a resumed run with nothing left to train: before any image is read).
        saved = resume_point(run_dir, cfg, allow_changed_data, log) if resume else None
        root = data_root(cfg, resume)
        listed = list_data(cfg, root, saved, allow_changed_data, log)  # a resume: its images
        data = load_data(cfg, root, progress, resume, listed, log)
        check_data(cfg, data, saved, allow_changed_data, log)  # a resume: its labels too
        inception = training_inception(cfg, device)  # a bad weights file is refused here
        eval_real = eval_real_features(cfg, data, inception)  # and a folder KID cannot read
        if tc.eval_real:
            tc.eval_real = str(Path(tc.eval_real).resolve())  # resumable from anywhere
        record_data(cfg, root, data)  # where it lies: resumable from anywhere
        if data_on_device(tc.data_on_device, data.imageset.images.nbytes, device):
            data.on_device = batches_mod.device_images(data.imageset.images, device)
        if not resume:  # a resumed run's folder is made ready by `resume_point`
            distributed.on_main(lambda: prepare_run_dir(run_dir, cfg, resume))

        # 4. Network, EMA copy, optimiser; a resumed run's state from its newest checkpoint
        #    (refused if it has nothing left to train, before config.json records anything).
        state = build_state(cfg, rt, init_state, data)
        if resume:
            distributed.on_every(lambda: restore(state, data, saved, run_dir, cfg, rt, log))
            distributed.on_main(lambda: write_config(run_dir, cfg))
        rt.net = compiled_network(state, cfg, rt, data.steps_per_epoch)
        rt.ema_tensors, rt.live_tensors = float_state(state.ema), float_state(state.model)

        # 5. Epochs: optimiser steps, then validation, KID, grid, checkpoint and a log line.
        return _epochs(cfg, run_dir, data, state, rt, progress, log, inception, eval_real)


def _epochs(cfg, run_dir, data, state, rt, progress, log, inception, eval_real) -> TrainResult:
    """The epoch loop of `train`; Ctrl-C saves a checkpoint and returns `interrupted`."""
    tc = cfg.train
    save = partial(save_checkpoint, state=state, data=data, cfg=cfg, rt=rt)
    if distributed.is_main():
        write_reference(run_dir, data)
    kid_metric = make_kid(cfg, len(data.val_idx), inception, log) if tc.kid else None
    standard_kid = make_standard_kid(cfg, inception, eval_real, log) if tc.eval_every else None
    bar = progress_bar(progress, bar_total(tc, data.steps_per_epoch), state.step)
    t_start, interrupted, last_row = time.perf_counter(), False, None
    pending: list[Path] = []  # epoch-end checkpoints not written yet
    last_ckpt = run_dir / "checkpoints" / "last.safetensors"
    try:
        while state.epoch < tc.epochs:
            train_epoch(state, data, cfg, rt, bar, save, run_dir)
            stop = bool(tc.max_steps) and state.step >= tc.max_steps
            if stop and state.batch_in_epoch < data.steps_per_epoch:  # stopped inside the epoch
                save(last_ckpt)
                break
            time_up = time_limit_reached(tc, t_start)
            epoch = state.epoch + 1
            if epoch % tc.epoch_end_every and epoch < tc.epochs and not (stop or time_up):
                state.epoch, state.batch_in_epoch = epoch, 0  # the work waits for its epoch
                continue
            last_row = end_of_epoch(
                state,
                data,
                cfg,
                rt,
                kid_metric,
                run_dir,
                standard_kid,
                stop or time_up,
                validate=validate,
            )
            last_row.update(
                images_per_s=state.row_images / state.row_seconds if state.row_seconds else None,
                epoch_seconds=state.row_seconds,
                wall_seconds=time.perf_counter() - t_start,
            )
            # Metrics row first, the epoch counted done after it: a kill before the epoch's
            # checkpoint resumes from an earlier one, which drops this row and writes it
            # again; the checkpoint a Ctrl-C saves counts the epoch only once its row is in.
            with interrupts.deferred():  # the row and the epoch counted done go together
                if distributed.is_main():
                    append_metrics(run_dir, last_row)
                pending = close_epoch(state, last_row, run_dir)
            while pending:  # a Ctrl-C cutting one short writes it again (below)
                save(pending[0])
                pending.pop(0)
            save(last_ckpt)
            log(epoch_line(last_row, tc.epochs))
            if time_up:
                log(f"time limit of {tc.time_limit_minutes:g} min reached after epoch {epoch}")
            if stop or time_up:
                break
    except KeyboardInterrupt:
        interrupted = True
        for path in pending:  # the best checkpoints of the epoch whose row is written
            save(path, collective=False)
        save(last_ckpt, collective=False)
        log(f"interrupted: checkpoint saved at step {state.step}; continue with --resume {run_dir}")
    finally:
        if bar is not None:
            bar.update(state.step - bar.n)  # the steps since the last log interval
            bar.close()
    imageset = data.imageset
    skipped, tried = imageset.skipped, len(imageset.paths) + len(imageset.skipped)
    summary = data_mod.skip_summary(skipped, tried) if skipped else ""
    return TrainResult(run_dir, state.epoch, state.step, interrupted, last_row, summary)


def _quiet(_: str) -> None:
    pass


# --- 5. one epoch -------------------------------------------------------------------------------


def train_epoch(state, data, cfg, rt, bar, save, run_dir: Path) -> int:
    """The optimiser steps of one epoch (from `state.batch_in_epoch`); returns images seen."""
    tc = cfg.train
    state.model.train()
    t_epoch, images_seen = time.perf_counter(), 0
    t_counted = t_epoch  # the steps' time up to here is in state.row_seconds
    mean_d, std_d = data.mean.to(rt.device), data.std.to(rt.device)
    batches = batches_mod.iterate_batches(
        data.pixels,
        data.train_idx,
        tc.batch_size,
        seed=tc.seed,
        epoch=state.epoch,
        shuffle=True,
        flip=cfg.data.flip,
        drop_last=True,
        device=rt.device,
        start_batch=state.batch_in_epoch,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
        codes=data.codes,
    )
    for batch in batches:
        interrupts.check()  # a SIGTERM whose first raise was swallowed ends here
        cond = None
        if data.codes is not None:  # each attribute dropped per (seed, epoch, global batch)
            batch, cond = batch
            g_drop = conditioning.drop_generator(
                tc.seed, state.epoch, state.batch_in_epoch, rt.device
            )
            cond = conditioning.drop_attributes(
                cond, tc.cond_drop, g_drop, global_rows=tc.batch_size, first_row=rt.lo
            )
        images = normalise(batch, mean_d, std_d)
        if rt.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with interrupts.deferred():  # a Ctrl-C lands between steps: checkpoints hold whole ones
            trained = train_step(state, images, cfg, rt, cond)
            n = images.shape[0] * distributed.world_size() if trained else 0  # global batch
            images_seen += n
            state.step += 1
            state.batch_in_epoch += 1
            t_counted = tally(state, n, t_counted)
        if state.step % tc.log_every == 0 or state.batch_in_epoch == data.steps_per_epoch:
            log_progress(state, tc, bar, images_seen / max(time.perf_counter() - t_epoch, 1e-9))
        if tc.checkpoint_every and state.step % tc.checkpoint_every == 0:
            save_step_checkpoint(save, run_dir, state.step, tc.keep_checkpoints)
        if tc.max_steps and state.step >= tc.max_steps:
            break
    tally(state, 0, t_counted)  # the last step checkpoint's writing
    return images_seen


def train_step(
    state: TrainState,
    images: torch.Tensor,
    cfg: RunConfig,
    rt: Runtime,
    cond: torch.Tensor | None = None,
) -> bool:
    """One optimiser step on this rank's slice of a global batch; False if it was skipped.
    `cond`: the [b x A] attribute codes of its images (conditional models).

    Noises and times are drawn for the global batch, then sliced: the same numbers whatever
    the number of processes (in one process lo:hi is the whole batch).
    """
    tc = cfg.train
    if uses_cuda_graphs(tc.compile_mode, rt.device):  # the previous step's graph outputs are free
        torch.compiler.cudagraph_mark_step_begin()
    g = step_generator(tc.seed, state.step, rt.device)
    shape = (tc.batch_size, *images.shape[1:])
    noises = torch.randn(shape, generator=g, device=rt.device)[rt.lo : rt.hi]
    t = torch.rand(shape[0], generator=g, device=rt.device, dtype=torch.float64)
    t = focus_times(t, cfg)[rt.lo : rt.hi]
    noise_loss, image_loss = losses(rt.net, images, noises, t, cfg, rt.precision_ctx, cond)
    if tc.nan_policy == "skip-batch" and not distributed.all_true(torch.isfinite(noise_loss)):
        warnings.warn(f"non-finite loss at step {state.step + 1}: batch skipped", stacklevel=1)
        state.optimizer.zero_grad(set_to_none=True)
        return False
    state.optimizer.zero_grad(set_to_none=True)
    noise_loss.backward()
    if tc.lr_warmup_images:
        for group in state.optimizer.param_groups:
            group["lr"] = learning_rate_at(state.step, tc)
    state.optimizer.step()
    with torch.no_grad():
        ema_update(
            rt.ema_tensors, rt.live_tensors, ema_decay_at(state.step, tc.ema_decay, tc.ema_warmup)
        )
        # Each rank adds its 1/world_size share: the sum over ranks is the global mean, so
        # the checkpointed total does not depend on the number of ranks.
        one = torch.ones((), dtype=torch.float64, device=rt.device)
        parts = [noise_loss.detach().double(), image_loss.detach().double(), one]
        state.acc += torch.stack(parts) / distributed.world_size()
    return True


def validation_draws(
    start: int, stop: int, shape: torch.Size, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noises [n x C x H x W] and float64 times [n] of validation images start .. stop - 1
    (positions in the split): drawn in fixed chunks of VAL_CHUNK images seeded by VAL_SEED and
    the chunk index, so an image's draws do not depend on how the split is batched."""
    chunks = range(start // VAL_CHUNK, (stop - 1) // VAL_CHUNK + 1)
    noises, times = [], []
    for c in chunks:
        g = step_generator(VAL_SEED, c, device)
        noises.append(torch.randn((VAL_CHUNK, *shape), generator=g, device=device))
        times.append(torch.rand(VAL_CHUNK, generator=g, device=device, dtype=torch.float64))
    lo = start - chunks[0] * VAL_CHUNK
    return torch.cat(noises)[lo : lo + stop - start], torch.cat(times)[lo : lo + stop - start]


@torch.no_grad()
def validate(
    ema: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    val_idx: np.ndarray,
    cfg: RunConfig,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    precision_ctx,
) -> tuple[float | None, float | None]:
    """Noise and image loss of the EMA network on the validation split.

    Each validation image's noise and time are fixed by its position in the split
    (`validation_draws`), whatever the batch size or the number of processes, so numbers
    compare between epochs and between runs. Returns (None, None) when there is no
    validation split.
    """
    if len(val_idx) == 0:
        return None, None
    ema.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    n = 0
    bs = cfg.train.batch_size
    for b, batch in enumerate(
        batches_mod.iterate_batches(
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
        x = normalise(batch, mean, std)
        first = b * bs + lo  # this rank's first image, by position in the split
        noises, t = validation_draws(first, first + hi - lo, x.shape[1:], device)
        nl, il = losses(ema, x, noises, t, cfg, precision_ctx)
        total += torch.stack([nl.double(), il.double()]) * x.shape[0]
        n += x.shape[0]
    sums = distributed.all_reduce_sum(torch.cat([total, total.new_tensor([n])]))
    nl, il = (sums[:2] / sums[2]).tolist()
    return nl, il
