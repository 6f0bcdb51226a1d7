"""The engines' config dialects mean in eplb what they mean in the engines: each is fed the configs of its engine's
own docs (vllm-ascend's ``--additional-config`` examples from
docs/source/user_guide/feature_guide/expert_parallelism_load_balancer.md; xLLM's flags from docs/en/features/eplb.md).
What the timing keys do in real runs: tests/runtime/test_dialect_runs.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from eplb import Placement, Topology
from eplb.runtime.config import ConfigError, EplbConfig
from eplb.runtime.dialects import xllm_flags
from eplb.runtime.load_history import LoadHistory
from eplb.runtime.startup import describe, prepare

ASCEND_ENV = {"DYNAMIC_EPLB": "true"}

# vllm-ascend's documented --additional-config values, as its docs print them
ASCEND_D_NODE = '''{ "eplb_config": {
    "dynamic_eplb": true,
    "expert_heat_collection_interval": 600,
    "algorithm_execution_interval": 50,
    "eplb_policy_type": 2,
    "num_redundant_experts": 16
    }}'''
ASCEND_P_NODE = '''{ "eplb_config": {
    "dynamic_eplb": true,
    "expert_heat_collection_interval": 50,
    "algorithm_execution_interval": 5,
    "eplb_policy_type": 2,
    "num_redundant_experts": 16
    }}'''
ASCEND_PREFILL = '''{ "eplb_config": {
    "dynamic_eplb": true,
    "expert_heat_collection_interval": 600,
    "algorithm_execution_interval": 50,
    "eplb_policy_type": 2,
    "num_redundant_experts": 16,
    "eplb_heat_collection_stage": "prefill"
  }}'''
ASCEND_DECODE = '''{
  "eplb_config": {
    "dynamic_eplb": true,
    "eplb_heat_collection_stage": "decode"
  }
}'''
ASCEND_RECORD = '''{ "eplb_config": {
    "expert_map_record_path": "/path/to/eplb.json",
    "num_redundant_experts": 16,
    "expert_heat_collection_interval": 400,
    "algorithm_execution_interval": 30
  }}'''
ASCEND_STATIC = '''{
    "eplb_config": {"expert_map_path": "/path/to/eplb.json"}
  }'''
ASCEND_MRV2 = '''{"eplb_config":{"load_collection_phase":"prefill"}}'''
# xLLM's documented flags (docs/en/features/eplb.md)
XLLM_FLAGS = "--enable_eplb=true --expert_parallel_degree=2 --ep_size=16 --eplb_update_interval=2000 " \
             "--eplb_update_threshold=0.9"
# the same flags as docs/zh/features/eplb.md prints them, one a line
XLLM_FLAGS_ZH = """  --enable_eplb=true 
  --expert_parallel_degree=2 
  --ep_size=16  
  --eplb_update_interval=2000
  --eplb_update_threshold=0.9"""  # noqa: W291 - trailing spaces as printed there


def _settings(config: EplbConfig) -> tuple:
    return (config.mode, config.window_steps, config.apply_steps, config.planner_check_steps, config.policy,
            config.num_redundant_experts, config.stage, config.dialect)


@pytest.mark.parametrize("text, expected", [
    (ASCEND_D_NODE, ("dynamic", 600, 50, 1, "swift", 16, "all", "vllm-ascend")),
    (ASCEND_P_NODE, ("dynamic", 50, 5, 1, "swift", 16, "all", "vllm-ascend")),
    (ASCEND_PREFILL, ("dynamic", 600, 50, 1, "swift", 16, "prefill", "vllm-ascend")),
    # unset keys take vllm-ascend's defaults: 600-step windows, plans 50 steps later, SwiftBalancer (type 2)
    (ASCEND_DECODE, ("dynamic", 600, 50, 1, "swift", None, "decode", "vllm-ascend")),
])
def test_vllm_ascend_documented_dynamic_configs(text, expected):
    assert _settings(EplbConfig.from_dict(json.loads(text), env=ASCEND_ENV)) == expected
    with pytest.raises(ConfigError, match="DYNAMIC_EPLB=true"):  # its guard holds for its own docs' configs
        EplbConfig.from_dict(json.loads(text), env={})


def test_vllm_ascend_documented_record_and_static_configs(tmp_path):
    record = json.loads(ASCEND_RECORD)
    record["eplb_config"]["expert_map_record_path"] = str(tmp_path / "maps" / "eplb.json")
    config = EplbConfig.from_dict(record, env={"EXPERT_MAP_RECORD": "true"})
    assert _settings(config) == ("record", 400, 30, 1, "swift", 16, "all", "vllm-ascend")
    topology = Topology(4, 8)  # 16 experts + 16 redundant = 4 ranks x 8 slots
    assert prepare(config, 2, 16, topology) is None and (tmp_path / "maps").is_dir()
    from eplb.formats import write_map

    write_map(Placement.initial(16, topology, 2), record["eplb_config"]["expert_map_record_path"], "ascend")
    static = json.loads(ASCEND_STATIC)
    static["eplb_config"]["expert_map_path"] = record["eplb_config"]["expert_map_record_path"]
    config = EplbConfig.from_dict(static, env={})  # static EPLB needs no environment variable
    assert config.mode == "static" and prepare(config, 2, 16, topology) == Placement.initial(16, topology, 2)


def test_vllm_ascend_whole_additional_config():
    """The whole --additional-config is accepted: its other sections are vllm-ascend's and left alone."""
    additional = json.loads(ASCEND_P_NODE)
    additional.update({"torchair_graph_config": {"enabled": True}, "enable_shared_expert_dp": False,
                       "dispatch": "token"})  # eplb's own keys may sit beside the wrapper
    config = EplbConfig.from_dict(additional, env=ASCEND_ENV)
    assert (config.window_steps, config.apply_steps, config.dispatch) == (50, 5, "token")
    # Model Runner V2 puts only load_collection_phase there, beside vLLM's --eplb-config: eplb's meaning and defaults
    config = EplbConfig.from_dict({**json.loads(ASCEND_MRV2), "window_size": 50, "step_interval": 50,
                                   "num_redundant_experts": 16, "use_async": False, "log_balancedness": True,
                                   "log_balancedness_interval": 1})
    assert (config.stage, config.window_steps, config.policy, config.apply_steps, config.dialect) == (
        "prefill", 50, "auto", None, "eplb")


@pytest.mark.parametrize("name, policy", [("RandomLoadBalance", "random"), ("DefaultEplb", "default"),
                                          ("SwiftBalanceEplb", "swift"), ("swift_balancer", "swift"),
                                          ("FlashLB", "flashlb"), (0, "random"), (1, "default"), ("2", "swift"),
                                          (3, "flashlb")])
def test_vllm_ascend_policy_names_and_ids(name, policy):
    assert EplbConfig.from_dict({"eplb_policy_type": name}).policy == policy
    assert EplbConfig.from_dict({"policy": name}).policy == policy


def test_eplb_keys_keep_eplb_defaults():
    config = EplbConfig.from_dict({"mode": "dynamic"})
    assert (config.policy, config.window_steps, config.planner_check_steps, config.apply_steps,
            config.update_interval_s, config.load_history, config.dialect) == ("auto", 1000, 8, None, None, "window",
                                                                               "eplb")
    # an engine's defaults fill only what the user left unset
    config = EplbConfig.from_dict({"dynamic_eplb": True, "policy": "auto", "planner_check_steps": 4},
                                  env=ASCEND_ENV)
    assert (config.policy, config.planner_check_steps, config.apply_steps) == ("auto", 4, 50)


def test_xllm_documented_flags():
    flags = xllm_flags(XLLM_FLAGS + " --model=/models/DeepSeek-R1 --port=9977")  # its other flags are dropped
    assert flags == {"enable_eplb": "true", "expert_parallel_degree": "2", "ep_size": "16",
                     "eplb_update_interval": "2000", "eplb_update_threshold": "0.9"}
    assert xllm_flags(XLLM_FLAGS_ZH) == flags
    config = EplbConfig.from_dict(flags)
    assert (config.mode, config.update_interval_s, config.update_threshold, config.ep_size, config.load_history,
            config.policy, config.dialect) == ("dynamic", 2000.0, 0.9, 16, "halve", "default", "xllm")
    topology = Topology(16, 17)  # 256 experts, xLLM's default of one redundant expert per rank
    assert prepare(config, 58, 256, topology) is None
    with pytest.raises(ConfigError, match="ep_size=16 but the EP group has 8 ranks"):
        prepare(config, 58, 256, Topology(8, 33))
    # xLLM's defaults: a plan every 1000 s, layers re-planned below similarity 0.8; EPLB off unless enabled
    config = EplbConfig.from_dict(xllm_flags("--enable_eplb"))
    assert (config.mode, config.update_interval_s, config.update_threshold) == ("dynamic", 1000.0, 0.8)
    assert EplbConfig.from_dict(xllm_flags(["--enable_eplb=false", "--ep_size=4"])).mode == "off"
    assert EplbConfig.from_dict(xllm_flags("--noenable_eplb --eplb_update_threshold 0.5")).mode == "off"
    with pytest.raises(ConfigError, match="did you mean --eplb_update_interval"):
        xllm_flags("--enable_eplb=true --eplb_update_intervel=60")


def test_start_up_line_names_policy_mode_windows_and_dialect():
    ascend = describe(EplbConfig.from_dict(json.loads(ASCEND_P_NODE), env=ASCEND_ENV))
    assert ascend == ("mode dynamic (dynamic_eplb), policy swift (eplb_policy_type), window 50 steps "
                      "(expert_heat_collection_interval), plans move 5 steps after their window "
                      "(algorithm_execution_interval), planner checked every step (vllm-ascend's default), "
                      "load: the window's, dispatch rank; dialect vllm-ascend")
    xllm = describe(EplbConfig.from_dict(xllm_flags(XLLM_FLAGS)))
    assert xllm == ("mode dynamic (enable_eplb), policy default (xllm's default), a cycle every 2000 s on its own "
                    "timer (eplb_update_interval), planner checked every 8 steps, layers re-planned below load "
                    "similarity 0.9 (eplb_update_threshold), load: every window's, halved after each plan "
                    "(xllm's default), dispatch rank; dialect xllm")
    assert describe(EplbConfig.from_dict({"mode": "record", "record_path": "m.json", "window_size": 10})) == (
        "mode record, policy auto, window 10 steps (window_size), planner checked every 8 steps, load: the "
        "window's, dispatch rank; dialect eplb")


def test_controller_logs_the_start_up_line(caplog):
    pytest.importorskip("torch")
    from eplb.runtime import EplbController

    config = EplbConfig.from_dict(xllm_flags("--noenable_eplb --ep_size=2"))
    with caplog.at_level("INFO", logger="eplb.runtime.controller"):
        EplbController(config, 1, 4, Topology(2, 2), rank=0).close()
        EplbController(config, 1, 4, Topology(2, 2), rank=1).close()  # rank 0 speaks for all
    lines = [r.getMessage() for r in caplog.records if r.name == "eplb.runtime.controller"]
    assert lines == [f"eplb: {describe(config)}"] and "mode off (enable_eplb)" in lines[0]


def test_load_history_halves_like_xllm():
    """xLLM: the running total plus the new load, planned on, then halved with integer division."""
    history = LoadHistory("halve")
    windows = [np.array([[7, 0, 3]]), np.array([[1, 1, 1]]), np.array([[0, 5, 0]])]
    seen = [history.add(w).tolist() for w in windows[:1]]
    history.planned()  # [[3, 0, 1]]
    seen.append(history.add(windows[1]).tolist())  # [[4, 1, 2]]
    seen.append(history.add(windows[2]).tolist())  # no plan in between (xLLM's timer not due): [[4, 6, 2]]
    history.planned()
    assert seen == [[[7, 0, 3]], [[4, 1, 2]], [[4, 6, 2]]] and history.total.tolist() == [[2, 3, 1]]
    assert LoadHistory("window").add(windows[2]) is windows[2]


def test_update_timer_rule():
    """A window ends at the check step that reads the agreement started at the first check step whose clock had
    passed the interval; the clock restarts there."""
    torch = pytest.importorskip("torch")  # noqa: F841
    from eplb.runtime.timing import UpdateTimer
    from eplb.runtime.transport import SideChannel

    now = [0.0]
    timer = UpdateTimer(10.0, check_steps=4, clock=lambda: now[0])
    channel = SideChannel()
    try:
        due = []
        for step in range(40):
            now[0] = step * 0.5  # 0.5 s per step: the clock passes 10 s at step 20
            due.append(timer.due(step, channel, collecting=step != 24))
            channel.drain()
        # step 20 (a check step) sees 10 s passed, step 24 would read it but is not collecting, step 28 reads it
        assert [s for s, d in enumerate(due) if d] == [28] and timer.started == 14.0
    finally:
        channel.close()
