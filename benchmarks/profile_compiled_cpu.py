"""Profile the tuned (compiled) CPU paths: which ops take the time now.

Usage: python benchmarks/profile_compiled_cpu.py --what train [--nchw] [--eager]
       python benchmarks/profile_compiled_cpu.py --what sample [--chunk 16]

train: the bf16 training step (forward, backward, fused AdamW), channels_last and
torch.compile unless told otherwise, 2 profiled steps after 2 warm-up steps.
sample: the sampling network as `runtime.prepare_inference(..., compile=True)` makes it
(folded BatchNorm, bf16 weights, channels_last, inductor freezing), 5 profiled calls on
one chunk of images. Prints torch.profiler's table by self CPU time.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from animeddim.config import ScheduleConfig, UNetConfig
from animeddim.runtime import autocast, prepare_inference
from animeddim.schedule import diffuse
from animeddim.unet import UNet

CPU = torch.device("cpu")


def train_step(channels_last: bool, compile: bool, batch: int, size: int):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = UNet(UNetConfig(image_size=size)).to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    net = torch.compile(model) if compile else model
    x0 = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    noise, t = torch.randn_like(x0), torch.rand(batch, dtype=torch.float64)
    sched, ctx = ScheduleConfig(), autocast(CPU, "bf16")

    def step() -> None:
        xt, _, nr = diffuse(x0, noise, t, sched)
        with ctx:
            pred = net(xt, (nr**2).view(-1))
        loss = F.l1_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, 2


def sample_call(chunk: int, size: int):
    model = UNet(UNetConfig(image_size=size))
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, size, size), torch.rand(8))
    net = prepare_inference(model.eval(), CPU, "bf16", compile=True, chunk=chunk)
    x, v = torch.randn(chunk, 3, size, size), torch.rand(chunk)
    return torch.no_grad()(lambda: net(x, v)), 5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", choices=["train", "sample"], default="train")
    ap.add_argument("--nchw", action="store_true", help="train in the default layout")
    ap.add_argument("--eager", action="store_true", help="train without torch.compile")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=64)
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.what == "train":
        fn, n = train_step(not a.nchw, not a.eager, a.batch_size, a.image_size)
    else:
        fn, n = sample_call(a.chunk, a.image_size)
    for _ in range(2):
        fn()  # compile and warm up
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(n):
            fn()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
