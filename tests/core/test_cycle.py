"""The rebalancing cycle state machine shared by the simulator and the runtime."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb import Placement, Topology
from eplb.cycle import Cycle, CycleConfig, CycleError, Phase
from eplb.cycle.planning import PlanState, plan_cycle, schedule_parts
from eplb.policies.base import Plan, Policy

TOPOLOGY = Topology(2, 2)
CURRENT_ROW, NEW_ROW = [0, 1, 2, 0], [0, 2, 1, 0]  # 2 transfers: expert 2 to rank 0, expert 1 to rank 1


class Figures(Policy):
    """A policy that returns the given predicted figures (changed layers move to ``NEW_ROW``)."""

    def __init__(self, before, after, moved):
        self.before, self.after, self.moved = before, after, moved

    def rebalance(self, load, topology, current=None, live_ranks=None, resilience=None, state=None):
        changed = self.moved > 0
        rows = np.where(changed[:, None], NEW_ROW, CURRENT_ROW)
        return Plan(placement=Placement(rows, 3, TOPOLOGY), reference=current, changed=changed,
                    par_before=self.before, par_after=self.after, moved_slots=self.moved)


def make_plan(cycle, before, after, moved=None, load=None, expert_bytes=0):
    """The planning function's plan for these figures, on ``cycle``'s options and state."""
    before = np.asarray(before, dtype=float)
    after = np.asarray(after, dtype=float)
    moved = np.asarray(moved if moved is not None else (before != after) * 3, dtype=np.int64)
    current = Placement(np.tile(CURRENT_ROW, (before.size, 1)), 3, TOPOLOGY)
    load = np.ones((before.size, 3)) if load is None else load
    return plan_cycle(Figures(before, after, moved), load, current, cycle.config, expert_bytes, state=cycle.state)


def run(cycle, steps, on_submit=None, start=0, forwards=1):
    """Drive ``cycle``; parts posted in step ``s`` land within ``forwards`` forwards and switch in ``s + forwards +
    1`` (the runtime's agreement step)."""
    actions, due = [], None
    for step in range(start, start + steps):
        if due == step:
            cycle.switched(step)
            due = None
        action = cycle.on_step(step)
        actions.append(action)
        if action.apply_layers:
            due = step + forwards + 1
        if action.submit and on_submit is not None:
            on_submit(cycle, step)
    return actions


def test_collect_plan_apply_one_layer_per_step_largest_gain_first():
    cycle = Cycle(CycleConfig(cycle_steps=10, planner_steps=3), num_layers=4)
    figures = ([1.5, 1.2, 1.0, 2.0], [1.1, 1.2, 1.0, 1.1])
    actions = run(cycle, 25, lambda c, s: c.plan_ready(s, make_plan(c, *figures)))
    assert [a.step for a in actions if a.submit] == [10, 20]
    assert actions[10].window_start == 0 and actions[20].window_start == 10
    assert all(a.phase is Phase.COLLECT and not a.apply_layers for a in actions[:10])
    assert [a.phase for a in actions[10:13]] == [Phase.PLAN] * 3
    assert actions[13].apply_layers == (3,) and actions[15].apply_layers == (0,)  # gain 0.9 before 0.4
    assert actions[14].phase is Phase.APPLY and not actions[14].apply_layers  # layer 3 lands: nothing new posted
    assert actions[17].phase is Phase.COLLECT
    record = cycle.records[0]
    assert (record.window_start, record.window_end, record.ready_step) == (0, 10, 10)
    assert (record.apply_start, record.apply_end, record.layers, record.moved_slots) == (13, 15, [3, 0], 6)
    assert record.switch_steps == [15, 17] and record.deferred_steps == 0
    assert record.par_before == pytest.approx(1.75) and record.par_after == pytest.approx(1.1)


def test_plan_is_applied_no_earlier_than_the_step_after_submission():
    cycle = Cycle(CycleConfig(cycle_steps=2, planner_steps=0), num_layers=1)
    actions = run(cycle, 4, lambda c, s: c.plan_ready(s, make_plan(c, [2.0], [1.0])))
    assert actions[2].submit and not actions[2].apply_layers
    assert actions[3].apply_layers == (0,)


def test_runtime_polls_until_the_plan_arrives():
    cycle = Cycle(CycleConfig(cycle_steps=5), num_layers=2)
    actions = run(cycle, 8)
    assert actions[5].submit and all(a.poll for a in actions[5:8])
    assert cycle.plan_ready(7, make_plan(cycle, [1.3, 1.4], [1.0, 1.0])) == (1, 0)
    action = cycle.on_step(8)
    assert action.apply_layers == (1,) and not action.poll


def test_late_planner_skips_the_cycle_and_keeps_collecting():
    cycle = Cycle(CycleConfig(cycle_steps=4, deadline_steps=3), num_layers=2)
    actions = run(cycle, 12)
    assert actions[4].submit
    assert actions[7].skipped == "late" and actions[7].phase is Phase.COLLECT
    assert actions[8].submit and actions[8].window_start == 4  # the next window started at the submission
    assert cycle.records[0].skipped == "late" and cycle.records[0].layers == []
    with pytest.raises(CycleError, match="no plan is awaited"):
        cycle.plan_ready(11, make_plan(cycle, [1.3, 1.4], [1.0, 1.0]))  # the late plan of cycle 0 is refused


def test_failed_planner_skips_the_cycle():
    cycle = Cycle(CycleConfig(cycle_steps=3), num_layers=1)
    run(cycle, 4, lambda c, s: c.plan_failed(s, "worker died"))
    action = cycle.on_step(4)
    assert action.skipped == "failed: worker died" and not action.apply_layers
    assert cycle.records[0].skipped == "failed: worker died"


def test_plan_without_gain_is_skipped():
    cycle = Cycle(CycleConfig(cycle_steps=3, min_gain=0.05), num_layers=3)
    run(cycle, 4, lambda c, s: c.plan_ready(s, make_plan(c, [1.3, 1.2, 1.1], [1.28, 1.25, 1.1], [2, 2, 0])))
    assert cycle.on_step(4).skipped == "no gain"


def test_thresholds_and_cherry_picking():
    cycle = Cycle(CycleConfig(cycle_steps=1, min_par=1.05, min_gain=0.02, max_layers=2), num_layers=5)
    plan = make_plan(cycle, [1.02, 1.5, 1.4, 1.8, 1.3], [1.0, 1.1, 1.39, 1.0, 1.0])
    cycle.on_step(0)
    cycle.on_step(1)
    assert cycle.plan_ready(1, plan) == (3, 1)  # layer 0 below min_par, 2 below min_gain, 4 cut by max_layers


def test_byte_budget_and_all_at_once():
    figures = ([2.0, 1.9, 1.8, 1.7], [1.0, 1.0, 1.0, 1.0])
    cycle = Cycle(CycleConfig(cycle_steps=1, bytes_per_step=4.0), num_layers=4)
    plan = make_plan(cycle, *figures, expert_bytes=[1, 1, 4, 1])
    assert plan.layer_bytes.tolist() == [2, 2, 8, 2]  # 2 transfers per layer x the layer's expert bytes
    actions = run(cycle, 7, lambda c, s: c.plan_ready(s, plan) if not c.records[:-1] else c.plan_failed(s, "x"))
    # every rank receives one expert per layer: 1 + 1 bytes fit, layer 2's 4 bytes only alone
    assert [a.apply_layers for a in actions[2:7:2]] == [(0, 1), (2,), (3,)]
    assert [a.apply_parts for a in actions[2:7:2]] == [(0, 1), (2,), (3,)]
    assert plan.staged_bytes.tolist() == [[2, 2], [4, 4], [1, 1]]
    assert cycle.records[0].schedule == [(0, 1), (2,), (3,)] and cycle.records[0].bytes_moved == 14
    cycle = Cycle(CycleConfig(cycle_steps=1, layers_per_step=0), num_layers=4)
    actions = run(cycle, 3, lambda c, s: c.plan_ready(s, make_plan(c, *figures)))
    assert actions[2].apply_layers == (0, 1, 2, 3)
    parts = [plan.parts[i] for i in (2, 0, 1)]
    schedule, staged = schedule_parts(parts, np.ones(4, dtype=np.int64), CycleConfig(cycle_steps=1, layers_per_step=2))
    assert schedule == ((2, 0), (1,)) and staged.tolist() == [[2, 2], [1, 1]]


def test_similarity_threshold_applies_only_layers_whose_load_drifted():
    cycle = Cycle(CycleConfig(cycle_steps=1, layers_per_step=0, similarity_threshold=0.99), num_layers=2)
    first = np.array([[10.0, 1.0, 1.0], [10.0, 1.0, 1.0]])
    second = np.array([[10.0, 1.0, 1.0], [1.0, 10.0, 1.0]])  # layer 1 flipped
    cycle.on_step(0)
    cycle.on_step(1)
    assert cycle.plan_ready(1, make_plan(cycle, [1.5, 1.5], [1.0, 1.0], load=first)) == (0, 1)  # never applied
    cycle.on_step(2)  # the plan starts applying: its state (the loads applied on) is the cycle's now
    assert isinstance(cycle.state, PlanState) and np.array_equal(cycle.state.applied_load, first)
    cycle.on_step(3)
    cycle.switched(4)  # its layers are in force: the next window ends at once
    cycle.on_step(4)
    assert cycle.plan_ready(4, make_plan(cycle, [1.5, 1.5], [1.0, 1.0], load=second)) == (1,)


def test_long_apply_submits_as_soon_as_it_ends():
    cycle = Cycle(CycleConfig(cycle_steps=3, planner_steps=2), num_layers=5)
    actions = run(cycle, 18, lambda c, s: c.plan_ready(s, make_plan(c, [2.0] * 5, [1.0] * 5)))
    assert actions[3].submit
    assert [a.step for a in actions[:15] if a.apply_layers] == [5, 7, 9, 11, 13]
    assert actions[15].submit and actions[15].window_start == 3


def test_a_transfer_that_spans_several_forwards_defers_its_switch():
    cycle = Cycle(CycleConfig(cycle_steps=2), num_layers=2)
    actions = run(cycle, 12, lambda c, s: c.plan_ready(s, make_plan(c, [2.0, 1.5], [1.0, 1.0])), forwards=3)
    assert [a.step for a in actions if a.apply_layers] == [3, 7]  # posted in 3, in force from 7 = 3 + 3 + 1
    record = cycle.records[0]
    assert record.switch_steps == [7, 11] and record.deferred_steps == 4  # 2 steps beyond the earliest, twice


def test_an_abandoned_transfer_gives_up_the_rest_of_the_plan():
    cycle = Cycle(CycleConfig(cycle_steps=2), num_layers=3)
    run(cycle, 4, lambda c, s: c.plan_ready(s, make_plan(c, [2.0, 1.9, 1.8], [1.0, 1.0, 1.0])))  # layer 0 posted
    with pytest.raises(CycleError, match="no parts in flight to switch"):
        cycle.switched(3)
    cycle.abandon(4, "a transfer missed its deadline")
    assert cycle.phase is Phase.COLLECT and cycle.pending_layers == ()
    assert cycle.records[0].skipped == "a transfer missed its deadline" and cycle.records[0].switch_steps == []
    assert cycle.on_step(4).submit  # the next window ends as usual


def test_misuse_is_reported_clearly():
    with pytest.raises(CycleError, match="cycle_steps must be an integer >= 1, got 0"):
        CycleConfig(cycle_steps=0)
    with pytest.raises(CycleError, match="deadline_steps"):
        CycleConfig(cycle_steps=5, planner_steps=4, deadline_steps=2)
    with pytest.raises(CycleError, match="similarity_threshold"):
        CycleConfig(cycle_steps=5, similarity_threshold=1.5)
    cycle = Cycle(CycleConfig(cycle_steps=2), num_layers=3)
    cycle.on_step(0)
    with pytest.raises(CycleError, match="consecutive"):
        cycle.on_step(2)
    cycle.on_step(1)
    cycle.on_step(2)
    with pytest.raises(CycleError, match="covers .2,. layers, the cycle 3"):
        cycle.plan_ready(2, make_plan(cycle, [1.5, 1.2], [1.0, 1.0]))
    with pytest.raises(CycleError, match="plan reported for step 5"):
        cycle.plan_ready(5, make_plan(cycle, [1.5, 1.2, 1.0], [1.0, 1.0, 1.0]))


@settings(max_examples=60, deadline=None)
@given(
    interval=st.integers(1, 6), planner_steps=st.integers(0, 4), layers_per_step=st.integers(0, 3),
    num_layers=st.integers(1, 5), events=st.lists(st.sampled_from(["plan", "fail", "wait", "empty"]), max_size=40),
    seed=st.integers(0, 1000),
)
def test_any_sequence_keeps_windows_contiguous_and_applies_each_changed_layer_once(
        interval, planner_steps, layers_per_step, num_layers, events, seed):
    rng = np.random.default_rng(seed)
    cycle = Cycle(CycleConfig(cycle_steps=interval, planner_steps=planner_steps, layers_per_step=layers_per_step,
                              deadline_steps=planner_steps + 3), num_layers=num_layers)
    applied_per_cycle = []
    plans = []
    due = None
    for step, event in enumerate(events + ["wait"] * 40):
        if due == step:
            cycle.switched(step)
            due = None
        action = cycle.on_step(step)
        if action.apply_layers:
            applied_per_cycle.append((len(cycle.records) - 1, action.apply_layers))
            due = step + 1 + int(rng.integers(1, 4))  # the transfer spans 1 to 3 forwards
        if action.poll and event in ("plan", "empty"):
            before = 1 + rng.random(num_layers)
            after = before if event == "empty" else before - rng.random(num_layers) * (before - 1)
            plans.append(make_plan(cycle, before, after))
            cycle.plan_ready(step, plans[-1])
        elif action.poll and event == "fail":
            cycle.plan_failed(step, "boom")
    windows = [(r.window_start, r.window_end) for r in cycle.records]
    assert all(end - start >= interval for start, end in windows)
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
    for index, record in enumerate(cycle.records):
        layers = [layer for i, chunk in applied_per_cycle if i == index for layer in chunk]
        assert layers == record.layers and len(set(layers)) == len(layers)
        assert not (layers and record.skipped)
        assert record.ready_step is not None or not layers
        assert len(record.switch_steps) in (len(record.schedule), len(record.schedule) - 1)  # the last may fly on
        assert all(b >= a + 2 for a, b in zip(record.switch_steps, record.switch_steps[1:]))
