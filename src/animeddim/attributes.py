"""An attribute classifier: a small CNN with one head per attribute, trained on labelled images.

It is the instrument that measures what a generator draws (:mod:`animeddim.coverage`): its
accuracy on held-out real images is the ceiling of what it can judge, and is written beside it.
A classifier file is one safetensors file (weights in half precision) whose JSON header entry
``animeddim-attributes`` holds the architecture, the vocabulary (attribute -> values, in code
order) and how it was trained, so it rebuilds itself; loading one runs no code.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save as st_save
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from .attributes_config import ClassifierConfig, TrainSettings
from .io import read_safetensors, write_bytes_atomic
from .labels import NULL, Labels, quoted

FORMAT = "animeddim-attributes"
VERSION = 2  # 2: crop branches (a file without crops is still written as version 1)
SHIPPED_CLASSIFIER = "attributes-avatars"  # models/attributes-avatars.safetensors (+ .json)


class ClassifierError(ValueError):
    """A classifier file that is missing, damaged or foreign, or unusable input."""


def _conv_bn(c_in: int, c_out: int, stride: int, kernel: int = 3) -> nn.Sequential:
    pad = (kernel - 1) // 2 if kernel % 2 else kernel // 2 - 1
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, pad, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class CropBranch(nn.Module):
    """One attribute read from a fixed region at full resolution: ``(N, 3, S, S)`` in [-1, 1]
    -> ``(N, values)`` logits.

    A stride-1 stage of two 3x3 convs, then per further width a stride-2 conv and a stride-1
    one; the map is max-pooled (a stud of two pixels anywhere in the region counts), and with
    ``mirror`` the features of the mirrored image's region are max-ed in, so a feature on
    either side of a mirrored face reads the same.
    """

    def __init__(
        self, box: tuple[int, int, int, int], widths: tuple[int, ...], mirror: bool, n: int
    ) -> None:
        super().__init__()
        self.box, self.mirror = tuple(box), mirror
        w = list(widths)
        layers = [_conv_bn(3, w[0], 1), _conv_bn(w[0], w[0], 1)]
        for a, b in zip(w[:-1], w[1:], strict=True):
            layers += [_conv_bn(a, b, 2), _conv_bn(b, b, 1)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(w[-1], n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, left, h, w = self.box
        regions = [x[..., top : top + h, left : left + w]]
        if self.mirror:
            regions.append(x.flip(-1)[..., top : top + h, left : left + w])
        f = self.features(torch.cat(regions)).amax((2, 3))  # (sides * N, C)
        return self.head(f.view(len(regions), x.shape[0], -1).amax(0))


class AttributeNet(nn.Module):
    """``(N, 3, S, S)`` images in [0, 1] -> one ``(N, len(values))`` logit tensor per attribute.

    A stride-2 4x4 stem (S/2), then per further width a stride-2 3x3 conv followed by a stride-1
    one (the last stage has only the stride-2 conv). Each attribute pools the final feature map
    with its own learned spatial weights (a softmax over positions, starting uniform: global
    average pooling) and has its own linear head, so the mouth head can look at the mouth.
    The stem halves the resolution at once: on the CPU that trains ~1.8x faster than a stride-1
    stem of the same width. An attribute with a crop (``config.crops``) is read by its own
    :class:`CropBranch` instead.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        w = list(config.widths)
        layers = [_conv_bn(3, w[0], 2, kernel=4)]
        last = len(w) - 2
        for k, (a, b) in enumerate(zip(w[:-1], w[1:], strict=True)):
            layers.append(_conv_bn(a, b, config.final_stride if k == last else 2))
            if k < last:
                layers.append(_conv_bn(b, b, 1))
        self.features = nn.Sequential(*layers)
        side = config.image_size // 2 ** (len(w) - 1) // config.final_stride
        self.pooled = [a for a in config.vocab if a not in config.crops]  # read by the trunk
        self.where = nn.Parameter(torch.zeros(len(self.pooled), max(1, side) ** 2))
        self.heads = nn.ModuleDict(
            {_key(a): nn.Linear(w[-1], len(config.vocab[a])) for a in self.pooled}
        )
        self.crops = nn.ModuleDict(
            {
                _key(a): CropBranch(
                    box, config.crop_widths, config.crop_mirror, len(config.vocab[a])
                )
                for a, box in config.crops.items()
            }
        )

    def forward(
        self, x: torch.Tensor, only: Collection[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Logits of every attribute, or of those in ``only`` (the trunk runs only if needed)."""
        want = [a for a in self.config.vocab if only is None or a in only]
        x = x * 2 - 1
        out: dict[str, torch.Tensor] = {}
        if any(a in self.pooled for a in want):
            h = self.features(x).flatten(2)  # (N, C, P)
            if h.shape[-1] != self.where.shape[-1]:  # another input size: average pooling
                pooled = h.mean(2, keepdim=True).expand(-1, -1, len(self.pooled))
            else:
                pooled = torch.einsum("ncp,ap->nca", h, self.where.softmax(1))
            for k, a in enumerate(self.pooled):
                if a in want:
                    out[a] = self.heads[_key(a)](pooled[:, :, k])
        for a in want:
            if a in self.config.crops:
                out[a] = self.crops[_key(a)](x)
        return {a: out[a] for a in want}


def _key(attribute: str) -> str:
    return "h_" + "".join(c if c.isalnum() else "_" for c in attribute) + f"_{len(attribute)}"


# --------------------------------------------------------------------------------------------
# Files


def config_record(cfg: ClassifierConfig) -> dict[str, Any]:
    """The architecture as a classifier file stores it (the crop fields only when it has crops,
    so files without them read as before)."""
    record: dict[str, Any] = {
        "image_size": cfg.image_size,
        "widths": list(cfg.widths),
        "final_stride": cfg.final_stride,
    }
    if cfg.crops:
        record["crops"] = {a: list(box) for a, box in cfg.crops.items()}
        record["crop_widths"] = list(cfg.crop_widths)
        record["crop_mirror"] = cfg.crop_mirror
    return record


def save_classifier(path: str | Path, net: AttributeNet, info: dict[str, Any]) -> Path:
    """Write the classifier (fp16 weights) and its config/vocabulary/``info`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = net.config
    meta = {
        "format": FORMAT,
        "version": VERSION if cfg.crops else 1,
        "config": config_record(cfg),
        "vocab": {a: list(v) for a, v in cfg.vocab.items()},
        **info,
    }
    tensors = {
        k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in net.state_dict().items()
    }
    return write_bytes_atomic(path, st_save(tensors, {FORMAT: json.dumps(meta)}))


def shipped_classifier_path() -> Path:
    return Path(str(files("animeddim").joinpath("models", f"{SHIPPED_CLASSIFIER}.safetensors")))


def _classifier_config(meta: dict[str, Any]) -> ClassifierConfig:
    """The ClassifierConfig a classifier file's header describes."""
    config = meta["config"]
    return ClassifierConfig(
        image_size=int(config["image_size"]),
        widths=tuple(int(w) for w in config["widths"]),
        final_stride=int(config.get("final_stride", 2)),
        vocab={a: tuple(v) for a, v in meta["vocab"].items()},
        crops={a: tuple(int(v) for v in box) for a, box in config.get("crops", {}).items()},
        crop_widths=tuple(config.get("crop_widths", ClassifierConfig.crop_widths)),
        crop_mirror=bool(config.get("crop_mirror", True)),
    )


def load_classifier(path: str | Path | None = None) -> tuple[AttributeNet, dict[str, Any]]:
    """The classifier in ``path`` (None: the shipped avatar one), in eval mode, and its header."""
    path = Path(path) if path is not None else shipped_classifier_path()
    if path.is_dir():
        raise ClassifierError(
            f"attribute classifier '{path}' is a folder; give the classifier file (.safetensors)"
        )
    if not path.is_file():
        raise ClassifierError(f"attribute classifier '{path}' does not exist")
    try:
        tensors, header = read_safetensors(path)
        meta = json.loads(header[FORMAT])
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError):
        raise ClassifierError(f"'{path}' is not an animeddim attribute classifier") from None
    try:
        version = int(meta.get("version", 0))
        if version <= VERSION:
            net = AttributeNet(_classifier_config(meta))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ClassifierError(
            f"'{path}' has a damaged animeddim-attributes header ({type(e).__name__}: {e})"
        ) from None
    if version > VERSION:
        raise ClassifierError(f"'{path}' has format version {version}: upgrade animeddim")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}
    try:
        net.load_state_dict(state)
    except RuntimeError:
        raise ClassifierError(f"'{path}': its weights do not match its architecture") from None
    return net.eval(), meta


# --------------------------------------------------------------------------------------------
# Classifying


def _batch(images_u8: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, size, size)`` in [0, 1]."""
    x = torch.as_tensor(np.asarray(images_u8)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return x


@torch.no_grad()
def classify(
    net: AttributeNet, images_u8: np.ndarray | torch.Tensor, batch_size: int = 256
) -> np.ndarray:
    """Predicted codes ``(N, A)`` (columns in ``net.config.vocab`` order) of uint8 ``(N,H,W,3)``
    RGB images; images of another size are resized to the classifier's."""
    net.eval()
    size = net.config.image_size
    out = []
    for i in range(0, len(images_u8), batch_size):
        logits = net(_batch(images_u8[i : i + batch_size], size))
        out.append(torch.stack([logits[a].argmax(1) for a in net.config.vocab], 1))
    n_attr = len(net.config.vocab)
    return torch.cat(out).numpy() if out else np.empty((0, n_attr), np.int64)


def align_labels(labels: Labels, vocab: dict[str, tuple[str, ...]]) -> np.ndarray:
    """``labels``' codes re-expressed in ``vocab`` (a classifier's), ``(N, len(vocab))``.

    Raises :class:`ClassifierError` when an attribute is missing or holds a value ``vocab``
    does not know."""
    cols = []
    for a, values in vocab.items():
        if a not in labels.vocab:
            raise ClassifierError(
                f"the labels have no attribute {a!r} (they have {quoted(labels.vocab)})"
            )
        index = {v: k for k, v in enumerate(values)}
        unknown = [v for v in labels.vocab[a] if v not in index]
        if unknown:
            raise ClassifierError(
                f"attribute {a!r}: the classifier does not know the "
                f"{'value' if len(unknown) == 1 else 'values'} {quoted(unknown)}"
            )
        remap = np.array([index[v] for v in labels.vocab[a]] + [NULL], dtype=np.int64)
        cols.append(remap[labels.column(a)])  # NULL (-1) indexes the appended NULL
    return np.stack(cols, 1)


def accuracy(predicted: np.ndarray, truth: np.ndarray, vocab: dict[str, Any]) -> dict[str, float]:
    """Per attribute, the share of labelled images (code != NULL) classified right."""
    out = {}
    for k, a in enumerate(vocab):
        known = truth[:, k] != NULL
        out[a] = float((predicted[known, k] == truth[known, k]).mean()) if known.any() else math.nan
    return out


# --------------------------------------------------------------------------------------------
# Training


def _augment(x: torch.Tensor, s: TrainSettings, g: torch.Generator) -> torch.Tensor:
    """A random mirror, shift (edge pixels repeated), blur and Gaussian noise, per image."""
    n, _, h, w = x.shape
    if s.flip:
        x = torch.where((torch.rand(n, generator=g) < 0.5)[:, None, None, None], x.flip(-1), x)
    if s.shift > 0:
        p = s.shift
        padded = F.pad(x, (p, p, p, p), mode="replicate")
        dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
        dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
        x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if s.blur > 0:
        # Generated images are softer than renders: a classifier that never saw a soft edge
        # reads smooth shading as blush or freckles.
        sigma = torch.rand(n, generator=g) * s.blur * (torch.rand(n, generator=g) < 0.5)
        x = _gaussian_blur(x, sigma)
    if s.noise > 0:
        sigma = torch.rand(n, 1, 1, 1, generator=g) * s.noise
        x = x + sigma * torch.randn(x.shape, generator=g)
    return x


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image ``x[i]`` with a 5x5 Gaussian of standard deviation ``sigma[i]`` pixels
    (0: unchanged)."""
    n, c, h, w = x.shape
    r = torch.arange(-2, 3, dtype=x.dtype)
    s = sigma.clamp_min(1e-3).to(x.dtype)[:, None]
    k1 = torch.exp(-(r[None, :] ** 2) / (2 * s**2))
    k1 = k1 / k1.sum(1, keepdim=True)  # (N, 5)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(c, 0)[:, None]  # (N*C, 1, 5, 5)
    padded = F.pad(x.reshape(1, n * c, h, w), (2, 2, 2, 2), mode="replicate")
    return F.conv2d(padded, k2, groups=n * c).reshape(n, c, h, w)


def check_crops(cfg: ClassifierConfig) -> None:
    """Raise :class:`ClassifierError` unless every crop names a known attribute and fits."""
    for a, box in cfg.crops.items():
        if a not in cfg.vocab:
            raise ClassifierError(
                f"crop for {a!r}: no such attribute (the labels have {quoted(cfg.vocab)})"
            )
        top, left, h, w = box
        if (
            min(top, left) < 0
            or min(h, w) < 4
            or top + h > cfg.image_size
            or left + w > cfg.image_size
        ):
            raise ClassifierError(
                f"crop for {a!r}: top {top}, left {left}, height {h}, width {w} must be a "
                f"region of at least 4x4 pixels inside the {cfg.image_size}-px image"
            )


def _from_init(net: AttributeNet, init: AttributeNet) -> list[str]:
    """Copy into ``net`` what ``init`` already reads the same way (its trunk, the heads of the
    attributes the trunk reads in both, and unchanged crop branches); returns those attributes."""
    if (net.config.image_size, net.config.widths, net.config.final_stride) != (
        init.config.image_size,
        init.config.widths,
        init.config.final_stride,
    ):
        raise ClassifierError("--init: the classifier's trunk differs from the one asked")
    net.features.load_state_dict(init.features.state_dict())
    kept = []
    with torch.no_grad():
        for k, a in enumerate(net.pooled):
            if a in init.pooled:
                net.where[k] = init.where[init.pooled.index(a)]
                net.heads[_key(a)].load_state_dict(init.heads[_key(a)].state_dict())
                kept.append(a)
    for a, box in net.config.crops.items():
        c = init.config
        if c.crops.get(a) == box and (c.crop_widths, c.crop_mirror) == (
            net.config.crop_widths,
            net.config.crop_mirror,
        ):
            net.crops[_key(a)].load_state_dict(init.crops[_key(a)].state_dict())
            kept.append(a)
    return kept


def train_classifier(
    images_u8: np.ndarray,
    codes: np.ndarray,
    vocab: dict[str, tuple[str, ...]],
    *,
    config: ClassifierConfig | None = None,
    settings: TrainSettings | None = None,
    init: AttributeNet | None = None,
    progress: bool = False,
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[AttributeNet, dict[str, Any]]:
    """Train a classifier on uint8 ``(N, H, W, 3)`` images and their ``(N, A)`` codes.

    ``on_epoch(state)`` is called after each epoch with a copy of the training state
    (``epoch`` done, the network's, optimiser's, schedule's and random generator's states);
    ``resume``, such a state of the same images and settings, goes on from it to the same
    classifier an uninterrupted call trains.

    Entries coded :data:`NULL` are left out of their attribute's loss. With ``init`` (a
    classifier of the same vocabulary), its trunk, and every attribute it already reads the
    way ``config`` asks, are kept as they are; only the others (new crops) are trained. Returns
    the network (eval mode) and a summary: per-attribute accuracy on the held-out split, which
    attributes were trained, sizes and seconds.
    """
    s = settings or TrainSettings()
    cfg = config or ClassifierConfig()
    vocab = {a: tuple(v) for a, v in vocab.items()}
    if init is not None:
        if dict(init.config.vocab) != vocab:
            raise ClassifierError(
                "--init: the classifier's attributes and values differ from the labels'"
            )
        cfg = replace(init.config, crops={**init.config.crops, **cfg.crops})
    cfg = replace(cfg, widths=tuple(cfg.widths), vocab=vocab)
    if cfg.crops:  # a crop reads the mirrored region too when the training mirrors
        cfg = replace(cfg, crop_mirror=s.flip)
    check_crops(cfg)
    n = len(images_u8)
    if n < 2:
        raise ClassifierError(f"need at least 2 labelled images to train, got {n}")
    torch.manual_seed(s.seed)
    g = torch.Generator().manual_seed(s.seed)
    order = torch.randperm(n, generator=g).numpy()
    n_val = min(n - 1, max(1, round(n * s.val_fraction))) if s.val_fraction > 0 else 0
    val, train = order[:n_val], order[n_val:]
    x_all = _batch(images_u8, cfg.image_size)
    y_all = torch.as_tensor(codes, dtype=torch.long)

    net = AttributeNet(cfg)
    kept = _from_init(net, init) if init is not None else []
    trained = [a for a in cfg.vocab if a not in kept]
    if not trained:
        raise ClassifierError("--init already reads every attribute this way: nothing to train")
    parts = (
        [net.crops[_key(a)] for a in trained] if init is not None else [net]
    )  # with --init the trunk is kept, so only crop branches are new
    opt = torch.optim.AdamW(
        [p for m in parts for p in m.parameters()], lr=s.learning_rate, weight_decay=s.weight_decay
    )
    steps_per_epoch = math.ceil(len(train) / s.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, s.learning_rate, total_steps=max(1, s.epochs * steps_per_epoch)
    )
    columns = [list(cfg.vocab).index(a) for a in trained]
    first = 0
    if resume is not None:
        first = int(resume["epoch"])
        net.load_state_dict(resume["net"])
        opt.load_state_dict(resume["opt"])
        sched.load_state_dict(resume["sched"])
        g.set_state(resume["generator"])
    t0 = time.perf_counter()
    # closed on Ctrl-C too: the message that follows gets a line of its own
    with tqdm(
        total=s.epochs * steps_per_epoch,
        initial=first * steps_per_epoch,
        desc="classifier",
        unit="step",
        disable=not progress,
    ) as bar:
        for epoch in range(first, s.epochs):
            net.eval()  # kept parts keep their BatchNorm statistics
            for m in parts:
                m.train()
            perm = torch.as_tensor(train)[torch.randperm(len(train), generator=g)]
            for i in range(0, len(perm), s.batch_size):
                idx = perm[i : i + s.batch_size]
                logits = net(_augment(x_all[idx], s, g), only=trained)
                y = y_all[idx]
                loss = sum(
                    F.cross_entropy(logits[a], y[:, k], ignore_index=NULL)
                    for a, k in zip(trained, columns, strict=True)
                    if (y[:, k] != NULL).any()
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if on_epoch is not None:
                state = {"net": net.state_dict(), "opt": opt.state_dict()}
                state.update(sched=sched.state_dict(), generator=g.get_state())
                on_epoch({"epoch": epoch + 1, **copy.deepcopy(state)})
    net.eval()
    summary: dict[str, Any] = {
        "train_images": len(train),
        "val_images": int(n_val),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "settings": asdict(s),
        **({"trained": trained, "kept": kept} if init is not None else {}),
    }
    if n_val:
        predicted = classify(net, images_u8[val])
        summary["val_accuracy"] = accuracy(predicted, codes[val], cfg.vocab)
    return net, summary


# --------------------------------------------------------------------------------------------
# Labelled folders


def _folder_vocab(folder: Path, labels: str | None) -> dict[str, tuple[str, ...]] | None:
    """The full avatar vocabulary for a folder ``animeddim data avatars`` made, else None."""
    from .avatar_labels import AVATAR_STYLE, avatar_vocabulary

    if labels not in (None, str(folder / "labels.csv")):
        return None
    try:
        manifest = json.loads((folder / "manifest.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return avatar_vocabulary() if manifest.get("style") == AVATAR_STYLE else None


def labelled_folders(
    folders: list[str | Path],
    image_size: int,
    *,
    labels: str | None = None,
    missing: str = "error",
    vocab: dict[str, tuple[str, ...]] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[str, ...]]]:
    """Images (uint8 ``(N, S, S, 3)``), codes ``(N, A)`` and vocabulary of labelled folders.

    ``labels``: ``folders`` or a CSV path (one folder only); None: each folder's labels.csv.
    ``vocab`` fixes the values (e.g. a classifier's); else avatar folders get the full avatar
    vocabulary and other folders the sorted union of the values found.
    """
    from .data import DataError, load_folder
    from .labels import FOLDERS, load_labels, read_csv_rows

    if labels not in (None, FOLDERS) and len(folders) > 1:
        raise DataError("--labels FILE.csv labels one folder: give one --data folder")
    roots = [Path(f) for f in folders]
    specs = [labels if labels is not None else str(r / "labels.csv") for r in roots]
    if vocab is None:
        vocabs = [_folder_vocab(r, s) for r, s in zip(roots, specs, strict=True)]
        if all(v is not None for v in vocabs) and vocabs:
            vocab = vocabs[0]
        elif specs[0] != FOLDERS:
            names, found = None, {}
            for s in specs:
                cols, rows = read_csv_rows(s, missing=missing)
                names = names or cols
                if cols != names:
                    raise DataError(f"labels file '{s}' has columns {cols}, another has {names}")
                for _, _, values in rows:
                    for n, v in zip(cols, values, strict=True):
                        if v is not None:  # an empty entry under missing="null"
                            found.setdefault(n, set()).add(v)
            vocab = {n: tuple(sorted(found.get(n, ()))) for n in names or []}
            unfilled = [n for n, values in vocab.items() if not values]
            if unfilled:
                where = " and ".join(f"'{s}'" for s in specs)
                raise DataError(
                    f"attribute {unfilled[0]} has no value in any row of {where}: there is "
                    "nothing to learn; fill it in, or remove the column"
                )
        else:
            classes = sorted({p.name for r in roots for p in r.iterdir() if p.is_dir()})
            vocab = {"class": tuple(classes)}
    images, codes = [], []
    for root, spec in zip(roots, specs, strict=True):
        s = load_folder(root, image_size)
        images.append(np.asarray(s.images))
        codes.append(load_labels(spec, root, s.paths, missing=missing, vocab=vocab).codes)
    return np.concatenate(images), np.concatenate(codes), dict(vocab)
