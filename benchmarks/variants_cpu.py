"""Time training-step and denoiser-step variants against each other in one process.

Usage: python benchmarks/variants_cpu.py [--what train,sample] [--batch-size 64]
           [--image-size 64] [--iters 3] [--compile]

Variants are interleaved round-robin (one timed call of each per round) so that noise
from other processes on the machine hits all of them alike; medians are printed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from animeddim.config import ScheduleConfig, UNetConfig
from animeddim.runtime import autocast, prepare_inference
from animeddim.schedule import diffuse
from animeddim.unet import UNet

CPU = torch.device("cpu")


def train_variant(model, precision: str, channels_last: bool, b: int, s: int):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = copy.deepcopy(model).to(memory_format=fmt).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, fused=True)
    x0 = torch.randn(b, 3, s, s).contiguous(memory_format=fmt)
    noise, t, ctx, sched = torch.randn_like(x0), torch.rand(b, dtype=torch.float64), None, None
    ctx, sched = autocast(CPU, precision), ScheduleConfig()

    def step() -> None:
        xt, _, nr = diffuse(x0, noise, t, sched)
        with ctx:
            pred = model(xt, (nr**2).view(-1))
        loss = F.l1_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def sample_variant(model, precision: str, channels_last: bool, b: int, s: int, **kw):
    kw.setdefault("chunk", None)  # one call on the whole batch
    net = prepare_inference(model, CPU, precision, channels_last=channels_last, **kw)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(b, 3, s, s).contiguous(memory_format=fmt)
    v = torch.rand(b)
    ctx = None  # prepare_inference applies the precision itself

    @torch.no_grad()
    def step() -> None:
        if ctx is None:
            net(x, v)
        else:
            with ctx:
                net(x, v)

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", default="train,sample")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    b, s = a.batch_size, a.image_size
    model = UNet(UNetConfig(image_size=s))
    # Give BatchNorm non-trivial running statistics so that folding is tested for real.
    with torch.no_grad():
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, s, s), torch.rand(8))
    variants = {}
    if "train" in a.what:
        variants["train fp32 NCHW"] = train_variant(model, "fp32", False, b, s)
        variants["train bf16 NCHW"] = train_variant(model, "bf16", False, b, s)
        variants["train bf16 channels_last"] = train_variant(model, "bf16", True, b, s)
    if "sample" in a.what:
        m = model.eval()
        variants["eval fp32 NCHW"] = sample_variant(m, "fp32", False, b, s, fold=False)
        variants["eval bf16-autocast NCHW"] = sample_variant(
            m, "bf16", False, b, s, fold=False, bf16_weights=False
        )
        variants["eval bf16-autocast CL"] = sample_variant(
            m, "bf16", True, b, s, fold=False, bf16_weights=False
        )
        variants["eval bf16-weights NCHW"] = sample_variant(
            m, "bf16", False, b, s, fold=False, bf16_weights=True
        )
        variants["eval bf16-weights CL"] = sample_variant(
            m, "bf16", True, b, s, fold=False, bf16_weights=True
        )
        variants["eval bf16-weights CL fold"] = sample_variant(
            m, "bf16", True, b, s, fold=True, bf16_weights=True
        )
        variants["eval bf16-weights NCHW fold"] = sample_variant(
            m, "bf16", False, b, s, fold=True, bf16_weights=True
        )
    for fn in variants.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.iters):
        for k, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:<32} {med * 1e3:8.0f} ms  {b / med:7.1f} img/s  (runs {len(ts)})")


if __name__ == "__main__":
    main()
