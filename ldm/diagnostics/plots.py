"""Plot helpers for the diagnostics: each writes one PNG and returns its path (matplotlib, no display needed)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def line_plot(path: str, x, series: dict[str, list], xlabel: str, ylabel: str, title: str, logy: bool = False,
              hlines: dict[str, float] | None = None, markers: bool = True) -> str:
    """Plots each named series against x (one axis), with optional labelled reference lines."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, y in series.items():
        ax.plot(x, y, marker="o" if markers else None, markersize=3, label=label)
    for label, value in (hlines or {}).items():
        ax.axhline(value, color="grey", linestyle="--", linewidth=1, label=label)
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def panels_plot(path: str, x, panels: dict[str, dict[str, list]], xlabel: str, title: str,
                hlines: dict[str, float] | None = None, logy: tuple[str, ...] = (), invert_x: bool = False) -> str:
    """Plots one panel per entry of `panels` ({panel title: {series label: y}}) side by side, sharing x, or with
    x a dict {series label: its x} where series differ in length."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        for label, y in series.items():
            ax.plot(x[label] if isinstance(x, dict) else x, y, marker="o", markersize=3, label=label)
        if hlines and name in hlines:
            ax.axhline(hlines[name], color="grey", linestyle="--", linewidth=1, label="target")
        if name in logy:
            ax.set_yscale("log")
        if invert_x:
            ax.invert_xaxis()
        ax.set(xlabel=xlabel, title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def heatmap(path: str, matrix: np.ndarray, row_labels: list, col_labels: list, title: str, colorbar: str,
            xlabel: str = "", ylabel: str = "", log: bool = False) -> str:
    """Draws matrix (rows, cols) as an image with labelled axes."""
    matrix = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(col_labels) + 2), max(3, 0.35 * len(row_labels) + 1.5)))
    data = np.log10(np.clip(matrix, 1e-12, None)) if log else matrix
    im = ax.imshow(data, aspect="auto", origin="lower", cmap="viridis")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels], rotation=90, fontsize=7)
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels], fontsize=7)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(im, ax=ax, label=("log10 " if log else "") + colorbar)
    return _save(fig, path)


def ridge_plot(path: str, counts: np.ndarray, edges: np.ndarray, labels: list, title: str, xlabel: str) -> str:
    """Stacks histograms counts (S, B) over bin edges (B + 1,) vertically, one ridge per row (first at the top)."""
    counts = np.asarray(counts, dtype=float)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(6, 1 + 0.3 * len(counts)))
    peak = counts.max() or 1.0
    for i, row in enumerate(counts):
        base = len(counts) - 1 - i
        ax.fill_between(centres, base, base + 1.6 * row / peak, alpha=0.7, color=plt.cm.viridis(i / max(1, len(counts) - 1)))
        ax.plot(centres, base + 1.6 * row / peak, color="black", linewidth=0.5)
    ax.set_yticks(range(len(counts)), [str(lbl) for lbl in reversed(labels)], fontsize=7)
    ax.set(title=title, xlabel=xlabel, ylabel="step")
    return _save(fig, path)


def dot_plot(path: str, rows: dict[str, list[float]], xlabel: str, title: str) -> str:
    """Draws each named list of values as a row of dots (e.g. the timesteps a sampler visits)."""
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    for i, (label, values) in enumerate(rows.items()):
        ax.scatter(values, [i] * len(values), s=8)
    ax.set_yticks(range(len(rows)), list(rows), fontsize=7)
    ax.set(xlabel=xlabel, title=title)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)
