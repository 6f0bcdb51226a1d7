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
]

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
