"""The collect side of the cycle (eplb.cycle.cadence): a planning window of its own length, and the adaptive cadence
that plans sooner after the load drifted and waits longer while it is stable, in the cycle and in the simulator."""

import numpy as np
import pytest

from eplb import EplbError, Topology
from eplb.cycle.cadence import AdaptiveCadence
from eplb.cycle import Cycle, CycleConfig, CycleError
from eplb.sim.simulator import SimConfig, simulate
from eplb.sim.traces import Trace
from eplb.cycle.planning import cycle_policy

from test_cycle import make_plan


def drive(cycle, steps, figures):
    """Run ``steps`` steps, answering each submit with the plan ``figures(index, cycle)`` gives (before, after), and
    switching each apply step's parts two steps after their post; returns the submits as (window_start, step)."""
    submits, due = [], None
    for step in range(steps):
        if due == step:  # the parts posted two steps ago landed within their forward: in force now
            cycle.switched(step)
            due = None
        action = cycle.on_step(step)
        if action.apply_layers:
            due = step + 2
        if action.submit:
            before, after = figures(len(submits), cycle)
            submits.append((action.window_start, step))
            cycle.plan_ready(step, make_plan(cycle, before, after))
    return submits


def steady(index, cycle):
    return [1.2, 1.2], [1.2, 1.2]  # the placement in force does as predicted: nothing to gain


def test_window_steps_shorter_and_longer_than_the_interval():
    short = drive(Cycle(CycleConfig(cycle_steps=10, window_steps=4), num_layers=2), 35, steady)
    assert short == [(6, 10), (16, 20), (26, 30)]  # vLLM's window_size < step_interval: the last 4 steps
    sliding = drive(Cycle(CycleConfig(cycle_steps=10, window_steps=25), num_layers=2), 45, steady)
    assert sliding == [(0, 10), (0, 20), (5, 30), (15, 40)]  # never before the start, then 25 steps back


def test_a_sliding_plan_is_priced_for_its_window_not_its_interval():
    cycle = Cycle(CycleConfig(cycle_steps=10, window_steps=40), num_layers=2)
    lives = []
    for step in range(31):
        if cycle.on_step(step).submit:
            lives.append(cycle.planning_config.cycle_steps)
            cycle.plan_ready(step, make_plan(cycle, *steady(0, cycle)))
    assert lives == [10, 20, 30]
    fixed = Cycle(CycleConfig(cycle_steps=10), num_layers=2)
    fixed.on_step(0)
    assert fixed.planning_config is fixed.config


def test_stable_load_doubles_the_interval_up_to_the_bound_and_slides_the_window():
    adaptive = AdaptiveCadence(min_steps=5, max_steps=20, window_steps=30, tolerance=0.05)
    cycle = Cycle(CycleConfig(cycle_steps=5, adaptive=adaptive), num_layers=2)
    submits = drive(cycle, 100, steady)
    ends = [end for _, end in submits]
    assert ends[:5] == [5, 15, 35, 55, 75]  # intervals 5, 10, 20, 20, 20
    assert [start for start, _ in submits][:5] == [0, 0, 5, 25, 45]  # up to 30 steps back
    assert [interval for _, _, interval in cycle.cadence.history][:3] == [10, 20, 20]


def test_drift_plans_sooner_on_the_steps_after_it():
    adaptive = AdaptiveCadence(min_steps=5, max_steps=40, window_steps=80, tolerance=0.05)
    cycle = Cycle(CycleConfig(cycle_steps=5, adaptive=adaptive), num_layers=2)

    def drifting(index, cycle):
        if index == 3:  # the placement in force does 25% worse than it was planned to: the load drifted
            return [1.5, 1.5], [1.1, 1.1]
        return [1.2, 1.2], [1.2, 1.2]

    submits = drive(cycle, 120, drifting)
    drift_end = submits[3][1]
    assert submits[4] == (drift_end, drift_end + 5)  # min_steps later, none of the steps before the drift
    drifts = [d for _, d, _ in cycle.cadence.history]
    assert drifts[0] is None and drifts[3] == pytest.approx(1.5 / 1.2 - 1)
    assert drifts[4] is None  # planned on load from before the drift: not tested
    assert submits[5][1] - submits[4][1] == 10  # then it waits longer again


def test_a_small_rise_within_the_tolerance_is_not_drift():
    adaptive = AdaptiveCadence(min_steps=5, max_steps=40, window_steps=80, tolerance=0.1)
    cycle = Cycle(CycleConfig(cycle_steps=5, adaptive=adaptive), num_layers=1)
    submits = drive(cycle, 200, lambda i, c: ([1.2 + 0.01 * (i % 2)], [1.2]))
    intervals = np.diff([0] + [end for _, end in submits])
    assert (np.diff(intervals) >= 0).all() and intervals[-1] == 40


def test_a_restart_starts_the_window_afresh():
    adaptive = AdaptiveCadence(min_steps=5, max_steps=20, window_steps=50)
    cycle = Cycle(CycleConfig(cycle_steps=5, adaptive=adaptive), num_layers=2)
    drive(cycle, 40, steady)
    cycle.restart(40, "ranks [1] failed")
    starts = []
    for step in range(40, 80):
        if cycle.on_step(step).submit:
            starts.append(cycle.records[-1].window_start)
            cycle.plan_ready(step, make_plan(cycle, *steady(0, cycle)))
    assert starts and min(starts) >= 40


@pytest.mark.parametrize("kwargs, word", [
    (dict(min_steps=0, max_steps=5, window_steps=5), "min_steps"),
    (dict(min_steps=10, max_steps=5, window_steps=20), "max_steps"),
    (dict(min_steps=10, max_steps=20, window_steps=5), "window_steps"),
    (dict(min_steps=5, max_steps=20, window_steps=20, tolerance=-0.1), "tolerance"),
])
def test_bad_bounds_are_refused_by_name(kwargs, word):
    with pytest.raises(EplbError, match=word):
        AdaptiveCadence(**kwargs)


def test_bad_cycle_options_are_refused():
    with pytest.raises(CycleError, match="window_steps"):
        CycleConfig(cycle_steps=10, window_steps=0)
    with pytest.raises(CycleError, match="adaptive"):
        CycleConfig(cycle_steps=10, adaptive={"min_steps": 5})


def _switching_trace(steps=600, layers=3, experts=16, switch=300, seed=0):
    """Two loads, each with its own hot experts, one after the other."""
    rng = np.random.default_rng(seed)
    first, second = np.ones(experts), np.ones(experts)
    first[:3], second[-3:] = 12.0, 12.0
    counts = np.empty((steps, layers, experts), dtype=np.int64)
    for step in range(steps):
        popularity = first if step < switch else second
        counts[step] = rng.multinomial(2000, popularity / popularity.sum(), size=layers)
    return Trace.from_counts(counts, name="switch")


def test_the_simulator_plans_the_windows_the_adaptive_cycle_names():
    trace = _switching_trace()
    adaptive = AdaptiveCadence(min_steps=10, max_steps=80, window_steps=160, tolerance=0.05)
    config = SimConfig(Topology(4, 5), CycleConfig(cycle_steps=10, planner_steps=2, adaptive=adaptive))
    result = simulate(trace, cycle_policy("default"), config)
    again = simulate(trace, cycle_policy("default"), config)
    assert [(c.window_start, c.window_end, c.checksum) for c in result.cycles] == \
        [(c.window_start, c.window_end, c.checksum) for c in again.cycles]
    ends = [c.window_end for c in result.cycles]
    assert max(np.diff(ends)) > 10  # waited longer while the load was stable
    after = [c for c in result.cycles if c.window_end > 300]
    assert after and after[0].window_end <= 300 + 80 + 2 + 3  # the switch is planned for within one interval
    assert any(c.window_end - c.window_start > 80 for c in result.cycles)  # a stable load is planned on a long window
    assert all(c.window_start >= 0 for c in result.cycles)


def test_after_a_switch_the_adaptive_run_plans_on_the_new_load_alone_and_sooner():
    """Against a fixed cadence as long as the adaptive one's longest window: the adaptive run sees the drift,
    plans on steps after it only, and serves the new load better from then on."""
    trace = _switching_trace(steps=900, switch=450)
    topology = Topology(4, 5)
    fixed = simulate(trace, cycle_policy("default"),
                     SimConfig(topology, CycleConfig(cycle_steps=400, planner_steps=2)))
    adaptive = simulate(trace, cycle_policy("default"), SimConfig(topology, CycleConfig(
        cycle_steps=25, planner_steps=2, adaptive=AdaptiveCadence(25, 100, 400))))
    first_after = min(c.window_end for c in adaptive.cycles if c.window_start >= 450)
    assert first_after <= 450 + 2 * 100 + 25
    assert not [c for c in fixed.cycles if c.window_start >= 450 and c.window_end < 900]
    later = slice(first_after + 2 + 3, 800)  # applied (planner delay, a layer per step), before the fixed re-plan
    assert adaptive.step_us[later].mean() < fixed.step_us[later].mean()
