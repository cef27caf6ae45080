"""bf16 vs fp32 training quality: same seed, same data, same steps; validation noise loss.

Usage: python benchmarks/bf16_quality.py DATA_DIR [--precision fp32|bf16] [--steps 150]
           [--image-size 32] [--batch-size 32] [--threads N]

Trains the default network with the training loop's own pieces (train.losses,
train.ema_update, the step generators, the data order) for --steps optimiser steps, then
prints the validation noise and image loss (train.validate, fixed validation noise) of the
live and of the EMA network, each evaluated in fp32. Run it once per precision and compare.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from animeddim import batches as batches_mod
from animeddim import data as data_mod
from animeddim.config import RunConfig
from animeddim.runtime import autocast, fused_adamw_supported
from animeddim.train import (
    ema_update,
    losses,
    normalise,
    step_generator,
    validate,
)
from animeddim.train_state import float_state
from animeddim.unet import UNet

CPU = torch.device("cpu")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = RunConfig.from_dict(
        {
            "data": {"path": a.data, "image_size": a.image_size},
            "model": {"image_size": a.image_size},
            "train": {"batch_size": a.batch_size, "kid": False, "precision": a.precision},
        }
    ).validate()
    tc = cfg.train
    imageset = data_mod.load_folder(a.data, a.image_size, progress=False)
    train_idx, val_idx = data_mod.split_indices(
        len(imageset.images), cfg.data.val_fraction, cfg.data.split_seed
    )
    mean_l, std_l = data_mod.channel_stats(imageset.images, train_idx)
    mean, std = torch.tensor(mean_l), torch.tensor(std_l).clamp(min=1e-3)
    torch.manual_seed(tc.seed)
    model = UNet(cfg.model)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    kw = {"fused": True} if fused_adamw_supported(CPU) else {"foreach": True}
    opt = torch.optim.AdamW(
        model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay, **kw
    )
    ema_state, live_state = float_state(ema), float_state(model)
    ctx = autocast(CPU, a.precision)
    step, epoch, t0 = 0, 0, time.perf_counter()
    while step < a.steps:
        for batch in batches_mod.iterate_batches(
            imageset.images, train_idx, tc.batch_size, seed=tc.seed, epoch=epoch,
            shuffle=True, flip=cfg.data.flip, drop_last=True,
        ):  # fmt: skip
            images = normalise(batch, mean, std)
            g = step_generator(tc.seed, step, CPU)
            noises = torch.randn(images.shape, generator=g)
            t = torch.rand(images.shape[0], generator=g, dtype=torch.float64)
            noise_loss, _ = losses(model, images, noises, t, cfg, ctx)
            opt.zero_grad(set_to_none=True)
            noise_loss.backward()
            opt.step()
            with torch.no_grad():
                ema_update(ema_state, live_state, tc.ema_decay)
            step += 1
            if step >= a.steps:
                break
        epoch += 1
    train_s = time.perf_counter() - t0
    fp32 = autocast(CPU, "fp32")
    model.eval()
    out = {"precision": a.precision, "steps": step, "image_size": a.image_size,
           "batch_size": a.batch_size, "train_seconds": round(train_s, 1)}  # fmt: skip
    for name, net in (("live", model), ("ema", ema)):
        nl, il = validate(net, imageset.images, val_idx, cfg, mean, std, CPU, fp32)
        out[f"{name}_val_noise_loss"], out[f"{name}_val_image_loss"] = nl, il
    print(json.dumps(out))


if __name__ == "__main__":
    main()
