"""KID measured while training: the per-epoch paper-protocol KID on the validation split and the
standard KID of `train --eval-every`, both of the EMA network on fixed noises (VAL_SEED), so
epochs compare. `train` builds them once (`make_kid`, `make_standard_kid`) from the Inception
network `training_inception` loaded before the run folder is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .config import ConfigError, RunConfig
from .diffusion.generation import generate
from .words import counted

VAL_SEED = 0x5EED  # validation noise and times, and the KID samples, are the same every epoch


def training_inception(cfg: RunConfig, device: torch.device):
    """The Inception network of the per-epoch and --eval-every KIDs, as (extractor, None);
    (None, why) when no weights are installed; (None, None) when neither KID is asked.
    ConfigError for a weights file that is not the FID Inception, before the run folder is
    touched."""
    if not (cfg.train.kid or cfg.train.eval_every):
        return None, None
    from . import metrics

    try:
        return metrics.InceptionFeatures(metrics.find_inception_weights(), device=device), None
    except metrics.InceptionWeightsMissing as e:
        return None, str(e)
    except ValueError as e:  # a file that is not the TorchScript FID Inception
        raise ConfigError(f"cannot measure KID while training: {e}") from None


def eval_real_features(cfg: RunConfig, data, inception) -> torch.Tensor | None:
    """The standard-protocol features the --eval-every KID compares with: --eval-real's
    images (default: the validation split), on rank 0 (None elsewhere, and without
    --eval-every or Inception weights). Computed before the run folder is touched, so a
    folder KID cannot read is one ConfigError naming it."""
    from . import metrics
    from .data import DataError

    tc = cfg.train
    extractor = inception[0]
    if not tc.eval_every or extractor is None or not distributed.is_main():
        return None
    if not tc.eval_real:
        images = np.asarray(data.imageset.images[data.val_idx])
        return extractor.features(torch.from_numpy(images).permute(0, 3, 1, 2), "standard")
    try:
        # read as the run reads its own images, so that a resumed run measures as it began
        profiles = cfg.data.profiles_applied
        return metrics.folder_features(Path(tc.eval_real), extractor, "standard", profiles=profiles)
    except (DataError, OSError, ValueError) as e:
        raise ConfigError(f"--eval-real {tc.eval_real!r}: {e}") from None


def draw(cfg: RunConfig, model, data, device: torch.device, **kwargs: Any):
    """uint8 images of `model` in the run's data space (`data.mean`/`std`, the run's schedule
    and image shape), sharded over torchrun's ranks and gathered on rank 0
    (`distributed.generate`; `kwargs`: n, seed, steps, batch_size, sampler, ...)."""
    return distributed.generate(
        model=model,
        mean=data.mean,
        std=data.std,
        schedule=cfg.schedule,
        image_size=cfg.model.image_size,
        channels=cfg.model.channels,
        device=device,
        **kwargs,
    )


def make_standard_kid(cfg: RunConfig, inception, real: torch.Tensor | None, log):
    """The --eval-every measure: standard-protocol KID (torch-fidelity's) of --eval-images
    samples of the EMA network against `real` (`eval_real_features`); None with a note when
    no Inception weights exist (`inception`: `training_inception`'s pair). Under torchrun the
    samples are drawn by all ranks and measured on rank 0; every rank returns rank 0's value
    (the best checkpoint is written by all). Where either set is small the caution `kid` gives
    (`metrics.few_images_note`) is a note, once: the counts are those of every measure."""
    from . import metrics

    tc = cfg.train
    extractor, missing = inception
    if extractor is None:
        log(f"note: --eval-every KID disabled: {missing}")
        return None
    if real is not None:  # rank 0, which measures
        what = f"images in {tc.eval_real!r}" if tc.eval_real else "validation images"
        sets = [(len(real), what), (tc.eval_images, "generated images")]
        if note := metrics.few_images_note(sets, fid=False):
            log(f"note: --eval-every {note}")

    @torch.no_grad()
    def kid(ema, data, device) -> float:
        fake = draw(  # the same noises every time: epochs compare
            cfg, ema, data, device, n=tc.eval_images, seed=VAL_SEED, steps=tc.eval_steps,
            sampler=tc.eval_sampler, batch_size=tc.batch_size,
        )  # fmt: skip
        value = None
        if fake is not None:
            f_fake = extractor.features(fake.permute(0, 3, 1, 2), "standard")
            value = metrics.kid_standard(real, f_fake)[0]
        return distributed.all_gather_object(value)[0]

    return kid


def make_kid(cfg: RunConfig, n_val: int, inception, log):
    """Per-epoch paper-protocol KID, or None with a note: when the validation split gives no
    batch of 2 images (the per-batch MMD needs 2) or no Inception weights exist."""
    from . import metrics

    tc = cfg.train
    n_kid = n_val if tc.kid_images <= 0 else min(tc.kid_images, n_val)
    if min(n_kid, tc.batch_size) < 2:
        log(
            f"note: per-epoch KID disabled: it compares batches of at least 2 validation "
            f"images, and {counted(n_kid, 'validation image')} in batches of {tc.batch_size} "
            "give none "
            "(raise --val-fraction, --batch-size or --kid-images, or use --no-kid)"
        )
        return None
    extractor, missing = inception
    if extractor is None:
        log(f"note: per-epoch KID disabled: {missing}")
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
