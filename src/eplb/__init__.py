"""eplb: expert-parallel load balancing for Mixture-of-Experts serving.

The offline core (topology, placement, load, metrics, policies, formats, simulator) needs only numpy/scipy/numba;
torch is imported only by ``eplb.runtime`` and ``eplb.engine``.
"""

import logging

from eplb.errors import EplbError, FormatError, LoadError, PlacementError, PolicyError, TopologyError
from eplb.placement import Placement
from eplb.policies import Plan, Policy, available_policies, get_policy
from eplb.topology import Topology

__all__ = [
    "EplbError",
    "FormatError",
    "LoadError",
    "PlacementError",
    "PolicyError",
    "TopologyError",
    "Placement",
    "Plan",
    "Policy",
    "Topology",
    "available_policies",
    "get_policy",
    "rebalance_experts",
]

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name):
    # rebalance_experts lives with its policy, whose kernels should not load with the package
    if name == "rebalance_experts":
        from eplb.policies.default import rebalance_experts

        return rebalance_experts
    raise AttributeError(f"module 'eplb' has no attribute {name!r}")
