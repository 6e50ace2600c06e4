"""Log-log plots of a metric against compute: points per family and fitted laws."""
from __future__ import annotations

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_metric(points: list[dict], fits: dict, metric: str, compute_key: str, path: str) -> None:
    """`fits`: {(family, metric): {"law": PowerLaw, ...}}; writes one PNG."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    # Log axes: a 0 (an empty term, e.g. the discrete baseline's diffusion loss) is no point.
    plotted = [p for p in points if p["metrics"].get(metric, 0) > 0]
    families = sorted({p["family"] for p in plotted})
    for i, family in enumerate(families):
        color = f"C{i}"
        mine = [p for p in plotted if p["family"] == family]
        xs = np.array([p[compute_key] for p in mine], np.float64)
        ys = np.array([p["metrics"][metric] for p in mine], np.float64)
        ax.scatter(xs, ys, color=color, label=family, zorder=3)
        fit = fits.get((family, metric))
        if fit is not None:
            grid = np.geomspace(xs.min() / 1.5, xs.max() * 1.5, 64)
            law = fit["law"]
            ax.plot(grid, law.predict(grid), color=color, alpha=0.7,
                    label=f"{family}: {law.a:.3g} C^{-law.b:.3f}" + (
                        f" + {law.c:.3g}" if law.c else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Within less than a decade matplotlib labels the minor ticks too, and they overlap.
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("training FLOPs (" + ("6ND" if compute_key == "flops_6nd" else "exact") + ")")
    ax.set_ylabel(metric)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
