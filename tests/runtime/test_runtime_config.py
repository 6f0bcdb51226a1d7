"""EplbConfig: the engines' keys, env guards and strict validation, checks at start; planner worker basics.

The engines' dialects (vllm-ascend's additional_config, xLLM's flags) fed their documented configs:
tests/runtime/test_runtime_dialects.py."""

from __future__ import annotations

import time

import numpy as np
import pytest

from eplb import Placement, Topology
from eplb.runtime.config import ConfigError, EplbConfig
from eplb.runtime.startup import prepare
from eplb.cycle.planning import placement_checksum
from eplb.runtime.planner import PlannerWorker, PlanRequest


def test_vllm_ascend_keys_with_env_guards(tmp_path):
    cfg = {"dynamic_eplb": True, "expert_heat_collection_interval": 400, "algorithm_execution_interval": 30,
           "eplb_policy_type": 2, "num_redundant_experts": 16, "eplb_heat_collection_stage": "decode"}
    with pytest.raises(ConfigError, match="DYNAMIC_EPLB=true"):
        EplbConfig.from_dict(cfg, env={})
    config = EplbConfig.from_dict(cfg, env={"DYNAMIC_EPLB": "true"})
    # algorithm_execution_interval: the plan moves A steps after its window, the planner is checked every step
    assert (config.mode, config.window_steps, config.apply_steps, config.planner_check_steps, config.policy,
            config.stage, config.dialect) == ("dynamic", 400, 30, 1, "swift", "decode", "vllm-ascend")
    record = {"expert_map_record_path": str(tmp_path / "out" / "map.json")}
    with pytest.raises(ConfigError, match="EXPERT_MAP_RECORD=true"):
        EplbConfig.from_dict(record, env={})
    with pytest.raises(ConfigError, match="EXPERT_MAP_RECORD=true"):  # vllm-ascend compares it to "true" exactly
        EplbConfig.from_dict(record, env={"EXPERT_MAP_RECORD": "1"})
    config = EplbConfig.from_dict(record, env={"EXPERT_MAP_RECORD": "true"})
    assert config.mode == "record" and not (tmp_path / "out").exists()  # building a config creates nothing
    prepare(config, 2, 8, Topology(4, 3))
    assert (tmp_path / "out").is_dir()  # the controller's start does


def test_vllm_and_xllm_keys():
    config = EplbConfig.from_dict({"window_size": 1000, "step_interval": 3000, "num_redundant_experts": 0,
                                   "log_balancedness": True, "use_async": True, "policy": "default",
                                   "mode": "dynamic"})
    assert (config.window_steps, config.cycle_steps, config.log_balancedness) == (1000, 3000, True)
    config = EplbConfig.from_dict({"eplb_update_interval": 5, "eplb_update_threshold": 0.9, "mode": "dynamic"})
    assert (config.update_interval_s, config.update_threshold, config.load_history, config.dialect) == (
        5.0, 0.9, "halve", "xllm")


@pytest.mark.parametrize("cfg, message", [
    ({"window_sise": 10}, "did you mean 'window_size'"),
    ({"expert_heat_collection_interval": 0}, "must be an integer >= 1, got 0"),
    ({"step_interval": -5}, "must be an integer >= 1, got -5"),
    ({"eplb_policy_type": 7}, r"policy id in \[0, 1, 2, 3\], got 7"),
    ({"policy": "defualt"}, "did you mean 'default'"),
    ({"eplb_heat_collection_stage": "decoding"}, "did you mean 'decode'"),
    ({"eplb_update_threshold": 1.5}, "eplb_update_threshold must be in"),
    ({"eplb_update_interval": 0}, "eplb_update_interval must be > 0"),
    ({"window_size": 10, "expert_heat_collection_interval": 20}, "set the same thing differently"),
    ({"mode": "static"}, "static mode needs expert_map_path"),
    ({"algorithm_execution_interval": 0}, "algorithm_execution_interval must be an integer >= 1, got 0"),
    ({"eplb_policy_type": "SwiftBalance"}, "did you mean 'SwiftBalanceEplb'"),
    ({"eplb_config": {"dynamic_epl": True}}, "unknown EPLB config key 'dynamic_epl'; did you mean 'dynamic_eplb'"),
    ({"eplb_confg": {}}, "did you mean 'eplb_config'"),
    ({"eplb_config": ["dynamic_eplb"]}, "eplb_config must be a dict"),
    ({"eplb_config": {"eplb_policy_type": 1}, "eplb_policy_type": 2}, "set inside eplb_config"),
    ({"expert_heat_collection_interval": 10, "enable_eplb": True}, "vllm-ascend's .* and xLLM's enable_eplb"),
    ({"enable_eplb": "sometimes"}, "enable_eplb must be true or false"),
    ({"enable_eplb": False, "mode": "dynamic"}, "enable_eplb \\(mode off\\) ask for different modes"),
    ({"eplb_update_interval": 10, "step_interval": 100}, "eplb_update_interval .* and step_interval .* keep one"),
    ({"load_history": "halve", "policy": "auto"}, "load_history='halve' adds windows up"),
    ({"load_history": "decay"}, "load_history must be one of window, halve"),
    ({"expert_parallel_degree": -1}, "expert_parallel_degree must be an integer >= 0"),
    ({"dispatch": "fastest"}, "dispatch must be one of"),
    ({"log_balancedness": "maybe"}, "log_balancedness must be true or false"),
])
def test_bad_config_is_a_clear_error(cfg, message):
    with pytest.raises(ConfigError, match=message):
        EplbConfig.from_dict(cfg, env={})


def test_record_path_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = EplbConfig.from_dict({"record_path": str(blocker / "sub" / "map.json")})
    with pytest.raises(ConfigError, match="cannot create its folder"):
        prepare(config, 2, 8, Topology(4, 3))


def test_model_checks(tmp_path):
    from eplb.formats import write_map

    topology = Topology(4, 3)
    with pytest.raises(ConfigError, match="num_redundant_experts=2 does not match the topology"):
        prepare(EplbConfig.from_dict({"num_redundant_experts": 2}), 3, 8, topology)
    assert prepare(EplbConfig.from_dict({"num_redundant_experts": 4}), 3, 8, topology) is None
    # xLLM counts redundant experts per rank and names the EP size
    assert prepare(EplbConfig.from_dict({"redundant_experts_num": 1, "ep_size": 4}), 3, 8, topology) is None
    with pytest.raises(ConfigError, match="redundant_experts_num=2 per rank does not match the topology.* 1 per rank"):
        prepare(EplbConfig.from_dict({"redundant_experts_num": 2}), 3, 8, topology)
    with pytest.raises(ConfigError, match="ep_size=16 but the EP group has 4 ranks"):
        prepare(EplbConfig.from_dict({"ep_size": 16}), 3, 8, topology)
    missing = EplbConfig.from_dict({"expert_map_path": "/nonexistent/map.json"})  # built anywhere, checked at start
    with pytest.raises(ConfigError, match="expert_map_path='/nonexistent/map.json': no such file"):
        prepare(missing, 2, 8, topology)
    path = tmp_path / "map.json"
    write_map(Placement.initial(8, topology, 2), path, "ascend")
    config = EplbConfig.from_dict({"expert_map_path": str(path)})
    assert config.mode == "static"
    with pytest.raises(ConfigError, match="is for 2 layers"):
        prepare(config, 3, 8, topology)
    with pytest.raises(ConfigError, match="expert map"):
        prepare(config, 2, 10, topology)  # ids 8, 9 missing
    assert prepare(config, 2, 8, topology) == Placement.initial(8, topology, 2)


def test_placement_checksum_is_stable_and_sensitive():
    a = np.arange(12).reshape(2, 6)
    assert placement_checksum(a) == placement_checksum(a.copy()) and 0 <= placement_checksum(a) < 2**62
    b = a.copy()
    b[1, 2] = 0
    assert placement_checksum(a) != placement_checksum(b)


def _crashing_worker(requests, results, warmup):
    import os

    os._exit(5)


def test_planner_worker_restarts_after_crash():
    topology = Topology(2, 3)
    current = Placement.initial(5, topology, 2).phy2log
    load = np.arange(10, dtype=float).reshape(2, 5) + 1
    worker = PlannerWorker(deadline_s=30, target=_crashing_worker)
    try:
        worker.start()
        worker.submit(PlanRequest(0, load, current, topology, "random", {}))
        deadline = time.monotonic() + 60
        while (state := worker.poll())[0] == "pending":
            assert time.monotonic() < deadline, "the dead worker was not noticed"
            time.sleep(0.02)
        assert state[0] == "failed" and "died (exit code 5)" in state[1]
        assert worker.restarts == 1 and worker.pid is not None
    finally:
        worker.close()


def test_static_mode_loads_the_map_and_only_records(tmp_path):
    torch = pytest.importorskip("torch")
    from eplb.formats import write_map
    from eplb.runtime import EplbController

    topology = Topology(2, 3)
    phy2log = np.array([[4, 3, 2, 1, 0, 4], [0, 1, 2, 3, 4, 0]])
    path = tmp_path / "map.json"
    write_map(Placement(phy2log, 5, topology), path, "ascend")
    config = EplbConfig.from_dict({"expert_map_path": str(path), "window_steps": 2, "log_balancedness": True})
    ctl = EplbController(config, 2, 5, topology, rank=1)
    assert np.array_equal(ctl.placement.phy2log, phy2log) and ctl.planner is None
    for _ in range(5):
        ctl.before_forward()
        slots = ctl.route(0, torch.tensor([[4, 0], [1, 2]]))
        ctl.after_forward()
    assert slots.tolist() == [[5, 4], [3, 2]]  # rank 1 takes the second replica of expert 4
    assert ctl.recorder.steps == 1  # the window restarted at steps 2 and 4
    with pytest.raises(ConfigError, match="is for 2 layers"):
        EplbController(config, 3, 5, topology, rank=0)


def test_vllm_step_interval_plans_on_the_last_window(tmp_path):
    torch = pytest.importorskip("torch")
    from eplb.runtime import EplbController

    config = EplbConfig.from_dict({"window_size": 3, "step_interval": 8, "record_path": str(tmp_path / "m.json")})
    ctl = EplbController(config, 2, 5, Topology(2, 3), rank=0)
    try:
        assert ctl.cycle.config.cycle_steps == 8 and ctl.recorder.ring_steps == 3
        for _ in range(8):
            ctl.before_forward()
            ctl.route(0, torch.tensor([[1, 2]]))
            ctl.after_forward()
        assert ctl.recorder.logical_load(ctl.placement.phy2log).shape == (3, 2, 5)
    finally:
        ctl.close()


def test_xllm_update_interval_holds_cycles_back(tmp_path):
    """eplb_update_interval runs on a clock of its own: no window of window_steps ends a cycle before it passed."""
    torch = pytest.importorskip("torch")
    from eplb.runtime import EplbController

    config = EplbConfig.from_dict({"window_steps": 2, "planner_check_steps": 1, "eplb_update_interval": 3600,
                                   "record_path": str(tmp_path / "m.json")})
    ctl = EplbController(config, 2, 5, Topology(2, 3), rank=0)
    try:
        for _ in range(6):
            ctl.before_forward()
            ctl.route(1, torch.tensor([[0, 4]]))
            ctl.after_forward()
        # three windows of 2 steps went by: none was gathered, the planner was never asked, the load adds up
        assert ctl.metrics == [] and ctl.cycle.records == [] and not ctl.planner.busy
        assert ctl.recorder.steps == 6
        assert ctl.recorder.logical_load(ctl.placement.phy2log)[1].tolist() == [6, 0, 0, 0, 6]
    finally:
        ctl.close()


def test_record_mode_asks_the_policy_for_maps_vllm_ascend_can_hold(tmp_path):
    from eplb.runtime.controller import _policy_options

    def options(**values):
        return _policy_options(EplbConfig.from_dict({"record_path": str(tmp_path / "m.json"), **values}))

    assert options(mode="record", policy="default") == {"allow_shared_rank": False}
    assert options(mode="record", policy="random") == {"allow_shared_rank": False}
    assert options(mode="record", policy="swift") == {}  # no such option: nothing to ask
    assert options(mode="record", policy="default", policy_options={"allow_shared_rank": True}) == {
        "allow_shared_rank": True}
    assert _policy_options(EplbConfig.from_dict({"mode": "dynamic", "policy": "default"})) == {}


# -- the whole config checked, in from_dict and in the constructor ---------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"prometheus_port": 99999}, "prometheus_port must be an integer in 1-65535, got 99999"),
    ({"prometheus_port": 0}, "prometheus_port must be an integer in 1-65535, got 0"),
    ({"policy": "default", "policy_options": {"mdoe": "global"}},
     "policy_options: policy 'default' has no option 'mdoe'.*did you mean 'mode'"),
    ({"policy": "default", "policy_options": {"mode": "sideways"}}, "policy_options: mode must be one of"),
    ({"policy_options": ["seed"]}, "policy_options must be a dict"),
    ({"window_steps": "ten"}, "window_steps must be an integer, got 'ten'"),
    ({"update_threshold": 2}, r"update_threshold must be in \[0.0, 1.0\]"),
    ({"dispatch": "fastest"}, "dispatch must be one of"),
    ({"mode": "static"}, "static mode needs expert_map_path"),
    ({"mode": "record"}, "record mode needs expert_map_record_path or record_path"),
    ({"communicator": "carrier-pigeon"}, "communicator must be one of torch_gloo"),
    ({"log_balancedness_interval": 0}, "log_balancedness_interval must be an integer >= 1"),
])
def test_constructor_checks_like_from_dict(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EplbConfig(**kwargs)
    with pytest.raises(ConfigError, match=message):
        EplbConfig.from_dict(kwargs, env={})


def test_messages_use_the_users_key():
    with pytest.raises(ConfigError, match="expert_heat_collection_interval must be an integer >= 1"):
        EplbConfig.from_dict({"expert_heat_collection_interval": -1})
    with pytest.raises(ConfigError, match="eplb_policy_type must be a vllm-ascend policy id"):
        EplbConfig.from_dict({"eplb_policy_type": 9})


def test_same_value_in_two_spellings_agrees():
    config = EplbConfig.from_dict({"window_size": 100, "expert_heat_collection_interval": "100",
                                   "eplb_policy_type": 1, "policy": "default"})
    assert (config.window_steps, config.policy) == (100, "default")
    assert EplbConfig(window_steps="100", planner_deadline_s="2.5").window_steps == 100
    with pytest.raises(ConfigError, match="set the same thing differently"):
        EplbConfig.from_dict({"window_size": 100, "window_steps": "101"})


def test_a_config_touches_nothing_outside_it(tmp_path):
    """Building a config creates no folder, reads no map and probes no device; the controller's start does."""
    record = tmp_path / "new" / "deeper" / "map.json"
    with pytest.raises(ConfigError, match="window_size"):
        EplbConfig.from_dict({"record_path": str(record), "window_size": 0})
    with pytest.raises(ConfigError, match="policy_options"):
        EplbConfig(mode="record", record_path=str(record), policy_options={"nope": 1})
    config = EplbConfig(mode="record", record_path=str(record))
    assert config.record_path == str(record) and not (tmp_path / "new").exists()
    assert EplbConfig(mode="static", map_path=str(tmp_path / "later.json")).map_path.endswith("later.json")
    prepare(config, 1, 4, Topology(2, 2))
    assert record.parent.is_dir()


def test_validated_once(monkeypatch):
    """from_dict checks the whole config once: the policy (with its options) is built a single time."""
    import eplb.policies

    built = []
    real = eplb.policies.get_policy
    monkeypatch.setattr(eplb.policies, "get_policy", lambda *a, **k: built.append(a) or real(*a, **k))
    config = EplbConfig.from_dict({"policy": "default", "policy_options": {"mode": "global"}, "window_size": 10,
                                   "window_steps": "10"})
    assert config.policy_options == {"mode": "global"} and built == [("default",)]


def test_vllm_032_keys():
    config = EplbConfig.from_dict({"window_size": 10, "step_interval": 30, "num_redundant_experts": 32,
                                   "log_balancedness": True, "log_balancedness_interval": 5, "use_async": True,
                                   "policy": "default", "communicator": "torch_gloo",
                                   "enable_migration_batching": True, "mode": "dynamic"})
    assert (config.log_balancedness_interval, config.communicator, config.enable_migration_batching,
            config.transfer_backend) == (5, "torch_gloo", True, "gloo")
    unset = EplbConfig.from_dict({"communicator": None, "expert_map_path": None, "expert_map_record_path": None})
    assert (unset.mode, unset.communicator, unset.transfer_backend) == ("off", None, "gloo")
    assert not hasattr(EplbConfig, "as_dict")


@pytest.mark.parametrize("value, message", [
    ("gloo", "did you mean 'torch_gloo'"),
    ("nixl", "'nixl' is not available in eplb; use torch_gloo"),
    ("torch_xccl", "not available in eplb"),
])
def test_communicator_values(value, message):
    with pytest.raises(ConfigError, match=message):
        EplbConfig.from_dict({"communicator": value})


@pytest.mark.parametrize("value", ["torch_nccl", "pynccl"])
def test_nccl_needs_cuda(value):
    torch = pytest.importorskip("torch")
    config = EplbConfig.from_dict({"communicator": value})  # a driver without GPUs builds its workers' config
    assert config.transfer_backend == "nccl"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=f"communicator='{value}' needs CUDA and NCCL"):
            prepare(config, 1, 4, Topology(1, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("value", ["torch_nccl", "pynccl"])
def test_nccl_with_cuda_is_prepared(value):
    assert prepare(EplbConfig.from_dict({"communicator": value}), 1, 4, Topology(1, 4)) is None


def test_vllm_ascend_semantics(tmp_path):
    record = str(tmp_path / "rec" / "map.json")
    # either variable opens the guard for either key; EXPERT_MAP_RECORD must be exactly "true"
    assert EplbConfig.from_dict({"dynamic_eplb": True}, env={"EXPERT_MAP_RECORD": "true"}).mode == "dynamic"
    assert EplbConfig.from_dict({"dynamic_eplb": True}, env={"DYNAMIC_EPLB": "1"}).mode == "dynamic"
    with pytest.raises(ConfigError, match="DYNAMIC_EPLB=true"):
        EplbConfig.from_dict({"dynamic_eplb": True}, env={"EXPERT_MAP_RECORD": "True"})
    config = EplbConfig.from_dict({"expert_map_record_path": record}, env={"DYNAMIC_EPLB": "TRUE"})
    assert config.mode == "record" and config.record_path == record
    # a record path records, also with dynamic_eplb (vllm-ascend then writes maps and moves no weights)
    config = EplbConfig.from_dict({"dynamic_eplb": True, "expert_map_record_path": record},
                                  env={"DYNAMIC_EPLB": "true"})
    assert config.mode == "record"
    with pytest.raises(ConfigError, match="ask for different modes"):
        EplbConfig.from_dict({"mode": "static", "record_path": record})
    for key in ("expert_map_record_path", "expert_map_path"):
        with pytest.raises(ConfigError, match=f"{key}='m.yaml' must end in .json"):
            EplbConfig.from_dict({key: "m.yaml"}, env={"DYNAMIC_EPLB": "true"})
    assert EplbConfig.from_dict({"load_collection_phase": "prefill"}).stage == "prefill"
    with pytest.raises(ConfigError, match="load_collection_phase must be one of all, prefill, decode"):
        EplbConfig.from_dict({"load_collection_phase": "both"})
    with pytest.raises(ConfigError, match="set the same thing differently"):
        EplbConfig.from_dict({"load_collection_phase": "prefill", "eplb_heat_collection_stage": "decode"})


def test_dispatch_is_router_mode():
    assert EplbConfig.from_dict({"dispatch": "token"}).dispatch == "token"
    with pytest.raises(ConfigError, match="set the same thing differently"):
        EplbConfig.from_dict({"dispatch": "token", "router_mode": "rank"})


def test_heartbeat_keys():
    assert EplbConfig().heartbeat_interval_s is None  # off unless asked for
    config = EplbConfig.from_dict({"heartbeat_interval_s": 0.5})
    assert (config.heartbeat_interval_s, config.heartbeat_timeout_s, config.heartbeat_abort_serving) == (0.5, 5.0,
                                                                                                         False)
    config = EplbConfig.from_dict({"heartbeat_interval_s": "1", "heartbeat_timeout_s": 3,
                                   "heartbeat_abort_serving": "true"})
    assert (config.heartbeat_interval_s, config.heartbeat_timeout_s, config.heartbeat_abort_serving) == (1.0, 3.0,
                                                                                                         True)


@pytest.mark.parametrize("cfg, message", [
    ({"heartbeat_interval_s": 1, "heartbeat_timeout_s": 1},
     "heartbeat_timeout_s=1.0 must be greater than heartbeat_interval_s=1.0"),
    ({"heartbeat_interval_s": 2, "heartbeat_timeout_s": 0.5},
     "heartbeat_timeout_s=0.5 must be greater than heartbeat_interval_s=2.0"),
    ({"heartbeat_timeout_s": 5}, "heartbeat_timeout_s needs heartbeat_interval_s"),
    ({"heartbeat_abort_serving": True}, "heartbeat_abort_serving needs heartbeat_interval_s"),
    ({"heartbeat_interval_s": 0}, "heartbeat_interval_s must be > 0.0, got 0"),
    ({"heartbeat_interval_s": "often"}, "heartbeat_interval_s must be a number, got 'often'"),
    ({"heartbeat_interval_s": 1, "heartbeat_abort_serving": "maybe"},
     "heartbeat_abort_serving must be true or false, got 'maybe'"),
])
def test_bad_heartbeat_config_is_a_clear_error(cfg, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EplbConfig.from_dict(cfg)
    with pytest.raises(ConfigError):  # the constructor checks alike
        EplbConfig(**cfg)
