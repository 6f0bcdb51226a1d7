"""EplbConfig: the runtime's settings, read from vllm-ascend, vLLM or xLLM style keys and validated strictly.

Accepted keys (one dict may mix dialects; two keys for the same setting must agree):

=====================================  =========================================================================
key                                    meaning
=====================================  =========================================================================
``mode``                               ``off`` | ``dynamic`` | ``record`` | ``static``
``dynamic_eplb`` (vllm-ascend)         true -> ``dynamic``; needs the environment variable ``DYNAMIC_EPLB=true``
``expert_map_record_path`` (ascend)    record mode output map; needs ``EXPERT_MAP_RECORD=true``
``record_path``                        the same, without the guard
``expert_map_path`` / ``map_path``     map file to load at start (static mode, or the start of dynamic mode)
``expert_heat_collection_interval``    steps of one heat window (vllm-ascend); = ``window_size`` (vLLM),
  / ``window_size`` / ``window_steps``
``step_interval`` / ``interval_steps`` steps from the start of one cycle to the start of the next (vLLM);
                                       default: the window. When longer than the window, the plan uses
                                       the last ``window_size`` steps (a per-step ring of that length)
``algorithm_execution_interval``       steps between two checks of the planner (all ranks agree at a check);
  / ``planner_check_steps``
``eplb_policy_type`` / ``policy``      vllm-ascend id 0-3 or a policy name (default ``auto``)
``policy_options``                     keyword options of the policy
``resilience``                         true, or a dict of :class:`eplb.policies.resilience.Resilience` fields
                                       (``spread_nodes``, ``min_replicas``, ``hot_experts``): plans keep the
                                       replicas of an expert on distinct ranks and nodes, so one failure loses
                                       no expert that has two or more
``num_redundant_experts``              R; checked against the topology
``eplb_heat_collection_stage``         ``all`` | ``prefill`` | ``decode``
  / ``stage``
``log_balancedness``                   log vLLM's balancedness every window
``use_async`` (vLLM)                   accepted; the planner is always asynchronous here
``eplb_update_interval`` (xLLM)        seconds: a cycle starts at a window end only when this much time passed
``eplb_update_threshold`` (xLLM)       0..1: a layer is re-planned only when the cosine similarity of its load to
                                       the load it was last planned on is below this
``planner_deadline_s``                 seconds the planner may take before the cycle is skipped (default 30)
``layers_per_step`` / ``bytes_per_step`` how much weight moves per step (default 1 layer)
``dispatch`` (old: ``router_mode``)   replica choice: ``rank`` | ``token`` | ``local`` | ``balanced``
``ring_steps``                         keep per-step rows (default: the window, for policies that plan on steps)
``prometheus_port``                    serve metrics on this port when prometheus_client is installed
=====================================  =========================================================================
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from eplb.dispatch import RUNTIME_MODES
from eplb.errors import EplbError
from eplb.policies import POLICY_IDS
from eplb.policies.resilience import Resilience
from eplb.topology import Topology

__all__ = ["EplbConfig", "ConfigError", "MODES"]

MODES = ("off", "dynamic", "record", "static")
_STAGES = ("all", "prefill", "decode")
_TRUE = ("1", "true", "yes", "on")
_RESILIENCE_KEYS = ("spread_nodes", "min_replicas", "hot_experts")

#: accepted key -> canonical field
_ALIASES = {
    "mode": "mode",
    "dynamic_eplb": "dynamic_eplb",
    "expert_map_record_path": "guarded_record_path",
    "record_path": "record_path",
    "expert_map_path": "map_path",
    "map_path": "map_path",
    "expert_heat_collection_interval": "window_steps",
    "window_size": "window_steps",
    "window_steps": "window_steps",
    "step_interval": "interval_steps",
    "interval_steps": "interval_steps",
    "algorithm_execution_interval": "planner_check_steps",
    "planner_check_steps": "planner_check_steps",
    "eplb_policy_type": "policy",
    "policy": "policy",
    "policy_options": "policy_options",
    "resilience": "resilience",
    "num_redundant_experts": "num_redundant_experts",
    "eplb_heat_collection_stage": "stage",
    "stage": "stage",
    "log_balancedness": "log_balancedness",
    "use_async": "use_async",
    "eplb_update_interval": "update_interval_s",
    "update_interval_s": "update_interval_s",
    "eplb_update_threshold": "update_threshold",
    "update_threshold": "update_threshold",
    "planner_deadline_s": "planner_deadline_s",
    "layers_per_step": "layers_per_step",
    "bytes_per_step": "bytes_per_step",
    "dispatch": "dispatch",
    "router_mode": "dispatch",
    "ring_steps": "ring_steps",
    "prometheus_port": "prometheus_port",
}


class ConfigError(EplbError):
    """The EPLB configuration is invalid."""


def _int(key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        else:
            raise ConfigError(f"{key} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")
    return value


def _float(key: str, value, low: float, high: float | None = None, low_open: bool = True) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if isinstance(value, bool) or out != out or (out <= low if low_open else out < low) or (
            high is not None and out > high):
        bound = f"in ({low}, {high}]" if high is not None else f"> {low}"
        raise ConfigError(f"{key} must be {bound}, got {value!r}")
    return out


def _bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + ("0", "false", "no", "off"):
        return value.lower() in _TRUE
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def _choice(key: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        hint = difflib.get_close_matches(str(value), allowed, n=1)
        suffix = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}{suffix}")
    return value


def _record_path(key: str, value) -> str:
    path = Path(value)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{key}={value!r}: cannot create its folder {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{key}={value!r}: folder {folder} is not writable")
    if path.is_dir():
        raise ConfigError(f"{key}={value!r} is a folder; expected a file path for the expert map")
    return str(path)


@dataclass(frozen=True)
class EplbConfig:
    """Validated runtime settings (build with :meth:`from_dict`; see the module docstring for every key)."""

    mode: str = "off"
    window_steps: int = 1000
    interval_steps: int | None = None
    planner_check_steps: int = 8
    policy: str = "auto"
    policy_options: dict = field(default_factory=dict)
    resilience: Resilience | None = None
    num_redundant_experts: int | None = None
    map_path: str | None = None
    record_path: str | None = None
    stage: str = "all"
    log_balancedness: bool = False
    update_interval_s: float | None = None
    update_threshold: float | None = None
    planner_deadline_s: float = 30.0
    layers_per_step: int = 1
    bytes_per_step: int | None = None
    dispatch: str = "rank"
    ring_steps: int | None = None
    prometheus_port: int | None = None

    @property
    def cycle_steps(self) -> int:
        """Steps from the start of one cycle to the start of the next (at least the window)."""
        return max(self.interval_steps or self.window_steps, self.window_steps)

    @classmethod
    def from_dict(cls, config: dict | None, env=None) -> "EplbConfig":
        """Validate a user dict (vllm-ascend, vLLM or xLLM keys) into an :class:`EplbConfig`.

        Args:
            config: the settings; ``None`` or ``{}`` means EPLB off.
            env: environment for the vllm-ascend guards (default ``os.environ``).

        Raises:
            ConfigError: unknown key (with a suggestion), wrong type, zero or negative interval, unknown policy or
            policy id, unknown stage or mode, conflicting keys, missing env guard, record folder that cannot be made.
        """
        env = os.environ if env is None else env
        config = dict(config or {})
        values: dict = {}
        source: dict = {}
        for key, value in config.items():
            if key not in _ALIASES:
                hint = difflib.get_close_matches(key, list(_ALIASES), n=1)
                suffix = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ConfigError(f"unknown EPLB config key {key!r}{suffix}")
            name = _ALIASES[key]
            if name in values and values[name] != value:
                raise ConfigError(f"{source[name]}={values[name]!r} and {key}={value!r} set the same thing "
                                  "differently; keep one")
            values[name], source[name] = value, key
        out: dict = {}
        if "window_steps" in values:
            out["window_steps"] = _int(source["window_steps"], values["window_steps"], 1)
        if "interval_steps" in values:
            out["interval_steps"] = _int(source["interval_steps"], values["interval_steps"], 1)
        if "planner_check_steps" in values:
            out["planner_check_steps"] = _int(source["planner_check_steps"], values["planner_check_steps"], 1)
        if "policy" in values:
            out["policy"] = cls._policy(source["policy"], values["policy"])
        if "policy_options" in values:
            if not isinstance(values["policy_options"], dict):
                raise ConfigError(f"policy_options must be a dict, got {values['policy_options']!r}")
            out["policy_options"] = dict(values["policy_options"])
        if "resilience" in values:
            out["resilience"] = _resilience(values["resilience"])
        if "num_redundant_experts" in values:
            out["num_redundant_experts"] = _int(source["num_redundant_experts"], values["num_redundant_experts"], 0)
        if "stage" in values:
            out["stage"] = _choice(source["stage"], values["stage"], _STAGES)
        if "log_balancedness" in values:
            out["log_balancedness"] = _bool("log_balancedness", values["log_balancedness"])
        if "use_async" in values:
            _bool("use_async", values["use_async"])
        if "update_interval_s" in values:
            out["update_interval_s"] = _float(source["update_interval_s"], values["update_interval_s"], 0.0)
        if "update_threshold" in values:
            out["update_threshold"] = _float(source["update_threshold"], values["update_threshold"], 0.0, 1.0,
                                             low_open=False)
        if "planner_deadline_s" in values:
            out["planner_deadline_s"] = _float("planner_deadline_s", values["planner_deadline_s"], 0.0)
        if "layers_per_step" in values:
            out["layers_per_step"] = _int("layers_per_step", values["layers_per_step"], 1)
        if "bytes_per_step" in values:
            out["bytes_per_step"] = _int("bytes_per_step", values["bytes_per_step"], 1)
        if "dispatch" in values:
            out["dispatch"] = _choice(source["dispatch"], values["dispatch"], RUNTIME_MODES)
        if "ring_steps" in values:
            out["ring_steps"] = _int("ring_steps", values["ring_steps"], 0)
        if "prometheus_port" in values:
            out["prometheus_port"] = _int("prometheus_port", values["prometheus_port"], 1)
        if "map_path" in values:
            path = Path(values["map_path"])
            if not path.is_file():
                raise ConfigError(f"{source['map_path']}={values['map_path']!r}: no such file")
            out["map_path"] = str(path)
        out["mode"], record = cls._mode(values, source, env)
        if record is not None:
            out["record_path"] = record
        if out["mode"] == "static" and "map_path" not in out:
            raise ConfigError("static mode needs expert_map_path (the map to load at start)")
        return cls(**out)

    @staticmethod
    def _policy(key: str, value) -> str:
        from eplb.policies import POLICY_NAMES

        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a policy name or id, got {value!r}")
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            if int(value) not in POLICY_IDS:
                raise ConfigError(f"{key} must be a vllm-ascend policy id in {sorted(POLICY_IDS)}, got {value}")
            return POLICY_IDS[int(value)]
        return _choice(key, value, POLICY_NAMES)

    @staticmethod
    def _mode(values: dict, source: dict, env) -> tuple[str, str | None]:
        modes = set()
        if "mode" in values:
            modes.add(_choice("mode", values["mode"], MODES))
        if "dynamic_eplb" in values and _bool("dynamic_eplb", values["dynamic_eplb"]):
            if str(env.get("DYNAMIC_EPLB", "")).lower() not in _TRUE:
                raise ConfigError("dynamic_eplb=true needs the environment variable DYNAMIC_EPLB=true "
                                  "(vllm-ascend's guard); set it, or use mode='dynamic'")
            modes.add("dynamic")
        record = None
        if "guarded_record_path" in values:
            if str(env.get("EXPERT_MAP_RECORD", "")).lower() not in _TRUE:
                raise ConfigError("expert_map_record_path needs the environment variable EXPERT_MAP_RECORD=true "
                                  "(vllm-ascend's guard); set it, or use record_path")
            record = _record_path("expert_map_record_path", values["guarded_record_path"])
        if "record_path" in values:
            record = _record_path("record_path", values["record_path"])
        if record is not None and "dynamic" not in modes:
            modes.add("record")
        if not modes:
            modes.add("static" if "map_path" in values else "off")
        if len(modes) > 1:
            raise ConfigError(f"the keys ask for more than one mode ({', '.join(sorted(modes))}); pick one")
        return modes.pop(), record

    def check_model(self, num_layers: int, num_experts: int, topology: Topology):
        """Check the settings against the model and cluster; returns the map file's placement (or ``None``).

        Raises:
            ConfigError: ``num_redundant_experts`` differs from ``P - E``, or the map file does not match the model
            (layers, experts, ranks, slots).
        """
        redundant = topology.num_physical - num_experts
        if self.num_redundant_experts is not None and self.num_redundant_experts != redundant:
            raise ConfigError(
                f"num_redundant_experts={self.num_redundant_experts} does not match the topology: "
                f"{topology.describe()} with {num_experts} experts has {redundant} redundant slots "
                f"(need (num_experts + num_redundant_experts) = num_ranks x slots_per_rank)")
        if self.map_path is None:
            return None
        from eplb.formats import read_map

        try:
            placement = read_map(self.map_path, num_experts=num_experts, num_ranks=topology.num_ranks,
                                 num_nodes=topology.num_nodes, num_groups=topology.num_groups)
        except EplbError as exc:
            raise ConfigError(f"expert map {self.map_path}: {exc}") from None
        if placement.num_layers != num_layers or placement.topology.slots_per_rank != topology.slots_per_rank:
            raise ConfigError(
                f"expert map {self.map_path} is for {placement.num_layers} layers x "
                f"{placement.topology.slots_per_rank} slots per rank, the model has {num_layers} MoE layers x "
                f"{topology.slots_per_rank} slots per rank")
        return placement

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _resilience(value) -> Resilience | None:
    if isinstance(value, bool):
        return Resilience() if value else None
    if not isinstance(value, dict):
        raise ConfigError(f"resilience must be true/false or a dict of {_RESILIENCE_KEYS}, got {value!r}")
    unknown = sorted(set(value) - set(_RESILIENCE_KEYS))
    if unknown:
        raise ConfigError(f"resilience: unknown key {unknown[0]!r}; expected some of {', '.join(_RESILIENCE_KEYS)}")
    value = dict(value)
    if "spread_nodes" in value:
        value["spread_nodes"] = _bool("resilience.spread_nodes", value["spread_nodes"])
    try:
        return Resilience(**value)
    except EplbError as exc:
        raise ConfigError(str(exc)) from None
