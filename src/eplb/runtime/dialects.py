"""The engines' EPLB settings read as the engines mean them: vllm-ascend's ``additional_config`` and xLLM's flags.

:meth:`eplb.runtime.EplbConfig.from_dict` calls :func:`read` first: it unwraps vllm-ascend's ``eplb_config``, tells
the dialect from the keys and hands back eplb-style keys, plus the defaults of that engine for what the user left
unset. eplb's own keys keep eplb's defaults; a dict may add eplb's (or vLLM's) keys to one engine's keys, never mix
two engines' keys.

vllm-ascend (Model Runner V1, ``vllm_ascend/ascend_config.py`` and ``vllm_ascend/eplb/eplb_updator.py``):

=====================================  ==========================================================================
key (vllm-ascend default)              meaning in eplb (same as in vllm-ascend unless said)
=====================================  ==========================================================================
``eplb_config`` (the wrapper)          the whole ``--additional-config`` is accepted: its other sections belong to
                                       vllm-ascend and are left alone
``dynamic_eplb`` (false)               dynamic mode; needs ``DYNAMIC_EPLB=true`` (or ``1``) or
                                       ``EXPERT_MAP_RECORD=true`` in the environment, as vllm-ascend asserts
``expert_heat_collection_interval``    steps of one load window
  (600)
``algorithm_execution_interval`` (50)  a window's plan moves its first layer A steps after the window (in force one
                                       step later), one layer per step. vllm-ascend blocks serving at step A - 1
                                       until its planner answers; eplb never waits: a late plan moves at the first
                                       step after every rank has it, and a planner past ``planner_deadline_s`` skips
                                       the cycle (serving goes on with the placement in force)
``eplb_policy_type`` (2)               0-3 or vllm-ascend's policy names: ``RandomLoadBalance`` (0), ``DefaultEplb``
                                       (1), ``SwiftBalanceEplb`` / ``swift_balancer`` (2), ``FlashLB`` (3)
``num_redundant_experts`` (0)          checked against the cluster at start
``expert_map_path`` / ``expert_map_record_path``  static mode / record mode (``.json`` files)
``eplb_heat_collection_stage`` (all)   which steps' load counts; ``load_collection_phase`` (Model Runner V2)
=====================================  ==========================================================================

The plan agreement needs every rank's planner reply one step before the move, so eplb checks the planner every step
in this dialect (``planner_check_steps`` 1 unless set). Unlike vllm-ascend, eplb starts the next window at the end
of the last one (vllm-ascend: after the layers moved), and counts every step towards a window (vllm-ascend: only the
steps of ``eplb_heat_collection_stage``).

xLLM (``xllm/core/framework/config/eplb_config.cpp``, ``xllm/core/framework/eplb/``):

=====================================  ==========================================================================
flag (xLLM default)                    meaning in eplb
=====================================  ==========================================================================
``enable_eplb`` (false)                dynamic mode (false: off)
``eplb_update_interval`` (1000)        seconds between two plans, on a timer of its own: a window ends at the first
                                       step at which every rank knows some rank's clock passed it
                                       (:class:`eplb.runtime.timing.UpdateTimer`), not at a step count
``eplb_update_threshold`` (0.8)        a layer is re-planned only when the cosine similarity of its load to the
                                       load it was last re-planned on is below this
``ep_size``                            checked against the EP group's size at start
``redundant_experts_num`` (1)          redundant slots per rank; checked against the cluster at start
``expert_parallel_degree``             accepted; xLLM's dispatch rule, no effect here
=====================================  ==========================================================================

and, as in xLLM, the load a plan sees accumulates over windows and is halved after each plan
(``load_history: halve``, :mod:`eplb.runtime.load_history`). xLLM's own policy is a greedy pack of the hottest
replicas; the nearest eplb policy, ``default`` (DeepSeek's), runs unless ``policy`` is set. :func:`xllm_flags`
reads xLLM's ``--flag=value`` command-line form.
"""

from __future__ import annotations

import shlex

from eplb.errors import ConfigError, did_you_mean

__all__ = ["EPLB", "VLLM_ASCEND", "XLLM", "DIALECTS", "ASCEND_POLICY_NAMES", "DEFAULTS", "read", "defaults",
           "xllm_flags"]

EPLB, VLLM_ASCEND, XLLM = "eplb", "vllm-ascend", "xllm"
DIALECTS = (EPLB, VLLM_ASCEND, XLLM)

#: vllm-ascend's policy classes (as its logs and docs name them) -> eplb's policy
ASCEND_POLICY_NAMES = {"RandomLoadBalance": "random", "DefaultEplb": "default", "SwiftBalanceEplb": "swift",
                       "swift_balancer": "swift", "FlashLB": "flashlb"}

_WRAPPER = "eplb_config"
#: keys only vllm-ascend's Model Runner V1 EPLB uses: they select its dialect
_ASCEND_KEYS = ("dynamic_eplb", "expert_heat_collection_interval", "algorithm_execution_interval", "eplb_policy_type",
                "expert_map_path", "expert_map_record_path", "eplb_heat_collection_stage")
#: keys only xLLM uses
_XLLM_KEYS = ("enable_eplb", "eplb_update_interval", "eplb_update_threshold", "ep_size", "redundant_experts_num",
              "expert_parallel_degree")
#: each engine's defaults, as eplb settings (``policy`` by eplb's name)
DEFAULTS = {
    VLLM_ASCEND: {"window_steps": 600, "apply_steps": 50, "policy": "swift", "planner_check_steps": 1},
    XLLM: {"update_interval_s": 1000.0, "update_threshold": 0.8, "load_history": "halve", "policy": "default"},
}

def read(config: dict, known) -> tuple[dict, str, list[str]]:
    """``config`` as flat eplb-style keys, its dialect, and the top-level keys left to the engine.

    Args:
        config: the user's dict: eplb's keys, or an engine's (vllm-ascend's whole ``additional_config``, xLLM's
            flags as a dict).
        known: every key eplb accepts (for the check of the wrapper's contents).

    Raises:
        ConfigError: a wrapper that is not a dict, a key both inside and outside the wrapper with different
            values, or keys of both vllm-ascend and xLLM.
    """
    flat, ignored = dict(config), []
    if _WRAPPER in flat:
        inner = flat.pop(_WRAPPER)
        inner = {} if inner is None else inner
        if not isinstance(inner, dict):
            raise ConfigError(f"{_WRAPPER} must be a dict of vllm-ascend EPLB settings, got {type(inner).__name__}")
        # the rest of an additional_config is vllm-ascend's own (graph mode, schedulers, ...): not EPLB's business
        ignored = sorted(k for k in flat if k not in known)
        flat = {k: v for k, v in flat.items() if k in known}
        for key, value in inner.items():
            if key in flat and flat[key] != value:
                raise ConfigError(f"{key} is set inside {_WRAPPER} ({value!r}) and beside it ({flat[key]!r}); "
                                   "keep one")
            flat[key] = value
    ascend = [k for k in _ASCEND_KEYS if k in flat]
    xllm = [k for k in _XLLM_KEYS if k in flat]
    if ascend and xllm:
        raise ConfigError(f"vllm-ascend's {ascend[0]} and xLLM's {xllm[0]} in one config: their timing and load "
                           "rules differ; use one engine's keys (eplb's own keys go with either)")
    dialect = VLLM_ASCEND if ascend else XLLM if xllm else EPLB
    return flat, dialect, ignored


def defaults(dialect: str, values: dict, wants_steps) -> dict:
    """The engine's defaults for the settings ``values`` (setting -> value) leaves unset. ``wants_steps()`` says
    whether the policy plans on per-step rows: xLLM's accumulated load is then left out (it adds windows into one
    sum), as is xLLM's timer when the user set a step interval."""
    out = {name: value for name, value in DEFAULTS.get(dialect, {}).items() if name not in values}
    if "interval_steps" in values:
        out.pop("update_interval_s", None)
    policy = values.get("policy", out.get("policy", "auto"))
    if "load_history" in out and (values.get("ring_steps") or "interval_steps" in values or wants_steps(policy)):
        del out["load_history"]
    return out


def xllm_flags(argv) -> dict:
    """xLLM's gflags (``--enable_eplb=true --ep_size=16 ...``, a string or a list) -> a dict for
    :meth:`~eplb.runtime.EplbConfig.from_dict`. xLLM's flags that are not about EPLB are dropped; as in gflags,
    ``--enable_eplb`` alone means true and ``--noenable_eplb`` false.

    Raises:
        ConfigError: an argument that is not a ``--flag[=value]``, or an EPLB flag with a near-miss name.
    """
    args = shlex.split(argv) if isinstance(argv, str) else list(argv)
    out = {}
    while args:
        arg = args.pop(0)
        if not arg.startswith("-"):
            raise ConfigError(f"xLLM flag {arg!r}: expected --name=value")
        name, equals, value = arg.lstrip("-").partition("=")
        if name.startswith("no") and name[2:] in _XLLM_KEYS and not equals:  # gflags' --noenable_eplb
            name, value, equals = name[2:], "false", "="
        if not equals and name != "enable_eplb" and args and not args[0].startswith("-"):
            value, equals = args.pop(0), "="  # gflags' --name value, for flags that are not booleans
        if name in _XLLM_KEYS:
            out[name] = value if equals else "true"
        elif "eplb" in name:
            raise ConfigError(f"unknown xLLM EPLB flag --{name}" + did_you_mean(name, _XLLM_KEYS, "--{}".format))
    return out
