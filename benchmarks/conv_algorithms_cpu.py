"""The sampling network's 3x3 convolutions: oneDNN's direct convolution (what every CPU path
uses, channels_last) against NNPACK's Winograd convolution (`torch._nnpack_spatial_convolution`,
NCHW, which PyTorch only picks when oneDNN is off), shape by shape, at a sampling chunk size.

Usage: python benchmarks/conv_algorithms_cpu.py [--chunks 16,64] [--iters 10]

Run it under the AVX2 cap (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2) to ask whether a Winograd kernel would lift sampling on an
AVX2-only CPU past the direct convolution's rate. Prints, per shape, both rates in GFLOP/s of
direct-convolution work (Winograd does fewer multiplications for the same output), and per
chunk the 3x3 convolution time of one network call with oneDNN alone and with the faster
of the two for each shape, and their ratio.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
import torch.nn.functional as F
from common import net_with_bn_statistics

from animeddim.unet import NormFoldedConv, fold_batchnorm


def conv_shapes(image_size: int = 64) -> collections.Counter:
    """(input C x H x W, weight shape) -> how many 3x3 convolutions of that shape one call of
    the folded sampling network makes."""
    net = fold_batchnorm(net_with_bn_statistics(image_size).eval())
    shapes: collections.Counter = collections.Counter()

    def hook(module, inputs, output):
        if module.weight.shape[-1] == 3:
            shapes[(tuple(inputs[0].shape[1:]), tuple(module.weight.shape))] += 1

    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, NormFoldedConv)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        net(torch.randn(1, 3, image_size, image_size), torch.rand(1))
    return shapes


def seconds(fns, iters: int) -> list[float]:
    """Median seconds of each function's calls, the functions called in turn (so that load
    from other work on the machine falls on all of them alike)."""
    for fn in fns:
        fn(), fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [sorted(ts)[len(ts) // 2] for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", default="16,64")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    if not torch._nnpack_available():  # also initialises NNPACK, which its op needs first
        raise SystemExit("this PyTorch build has no NNPACK")
    torch.manual_seed(0)
    shapes = conv_shapes()
    for chunk in (int(c) for c in args.chunks.split(",")):
        direct_total = best_total = 0.0
        print(f"chunk {chunk}: shape (C x H x W -> weight), count, GFLOP/s oneDNN / NNPACK")
        for (xs, ws), count in sorted(shapes.items()):
            x = torch.randn(chunk, *xs)
            w, b = torch.randn(*ws) * 0.05, torch.randn(ws[0])
            x_cl = x.contiguous(memory_format=torch.channels_last)
            w_cl = w.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                direct, wino = seconds(
                    [
                        lambda x_cl=x_cl, w_cl=w_cl, b=b: F.conv2d(x_cl, w_cl, b, padding=1),
                        lambda x=x, w=w, b=b: torch._nnpack_spatial_convolution(
                            x, w, b, [1, 1], [1, 1]
                        ),
                    ],
                    args.iters,
                )
            flops = 2 * chunk * ws[0] * ws[1] * 9 * xs[1] * xs[2]
            direct_total += count * direct
            best_total += count * min(direct, wino)
            rates = f"{flops / direct / 1e9:6.0f} / {flops / wino / 1e9:6.0f}"
            print(f"  {xs} -> {ws} x{count}: {rates}")
        print(
            f"chunk {chunk}: 3x3 convolutions per call {direct_total * 1e3:.1f} ms oneDNN, "
            f"{best_total * 1e3:.1f} ms with the faster per shape "
            f"({direct_total / best_total:.2f}x)"
        )


if __name__ == "__main__":
    main()
