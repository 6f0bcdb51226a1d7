"""The placement in force on this rank: one owner, which the router, the recorder and the mover follow.

A layer switches placement in one call, :meth:`LivePlacement.switch`: the recorder first converts the layer's slot
counts with the placement they were taken under, then the row changes, then the router rewrites its tables in place.
Everything else (the controller, the failover, the mover's transfers) reads the placement from here.
"""

from __future__ import annotations

import numpy as np

from eplb.placement import Placement
from eplb.runtime.transport import upload

__all__ = ["LivePlacement"]


class LivePlacement:
    """``phy2log`` ``[L, P]`` in force on ``rank``, switched layer by layer.

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
    def placement(self) -> Placement:
        """The :class:`Placement` in force (rebuilt after a switch when next asked for)."""
        if self._placement is None:
            self._placement = Placement(self._phy2log, self.num_experts, self.topology)
        return self._placement

    def local_row(self, layer: int) -> np.ndarray:
        """int64 ``[K]``: the experts of this rank's slots in ``layer``."""
        k = self.topology.slots_per_rank
        return self._phy2log[layer, self.rank * k:(self.rank + 1) * k].copy()

    def switch(self, layer: int, new_row: np.ndarray, prepared: dict | None = None) -> None:
        """Put ``layer`` on ``new_row`` ``[P]`` (its weights are in place): recorder fold, row, router tables.
        ``prepared``: :meth:`prepare` of this switch (built off the serving thread): then device copies only."""
        if prepared is None:
            prepared = self.prepare([layer], np.asarray(new_row)[None], self._phy2log[layer][None])[layer]
        self.recorder.fold_layer(layer, prepared["fold"])
        self._phy2log[layer] = np.asarray(new_row, dtype=np.int64).reshape(-1)
        self._placement = None
        self.router.apply_tables(prepared["router"])

    def prepare(self, layers, new_rows: np.ndarray, old_rows: np.ndarray) -> dict:
        """What :meth:`switch` writes for each of ``layers``, by layer: built on the host in one vectorised pass and
        uploaded, one copy per table (any thread).

        Args:
            layers: the layers, each once.
            new_rows, old_rows: int ``[n, P]``: each layer's row after and before its switch."""
        layers = np.asarray(layers, dtype=np.int64).reshape(-1)
        if layers.size == 0:
            return {}
        order = np.argsort(layers)  # ascending: the router reads a placement of all L layers by layer index
        layers = layers[order]
        new_rows = np.asarray(new_rows).reshape(layers.size, -1)[order]
        old_rows = np.array(old_rows, dtype=np.int64).reshape(layers.size, -1)[order]
        if self.recorder.source != "ids":
            k = self.topology.slots_per_rank
            old_rows = old_rows[:, self.rank * k:(self.rank + 1) * k]
        fold = upload(old_rows, self.recorder.device)
        router = self.router.build_tables(layers, Placement(new_rows, self.num_experts, self.topology))
        out = {}
        for i, layer in enumerate(layers.tolist()):  # views of the batched tables, one layer each
            tables = {name: value[i:i + 1] if hasattr(value, "shape") else value for name, value in router.items()}
            out[layer] = {"fold": fold[i], "router": tables}
        return out

    def fail_over(self, failed: np.ndarray) -> None:
        """Route around the ``failed`` ranks (bool ``[W]``) from now on."""
        self.router.set_failed_ranks(self.placement, failed)
