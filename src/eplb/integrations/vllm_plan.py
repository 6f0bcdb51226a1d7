"""vLLM's ``rebalance_experts`` arguments turned into an eplb plan: the half of the vLLM adapter that loads numpy
and the policies, imported by :class:`eplb.integrations.vllm.VllmPolicy` at its first plan."""

from __future__ import annotations

import numpy as np

from eplb._arrays import like_input, to_int_array
from eplb.errors import PolicyError
from eplb.load import as_load
from eplb.placement import Placement
from eplb.policies import get_policy
from eplb.policies.default import check_sizes
from eplb.policies.shared.resilience import repair_current
from eplb.policies.shared.retention import preserve_slots
from eplb.topology import Topology

__all__ = ["plan_phy2log"]


def plan_phy2log(policy_name: str, policy_options: dict, weight, num_replicas: int, num_groups: int, num_nodes: int,
                 num_ranks: int, old_global_expert_indices=None):
    """``phy2log`` ``[L, num_replicas]`` planned by policy ``policy_name``; arguments as
    :meth:`eplb.integrations.vllm.VllmPolicy.rebalance_experts` documents them."""
    load = as_load(weight, field="weight")
    if load.ndim != 2:
        raise PolicyError(f"weight must be [layers, experts], got shape {list(load.shape)}")
    num_layers, num_experts = load.shape
    check_sizes(num_experts, num_replicas, num_groups, num_nodes, num_ranks, ranks_name="num_ranks")
    if num_experts % num_groups and num_groups % num_nodes:
        num_groups = 1
    topology = Topology(int(num_ranks), int(num_replicas // num_ranks), int(num_nodes), int(num_groups))
    old = None
    if old_global_expert_indices is not None:
        old = _old_map(old_global_expert_indices, num_layers, num_experts, int(num_replicas))
    current = None if old is None else _start_from(old, load, topology)
    policy = get_policy(policy_name, **policy_options)
    phy2log = policy.rebalance(load, topology, current=current).placement.phy2log
    if old is not None:
        # vLLM copies nothing for an expert that keeps its slot; the policy's retention worked on the repaired
        # start, so put the experts the engine really holds back in their slots (rank loads do not change)
        phy2log = preserve_slots(phy2log, np.where(old < 0, num_experts, old), topology.num_ranks)
    return like_input(np.array(phy2log, dtype=np.int64), weight)  # a writable copy: the caller owns it


def _old_map(value, num_layers: int, num_experts: int, num_replicas: int) -> np.ndarray:
    """``old_global_expert_indices`` checked and fitted to ``num_replicas`` columns (``-1`` for new slots)."""
    old = to_int_array(value, "old_global_expert_indices", PolicyError)
    if old.ndim != 2 or old.shape[0] != num_layers:
        raise PolicyError(f"old_global_expert_indices must be [layers={num_layers}, physical experts], got shape "
                          f"{list(old.shape)}")
    bad = np.argwhere((old < -1) | (old >= num_experts))
    if len(bad):
        layer, slot = bad[0]
        raise PolicyError(f"old_global_expert_indices[{layer}, {slot}] = {old[layer, slot]}: expected an expert id "
                          f"in [0, {num_experts}) or -1 (empty slot)")
    if old.shape[1] >= num_replicas:  # elastic scale-down keeps the first ranks
        return old[:, :num_replicas].copy()
    return np.pad(old, ((0, 0), (0, num_replicas - old.shape[1])), constant_values=-1)


def _start_from(old: np.ndarray, load: np.ndarray, topology: Topology) -> Placement:
    """A complete placement close to ``old`` (``[L, P]``, ``-1`` = empty) for the policy to start from.

    Empty slots take the experts that have no slot (hottest first), then extra replicas of the experts with the
    most load per replica; experts still without a slot (their ranks were removed) take a spare replica's slot.
    """
    num_experts = load.shape[1]
    start = old.copy()
    for layer in np.flatnonzero((start < 0).any(axis=1)):
        row, weight = start[layer], load[layer]
        count = np.bincount(row[row >= 0], minlength=num_experts)
        empty = np.flatnonzero(row < 0)
        missing = np.flatnonzero(count == 0)
        missing = missing[np.argsort(-weight[missing], kind="stable")][:empty.size]
        row[empty[:missing.size]] = missing
        count[missing] += 1
        for slot in empty[missing.size:]:
            expert = int(np.argmax(weight / count))
            row[slot] = expert
            count[expert] += 1
    return Placement(repair_current(start, load), num_experts, topology)
