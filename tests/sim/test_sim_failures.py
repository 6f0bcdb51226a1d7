"""Failure injection in the simulator: the report against a direct count, re-planning over live ranks, the CLI."""

import json

import numpy as np
import pytest

import eplb
from eplb import Placement, Topology
from eplb.cli import main
from eplb.cycle import CycleConfig
from eplb.errors import EplbError
from eplb.policies.shared.resilience import Resilience
from eplb.sim.simulator import Failure, SimConfig, simulate
from eplb.sim.traces import TraceSpec, generate_trace, parametric_regimes

TOPOLOGY = Topology(num_ranks=8, slots_per_rank=5, num_nodes=2, num_groups=4)  # 40 slots, 8 redundant
CYCLE = CycleConfig(cycle_steps=40, planner_steps=4)


@pytest.fixture(scope="module")
def trace():
    regimes = parametric_regimes(num_layers=4, num_experts=32, seed=1, num_regimes=3)
    return generate_trace(regimes, TraceSpec(steps=400, decode_tokens=512, segment=(80, 160), requests=2), seed=1)


def test_static_failure_report_equals_a_direct_count(trace):
    failures = (Failure("rank", 6, 100, 250), Failure("node", 0, 300))
    run = simulate(trace, None, SimConfig(TOPOLOGY, CYCLE, failures=failures, reload_lost=False))
    placement = Placement.initial(32, TOPOLOGY, 4)
    slots = TOPOLOGY.slots_per_rank
    for step in (0, 99, 100, 249, 250, 300, 399):
        dead = set()
        if 100 <= step < 250:
            dead.add(6)
        if step >= 300:
            dead |= {0, 1, 2, 3}
        for layer in range(4):
            replicas = {}
            for slot, expert in enumerate(placement.phy2log[layer]):
                if slot // slots not in dead:
                    replicas.setdefault(int(expert), []).append(slot // slots)
            lost = [e for e in range(32) if e not in replicas]
            counts = trace.counts[step, layer].astype(float)
            rank_load = np.zeros(TOPOLOGY.num_ranks)
            for expert, ranks in replicas.items():
                for rank in ranks:
                    rank_load[rank] += counts[expert] / len(ranks)
            live = [r for r in range(TOPOLOGY.num_ranks) if r not in dead]
            assert run.unavailable[step, layer] == len(lost)
            assert run.waiting[step, layer] == pytest.approx(counts[lost].sum())
            assert run.tokens[step, layer] == pytest.approx(rank_load.sum())
            assert run.step_par[step, layer] == pytest.approx(rank_load.max() / rank_load[live].mean())
    summary = run.summary()["failures"]
    by_step = run.unavailable.sum(axis=1)
    assert summary["steps_with_unavailable_experts"] == int((by_step > 0).sum()) == (250 - 100) + (400 - 300)
    assert summary["tokens_waiting"] == pytest.approx(run.waiting.sum())
    first, second = summary["events"]
    assert first["tokens_waiting"] == pytest.approx(run.waiting[100:250].sum())
    assert (first["step"], first["until"], first["failed_ranks"]) == (100, 250, [6])
    assert second["failed_ranks"] == [0, 1, 2, 3] and second["until"] == 400
    assert first["replan_step"] is None and first["par_after_replan"] is None  # static never re-plans


@pytest.mark.parametrize("policy", [None, "default"])
def test_lost_experts_are_reloaded_for_the_step_after_the_failure(trace, policy):
    failures = (Failure("rank", 2, 122),)
    run = simulate(trace, policy and eplb.get_policy(policy), SimConfig(TOPOLOGY, CYCLE, failures=failures))
    assert run.unavailable[122].sum() > 0  # the rank held the only replica of some experts
    assert not run.unavailable[123:].any() and not run.waiting[123:].any()
    assert np.allclose(run.tokens + run.waiting, trace.counts.sum(axis=2))
    event = run.summary()["failures"]["events"][0]
    assert event["tokens_waiting"] == pytest.approx(run.waiting[122].sum())
    live_slots = TOPOLOGY.rank_of_slot != 2
    for layer in range(4):
        assert set(run.final.phy2log[layer, live_slots].tolist()) == set(range(32))
    if policy is not None:  # the cycle in progress was given up, and the next window starts at the failure
        given_up = [c for c in run.cycles if c.skipped == "ranks [2] failed"]
        assert len(given_up) == 1 and given_up[0].window_end == 120  # submitted at 120, plan due at 124
        assert any(c.window_start == 122 for c in run.cycles)


@pytest.mark.parametrize("name", ["default", "swift"])
def test_a_policy_replans_over_the_live_ranks_and_tokens_are_conserved(trace, name):
    failure = Failure("rank", 3, 130, 330)
    config = SimConfig(TOPOLOGY, CYCLE, failures=(failure,), reload_lost=False)
    run = simulate(trace, eplb.get_policy(name), config)
    total = trace.counts.sum(axis=2)
    assert np.allclose(run.tokens + run.waiting, total)  # every routed token is served or waits
    assert not run.unavailable[:130].any() and not run.waiting[:130].any()
    event = run.summary()["failures"]["events"][0]
    assert event["lost_experts"] == int(run.unavailable[130].sum())
    assert event["replan_step"] is not None and 130 < event["replan_step"] < 330
    assert not run.unavailable[event["replan_step"]:].any()  # the re-plan placed every lost expert again
    assert event["par_after_replan"] is not None and event["par_after_failover"] is not None
    assert (run.live_count[130:330] == 7).all() and (run.live_count[330:] == 8).all()


def test_resilience_keeps_every_replicated_expert_through_one_failure(trace):
    failures = (Failure("node", 1, 200, 260), Failure("rank", 2, 320, 360))
    config = SimConfig(TOPOLOGY, CYCLE, failures=failures, resilience=Resilience())
    for name in ("default", "swift"):
        run = simulate(trace, eplb.get_policy(name), config)
        for event in run.summary()["failures"]["events"]:
            assert event["lost_replicated_experts"] == 0, (name, event)
    # without the option the node failure takes both replicas of some experts on this trace
    plain = simulate(trace, eplb.get_policy("default"), SimConfig(TOPOLOGY, CYCLE, failures=failures))
    assert plain.summary()["failures"]["events"][0]["lost_replicated_experts"] > 0


def test_too_few_live_slots_skips_the_cycle_and_keeps_serving(trace):
    small = Topology(num_ranks=8, slots_per_rank=4, num_nodes=2, num_groups=4)  # 32 slots for 32 experts
    run = simulate(trace, eplb.get_policy("default"), SimConfig(small, CYCLE, failures=(Failure("rank", 0, 100),)))
    skipped = [c.skipped for c in run.cycles if c.window_end > 100]
    assert skipped and all(reason == "failed: too few live slots" for reason in skipped)
    assert run.unavailable[100:].sum(axis=1).min() > 0


def test_failure_specs_are_checked():
    assert Failure.parse("rank", "3@100:250") == Failure("rank", 3, 100, 250)
    assert Failure.parse("node", "1@7") == Failure("node", 1, 7, None)
    with pytest.raises(EplbError, match="RANK@STEP or RANK@STEP:BACK"):
        Failure.parse("rank", "3")
    with pytest.raises(EplbError, match="must come back after it fails"):
        Failure("rank", 3, 100, 50)
    with pytest.raises(EplbError, match="the cluster has 2 nodes"):
        Failure("node", 2, 10).ranks(TOPOLOGY)


@pytest.mark.slow
def test_cli_failures_in_json_and_table(capsys):
    args = ["simulate", "--steps", "200", "--interval", "50", "--planner-steps", "4", "--policies", "default",
            "--clairvoyant", "none", "--no-files", "--ranks", "16", "--redundant", "64", "--nodes", "2"]
    assert main([*args, "--json", "--fail-rank", "5@100:150", "--fail-node", "1@160", "--resilient"]) == 0
    out = json.loads(capsys.readouterr().out)
    failures = out["policies"]["default"]["failures"]
    assert [e["spec"] for e in failures["events"]] == ["rank 5@100:150", "node 1@160"]
    assert out["settings"]["failures"] == ["rank 5 fails at step 100, back at step 150", "node 1 fails at step 160"]
    assert out["settings"]["resilience"]["spread_nodes"] is True
    assert main([*args, "--fail-rank", "5@100"]) == 0
    assert "failures" in capsys.readouterr().out
    for bad, message in ((["--fail-rank", "5-100"], "--fail-rank must be RANK@STEP"),
                         (["--fail-rank", "16@10"], "the cluster has 16 ranks")):
        assert main([*args, *bad]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
