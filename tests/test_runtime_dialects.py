"""The engines' config dialects mean in eplb what they mean in the engines.

Each dialect is fed the configs of its engine's own docs (vllm-ascend's ``--additional-config`` examples from
docs/source/user_guide/feature_guide/expert_parallelism_load_balancer.md; xLLM's flags from docs/en/features/eplb.md),
and what its keys mean is checked in real runs of the runtime on 2 Gloo ranks in real processes: the step at which a
plan moves (vllm-ascend's ``algorithm_execution_interval``, a planner on time and a late one), xLLM's timer and its
accumulated, halved load.
"""

from __future__ import annotations

import json
import os
import time
import traceback

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


# -- real runs: 2 Gloo ranks in real processes ------------------------------------------------------------------
WORLD = 2
TOPO = Topology(WORLD, 5)  # 6 experts in 10 slots
NUM_EXPERTS, NUM_LAYERS = 6, 2
H, A = 6, 4
SPAWN_TIMEOUT_S = 300


def skewed_ids(step: int, rank: int):
    import torch

    rng = np.random.default_rng(7919 * step + rank)
    p = 1.0 / np.arange(1, NUM_EXPERTS + 1) ** 2
    return torch.as_tensor(rng.choice(NUM_EXPERTS, size=(24, 2), p=p / p.sum()), dtype=torch.int64)


def logical_counts(start: int, end: int) -> np.ndarray:
    """int64 [L, E]: the ids routed in steps [start, end) over both ranks (every layer routes the same ids)."""
    total = np.zeros(NUM_EXPERTS, dtype=np.int64)
    for step in range(start, end):
        for rank in range(WORLD):
            total += np.bincount(skewed_ids(step, rank).numpy().ravel(), minlength=NUM_EXPERTS)
    return np.tile(total, (NUM_LAYERS, 1))


def _controller(rank: int, tmp: str, name: str, cfg: dict, env=None, gate: bool = False):
    import functools

    import torch

    from dialect_workers import gated_worker
    from eplb.runtime import EplbController

    loads = os.path.join(tmp, f"{name}-loads{rank}")
    os.makedirs(loads, exist_ok=True)
    target = functools.partial(gated_worker, gate=os.path.join(tmp, f"{name}-gate{rank}") if gate else "",
                               loads=loads)
    placement = Placement.initial(NUM_EXPERTS, TOPO, NUM_LAYERS)
    tensors = [[torch.zeros(TOPO.slots_per_rank, 3)] for _ in range(NUM_LAYERS)]
    return EplbController(EplbConfig.from_dict(cfg, env=env), NUM_LAYERS, NUM_EXPERTS, TOPO, rank,
                          layer_tensors=tensors, placement=placement, planner_target=target)


def _agree(flag: bool) -> bool:
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _serve(ctl, rank: int, until, on_step=None, max_steps: int = 4000) -> dict:
    """Steps until ``until(ctl)`` holds on both ranks; the placement in force and the wall clock of every step."""
    in_force, before, after = [], [], []
    for _ in range(max_steps):
        step = ctl.step
        before.append(time.monotonic())
        ctl.before_forward()
        after.append(time.monotonic())
        in_force.append(ctl.live.phy2log.copy())
        for layer in range(NUM_LAYERS):
            ctl.route(layer, skewed_ids(step, rank))
        ctl.after_forward()
        if on_step is not None:
            on_step(ctl)
        time.sleep(0.002)
        if _agree(until(ctl)):
            break
    changed = [s for s in range(1, len(in_force)) if not np.array_equal(in_force[s], in_force[s - 1])]
    records = [(r.window_start, r.window_end, r.ready_step, r.apply_start, r.skipped) for r in ctl.cycle.records]
    return {"first_switch": changed[0] if changed else None, "records": records, "before": before, "after": after,
            "steps": ctl.step, "late_steps": [m.late_steps for m in ctl.metrics]}


def _wait_for_planner(at_step: int):
    """Between steps ``at_step`` and the next: the window's request reached the planner and its reply is in."""
    def hook(ctl):
        if ctl.step == at_step + 1:
            ctl.channel.drain()
            ctl.planner.wait(60)
    return hook


ASCEND_RUN = {"eplb_config": {"dynamic_eplb": True, "expert_heat_collection_interval": H,
                              "algorithm_execution_interval": A, "eplb_policy_type": "DefaultEplb",
                              "num_redundant_experts": 4}}


def scenario_ascend_on_time(rank, tmp):
    ctl = _controller(rank, tmp, "on-time", ASCEND_RUN, env=ASCEND_ENV)
    try:
        return _serve(ctl, rank, lambda c: c.step > H + A + 3, on_step=_wait_for_planner(H))
    finally:
        ctl.close()


def scenario_ascend_late(rank, tmp):
    """The planner answers only after step H + A + 5: serving goes on meanwhile, the plan moves after it."""
    ctl = _controller(rank, tmp, "late", ASCEND_RUN, env=ASCEND_ENV, gate=True)

    def open_gate(c):
        if c.step == H + A + 6:
            open(os.path.join(tmp, f"late-gate{rank}"), "w").close()
    try:
        return _serve(ctl, rank, lambda c: bool(c.metrics and c.metrics[0].applied_layers), on_step=open_gate)
    finally:
        ctl.close()


def scenario_eplb_timing(rank, tmp):
    """eplb's own keys keep eplb's rule: the agreement started at a check step is read at the next one."""
    cfg = {"mode": "dynamic", "window_steps": H, "planner_check_steps": A, "policy": "default"}
    ctl = _controller(rank, tmp, "eplb", cfg)
    try:
        return _serve(ctl, rank, lambda c: c.step > H + 2 * A + 3, on_step=_wait_for_planner(H))
    finally:
        ctl.close()


def scenario_halve(rank, tmp):
    """Plans see xLLM's load: each window added to the total, the total halved after each plan."""
    cfg = {"mode": "dynamic", "window_steps": H, "planner_check_steps": 1, "policy": "default",
           "load_history": "halve"}
    ctl = _controller(rank, tmp, "halve", cfg)

    def wait_each(c):
        if c.cycle.records and c.step == c.cycle.records[-1].window_end + 1:
            c.channel.drain()
            c.planner.wait(60)
    try:
        out = _serve(ctl, rank, lambda c: len(c.cycle.records) >= 4, on_step=wait_each)
    finally:
        ctl.close()
    out["loads"] = [np.load(os.path.join(tmp, f"halve-loads{rank}", f"cycle{k}.npy")).tolist()
                    for k in range(len(out["records"]))]
    return out


def scenario_xllm_timer(rank, tmp):
    """xLLM's dialect: a cycle every 0.4 s whatever the step count (its windows end on the clock)."""
    cfg = {"enable_eplb": True, "eplb_update_interval": 0.4, "planner_check_steps": 2, "window_steps": 10**6}
    ctl = _controller(rank, tmp, "timer", cfg)
    try:
        return _serve(ctl, rank, lambda c: len(c.cycle.records) >= 3)
    finally:
        ctl.close()


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


def _all_scenarios(rank: int, tmp: str) -> dict:
    import torch.distributed as dist

    results = {}
    for name, scenario in SCENARIOS.items():
        try:
            results[name] = scenario(rank, tmp)
        except Exception:  # noqa: BLE001 - reported by the scenario's test
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("torch")
    from gloo_ranks import run_ranks

    return run_ranks(_all_scenarios, WORLD, str(tmp_path_factory.mktemp("dialects")), timeout_s=SPAWN_TIMEOUT_S)


def _scenario(runs, name) -> list[dict]:
    results = [r[name] for r in runs]
    for result in results:
        assert "error" not in result, result.get("error")
    assert results[0]["records"] == results[1]["records"]  # both ranks decide everything in the same steps
    assert results[0]["first_switch"] == results[1]["first_switch"]
    return results


def test_ascend_plan_moves_a_steps_after_its_window(runs):
    """vllm-ascend: the window of H steps is handed over at step H; the first layer moves in step H + A and is in
    force from step H + A + 1 on, as in vllm-ascend's updator (a planner that answered in time)."""
    result = _scenario(runs, "ascend_on_time")[0]
    window_start, window_end, ready, apply_start, skipped = result["records"][0]
    assert (window_start, window_end, skipped) == (0, H, None)
    assert ready < H + A and apply_start == H + A and result["first_switch"] == H + A + 1


def test_ascend_late_planner_never_blocks_serving(runs):
    """A planner that answers after step H + A: serving went on through the steps it was late (on the placement in
    force), and the plan moved at the first step after every rank had it."""
    result = _scenario(runs, "ascend_late")[0]
    window_start, window_end, ready, apply_start, skipped = result["records"][0]
    assert window_end == H and skipped is None
    assert ready > H + A + 5 and apply_start == ready + 1 and result["first_switch"] == ready + 2


def test_eplb_keys_keep_eplb_timing(runs):
    """planner_check_steps A (eplb's key): the reply is agreed at the check step after the one that saw it, so the
    first layer moves at H + 2A + 1 (the rule vllm-ascend's algorithm_execution_interval used to get)."""
    result = _scenario(runs, "eplb_timing")[0]
    window_start, window_end, ready, apply_start, skipped = result["records"][0]
    assert (window_end, ready, apply_start, result["first_switch"]) == (H, H + 2 * A, H + 2 * A + 1, H + 2 * A + 2)


def test_halved_load_history(runs):
    """Every plan saw the previous total halved (integer division) plus its window's ids, counted here from the
    ids both ranks routed."""
    for result in _scenario(runs, "halve"):
        total = None
        for (start, end, *_), load in zip(result["records"], result["loads"]):
            window = logical_counts(start, end)
            total = window if total is None else total // 2 + window
            assert np.array_equal(np.asarray(load), total)
        assert len(result["loads"]) >= 4


def test_xllm_cycles_start_on_the_clock(runs):
    """Windows end on the clock, not on a step count (window_steps is a million): at check steps, and only once the
    clock of some rank, read in the check step before, had passed 0.4 s since the last window ended."""
    results = _scenario(runs, "xllm_timer")
    ends = [end for _, end, *_ in results[0]["records"]]
    assert len(ends) >= 3 and all(end % 2 == 0 for end in ends)
    for a, b in zip(ends, ends[1:]):
        # the timer restarted inside step a's before_forward and read the clock inside step b - 2's: the times
        # taken just before the first and just after the second bound that span from above
        assert max(r["after"][b - 2] - r["before"][a] for r in results) >= 0.4, (a, b)
