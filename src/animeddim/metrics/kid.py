"""KID and FID estimators in float64: torch-fidelity's subsets and the paper's per-batch KID."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .inception import TORCH_FIDELITY_SEED, FeatureExtractor


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


# Fewer images than this on a side, and the standard protocol's numbers say less than they
# seem to. It is the protocol's KID subset size (torch-fidelity's default, `kid_standard`):
# below it each subset of the smaller set is all of that set, so KID's ± (the spread of the
# 100 subsets) is no longer how far the value moves between image sets (with both sets that
# small it is 0, while at 300 images KID moved by about ±0.002 between sets: docs/sampling.md).
# FID's bias falls as 1/n (Chong & Forsyth 2020, "Effectively Unbiased FID"): two sets of 1,000
# avatars of one generator measure FID 11.7 apart, half the 23.8 of a model's 1,000 samples
# against 2,000 real avatars (docs/benchmarks.md, the fp16 Inception copy), so below 1,000
# images the bias is more than half of such a value. At 1,000 and more (the defaults of
# evaluate and steps) nothing is said: values there are compared at equal counts.
FEW_IMAGES = 1000


class FewImagesWarning(UserWarning):
    """A standard-protocol KID or FID of fewer than `FEW_IMAGES` images on a side."""


def few_images_note(sets: Sequence[tuple[int, str]], fid: bool = True) -> str | None:
    """The caution that goes with a standard-protocol KID (and FID, with `fid`) of the
    `sets` ((count, what they are: "real images")) when one holds fewer than `FEW_IMAGES`
    images; None otherwise. The values themselves are what they are."""
    few = [f"{n:,} {what}" for n, what in sets if n < FEW_IMAGES]
    if not few:
        return None
    fid_words = (
        " and FID is biased upward (two sets of 1,000 avatars of one generator measure FID "
        "11.7 apart)"
        if fid
        else ""
    )
    return (
        f"{'KID and FID' if fid else 'KID'} of {' and '.join(few)}, fewer than "
        f"{FEW_IMAGES:,}: KID's ± is then not the spread between image sets (each subset of "
        f"the smaller set is all of it){fid_words}; compare values at equal counts only, or "
        f"measure {FEW_IMAGES:,} or more a side"
    )


def warn_few_images(sets: Sequence[tuple[int, str]], fid: bool = True) -> list[str]:
    """`few_images_note`, given as a `FewImagesWarning` (the CLI prints it on one line) and
    returned as a list (empty when none), the "notes" of a result."""
    note = few_images_note(sets, fid)
    if note is None:
        return []
    warnings.warn(note, FewImagesWarning, stacklevel=2)
    return [note]


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
    use ddof=1 like torch-fidelity's ``np.cov``. With fewer images than feature dimensions
    the same trace comes from an n1 x n2 matrix instead of two d x d ones
    (`_trace_sqrt_low_rank`).

    :param f1: [n1 x d] features, n1 >= 2.
    :param f2: [n2 x d] features, n2 >= 2.
    :return: FID (>= 0 up to rounding).
    """
    f1, f2 = f1.to(torch.float64), f2.to(torch.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    diff = mu1 - mu2
    if max(len(f1), len(f2)) < f1.shape[1]:
        a = (f1 - mu1) / math.sqrt(len(f1) - 1)  # S1 = a^T a
        b = (f2 - mu2) / math.sqrt(len(f2) - 1)  # S2 = b^T b
        tr_covmean = _trace_sqrt_low_rank(a, b)
        return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2 * tr_covmean)
    sigma1, sigma2 = torch.cov(f1.T), torch.cov(f2.T)
    eigvals1, eigvecs1 = torch.linalg.eigh(sigma1)
    # Negative eigenvalues are rounding noise of a PSD matrix.
    sqrt_sigma1 = (eigvecs1 * eigvals1.clamp_min(0).sqrt()) @ eigvecs1.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    middle = (middle + middle.T) / 2
    tr_covmean = torch.linalg.eigvalsh(middle).clamp_min(0).sqrt().sum()
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def _trace_sqrt_low_rank(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tr((S1 S2)^(1/2)) for S1 = a^T a, S2 = b^T b ([n1 x d], [n2 x d]).

    The non-zero eigenvalues of S1 S2 = a^T (a b^T) b are those of (a b^T)(a b^T)^T, the
    squared singular values of the n1 x n2 matrix a b^T; the trace is their sum.
    """
    return torch.linalg.svdvals(a @ b.T).sum()


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
