"""Profile one training step and one sampling (denoiser) step with torch.profiler.

Usage: python benchmarks/profile_cpu.py [--precision fp32|bf16] [--channels-last]
           [--batch-size 64] [--image-size 64] [--iters 3] [--rows 25]

Prints the operators that take the time (self CPU time, summed over `iters` steps after
one warm-up step), for the training step (forward, backward, AdamW, EMA) and for one
denoiser evaluation under no_grad in eval mode (what DDIM sampling repeats per step).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from animeddim.config import ScheduleConfig, UNetConfig
from animeddim.diffusion.schedule import diffuse
from animeddim.runtime import autocast, keep_freed_memory
from animeddim.unet import UNet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    a = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device("cpu")
    keep_freed_memory()  # as every animeddim command on the CPU
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    model = UNet(UNetConfig(image_size=a.image_size)).to(memory_format=fmt)
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, fused=True)
    ema_p, live_p = list(ema.parameters()), list(model.parameters())
    ctx = autocast(device, a.precision)
    s, b = a.image_size, a.batch_size
    x0 = torch.randn(b, 3, s, s).contiguous(memory_format=fmt)
    noise = torch.randn_like(x0)
    t = torch.rand(b, dtype=torch.float64)
    sched = ScheduleConfig()

    def train_step() -> None:
        with record_function("## forward"):
            xt, _, nr = diffuse(x0, noise, t, sched)
            with ctx:
                pred = model(xt, (nr**2).view(-1))
            loss = F.l1_loss(pred.float(), noise)
        with record_function("## backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("## optimizer"):
            opt.step()
        with record_function("## ema"), torch.no_grad():
            torch._foreach_lerp_(ema_p, live_p, 0.001)

    @torch.no_grad()
    def sample_step() -> None:
        with ctx:
            ema(x0, t.float())

    for name, fn in (("training step", train_step), ("sampling step (1 of 20)", sample_step)):
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.iters):
                fn()
        print(f"\n=== {name}: {a.precision}, channels_last={a.channels_last}, batch {b}, {s}px")
        _print_table(prof, a.iters, a.rows)


def _print_table(prof, iters: int, rows: int) -> None:
    """Operators by self CPU time: ms per step, share of the step, calls per step."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{'operator':<58} {'ms/step':>9} {'share':>7} {'calls/step':>10}")
    for e in events[:rows]:
        print(
            f"{e.key[:58]:<58} {e.self_cpu_time_total / 1e3 / iters:9.1f} "
            f"{100 * e.self_cpu_time_total / total:6.1f}% {e.count / iters:10.1f}"
        )
    print(f"{'total':<58} {total / 1e3 / iters:9.1f}")


if __name__ == "__main__":
    main()
