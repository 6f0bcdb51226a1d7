"""What the controller does with its settings when it starts: checks against the model, the cluster and this host,
the record folder, the start-up line, and what it is built from (the placement to start with, the policy's options,
the recorder's per-step ring, the staging budget), all before anything starts.

:class:`~eplb.runtime.config.EplbConfig` only validates the settings themselves; everything that looks outside them
(the map file, NCCL in this torch build, prometheus_client, the record folder) happens here, once per controller,
so that a config built in one process (an engine's driver) can be used in another (its workers).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from eplb.cycle import CycleConfig
from eplb.cycle.planning import cycle_policy
from eplb.errors import EplbError
from eplb.placement import Placement
from eplb.policies import policy_options
from eplb.runtime import dialects
from eplb.runtime.config import ConfigError, EplbConfig
from eplb.topology import Topology

__all__ = ["prepare", "describe", "start_placement", "controller_policy_options", "ring_steps", "check_budget",
           "cycle_config"]

_NCCL = ("torch_nccl", "pynccl")


def prepare(config: EplbConfig, num_layers: int, num_experts: int, topology: Topology):
    """Check ``config`` against the model, the cluster and this host, then create the record folder. Returns the
    map file's placement, or ``None``.

    Raises:
        ConfigError: the cluster does not match (``num_redundant_experts``, ``redundant_experts_num``, ``ep_size``),
            the map file is missing or does not match the model, ``torch_nccl`` without CUDA and NCCL,
            ``prometheus_port`` without prometheus_client, a record folder that cannot be made.
    """
    _check_cluster(config, num_experts, topology)
    placement = _read_map(config, num_layers, num_experts, topology)
    _check_host(config)
    if config.record_path is not None:
        key = _key(config, "record_path")
        problem = _folder_problem(key, config.record_path)
        if problem:
            raise ConfigError(problem)
        try:
            Path(config.record_path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{key}={config.record_path!r}: cannot create its folder: {exc.strerror or exc}") \
                from None
    return placement


def start_placement(config: EplbConfig, placement, num_layers: int, num_experts: int, topology: Topology
                    ) -> Placement:
    """The placement to start with, once :func:`prepare` checked the settings: ``placement``, else the map file,
    else vLLM's initial layout.

    Raises:
        ConfigError: see :func:`prepare`. EplbError: ``placement`` differs from the map file, or does not fit the
            model.
    """
    from_file = prepare(config, num_layers, num_experts, topology)
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
    (vLLM's step interval) or the policy plans on per-step rows (as in the simulator), else 0; with an adaptive
    cadence at least the longest window (windows slide over the intervals)."""
    if config.ring_steps is not None:
        return config.ring_steps
    planning = config.mode in ("dynamic", "record")
    ring = 0
    if planning and config.cycle_steps > config.window_steps:  # vLLM: every step_interval, last window_size
        ring = config.window_steps
    elif planning and cycle_policy(config.policy, options, config.dispatch).wants_steps:
        ring = config.window_steps
    if planning and config.adaptive_cadence is not None:
        ring = max(ring, config.adaptive_cadence.max_steps)
    return ring


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


def cycle_config(config: EplbConfig, host_staging: bool) -> CycleConfig:
    """The :class:`~eplb.cycle.CycleConfig` the runtime's settings ask for (``host_staging``: the transfer backend
    stages in pinned host memory too)."""
    return CycleConfig(cycle_steps=config.cycle_steps, planner_steps=config.apply_steps or 0,
                       layers_per_step=config.layers_per_step, bytes_per_step=config.bytes_per_step,
                       host_staging=host_staging, similarity_threshold=config.update_threshold,
                       adaptive=config.adaptive_cadence)


def describe(config: EplbConfig) -> str:
    """One line for the start-up log: the mode, policy, windows, timing and dialect in force (with the key that set
    each, where the user set it under another name)."""
    engine = dialects.DEFAULTS.get(config.dialect, {})

    def said(name: str, text: str) -> str:
        key = config.keys.get(name)
        if key is None and name in engine:
            return f"{text} ({config.dialect}'s default)"
        return f"{text} ({key})" if key and key != name else text

    parts = [said("mode", f"mode {config.mode}"), said("policy", f"policy {config.policy}")]
    if config.update_interval_s is not None:
        parts.append(said("update_interval_s", f"a cycle every {config.update_interval_s:g} s on its own timer"))
    else:
        parts.append(said("window_steps", f"window {config.window_steps} steps"))
        if config.cycle_steps != config.window_steps:
            parts.append(said("interval_steps", f"a cycle every {config.cycle_steps} steps"))
    if config.apply_steps:
        parts.append(said("apply_steps", f"plans move {config.apply_steps} steps after their window"))
    check = config.planner_check_steps
    parts.append(said("planner_check_steps", f"planner checked every {f'{check} steps' if check > 1 else 'step'}"))
    if config.update_threshold is not None:
        parts.append(said("update_threshold", f"layers re-planned below load similarity {config.update_threshold:g}"))
    parts.append("load: the window's" if config.load_history == "window" else
                 said("load_history", "load: every window's, halved after each plan"))
    parts.append(f"dispatch {config.dispatch}")
    return ", ".join(parts) + f"; dialect {config.dialect}"


def _key(config: EplbConfig, name: str) -> str:
    return config.keys.get(name, name)


def _check_cluster(config: EplbConfig, num_experts: int, topology: Topology) -> None:
    redundant = topology.num_physical - num_experts
    where = f"{topology.describe()} with {num_experts} experts has {redundant} redundant slots"
    if config.num_redundant_experts is not None and config.num_redundant_experts != redundant:
        raise ConfigError(f"{_key(config, 'num_redundant_experts')}={config.num_redundant_experts} does not match the "
                          f"topology: {where} (need (num_experts + num_redundant_experts) = num_ranks x "
                          "slots_per_rank)")
    if config.redundant_per_rank is not None and config.redundant_per_rank * topology.num_ranks != redundant:
        raise ConfigError(f"{_key(config, 'redundant_per_rank')}={config.redundant_per_rank} per rank does not match "
                          f"the topology: {where}, {redundant / topology.num_ranks:g} per rank")
    if config.ep_size is not None and config.ep_size != topology.num_ranks:
        raise ConfigError(f"{_key(config, 'ep_size')}={config.ep_size} but the EP group has {topology.num_ranks} "
                          "ranks")


def _read_map(config: EplbConfig, num_layers: int, num_experts: int, topology: Topology):
    if config.map_path is None:
        return None
    from eplb.formats import read_map

    if not Path(config.map_path).is_file():
        raise ConfigError(f"{_key(config, 'map_path')}={config.map_path!r}: no such file")
    try:
        placement = read_map(config.map_path, num_experts=num_experts, num_ranks=topology.num_ranks,
                             num_nodes=topology.num_nodes, num_groups=topology.num_groups)
    except EplbError as exc:
        raise ConfigError(f"expert map {config.map_path}: {exc}") from None
    if placement.num_layers != num_layers or placement.topology.slots_per_rank != topology.slots_per_rank:
        raise ConfigError(
            f"expert map {config.map_path} is for {placement.num_layers} layers x "
            f"{placement.topology.slots_per_rank} slots per rank, the model has {num_layers} MoE layers x "
            f"{topology.slots_per_rank} slots per rank")
    return placement


def _check_host(config: EplbConfig) -> None:
    from eplb._extras import require

    if config.prometheus_port is not None:
        require("prometheus_client", f"{_key(config, 'prometheus_port')}={config.prometheus_port}", ConfigError)
    if config.communicator in _NCCL:
        what = f"{_key(config, 'communicator')}={config.communicator!r}"
        require("torch", what, ConfigError)
        import torch
        import torch.distributed as dist

        if not (torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available()):
            raise ConfigError(f"{what} needs CUDA and NCCL, which this torch build ({torch.__version__}) does not "
                              "have here; use torch_gloo")


def _folder_problem(key: str, path: str) -> str | None:
    """Why the folder of ``path`` cannot be created or written, or None (nothing is created here)."""
    target = Path(path)
    if target.is_dir():
        return f"{key}={path!r} is a folder; expected a file path for the expert map"
    folder = target.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{key}={path!r}: cannot create its folder {folder}: {existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        verb = "is not writable" if existing == folder else f"cannot be created ({existing} is not writable)"
        return f"{key}={path!r}: folder {folder} {verb}"
    return None
