"""Bilinear upsampling in compiled CPU code: the stencil (`unet.upsample2x`) against
F.interpolate, in the compiled training step and in the compiled sampling network.

Usage: python benchmarks/upsample_cpu.py [--what train,sample] [--precision bf16]
           [--rounds 2] [--iters 7]

torch.compile guards on `unet.STENCIL_WHEN_COMPILED_ON_CPU`, so one process cannot hold
both variants compiled: each variant runs in a fresh process, alternating (stencil off, on,
off, on, ...), and each prints the median of its timed calls after two warm-up calls.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch


def child(what: str, precision: str, stencil: bool, iters: int) -> None:
    from common import CPU, net_with_bn_statistics, train_step

    from animeddim import unet
    from animeddim.config import UNetConfig
    from animeddim.runtime import keep_freed_memory, prepare_inference

    keep_freed_memory()
    unet.STENCIL_WHEN_COMPILED_ON_CPU = stencil
    torch.manual_seed(0)
    if what == "train":
        model = unet.UNet(UNetConfig(image_size=64))
        fn = train_step(
            model, precision=precision, channels_last=True, batch_size=64, image_size=64,
            compile=True,
        )  # fmt: skip
    else:
        net = prepare_inference(
            net_with_bn_statistics(64).eval(), CPU, precision, compile=True, chunk=16
        )
        x, v = torch.randn(64, 3, 64, 64), torch.rand(64)
        fn = torch.no_grad()(lambda: net(x, v))
    fn()
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    unit = "training images/s" if what == "train" else "network evaluations/s (images)"
    print(f"{what} {precision} stencil={'on ' if stencil else 'off'} {64 / med:7.1f} {unit}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", default="train,sample")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--child", nargs=2, metavar=("WHAT", "STENCIL"))
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.precision, a.child[1] == "1", a.iters)
        return
    for what in a.what.split(","):
        for _ in range(a.rounds):
            for stencil in ("0", "1"):
                cmd = [sys.executable, __file__, "--precision", a.precision,
                       "--iters", str(a.iters), "--child", what, stencil]  # fmt: skip
                subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
