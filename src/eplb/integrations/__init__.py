"""Adapters that let an engine call any eplb policy through the interface it already has.

- :mod:`eplb.integrations.vllm`: a policy class with vLLM's ``rebalance_experts`` classmethod, and the
  ``vllm.general_plugins`` plug-in that installs it in vLLM and in vllm-ascend.
- :mod:`eplb.integrations.vllm_ascend`: vllm-ascend's ``rebalance_experts(current_expert_table, expert_workload)``.

No engine is imported here; tensors are recognised by duck typing and returned as tensors. The names load on first
use: the plug-in imports this package in every vLLM process.
"""

from eplb._lazy import lazy_getattr

__all__ = ["VllmPolicy", "vllm_policy", "register", "AscendPolicy", "rebalance_experts"]

_MODULES = {
    "VllmPolicy": "eplb.integrations.vllm",
    "vllm_policy": "eplb.integrations.vllm",
    "register": "eplb.integrations.vllm",
    "AscendPolicy": "eplb.integrations.vllm_ascend",
    "rebalance_experts": "eplb.integrations.vllm_ascend",
}

__getattr__ = lazy_getattr(__name__, _MODULES)
