"""Simulator = runtime with the adaptive cadence: the trace of ``test_parity`` replayed through ``eplb.sim.simulate``
and through the real ``EplbController`` on two Gloo ranks, with ``adaptive_cadence`` set, gives the same cycles:
the same windows (intervals that double while the load is stable, a restart after a drift, windows that slide back
past the previous submit), plan checksums, layers per step, moved slots and bytes, and the same final placement.
``default`` (planned on the window's sum) drifts and restarts on this trace; ``auto`` (per-step rows) slides."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from eplb import Topology  # noqa: E402
from eplb.cycle.cadence import AdaptiveCadence  # noqa: E402
from eplb.cycle import Cycle, CycleConfig  # noqa: E402
from eplb.cycle.planning import cycle_policy  # noqa: E402
from eplb.sim.simulator import SimConfig, simulate  # noqa: E402
from eplb.sim.traces import Trace  # noqa: E402

from gloo_ranks import run_ranks  # noqa: E402
from test_parity import EXPERT_BYTES, EXPERTS, LAYERS, SLOTS, STEPS, _tokens, comparable, parity_counts  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORLD = 2
CADENCE = {"min_steps": 50, "max_steps": 200, "window_steps": 400, "tolerance": 0.02}
POLICIES = ("default", "auto")


def _serve(rank: int, policy: str, tokens: list) -> dict:
    from eplb.runtime import EplbConfig, EplbController

    topology = Topology(WORLD, SLOTS // WORLD)
    config = EplbConfig.from_dict({"mode": "dynamic", "window_steps": CADENCE["min_steps"], "planner_check_steps": 1,
                                   "policy": policy, "dispatch": "rank", "planner_deadline_s": 300.0,
                                   "measured_price": False, "adaptive_cadence": CADENCE})
    tensors = [[torch.zeros(topology.slots_per_rank, 4)] for _ in range(LAYERS)]
    ctl = EplbController(config, LAYERS, EXPERTS, topology, rank, layer_tensors=tensors)
    try:
        for step in range(STEPS):
            ctl.channel.drain()
            if ctl.planner.busy:
                ctl.planner.wait(300.0)
            ctl.before_forward()
            for layer in range(LAYERS):
                ids, group = tokens[step][layer]
                ctl.route(layer, ids, group)
            ctl.after_forward()
        return {"records": [dataclasses.asdict(r) for r in ctl.cycle.records], "final": ctl.placement.phy2log,
                "history": list(ctl.cycle.cadence.history)}
    finally:
        ctl.close()


def _rank_main(rank: int, tmp: str) -> dict:
    tokens = _tokens(parity_counts(), rank, WORLD)
    return {policy: _serve(rank, policy, tokens) for policy in POLICIES}


def _simulated(policy: str):
    cycles = []

    class Recorded(Cycle):  # keeps the simulator's cycle, for its cadence history
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            cycles.append(self)

    config = SimConfig(Topology(WORLD, SLOTS // WORLD),
                       CycleConfig(cycle_steps=CADENCE["min_steps"], planner_steps=3,
                                   adaptive=AdaptiveCadence(**CADENCE)),
                       dispatch="rank", expert_bytes=EXPERT_BYTES)
    import eplb.sim.simulator as simulator

    original, simulator.Cycle = simulator.Cycle, Recorded
    try:
        result = simulate(Trace.from_counts(parity_counts()), cycle_policy(policy, dispatch="rank"), config)
    finally:
        simulator.Cycle = original
    return result, cycles[-1].cadence.history


def test_adaptive_cadence_runs_the_same_cycles_in_the_simulator_and_the_runtime(tmp_path):
    ranks = run_ranks(_rank_main, WORLD, str(tmp_path), timeout_s=600)
    for out in ranks:
        assert "error" not in out, out.get("error")
    for policy in POLICIES:
        sim, history = _simulated(policy)
        expected = [comparable(dataclasses.asdict(r)) for r in sim.cycles]
        for rank, out in enumerate(ranks):
            assert [comparable(r) for r in out[policy]["records"]] == expected, (policy, rank)
            assert out[policy]["history"] == history, (policy, rank)
            np.testing.assert_array_equal(out[policy]["final"], sim.final.phy2log)
        assert any(c.window_start < prev.window_end for prev, c in zip(sim.cycles, sim.cycles[1:])), policy  # slid
        if policy == "default":
            assert any(d is not None and d > CADENCE["tolerance"] for _, d, _ in history)  # a drift restarted it
