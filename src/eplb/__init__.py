"""eplb: expert-parallel load balancing for Mixture-of-Experts serving.

The offline core (topology, placement, load, metrics, policies, formats, simulator) needs only numpy/scipy/numba;
torch is imported only by ``eplb.runtime`` and ``eplb.engine``. Importing the package loads only the errors; the
names below and the subpackages load on first use, so that an engine's plug-in (``eplb.integrations.vllm``) costs
the engine nothing until it plans.
"""

import importlib
import logging

from eplb.errors import EplbError, FormatError, LoadError, PlacementError, PolicyError, TopologyError

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


_LAZY = {
    "Placement": "eplb.placement",
    "Plan": "eplb.policies.base",
    "Policy": "eplb.policies.base",
    "Topology": "eplb.topology",
    "available_policies": "eplb.policies",
    "get_policy": "eplb.policies",
    "rebalance_experts": "eplb.policies.default",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:  # a subpackage used as an attribute (``eplb.metrics.par``) before anyone imported it
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'eplb' has no attribute {name!r}")
