"""Bounded staging on real Gloo ranks: with ``bytes_per_step`` of one expert, smaller than a layer's moved rows on a
rank, layers switch in parts over consecutive steps, no rank ever holds more staging than the budget, and the model's
outputs stay equal to balancing off."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
# the runtime's default policy, compiled once
pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.usefixtures("compiled_auto")]

from eplb.engine.launch import launch  # noqa: E402
from eplb.engine.model import ModelConfig  # noqa: E402
from eplb.engine.serve import ServeSettings, serve_rank  # noqa: E402

MODEL = ModelConfig(num_layers=3, num_experts=8, top_k=2, hidden=32, ffn=64, num_groups=2, topk_groups=1)
EXPERT_BYTES = 3 * MODEL.hidden * MODEL.ffn * 4  # w13 [2F, D] and w2 [D, F], float32
BUDGET = EXPERT_BYTES  # one expert: a rank receiving two experts of a layer takes two parts


@pytest.fixture(scope="module")
def budget_run():
    settings = ServeSettings(model=MODEL, slots_per_rank=5, tokens_per_rank=64, steps=400, stop_after_cycles=2,
                             eplb={"mode": "dynamic", "window_steps": 12, "planner_check_steps": 2,
                                   "bytes_per_step": BUDGET})
    return launch(serve_rank, 2, (settings,), timeout_s=150, collective_timeout_s=60)


def test_layers_switch_in_parts_within_the_budget_on_every_rank(budget_run):
    applied = [c["applied_layers"] for c in budget_run[0]["cycles"] if c["applied_layers"]]
    assert applied, "no cycle applied a layer"
    assert any(len(layers) > len(set(layers)) for layers in applied)  # some layer went in several parts
    for result in budget_run:
        assert 0 < result["added_memory"]["staging"] <= BUDGET
        assert all(c["staging_bytes"] <= BUDGET for c in result["cycles"])
        assert [c["applied_layers"] for c in result["cycles"]] == [c["applied_layers"] for c in budget_run[0]["cycles"]]


def test_outputs_equal_balancing_off_after_the_parts(budget_run):
    assert all(r["outputs_equal"] for r in budget_run)
