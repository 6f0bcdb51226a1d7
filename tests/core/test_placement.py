import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb import Placement, PlacementError, Topology
from eplb.placement import compute_log2phy, find_problems, initial_phy2log


def test_ascend_initial_placements(ascend_vectors):
    for case in ascend_vectors["default_initial_placement"]:
        if "error" in case:
            continue
        t = Topology.from_redundant(case["ep_size"], case["num_experts"], case["num_redundant"])
        p = Placement.initial(case["num_experts"], t, layout="ascend")
        assert p.rank_table[0].tolist() == case["placement"]


def test_vllm_initial_placements(vllm_vectors):
    case = next(c for c in vllm_vectors["cases"] if c["name"] == "initial_placement")
    for io in case["inputs_outputs"]:
        e, r = io["num_routed"], io["num_redundant"]
        # the vLLM row does not depend on the rank count; use one rank holding every slot
        row = initial_phy2log(e, Topology(1, e + r))
        if "phy2log" in io:
            assert row.tolist() == io["phy2log"]
        else:
            assert row[-r:].tolist() == io["phy2log_tail"]


def test_rank_maps(ascend_vectors):
    for case in ascend_vectors["rank_maps"]:
        if "placement" in case:
            p = Placement.from_rank_table(case["placement"], num_experts=max(map(max, case["placement"])) + 1)
        else:
            t = Topology.from_redundant(case["ep_size"], case["num_experts"], case["num_redundant"])
            p = Placement.initial(case["num_experts"], t, layout="ascend")
        if "global_expert_map" in case:
            assert p.expert_maps[0].tolist() == case["global_expert_map"]
            continue
        assert p.expert_map(case["rank"])[0].tolist() == case["expert_map"], case["name"]
        if case["log2phy"] is not None:
            assert p.log2phy_for_rank(case["rank"])[0].tolist() == case["log2phy"], case["name"]


def test_replica_choice_with_tp(ascend_vectors):
    rule = ascend_vectors["log2phy_replica_choice"]
    p = Placement.from_rank_table(rule["placement"])
    for case in rule["cases"]:
        assert p.log2phy_for_rank(case["rank"], tp_size=case["tp_size"])[0].tolist() == case["log2phy"]


def test_docstring_maps(vllm_vectors):
    case = next(c for c in vllm_vectors["cases"] if c["name"] == "docstring_map_example")
    inp = case["inputs"]
    p = Placement(inp["phy2log"], inp["num_logical"], Topology(inp["num_ranks"], inp["num_physical"] // inp["num_ranks"]))
    assert p.log2phy.tolist() == case["asserts"]["log2phy"]
    assert p.replica_count.tolist() == case["asserts"]["logcnt"]


def test_compute_logical_maps_with_empty_slots(vllm_vectors):
    case = next(c for c in vllm_vectors["cases"] if c["name"] == "compute_logical_maps_negative_slots")
    log2phy, count = compute_log2phy(np.array(case["inputs"]["phy2log"]), case["inputs"]["num_logical_experts"])
    assert list(log2phy.shape) == case["asserts"]["log2phy_shape"]
    assert log2phy[0, :, 0].tolist() == case["asserts"]["log2phy[0,:,0]"]
    assert count.tolist() == case["asserts"]["logcnt"]
    assert log2phy.tolist() == case["computed"]["log2phy"]


def test_invalid_placements_name_the_problem():
    t = Topology(2, 3)
    with pytest.raises(PlacementError, match=r"layer 0, rank 1, slot 4: expert id 9 is out of range \[0, 5\)"):
        Placement([0, 1, 2, 3, 9, 4], 5, t)
    with pytest.raises(PlacementError, match="layer 1: expert 4 has no replica"):
        Placement([[0, 1, 2, 3, 4, 4], [0, 1, 2, 3, 3, 3]], 5, t)
    with pytest.raises(PlacementError, match="5 slots per layer, expected 6"):
        Placement([0, 1, 2, 3, 4], 5, t)
    with pytest.raises(PlacementError, match="rectangular"):
        Placement([[0, 1, 2, 3, 4, 4], [0, 1]], 5, t)
    p = Placement([0, 0, 1, 2, 3, 4], 5, t)
    assert p.problems(allow_shared_rank=True) == []
    with pytest.raises(PlacementError, match="layer 0, rank 0: expert 0 is placed more than once"):
        p.validate(allow_shared_rank=False)


def test_problem_list_is_capped():
    t = Topology(1, 100)
    problems = find_problems(np.full((1, 100), 500), 100, t)
    assert any(line.startswith("... and 80 more out-of-range") for line in problems)


def test_moves_and_replace_layers():
    t = Topology(2, 2)
    a = Placement([[0, 1, 2, 3], [0, 1, 2, 3]], 4, t)
    b = Placement([[0, 1, 3, 2], [0, 1, 2, 3]], 4, t)
    assert a.moves_to(b).sum(axis=1).tolist() == [2, 0]
    c = a.replace_layers(np.array([True, False]), b)
    assert c == b and c != a
    with pytest.raises(ValueError):
        a.phy2log[0, 0] = 3  # read-only


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 40), st.integers(1, 16), st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_derived_views_agree(num_layers, num_experts, num_ranks, extra_per_rank, seed):
    rng = np.random.default_rng(seed)
    slots = -(-num_experts // num_ranks) + extra_per_rank
    t = Topology(num_ranks, slots)
    rows = []
    for _ in range(num_layers):
        row = np.concatenate([np.arange(num_experts), rng.integers(0, num_experts, t.num_physical - num_experts)])
        rows.append(rng.permutation(row))
    p = Placement(np.array(rows), num_experts, t)
    for layout in ("vllm", "spread"):
        Placement.initial(num_experts, t, num_layers, layout)
    count = p.replica_count
    assert count.sum(axis=1).tolist() == [t.num_physical] * num_layers
    for l in range(num_layers):
        for e in range(num_experts):
            slots_of_e = np.flatnonzero(p.phy2log[l] == e)
            assert p.log2phy[l, e, : count[l, e]].tolist() == slots_of_e.tolist()
            assert np.all(p.log2phy[l, e, count[l, e]:] == -1)
        for r in range(num_ranks):
            em = p.expert_map(r)[l]
            local = p.phy2log[l, r * slots:(r + 1) * slots]
            for e in range(num_experts):
                where = np.flatnonzero(local == e)
                assert em[e] == (where[0] if where.size else -1)
            choice = p.log2phy_for_rank(r)[l]
            assert np.all(p.phy2log[l, choice] == np.arange(num_experts))
