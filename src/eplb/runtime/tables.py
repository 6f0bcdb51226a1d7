"""The router's tables of a layer as one row of integers, built on the host without torch.

A rank's :class:`~eplb.runtime.router.ReplicaRouter` keeps every table of a layer in one int64 row of a device tensor
``[L, X]`` (:class:`TableLayout` names the parts), so a layer's switch writes its tables with one device copy. The
rows are built here, with numpy only, from a placement and a :class:`TableSpec`: by the router itself at start and
after a failure, and, for the layers a plan moves, by the planner worker process, so that neither the serving
thread nor EPLB's side thread builds them (:mod:`eplb.runtime.recipes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eplb.dispatch import BALANCED_PASSES, balanced_schedule, rank_choice, replica_slots
from eplb.errors import EplbError
from eplb.placement import Failover, Placement

__all__ = ["TableSpec", "TableLayout", "router_rows"]

_UNPADDED = ("replica_count", "rank_table")


@dataclass(frozen=True)
class TableSpec:
    """What one rank's router tables depend on besides the placement.

    Attributes:
        rank: the rank.
        dispatch: the router's dispatch rule.
        tp_size: tensor-parallel size of the ``rank`` rule.
        max_replicas: the most replicas an expert may have (the width of ``log2phy``).
        recorder_source: ``"ids"`` or ``"counts"``: whether a switch folds the recorder's counts with the layer's
            whole old row ``[P]`` or this rank's part of it ``[K]``.
    """

    rank: int
    dispatch: str
    tp_size: int
    max_replicas: int
    recorder_source: str = "ids"


class TableLayout:
    """Where each table sits in a layer's row: ``log2phy`` ``[E, M]``, ``replica_count`` ``[E]``, ``rank_table``
    ``[E]`` and, for ``balanced`` dispatch, ``split_rank`` ``[E + 1, M']``, ``split_schedule`` ``[passes, K']`` and
    ``replica_slot`` ``[E, M']`` (see :class:`~eplb.runtime.router.ReplicaRouter`)."""

    def __init__(self, spec: TableSpec, num_experts: int, num_ranks: int):
        self.split_width = min(spec.max_replicas, num_ranks)
        self.schedule_width = max(1, num_ranks // 2)
        shapes = {"log2phy": (num_experts, spec.max_replicas), "replica_count": (num_experts,),
                  "rank_table": (num_experts,)}
        if spec.dispatch == "balanced":
            shapes.update(split_rank=(num_experts + 1, self.split_width),
                          split_schedule=(BALANCED_PASSES, self.schedule_width),
                          replica_slot=(num_experts, self.split_width))
        #: name -> (first column, shape)
        self.parts: dict[str, tuple[int, tuple[int, ...]]] = {}
        width = 0
        for name, shape in shapes.items():
            self.parts[name] = (width, shape)
            width += int(np.prod(shape))
        #: X, the columns of a row
        self.width = width
        self._pads = {"log2phy": -1, "split_rank": num_ranks, "split_schedule": num_experts, "replica_slot": 0}

    def view(self, rows, name: str):
        """The ``name`` table of ``rows`` (an array or tensor ``[n, X]``), shaped ``[n, *shape]``, without a copy."""
        start, shape = self.parts[name]
        return rows[:, start:start + int(np.prod(shape))].reshape(rows.shape[0], *shape)

    def crop(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """``rows`` ``[n, X]`` in a few bytes, for the planner's reply (a whole row is mostly padding: ``log2phy``
        holds ``P - E + 1`` replicas per expert, a plan two or three): each table in layout order as int32, its
        last axis cut after the last column that is not padding in any row. :meth:`fill` undoes it."""
        out = []
        for name in self.parts:
            table = self.view(rows, name)
            width = table.shape[-1]
            if name in _UNPADDED:
                pass
            elif name == "replica_slot":  # padded where split_rank is
                width = out[list(self.parts).index("split_rank")].shape[-1]
            else:
                used = np.flatnonzero((table != self._pads[name]).any(axis=tuple(range(table.ndim - 1))))
                width = int(used[-1]) + 1 if used.size else 0
            out.append(np.ascontiguousarray(table[..., :width], dtype=np.int32))
        return tuple(out)

    def fill(self, cropped: tuple[np.ndarray, ...]) -> np.ndarray:
        """int64 ``[n, X]``: the rows :meth:`crop` cut, whole again."""
        rows = np.empty((cropped[0].shape[0], self.width), dtype=np.int64)
        for name, table in zip(self.parts, cropped):
            view = self.view(rows, name)
            if name not in _UNPADDED:
                view[..., table.shape[-1]:] = self._pads[name]
            view[..., :table.shape[-1]] = table
        return rows


def router_rows(placement: Placement, rows, spec: TableSpec, failed: np.ndarray | None = None) -> np.ndarray:
    """int64 ``[len(rows), X]``: the table rows of ``placement``'s layers ``rows``, routing around the ``failed``
    ranks (bool ``[W]``): an expert with no surviving replica routes to slot -1 in every mode.

    Raises:
        EplbError: an expert has more replicas than ``spec.max_replicas``.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    layout = TableLayout(spec, placement.num_experts, placement.topology.num_ranks)
    if failed is not None and np.any(failed):
        placement = placement.without_ranks(failed)
    width = placement.log2phy.shape[2]
    if width > spec.max_replicas:
        raise EplbError(f"an expert has {width} replicas, the router tables hold at most {spec.max_replicas}")
    out = np.empty((rows.size, layout.width), dtype=np.int64)
    log2phy = layout.view(out, "log2phy")
    log2phy.fill(-1)
    log2phy[:, :, :width] = placement.log2phy[rows]
    count, table = layout.view(out, "replica_count"), layout.view(out, "rank_table")
    count[:] = placement.replica_count[rows]
    table[:] = rank_choice(placement, spec.rank, "local" if spec.dispatch == "local" else "rank", spec.tp_size, rows)
    lost = placement.lost_mask[rows] if isinstance(placement, Failover) else None
    if lost is not None:  # the token rotation then picks replica 0, which is -1
        count[lost] = 1
        table[lost] = -1
    if spec.dispatch == "balanced":
        _split_tables(out, layout, placement, rows, lost, failed)
    return out


def _split_tables(out, layout: TableLayout, placement, rows, lost, failed) -> None:
    """The ``balanced`` mode's tables of ``rows`` into ``out``: ``split_rank``, ``split_schedule``,
    ``replica_slot``."""
    num_ranks = placement.topology.num_ranks
    ranks, slots = replica_slots(placement, rows, layout.split_width)
    if lost is not None:  # the split needs a rank per expert: the first live rank stands in, and its slot is -1
        ranks[lost, 0] = int(np.flatnonzero(~np.asarray(failed))[0])
        slots[lost, 0] = -1
    split_rank = layout.view(out, "split_rank")
    split_rank[:, -1] = num_ranks  # the stand-in expert E that pads the schedule has no rank
    split_rank[:, :-1] = np.where(ranks >= 0, ranks, num_ranks)
    layout.view(out, "split_schedule")[:] = balanced_schedule(ranks, num_ranks, BALANCED_PASSES,
                                                              layout.schedule_width)
    layout.view(out, "replica_slot")[:] = slots
