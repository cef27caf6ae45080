"""An fp16 copy of the FID Inception weights, checked against the fp32 file on the CPU.

Usage: python benchmarks/inception_fp16.py --a DIR --b DIR [--out .gpu/inception-fp16.pt]
           [--force] [--limit 1000] [--protocols standard,paper] [--weights FP32_FILE]
           [--json FILE]

A GPU run can carry 64 MiB of files and the fp32 `default_1.pt` is 87 MB, so it is sent as
an fp16 copy (issue 18). This script
1. writes the copy (`metrics.inception.write_inception_fp16`) to --out, refusing to replace
   an existing file without --force;
2. computes, per protocol, the features of the first --limit images (sorted) of each folder
   with both files (`InceptionFeatures`; the copy's tensors are cast back to fp32 on
   loading) and prints how far the fp16 copy's features are from the fp32 file's;
3. computes KID(A, B) and KID(B, A) with each file (`metrics.kid_folders`, FID too for the
   standard protocol).
Feature caches go to a temporary folder, so every feature is computed here, and the last
line is a JSON summary (also written to --json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from animeddim.data import find_images
from animeddim.io import file_digest, write_text_atomic
from animeddim.metrics import PROTOCOLS, folder_features, kid_folders
from animeddim.metrics.inception import (
    InceptionFeatures,
    find_inception_weights,
    write_inception_fp16,
)

MIB = 2**20


def first_images(folder: Path, limit: int, into: Path) -> tuple[Path, int]:
    """A copy of the first `limit` images of `folder` (sorted, as KID reads them) in `into`;
    `folder` itself when limit is 0. Returns (folder to read, number of images)."""
    files = find_images(folder)
    if limit <= 0:
        return folder, len(files)
    into.mkdir(parents=True)
    for path in files[:limit]:
        target = into / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return into, min(limit, len(files))


def feature_errors(f32: torch.Tensor, f16: torch.Tensor) -> dict[str, float]:
    """How far the fp16 copy's features [N x D] are from the fp32 file's."""
    diff = (f16 - f32).abs()
    return {
        "max_abs_diff": float(diff.max()),
        "max_abs_f32": float(f32.abs().max()),
        # max |f16 - f32| / max |f32|: the error at the scale of the features.
        "max_rel_error": float(diff.max() / f32.abs().max()),
        # Per element: blows up where a post-ReLU feature is ~0 (printed to show it).
        "max_elementwise_rel_error": float((diff / (f32.abs() + 1e-6)).max()),
        # Per image: |f16 - f32| / |f32| over its 2048-d feature vector, the worst image.
        "max_per_image_rel_l2": float(((f16 - f32).norm(dim=1) / f32.norm(dim=1)).max()),
    }


def timed_features(
    extractor: InceptionFeatures, folder: Path, protocol: str, cache: Path
) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    features = folder_features(folder, extractor, protocol, cache)
    return features, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", type=Path, required=True, help="first image folder")
    ap.add_argument("--b", type=Path, required=True, help="second image folder")
    ap.add_argument("--out", type=Path, default=Path(".gpu/inception-fp16.pt"))
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    ap.add_argument("--weights", type=Path, default=None, help="the fp32 file (default: found)")
    ap.add_argument("--limit", type=int, default=1000, help="first N images per folder; 0: all")
    ap.add_argument("--protocols", default=",".join(PROTOCOLS))
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    a = ap.parse_args()
    protocols = [p for p in a.protocols.split(",") if p]
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        print(f"error: --protocols {a.protocols!r}: expected some of {PROTOCOLS}", file=sys.stderr)
        return 2
    if a.out.exists() and not a.force:
        print(f"error: '{a.out}' exists; --force replaces it", file=sys.stderr)
        return 2

    source = find_inception_weights(a.weights)
    start = time.perf_counter()
    write_inception_fp16(a.out, source)
    write_s = time.perf_counter() - start
    sizes = {"fp32": source.stat().st_size, "fp16": a.out.stat().st_size}
    fp32, fp16 = InceptionFeatures(source), InceptionFeatures(a.out)
    print(f"fp32 {source}: {sizes['fp32']:,} bytes ({sizes['fp32'] / MIB:.1f} MiB)")
    print(
        f"fp16 {a.out}: {sizes['fp16']:,} bytes ({sizes['fp16'] / MIB:.1f} MiB), "
        f"{sizes['fp16'] / sizes['fp32']:.3f} of fp32, written in {write_s:.1f} s; "
        f"sha256 {file_digest(a.out)}"
    )
    assert fp16.stored_fp16 and not fp32.stored_fp16
    summary: dict = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "fp32": {"path": str(source), "bytes": sizes["fp32"], "weights": fp32.weights_id},
        "fp16": {"path": str(a.out), "bytes": sizes["fp16"], "weights": fp16.weights_id},
        "protocols": {},
    }

    with tempfile.TemporaryDirectory(prefix="inception-fp16-") as tmp:
        dir_a, n_a = first_images(a.a, a.limit, Path(tmp) / "a")
        dir_b, n_b = first_images(a.b, a.limit, Path(tmp) / "b")
        summary |= {"a": str(a.a), "b": str(a.b), "n_a": n_a, "n_b": n_b}
        print(f"A = {a.a}: {n_a} images; B = {a.b}: {n_b} images")
        cache = Path(tmp) / "cache"
        for protocol in protocols:
            features, seconds = {}, {}
            for name, extractor in (("fp32", fp32), ("fp16", fp16)):
                f_a, s_a = timed_features(extractor, dir_a, protocol, cache)
                f_b, s_b = timed_features(extractor, dir_b, protocol, cache)
                features[name], seconds[name] = torch.cat([f_a, f_b]), s_a + s_b
                print(
                    f"[{protocol}] {name} features of {n_a + n_b} images: {s_a + s_b:.1f} s "
                    f"({(n_a + n_b) / (s_a + s_b):.1f} images/s)",
                    flush=True,
                )
            errors = feature_errors(features["fp32"], features["fp16"])
            print(
                f"[{protocol}] fp16 vs fp32 features: max |diff| / max |f32| = "
                f"{errors['max_rel_error']:.3e} ({errors['max_abs_diff']:.3e} / "
                f"{errors['max_abs_f32']:.3f}); worst image |diff| / |f32| = "
                f"{errors['max_per_image_rel_l2']:.3e}; max |diff| / (|f32| + 1e-6) = "
                f"{errors['max_elementwise_rel_error']:.3e} (features ~0 after ReLU)"
            )
            kids = {}
            for order, (x, y) in (("A,B", (dir_a, dir_b)), ("B,A", (dir_b, dir_a))):
                for name, extractor in (("fp32", fp32), ("fp16", fp16)):
                    r = kid_folders(x, y, protocol, extractor=extractor, cache_dir=cache)
                    kids[f"{order} {name}"] = {
                        k: r[k]
                        for k in ("kid_mean", "kid_std", "fid", "subsets", "subset_size")
                        if k in r
                    }
                k32, k16 = kids[f"{order} fp32"], kids[f"{order} fp16"]
                line = (
                    f"[{protocol}] KID({order}) fp32 {k32['kid_mean']:.6f}  fp16 "
                    f"{k16['kid_mean']:.6f}  diff {k16['kid_mean'] - k32['kid_mean']:+.2e}"
                )
                line += f"  ({k32['subsets']} subsets of {k32['subset_size']}"
                if "kid_std" in k32:
                    # Sets of exactly subset_size: every subset is the whole set, std 0.
                    line += f", std {k32['kid_std']:.6f}"
                line += ")"
                if "fid" in k32:
                    line += f"; FID fp32 {k32['fid']:.4f} fp16 {k16['fid']:.4f}"
                print(line)
            summary["protocols"][protocol] = {
                "seconds": seconds,
                "errors": errors,
                "kid": kids,
            }
    print(json.dumps(summary))
    if a.json is not None:
        write_text_atomic(a.json, json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
