"""vLLM adapter: an EPLB policy class whose classmethod ``rebalance_experts`` runs an eplb policy.

vLLM calls ``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_ranks, old_global_expert_indices)``
on its policy class and derives the logical maps from the returned ``phy2log`` itself. ``vllm_policy("swift")``
builds such a class for any registered policy::

    from eplb.integrations import vllm_policy
    SwiftPolicy = vllm_policy("swift")
    phy2log = SwiftPolicy.rebalance_experts(weight, 288, 8, 4, 32, old_global_expert_indices=phy2log)
"""

from __future__ import annotations

from eplb._arrays import like_input
from eplb.errors import PolicyError
from eplb.load import as_load
from eplb.policies import get_policy
from eplb.topology import Topology

__all__ = ["VllmPolicy", "vllm_policy"]


class VllmPolicy:
    """vLLM-style policy class running the eplb policy named by ``policy_name`` with ``policy_options``.

    Subclass it (or use :func:`vllm_policy`) to pick another policy; this base runs ``default``.
    """

    policy_name: str = "default"
    policy_options: dict = {}

    @classmethod
    def rebalance_experts(cls, weight, num_replicas: int, num_groups: int, num_nodes: int, num_ranks: int,
                          old_global_expert_indices=None):
        """Plan a placement.

        Args:
            weight: ``[L, E]`` expert load (numpy or torch, any device).
            num_replicas: P physical slots, a multiple of ``num_ranks``.
            num_groups: G expert groups. When G does not divide E and does not divide over the nodes (so DeepSeek's
                algorithm would ignore groups anyway), one group is used.
            num_nodes: N nodes, dividing ``num_ranks``.
            num_ranks: W ranks in the EP group.
            old_global_expert_indices: ``phy2log`` ``[L, P]`` in force, or None; with it, policies keep experts in
                place where they can.

        Returns:
            ``phy2log`` int64 ``[L, P]``: a torch tensor on ``weight``'s device when ``weight`` is a tensor.

        Raises:
            EplbError: sizes that do not fit (named), bad load, unknown policy or option.
        """
        load = as_load(weight, field="weight")
        if load.ndim != 2:
            raise PolicyError(f"weight must be [layers, experts], got shape {list(load.shape)}")
        num_experts = load.shape[1]
        if num_ranks < 1 or num_replicas % num_ranks:
            raise PolicyError(f"num_replicas={num_replicas} must be a multiple of num_ranks={num_ranks}")
        if num_experts % num_groups and num_groups % num_nodes:
            num_groups = 1
        topology = Topology(num_ranks, num_replicas // num_ranks, num_nodes, num_groups)
        policy = get_policy(cls.policy_name, **cls.policy_options)
        plan = policy.rebalance(load, topology, current=old_global_expert_indices)
        return like_input(plan.placement.phy2log.copy(), weight)


def vllm_policy(name: str | int = "default", **options) -> type[VllmPolicy]:
    """A :class:`VllmPolicy` subclass running policy ``name`` (registry name or vllm-ascend id) with ``options``.

    Raises:
        PolicyError: unknown policy or option (checked here, not at the first rebalance).
    """
    policy = get_policy(name, **options)
    return type(f"Eplb{type(policy).__name__}", (VllmPolicy,),
                {"policy_name": policy.name, "policy_options": dict(options),
                 "__doc__": f"vLLM EPLB policy class running eplb's {policy!r}."})
