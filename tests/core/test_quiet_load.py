"""Zero or near-zero load: no policy moves anything, the placement in force is kept (``eplb.load.quiet_layers``).

A layer is quiet when it carries no load, or fewer tokens (whole counts) than there are ranks. Checked for every
registered policy on a DeepSeek-V3-sized map, over the live ranks after a failure, and through ``eplb plan``; the
property over random problems is in ``tests/policies/test_policies_properties.py``.
"""

import json

import numpy as np
import pytest
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
