"""Evaluation plots written as PNG files (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import numpy as np

from m2det.io.torchfile import atomic_path


def plot_pr_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: Union[str, Path],
    title: str = "Precision-recall",
    ap: Optional[Mapping[str, float]] = None,
) -> Path:
    """One figure, one precision-recall curve per class, written atomically.

    `curves` maps a class name to `(recall, precision)` arrays; `ap` (optional) adds a number per
    class to the legend (say which in the title). An empty mapping gives an empty chart that says so.
    """
    from matplotlib.figure import Figure

    # Figure without pyplot: no global state and no GUI backend, safe in threads and workers.
    figure = Figure(figsize=(7, 5.5), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for name, (recall, precision) in curves.items():
        recall, precision = np.asarray(recall, dtype=float), np.asarray(precision, dtype=float)
        label = name if ap is None or name not in ap else f"{name} ({ap[name]:.3f})"
        axes.plot(recall, precision, linewidth=1.5, label=label)
    if curves:
        axes.legend(loc="lower left", fontsize="small", ncol=1 if len(curves) <= 12 else 2)
    else:
        axes.text(0.5, 0.5, "no class with ground truth", ha="center", va="center")
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=title)
    axes.grid(True, alpha=0.3)
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
