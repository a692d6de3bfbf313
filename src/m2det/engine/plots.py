"""Plots written as PNG files: evaluation's precision-recall curves, training's loss curve
(matplotlib figures without pyplot: no display, no global state)."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from m2det.io.atomic import atomic_path

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.figure import Figure


def save_figure(figure: Figure, path: Union[str, Path]) -> Path:
    """Write a matplotlib figure as a PNG file, atomically: the one writer every plot goes through."""
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.1)  # no label cut at the edge
    return path


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
    return save_figure(figure, path)


def plot_loss_curve(results_csv: Union[str, Path], path: Union[str, Path]) -> Path:
    """Training loss terms per epoch and, where measured, validation AP50 and AP, as one PNG."""
    from matplotlib.figure import Figure

    with open(results_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    figure = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    epochs = [int(r["epoch"]) for r in rows]
    for key, style in (("loss", "-"), ("loss_box", "--"), ("loss_cls", ":")):
        axes.plot(epochs, [float(r[key]) for r in rows], style, label=key)
    measured = [r for r in rows if r.get("AP50")]
    title = "Training loss and validation AP" if measured else "Training loss"
    axes.set(xlabel="epoch", ylabel="training loss", title=title)
    axes.grid(True, alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    if measured:
        right = axes.twinx()
        for key, marker in (("AP50", "o-"), ("AP", "s-")):
            right.plot(
                [int(r["epoch"]) for r in measured],
                [float(r[key]) for r in measured],
                marker,
                label=f"val {key}",
            )
        right.set(ylabel="validation AP", ylim=(0, 1))
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    axes.legend(handles, labels, loc="upper right", fontsize="small")
    return save_figure(figure, path)


def plot_accuracy_vs_cost(
    points: Mapping[str, tuple[float, float]],
    path: Union[str, Path],
    title: str,
    xlabel: str = "GFLOPs per image",
    ylabel: str = "mAP (COCO AP@[.5:.95])",
) -> Path:
    """One labelled point per model at (cost, accuracy), as the papers' accuracy-against-cost figures
    draw them, written atomically. An empty mapping gives an empty chart that says so."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for name, (cost, accuracy) in points.items():
        axes.plot([cost], [accuracy], "o", markersize=7)
        axes.annotate(name, (cost, accuracy), textcoords="offset points", xytext=(6, 4), fontsize="small")
    if not points:
        axes.text(0.5, 0.5, "no finished model yet", ha="center", va="center", transform=axes.transAxes)
    else:
        costs = [cost for cost, _ in points.values()]
        accuracies = [accuracy for _, accuracy in points.values()]
        top = max(accuracies)
        # both from 0: the costs and accuracies in proportion, not magnified differences
        axes.set_xlim(0.0, max(costs) * 1.25 if max(costs) > 0 else 1.0)
        axes.set_ylim(min(0.0, min(accuracies)), top * 1.15 if top > 0 else 1.0)
        axes.ticklabel_format(useOffset=False)
    axes.set(xlabel=xlabel, ylabel=ylabel, title=title)
    axes.grid(True, alpha=0.3)
    return save_figure(figure, path)
