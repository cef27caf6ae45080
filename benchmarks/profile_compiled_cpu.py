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
from common import CPU, net_with_bn_statistics, train_step
from torch.profiler import ProfilerActivity, profile

from animeddim.config import UNetConfig
from animeddim.runtime import prepare_inference
from animeddim.unet import UNet


def sample_call(chunk: int, size: int):
    model = net_with_bn_statistics(size)
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
        model = UNet(UNetConfig(image_size=a.image_size))
        fn = train_step(
            model,
            precision="bf16",
            channels_last=not a.nchw,
            batch_size=a.batch_size,
            image_size=a.image_size,
            compile=not a.eager,
        )
        n = 2
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
