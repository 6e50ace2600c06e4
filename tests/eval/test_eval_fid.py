"""FID: our eigh-based Fréchet distance against the textbook scipy.linalg.sqrtm formula."""
import numpy as np
import pytest
import scipy.linalg

from tfusion.eval import fid


def reference_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """The usual FID code path: np.cov + scipy.linalg.sqrtm, real part."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_matches_scipy_reference_on_random_features():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(16, 16))
    x = rng.normal(size=(500, 16)) @ mixing
    y = rng.normal(size=(400, 16)) @ (mixing + 0.3 * rng.normal(size=(16, 16))) + 0.5
    ours = fid.frechet_distance(fid.feature_stats(x), fid.feature_stats(y))
    assert ours == pytest.approx(reference_frechet(x, y), rel=1e-6)


def test_identical_sets_give_zero_and_batching_does_not_matter():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 8)) * 3.0 + 1.0
    stats = fid.feature_stats(x)
    assert abs(fid.frechet_distance(stats, stats)) < 1e-8
    # Accumulating in batches gives the same statistics as all at once.
    batched = fid.stats_of_images(np.array_split(x, 7), lambda b: b)
    np.testing.assert_allclose(batched.mean, stats.mean, atol=1e-12)
    np.testing.assert_allclose(batched.cov, stats.cov, atol=1e-10)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), atol=1e-10)


def test_singular_covariance_stays_real_and_finite():
    # Fewer samples than dimensions: sqrtm's complex path is where FID code breaks.
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 1.0
    value = fid.frechet_distance(fid.feature_stats(x), fid.feature_stats(y))
    assert np.isfinite(value) and value > 0


def test_stats_round_trip(tmp_path):
    stats = fid.feature_stats(np.random.default_rng(3).normal(size=(20, 4)))
    stats.save(str(tmp_path / "s.npz"))
    loaded = fid.FeatureStats.load(str(tmp_path / "s.npz"))
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    assert loaded.count == 20
