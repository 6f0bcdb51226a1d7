"""Rank x layer heatmap of load, written as PNG with matplotlib's Agg canvas (no display, no global pyplot state).

Every heatmap eplb draws uses the same colours and the same scale, so two pictures compare at a glance: each cell is
a rank's load over its layer's mean rank load, on a diverging map centred on 1 (white: balanced; red: busier than the
mean; blue: idler), from 0 to :data:`SCALE_MAX` (darker red beyond, shown by the colour bar's arrow).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from eplb._files import atomic_path
from eplb.errors import EplbError

__all__ = ["SCALE_MAX", "check_png", "plot_rank_heatmap"]

SCALE_MAX = 2.0  # top of the colour scale: a rank with twice its layer's mean load


def check_png(path, flag: str | None = None) -> None:
    """Raise unless ``path`` names a ``.png`` file (the only format the heatmap is written in)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        label = f"{flag} {path}" if flag else str(path)
        raise EplbError(f"{label}: the heatmap is written as PNG; give a file name ending in .png")


def plot_rank_heatmap(rank_loads: np.ndarray, path, title: str = "", flag: str | None = None) -> None:
    """Write a heatmap of each rank's load relative to its layer's mean rank load (1.0 = perfectly balanced).

    Args:
        rank_loads: float ``[L, W]`` load each rank serves in each layer (e.g. summed over steps).
        path: the ``.png`` file to write (atomically).
        title: what the load is (map, policy, steps); a second line with the PAR of this very load is added.
        flag: the option that named ``path``, for error messages.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    loads = np.asarray(rank_loads, dtype=np.float64)
    if loads.ndim != 2 or loads.size == 0:
        raise EplbError(f"the heatmap needs rank loads [layers, ranks], got shape {loads.shape}")
    check_png(path, flag)
    mean = loads.mean(axis=1, keepdims=True)
    relative = np.divide(loads, mean, out=np.ones_like(loads), where=mean > 0)
    layer_load = loads.sum(axis=1)
    par = relative.max(axis=1)
    drawn_par = float(np.average(par, weights=layer_load)) if layer_load.sum() > 0 else 1.0
    num_layers, num_ranks = loads.shape
    width = min(4 + num_ranks * 0.18, 24)
    figure = Figure(figsize=(width, min(3 + num_layers * 0.12, 16)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(relative, aspect="auto", interpolation="nearest", cmap="RdBu_r",
                        norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=SCALE_MAX))
    axes.set_xlabel("rank")
    axes.set_ylabel("MoE layer")
    title = textwrap.fill(title, int(width * 12)) if title else ""  # long file names: wrap, not clip
    axes.set_title((f"{title}\n" if title else "") + f"busiest rank / mean rank of this load: {drawn_par:.3f} "
                   f"(token-weighted mean over layers; worst layer {par.max():.3f})", fontsize=10)
    figure.colorbar(image, ax=axes, label="rank load / layer mean (1 = balanced)",
                    extend="max" if relative.max() > SCALE_MAX else "neither")
    figure.tight_layout()
    with atomic_path(path, flag) as tmp:
        figure.savefig(tmp, format="png")
