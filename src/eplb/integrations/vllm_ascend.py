"""vllm-ascend adapter: ``rebalance_experts(current_expert_table, expert_workload) -> (changed, priority, table)``.

vllm-ascend's EPLB worker builds a policy object from its factory and calls this method with the per-rank table and
the load recorded per physical slot. It then checks the new table layer by layer and silently keeps the old one for
a layer where an expert is missing, an NPU holds an expert twice, or an expert that stays on an NPU changes its
local slot. :class:`AscendPolicy` gives any eplb policy that interface and returns tables that pass the check: the
policy is asked not to share a rank (:func:`ascend_policy`), and experts that stay on a rank are put back in their
slot (a reorder within each rank, so the plan's balance is unchanged)::

    from eplb.integrations import AscendPolicy
    policy = AscendPolicy("flashlb")            # or AscendPolicy(3), vllm-ascend's policy type
    changed, priority, new_table = policy.rebalance_experts(current_expert_table, expert_workload)
"""

from __future__ import annotations

import inspect

import numpy as np

from eplb._arrays import like_input, to_int_array, to_numpy
from eplb.errors import LoadError, PlacementError
from eplb.load import as_load
from eplb.placement import Placement
from eplb.policies import Policy, get_policy
from eplb.policies.shared.retention import preserve_slots
from eplb.topology import Topology

__all__ = ["AscendPolicy", "rebalance_experts", "logical_load", "ascend_policy"]


def ascend_policy(name: str | int, **options) -> Policy:
    """``get_policy(name, **options)``, but a policy that can keep replicas off shared ranks is asked to, unless
    ``options`` say otherwise: vllm-ascend does not allow an expert twice on one rank."""
    policy = get_policy(name, **options)
    if policy.allow_shared_rank and "allow_shared_rank" not in options and \
            "allow_shared_rank" in inspect.signature(type(policy)).parameters:
        policy = get_policy(name, allow_shared_rank=False, **options)
    return policy


def logical_load(table: np.ndarray, workload: np.ndarray, num_experts: int) -> np.ndarray:
    """Fold a per-slot load onto logical experts.

    Args:
        table: int ``[L, W, K]``, logical expert in each slot of each rank.
        workload: ``[L, W, K]`` or ``[T, L, W, K]`` tokens served by each slot.
        num_experts: E.

    Returns:
        float64 ``[L, E]`` or ``[T, L, E]``: tokens per logical expert, all of its replicas together.
    """
    num_layers = table.shape[0]
    flat_table = table.reshape(num_layers, -1)
    steps = workload.reshape(-1, num_layers, flat_table.shape[1])  # [T, L, P], T = 1 for a window
    index = (np.arange(num_layers)[:, None] * num_experts + flat_table).ravel()
    out = np.zeros((steps.shape[0], num_layers * num_experts))
    for step in range(steps.shape[0]):
        out[step] = np.bincount(index, weights=steps[step].ravel(), minlength=num_layers * num_experts)
    out = out.reshape(steps.shape[0], num_layers, num_experts)
    return out if workload.ndim == 4 else out[0]


class AscendPolicy:
    """An eplb policy behind vllm-ascend's policy interface.

    Args:
        policy: registry name or vllm-ascend policy type (0 random, 1 default, 2 swift, 3 flashlb); made through
            :func:`ascend_policy`, so no rank holds an expert twice where the policy can avoid it.
        num_nodes: N, for policies that keep replicas within nodes.
        num_groups: G expert groups (for ``default``'s hierarchical mode).
        **options: options of the policy.
    """

    def __init__(self, policy: str | int = "default", num_nodes: int = 1, num_groups: int = 1, **options):
        self.policy = ascend_policy(policy, **options)
        self.num_nodes = num_nodes
        self.num_groups = num_groups

    def rebalance_experts(self, current_expert_table, expert_workload):
        """Plan a new table.

        Args:
            current_expert_table: int ``[L, W, K]``, logical expert in each slot of each rank (numpy or torch).
            expert_workload: ``[L, W, K]`` (one window) or ``[T, L, W, K]`` (per step) tokens served by each slot.

        Returns:
            ``(changed, priority, new_table)``: ``changed`` is 1 when any layer changes, else 0; ``priority`` int64
            ``[L]`` lists all layers, changed layers first by predicted PAR gain (largest first), then the rest in
            order; ``new_table`` int64 ``[L, W, K]`` (a tensor when the table was one).

        Raises:
            EplbError: bad table (named layer, rank, slot) or a workload whose shape does not match it.
        """
        table = to_int_array(current_expert_table, "current_expert_table", PlacementError)
        if table.ndim != 3:
            raise PlacementError(f"current_expert_table must be [layers, ranks, slots], got shape {list(table.shape)}")
        workload = to_numpy(expert_workload, "expert_workload", LoadError)
        if workload.ndim not in (3, 4) or workload.shape[-3:] != table.shape:
            raise LoadError(f"expert_workload must be {list(table.shape)} or [steps, {', '.join(map(str, table.shape))}]"
                            f" like current_expert_table, got shape {list(workload.shape)}")
        as_load(workload.reshape(-1, table.shape[0], table.shape[1] * table.shape[2]), field="expert_workload")
        if table.size and table.min() < 0:
            layer, rank, slot = np.argwhere(table < 0)[0]
            raise PlacementError(f"current_expert_table[{layer}, {rank}, {slot}] = {table[layer, rank, slot]}: "
                                 "expected a logical expert id >= 0 in every slot")
        num_layers, num_ranks, slots = table.shape
        num_experts = int(table.max()) + 1
        old = table.reshape(num_layers, -1)
        current = Placement(old, num_experts, Topology(num_ranks, slots, self.num_nodes, self.num_groups))
        plan = self.policy.rebalance(logical_load(table, workload, num_experts), current.topology, current)
        new = preserve_slots(plan.placement.phy2log, old, num_ranks)
        changed = (new != old).any(axis=1)
        gain = np.where(changed, plan.par_before - plan.par_after, -np.inf)
        priority = np.argsort(-gain, kind="stable").astype(np.int64)
        new_table = new.reshape(table.shape)
        return int(changed.any()), priority, like_input(new_table, current_expert_table)


def rebalance_experts(current_expert_table, expert_workload, policy: str | int = "default", **options):
    """One-call form of :meth:`AscendPolicy.rebalance_experts` (``options`` as for :class:`AscendPolicy`)."""
    return AscendPolicy(policy, **options).rebalance_experts(current_expert_table, expert_workload)
