"""Fréchet distance between feature distributions (FID, Heusel et al. 2017).

FID = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)).

The feature extractor is pluggable: any callable images [N, H, W, 3] -> features
[N, D] (a JAX function, e.g. Inception-v3 pool features for real datasets, or the
small shapes network in fid_features.py). Statistics are accumulated in float64
numpy, batch by batch, so large sample sets never sit in memory at once.

The matrix square root is taken without scipy.linalg.sqrtm's complex Schur path:
S_a S_b is similar to the symmetric PSD matrix R S_b R with R = S_a^(1/2) (eigh),
so tr((S_a S_b)^(1/2)) = sum of sqrt of R S_b R's eigenvalues, clipped at 0
against round-off. This is real, symmetric and stable for singular covariances
(fewer samples than feature dimensions), where sqrtm returns complex noise.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import numpy as np

FeatureFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    mean: np.ndarray  # [D]
    cov: np.ndarray  # [D, D], unbiased (N - 1)
    count: int

    def save(self, path: str) -> None:
        np.savez(path, mean=self.mean, cov=self.cov, count=self.count)

    @classmethod
    def load(cls, path: str) -> "FeatureStats":
        with np.load(path, allow_pickle=False) as f:
            return cls(f["mean"], f["cov"], int(f["count"]))


class StatsAccumulator:
    """Running sums of x and x x^T, so statistics can be built batch by batch."""

    def __init__(self):
        self.count, self._sum, self._outer = 0, None, None

    def add(self, features) -> None:
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {x.shape}")
        if self._sum is None:
            self._sum, self._outer = np.zeros(x.shape[1]), np.zeros((x.shape[1],) * 2)
        self.count += x.shape[0]
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x

    def stats(self) -> FeatureStats:
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {self.count}")
        mean = self._sum / self.count
        cov = (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return FeatureStats(mean, (cov + cov.T) / 2, self.count)


def feature_stats(features) -> FeatureStats:
    acc = StatsAccumulator()
    acc.add(features)
    return acc.stats()


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between the Gaussians N(a.mean, a.cov) and N(b.mean, b.cov)."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature sizes differ: {a.mean.shape} vs {b.mean.shape}")
    root_a = _psd_sqrt(a.cov)
    middle = root_a @ b.cov @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = a.mean - b.mean
    value = diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * trace_sqrt
    return float(max(value, 0.0))


def stats_of_images(images: Iterable[np.ndarray], feature_fn: FeatureFn) -> FeatureStats:
    """Statistics of feature_fn over an iterable of image batches [n, H, W, 3]."""
    acc = StatsAccumulator()
    for batch in images:
        acc.add(np.asarray(feature_fn(batch)))
    return acc.stats()


def fid(images_a: Iterable[np.ndarray], images_b: Iterable[np.ndarray],
        feature_fn: FeatureFn) -> float:
    """FID between two iterables of image batches under one feature extractor."""
    return frechet_distance(stats_of_images(images_a, feature_fn),
                            stats_of_images(images_b, feature_fn))
