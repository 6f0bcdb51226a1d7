"""Adapters that let an engine call any eplb policy through the interface it already has.

- :mod:`eplb.integrations.vllm`: a policy class with vLLM's ``rebalance_experts`` classmethod.
- :mod:`eplb.integrations.vllm_ascend`: vllm-ascend's ``rebalance_experts(current_expert_table, expert_workload)``.

No engine is imported here; tensors are recognised by duck typing and returned as tensors.
"""

from eplb.integrations.vllm import VllmPolicy, register, vllm_policy
from eplb.integrations.vllm_ascend import AscendPolicy, rebalance_experts

__all__ = ["VllmPolicy", "vllm_policy", "register", "AscendPolicy", "rebalance_experts"]
