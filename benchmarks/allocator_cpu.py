"""The C allocator's part in a CPU training step: glibc as it comes vs freed memory kept.

Usage: python benchmarks/allocator_cpu.py [--rounds 4] [--iters 4] [--batch-size 64]
           [--image-size 64] [--precision fp32|bf16] [--nchw]

`runtime.keep_freed_memory` is process-wide, so each variant runs in a fresh process:
the default tuned training step (channels_last, fused AdamW, eager) timed `--iters` times
after two warm-up steps, the variants alternating for `--rounds` rounds so that noise from
other processes hits both alike. Prints per variant the median step, images/s, page faults
and kernel (sys) seconds per step, then the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, resource, statistics, sys, time
sys.path.insert(0, {here!r})
import torch
from common import train_step
from animeddim.runtime import kept_freed_memory
from animeddim.unet import UNet
from animeddim.config import UNetConfig
torch.manual_seed(0)
step = train_step(UNet(UNetConfig(image_size={s})), precision={p!r}, channels_last={cl},
                  batch_size={b}, image_size={s})
step(); step()
r0, ts = resource.getrusage(resource.RUSAGE_SELF), []
for _ in range({iters}):
    t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
r1 = resource.getrusage(resource.RUSAGE_SELF)
faults, sys_s = r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime
print(json.dumps({{"kept": kept_freed_memory(), "step_s": statistics.median(ts),
    "faults": faults / {iters}, "sys_s": sys_s / {iters}}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    a = ap.parse_args()
    code = CHILD.format(
        here=os.path.dirname(os.path.abspath(__file__)),
        s=a.image_size,
        b=a.batch_size,
        p=a.precision,
        cl=not a.nchw,
        iters=a.iters,
    )
    envs = {"system": {"ANIMEDDIM_MALLOC": "system"}, "kept": {"ANIMEDDIM_MALLOC": ""}}
    runs: dict[str, list[dict]] = {k: [] for k in envs}
    for _ in range(a.rounds):
        for name, extra in envs.items():
            out = subprocess.run(
                [sys.executable, "-c", code],
                env={**os.environ, **extra},
                capture_output=True,
                text=True,
                check=True,
            )
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(name, runs[name][-1], flush=True)
    med = {}
    for name, rs in runs.items():
        med[name] = statistics.median(r["step_s"] for r in rs)
        faults = statistics.median(r["faults"] for r in rs)
        sys_s = statistics.median(r["sys_s"] for r in rs)
        print(
            f"{name:<7} step {med[name]:.3f} s  {a.batch_size / med[name]:6.1f} img/s  "
            f"page faults/step {faults:9.0f}  sys s/step {sys_s:.2f}  (kept: {rs[0]['kept']})"
        )
    print(f"kept / system: {med['system'] / med['kept']:.2f}x")


if __name__ == "__main__":
    main()
