"""Rank x layer heatmap of load, written as PNG with matplotlib's Agg canvas (no display, no global pyplot state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eplb.errors import EplbError
from eplb.formats._common import atomic_path

__all__ = ["plot_rank_heatmap"]


def plot_rank_heatmap(rank_loads: np.ndarray, path, title: str = "", vmax: float | None = None) -> None:
    """Write a heatmap of each rank's load relative to its layer's mean rank load (1.0 = perfectly balanced).

    Args:
        rank_loads: float ``[L, W]`` load each rank serves in each layer.
        path: the ``.png`` file to write (atomically).
        title: shown above the plot.
        vmax: top of the colour scale (default: 2 or the largest ratio); give two maps the same one to compare.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    loads = np.asarray(rank_loads, dtype=np.float64)
    if loads.ndim != 2 or loads.size == 0:
        raise EplbError(f"the heatmap needs rank loads [layers, ranks], got shape {loads.shape}")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise EplbError(f"{path}: the heatmap is written as PNG; give a file name ending in .png")
    mean = loads.mean(axis=1, keepdims=True)
    relative = np.divide(loads, mean, out=np.ones_like(loads), where=mean > 0)
    num_layers, num_ranks = loads.shape
    figure = Figure(figsize=(min(4 + num_ranks * 0.18, 24), min(3 + num_layers * 0.12, 16)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(relative, aspect="auto", interpolation="nearest", cmap="magma",
                        vmin=0.0, vmax=vmax if vmax is not None else max(2.0, float(relative.max())))
    axes.set_xlabel("rank")
    axes.set_ylabel("MoE layer")
    axes.set_title(title or "rank load / layer mean")
    figure.colorbar(image, ax=axes, label="rank load / layer mean (1 = balanced)")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
