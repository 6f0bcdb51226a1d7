"""Which load a plan sees: its window's (``load_history: window``), or xLLM's history (``halve``).

xLLM adds every step's expert load into one running total, plans on the total and then halves it (integer halving),
so that a plan sees its own interval's load plus half of the previous one's, a quarter of the one before, and so
on. :class:`LoadHistory` does the same over eplb's windows: the window's logical load ``[L, E]`` gathered over the
group is added to the total; the total is what the planner is asked to plan on; after the request the total is
halved. Every rank holds the same gathered windows, so every rank holds the same total.
"""

from __future__ import annotations

import numpy as np

from eplb.errors import EplbError

__all__ = ["LoadHistory", "HISTORIES"]

HISTORIES = ("window", "halve")


class LoadHistory:
    """The load a plan sees, window after window.

    Args:
        kind: ``"window"`` (each plan sees its window) or ``"halve"`` (the running total, halved after each plan).
    """

    def __init__(self, kind: str = "window"):
        if kind not in HISTORIES:
            raise EplbError(f"load history must be one of {', '.join(HISTORIES)}, got {kind!r}")
        self.kind = kind
        #: int64 ``[L, E]``: the running total (``halve``; None before the first window)
        self.total: np.ndarray | None = None

    def add(self, window: np.ndarray) -> np.ndarray:
        """Add a window's load (int ``[L, E]``; a per-step ``[T, L, E]`` with ``window``) and return what a plan
        made now would see."""
        if self.kind == "window":
            return window
        if np.ndim(window) != 2:
            raise EplbError(f"the halved load history sums [L, E] windows, got shape {np.shape(window)}")
        window = np.asarray(window, dtype=np.int64)
        self.total = window.copy() if self.total is None else self.total + window
        return self.total.copy()

    def planned(self) -> None:
        """A plan was asked for on the total: halve it (xLLM truncates: odd counts lose their half token)."""
        if self.total is not None:
            self.total //= 2
