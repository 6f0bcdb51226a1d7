"""vLLM adapter: an EPLB policy class whose classmethod ``rebalance_experts`` runs an eplb policy, and the plug-in
that puts it where vLLM's EPLB looks.

vLLM (0.32) calls ``EPLB_POLICIES[eplb_config.policy].rebalance_experts(weight, num_replicas, num_groups, num_nodes,
num_ranks, old_global_expert_indices)`` and only allows the policy ``"default"``. eplb's package declares a
``vllm.general_plugins`` entry point (:func:`register`), which vLLM runs in every process: when the environment
variable ``EPLB_VLLM_POLICY`` names a registered policy, the ``"default"`` entry becomes that policy (options as a
JSON object in ``EPLB_VLLM_POLICY_OPTIONS``); unset, nothing changes::

    pip install eplb vllm
    EPLB_VLLM_POLICY=auto vllm serve MODEL --enable-expert-parallel --enable-eplb

Without vLLM, ``vllm_policy("swift")`` builds such a class for any registered policy::

    from eplb.integrations import vllm_policy
    SwiftPolicy = vllm_policy("swift")
    phy2log = SwiftPolicy.rebalance_experts(weight, 288, 8, 4, 32, old_global_expert_indices=phy2log)
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from eplb._arrays import like_input, to_int_array
from eplb.errors import PolicyError
from eplb.load import as_load
from eplb.placement import Placement
from eplb.policies import get_policy
from eplb.policies.default import check_sizes
from eplb.policies.resilience import repair_current
from eplb.policies.retention import preserve_slots
from eplb.topology import Topology

__all__ = ["VllmPolicy", "vllm_policy", "register", "POLICY_ENV", "OPTIONS_ENV"]

log = logging.getLogger(__name__)

#: environment variable naming the eplb policy the plug-in installs for vLLM
POLICY_ENV = "EPLB_VLLM_POLICY"
#: environment variable with the policy's options, a JSON object
OPTIONS_ENV = "EPLB_VLLM_POLICY_OPTIONS"


class VllmPolicy:
    """vLLM-style policy class running the eplb policy named by ``policy_name`` with ``policy_options``.

    Subclass it (or use :func:`vllm_policy`) to pick another policy; this base runs ``default``.
    """

    policy_name: str = "default"
    policy_options: dict = {}

    @classmethod
    def rebalance_experts(cls, weight, num_replicas: int, num_groups: int, num_nodes: int, num_ranks: int,
                          old_global_expert_indices=None):
        """Plan a placement (vLLM 0.32's ``AbstractEplbPolicy.rebalance_experts``).

        Args:
            weight: ``[L, E]`` expert load (numpy or torch, any device).
            num_replicas: P physical slots, a multiple of ``num_ranks``.
            num_groups: G expert groups. When G does not divide E and does not divide over the nodes (so DeepSeek's
                algorithm would ignore groups anyway), one group is used.
            num_nodes: N nodes, dividing ``num_ranks``.
            num_ranks: W ranks in the EP group.
            old_global_expert_indices: ``phy2log`` ``[L, P_old]`` in force, or None. As vLLM passes it: ``-1`` marks
                an empty slot (new ranks after a scale-up), and after an elastic scale-down ``P_old`` is wider than
                ``num_replicas`` (the first ``num_replicas`` slots are the surviving ranks'). The plan starts from
                it, and an expert that stays on a rank keeps its slot there (no copy within a rank).

        Returns:
            ``phy2log`` int64 ``[L, num_replicas]``: a torch tensor on ``weight``'s device when ``weight`` is one.

        Raises:
            EplbError: sizes that do not fit or disagree (naming vLLM's argument), bad load, unknown policy or option.
        """
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
        policy = get_policy(cls.policy_name, **cls.policy_options)
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


def vllm_policy(name: str | int = "default", **options) -> type[VllmPolicy]:
    """A :class:`VllmPolicy` subclass running policy ``name`` (registry name or vllm-ascend id) with ``options``.

    Raises:
        PolicyError: unknown policy or option (checked here, not at the first rebalance).
    """
    policy = get_policy(name, **options)
    return type(f"Eplb{type(policy).__name__}", (VllmPolicy,),
                {"policy_name": policy.name, "policy_options": dict(options),
                 "__doc__": f"vLLM EPLB policy class running eplb's {policy!r}."})


def register() -> None:
    """vLLM's ``vllm.general_plugins`` entry point: install the policy ``EPLB_VLLM_POLICY`` names as vLLM's
    ``EPLB_POLICIES["default"]``, the entry vLLM's EPLB calls. Does nothing when the variable is unset or empty.

    Raises:
        PolicyError: an unknown policy or option, or options that are not a JSON object (vLLM stops with it).
    """
    name = os.environ.get(POLICY_ENV, "").strip()
    if not name:
        return
    text = os.environ.get(OPTIONS_ENV, "").strip() or "{}"
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyError(f"{OPTIONS_ENV}={text!r} is not JSON: {exc.msg}") from None
    if not isinstance(options, dict):
        raise PolicyError(f"{OPTIONS_ENV} must be a JSON object of policy options, got {text!r}")
    try:
        policy_class = vllm_policy(name, **options)
    except PolicyError as exc:
        raise PolicyError(f"{POLICY_ENV}={name!r}: {exc}") from None
    from vllm.distributed.eplb import policy as vllm_policies

    installed = type(policy_class.__name__, (policy_class, vllm_policies.AbstractEplbPolicy),
                     {"__doc__": policy_class.__doc__})
    vllm_policies.EPLB_POLICIES["default"] = installed
    log.info("eplb: vLLM's EPLB policy 'default' now runs eplb's %r policy with options %s",
             policy_class.policy_name, options)
