"""Placement: which logical expert sits in each physical slot, per MoE layer.

The canonical form is ``phy2log`` int64 ``[L, P]``; every other view (``log2phy``, ``replica_count``, per-rank
``expert_map``, per-rank replica choice) is derived from it and cached. Slot ``p`` lives on rank ``p // K``.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from eplb._arrays import to_int, to_int_array
from eplb.errors import PlacementError
from eplb.placement_rows import LAYOUTS, find_problems, initial_phy2log, layer_counts, shared_rank_experts
from eplb.topology import Topology, check_topology

__all__ = [
    "Placement",
    "Failover",
    "live_mask",
    "compute_log2phy",
    "find_problems",
    "shared_rank_experts",
    "initial_phy2log",
    "LAYOUTS",
]


def compute_log2phy(phy2log: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Logical-to-physical maps of ``phy2log`` (vLLM ``compute_logical_maps`` semantics).

    Args:
        phy2log: int ``[L, P]``; negative entries mark empty slots and are ignored.
        num_experts: E.

    Returns:
        ``log2phy`` int64 ``[L, E, M]``: physical slots of each expert in ascending order, padded with -1,
        ``M`` = the largest replica count (at least 1); ``replica_count`` int64 ``[L, E]``.
    """
    phy2log = np.asarray(phy2log, dtype=np.int64)
    num_layers, num_slots = phy2log.shape
    key = np.where(phy2log >= 0, phy2log, num_experts)  # empty slots sort last, into bucket E
    order = np.argsort(key, axis=1, kind="stable")
    sorted_key = np.take_along_axis(key, order, axis=1)
    counts = layer_counts(key, num_experts + 1)
    replica_count = counts[:, :num_experts].copy()
    width = max(int(replica_count.max(initial=0)), 1)
    starts = np.cumsum(counts, axis=1) - counts
    position = np.arange(num_slots)[None, :] - np.take_along_axis(starts, sorted_key, axis=1)
    log2phy = np.full((num_layers, num_experts + 1, width), -1, dtype=np.int64)
    real = sorted_key < num_experts
    rows = np.broadcast_to(np.arange(num_layers)[:, None], sorted_key.shape)
    log2phy[rows[real], sorted_key[real], position[real]] = order[real]
    return log2phy[:, :num_experts], replica_count


def _rank_mask(ranks, num_ranks: int, what: str) -> np.ndarray:
    """bool ``[W]`` from a bool mask ``[W]`` or an iterable of rank ids, checked."""
    if isinstance(ranks, (str, bytes)) or not (hasattr(ranks, "shape") or hasattr(ranks, "__iter__")):
        raise PlacementError(f"{what} must be rank ids (e.g. [0, 3]) or a bool mask of {num_ranks} ranks, "
                             f"got {ranks!r:.60}")
    arr = np.asarray(list(ranks) if not isinstance(ranks, np.ndarray) and not hasattr(ranks, "shape") else ranks)
    if arr.dtype == bool:
        if arr.shape != (num_ranks,):
            raise PlacementError(f"{what}: a mask must have one entry per rank ({num_ranks}), got shape {arr.shape}")
        return arr.copy()
    arr = to_int_array(arr, what, PlacementError).reshape(-1)
    bad = arr[(arr < 0) | (arr >= num_ranks)]
    if bad.size:
        raise PlacementError(f"{what}: rank {int(bad[0])} is out of range [0, {num_ranks})")
    mask = np.zeros(num_ranks, dtype=bool)
    mask[arr] = True
    return mask


def live_mask(live_ranks, num_ranks: int) -> np.ndarray:
    """bool ``[W]``: the live ranks, from a bool mask ``[W]`` or an iterable of live rank ids.

    Raises:
        PlacementError: a rank out of range, a mask of the wrong length, or no live rank at all.
    """
    mask = _rank_mask(live_ranks, num_ranks, "live ranks")
    if not mask.any():
        raise PlacementError(f"live ranks: no rank of {num_ranks} is live")
    return mask


class Placement:
    """A valid expert placement: ``phy2log`` int64 ``[L, P]`` over a :class:`Topology`.

    Immutable; derived views are computed on first use and cached.

    Args:
        phy2log: ``[L, P]`` (or ``[P]`` for one layer) logical expert id of every physical slot; numpy, list or torch.
        num_experts: E, logical experts per layer.
        topology: the cluster; ``P`` must equal ``topology.num_physical``.

    Raises:
        PlacementError: listing every problem (shape, ids out of range, experts without a replica).
    """

    def __init__(self, phy2log, num_experts: int, topology: Topology):
        arr = to_int_array(phy2log, "phy2log", PlacementError)
        if arr.ndim == 1:
            arr = arr[None, :]
        check_topology(topology).check_experts(num_experts)
        problems = find_problems(arr, num_experts, topology)
        if problems:
            raise PlacementError("invalid placement:\n  " + "\n  ".join(problems))
        self._set(arr, num_experts, topology)

    def _set(self, phy2log: np.ndarray, num_experts: int, topology: Topology) -> None:
        arr = np.array(phy2log, dtype=np.int64, copy=True)
        arr.flags.writeable = False
        self._phy2log = arr
        self._num_experts = int(num_experts)
        self._topology = topology

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_valid(cls, phy2log: np.ndarray, num_experts: int, topology: Topology) -> "Placement":
        """A placement of rows known to be valid for ``topology`` and ``num_experts`` (int ``[L, P]``, or ``[P]``:
        rows of validated placements, or their layers mixed), without checking them again. Internal: bad input
        takes the checked constructor."""
        placement = cls.__new__(cls)
        arr = np.asarray(phy2log)
        placement._set(arr[None, :] if arr.ndim == 1 else arr, num_experts, topology)
        return placement

    @classmethod
    def initial(cls, num_experts: int, topology: Topology, num_layers: int = 1, layout: str = "vllm") -> "Placement":
        """The engines' initial layout (see :func:`initial_phy2log`) repeated over ``num_layers`` layers."""
        num_layers = to_int(num_layers, "num_layers", PlacementError, minimum=1)
        row = initial_phy2log(num_experts, topology, layout)
        return cls(np.tile(row, (num_layers, 1)), num_experts, topology)

    @classmethod
    def from_rank_table(cls, table, num_experts: int | None = None, num_nodes: int = 1,
                        num_groups: int = 1) -> "Placement":
        """From a per-rank table ``[L, W, K]`` (or ``[W, K]``) as vllm-ascend and TensorRT-LLM store it.

        ``num_experts`` defaults to the largest id + 1.
        """
        arr = to_int_array(table, "rank table", PlacementError)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.size == 0:
            raise PlacementError(f"rank table must be [layers, ranks, slots], got shape {arr.shape}")
        num_layers, num_ranks, slots = arr.shape
        if num_experts is None:
            num_experts = int(arr.max()) + 1
        topology = Topology(num_ranks, slots, num_nodes, num_groups)
        return cls(arr.reshape(num_layers, num_ranks * slots), num_experts, topology)

    def replace_layers(self, layers, other: "Placement") -> "Placement":
        """A copy with the given layers (bool mask ``[L]`` or indices) taken from ``other``."""
        self._check_compatible(other)
        phy2log = self._phy2log.copy()
        try:
            phy2log[layers] = other.phy2log[layers]
        except (IndexError, TypeError, ValueError):
            raise PlacementError(f"layers must be layer indices in [0, {self.num_layers}) or a bool mask of "
                                 f"{self.num_layers} layers, got {layers!r:.60}") from None
        return Placement.from_valid(phy2log, self._num_experts, self._topology)

    # -- canonical data -----------------------------------------------------------------------------------------
    @property
    def phy2log(self) -> np.ndarray:
        """int64 ``[L, P]`` (read-only): logical expert in each physical slot."""
        return self._phy2log

    @property
    def num_experts(self) -> int:
        return self._num_experts

    @property
    def topology(self) -> Topology:
        return self._topology

    @property
    def num_layers(self) -> int:
        return self._phy2log.shape[0]

    @property
    def num_physical(self) -> int:
        return self._phy2log.shape[1]

    # -- derived views ------------------------------------------------------------------------------------------
    @cached_property
    def _logical_maps(self) -> tuple[np.ndarray, np.ndarray]:
        log2phy, count = compute_log2phy(self._phy2log, self._num_experts)
        log2phy.flags.writeable = False
        count.flags.writeable = False
        return log2phy, count

    @property
    def log2phy(self) -> np.ndarray:
        """int64 ``[L, E, max_replicas]``: physical slots of each expert, ascending, padded with -1."""
        return self._logical_maps[0]

    @cached_property
    def replica_count(self) -> np.ndarray:
        """int64 ``[L, E]``: number of physical replicas of each logical expert."""
        if "_logical_maps" in self.__dict__:
            return self._logical_maps[1]
        # one bincount, without the sort log2phy needs (rank loads ask only for this)
        count = layer_counts(self._phy2log, self._num_experts)
        count.flags.writeable = False
        return count

    @property
    def rank_of_slot(self) -> np.ndarray:
        """int64 ``[P]``: rank holding each physical slot."""
        return self._topology.rank_of_slot

    @property
    def rank_table(self) -> np.ndarray:
        """int64 ``[L, W, K]`` (read-only view): logical expert in each local slot of each rank."""
        t = self._topology
        return self._phy2log.reshape(self.num_layers, t.num_ranks, t.slots_per_rank)

    @cached_property
    def expert_maps(self) -> np.ndarray:
        """int64 ``[L, W, E]``: for each rank, the local slot of each logical expert or -1 (vllm-ascend convention).

        When a rank holds an expert twice, its lowest local slot is given.
        """
        table = self.rank_table
        num_layers, num_ranks, slots = table.shape
        out = np.full((num_layers, num_ranks, self._num_experts), -1, dtype=np.int64)
        layer_idx = np.arange(num_layers)[:, None]
        rank_idx = np.arange(num_ranks)[None, :]
        for k in range(slots - 1, -1, -1):  # descending, so the lowest local slot is written last and wins
            out[layer_idx, rank_idx, table[:, :, k]] = k
        out.flags.writeable = False
        return out

    def expert_map(self, rank: int) -> np.ndarray:
        """int64 ``[L, E]``: local slot of each logical expert on ``rank``, or -1 when it is not there."""
        return self.expert_maps[:, check_rank(rank, self._topology)]

    def log2phy_for_rank(self, rank: int, tp_size: int = 1) -> np.ndarray:
        """int64 ``[L, E]``: the physical slot ``rank`` sends each expert's tokens to (vllm-ascend rule).

        The replicas of expert ``e`` are taken in ascending slot (= rank) order; rank ``r`` picks replica
        ``r % count`` when ``tp_size == 1``, else ``(r % tp_size + r // tp_size + e) % count``.
        """
        tp_size = to_int(tp_size, "tp_size", PlacementError, minimum=1)
        return _replica_for_rank(self.log2phy, self.replica_count, check_rank(rank, self._topology), tp_size)

    def without_ranks(self, ranks) -> "Failover":
        """Immediate failover: the routing that serves every expert from its surviving replicas when ``ranks`` fail.

        Moves no weights. Experts whose every replica was on a failed rank are listed in :attr:`Failover.lost`;
        their tokens must wait until their weights are loaded again (a re-plan over the live ranks places them).

        Args:
            ranks: the failed ranks (an iterable of ints), or a bool mask ``[W]`` of failed ranks.
        """
        failed = _rank_mask(ranks, self._topology.num_ranks, "failed ranks")
        return Failover(self, failed)

    def moves_to(self, other: "Placement") -> np.ndarray:
        """bool ``[L, P]``: slots whose logical expert differs in ``other``. ``.sum(1)`` counts moves per layer."""
        self._check_compatible(other)
        return self._phy2log != other.phy2log

    def problems(self, allow_shared_rank: bool = True) -> list[str]:
        """Readable problems of this placement; the only possible ones are shared ranks when not allowed."""
        return find_problems(self._phy2log, self._num_experts, self._topology, allow_shared_rank)

    def validate(self, allow_shared_rank: bool = True) -> "Placement":
        """Return ``self`` or raise :class:`PlacementError` listing every problem."""
        problems = self.problems(allow_shared_rank)
        if problems:
            raise PlacementError("invalid placement:\n  " + "\n  ".join(problems))
        return self

    # -- helpers ------------------------------------------------------------------------------------------------
    def _check_compatible(self, other: "Placement") -> None:
        if not isinstance(other, Placement):
            raise PlacementError(f"the other placement must be an eplb.Placement, got {type(other).__name__}")
        if other.phy2log.shape != self._phy2log.shape or other.num_experts != self._num_experts:
            raise PlacementError(
                f"placements differ in shape: {self._phy2log.shape} with {self._num_experts} experts vs "
                f"{other.phy2log.shape} with {other.num_experts} experts"
            )

    def __eq__(self, other) -> bool:
        return (isinstance(other, Placement) and self._topology == other._topology
                and self._num_experts == other._num_experts and np.array_equal(self._phy2log, other._phy2log))

    __hash__ = None

    def __repr__(self) -> str:
        return (f"Placement(layers={self.num_layers}, experts={self._num_experts}, "
                f"{self._topology.describe()})")


class Failover:
    """The routing of a :class:`Placement` after some ranks failed, before any weight moves
    (:meth:`Placement.without_ranks`).

    It offers the routing views of a placement restricted to the surviving slots, so the router and the simulator
    can use it in place of the placement in the same step the failure is known. No view ever names a slot of a
    failed rank; an expert with no survivor has ``replica_count`` 0 and routes to -1.

    Attributes:
        placement: the placement in force when the ranks failed.
        failed: bool ``[W]``, failed ranks.
    """

    def __init__(self, placement: Placement, failed: np.ndarray):
        self.placement = placement
        self.failed = np.array(failed, dtype=bool)
        self.failed.flags.writeable = False
        masked = np.where(self.failed[placement.rank_of_slot][None, :], -1, placement.phy2log)
        log2phy, count = compute_log2phy(masked, placement.num_experts)
        log2phy.flags.writeable = False
        count.flags.writeable = False
        self._log2phy, self._count = log2phy, count

    @property
    def topology(self) -> Topology:
        return self.placement.topology

    @property
    def num_experts(self) -> int:
        return self.placement.num_experts

    @property
    def num_layers(self) -> int:
        return self.placement.num_layers

    @property
    def rank_of_slot(self) -> np.ndarray:
        return self.placement.rank_of_slot

    @property
    def live(self) -> np.ndarray:
        """bool ``[W]``: ranks still serving."""
        return ~self.failed

    @property
    def log2phy(self) -> np.ndarray:
        """int64 ``[L, E, M]``: surviving slots of each expert, ascending, padded with -1."""
        return self._log2phy

    @property
    def replica_count(self) -> np.ndarray:
        """int64 ``[L, E]``: surviving replicas of each expert (0: lost)."""
        return self._count

    @cached_property
    def lost_mask(self) -> np.ndarray:
        """bool ``[L, E]``: experts with no surviving replica."""
        out = self._count == 0
        out.flags.writeable = False
        return out

    @property
    def lost(self) -> np.ndarray:
        """int64 ``[n, 2]``: ``(layer, expert)`` of every expert with no surviving replica; their weights must be
        loaded from a checkpoint or a host copy before they can serve."""
        return np.argwhere(self.lost_mask).astype(np.int64).reshape(-1, 2)

    def log2phy_for_rank(self, rank: int, tp_size: int = 1) -> np.ndarray:
        """int64 ``[L, E]``: the surviving slot ``rank`` sends each expert's tokens to, -1 for a lost expert.

        The rule of :meth:`Placement.log2phy_for_rank` applied to the surviving replicas.
        """
        rank = check_rank(rank, self.placement.topology)
        tp_size = to_int(tp_size, "tp_size", PlacementError, minimum=1)
        return _replica_for_rank(self._log2phy, np.maximum(self._count, 1), rank, tp_size)

    def rank_share(self) -> np.ndarray:
        """float64 ``[L, E, W]``: share of expert ``e``'s tokens each rank serves when they are split evenly over
        the surviving replicas; all zero for a lost expert (its tokens wait)."""
        placement = self.placement
        num_layers, num_ranks = placement.num_layers, placement.topology.num_ranks
        share = np.zeros((num_layers, placement.num_experts, num_ranks))
        alive = ~self.failed[placement.rank_of_slot]
        count = np.take_along_axis(self._count, placement.phy2log, axis=1)  # [L, P]
        weight = np.where(alive[None, :], 1.0 / np.maximum(count, 1), 0.0)
        layer_idx = np.broadcast_to(np.arange(num_layers)[:, None], placement.phy2log.shape)
        rank_idx = np.broadcast_to(placement.rank_of_slot[None, :], placement.phy2log.shape)
        np.add.at(share, (layer_idx, placement.phy2log, rank_idx), weight)
        return share

    def rank_loads(self, window: np.ndarray) -> np.ndarray:
        """float64 ``[L, W]``: tokens each rank serves for a window load ``[L, E]`` (failed ranks: 0)."""
        window = np.asarray(window, dtype=np.float64)
        return np.matmul(window[:, None, :], self.rank_share())[:, 0, :]

    def waiting(self, window: np.ndarray) -> np.ndarray:
        """float64 ``[L]``: tokens of a window load ``[L, E]`` routed to lost experts."""
        return (np.asarray(window, dtype=np.float64) * self.lost_mask).sum(axis=-1)

    def __repr__(self) -> str:
        return (f"Failover(failed ranks={np.flatnonzero(self.failed).tolist()}, lost={len(self.lost)}, "
                f"{self.placement!r})")


def check_rank(rank: int, topology: Topology) -> int:
    """``rank`` as an int when it is a rank of ``topology``, else a :class:`PlacementError`."""
    rank = to_int(rank, "rank", PlacementError)
    if not 0 <= rank < topology.num_ranks:
        raise PlacementError(f"rank must be in [0, {topology.num_ranks}), got {rank}")
    return int(rank)


def _replica_for_rank(log2phy: np.ndarray, count: np.ndarray, rank: int, tp_size: int) -> np.ndarray:
    """int64 ``[L, E]``: the replica (in ``log2phy`` ``[L, E, M]``, ascending slots) ``rank`` picks for each expert:
    ``rank % count``, or with ``tp_size > 1`` vllm-ascend's ``(rank % tp + rank // tp + e) % count``."""
    if tp_size < 1:
        raise PlacementError(f"tp_size must be >= 1, got {tp_size}")
    if tp_size == 1:
        index = rank % count
    else:
        experts = np.arange(log2phy.shape[1])[None, :]
        index = (rank % tp_size + rank // tp_size + experts) % count
    return np.take_along_axis(log2phy, index[:, :, None], axis=2)[:, :, 0]
