"""The placement in force on this rank: one owner, which the router, the recorder and the mover follow.

A layer switches placement in one call, :meth:`PlacementInForce.switch`: the recorder first converts the layer's slot
counts with the placement they were taken under, then the row changes, then the router rewrites its tables in place.
Everything else (the controller, the failover, the planner's requests) reads the placement from here, and the set of
failed ranks every table routes around (:attr:`PlacementInForce.failed`, changed only by
:meth:`PlacementInForce.fail_over`). "Live" names ranks, never this placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from eplb.placement import Placement
from eplb.runtime.recipes import SwitchRows
from eplb.runtime.router import RouterTables
from eplb.runtime.tables import router_rows
from eplb.runtime.transport import upload

__all__ = ["PlacementInForce", "SwitchTables"]


@dataclass(frozen=True)
class SwitchTables:
    """What the switch of one layer writes besides its weights, on the device (uploaded off the serving thread).

    Attributes:
        layer: the layer.
        new_row: int64 ``[P]`` its placement after the switch (host).
        fold: int64 ``[S]`` the placement its recorder counts were taken under (see
            :meth:`~eplb.runtime.recorder.LoadRecorder.fold_layer`).
        router: its router tables after the switch.
    """

    layer: int
    new_row: np.ndarray
    fold: torch.Tensor
    router: RouterTables

    def tensors(self) -> list[torch.Tensor]:
        """The device tensors (for the caching allocator's hand-over to the serving stream)."""
        return [self.fold, self.router.index, self.router.rows]


class PlacementInForce:
    """``phy2log`` ``[L, P]`` in force on ``rank``, switched layer by layer, and the failed ranks.

    Args:
        placement: the placement the weights were loaded with.
        rank: this rank.
        router: the :class:`~eplb.runtime.router.ReplicaRouter` whose tables follow the placement.
        recorder: the :class:`~eplb.runtime.recorder.LoadRecorder` that attributes counts through it.
    """

    def __init__(self, placement: Placement, rank: int, router, recorder):
        self.topology, self.num_experts, self.rank = placement.topology, placement.num_experts, rank
        self.router, self.recorder = router, recorder
        self._phy2log = np.array(placement.phy2log, dtype=np.int64)
        self._placement: Placement | None = placement

    @property
    def phy2log(self) -> np.ndarray:
        """int64 ``[L, P]`` in force (read-only view: layers change through :meth:`switch`)."""
        view = self._phy2log.view()
        view.flags.writeable = False
        return view

    @property
    def failed(self) -> np.ndarray:
        """bool ``[W]``: ranks that failed (:meth:`fail_over`); every table routes around them (read-only view)."""
        view = self.router.failed.view()
        view.flags.writeable = False
        return view

    @property
    def placement(self) -> Placement:
        """The :class:`Placement` in force (rebuilt after a switch when next asked for)."""
        if self._placement is None:
            self._placement = Placement.from_valid(self._phy2log, self.num_experts, self.topology)
        return self._placement

    def local_row(self, layer: int) -> np.ndarray:
        """int64 ``[K]``: the experts of this rank's slots in ``layer``."""
        k = self.topology.slots_per_rank
        return self._phy2log[layer, self.rank * k:(self.rank + 1) * k].copy()

    def upload(self, rows: SwitchRows) -> SwitchTables:
        """The :class:`SwitchTables` of ``rows`` (built by the planner process) on the device (any thread)."""
        return SwitchTables(rows.layer, rows.new_row, upload(rows.fold, self.recorder.device),
                            self.router.device_tables([rows.layer], self.router.layout.fill(rows.router)))

    def tables(self, layer: int, new_row: np.ndarray) -> SwitchTables:
        """The :class:`SwitchTables` that put ``layer`` on ``new_row`` ``[P]``, built here (the failover's path)."""
        new_row = np.asarray(new_row, dtype=np.int64).reshape(-1)
        fold = self._phy2log[layer]
        if self.recorder.source != "ids":
            k = self.topology.slots_per_rank
            fold = fold[self.rank * k:(self.rank + 1) * k]
        router = router_rows(Placement(new_row[None], self.num_experts, self.topology), [0], self.router.spec,
                             self.failed)
        return self.upload(SwitchRows(layer, new_row, np.array(fold), self.router.layout.crop(router)))

    def switch(self, tables: SwitchTables) -> None:
        """Put ``tables.layer`` on ``tables.new_row`` (its weights are in place): recorder fold, row, router tables;
        device copies only."""
        self.recorder.fold_layer(tables.layer, tables.fold)
        self._phy2log[tables.layer] = tables.new_row
        self._placement = None
        self.router.apply(tables.router)

    def fail_over(self, failed: np.ndarray) -> None:
        """Route around the ``failed`` ranks (bool ``[W]``) from now on."""
        self.router.set_failed_ranks(self.placement, failed)
