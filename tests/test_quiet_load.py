"""Zero or near-zero load: no policy moves anything, the placement in force is kept (``eplb.load.quiet_layers``).

A layer is quiet when it carries no load, or fewer tokens (whole counts) than there are ranks. Checked for every
registered policy on random problems (hypothesis), over the live ranks after a failure, and through ``eplb plan``.
"""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
from eplb import Placement, Topology
from eplb.cli import main
from eplb.formats import write_load, write_map
from eplb.load import quiet_layers

POLICIES = eplb.available_policies()


def test_quiet_layers_definition():
    window = np.array([[0, 0, 0, 0],            # no load
                       [1, 0, 2, 0],            # 3 tokens < 4 ranks
                       [1, 1, 1, 1],            # 4 tokens: one per rank, plan
                       [0.25, 0.25, 0.5, 0],    # fractions: their token count is unknown, plan
                       [0.0, 0.0, 0.0, 1e-300]])  # not zero, not whole: plan
    assert quiet_layers(window, 4).tolist() == [True, True, False, False, False]
    assert quiet_layers(window, 1).tolist() == [True, False, False, False, False]


def _clean_placement(rng, topology: Topology, num_experts: int, num_layers: int) -> Placement:
    """A random valid placement where no rank holds an expert twice (a plan any policy could have made)."""
    rows = []
    for _ in range(num_layers):
        row = (np.arange(topology.num_physical) + rng.integers(num_experts)) % num_experts
        table = row.reshape(topology.num_ranks, topology.slots_per_rank)[rng.permutation(topology.num_ranks)]
        rows.append(rng.permuted(table, axis=1).ravel())
    return Placement(np.stack(rows), num_experts, topology)


@st.composite
def quiet_problems(draw):
    num_layers = draw(st.integers(1, 5))
    num_ranks = draw(st.integers(2, 32))
    num_experts = draw(st.integers(2, 96))
    slots = -(-num_experts // num_ranks) + draw(st.integers(0, 2))
    slots = min(slots, num_experts)  # every policy can keep a rank free of repeats
    if slots * num_ranks < num_experts:
        slots += 1
    topology = Topology(num_ranks, slots)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    steps = draw(st.sampled_from([0, 1, 4]))
    shape = (num_layers, num_experts) if steps == 0 else (steps, num_layers, num_experts)
    kind = draw(st.sampled_from(["zero", "near-zero", "mixed"]))
    load = np.zeros(shape, dtype=np.int64)
    last = load[-1] if steps else load  # the step that carries the window's tokens (a view)
    if kind != "zero":  # fewer tokens than ranks in every layer, on one to three experts
        for layer in range(num_layers):
            tokens = int(rng.integers(1, num_ranks))
            np.add.at(last[layer], rng.integers(0, min(3, num_experts), tokens), 1)
    loud = np.zeros(num_layers, dtype=bool)
    if kind == "mixed":  # some layers carry a skewed load worth planning on
        loud = rng.random(num_layers) < 0.5
        last[loud] = np.minimum(rng.zipf(1.3, size=(num_layers, num_experts)), 10**5)[loud] * 50
    current_kind = draw(st.sampled_from(["none", "clean"]))
    current = None if current_kind == "none" else _clean_placement(rng, topology, num_experts, num_layers)
    return load, topology, current, loud


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=quiet_problems())
def test_no_policy_moves_a_quiet_layer(name, problem):
    load, topology, current, loud = problem
    num_layers, num_experts = load.shape[-2:]
    plan = eplb.get_policy(name).rebalance(load, topology, current)
    in_force = current if current is not None else Placement.initial(num_experts, topology, num_layers)
    quiet = ~loud
    np.testing.assert_array_equal(plan.placement.phy2log[quiet], in_force.phy2log[quiet])
    assert plan.moved_slots[quiet].tolist() == [0] * int(quiet.sum())
    assert not plan.changed[quiet].any()
    np.testing.assert_array_equal(plan.par_after[quiet], plan.par_before[quiet])
    assert quiet_layers(load.sum(axis=0) if load.ndim == 3 else load, topology.num_ranks)[quiet].all()


@pytest.mark.parametrize("name", POLICIES)
def test_an_all_zero_load_keeps_a_deepseek_sized_map(name):
    topology = Topology(32, 9, num_nodes=4, num_groups=8)
    current = eplb.get_policy("auto").rebalance(  # no rank holds an expert twice: a map every policy keeps
        np.random.default_rng(0).zipf(1.4, size=(58, 256)), topology).placement
    for load in (np.zeros((58, 256)), np.zeros((10, 58, 256), dtype=np.int32)):
        plan = eplb.get_policy(name).rebalance(load, topology, current=current)
        assert plan.total_moved_slots == 0 and plan.placement == current
        fresh = eplb.get_policy(name).rebalance(load, topology)
        assert fresh.total_moved_slots == 0 and fresh.placement == Placement.initial(256, topology, 58)


@pytest.mark.parametrize("name", POLICIES)
def test_a_quiet_layer_over_the_live_ranks_only_gets_its_lost_experts_back(name):
    topology = Topology(8, 5)
    current = _clean_placement(np.random.default_rng(3), topology, 32, 3)
    live = np.ones(8, dtype=bool)
    live[2] = False
    plan = eplb.get_policy(name).rebalance(np.zeros((3, 32)), topology, current, live_ranks=live)
    lost = current.without_ranks(~live).lost_mask.sum(axis=1)
    assert plan.moved_slots.tolist() == lost.tolist()  # one reload per lost expert, nothing else
    assert (plan.placement.replica_count > 0).all()
    failed_slots = topology.rank_of_slot == 2
    np.testing.assert_array_equal(plan.placement.phy2log[:, failed_slots], current.phy2log[:, failed_slots])


def test_plan_command_keeps_the_current_map_on_a_zero_load(tmp_path, capsys):
    topology = Topology(8, 5)
    current = _clean_placement(np.random.default_rng(4), topology, 32, 4)
    write_map(current, tmp_path / "current.json", "ascend")
    write_load(np.zeros((6, 4, 32), dtype=np.int64), tmp_path / "zero.npz")
    out = tmp_path / "plan.json"
    code = main(["plan", str(tmp_path / "zero.npz"), "--ranks", "8", "--slots-per-rank", "5", "--current",
                 str(tmp_path / "current.json"), "-o", str(out), "--format", "ascend", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["moved_slots"] == 0 and result["layers_changed"] == 0
    assert result["par_before_mean"] == result["par_after_mean"] == 1.0
    assert main(["validate", str(out), "--experts", "32"]) == 0
    from eplb.formats import read_map

    assert np.array_equal(read_map(out).phy2log, current.phy2log)
