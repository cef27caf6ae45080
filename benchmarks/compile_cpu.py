"""Is torch.compile worth it on this CPU? Compile time and step time, eager vs compiled.

Usage: python benchmarks/compile_cpu.py [--what train,sample] [--channels-last]
           [--freezing] [--batch-size 64] [--image-size 64] [--iters 3]

Training: bf16 autocast step (forward, backward, fused AdamW), eager vs torch.compile.
Sampling: the `prepare_inference` network (bf16 weights, folded BatchNorm), eager vs
compiled (with --freezing: inductor's freezing, i.e. constant-folded, prepacked weights).
Eager and compiled calls are interleaved; medians are printed.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import CPU, interleaved_medians, print_medians, train_step

from animeddim.config import UNetConfig
from animeddim.runtime import prepare_inference
from animeddim.unet import UNet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", default="train,sample")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--freezing", action="store_true")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    a = ap.parse_args()
    if a.freezing:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    torch.manual_seed(0)
    b, s = a.batch_size, a.image_size
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    x0 = torch.randn(b, 3, s, s).contiguous(memory_format=fmt)
    base = UNet(UNetConfig(image_size=s)).to(memory_format=fmt)
    fns = {}
    if "train" in a.what:
        for name, do_compile in (("train eager", False), ("train compiled", True)):
            fns[name] = train_step(
                copy.deepcopy(base),
                precision="bf16",
                channels_last=a.channels_last,
                batch_size=b,
                image_size=s,
                compile=do_compile,
            )
    if "sample" in a.what:
        inf = prepare_inference(base.eval(), CPU, "bf16", channels_last=a.channels_last, chunk=None)
        compiled = torch.compile(inf)
        v = torch.rand(b)
        fns["sample eager"] = torch.no_grad()(lambda: inf(x0, v))
        fns["sample compiled"] = torch.no_grad()(lambda: compiled(x0, v))
    for k, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        print(f"{k}: first call {time.perf_counter() - t0:.1f} s", flush=True)
        fn()
    print_medians(interleaved_medians(fns, a.iters), b, width=20)


if __name__ == "__main__":
    main()
