"""Placement rows before they are a :class:`~eplb.placement.Placement`: ``phy2log`` int ``[L, P]`` arrays.

What is done on the raw rows: counting each layer's ids (one bincount for all layers), every problem that keeps
rows from being a valid placement, and the layouts the engines start with.
"""

from __future__ import annotations

import numpy as np

from eplb._arrays import to_int_array
from eplb.errors import PlacementError
from eplb.topology import Topology, check_topology

__all__ = ["layer_counts", "find_problems", "shared_rank_experts", "initial_phy2log", "LAYOUTS"]


#: the layouts engines start with (:func:`initial_phy2log`)
LAYOUTS = ("vllm", "ascend", "spread")
_MAX_REPORTED = 20  # problems listed before "... and n more"


def layer_counts(ids: np.ndarray, num_ids: int) -> np.ndarray:
    """int64 ``[L, num_ids]``: how many entries of each row of ``ids`` (int ``[L, P]``, every entry in
    ``[0, num_ids)``) hold each id; one bincount over all layers."""
    num_layers = ids.shape[0]
    flat = (ids + num_ids * np.arange(num_layers)[:, None]).ravel()
    return np.bincount(flat, minlength=num_layers * num_ids).reshape(num_layers, num_ids)


def _cap(lines: list[str], what: str) -> list[str]:
    if len(lines) > _MAX_REPORTED:
        return lines[:_MAX_REPORTED] + [f"... and {len(lines) - _MAX_REPORTED} more {what}"]
    return lines


def shared_rank_experts(phy2log: np.ndarray, topology: Topology) -> np.ndarray:
    """Where one rank holds an expert more than once.

    Returns:
        int64 ``[n, 3]`` rows ``(layer, rank, expert)``, one per (layer, rank, expert) held twice or more.
    """
    num_layers = phy2log.shape[0]
    table = np.sort(phy2log.reshape(num_layers, topology.num_ranks, topology.slots_per_rank), axis=2)
    dup = (table[:, :, 1:] == table[:, :, :-1]) & (table[:, :, 1:] >= 0)
    layer, rank, k = np.nonzero(dup)
    rows = np.unique(np.stack([layer, rank, table[layer, rank, k + 1]], axis=1), axis=0)
    return rows.reshape(-1, 3).astype(np.int64)


def find_problems(phy2log, num_experts: int, topology: Topology, allow_shared_rank: bool = True) -> list[str]:
    """Every reason why ``phy2log`` is not a valid placement, as readable lines (empty list when valid).

    Checks: 2-D integer array, ``P == W * K``, ids in ``[0, E)``, every expert has >= 1 replica in every layer,
    and, unless ``allow_shared_rank``, no rank holds the same expert twice.
    """
    try:
        arr = to_int_array(phy2log, "phy2log", PlacementError)
    except PlacementError as exc:
        return [str(exc)]
    if arr.ndim != 2:
        return [f"phy2log must be 2-D [layers, slots], got shape {arr.shape}"]
    if arr.shape[1] != topology.num_physical:
        return [f"phy2log has {arr.shape[1]} slots per layer, expected {topology.num_physical} "
                f"({topology.num_ranks} ranks x {topology.slots_per_rank} slots)"]
    if arr.shape[0] == 0:
        return ["phy2log has no layers"]
    problems = []
    bad = np.argwhere((arr < 0) | (arr >= num_experts))
    problems += _cap([f"layer {l}, rank {p // topology.slots_per_rank}, slot {p}: expert id {arr[l, p]} is out of "
                      f"range [0, {num_experts})" for l, p in bad], "out-of-range ids")
    inside = np.where((arr >= 0) & (arr < num_experts), arr, num_experts)
    count = layer_counts(inside, num_experts + 1)[:, :num_experts]
    missing = np.argwhere(count == 0)
    problems += _cap([f"layer {l}: expert {e} has no replica" for l, e in missing], "experts without a replica")
    if not allow_shared_rank:
        problems += _cap([f"layer {l}, rank {r}: expert {e} is placed more than once on the same rank"
                          for l, r, e in shared_rank_experts(arr, topology)], "duplicates")
    return problems


def initial_phy2log(num_experts: int, topology: Topology, layout: str = "vllm") -> np.ndarray:
    """The placement engines start with, one layer: int64 ``[P]``.

    - ``vllm``: experts 0..E-1 in order, then redundant copies of 0, 1, ... (all redundant slots on the last ranks).
    - ``ascend``: the same table as vllm-ascend builds; it requires ``(E + R) % W == 0`` (always true here, since
      the topology has ``P = W * K``; use :meth:`Topology.from_redundant` to check a raw ``R``).
    - ``spread``: redundant slots spread evenly, the last slot(s) of each rank; each holds a copy of an expert
      whose primary lives half the group away, so no rank holds an expert twice when ``W > 1``.
    """
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise PlacementError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    check_topology(topology).check_experts(num_experts)
    num_physical = topology.num_physical
    if layout in ("vllm", "ascend"):
        return np.arange(num_physical, dtype=np.int64) % num_experts
    num_ranks, slots = topology.num_ranks, topology.slots_per_rank
    redundant = num_physical - num_experts
    extra = redundant // num_ranks + (np.arange(num_ranks) < redundant % num_ranks)  # redundant slots per rank
    primaries = slots - extra
    first = np.cumsum(primaries) - primaries  # first primary expert id of each rank
    table = np.empty((num_ranks, slots), dtype=np.int64)
    offset = max(1, num_ranks // 2)
    for rank in range(num_ranks):
        table[rank, : primaries[rank]] = first[rank] + np.arange(primaries[rank])
        source = (rank + offset) % num_ranks
        if primaries[source] > 0:
            copies = first[source] + np.arange(extra[rank]) % primaries[source]
        else:
            copies = np.arange(extra[rank]) % num_experts
        table[rank, primaries[rank]:] = copies
    return table.ravel()
