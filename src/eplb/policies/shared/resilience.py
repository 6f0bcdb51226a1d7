"""Planning for failures: placing on the live ranks only, and spreading replicas so one failure loses no expert.

Both are applied by :meth:`eplb.policies.base.Policy.rebalance` around any policy's ``place``, so every registered
policy honours them without knowing about them:

- :func:`live_topology` / :func:`repair_current`: a policy plans on the sub-topology of the live ranks (their slots
  in rank order), starting from the current placement's live slots with every expert that only lived on a failed rank
  put back in a slot of an expert that has a replica to spare. The result is embedded into the full slot layout; the
  failed ranks' slots keep what they held (a filler that no failover route reaches, and that moves no weights).
- :func:`make_resilient`: after the policy, the hottest experts get a minimum number of replicas (slots taken from
  the experts whose per-replica load grows least), then replicas of one expert are moved apart by swapping slots of
  similar per-replica load, so that an expert with two or more replicas has them on distinct ranks and, when the
  cluster has several nodes, on at least two nodes. Swaps keep every replica count, so the balance changes only by
  the small load differences of the swapped slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eplb.errors import PolicyError
from eplb.topology import Topology

__all__ = ["Resilience", "live_topology", "repair_current", "reload_lost", "make_resilient", "check_capacity"]

_NAMED = 8  # experts / layers named in an error


@dataclass(frozen=True)
class Resilience:
    """The resilience option of :meth:`~eplb.policies.base.Policy.rebalance`.

    Attributes:
        spread_nodes: put the replicas of an expert on at least two nodes when the cluster has several.
        min_replicas: the replicas the ``hot_experts`` hottest experts of each layer get at least (1: no minimum).
        hot_experts: how many of the hottest experts of each layer ``min_replicas`` applies to.
    """

    spread_nodes: bool = True
    min_replicas: int = 1
    hot_experts: int = 0

    def __post_init__(self):
        if not isinstance(self.min_replicas, (int, np.integer)) or self.min_replicas < 1:
            raise PolicyError(f"resilience min_replicas must be an integer >= 1, got {self.min_replicas!r}")
        if not isinstance(self.hot_experts, (int, np.integer)) or self.hot_experts < 0:
            raise PolicyError(f"resilience hot_experts must be an integer >= 0, got {self.hot_experts!r}")


def live_topology(topology: Topology, live: np.ndarray) -> Topology:
    """The topology of the live ranks (bool ``[W]``), in rank order.

    Nodes are kept when every node with a live rank has the same number of live ranks; otherwise the sub-topology
    has one node (a topology needs equal nodes), so node-aware policies plan it as flat.
    """
    per_node = np.bincount(topology.node_of_rank[live], minlength=topology.num_nodes)
    per_node = per_node[per_node > 0]
    nodes = per_node.size if np.all(per_node == per_node[0]) else 1
    return Topology(int(live.sum()), topology.slots_per_rank, nodes, topology.num_groups)


def check_capacity(window: np.ndarray, topology: Topology, live: np.ndarray) -> None:
    """Raise :class:`PolicyError` naming the experts that cannot be placed when the live slots are fewer than the
    experts. ``window`` float ``[L, E]``: the coldest experts of each layer are the ones named."""
    num_layers, num_experts = window.shape
    slots = int(live.sum()) * topology.slots_per_rank
    if slots >= num_experts:
        return
    short = num_experts - slots
    lines = []
    for layer in range(min(num_layers, _NAMED)):
        coldest = np.argsort(window[layer], kind="stable")[:short]
        names = ", ".join(str(e) for e in np.sort(coldest)[:_NAMED]) + (" ..." if short > _NAMED else "")
        lines.append(f"layer {layer}: experts {names}")
    more = f"\n  ... and {num_layers - _NAMED} more layers" if num_layers > _NAMED else ""
    failed = np.flatnonzero(~live).tolist()
    raise PolicyError(
        f"cannot place {num_experts} experts on {int(live.sum())} live ranks x {topology.slots_per_rank} slots = "
        f"{slots} slots (failed ranks {failed}): {short} experts per layer would have no slot; the coldest, which "
        f"cannot be placed:\n  " + "\n  ".join(lines) + more)


def repair_current(phy2log: np.ndarray, window: np.ndarray) -> np.ndarray:
    """int64 ``[L, S]``: the live slots ``phy2log`` ``[L, S]`` (ids, -1 nowhere) with every missing expert put back.

    Each missing expert, hottest first, takes a slot of the expert with a spare replica (count >= 2) whose per-replica
    load grows least (``load / (count - 1)``; ties to the lower id), on that expert's rank-order last slot. Needs
    ``S >= E`` (see :func:`check_capacity`).
    """
    out = np.array(phy2log, dtype=np.int64, copy=True)
    num_layers, num_experts = window.shape
    for layer in range(num_layers):
        row, load = out[layer], window[layer]
        count = np.bincount(row, minlength=num_experts)
        missing = np.flatnonzero(count == 0)
        for expert in missing[np.argsort(-load[missing], kind="stable")]:
            cost = np.where(count >= 2, load / np.maximum(count - 1, 1), np.inf)
            donor = int(np.argmin(cost))
            slot = int(np.flatnonzero(row == donor)[-1])
            row[slot] = expert
            count[donor] -= 1
            count[expert] += 1
    return out


def reload_lost(phy2log: np.ndarray, window: np.ndarray, topology: Topology, live: np.ndarray) -> np.ndarray:
    """int64 ``[L, P]``: ``phy2log`` with every expert that has no replica on the ``live`` ranks (bool ``[W]``) put
    into a live slot by :func:`repair_current`; the failed ranks' slots are unchanged. What the runtime loads from a
    checkpoint right after a failure, and what a plan over the live ranks starts from.

    Raises:
        PolicyError: the live slots are fewer than the experts (see :func:`check_capacity`).
    """
    check_capacity(window, topology, live)
    live_slots = live[topology.rank_of_slot]
    out = np.array(phy2log, dtype=np.int64, copy=True)
    out[:, live_slots] = repair_current(out[:, live_slots], window)
    return out


def make_resilient(phy2log: np.ndarray, window: np.ndarray, topology: Topology, option: Resilience,
                   node_of_rank: np.ndarray | None = None) -> np.ndarray:
    """int64 ``[L, P]``: ``phy2log`` with the hottest experts' minimum replicas and the replicas spread apart.

    Args:
        phy2log: int ``[L, P]`` a valid placement on ``topology``.
        window: float ``[L, E]`` planning load (hotness and per-replica load).
        topology: the cluster (the live sub-topology when planning around failures).
        option: what to guarantee.
        node_of_rank: int ``[W]`` the node of each rank when it is not ``topology``'s (the live ranks of a cluster
            with unequal nodes left).
    """
    out = np.array(phy2log, dtype=np.int64, copy=True)
    node_of_rank = topology.node_of_rank if node_of_rank is None else np.asarray(node_of_rank, dtype=np.int64)
    _, node_of_rank = np.unique(node_of_rank, return_inverse=True)  # nodes numbered 0.. without gaps
    node_of_rank = node_of_rank.reshape(-1)
    spread_nodes = option.spread_nodes and node_of_rank.max() > 0
    for layer in range(out.shape[0]):
        load = np.asarray(window[layer], dtype=np.float64)
        if option.min_replicas > 1 and option.hot_experts > 0:
            _raise_hot(out[layer], load, option.min_replicas, option.hot_experts, topology)
        _spread(out[layer], load, topology, node_of_rank, spread_nodes)
    return out


def _raise_hot(row: np.ndarray, load: np.ndarray, min_replicas: int, hot: int, topology: Topology) -> None:
    """Give the ``hot`` hottest experts ``min_replicas`` replicas each, in place, taking spare slots."""
    num_experts = load.size
    rank = topology.rank_of_slot
    floor = np.ones(num_experts, dtype=np.int64)
    hottest = np.argsort(-load, kind="stable")[:hot]
    floor[hottest] = min_replicas
    count = np.bincount(row, minlength=num_experts)
    for expert in hottest:
        while count[expert] < min_replicas:
            cost = np.where(count > floor, load / np.maximum(count - 1, 1), np.inf)
            if not np.isfinite(cost).any():
                return  # no spare slot left: the slot budget does not allow more
            donor = int(np.argmin(cost))
            slots = np.flatnonzero(row == donor)
            holds = np.isin(rank[slots], rank[row == expert])
            slot = int(slots[np.lexsort((slots, holds))[0]])  # prefer a rank that does not hold the expert yet
            row[slot] = expert
            count[donor] -= 1
            count[expert] += 1


def _spread(row: np.ndarray, load: np.ndarray, topology: Topology, node_of_rank: np.ndarray, nodes: bool) -> None:
    """Move replicas apart in place: distinct ranks for the replicas of one expert, and two nodes when ``nodes``.

    Repeats, hottest expert first, a swap of one replica on a crowded rank (or on the expert's only node) with the
    slot of closest per-replica load elsewhere whose expert stays spread after the swap.
    """
    num_experts = load.size
    rank = topology.rank_of_slot
    node = node_of_rank[rank]
    count = np.bincount(row, minlength=num_experts)
    weight = load / np.maximum(count, 1)
    order = np.argsort(-load, kind="stable")
    for expert in order[count[order] >= 2]:
        for _ in range(int(count[expert]) * 2):
            slots = np.flatnonzero(row == expert)
            ranks = rank[slots]
            crowded = np.bincount(ranks, minlength=topology.num_ranks)
            one_node = nodes and np.unique(node[slots]).size < 2
            if crowded.max() < 2 and not one_node:
                break
            source = int(slots[np.argmax(crowded[ranks])])  # a replica on the most crowded rank
            target = _swap_target(row, source, expert, rank, node, count, weight, one_node)
            if target is None and one_node:
                target = _swap_target(row, source, expert, rank, node, count, weight, False)
            if target is None:
                break
            row[source], row[target] = row[target], row[source]


def _swap_target(row, source, expert, rank, node, count, weight, other_node: bool):
    """The slot to swap with ``source`` (a replica of ``expert``), or None.

    The slot must lie on a rank that does not hold ``expert`` (on another node when ``other_node``) and hold an
    expert that, moved to ``source``'s rank, keeps distinct ranks and does not end up on one node only.
    """
    num_ranks = int(rank.max()) + 1
    num_nodes = int(node.max()) + 1
    holds = np.zeros(num_ranks, dtype=bool)
    holds[rank[row == expert]] = True
    ok = ~holds[rank] & (row != expert)
    if other_node:
        ok &= node != node[source]
    # the other expert f = row[q] moves to source's rank: f must not be there already, unless f has more replicas
    # than there are ranks (it shares a rank whatever we do) and still holds two ranks after the swap
    f_on_rank = np.zeros((count.size, num_ranks), dtype=np.int64)
    np.add.at(f_on_rank, (row, rank), 1)
    joins = f_on_rank[row, rank[source]] == 0
    ranks_after = (f_on_rank[row] > 0).sum(axis=1) - (f_on_rank[row, rank] == 1) + joins
    ok &= joins | ((count[row] > num_ranks) & (ranks_after >= 2))
    # and f with >= 2 replicas keeps one off source's node when it had one (only checked when nodes matter)
    if num_nodes > 1:
        f_on_node = np.zeros((count.size, num_nodes), dtype=np.int64)
        np.add.at(f_on_node, (row, node), 1)
        off_before = count[row] - f_on_node[row, node[source]]  # f's replicas not on source's node
        off_after = off_before - (node != node[source])
        ok &= (count[row] < 2) | (off_after >= 1) | (off_before == 0)
    candidates = np.flatnonzero(ok)
    if candidates.size == 0:
        return None
    gap = np.abs(weight[row[candidates]] - weight[expert])
    return int(candidates[np.lexsort((candidates, gap))[0]])
