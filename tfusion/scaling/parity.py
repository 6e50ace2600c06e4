"""The paper's parity FLOP ratio between two families' scaling laws.

"Family A matches family B at a fraction of the compute": take B's metric at B's
compute C_B, find the compute C_A where A's law reaches the same value, and
report C_A / C_B (< 1: A is more compute-efficient). Lower metric is better.
"""
from __future__ import annotations

from tfusion.scaling.fit import PowerLaw


def parity_ratio(law_a: PowerLaw, law_b: PowerLaw, compute_b: float) -> float:
    return law_a.compute_for(float(law_b.predict(compute_b))) / compute_b


def parity_table(fits: dict, family_a: str, family_b: str) -> list[dict]:
    """Parity ratios at the largest compute B reached, for every metric both families fit.

    `fits`: {(family, metric): {"law": PowerLaw, "max_compute": float, ...}}.
    """
    rows = []
    metrics = sorted({m for f, m in fits if f == family_a} & {m for f, m in fits if f == family_b})
    for metric in metrics:
        a, b = fits[(family_a, metric)], fits[(family_b, metric)]
        c_b = b["max_compute"]
        rows.append(dict(metric=metric, family_a=family_a, family_b=family_b, compute_b=c_b,
                         ratio=parity_ratio(a["law"], b["law"], c_b)))
    return rows
