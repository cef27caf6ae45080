"""Steps study, generation half: draw image sets from a model for each (sampler, eta, steps)
and time them, on whatever device is fastest (a GPU when lent one). The Inception half runs
where the FID weights are installed.

    python benchmarks/steps_gpu.py generate --model avatars-64 --n 300 --out sets.npz
    python benchmarks/steps_gpu.py score sets.npz --real HELD_OUT_DIR --out docs/steps-avatars-64
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def generate(a: argparse.Namespace) -> None:
    from animeddim.pipelines import SampleSettings, draw, load_for_sampling

    loaded, device = load_for_sampling(a.run, a.model, a.device)
    arrays, timing = {}, {}
    grid = [("ddim", 0.0, s) for s in a.steps] + [("ddim", 1.0, s) for s in a.steps]
    grid += [("dpmpp-2m", 0.0, s) for s in a.steps if s <= 20]
    draw(loaded, a.batch_size, SampleSettings(steps=2, device=device))  # warm-up
    for sampler, eta, steps in grid:
        s = SampleSettings(
            steps=steps,
            eta=eta,
            sampler=sampler,
            seed=a.seed,
            batch_size=a.batch_size,
            device=device,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        images = draw(loaded, a.n, s)
        key = f"{sampler}|{eta:g}|{steps}"
        timing[key] = (time.perf_counter() - t) / a.n
        arrays[key] = images.numpy()
        print(key, f"{timing[key] * 1e3:.2f} ms/image", flush=True)
    dev = torch.cuda.get_device_name() if device.type == "cuda" else str(device)
    np.savez_compressed(
        a.out,
        **arrays,
        _meta=np.frombuffer(
            json.dumps({"timing": timing, "device": dev, "n": a.n, "seed": a.seed}).encode(),
            np.uint8,
        ),
    )


def score(a: argparse.Namespace) -> None:
    from pathlib import Path

    from animeddim import metrics
    from animeddim.pipelines import write_steps

    files = [np.load(f) for f in a.sets]
    data = {k: d[k] for d in files for k in d.files}
    meta = json.loads(bytes(data["_meta"]).decode())
    ext = metrics.InceptionFeatures(device="cpu")
    f_real = metrics.folder_features(Path(a.real), ext, "standard")
    rows = []
    for key in [k for k in data if k != "_meta"]:
        sampler, eta, steps = key.split("|")
        fake = torch.from_numpy(data[key]).permute(0, 3, 1, 2).contiguous()
        kid, std = metrics.kid_standard(f_real, ext.features(fake, "standard"))
        rows.append(
            {
                "steps": int(steps),
                "eta": float(eta),
                "sampler": sampler,
                "kid_mean": kid,
                "kid_std": std,
                "seconds_per_image": meta["timing"][key],
                "protocol": "standard",
            }
        )
        print(key, f"KID (standard) {kid:.4f} ± {std:.4f}", flush=True)
    write_steps(rows, Path(a.out))
    print(f"generated on {meta['device']}, n {meta['n']} per setting; wrote {a.out}/steps.*")


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--run")
    g.add_argument("--model", default="avatars-64")
    g.add_argument("--device", default="auto")
    g.add_argument("--n", type=int, default=300)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=100)
    g.add_argument(
        "--steps", type=lambda s: [int(x) for x in s.split(",")], default=[5, 10, 20, 50, 100]
    )
    g.add_argument("--out", required=True)
    s = sub.add_parser("score")
    s.add_argument("sets", nargs="+", help="one or more .npz files from `generate`")
    s.add_argument("--real", required=True)
    s.add_argument("--out", required=True)
    a = p.parse_args()
    generate(a) if a.cmd == "generate" else score(a)


if __name__ == "__main__":
    main()
