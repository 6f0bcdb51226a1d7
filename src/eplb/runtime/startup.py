"""What the controller does with its settings when it starts: checks against the model, the cluster and this host,
the record folder, and the start-up line.

:class:`~eplb.runtime.config.EplbConfig` only validates the settings themselves; everything that looks outside them
(the map file, NCCL in this torch build, prometheus_client, the record folder) happens here, once per controller,
so that a config built in one process (an engine's driver) can be used in another (its workers).
"""

from __future__ import annotations

import os
from pathlib import Path

from eplb.errors import EplbError
from eplb.runtime import dialects
from eplb.runtime.config import ConfigError, EplbConfig
from eplb.topology import Topology

__all__ = ["prepare", "describe"]

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
