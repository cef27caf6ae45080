"""Time training-step and denoiser-step variants against each other in one process.

Usage: python benchmarks/variants_cpu.py [--what train,sample] [--batch-size 64]
           [--image-size 64] [--iters 3] [--compile]

Variants are interleaved round-robin (one timed call of each per round) so that noise
from other processes on the machine hits all of them alike; medians are printed.
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import CPU, interleaved_medians, net_with_bn_statistics, print_medians, train_step

from animeddim.runtime import cpu_has_fast_bf16, prepare_inference


def train_variant(
    model, precision: str, channels_last: bool, b: int, s: int, compile: bool = False
):
    return train_step(
        copy.deepcopy(model),
        precision=precision,
        channels_last=channels_last,
        batch_size=b,
        image_size=s,
        compile=compile,
    )


def sample_variant(model, precision: str, channels_last: bool, b: int, s: int, **kw):
    kw.setdefault("chunk", None)  # one call on the whole batch
    net = prepare_inference(model, CPU, precision, channels_last=channels_last, **kw)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(b, 3, s, s).contiguous(memory_format=fmt)
    v = torch.rand(b)
    return torch.no_grad()(lambda: net(x, v))  # prepare_inference applies the precision


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", default="train,sample")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also the compiled training steps")
    a = ap.parse_args()
    # Under ATEN_CPU_CAPABILITY=avx2 (an AVX2-only CPU, or one emulated) bf16 is software.
    precisions = ["fp32", "bf16"] if cpu_has_fast_bf16() else ["fp32"]
    torch.manual_seed(0)
    b, s = a.batch_size, a.image_size
    model = net_with_bn_statistics(s)  # so that folding is tested on real statistics
    variants = {}
    if "train" in a.what:
        for prec in precisions:
            for cl, layout in ((False, "NCHW"), (True, "channels_last")):
                for comp in (False, True) if a.compile else (False,):
                    name = f"train {prec} {layout}{' compiled' if comp else ''}"
                    variants[name] = train_variant(model, prec, cl, b, s, compile=comp)
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
    print_medians(interleaved_medians(variants, a.iters), b)


if __name__ == "__main__":
    main()
