"""Plots written as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from stagecredit.storage.atomic import atomic_write_bytes


def _save(fig, path: Path) -> Path:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def group_effects_plot(path: Path, stages: Sequence[str], groups: Sequence[str],
                       series: dict[str, np.ndarray], unit: str) -> Path:
    """Grouped bars: stage effect on each group's mean, one panel per group, one bar per estimate.

    ``series[label]`` is ``[K, G]``.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), sharey=True, squeeze=False)
    width = 0.8 / len(series)
    x = np.arange(len(stages))
    for g, (ax, group) in enumerate(zip(axes[0], groups)):
        for i, (label, values) in enumerate(series.items()):
            ax.bar(x + (i - (len(series) - 1) / 2) * width, values[:, g], width, label=label)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, stages)
        ax.set_title(group)
        ax.set_ylabel(f"stage effect τ on mean loss ({unit})\n> 0 blame, < 0 credit" if g == 0 else "")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Which stage is to blame? Effect of each stage on each group's mean loss")
    path = _save(fig, path)
    plt.close(fig)
    return path


def scatter_plot(path: Path, truth, attributions: Sequence, unit: str) -> Path:
    """Estimated vs retrained effect per behaviour value, one panel per stage."""
    plt = _pyplot()
    K = len(truth.stages)
    fig, axes = plt.subplots(1, K, figsize=(4 * K, 3.8), squeeze=False)
    for k, ax in enumerate(axes[0]):
        for att in attributions:
            ax.scatter(truth.effects[k], att.effects[k], s=6, alpha=0.5, label=f"{att.method} / {att.mode}")
        lo = float(np.min(truth.effects[k]))
        hi = float(np.max(truth.effects[k]))
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, label="y = x")
        ax.set_title(f"'{truth.stages[k]}'")
        ax.set_xlabel(f"τ by retraining ({unit})")
        ax.set_ylabel(f"estimated τ̂ ({unit})" if k == 0 else "")
    axes[0][-1].legend(fontsize=7, markerscale=2)
    fig.suptitle("Estimate vs retraining, per evaluation example (> 0: stage made the loss worse)")
    path = _save(fig, path)
    plt.close(fig)
    return path


def intervention_plot(path: Path, report) -> Path:
    """Worst-group and average test accuracy for every intervention, side by side."""
    plt = _pyplot()
    names = [i.name for i in report.interventions]
    worst = [100 * i.test.worst_group for i in report.interventions]
    average = [100 * i.test.accuracy for i in report.interventions]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.6))
    ax.bar(x - 0.2, worst, 0.4, label="worst group")
    ax.bar(x + 0.2, average, 0.4, label="average")
    for xi, (w, a) in enumerate(zip(worst, average)):
        ax.text(xi - 0.2, w + 1, f"{w:.1f}", ha="center", fontsize=7)
        ax.text(xi + 0.2, a + 1, f"{a:.1f}", ha="center", fontsize=7)
    ax.set_xticks(x, [n.replace(", ", ",\n") for n in names], fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8, loc="lower right")
    target = f"stage '{report.stage}'" + (f", source '{report.source}'" if report.source else "")
    ax.set_title(f"Before and after repairing {target}")
    path = _save(fig, path)
    plt.close(fig)
    return path
