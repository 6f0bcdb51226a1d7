"""EplbConfig: the runtime's settings, read from vllm-ascend, vLLM or xLLM style keys and validated strictly.

The whole config is checked when it is built, by :meth:`EplbConfig.from_dict` and by the plain constructor alike:
types, ranges, choices, the policy's options against the policy's signature. Errors name the key the user wrote.
Nothing on disk changes unless the config is valid (the record folder is created last).

Accepted keys (one dict may mix dialects; two keys for the same setting must agree: ``100`` and ``"100"`` agree):

=====================================  =========================================================================
key                                    meaning
=====================================  =========================================================================
``mode``                               ``off`` | ``dynamic`` | ``record`` | ``static``
``dynamic_eplb`` (vllm-ascend)         true -> ``dynamic``; needs ``DYNAMIC_EPLB`` (``true``/``1``) or
                                       ``EXPERT_MAP_RECORD=true`` in the environment (vllm-ascend's guard)
``expert_map_record_path`` (ascend)    a ``.json`` path: plan every cycle and write the map there instead of
                                       moving weights (``record`` mode, as vllm-ascend does even with
                                       ``dynamic_eplb``); the same environment guard
``record_path``                        the same, without the guard or the ``.json`` rule
``expert_map_path`` (ascend)           a ``.json`` map to load at start (static mode, or the start of dynamic mode)
  / ``map_path``                       (any map format eplb reads)
``expert_heat_collection_interval``    steps of one heat window (vllm-ascend); = ``window_size`` (vLLM),
  / ``window_size`` / ``window_steps``
``step_interval`` / ``interval_steps`` steps from the start of one cycle to the start of the next (vLLM);
                                       default: the window. When longer than the window, the plan uses
                                       the last ``window_size`` steps (a per-step ring of that length)
``algorithm_execution_interval``       steps between two checks of the planner (all ranks agree at a check);
  / ``planner_check_steps``
``eplb_policy_type`` / ``policy``      vllm-ascend id 0-3 or a policy name (default ``auto``)
``policy_options``                     keyword options of the policy, checked against its signature
``resilience``                         true, or a dict of :class:`eplb.policies.resilience.Resilience` fields
                                       (``spread_nodes``, ``min_replicas``, ``hot_experts``): plans keep the
                                       replicas of an expert on distinct ranks and nodes, so one failure loses
                                       no expert that has two or more
``num_redundant_experts``              R; checked against the topology
``eplb_heat_collection_stage``         ``all`` | ``prefill`` | ``decode``: which steps' load is recorded
  / ``load_collection_phase`` (ascend)
  / ``stage``
``log_balancedness``                   log vLLM's balancedness
``log_balancedness_interval`` (vLLM)   every this many windows (default 1)
``use_async`` (vLLM)                   accepted; the planner is always asynchronous here
``communicator`` (vLLM)                weight-transfer backend, vLLM's values: ``torch_gloo`` (the default),
                                       ``torch_nccl`` / ``pynccl`` (need CUDA and NCCL in this torch build);
                                       ``nixl`` and ``torch_xccl`` are refused (not provided by eplb)
``enable_migration_batching`` (vLLM)   each rank sends to / receives from at most one peer at a time
``eplb_update_interval`` (xLLM)        seconds: a cycle starts at a window end only when this much time passed
``eplb_update_threshold`` (xLLM)       0..1: a layer is re-planned only when the cosine similarity of its load to
                                       the load it was last planned on is below this
``planner_deadline_s``                 seconds the planner may take before the cycle is skipped (default 30)
``layers_per_step`` / ``bytes_per_step`` how much weight moves per step (default 1 layer); ``bytes_per_step``: the
                                       most staging memory per rank and step (layers split into parts to fit)
``dispatch`` (old: ``router_mode``)   replica choice: ``rank`` | ``token`` | ``local`` | ``balanced``
``ring_steps``                         keep per-step rows (default: the window, for policies that plan on steps)
``prometheus_port``                    serve metrics on this port (1-65535) when prometheus_client is installed
``measured_price``                     price a plan's moves with the transfer time per expert and the step time
                                       measured here (agreed by all ranks; default true); false: the step-time
                                       model's defaults for the experts' bytes, as ``eplb simulate``
``heartbeat_interval_s``               seconds between two beats of EPLB's failure detector (default: off); see
                                       :mod:`eplb.runtime.heartbeat` and docs/fault-tolerance.md
``heartbeat_timeout_s``                a rank whose beat has not changed for this long is declared failed
                                       (> ``heartbeat_interval_s``; default 10 x the interval)
``heartbeat_abort_serving``            on a declared failure, also abort the serving group's NCCL
                                       communicators, so a forward blocked on the dead rank raises (default false)
``adaptive_cadence``                   a dict of :class:`eplb.cadence.AdaptiveCadence` fields (``min_steps``,
                                       ``max_steps``, ``window_steps``, ``tolerance``): plan sooner after the load
                                       drifted, wait longer while it is stable (``eplb tune`` prints one)
=====================================  =========================================================================
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from eplb.cadence import AdaptiveCadence
from eplb.dispatch import RUNTIME_MODES
from eplb.errors import EplbError
from eplb.policies import POLICY_IDS
from eplb.policies.resilience import Resilience
from eplb.topology import Topology

__all__ = ["EplbConfig", "ConfigError", "MODES", "COMMUNICATORS"]

MODES = ("off", "dynamic", "record", "static")
#: vLLM's ``communicator`` values; eplb provides Gloo and NCCL transfers
COMMUNICATORS = ("torch_gloo", "torch_nccl", "pynccl", "nixl", "torch_xccl")
_NCCL = ("torch_nccl", "pynccl")
_STAGES = ("all", "prefill", "decode")
#: the heartbeat's default timeout, in intervals: a rank must miss this many beats in a row to be declared failed
_HEARTBEAT_TIMEOUTS = 10
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_RESILIENCE_KEYS = ("spread_nodes", "min_replicas", "hot_experts")

#: accepted key -> the setting it sets (a field, or one of the mode keys resolved by from_dict)
_ALIASES = {
    "mode": "mode",
    "dynamic_eplb": "dynamic_eplb",
    "expert_map_record_path": "record_path",
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
    "load_collection_phase": "stage",
    "stage": "stage",
    "log_balancedness": "log_balancedness",
    "log_balancedness_interval": "log_balancedness_interval",
    "use_async": "use_async",
    "communicator": "communicator",
    "enable_migration_batching": "enable_migration_batching",
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
    "measured_price": "measured_price",
    "heartbeat_interval_s": "heartbeat_interval_s",
    "heartbeat_timeout_s": "heartbeat_timeout_s",
    "heartbeat_abort_serving": "heartbeat_abort_serving",
    "adaptive_cadence": "adaptive_cadence",
}
#: vllm-ascend keys whose files must end in .json (vllm-ascend refuses others)
_JSON_KEYS = ("expert_map_path", "expert_map_record_path")


class ConfigError(EplbError):
    """The EPLB configuration is invalid."""


def _did_you_mean(value, allowed) -> str:
    hint = difflib.get_close_matches(str(value), list(allowed), n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""


def _int(key: str, value, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{key} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in {minimum}-{maximum}"
        raise ConfigError(f"{key} must be an integer {bound}, got {value}")
    return int(value)


def _float(key: str, value, low: float, high: float | None = None, low_open: bool = True) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if isinstance(value, bool) or out != out or (out <= low if low_open else out < low) or (
            high is not None and out > high) or out == float("inf"):
        bound = f"in [{low}, {high}]" if high is not None else f"> {low}"
        raise ConfigError(f"{key} must be {bound}, got {value!r}")
    return out


def _bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def _choice(key: str, value, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}{_did_you_mean(value, allowed)}")
    return value


def _path(key: str, value) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ConfigError(f"{key} must be a file path, got {value!r}")
    path = str(Path(value))
    if key in _JSON_KEYS and not path.endswith(".json"):
        raise ConfigError(f"{key}={value!r} must end in .json (vllm-ascend reads and writes JSON expert maps)")
    return path


def _policy(key: str, value) -> str:
    from eplb.policies import available_policies

    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a policy name or id, got {value!r}")
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        if int(value) not in POLICY_IDS:
            raise ConfigError(f"{key} must be a vllm-ascend policy id in {sorted(POLICY_IDS)}, got {value}")
        return POLICY_IDS[int(value)]
    return _choice(key, value, tuple(available_policies()))


def _policy_options(key: str, value, policy: str) -> dict:
    from eplb.policies import get_policy

    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{key} must be a dict of option name -> value, got {value!r}")
    if not value:
        return {}
    try:
        get_policy(policy, **value)
    except EplbError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    except (TypeError, ValueError) as exc:  # an option of the right name with a value the policy cannot take
        raise ConfigError(f"{key} {value!r} for policy {policy!r}: {exc}") from None
    return dict(value)


def _resilience(key: str, value) -> Resilience | None:
    if value is None or isinstance(value, Resilience):
        return value
    if isinstance(value, bool):
        return Resilience() if value else None
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be true/false or a dict of {', '.join(_RESILIENCE_KEYS)}, got {value!r}")
    unknown = sorted(set(value) - set(_RESILIENCE_KEYS))
    if unknown:
        raise ConfigError(f"{key}: unknown key {unknown[0]!r}; expected some of {', '.join(_RESILIENCE_KEYS)}"
                          f"{_did_you_mean(unknown[0], _RESILIENCE_KEYS)}")
    value = dict(value)
    if "spread_nodes" in value:
        value["spread_nodes"] = _bool(f"{key}.spread_nodes", value["spread_nodes"])
    for name in ("min_replicas", "hot_experts"):
        if name in value:
            value[name] = _int(f"{key}.{name}", value[name], 1 if name == "min_replicas" else 0)
    return Resilience(**value)


def _adaptive_cadence(key: str, value) -> AdaptiveCadence | None:
    if value is None or isinstance(value, AdaptiveCadence):
        return value
    names = ("min_steps", "max_steps", "window_steps", "tolerance")
    if not isinstance(value, dict) or not set(names[:3]) <= set(value) or set(value) - set(names):
        raise ConfigError(f"{key} must be a dict of {', '.join(names[:3])} (and optionally tolerance), got {value!r}")
    try:
        return AdaptiveCadence(**{name: _int(f"{key}.{name}", value[name], 1) for name in names[:3]},
                               tolerance=_float(f"{key}.tolerance", value.get("tolerance", 0.05), 0.0,
                                                low_open=False))
    except ConfigError:
        raise
    except EplbError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _communicator(key: str, value) -> str | None:
    if value is None:
        return None
    if value in ("gloo", "nccl", "xccl"):
        raise ConfigError(f"{key} takes vLLM's values ({', '.join(COMMUNICATORS)}), got {value!r}; did you mean "
                          f"'torch_{value}'?")
    value = _choice(key, value, COMMUNICATORS)
    if value in ("nixl", "torch_xccl"):
        raise ConfigError(f"{key}={value!r} is not available in eplb; use torch_gloo (the default) or torch_nccl")
    if value in _NCCL:
        try:
            import torch
            import torch.distributed as dist
        except ImportError:
            raise ConfigError(f"{key}={value!r} needs torch built with CUDA and NCCL; torch is not installed") \
                from None
        if not (torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available()):
            raise ConfigError(f"{key}={value!r} needs CUDA and NCCL, which this torch build "
                              f"({torch.__version__}) does not have here; use torch_gloo")
    return value


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


#: field -> how its value is checked: (key for messages, value) -> normalized value
_CHECKS = {
    "mode": lambda k, v: _choice(k, v, MODES),
    "window_steps": lambda k, v: _int(k, v, 1),
    "interval_steps": lambda k, v: _int(k, v, 1),
    "planner_check_steps": lambda k, v: _int(k, v, 1),
    "policy": _policy,
    "resilience": _resilience,
    "num_redundant_experts": lambda k, v: _int(k, v, 0),
    "map_path": _path,
    "record_path": _path,
    "stage": lambda k, v: _choice(k, v, _STAGES),
    "log_balancedness": _bool,
    "log_balancedness_interval": lambda k, v: _int(k, v, 1),
    "use_async": _bool,
    "dynamic_eplb": _bool,
    "communicator": _communicator,
    "enable_migration_batching": _bool,
    "update_interval_s": lambda k, v: _float(k, v, 0.0),
    "update_threshold": lambda k, v: _float(k, v, 0.0, 1.0, low_open=False),
    "planner_deadline_s": lambda k, v: _float(k, v, 0.0),
    "layers_per_step": lambda k, v: _int(k, v, 1),
    "bytes_per_step": lambda k, v: _int(k, v, 1),
    "dispatch": lambda k, v: _choice(k, v, RUNTIME_MODES),
    "ring_steps": lambda k, v: _int(k, v, 0),
    "prometheus_port": lambda k, v: _int(k, v, 1, 65535),
    "measured_price": _bool,
    "heartbeat_interval_s": lambda k, v: _float(k, v, 0.0),
    "heartbeat_timeout_s": lambda k, v: _float(k, v, 0.0),
    "heartbeat_abort_serving": _bool,
    "adaptive_cadence": lambda k, v: _adaptive_cadence(k, v),
}


@dataclass(frozen=True)
class EplbConfig:
    """Validated runtime settings; see the module docstring for every key.

    Build it with :meth:`from_dict` (engine-style keys, environment guards) or directly with the field names; both
    check everything.

    Raises:
        ConfigError: any invalid field (named, with the value and what was expected).
    """

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
    log_balancedness_interval: int = 1
    communicator: str | None = None
    enable_migration_batching: bool = False
    update_interval_s: float | None = None
    update_threshold: float | None = None
    planner_deadline_s: float = 30.0
    layers_per_step: int = 1
    bytes_per_step: int | None = None
    dispatch: str = "rank"
    ring_steps: int | None = None
    prometheus_port: int | None = None
    measured_price: bool = True
    heartbeat_interval_s: float | None = None
    heartbeat_timeout_s: float | None = None
    heartbeat_abort_serving: bool = False
    adaptive_cadence: AdaptiveCadence | None = None

    def __post_init__(self):
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in _checked(values, {}).items():
            object.__setattr__(self, name, value)
        if self.record_path is not None:  # last: nothing is created for a config that is not valid
            try:
                Path(self.record_path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"record_path={self.record_path!r}: cannot create its folder: "
                                  f"{exc.strerror or exc}") from None

    @property
    def cycle_steps(self) -> int:
        """Steps from the start of one cycle to the start of the next (at least the window)."""
        return max(self.interval_steps or self.window_steps, self.window_steps)

    @property
    def transfer_backend(self) -> str:
        """``"gloo"`` or ``"nccl"``: the backend the ``communicator`` setting asks for (Gloo when unset)."""
        return "nccl" if self.communicator in _NCCL else "gloo"

    @classmethod
    def from_dict(cls, config: dict | None, env=None) -> "EplbConfig":
        """Validate a user dict (vllm-ascend, vLLM or xLLM keys) into an :class:`EplbConfig`.

        Args:
            config: the settings; ``None`` or ``{}`` means EPLB off. A key set to ``None`` counts as not set when
                its setting is optional (vllm-ascend's and vLLM's defaults for paths and ``communicator``).
            env: environment for the vllm-ascend guards (default ``os.environ``).

        Raises:
            ConfigError: unknown key (with a suggestion), wrong type, out-of-range value, unknown policy, policy
            id or policy option, conflicting keys, missing environment guard, a record folder that cannot be made.
        """
        env = os.environ if env is None else env
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise ConfigError(f"the EPLB config must be a dict of settings, got {type(config).__name__}")
        values: dict = {}
        names: dict = {}
        for key, value in config.items():
            if key not in _ALIASES:
                raise ConfigError(f"unknown EPLB config key {key!r}{_did_you_mean(key, _ALIASES)}")
            name = _ALIASES[key]
            if value is None and _optional(name):
                continue
            # policy_options are checked later, against the policy
            value = value if name == "policy_options" else _CHECKS[name](key, value)
            if name in values and values[name] != value:
                raise ConfigError(f"{names[name]}={config[names[name]]!r} and {key}={config[key]!r} set the same "
                                  "thing differently; keep one")
            values[name], names[name] = value, key
        values["mode"] = _mode(values, names, env)
        for name in ("dynamic_eplb", "use_async"):
            values.pop(name, None)
        return cls(**_checked(values, names))

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


def _optional(name: str) -> bool:
    """Whether ``None`` means "not set" for the setting ``name``."""
    defaults = {f.name: f.default for f in fields(EplbConfig)}
    return name in ("dynamic_eplb", "use_async") or defaults.get(name, 0) is None


def _mode(values: dict, names: dict, env) -> str:
    """The mode the keys ask for, with vllm-ascend's guard and its rule that a record path records."""
    guarded = [names[n] for n in ("dynamic_eplb", "record_path")
               if names.get(n) in ("dynamic_eplb", "expert_map_record_path") and values[n]]
    if guarded and not (str(env.get("DYNAMIC_EPLB", "false")).lower() in ("true", "1")
                        or str(env.get("EXPERT_MAP_RECORD", "false")) == "true"):
        raise ConfigError(f"{guarded[0]} needs the environment variable DYNAMIC_EPLB=true (or 1) or "
                          "EXPERT_MAP_RECORD=true (vllm-ascend's guard); set one, or use "
                          f"{'mode=dynamic' if guarded[0] == 'dynamic_eplb' else 'record_path'}")
    implied = None
    if values.get("dynamic_eplb"):
        implied = "dynamic"
    if "record_path" in values:
        implied = "record"  # vllm-ascend: a record path turns dynamic EPLB on and writes maps instead of moving
    mode = values.get("mode")
    if mode is None:
        return implied or ("static" if "map_path" in values else "off")
    if implied is not None and mode != implied and not (mode == "dynamic" and implied == "record"):
        raise ConfigError(f"mode={mode!r} and {names['record_path' if implied == 'record' else 'dynamic_eplb']} "
                          f"(mode {implied}) ask for different modes; pick one")
    return implied if mode == "dynamic" and implied == "record" else mode


def _checked(values: dict, names: dict) -> dict:
    """``values`` (field -> value) normalized and checked as a whole; ``names`` gives the user's key of a field."""
    out = dict(values)

    def key(name: str) -> str:
        return names.get(name, name)

    settings = {f.name for f in fields(EplbConfig)}
    for name, check in _CHECKS.items():
        if name in settings and out.get(name) is not None:
            out[name] = check(key(name), out[name])
    if "policy_options" in out:
        out["policy_options"] = _policy_options(key("policy_options"), out["policy_options"],
                                                out.get("policy", "auto"))
    mode = out.get("mode", "off")
    if out.get("map_path") is not None and not Path(out["map_path"]).is_file():
        raise ConfigError(f"{key('map_path')}={out['map_path']!r}: no such file")
    if mode == "static" and out.get("map_path") is None:
        raise ConfigError("static mode needs expert_map_path (the map to load at start)")
    if mode == "record" and out.get("record_path") is None:
        raise ConfigError("record mode needs expert_map_record_path or record_path (where the map is written)")
    interval, timeout = out.get("heartbeat_interval_s"), out.get("heartbeat_timeout_s")
    if interval is None and (timeout is not None or out.get("heartbeat_abort_serving")):
        name = key("heartbeat_timeout_s") if timeout is not None else key("heartbeat_abort_serving")
        raise ConfigError(f"{name} needs heartbeat_interval_s (the heartbeat is off without it)")
    if interval is not None:
        if timeout is None:
            out["heartbeat_timeout_s"] = timeout = _HEARTBEAT_TIMEOUTS * interval
        if timeout <= interval:
            raise ConfigError(f"{key('heartbeat_timeout_s')}={timeout!r} must be greater than "
                              f"{key('heartbeat_interval_s')}={interval!r} (a live rank beats once per interval)")
    if out.get("record_path") is not None:
        problem = _folder_problem(key("record_path"), out["record_path"])
        if problem:
            raise ConfigError(problem)
    return out
