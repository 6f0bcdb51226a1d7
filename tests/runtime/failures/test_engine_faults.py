"""Faults while the engine serves on 3 real ranks (Gloo): planner killed, planner hung past its deadline, one rank
late with its part of every move. One launch runs them all in sequence (each launch costs seconds of process start);
the tests below read its per-rank results. The launch has a global timeout and every collective one of its own, so a
deadlock fails the module instead of blocking CI.

Sequence: cycle 0 plans and moves normally; cycle 1: rank 1's planner is killed holding the request; cycle 2: rank
2's planner hangs (SIGSTOP) past its deadline; cycle 3 plans again with restarted workers. The deadline is generous
(a healthy plan takes milliseconds here), so a loaded runner never makes a healthy planner miss it. Rank 0 sleeps 0.2 s
before ``before_forward`` (where it posts its sends) in the steps after a plan was accepted, while layers move.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
# the runtime's default policy, compiled once
pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.usefixtures("compiled_auto")]

from eplb.engine.launch import launch  # noqa: E402
from eplb.engine.model import ModelConfig  # noqa: E402
from eplb.engine.serve import Faults, ServeSettings, serve_rank  # noqa: E402

WORLD = 3
LAUNCH_TIMEOUT_S = 180
PLANNER_DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def faulty_run():
    settings = ServeSettings(
        model=ModelConfig(num_layers=3, num_experts=8, top_k=2, hidden=32, ffn=64, num_groups=2, topk_groups=1),
        slots_per_rank=3, tokens_per_rank=64, steps=20_000, stop_after_cycles=4,  # serves on through the hang
        eplb={"mode": "dynamic", "window_steps": 12, "planner_check_steps": 2,
              "planner_deadline_s": PLANNER_DEADLINE_S},
        faults=Faults(kill_planner=(1, 1), hang_planner=(2, 2), late_rank=(0, 0.2)))
    return launch(serve_rank, WORLD, (settings,), timeout_s=LAUNCH_TIMEOUT_S, collective_timeout_s=60)


def _cycle(results, index):
    return [r["cycles"][index] for r in results]


def test_first_cycle_moves_experts_on_every_rank(faulty_run):
    first = _cycle(faulty_run, 0)
    assert all(c["skipped"] is None and c["applied_layers"] for c in first)
    assert len({tuple(c["applied_layers"]) for c in first}) == 1


def test_killed_planner_skips_the_cycle_on_every_rank(faulty_run):
    cycle = _cycle(faulty_run, 1)
    assert all(c["skipped"] and not c["applied_layers"] for c in cycle)
    assert "died" in cycle[1]["skipped"]  # the rank whose worker was killed says why
    assert faulty_run[1]["restarts"] >= 1


def test_hung_planner_skips_the_cycle_after_its_deadline(faulty_run):
    cycle = _cycle(faulty_run, 2)
    assert all(c["skipped"] and not c["applied_layers"] for c in cycle)
    assert "deadline" in cycle[2]["skipped"]
    assert faulty_run[2]["restarts"] >= 1


def test_planner_comes_back_for_the_next_cycle(faulty_run):
    cycle = _cycle(faulty_run, 3)
    assert all(c["predicted_par_after"] is not None for c in cycle)  # a plan arrived from the restarted workers


def test_placement_never_changes_while_cycles_are_skipped(faulty_run):
    for result in faulty_run:
        start, end = result["cycles"][1]["submit_step"], result["cycles"][3]["submit_step"]
        assert len(set(result["digests"][start:end])) == 1


def test_every_layer_switches_on_all_ranks_in_the_same_step_despite_a_late_rank(faulty_run):
    digests = [r["digests"] for r in faulty_run]
    assert len({len(d) for d in digests}) == 1
    assert all(len(set(step)) == 1 for step in zip(*digests))  # same router tables on every rank after every step
    assert len(set(digests[0])) > 1  # and they did change


def test_outputs_equal_the_unbalanced_model_after_the_faults(faulty_run):
    assert all(r["outputs_equal"] and r["bitwise_equal"] for r in faulty_run)
