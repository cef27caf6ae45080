#!/usr/bin/env bash
# What benchmarks/gpu-throughput.sh and gpu-quality.sh need carried to a lent GPU, made on
# this machine into .gpu/ (git-ignored; pass `carry: [".gpu"]` to the call):
#   .gpu/avatars64.u8.xz     the 10,000 training avatars (seed 0) of the shipped model, packed
#   .gpu/heldout.u8.xz       2,000 held-out avatars (seed 1), packed
#   .gpu/inception-fp16.pt   the fp16 copy of the FID Inception weights (checked against the
#                            fp32 file: docs/benchmarks.md, "An fp16 copy ...")
# About 47 MB in all; with the tracked tree (16 MB) under the 64 MiB a call carries. Unpacked
# folders are removed so that they do not travel too. Run from the repository root with the
# project installed (make setup).
set -eu
PY=${PY:-.venv/bin/python}
mkdir -p .gpu
for spec in "avatars64 10000 0" "heldout 2000 1"; do
  set -- $spec
  if [ ! -f ".gpu/$1.u8.xz" ]; then
    rm -rf "/tmp/gpu-prepare-$1"
    "$PY" -m animeddim data avatars --n "$2" --size 64 --seed "$3" --out "/tmp/gpu-prepare-$1"
    "$PY" benchmarks/pack_images.py pack "/tmp/gpu-prepare-$1" ".gpu/$1.u8.xz"
    rm -rf "/tmp/gpu-prepare-$1"
  fi
done
[ -f .gpu/inception-fp16.pt ] || "$PY" -c "
from animeddim.metrics.inception import write_inception_fp16
print(write_inception_fp16('.gpu/inception-fp16.pt'))"
rm -rf .gpu/avatars64 .gpu/heldout  # unpacked folders would travel too
du -cb .gpu/* | tail -1
