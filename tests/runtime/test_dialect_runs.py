"""What the engines' timing keys do in real runs of the runtime on 2 Gloo ranks in real processes: the step at which
a plan moves (vllm-ascend's ``algorithm_execution_interval``, with a planner on time and a late one; eplb's own
``planner_check_steps``), xLLM's timer and its accumulated, halved load. The configs themselves:
tests/runtime/test_runtime_dialects.py.
"""

from __future__ import annotations

import os
import time
import traceback

import numpy as np
import pytest

from eplb import Placement, Topology
from eplb.runtime.config import EplbConfig

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ASCEND_ENV = {"DYNAMIC_EPLB": "true"}

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

    from planner_workers import gated_worker
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
        in_force.append(ctl.in_force.phy2log.copy())
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
    """vllm-ascend: the window of H steps is handed over at step H; the first layer moves in step H + A, as in
    vllm-ascend's updator (a planner that answered in time), and is in force from step H + A + 2 on: the step after
    every rank reported its transfer landed (vllm-ascend's: H + A + 1, waiting for the transfer)."""
    result = _scenario(runs, "ascend_on_time")[0]
    window_start, window_end, ready, apply_start, skipped = result["records"][0]
    assert (window_start, window_end, skipped) == (0, H, None)
    assert ready < H + A and apply_start == H + A and result["first_switch"] == H + A + 2


def test_ascend_late_planner_never_blocks_serving(runs):
    """A planner that answers after step H + A: serving went on through the steps it was late (on the placement in
    force), and the plan moved at the first step after every rank had it."""
    result = _scenario(runs, "ascend_late")[0]
    window_start, window_end, ready, apply_start, skipped = result["records"][0]
    assert window_end == H and skipped is None
    assert ready > H + A + 5 and apply_start == ready + 1 and result["first_switch"] == ready + 3


def test_eplb_keys_keep_eplb_timing(runs):
    """planner_check_steps A (eplb's key): the reply is agreed at the check step after the one that saw it, so the
    first layer moves at H + 2A + 1 (the rule vllm-ascend's algorithm_execution_interval used to get), in force two
    steps later."""
    result = _scenario(runs, "eplb_timing")[0]
    window_start, window_end, ready, apply_start, skipped = result["records"][0]
    assert (window_end, ready, apply_start, result["first_switch"]) == (H, H + 2 * A, H + 2 * A + 1, H + 2 * A + 3)


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
