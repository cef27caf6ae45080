"""Does a model's x0_hat follow the data's mean or its median? (docs/coverage.md)

Usage: python benchmarks/median_vs_mean.py REAL_DIR [--model avatars-64 | --run RUN]
           [--n 256] [--t 1.0,0.9,0.75,0.5] [--threads 1] [--seed 0]

REAL_DIR: labelled avatars (`animeddim data avatars`, with labels.csv), from the model's
training distribution. For each time t, every real image x0 is diffused with its own noise,
x_t = alpha x0 + sigma eps, and the model's x0_hat = (x_t - sigma eps_hat) / alpha is taken
without clipping. An eps-predictor trained with the squared error approximates E[eps | x_t],
so its x0_hat is E[x0 | x_t], and averaged over the data and the noise that is E[x0] (the
tower property), whatever t is: the average x0_hat of an MSE-optimal model is the data's
per-pixel mean. With the absolute error it approximates the conditional median instead,
whose average need not be the mean; at t = 1 (x_t almost pure noise) it is close to the
data's per-pixel median. Printed per t, in 0-255 pixel units:

- RMS over all pixels of (mean x0_hat - per-pixel data mean) and (- per-pixel data median);
- the mean colour and luminance of the skin region (pixels drawn in the avatar's own skin
  colour in at least 90% of the images, found from labels.csv) for the average x0_hat, the
  data mean and the data median, and the share of x0_hat images whose skin region is
  nearest (of the four skin colours) to the darkest one, beside the data's share.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import torch
from common import real_folder_parser

from animeddim.checkpoint import load_model
from animeddim.data import load_folder
from animeddim.diffusion.schedule import diffuse
from animeddim.pretrained import weights_path

LUMA = np.array([0.299, 0.587, 0.114])


def skin_mask(images: np.ndarray, paths: list[str], root: Path) -> tuple[np.ndarray, dict]:
    """[H x W] bool: pixels in the image's own skin colour (within 12 levels) in >= 90% of
    the images; and {hex colour: RGB} of the skin colours."""
    with open(root / "labels.csv", newline="", encoding="utf-8") as f:
        skin = {row["file"]: row["skin"] for row in csv.DictReader(f)}
    rels = [Path(p).relative_to(root).as_posix() for p in paths]
    colours = {c: np.array([int(c[i : i + 2], 16) for i in (1, 3, 5)]) for c in set(skin.values())}
    own = np.stack([colours[skin[r]] for r in rels])[:, None, None, :]
    hit = (np.abs(images.astype(np.int32) - own).max(axis=-1) <= 12).mean(axis=0)
    return hit >= 0.9, colours


@torch.no_grad()
def mean_x0_hat(loaded, x0: torch.Tensor, t: float, seed: int, batch: int = 32) -> np.ndarray:
    """[N x H x W x 3] float64 x0_hat of each image at time t, in 0-255 units (unclipped)."""
    mean, std = loaded.mean.view(1, -1, 1, 1), loaded.std.view(1, -1, 1, 1)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(x0), batch):
        x = (x0[i : i + batch] - mean) / std
        eps = torch.randn(x.shape, generator=g)
        tt = torch.full((len(x),), t, dtype=torch.float64)
        xt, sr, nr = diffuse(x, eps, tt, loaded.config.schedule)
        eps_hat = loaded.model(xt, (nr**2).view(-1)).float()
        x0_hat = (xt - nr * eps_hat) / sr
        out.append(((x0_hat * std + mean) * 255.0).double().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = real_folder_parser(n=256, times="1.0,0.9,0.75,0.5")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    loaded = load_model(a.run or weights_path(a.model))
    size = loaded.config.model.image_size
    root = Path(a.real)
    imageset = load_folder(root, size, workers=1)
    images, paths = imageset.images[: a.n], imageset.paths[: a.n]
    mask, colours = skin_mask(images, paths, root)
    data = images.astype(np.float64)
    data_mean, data_median = data.mean(axis=0), np.median(data, axis=0)
    by_luma = sorted(colours.values(), key=lambda c: float(c @ LUMA))

    def region(x: np.ndarray) -> np.ndarray:
        return x[..., mask, :].mean(axis=-2)  # [..., 3]

    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    print(
        f"{a.run or a.model}: {len(images)} real images from {root} at {size} px; skin region "
        f"{int(mask.sum())} pixels; data skin colour mean {np.round(region(data_mean))}, "
        f"median {np.round(region(data_median))} (luminance {region(data_mean) @ LUMA:.1f} / "
        f"{region(data_median) @ LUMA:.1f})"
    )
    print(
        "t | RMS(mean x0_hat - data mean) | RMS(mean x0_hat - data median) | "
        "skin colour of mean x0_hat | skin luminance: x0_hat / data mean / data median | "
        "x0_hat skin nearest the darkest colour (data) | seconds"
    )
    palette = np.stack(by_luma)  # [4 x 3], darkest first

    def darkest_share(skin: np.ndarray) -> float:
        nearest = np.linalg.norm(skin[:, None, :] - palette[None], axis=-1).argmin(axis=1)
        return float((nearest == 0).mean())

    dark_share = darkest_share(region(data))
    for t in (float(s) for s in a.t.split(",")):
        t0 = time.perf_counter()
        x0_hat = mean_x0_hat(loaded, x0, t, a.seed)
        avg = x0_hat.mean(axis=0)
        rms_mean = float(np.sqrt(((avg - data_mean) ** 2).mean()))
        rms_median = float(np.sqrt(((avg - data_median) ** 2).mean()))
        skin = region(x0_hat)  # [N x 3]
        nearer_dark = darkest_share(skin)
        print(
            f"{t:.2f} | {rms_mean:.1f} | {rms_median:.1f} | {np.round(region(avg))} | "
            f"{region(avg) @ LUMA:.1f} / {region(data_mean) @ LUMA:.1f} / "
            f"{region(data_median) @ LUMA:.1f} | {nearer_dark:.1%} ({dark_share:.1%}) | "
            f"{time.perf_counter() - t0:.0f}"
        )


if __name__ == "__main__":
    main()
