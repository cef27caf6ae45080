"""From which noise level down does a model keep what an image shows? (docs/coverage.md)

Usage: python benchmarks/keep_probe.py REAL_DIR [--model avatars-64 | --run RUN]
           [--n 500] [--t 1.0,0.9,0.8,0.7,0.5] [--steps 20] [--threads 1] [--out DIR]

REAL_DIR: labelled avatars (`animeddim data avatars`, with labels.csv) the model never saw.
For each start time t0, image i of the first n is paired with real image (7919 i) mod N,
diffused to t0 with image i's own noise, x_t0 = alpha(t0) x0 + sigma(t0) eps, and DDIM then
runs from t0 to 0 in round(steps * t0) evaluations on DDIM's grid scaled to [0, t0] (x0_hat
not clipped). The shipped attribute classifier reads each output. Printed per t0:

- per attribute, the share of outputs classified as their source image's true value (a
  model that keeps the attribute from t0 down scores near the classifier's own accuracy;
  at t0 = 1, with a 2% trace of the source left, a model that ignores it scores chance);
- for glasses, the share of sources with glasses whose output still has them ("kept") and
  of sources without whose output has them ("added");
- total variation of the outputs' histograms against the real labels of all N images.

With --out, each t0's outputs are written as PNGs to DIR/t0-T.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from common import real_folder_parser

from animeddim import pipelines
from animeddim.attributes import classify, load_classifier
from animeddim.coverage import histogram, real_set, total_variation
from animeddim.diffusion.generation import denormalize, image_generators
from animeddim.diffusion.samplers import ddim_sample, randn_per_image
from animeddim.diffusion.schedule import diffuse
from animeddim.io import save_pngs


def start_times(t0: float, steps: int) -> torch.Tensor:
    """DDIM's grid of round(steps * t0) times scaled to [0, t0]: t0, ..., t0 / S'."""
    s = max(1, round(steps * t0))
    return t0 * (1.0 - torch.arange(s, dtype=torch.float64) / s)


@torch.no_grad()
def regenerate(loaded, net, x0: torch.Tensor, t0: float, s) -> np.ndarray:
    """uint8 [N x H x W x 3]: each normalised [N x C x H x W] x0 diffused to t0 with image
    i's noise (seed 0), then denoised by DDIM from t0 to 0."""
    out = []
    for lo in range(0, len(x0), 50):
        x = x0[lo : lo + 50]
        eps = randn_per_image(image_generators(0, range(lo, lo + len(x))), x.shape[1:], "cpu")
        tt = torch.full((len(x),), t0, dtype=torch.float64)
        xt, _, _ = diffuse(x, eps, tt, loaded.config.schedule)
        with s.autocast():
            x0_hat = ddim_sample(net, xt, start_times(t0, s.steps), loaded.config.schedule)
        out.append(denormalize(x0_hat.float(), loaded.mean, loaded.std).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = real_folder_parser(n=500, times="1.0,0.9,0.8,0.7,0.5")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    loaded, _ = pipelines.load_for_sampling(a.run, a.model, device="cpu")
    s = pipelines.resolve_settings("cpu", "auto", steps=a.steps)
    net = pipelines.sampling_net(loaded, s, a.n * a.steps)
    clf, _ = load_classifier()
    vocab = clf.config.vocab
    # at the model's size (classify() resizes to the classifier's), with their true labels
    real, codes = real_set(clf, a.real, loaded.config.model.image_size)
    pick = [(i * 7919) % len(real) for i in range(a.n)]
    x0 = torch.from_numpy(real[pick]).permute(0, 3, 1, 2).float() / 255.0
    x0 = (x0 - loaded.mean.view(1, -1, 1, 1)) / loaded.std.view(1, -1, 1, 1)
    source = codes[pick]
    g, yes = list(vocab).index("glasses"), vocab["glasses"].index("yes")
    has = source[:, g] == yes
    names = list(vocab)
    print(
        f"{a.run or a.model}: {a.n} of {len(real)} real images from {a.real}, {s.precision}; "
        f"{int(has.sum())} sources with glasses"
    )
    print("t0 | kept: " + " / ".join(names) + " | glasses kept / added | TV: " + " / ".join(names))
    for t0 in (float(v) for v in a.t.split(",")):
        t = time.perf_counter()
        images = regenerate(loaded, net, x0, t0, s)
        pred = classify(clf, images)
        same = (pred == source).mean(axis=0)
        tv = [
            total_variation(
                histogram(pred[:, k], len(vocab[n])), histogram(codes[:, k], len(vocab[n]))
            )
            for k, n in enumerate(names)
        ]
        kept, added = (pred[has, g] == yes).mean(), (pred[~has, g] == yes).mean()
        print(
            f"{t0:.2f} | " + " / ".join(f"{v:.3f}" for v in same) + f" | {kept:.3f} / "
            f"{added:.3f} | " + " / ".join(f"{v:.3f}" for v in tv) + f" | "
            f"{time.perf_counter() - t:.0f}s",
            flush=True,
        )
        if a.out is not None:
            save_pngs(images, a.out / f"t0-{t0:.2f}", [f"{i:06d}.png" for i in range(a.n)])


if __name__ == "__main__":
    main()
