"""EplbConfig: the runtime's settings, validated strictly and once.

Build it with :meth:`EplbConfig.from_dict` (eplb's keys, vLLM's spellings, or an engine's dialect: vllm-ascend's
whole ``additional_config``, xLLM's flags; :mod:`eplb.runtime.dialects`) or with the field names. Either way the
whole config is checked once, in the constructor: types, ranges, choices, the policy's options against its
signature, settings that contradict each other. Errors name the key the user wrote; two keys for one setting must
agree (``100`` and ``"100"`` do). Building a config touches nothing outside it: the map file, the record folder,
NCCL and prometheus_client are looked at when the controller starts (:func:`eplb.runtime.startup.prepare`).

Every key, its default and its meaning: docs/config.md. The settings are the fields of :class:`EplbConfig`; the keys
that spell them are :data:`_ALIASES`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields

from eplb.cycle.cadence import AdaptiveCadence
from eplb.dispatch import RUNTIME_RULES
from eplb.errors import ConfigError, EplbError, did_you_mean
from eplb.policies import POLICY_IDS, policy_id
from eplb.policies.shared.resilience import Resilience
from eplb.runtime import dialects
from eplb.runtime.config_values import read_bool, read_choice, read_float, read_int, read_path
from eplb.runtime.load_history import HISTORIES as LOAD_HISTORIES

__all__ = ["EplbConfig", "ConfigError", "MODES", "COMMUNICATORS", "LOAD_HISTORIES"]

log = logging.getLogger(__name__)

MODES = ("off", "dynamic", "record", "static")
#: vLLM's ``communicator`` values; eplb provides Gloo and NCCL transfers
COMMUNICATORS = ("torch_gloo", "torch_nccl", "pynccl", "nixl", "torch_xccl")
_NCCL = ("torch_nccl", "pynccl")
_STAGES = ("all", "prefill", "decode")
#: the heartbeat's default timeout, in intervals: a rank must miss this many beats in a row to be declared failed
_HEARTBEAT_TIMEOUTS = 10
_RESILIENCE_KEYS = ("spread_nodes", "min_replicas", "hot_experts")
#: keys read into the mode (resolved by from_dict, not settings of their own)
_MODE_KEYS = ("dynamic_eplb", "enable_eplb")
#: keys accepted for compatibility that change nothing here (still type-checked)
_NO_EFFECT = ("use_async", "expert_parallel_degree")

#: accepted key -> the setting it sets (a field, a mode key, or a key with no effect)
_ALIASES = {
    "mode": "mode", "dynamic_eplb": "dynamic_eplb", "enable_eplb": "enable_eplb",
    "expert_map_record_path": "record_path", "record_path": "record_path",
    "expert_map_path": "map_path", "map_path": "map_path",
    "expert_heat_collection_interval": "window_steps", "window_size": "window_steps", "window_steps": "window_steps",
    "step_interval": "interval_steps", "interval_steps": "interval_steps",
    "planner_check_steps": "planner_check_steps",
    "algorithm_execution_interval": "apply_steps", "apply_steps": "apply_steps",
    "eplb_policy_type": "policy", "policy": "policy", "policy_options": "policy_options",
    "resilience": "resilience",
    "num_redundant_experts": "num_redundant_experts", "redundant_experts_num": "redundant_per_rank",
    "ep_size": "ep_size",
    "eplb_heat_collection_stage": "stage", "load_collection_phase": "stage", "stage": "stage",
    "log_balancedness": "log_balancedness", "log_balancedness_interval": "log_balancedness_interval",
    "use_async": "use_async", "expert_parallel_degree": "expert_parallel_degree",
    "communicator": "communicator", "enable_migration_batching": "enable_migration_batching",
    "eplb_update_interval": "update_interval_s", "update_interval_s": "update_interval_s",
    "eplb_update_threshold": "update_threshold", "update_threshold": "update_threshold",
    "load_history": "load_history",
    "planner_deadline_s": "planner_deadline_s",
    "transfer_deadline_s": "transfer_deadline_s",
    "layers_per_step": "layers_per_step", "bytes_per_step": "bytes_per_step",
    "dispatch": "dispatch", "router_mode": "dispatch",
    "ring_steps": "ring_steps",
    "prometheus_port": "prometheus_port",
    "measured_price": "measured_price",
    "heartbeat_interval_s": "heartbeat_interval_s", "heartbeat_timeout_s": "heartbeat_timeout_s",
    "heartbeat_abort_serving": "heartbeat_abort_serving",
    "adaptive_cadence": "adaptive_cadence",
}


def _policy(key: str, value) -> str:
    from eplb.policies import available_policies

    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a policy name or id, got {value!r}")
    index = policy_id(value)
    if index is not None:
        if index not in POLICY_IDS:
            raise ConfigError(f"{key} must be a vllm-ascend policy id in {sorted(POLICY_IDS)}, got {value}")
        return POLICY_IDS[index]
    if isinstance(value, str) and value in dialects.ASCEND_POLICY_NAMES:
        return dialects.ASCEND_POLICY_NAMES[value]
    return read_choice(key, value, tuple(available_policies()) + tuple(dialects.ASCEND_POLICY_NAMES))


def _policy_options(key: str, value) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{key} must be a dict of option name -> value, got {value!r}")
    return dict(value)


def _planner(config: dict, names: dict):
    """The policy the settings ask for, built once with its options (which it checks against its signature)."""
    from eplb.policies import get_policy

    policy = _policy(names.get("policy", "policy"), config.get("policy", "auto"))
    options = config.get("policy_options") or {}
    try:
        return get_policy(policy, **options)
    except EplbError as exc:
        raise ConfigError(f"{names.get('policy_options', 'policy_options')}: {exc}") from None
    except (TypeError, ValueError) as exc:  # an option of the right name with a value the policy cannot take
        raise ConfigError(f"{names.get('policy_options', 'policy_options')} {options!r} for policy {policy!r}: "
                          f"{exc}") from None


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
                          f"{did_you_mean(unknown[0], _RESILIENCE_KEYS)}")
    value = dict(value)
    if "spread_nodes" in value:
        value["spread_nodes"] = read_bool(f"{key}.spread_nodes", value["spread_nodes"])
    for name in ("min_replicas", "hot_experts"):
        if name in value:
            value[name] = read_int(f"{key}.{name}", value[name], 1 if name == "min_replicas" else 0)
    return Resilience(**value)


def _adaptive_cadence(key: str, value) -> AdaptiveCadence | None:
    if value is None or isinstance(value, AdaptiveCadence):
        return value
    names = ("min_steps", "max_steps", "window_steps", "tolerance")
    if not isinstance(value, dict) or not set(names[:3]) <= set(value) or set(value) - set(names):
        raise ConfigError(f"{key} must be a dict of {', '.join(names[:3])} (and optionally tolerance), got {value!r}")
    try:
        return AdaptiveCadence(**{name: read_int(f"{key}.{name}", value[name], 1) for name in names[:3]},
                               tolerance=read_float(f"{key}.tolerance", value.get("tolerance", 0.05), 0.0,
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
    value = read_choice(key, value, COMMUNICATORS)
    if value in ("nixl", "torch_xccl"):
        raise ConfigError(f"{key}={value!r} is not available in eplb; use torch_gloo (the default) or torch_nccl")
    return value


#: setting -> how its value is checked: (key for messages, value) -> normalized value
_CHECKS = {
    "mode": lambda k, v: read_choice(k, v, MODES),
    "window_steps": lambda k, v: read_int(k, v, 1),
    "interval_steps": lambda k, v: read_int(k, v, 1),
    "planner_check_steps": lambda k, v: read_int(k, v, 1),
    "apply_steps": lambda k, v: read_int(k, v, 1),
    "policy": _policy,
    "policy_options": _policy_options,
    "resilience": _resilience,
    "num_redundant_experts": lambda k, v: read_int(k, v, 0),
    "redundant_per_rank": lambda k, v: read_int(k, v, 0),
    "ep_size": lambda k, v: read_int(k, v, 1),
    "map_path": read_path,
    "record_path": read_path,
    "stage": lambda k, v: read_choice(k, v, _STAGES),
    "log_balancedness": read_bool,
    "log_balancedness_interval": lambda k, v: read_int(k, v, 1),
    "communicator": _communicator,
    "enable_migration_batching": read_bool,
    "update_interval_s": lambda k, v: read_float(k, v, 0.0),
    "update_threshold": lambda k, v: read_float(k, v, 0.0, 1.0, low_open=False),
    "load_history": lambda k, v: read_choice(k, v, LOAD_HISTORIES),
    "planner_deadline_s": lambda k, v: read_float(k, v, 0.0),
    "transfer_deadline_s": lambda k, v: read_float(k, v, 0.0),
    "layers_per_step": lambda k, v: read_int(k, v, 1),
    "bytes_per_step": lambda k, v: read_int(k, v, 1),
    "dispatch": lambda k, v: read_choice(k, v, RUNTIME_RULES),
    "ring_steps": lambda k, v: read_int(k, v, 0),
    "prometheus_port": lambda k, v: read_int(k, v, 1, 65535),
    "measured_price": read_bool,
    "heartbeat_interval_s": lambda k, v: read_float(k, v, 0.0),
    "heartbeat_timeout_s": lambda k, v: read_float(k, v, 0.0),
    "heartbeat_abort_serving": read_bool,
    "dialect": lambda k, v: read_choice(k, v, dialects.DIALECTS),
    # read by from_dict, never stored
    "dynamic_eplb": read_bool,
    "enable_eplb": read_bool,
    "use_async": read_bool,
    "expert_parallel_degree": lambda k, v: read_int(k, v, 0),
    "adaptive_cadence": lambda k, v: _adaptive_cadence(k, v),
}


@dataclass(frozen=True)
class EplbConfig:
    """Validated runtime settings; see the module docstring for every key.

    Attributes besides the settings:
        dialect: ``eplb``, ``vllm-ascend`` or ``xllm``: whose meaning the keys had (:mod:`eplb.runtime.dialects`).
        keys: setting -> the key the user wrote for it (messages and the start-up line name it).

    Raises:
        ConfigError: any invalid field (named, with the value and what was expected).
    """

    mode: str = "off"
    window_steps: int = 1000
    interval_steps: int | None = None
    planner_check_steps: int = 8
    apply_steps: int | None = None
    policy: str = "auto"
    policy_options: dict = field(default_factory=dict)
    resilience: Resilience | None = None
    num_redundant_experts: int | None = None
    redundant_per_rank: int | None = None
    ep_size: int | None = None
    map_path: str | None = None
    record_path: str | None = None
    stage: str = "all"
    log_balancedness: bool = False
    log_balancedness_interval: int = 1
    communicator: str | None = None
    enable_migration_batching: bool = False
    update_interval_s: float | None = None
    update_threshold: float | None = None
    load_history: str = "window"
    planner_deadline_s: float = 30.0
    transfer_deadline_s: float = 60.0
    layers_per_step: int = 1
    bytes_per_step: int | None = None
    dispatch: str = "rank"
    ring_steps: int | None = None
    prometheus_port: int | None = None
    measured_price: bool = True
    heartbeat_interval_s: float | None = None
    heartbeat_timeout_s: float | None = None
    heartbeat_abort_serving: bool = False
    dialect: str = dialects.EPLB
    keys: dict = field(default_factory=dict, compare=False, repr=False)
    adaptive_cadence: AdaptiveCadence | None = None

    def __post_init__(self):
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "keys"}
        for name, value in _checked(values, self.keys).items():
            object.__setattr__(self, name, value)

    @property
    def cycle_steps(self) -> int:
        """Steps from the start of one cycle to the start of the next (at least the window); with
        ``update_interval_s`` the timer starts cycles and this is only the expected length of one."""
        return max(self.interval_steps or self.window_steps, self.window_steps)

    @property
    def transfer_backend(self) -> str:
        """``"gloo"`` or ``"nccl"``: the backend the ``communicator`` setting asks for (Gloo when unset)."""
        return "nccl" if self.communicator in _NCCL else "gloo"

    def check_step(self, waited: int) -> bool:
        """Whether the step ``waited`` steps after a window's end checks the planner (all ranks agree on its state,
        read at the next check). Checks come every ``planner_check_steps``; with ``apply_steps`` A they are
        aligned so that one falls A - 1 steps after the window: a plan every rank had by the check before moves
        exactly A steps after its window."""
        offset = self.apply_steps - 1 if self.apply_steps else 0
        return (waited - offset) % self.planner_check_steps == 0

    @classmethod
    def from_dict(cls, config: dict | None, env=None) -> "EplbConfig":
        """The settings of a user dict: eplb's keys, vLLM's spellings, vllm-ascend's whole ``additional_config`` or
        xLLM's flags (:mod:`eplb.runtime.dialects`: an engine's keys mean what they mean there, with its defaults).

        Args:
            config: the settings; ``None`` or ``{}`` means EPLB off. A key set to ``None`` counts as not set when
                its setting is optional (vllm-ascend's and vLLM's defaults for paths and ``communicator``).
            env: environment for the vllm-ascend guards (default ``os.environ``).

        Raises:
            ConfigError: unknown key (with a suggestion), wrong type, out-of-range value, unknown policy, policy
            id or policy option, conflicting keys, two engines' keys mixed, missing environment guard.
        """
        env = os.environ if env is None else env
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise ConfigError(f"the EPLB config must be a dict of settings, got {type(config).__name__}")
        flat, dialect, ignored = dialects.read(config, _ALIASES)
        if ignored:
            log.debug("eplb: additional_config sections left to vllm-ascend: %s", ", ".join(ignored))
        values: dict = {}
        names: dict = {}
        for key, value in flat.items():
            if key not in _ALIASES:
                raise ConfigError(f"unknown EPLB config key {key!r}{did_you_mean(key, [*_ALIASES, 'eplb_config'])}")
            name = _ALIASES[key]
            if value is None and _optional(name):
                continue
            if name in values:  # a second spelling of one setting must agree with the first
                first = names[name]
                if _CHECKS[name](first, values[name]) != _CHECKS[name](key, value):
                    raise ConfigError(f"{first}={flat[first]!r} and {key}={value!r} set the same thing "
                                      "differently; keep one")
                continue
            values[name], names[name] = value, key
        values["mode"] = _mode(values, names, env)
        for name in _NO_EFFECT:
            if name in values:
                _CHECKS[name](names.pop(name), values.pop(name))
        values.update(dialects.defaults(dialect, values,
                                        lambda policy: _planner({**values, "policy": policy}, names).wants_steps))
        return cls(**values, dialect=dialect, keys=names)

def _optional(name: str) -> bool:
    """Whether ``None`` means "not set" for the setting ``name``."""
    defaults = {f.name: f.default for f in fields(EplbConfig)}
    return name in _MODE_KEYS + _NO_EFFECT or defaults.get(name, 0) is None


def _mode(values: dict, names: dict, env) -> str:
    """The mode the keys ask for (``mode``, vllm-ascend's ``dynamic_eplb`` and record path with its environment
    guard, xLLM's ``enable_eplb``); the mode keys are taken out of ``values``."""
    flags = {key: read_bool(names.pop(key), values.pop(key)) for key in _MODE_KEYS if key in values}
    guarded = [key for key in ("dynamic_eplb", "expert_map_record_path")
               if flags.get(key) or (key == names.get("record_path") and values.get("record_path"))]
    if guarded and not (str(env.get("DYNAMIC_EPLB", "false")).lower() in ("true", "1")
                        or str(env.get("EXPERT_MAP_RECORD", "false")) == "true"):
        raise ConfigError(f"{guarded[0]} needs the environment variable DYNAMIC_EPLB=true (or 1) or "
                          "EXPERT_MAP_RECORD=true (vllm-ascend's guard); set one, or use "
                          f"{'mode=dynamic' if guarded[0] == 'dynamic_eplb' else 'record_path'}")
    implied, source = None, None
    if "enable_eplb" in flags:
        implied, source = ("dynamic" if flags["enable_eplb"] else "off"), "enable_eplb"
    if flags.get("dynamic_eplb"):
        implied, source = "dynamic", "dynamic_eplb"
    if "record_path" in values and implied != "off":
        # vllm-ascend: a record path turns dynamic EPLB on and writes maps instead of moving weights
        implied, source = "record", names["record_path"]
    mode = values.get("mode")
    if mode is None:
        if implied is not None:
            names["mode"] = source
        return implied or ("static" if "map_path" in values else "off")
    mode = _CHECKS["mode"](names["mode"], mode)
    if implied is not None and mode != implied and not (mode == "dynamic" and implied == "record"):
        raise ConfigError(f"mode={mode!r} and {source} (mode {implied}) ask for different modes; pick one")
    return implied if mode == "dynamic" and implied == "record" else mode


def _checked(values: dict, names: dict) -> dict:
    """``values`` (setting -> value) normalized and checked as a whole; ``names`` gives the user's key of a setting."""
    out = dict(values)

    def key(name: str) -> str:
        return names.get(name, name)

    for name, value in values.items():
        if value is not None and name in _CHECKS:
            out[name] = _CHECKS[name](key(name), value)
    mode = out.get("mode", "off")
    if mode == "static" and out.get("map_path") is None:
        raise ConfigError("static mode needs expert_map_path (the map to load at start)")
    if mode == "record" and out.get("record_path") is None:
        raise ConfigError("record mode needs expert_map_record_path or record_path (where the map is written)")
    if out.get("update_interval_s") is not None and out.get("interval_steps") is not None:
        raise ConfigError(f"{key('update_interval_s')} (seconds) and {key('interval_steps')} (steps) both say when a "
                          "cycle starts; keep one")
    halve = out.get("load_history") == "halve"
    planner = _planner(out, names) if out.get("policy_options") or halve else None
    if halve:
        ring = (out.get("ring_steps") or out.get("interval_steps") and out["interval_steps"] > out["window_steps"]
                or planner.wants_steps)
        if ring:
            raise ConfigError(f"load_history='halve' adds windows up into one load; policy {out['policy']!r} with "
                              "these settings plans on per-step rows (ring_steps, interval_steps longer than the "
                              "window, or a per-step policy such as auto or flashlb): use load_history='window' or "
                              "a policy that plans on sums (default, swift, random)")
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
    return out
