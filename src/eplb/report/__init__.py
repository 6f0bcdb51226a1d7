"""Tables for the command line (rich) and plots (:mod:`eplb.report.heatmap`)."""

from __future__ import annotations

import numpy as np
from rich.table import Table

__all__ = ["par_table", "summary_table"]


def par_table(par_per_layer: np.ndarray, busiest_rank: np.ndarray, load_per_layer: np.ndarray,
              top: int | None = None, title: str = "PAR per layer, worst first") -> Table:
    """A table of layers sorted by PAR, worst first.

    Args:
        par_per_layer: float ``[L]`` PAR of each layer (busiest rank / mean rank).
        busiest_rank: int ``[L]`` the rank carrying the most load in each layer.
        load_per_layer: float ``[L]`` total load (tokens routed) of each layer.
        top: show only the ``top`` worst layers (``None``: all).
    """
    order = np.argsort(-np.asarray(par_per_layer), kind="stable")
    shown = order if top is None else order[:top]
    table = Table(title=title if top is None or top >= len(order) else f"{title} ({len(shown)} of {len(order)})")
    table.add_column("layer", justify="right")
    table.add_column("PAR", justify="right")
    table.add_column("busiest rank", justify="right")
    table.add_column("load", justify="right")
    for layer in shown:
        table.add_row(str(layer), f"{par_per_layer[layer]:.3f}", str(busiest_rank[layer]),
                      f"{load_per_layer[layer]:,.0f}")
    return table


def summary_table(rows: dict[str, str], title: str = "summary") -> Table:
    """A two-column table of named figures (already formatted)."""
    table = Table(title=title, show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in rows.items():
        table.add_row(name, value)
    return table
