"""Power-law fits L(C) = a * C^-b (+ c) of a metric against training compute.

Without the irreducible term c the fit is least squares on log L vs log C (exact
for noiseless power laws). With c, scipy's curve_fit minimises the log-space
residuals starting from the log-log fit; C is divided by its geometric mean first
so a stays O(1) whatever the FLOP scale (1e12 on a CPU, 1e23 on a pod).
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    a: float
    b: float
    c: float = 0.0  # irreducible loss

    def predict(self, compute):
        return self.a * np.power(np.asarray(compute, np.float64), -self.b) + self.c

    def compute_for(self, value: float) -> float:
        """C at which the law reaches `value`: inf if a falling law (b > 0) never gets down
        to it (value <= c) or the law is flat. A rising law (b < 0, a higher-is-better
        score such as CIDEr, fitted without c) is inverted the same way."""
        if self.b == 0 or value <= self.c or (self.b < 0 and self.c):
            return float("inf")
        return float((self.a / (value - self.c)) ** (1.0 / self.b))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _loglog(compute: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(np.log(compute), np.log(values), 1)
    return float(np.exp(intercept)), float(-slope)


def fit_power_law(compute, values, irreducible: bool = False) -> PowerLaw:
    compute = np.asarray(compute, np.float64)
    values = np.asarray(values, np.float64)
    if compute.shape != values.shape or compute.size < 2:
        raise ValueError("need at least two (compute, value) points of the same length")
    if np.any(compute <= 0) or np.any(values <= 0):
        raise ValueError("power-law fits need positive compute and metric values")
    scale = float(np.exp(np.mean(np.log(compute))))
    x = compute / scale
    a, b = _loglog(x, values)
    if irreducible:
        if compute.size < 4:
            raise ValueError("a fit with an irreducible term needs at least 4 points")
        from scipy.optimize import curve_fit

        def log_law(xs, log_a, b_, c_):
            return np.log(np.exp(log_a) * xs ** -b_ + c_)

        c0 = 0.5 * float(values.min())
        a0, b0 = _loglog(x, np.maximum(values - c0, 1e-12))
        (log_a, b, c), _ = curve_fit(log_law, x, np.log(values), p0=(np.log(a0), b0, c0),
                                     bounds=([-np.inf, 0.0, 0.0],
                                             [np.inf, 10.0, float(values.min())]),
                                     maxfev=20_000)
        return PowerLaw(a=float(np.exp(log_a) * scale ** b), b=float(b), c=float(c))
    return PowerLaw(a=a * scale ** b, b=b)


def r_squared(law: PowerLaw, compute, values) -> float:
    """Goodness of fit in log space (where the law is fitted)."""
    y = np.log(np.asarray(values, np.float64))
    resid = y - np.log(law.predict(compute))
    total = np.sum((y - y.mean()) ** 2)
    return float(1.0 - np.sum(resid ** 2) / total) if total > 0 else 1.0
