"""Power-law fits recover known exponents; parity ratios match closed forms."""
import numpy as np
import pytest

from tfusion.scaling.fit import PowerLaw, fit_power_law, r_squared
from tfusion.scaling.parity import parity_ratio, parity_table

COMPUTE = np.geomspace(1e18, 1e22, 9)


def test_pure_power_law_recovered_exactly():
    truth = PowerLaw(a=2.0e3, b=0.155)
    law = fit_power_law(COMPUTE, truth.predict(COMPUTE))
    assert law.b == pytest.approx(0.155, rel=1e-9)
    assert law.a == pytest.approx(2.0e3, rel=1e-6)
    assert r_squared(law, COMPUTE, truth.predict(COMPUTE)) == pytest.approx(1.0)


def test_noisy_power_law_recovered_within_noise():
    rng = np.random.default_rng(0)
    truth = PowerLaw(a=50.0, b=0.05)
    values = truth.predict(COMPUTE) * np.exp(rng.normal(0, 0.005, COMPUTE.size))
    assert fit_power_law(COMPUTE, values).b == pytest.approx(0.05, abs=0.005)


def test_irreducible_term_recovered():
    truth = PowerLaw(a=3.0e4, b=0.25, c=1.7)
    law = fit_power_law(COMPUTE, truth.predict(COMPUTE), irreducible=True)
    assert law.b == pytest.approx(0.25, rel=1e-3)
    assert law.c == pytest.approx(1.7, rel=1e-3)
    np.testing.assert_allclose(law.predict(COMPUTE), truth.predict(COMPUTE), rtol=1e-5)


def test_compute_for_inverts_predict():
    law = PowerLaw(a=10.0, b=0.3, c=0.5)
    assert law.compute_for(float(law.predict(1e20))) == pytest.approx(1e20, rel=1e-9)
    assert law.compute_for(0.4) == float("inf")  # below the irreducible loss


def test_parity_ratio_on_synthetic_pair():
    # A reaches any loss with k times less compute than B: L_A(C) = L_B(k C).
    k, b = 34.0, 0.2
    law_b = PowerLaw(a=100.0, b=b)
    law_a = PowerLaw(a=100.0 * k ** -b, b=b)
    for c_b in (1e19, 1e21, 1e23):
        assert parity_ratio(law_a, law_b, c_b) == pytest.approx(1 / k, rel=1e-9)
    # Different exponents: closed form C_A = (a_A / L_B(C_B))^(1/b_A).
    law_a2 = PowerLaw(a=30.0, b=0.15)
    c_b = 1e21
    want = (30.0 / float(law_b.predict(c_b))) ** (1 / 0.15) / c_b
    assert parity_ratio(law_a2, law_b, c_b) == pytest.approx(want, rel=1e-9)


def test_rising_law_fits_and_parity_for_higher_is_better_scores():
    # A score that grows with compute (CIDEr): A reaches any score with k times less
    # compute than B. The fit recovers a negative exponent; parity is still 1/k.
    k = 20.0
    law_b = PowerLaw(a=0.5, b=-0.1)
    values_b = law_b.predict(COMPUTE)
    assert np.all(np.diff(values_b) > 0)
    fitted_b = fit_power_law(COMPUTE, values_b)
    assert fitted_b.b == pytest.approx(-0.1, rel=1e-9)
    fitted_a = fit_power_law(COMPUTE, law_b.predict(k * COMPUTE))
    assert parity_ratio(fitted_a, fitted_b, 1e21) == pytest.approx(1 / k, rel=1e-6)
    # A flat law never reaches another value.
    assert PowerLaw(a=1.0, b=0.0).compute_for(2.0) == float("inf")


def test_parity_table_uses_b_largest_compute_and_shared_metrics():
    fits = {("tf", "loss"): dict(law=PowerLaw(10.0, 0.2), max_compute=1e20),
            ("ch", "loss"): dict(law=PowerLaw(20.0, 0.2), max_compute=1e21),
            ("tf", "only_a"): dict(law=PowerLaw(1.0, 0.1), max_compute=1e20)}
    rows = parity_table(fits, "tf", "ch")
    assert [r["metric"] for r in rows] == ["loss"]
    assert rows[0]["compute_b"] == 1e21
    assert rows[0]["ratio"] == pytest.approx(0.5 ** (1 / 0.2), rel=1e-9)
