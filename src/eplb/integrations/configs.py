"""Ready-to-paste EPLB settings for each engine, from one row of ``eplb tune``.

One small function per engine turns a row (policy, window, interval, redundant slots, kind) into exactly what that
engine reads: flags, environment, JSON, YAML, and the map file it loads at start. Each is read back by eplb's own
reader of that format before it is returned (:class:`eplb.runtime.config.EplbConfig` for the config dialects,
:func:`eplb.formats.read_map` for map files), so what is printed is what the engine (and eplb) accepts.

=============  =====================================================================================================
engine         what is printed
=============  =====================================================================================================
eplb           the runtime's config dict (``EplbConfig.from_dict``)
vllm           ``EPLB_VLLM_POLICY`` (the eplb plug-in) and ``--enable-eplb --eplb-config`` JSON
vllm-ascend    ``DYNAMIC_EPLB=true`` (its guard) and ``--additional-config`` with ``eplb_config``
sglang         ``--enable-eplb`` flags (its own DeepSeek balancer) or none (a static map), and
               ``--init-expert-location`` with the map ``eplb plan`` writes
trtllm         the load balancer's YAML (``num_slots``, ``initial_global_assignments``) and the LLM API options
=============  =====================================================================================================
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from eplb.errors import EplbError

__all__ = ["EngineConfig", "engine_config", "MAP_FILES"]

#: the map file an engine loads at start, written beside the report: (file name, eplb format)
MAP_FILES = {"sglang": ("sglang_init_expert_location.json", "sglang"),
             "trtllm": ("moe_load_balancer.yaml", "trtllm")}


@dataclass
class EngineConfig:
    """What to paste for one engine.

    Attributes:
        engine: the engine's name.
        text: the lines to paste (shell, or YAML for the engine's options file).
        settings: the engine's keys and values, as JSON (for ``tune.json``).
        notes: what the user must know besides (a policy that needs the engine's factory, ...).
    """

    engine: str
    text: str
    settings: dict
    notes: list[str] = field(default_factory=list)


def engine_config(engine: str, row: dict, map_path: Path | None = None, plan_command: str | None = None,
                  num_ranks: int | None = None) -> EngineConfig:
    """The settings of ``row`` for ``engine``, checked by eplb's reader (``map_path``: the map written for engines
    that load one, ``plan_command`` the ``eplb plan`` line that writes it, ``num_ranks`` the EP size).

    Raises:
        EplbError: the reader refuses the settings (a bug in this module: nothing is printed).
    """
    makers = {"eplb": _eplb, "vllm": _vllm, "vllm-ascend": _vllm_ascend, "sglang": _sglang, "trtllm": _trtllm}
    if engine not in makers:
        raise EplbError(f"no ready-to-paste settings for engine {engine!r}; expected one of {', '.join(makers)}")
    if engine in MAP_FILES:
        _check_map(map_path, MAP_FILES[engine][1], num_ranks)
        return makers[engine](row, map_path, plan_command)
    return makers[engine](row)


def _check_config(settings: dict, env: dict | None = None) -> None:
    from eplb.runtime.config import EplbConfig

    EplbConfig.from_dict(settings, env=env or {})


def _check_map(path: Path | None, format: str, num_ranks: int | None) -> None:
    from eplb.formats import read_map

    if path is None:
        raise EplbError("this engine loads an expert map at start: give the map written for it")
    read_map(path, format=format, num_ranks=num_ranks)


def _adaptive(row: dict) -> dict:
    """The runtime's adaptive cadence key of an adaptive row."""
    return {"adaptive_cadence": {"min_steps": row["interval"], "max_steps": row["max_steps"],
                                 "window_steps": row["window"], "tolerance": row["tolerance"]}}


def _eplb(row: dict) -> EngineConfig:
    settings = {"mode": "dynamic", "policy": row["policy"], "num_redundant_experts": row["redundant"]}
    if row["kind"] == "adaptive":
        settings.update(window_steps=row["interval"], **_adaptive(row))
    else:
        settings.update(window_steps=row["window"], interval_steps=row["interval"])
    _check_config(settings)
    text = "EplbConfig.from_dict(" + json.dumps(settings) + ")"
    return EngineConfig("eplb", text, settings)


def _vllm(row: dict) -> EngineConfig:
    from eplb.integrations.vllm import vllm_policy

    vllm_policy(row["policy"])  # what the plug-in does with EPLB_VLLM_POLICY at start
    settings = {"window_size": row["window"], "step_interval": row["interval"],
                "num_redundant_experts": row["redundant"]}
    _check_config({**settings, "mode": "dynamic"})
    text = (f"EPLB_VLLM_POLICY={row['policy']} vllm serve MODEL --enable-expert-parallel --enable-eplb \\\n"
            f"    --eplb-config {shlex.quote(json.dumps(settings))}")
    return EngineConfig("vllm", text, {"env": {"EPLB_VLLM_POLICY": row["policy"]}, "eplb_config": settings})


def _vllm_ascend(row: dict) -> EngineConfig:
    from eplb.policies import POLICY_IDS

    ids = {name: index for index, name in POLICY_IDS.items()}
    inner = {"dynamic_eplb": True, "expert_heat_collection_interval": row["window"],
             "algorithm_execution_interval": row["interval"], "num_redundant_experts": row["redundant"]}
    notes = []
    if row["policy"] in ids:
        inner["eplb_policy_type"] = ids[row["policy"]]
    else:
        notes.append(f"policy {row['policy']!r} has no vllm-ascend eplb_policy_type (0-3): make vllm-ascend's policy "
                     f"factory return eplb.integrations.AscendPolicy({row['policy']!r}) "
                     "(docs/engines/vllm-ascend.md)")
    additional = {"eplb_config": inner}
    env = {"DYNAMIC_EPLB": "true"}
    # eplb's reader of the inner dict; when EplbConfig.from_dict reads the "eplb_config" wrapper itself, pass
    # `additional` here instead.
    _check_config(inner, env)
    text = ("export DYNAMIC_EPLB=true   # vllm-ascend's guard for dynamic_eplb\n"
            "vllm serve MODEL --enable-expert-parallel \\\n"
            f"    --additional-config {shlex.quote(json.dumps(additional))}")
    return EngineConfig("vllm-ascend", text, {"env": env, "additional_config": additional}, notes)


def _sglang(row: dict, map_path: Path, plan_command: str | None) -> EngineConfig:
    flags = ["--ep-num-redundant-experts", str(row["redundant"]), "--init-expert-location", str(map_path)]
    settings = {"ep_num_redundant_experts": row["redundant"], "init_expert_location": str(map_path)}
    if row["kind"] == "dynamic":  # SGLang's own balancer (DeepSeek's algorithm) re-plans from the map
        dynamic = {"enable_eplb": True, "eplb_algorithm": "deepseek",
                   "eplb_rebalance_num_iterations": row["interval"],
                   "expert_distribution_recorder_buffer_size": row["window"],
                   "expert_distribution_recorder_mode": "stat"}
        settings.update(dynamic)
        flags = ["--enable-eplb", "--eplb-algorithm", "deepseek", "--eplb-rebalance-num-iterations",
                 str(row["interval"]), "--expert-distribution-recorder-buffer-size", str(row["window"]),
                 "--expert-distribution-recorder-mode", "stat", *flags]
    else:
        settings["ep_dispatch_algorithm"] = "static"
        flags += ["--ep-dispatch-algorithm", "static"]
    lines = [f"{plan_command}   # writes the initial map"] if plan_command else []
    lines.append("python -m sglang.launch_server --model-path MODEL ... " + " ".join(shlex.quote(f) for f in flags))
    return EngineConfig("sglang", "\n".join(lines), settings)


def _trtllm(row: dict, map_path: Path, plan_command: str | None) -> EngineConfig:
    options = f"moe_config:\n  load_balancer: {map_path}\n"
    lines = [f"{plan_command}   # writes the load balancer's YAML"] if plan_command else []
    lines += ["cat > extra_llm_api_options.yaml <<YAML", options.rstrip("\n"), "YAML",
              "trtllm-serve MODEL ... --extra_llm_api_options extra_llm_api_options.yaml"]
    return EngineConfig("trtllm", "\n".join(lines), {"load_balancer": str(map_path), "layer_updates_per_iter": 0})
