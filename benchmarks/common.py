"""Pieces the CPU benchmark scripts share: the training step they time, a network with
trained-looking BatchNorm statistics, and interleaved timing.

The scripts run as ``python benchmarks/NAME.py``, so this file is importable beside them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from animeddim.config import ScheduleConfig, UNetConfig
from animeddim.diffusion.schedule import diffuse
from animeddim.runtime import autocast, keep_freed_memory
from animeddim.unet import UNet

CPU = torch.device("cpu")
# As every animeddim command on the CPU does (ANIMEDDIM_MALLOC=system: the C library's way).
keep_freed_memory()


def real_folder_parser(n: int, times: str) -> argparse.ArgumentParser:
    """The options of the scripts that probe a model on a labelled real folder: REAL_DIR,
    --model / --run, --n images, --t times (comma-separated) and --threads."""
    ap = argparse.ArgumentParser()
    ap.add_argument("real")
    ap.add_argument("--model", default="avatars-64")
    ap.add_argument("--run", default=None, help="a run folder or checkpoint instead")
    ap.add_argument("--n", type=int, default=n)
    ap.add_argument("--t", default=times)
    ap.add_argument("--threads", type=int, default=1)
    return ap


def net_with_bn_statistics(image_size: int) -> UNet:
    """The default network with non-trivial BatchNorm running statistics, as after training,
    so that folding and inference paths see realistic values."""
    model = UNet(UNetConfig(image_size=image_size))
    with torch.no_grad():
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, image_size, image_size), torch.rand(8))
    return model


def train_step(
    model: torch.nn.Module,
    *,
    precision: str,
    channels_last: bool,
    batch_size: int,
    image_size: int,
    compile: bool = False,
) -> Callable[[], None]:
    """One training step of `model` (modified in place): diffuse, forward under autocast,
    L1 noise loss, backward, fused AdamW. Inputs are fixed so that only compute is timed."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, fused=True)
    net = torch.compile(model) if compile else model
    x0 = torch.randn(batch_size, 3, image_size, image_size).contiguous(memory_format=fmt)
    noise, t = torch.randn_like(x0), torch.rand(batch_size, dtype=torch.float64)
    sched, ctx = ScheduleConfig(), autocast(CPU, precision)

    def step() -> None:
        xt, _, nr = diffuse(x0, noise, t, sched)
        with ctx:
            pred = net(xt, (nr**2).view(-1))
        loss = F.l1_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def interleaved_medians(fns: dict[str, Callable[[], None]], iters: int) -> dict[str, list[float]]:
    """Seconds per call of each function, timed round-robin (one call of each per round)
    so that noise from other processes hits all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def print_medians(times: dict[str, list[float]], images: int, width: int = 32) -> None:
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:<{width}} {med * 1e3:8.0f} ms  {images / med:7.1f} img/s  (runs {len(ts)})")
