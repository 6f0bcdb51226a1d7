"""Failover mechanics of the runtime: what the survivors of a rank failure agree on, and how a layer is loaded
again from a checkpoint. :meth:`eplb.runtime.EplbController.fail_ranks` drives them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from eplb.errors import EplbError
from eplb.planning import plan_checksum
from eplb.runtime.agreement import all_reduce

__all__ = ["FailoverReport", "agree_after_failure", "load_layer"]


@dataclass(frozen=True)
class FailoverReport:
    """What :meth:`EplbController.fail_ranks` did on this rank.

    Attributes:
        step: the step serving resumes at (agreed by the survivors).
        failed_ranks: every failed rank so far, ascending.
        lost: int64 ``[n, 2]`` ``(layer, expert)`` pairs that had no replica left on a live rank.
        reloaded: int64 ``[m, 3]`` ``(layer, local slot, expert)`` this rank loaded with the expert loader.
        completed_layers: layers of the interrupted cycle that another survivor had already switched, completed here
            from the expert loader.
        seconds: wall time of the call (agreement, reloads, table rewrites).
    """

    step: int
    failed_ranks: list[int]
    lost: np.ndarray
    reloaded: np.ndarray
    completed_layers: list[int]
    seconds: float


def agree_after_failure(live, step: int, transfers: dict, group=None, device="cpu") -> tuple[int, dict]:
    """The resume step (the latest ``step`` any survivor reached) and ``{layer: row [P]}`` for the layers of the
    interrupted cycle this rank must complete because another survivor had switched one more of their parts
    (``transfers``: this rank's :class:`~eplb.transfers.LayerTransfer` parts of that cycle, by part). Survivors are
    at most one step apart, so they differ by at most one part of a layer. One all-reduce over the survivors."""
    phy2log = live.phy2log
    num_layers = phy2log.shape[0]
    checksums = [plan_checksum(row[None]) for row in phy2log]
    mine = torch.tensor([-step, *checksums, *(-c for c in checksums)], dtype=torch.int64)
    agreed = all_reduce(mine, dist.ReduceOp.MIN, group, device)
    low, high = agreed[1:1 + num_layers].numpy(), -agreed[1 + num_layers:].numpy()
    complete = {}
    for layer in np.flatnonzero(low != high).tolist():
        parts = [t for t in transfers.values() if t.layer == layer]
        if not parts:
            raise EplbError(f"layer {layer}: the survivors hold different placements and this rank has no plan "
                            "for it")
        other = high[layer] if checksums[layer] == low[layer] else low[layer]
        for part in parts:  # the part another survivor switched and this rank did not (none: this rank is ahead)
            if (np.array_equal(part.old_row.reshape(-1), phy2log[layer])
                    and plan_checksum(part.new_row.reshape(1, -1)) == other):
                complete[layer] = part.new_row.reshape(-1)
    return -int(agreed[0]), complete


def load_layer(live, layer: int, new_row: np.ndarray, layer_tensors, expert_loader) -> list[tuple[int, int, int]]:
    """Switch ``layer`` of the :class:`~eplb.runtime.live.LivePlacement` ``live`` to ``new_row`` ``[P]``, loading
    this rank's changed slots with ``expert_loader(layer, expert)``. Returns the ``(layer, local slot, expert)``
    loaded."""
    k = live.topology.slots_per_rank
    new_local = np.asarray(new_row)[live.rank * k:(live.rank + 1) * k]
    slots = np.flatnonzero(live.local_row(layer) != new_local)
    if slots.size and (expert_loader is None or layer_tensors is None):
        raise EplbError(f"layer {layer}: experts {new_local[slots].tolist()} must be loaded on rank {live.rank} "
                        "after the failure, but the controller has no expert_loader and layer_tensors")
    loaded = []
    for slot in slots.tolist():
        expert = int(new_local[slot])
        tensors = expert_loader(layer, expert)
        if len(tensors) != len(layer_tensors[layer]):
            raise EplbError(f"expert_loader({layer}, {expert}) returned {len(tensors)} tensors, the layer has "
                            f"{len(layer_tensors[layer])}")
        for tensor, value in zip(layer_tensors[layer], tensors):
            tensor[slot].copy_(value)
        loaded.append((layer, slot, expert))
    live.switch(layer, np.array(new_row))
    return loaded
