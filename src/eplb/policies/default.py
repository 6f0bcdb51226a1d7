"""``default`` (vllm-ascend id 1): DeepSeek's EPLB algorithm, output-identical to the reference, vectorised.

Hierarchical mode (``num_groups % num_nodes == 0``): expert groups are packed onto nodes by total load, each node
replicates its experts into its share of the slots (the next replica always goes to the largest load per replica),
and the replicas are packed onto the node's ranks by load per replica. Global mode is the same routine with one
group and one node. Every step loops over the items of one row and works on all layers (and nodes) at once, in
float32 like the reference, so ties break the same way.

:func:`rebalance_experts` is a drop-in for DeepSeek's function of the same name.
"""

from __future__ import annotations

import numpy as np

from eplb._arrays import like_input, to_bool, to_int
from eplb.errors import PolicyError
from eplb.load import as_load
from eplb.placement import Placement
from eplb.policies.base import Policy
from eplb.policies.shared.packing import balanced_packing, replicate, spread_duplicates
from eplb.policies.shared.retention import match_ranks
from eplb.topology import Topology

__all__ = ["DefaultPolicy", "POLICY", "rebalance_experts", "deepseek_placement", "check_sizes", "MODES"]

MODES = ("auto", "hierarchical", "global")


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of permutations ``[X, n]``."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _hierarchical(weight: np.ndarray, num_slots: int, num_groups: int, num_nodes: int, num_ranks: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    num_layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_experts // num_nodes
    slots_per_rank = num_slots // num_ranks

    # 1. groups onto nodes; "mlog" numbers experts node by node
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(axis=2)
    group_node, group_rank = balanced_packing(group_load, num_nodes)
    first = (group_node * groups_per_node + group_rank) * group_size
    log2mlog = (first[:, :, None] + np.arange(group_size)).reshape(num_layers, num_experts)
    mlog2log = _inverse(log2mlog)

    # 2. replicas within each node
    node_load = np.take_along_axis(weight, mlog2log, axis=1).reshape(num_layers * num_nodes, experts_per_node)
    phy2mlog, phy_rank, mlog_count = replicate(node_load, num_slots // num_nodes)

    # 3. replicas onto the node's ranks
    replica_load = np.take_along_axis(node_load / mlog_count.astype(weight.dtype), phy2mlog, axis=1)
    rank, rank_slot = balanced_packing(replica_load, num_ranks // num_nodes)
    pphy2phy = _inverse(rank * slots_per_rank + rank_slot)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1).reshape(num_layers, num_nodes, -1)
    pphy2mlog = (pphy2mlog + (np.arange(num_nodes) * experts_per_node)[:, None]).reshape(num_layers, num_slots)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    replica_rank = np.take_along_axis(phy_rank, pphy2phy, axis=1).reshape(num_layers, num_slots)
    replica_count = np.take_along_axis(mlog_count.reshape(num_layers, num_experts), log2mlog, axis=1)
    return phy2log, replica_rank, replica_count


def check_sizes(num_experts: int, num_slots: int, num_groups: int, num_nodes: int, num_ranks: int,
                ranks_name: str = "num_gpus") -> None:
    """Raise :class:`PolicyError` when DeepSeek's sizes do not fit together, in the engine's argument names
    (``num_replicas``, ``num_groups``, ``num_nodes`` and ``ranks_name``: DeepSeek says ``num_gpus``, vLLM
    ``num_ranks``)."""
    for name, value in (("num_replicas", num_slots), ("num_groups", num_groups), ("num_nodes", num_nodes),
                        (ranks_name, num_ranks)):
        to_int(value, name, PolicyError, minimum=1)
    if num_ranks % num_nodes:
        raise PolicyError(f"{ranks_name}={num_ranks} must be a multiple of num_nodes={num_nodes}")
    if num_slots % num_ranks:
        raise PolicyError(f"num_replicas={num_slots} must be a multiple of {ranks_name}={num_ranks}")
    if num_slots < num_experts:
        raise PolicyError(f"num_replicas={num_slots} cannot hold the {num_experts} experts of weight")


def deepseek_placement(weight, num_slots: int, num_groups: int, num_nodes: int, num_ranks: int,
                       mode: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek EPLB on numpy.

    Args:
        weight: ``[L, E]`` expert load (any real dtype; computed in float32 like the reference).
        num_slots: P physical slots, a multiple of ``num_ranks``, >= E.
        num_groups: G expert groups, dividing E (in hierarchical mode).
        num_nodes: N nodes, dividing ``num_ranks``.
        num_ranks: W ranks (GPUs).
        mode: ``auto`` (hierarchical when ``G % N == 0``, else global), ``hierarchical`` or ``global``.

    Returns:
        ``phy2log`` int64 ``[L, P]``, ``replica_rank`` int64 ``[L, P]`` (creation order of each slot's replica
        among its expert's replicas), ``replica_count`` int64 ``[L, E]``.

    Raises:
        PolicyError: sizes that do not fit together, or ``hierarchical`` with ``G % N != 0``.
    """
    weight = np.asarray(weight).astype(np.float32)
    num_experts = weight.shape[1]
    check_sizes(num_experts, num_slots, num_groups, num_nodes, num_ranks)
    if mode not in MODES:
        raise PolicyError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    hierarchical = num_groups % num_nodes == 0
    if mode == "hierarchical" and not hierarchical:
        raise PolicyError(f"hierarchical mode needs num_groups % num_nodes == 0, got {num_groups} groups on "
                          f"{num_nodes} nodes")
    if mode == "global" or not hierarchical:
        return _hierarchical(weight, num_slots, 1, 1, num_ranks)
    if num_experts % num_groups:
        raise PolicyError(f"num_groups={num_groups} must divide the {num_experts} logical experts in "
                          "hierarchical mode")
    return _hierarchical(weight, num_slots, num_groups, num_nodes, num_ranks)


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    """Drop-in for DeepSeek's ``eplb.rebalance_experts``, with identical output.

    Args:
        weight: ``[L, E]`` expert load, numpy or torch.
        num_replicas: P physical slots (a multiple of ``num_gpus``, >= E).
        num_groups: G expert groups (dividing E when hierarchical); hierarchical when ``G % num_nodes == 0``, else global.
        num_nodes: N nodes (dividing ``num_gpus``).
        num_gpus: W ranks.

    Returns:
        ``phy2log`` int64 ``[L, P]``; ``log2phy`` int64 ``[L, E, M]``, column ``r`` the slot of the ``r``-th
        replica in creation order, -1 padded, ``M`` the largest replica count; ``logcnt`` int64 ``[L, E]``.
        Torch tensors (on the device of ``weight``) when ``weight`` is a tensor, else numpy arrays.
    """
    load = as_load(weight, field="weight")
    if load.ndim != 2:
        raise PolicyError(f"weight must be [layers, experts], got shape {load.shape}")
    sizes = [to_int(value, name, PolicyError, minimum=1) for name, value in (
        ("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes), ("num_gpus", num_gpus))]
    phy2log, replica_rank, replica_count = deepseek_placement(load, *sizes)
    num_layers, num_slots = phy2log.shape
    log2phy = np.full((num_layers, load.shape[1], int(replica_count.max())), -1, dtype=np.int64)
    layer = np.broadcast_to(np.arange(num_layers)[:, None], phy2log.shape)
    log2phy[layer, phy2log, replica_rank] = np.arange(num_slots)
    return tuple(like_input(a, weight) for a in (phy2log, log2phy, replica_count))


def _replace_shared_copies(phy2log: np.ndarray, window: np.ndarray, num_ranks: int) -> np.ndarray:
    """``phy2log`` with every copy of an expert that its rank already holds given to the expert with the most load
    per replica that the rank does not hold (rare: only experts with more replicas than ranks are left shared)."""
    num_layers, num_slots = phy2log.shape
    slots = num_slots // num_ranks
    table = phy2log.reshape(num_layers, num_ranks, slots)
    ordered = np.sort(table, axis=2)
    layers = np.flatnonzero((ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=(1, 2)))
    if not layers.size:
        return phy2log
    table = table.copy()
    for layer in layers:
        count = np.bincount(table[layer].ravel(), minlength=window.shape[1])
        for rank in range(num_ranks):
            row = table[layer, rank]
            for slot in range(1, slots):
                if row[slot] in row[:slot]:
                    per_replica = window[layer] / count
                    per_replica[row] = -np.inf
                    expert = int(np.argmax(per_replica))
                    if per_replica[expert] == -np.inf:  # the rank holds every expert: more slots than experts
                        continue
                    count[row[slot]] -= 1
                    count[expert] += 1
                    row[slot] = expert
    return table.reshape(num_layers, num_slots)


class DefaultPolicy(Policy):
    """DeepSeek's EPLB (vllm-ascend id 1).

    Args:
        mode: ``auto`` (hierarchical when the topology's groups divide evenly over its nodes, else global),
            ``hierarchical`` or ``global``.
        retain_slots: when ``current`` is given, relabel ranks (in hierarchical mode whole nodes, then ranks within
            their node) and reorder slots inside ranks so experts already in place stay there (rank matching plus
            vLLM's ``preserve_intragpu_slots``, see :mod:`eplb.policies.shared.retention`); rank loads are unchanged.
        allow_shared_rank: DeepSeek may put two replicas of an expert on one rank. ``False`` (vllm-ascend's rule)
            swaps the extra copies with slots of other ranks (of the same node in hierarchical mode), picking the
            swap that raises the pair's peak least; a copy no swap can place (an expert with more replicas than
            there are ranks) becomes a replica of the expert with the most load per replica that the rank lacks.
            Output then differs from the reference.
    """

    name = "default"

    def __init__(self, mode: str = "auto", retain_slots: bool = True, allow_shared_rank: bool = True):
        if mode not in MODES:
            raise PolicyError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.retain_slots = to_bool(retain_slots, "retain_slots", PolicyError)
        self.allow_shared_rank = to_bool(allow_shared_rank, "allow_shared_rank", PolicyError)

    def place(self, load: np.ndarray, topology: Topology, current: Placement | None, window: np.ndarray
              ) -> np.ndarray:
        t = topology
        hierarchical = self.mode != "global" and t.num_groups % t.num_nodes == 0
        phy2log, _, replica_count = deepseek_placement(window, t.num_physical, t.num_groups, t.num_nodes,
                                                       t.num_ranks, "hierarchical" if hierarchical else self.mode)
        if not self.allow_shared_rank:
            per_replica = np.take_along_axis(window / replica_count, phy2log, axis=1)
            phy2log = spread_duplicates(phy2log, per_replica, t.num_ranks,
                                        t.ranks_per_node if hierarchical else t.num_ranks)
            phy2log = _replace_shared_copies(phy2log, window, t.num_ranks)
        if current is None or not self.retain_slots:
            return phy2log
        if hierarchical:
            return match_ranks(phy2log, current.phy2log, t.num_ranks, t.num_nodes)
        return match_ranks(phy2log, current.phy2log, t.num_ranks, across_nodes=True)

    def __repr__(self) -> str:
        return (f"DefaultPolicy(mode={self.mode!r}, retain_slots={self.retain_slots}, "
                f"allow_shared_rank={self.allow_shared_rank})")


POLICY = DefaultPolicy
