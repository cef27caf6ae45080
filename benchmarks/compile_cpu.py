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
import statistics
import time

import torch
import torch.nn.functional as F

from animeddim.config import ScheduleConfig, UNetConfig
from animeddim.runtime import autocast, prepare_inference
from animeddim.schedule import diffuse
from animeddim.unet import UNet

CPU = torch.device("cpu")


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
    noise, t = torch.randn_like(x0), torch.rand(b, dtype=torch.float64)
    sched, ctx = ScheduleConfig(), autocast(CPU, "bf16")
    base = UNet(UNetConfig(image_size=s)).to(memory_format=fmt)
    fns = {}
    if "train" in a.what:
        for name, do_compile in (("train eager", False), ("train compiled", True)):
            model = copy.deepcopy(base)
            net = torch.compile(model) if do_compile else model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

            def step(net=net, opt=opt) -> None:
                xt, _, nr = diffuse(x0, noise, t, sched)
                with ctx:
                    pred = net(xt, (nr**2).view(-1))
                loss = F.l1_loss(pred.float(), noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            fns[name] = step
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
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(a.iters):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:<20} {med * 1e3:8.0f} ms  {b / med:7.1f} img/s  {ts}")


if __name__ == "__main__":
    main()
