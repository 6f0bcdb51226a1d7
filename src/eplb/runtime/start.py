"""What an :class:`~eplb.runtime.controller.EplbController` is built from, checked before anything starts: the
placement the weights were loaded with, the policy's options, the recorder's per-step ring, the staging budget."""

from __future__ import annotations

import numpy as np

from eplb.errors import EplbError
from eplb.placement import Placement
from eplb.planning import cycle_policy
from eplb.policies import policy_options
from eplb.runtime.config import ConfigError, EplbConfig

__all__ = ["start_placement", "controller_policy_options", "ring_steps", "check_budget"]


def start_placement(config: EplbConfig, placement, num_layers: int, num_experts: int, topology) -> Placement:
    """The placement to start with: ``placement``, else the map file, else vLLM's initial layout.

    Raises:
        EplbError: it differs from the map file, or does not fit the model.
    """
    from_file = config.check_model(num_layers, num_experts, topology)
    if placement is None:
        placement = from_file or Placement.initial(num_experts, topology, num_layers)
    elif from_file is not None and placement != from_file:
        raise EplbError(f"the placement passed differs from the map file {config.map_path}")
    if placement.num_layers != num_layers or placement.num_experts != num_experts:
        raise EplbError(f"placement has {placement.num_layers} layers x {placement.num_experts} experts, the "
                        f"model {num_layers} x {num_experts}")
    return Placement(placement.phy2log, num_experts, topology)


def controller_policy_options(config: EplbConfig) -> dict:
    """The policy's options; record mode writes vllm-ascend maps, which cannot hold an expert twice on one rank, so
    it asks a policy that has the option not to do that (unless the user set it)."""
    options = dict(config.policy_options)
    if (config.mode == "record" and "allow_shared_rank" not in options
            and "allow_shared_rank" in policy_options(config.policy)):
        options["allow_shared_rank"] = False
    return options


def ring_steps(config: EplbConfig, options: dict) -> int:
    """Steps of the recorder's per-step ring: the setting, else the window when only its last steps are planned on
    (vLLM's step interval) or the policy plans on per-step rows (as in the simulator), else 0."""
    planning = config.mode in ("dynamic", "record")
    if config.ring_steps is not None:
        return config.ring_steps
    if planning and config.cycle_steps > config.window_steps:  # vLLM: every step_interval, last window_size
        return config.window_steps
    if planning and cycle_policy(config.policy, options, config.dispatch).wants_steps:
        return config.window_steps
    return 0


def check_budget(config: EplbConfig, expert_bytes: np.ndarray, host_staging: bool) -> None:
    """``bytes_per_step`` holds at least one expert of every layer (twice with host staging).

    Raises:
        ConfigError: it does not.
    """
    largest = int(expert_bytes.max()) * (2 if host_staging else 1)
    budget = config.bytes_per_step
    if budget is not None and budget < largest:
        raise ConfigError(f"bytes_per_step={budget} is smaller than one expert of layer {int(expert_bytes.argmax())} "
                          f"({largest} bytes over its tensors"
                          f"{', staged on the device and in host memory' if host_staging else ''}); "
                          f"expected >= {largest} so that a step can move at least one expert")
