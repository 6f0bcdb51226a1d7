"""eplb: expert-parallel load balancing for Mixture-of-Experts serving.

The offline core (topology, placement, load, metrics, policies, formats, simulator) needs only numpy/scipy/numba;
torch is imported only by ``eplb.runtime`` and ``eplb.engine``. Importing the package loads only the errors; the
names below and the subpackages load on first use, so that an engine's plug-in (``eplb.integrations.vllm``) costs
the engine nothing until it plans.
"""

import logging

from eplb._lazy import lazy_getattr
from eplb.errors import (EplbError, EplbException, EplbFailure, FormatError, LoadError, PlacementError, PolicyError,
                         TopologyError)

__all__ = [
    "EplbException",
    "EplbError",
    "EplbFailure",
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


_LAZY = {
    "Placement": "eplb.placement",
    "Plan": "eplb.policies.base",
    "Policy": "eplb.policies.base",
    "Topology": "eplb.topology",
    "available_policies": "eplb.policies",
    "get_policy": "eplb.policies",
    "rebalance_experts": "eplb.policies.default",
}

__getattr__ = lazy_getattr(__name__, _LAZY, submodules=True)
