"""The ``swift`` policy (SwiftBalancer): vllm-ascend's rules against vectors of vllm-ascend's own code and a
hand-computed case, CPython's set order; our rules' validity, no shared rank, transfer limits, threshold, acceptance,
intra-node mode, retention, determinism, and its balance on the real DeepSeek-V3 loads."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb import Placement, PolicyError, Topology
from eplb.load import quiet_layers
from eplb.metrics import par, rank_loads
from eplb.policies import get_policy
from eplb.policies.swift import SwiftPolicy

DSV3 = Topology(32, 9, num_nodes=4, num_groups=8)


def scan_home_rank(row: np.ndarray, topology: Topology, num_experts: int) -> np.ndarray:
    """Rank of each expert's first occurrence, scanning slot 0 of every rank, then slot 1, ..."""
    table = row.reshape(topology.num_ranks, topology.slots_per_rank)
    home = np.full(num_experts, -1)
    for k in range(topology.slots_per_rank):
        for r in range(topology.num_ranks):
            if home[table[r, k]] < 0:
                home[table[r, k]] = r
    return home


def transfers(old: np.ndarray, new: np.ndarray, topology: Topology, num_experts: int) -> list[tuple[int, int, int]]:
    """``(source rank, destination rank, expert)`` of every expert arriving on a rank that did not hold it."""
    home = scan_home_rank(old, topology, num_experts)
    old_t = old.reshape(topology.num_ranks, -1)
    new_t = new.reshape(topology.num_ranks, -1)
    return [(int(home[e]), d, int(e)) for d in range(topology.num_ranks) for e in set(new_t[d]) - set(old_t[d])]


def has_repeat(row: np.ndarray, topology: Topology) -> bool:
    table = np.sort(row.reshape(topology.num_ranks, -1), axis=1)
    return bool((table[:, 1:] == table[:, :-1]).any())


def check_layer_rules(plan, current: Placement, topology: Topology, threshold: float = 1.01) -> None:
    """Every rule that holds for a layer whose current placement is valid for vllm-ascend (no repeats)."""
    num_experts = current.num_experts
    for layer in range(current.num_layers):
        old, new = current.phy2log[layer], plan.placement.phy2log[layer]
        if has_repeat(old, topology):
            continue
        pairs = [(s, d) for s, d, _ in transfers(old, new, topology, num_experts)]
        assert len(pairs) == len(set(pairs)), f"layer {layer}: two transfers share a rank pair"
        if plan.par_before[layer] < threshold:
            assert not plan.changed[layer]
        if plan.changed[layer]:
            assert plan.par_after[layer] < plan.par_before[layer]
        # retention: an expert that stays on a rank stays in its slot (vllm-ascend rejects the layer otherwise)
        old_t, new_t = old.reshape(topology.num_ranks, -1), new.reshape(topology.num_ranks, -1)
        for r in range(topology.num_ranks):
            for k, e in enumerate(old_t[r]):
                if e in new_t[r]:
                    assert new_t[r, k] == e, f"layer {layer}, rank {r}: expert {e} changed slot"


@st.composite
def problems(draw):
    num_ranks = draw(st.integers(1, 8))
    slots = draw(st.integers(1, 6))
    num_nodes = draw(st.sampled_from([n for n in (1, 2, 4) if num_ranks % n == 0]))
    num_physical = num_ranks * slots
    num_experts = draw(st.integers(1, num_physical))
    num_layers = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["zero", "uniform", "zipf", "one-hot"]))
    shape = (num_layers, num_experts)
    if kind == "zero":
        load = np.zeros(shape, dtype=np.int64)
    elif kind == "uniform":
        load = rng.integers(0, 100, size=shape)
    elif kind == "zipf":
        load = np.minimum(rng.zipf(1.5, size=shape), 10**6)
    else:
        load = np.zeros(shape, dtype=np.int64)
        load[np.arange(num_layers), rng.integers(0, num_experts, num_layers)] = 1000
    topology = Topology(num_ranks, slots, num_nodes)
    start = draw(st.sampled_from(["none", "vllm", "spread", "shuffled"]))
    if start == "none":
        current = None
    elif start == "shuffled":  # may put one expert twice on a rank
        row = np.arange(num_physical) % num_experts
        current = Placement(np.stack([rng.permutation(row) for _ in range(num_layers)]), num_experts, topology)
    else:
        current = Placement.initial(num_experts, topology, num_layers, layout=start)
    return load, topology, current


@settings(max_examples=120, deadline=None)
@given(problems(), st.booleans(), st.sampled_from(["expert", "replica"]))
def test_valid_without_shared_rank_and_within_the_rules(problem, intra_node, pin):
    load, topology, current = problem
    policy = get_policy("swift", rules="eplb", intra_node=intra_node, pin=pin)
    plan = policy.rebalance(load, topology, current)
    again = policy.rebalance(load, topology, current)
    np.testing.assert_array_equal(plan.placement.phy2log, again.placement.phy2log)
    num_experts = load.shape[1]
    for layer, row in enumerate(plan.placement.phy2log):
        table = row.reshape(topology.num_ranks, -1)
        for r in range(topology.num_ranks):
            if len(set(table[r])) < topology.slots_per_rank:  # only when the rank cannot avoid it
                assert topology.slots_per_rank > num_experts and len(set(table[r])) == num_experts
    if topology.slots_per_rank <= num_experts:
        assert plan.placement.problems(allow_shared_rank=False) == []
    if current is None:  # planned from the spread layout; layers too quiet to plan on keep the layout in force
        current = Placement.initial(num_experts, topology, load.shape[0], layout="spread")
        from_spread = policy.rebalance(load, topology, current)
        planned = ~quiet_layers(load, topology.num_ranks)
        np.testing.assert_array_equal(plan.placement.phy2log[planned], from_spread.placement.phy2log[planned])
        plan = from_spread
    reference = plan.reference
    check_layer_rules(plan, reference, topology)
    if intra_node:
        node = topology.node_of_rank
        for layer in range(reference.num_layers):
            if not has_repeat(reference.phy2log[layer], topology):
                moves = transfers(reference.phy2log[layer], plan.placement.phy2log[layer], topology, num_experts)
                assert all(node[s] == node[d] for s, d, _ in moves)


@settings(max_examples=80, deadline=None)
@given(problems(), st.booleans())
def test_vllm_ascend_rules_give_valid_placements(problem, intra_node):
    load, topology, current = problem
    policy = get_policy("swift", intra_node=intra_node)
    plan = policy.rebalance(load, topology, current)
    np.testing.assert_array_equal(plan.placement.phy2log, policy.rebalance(load, topology, current).placement.phy2log)
    if topology.slots_per_rank <= load.shape[1]:
        assert plan.placement.problems(allow_shared_rank=False) == []
    reference = plan.reference
    for layer in range(reference.num_layers):
        if has_repeat(reference.phy2log[layer], topology):
            continue
        if plan.par_before[layer] < 1.01:
            assert not plan.changed[layer]
        old_t = reference.phy2log[layer].reshape(topology.num_ranks, -1)
        new_t = plan.placement.phy2log[layer].reshape(topology.num_ranks, -1)
        for r in range(topology.num_ranks):
            for k, e in enumerate(old_t[r]):
                if e in new_t[r]:
                    assert new_t[r, k] == e


def test_vllm_ascend_rules_hand_computed():
    """Two ranks, 3 slots, experts 0-3 with loads 90, 10, 60, 20; rank 1's slots 1 and 2 are redundant (experts 0
    and 1 were seen on rank 0 first). The reference's weights: expert 0 gets the first extra copy (90 -> 90 * 2/3 =
    60), then 0 and 2 tie at 60 and the later one, 2, gets the second (0 may have at most W - 1 = 1 extra). Copy 0
    goes to rank 1's last redundant slot; copy 2 comes from rank 0 too, and one transfer per rank pair drops it. The
    slot left is filled by load per replica (45, 10, 60, 20): expert 2. Rank loads then 85 and 95: no swap is allowed
    (the pair exchanged already), and 95 over the mean 90 is below the PAR in force, 110 / 90: the layer changes in
    one slot."""
    topology = Topology(2, 3)
    current = Placement([[0, 1, 2, 3, 0, 1]], 4, topology)
    plan = get_policy("swift").rebalance(np.array([[90, 10, 60, 20]]), topology, current)
    assert plan.placement.phy2log.tolist() == [[0, 1, 2, 3, 0, 2]]
    assert plan.par_before[0] == pytest.approx(110 / 90) and plan.par_after[0] == pytest.approx(95 / 90)


#: vllm-ascend's SwiftBalanceEplb on one layer (its output, computed with its policy file): 8 ranks x 4 slots,
#: small loads with many ties, so the tie rules and CPython's set order decide
VLLM_ASCEND_SWIFT = {
    "table": [[0, 17, 20, 3], [24, 4, 18, 11], [19, 23, 21, 10], [7, 26, 1, 2], [5, 3, 14, 1], [0, 12, 2, 22],
              [27, 25, 16, 13], [8, 6, 9, 15]],
    "load": [20, 14, 14, 2, 0, 0, 1, 2, 0, 2, 3, 0, 0, 3, 0, 3, 1, 3, 0, 2, 3, 1, 2, 0, 0, 0, 1, 2],
    "new": [[24, 8, 20, 1], [0, 22, 26, 11], [1, 23, 12, 10], [4, 6, 19, 2], [5, 3, 14, 0], [0, 18, 21, 27],
            [2, 25, 16, 9], [7, 13, 17, 15]],
}


def test_vllm_ascend_rules_equal_vllm_ascend_output():
    case = VLLM_ASCEND_SWIFT
    topology = Topology(8, 4)
    current = Placement([np.ravel(case["table"])], 28, topology)
    plan = get_policy("swift").rebalance(np.array([case["load"]]), topology, current)
    assert plan.placement.phy2log.reshape(8, 4).tolist() == case["new"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=12, unique=True),
       st.lists(st.tuples(st.booleans(), st.integers(0, 300)), max_size=12))
def test_set_order_is_cpythons(start, operations):
    """The swaps visit a rank's experts in the order CPython iterates the reference's set of them: the emulation
    follows the interpreter itself through additions and removals."""
    from eplb.policies._pyset import set_add, set_items, set_remove

    keys, state = np.zeros(256, dtype=np.int64), np.zeros(256, dtype=np.int8)
    meta = np.array([7, 0, 0], dtype=np.int64)
    real = set()
    for e in start:
        real.add(e)
        set_add(keys, state, meta, e)
    for remove, e in operations:
        if remove and real:
            gone = sorted(real)[e % len(real)]
            real.remove(gone)
            set_remove(keys, state, meta, gone)
        else:
            real.add(e)
            set_add(keys, state, meta, e)
    items = np.empty(len(real) + 1, dtype=np.int64)
    assert items[:set_items(keys, state, meta, items)].tolist() == list(real)


def test_window_load_equals_its_sum():
    rng = np.random.default_rng(1)
    steps = rng.integers(0, 50, size=(6, 3, 16))
    topology = Topology(4, 5)
    policy = SwiftPolicy(rules="eplb", threshold=1.0)
    a = policy.rebalance(steps, topology).placement.phy2log
    b = policy.rebalance(steps.sum(axis=0), topology).placement.phy2log
    np.testing.assert_array_equal(a, b)


def test_repeats_in_the_current_placement_are_repaired_even_below_the_threshold():
    topology = Topology(2, 3)
    current = Placement([[0, 0, 1, 2, 3, 3]], 4, topology)
    plan = SwiftPolicy(rules="eplb").rebalance(np.zeros((1, 4)), topology, current)
    assert plan.placement.problems(allow_shared_rank=False) == []
    assert plan.moved_slots[0] == 2  # one repeat per rank, each replaced by the expert the rank lacks
    # without repeats a balanced layer stays as it is
    clean = Placement([[0, 1, 2, 3, 0, 1]], 4, topology)
    assert not SwiftPolicy(rules="eplb").rebalance(np.ones((1, 4)), topology, clean).changed.any()


def test_layers_below_the_threshold_are_untouched():
    topology = Topology(4, 3)
    current = Placement.initial(10, topology, 2, layout="spread")
    load = np.ones((2, 10))
    load[0, 0] = 4.0  # mildly skewed
    load[1, 0] = 40.0  # badly skewed
    assert SwiftPolicy(rules="eplb", threshold=1.0).rebalance(load, topology, current).changed.all()
    par_before = par(rank_loads(current, load))
    plan = SwiftPolicy(rules="eplb", threshold=par_before[0] + 1e-6).rebalance(load, topology, current)
    assert not plan.changed[0] and plan.changed[1]
    plan = SwiftPolicy(rules="eplb", threshold=par_before[1] + 1e-6).rebalance(load, topology, current)
    assert not plan.changed.any()
    np.testing.assert_array_equal(plan.placement.phy2log, current.phy2log)


@pytest.mark.parametrize("ranks, slots, phy2log, load", [
    (2, 2, [1, 0, 2, 0], [3, 8, 17]),  # the greedy plan would reach PAR 1.5 from 1.32
    (3, 2, [0, 1, 3, 1, 2, 0], [11, 17, 12, 11]),  # it would move slots for the same PAR
    (2, 2, [0, 1, 2, 3], [100, 0, 0, 0]),  # no redundant slot: every swap just moves the peak
])
def test_a_layer_that_would_not_strictly_improve_is_untouched(ranks, slots, phy2log, load):
    topology = Topology(ranks, slots)
    current = Placement([phy2log], len(load), topology)
    plan = SwiftPolicy(rules="eplb", threshold=1.0).rebalance(np.array([load]), topology, current)
    assert plan.par_before[0] > 1.0 and not plan.changed[0]
    np.testing.assert_array_equal(plan.placement.phy2log, current.phy2log)


def test_a_rejected_layer_keeps_no_spreading_either():
    # from vLLM's layout rank 0 and 1 have no redundant slot; spreading relocates an expert, then planning cannot win
    topology = Topology(3, 3)
    current = Placement.initial(6, topology, 1, layout="vllm")
    plan = SwiftPolicy(rules="eplb", threshold=1.0).rebalance(np.array([[13, 15, 28, 20, 0, 0]]), topology,
                                                                current)
    assert plan.par_before[0] > 1.1 and not plan.changed[0]


def test_every_transfer_pair_is_used_once_even_when_the_swaps_want_more():
    # 2 ranks: whatever rank 0 sends rank 1 comes from one source rank, so at most one expert crosses each way
    topology = Topology(2, 4)
    current = Placement([[0, 1, 2, 3, 4, 5, 6, 7]], 8, topology)
    load = np.array([[50, 40, 30, 20, 1, 1, 1, 1]])
    plan = SwiftPolicy(rules="eplb", threshold=1.0, pin="replica").rebalance(load, topology, current)
    moves = transfers(current.phy2log[0], plan.placement.phy2log[0], topology, 8)
    assert plan.changed[0] and sorted((s, d) for s, d, _ in moves) == [(0, 1), (1, 0)]


def test_options_are_checked():
    assert isinstance(get_policy(2), SwiftPolicy)
    with pytest.raises(PolicyError, match="pin"):
        get_policy("swift", rules="eplb", pin="slot")
    with pytest.raises(PolicyError, match="rules='eplb'"):
        get_policy("swift", spread=True)  # vllm-ascend's rules do not spread
    with pytest.raises(PolicyError, match="rules"):
        get_policy("swift", rules="ours")
    with pytest.raises(PolicyError, match="swap_rounds"):
        get_policy("swift", swap_rounds=-1)
    with pytest.raises(PolicyError, match="swap_gain"):
        get_policy("swift", swap_gain=0)
    with pytest.raises(PolicyError, match="threshold"):
        get_policy("swift", threshold=float("nan"))
    with pytest.raises(PolicyError, match="swap_rounds must be an integer"):
        get_policy("swift", swap_rounds=2.5)
    with pytest.raises(PolicyError, match="threshold must be a number"):
        get_policy("swift", threshold="high")


@pytest.fixture(scope="module")
def dsv3_load(dsv3_counts):
    return dsv3_counts[0]


def test_dsv3_from_vllm_initial_layout(dsv3_load):
    """The reference changes nothing from vLLM's layout; spreading the redundant slots first fixes that."""
    current = Placement.initial(256, DSV3, 58, layout="vllm")
    plan = SwiftPolicy(rules="eplb").rebalance(dsv3_load, DSV3, current)
    assert plan.par_before.mean() > 1.9
    assert plan.changed.all() and plan.par_after.mean() < 1.15 and plan.par_after.max() < 1.6
    assert plan.moved_slots.mean() < 110  # of 288 slots; about 24 of them pay for the spreading
    assert plan.placement.problems(allow_shared_rank=False) == []
    check_layer_rules(plan, current, DSV3)
    unspread = SwiftPolicy(rules="eplb", spread=False).rebalance(dsv3_load, DSV3, current)
    assert unspread.par_after.mean() > plan.par_after.mean() + 0.1


def test_dsv3_one_redundant_slot_per_rank(dsv3_load):
    current = Placement.initial(256, DSV3, 58, layout="spread")
    plan = SwiftPolicy(rules="eplb").rebalance(dsv3_load, DSV3, current)
    assert plan.par_before.mean() > 2.5 and plan.par_after.mean() < 1.3
    assert plan.moved_slots.mean() < 80
    check_layer_rules(plan, current, DSV3)
    replica = SwiftPolicy(rules="eplb", pin="replica").rebalance(dsv3_load, DSV3, current)
    assert replica.par_after.mean() < 1.05
    check_layer_rules(replica, current, DSV3)


def test_dsv3_intra_node_keeps_copies_in_their_node(dsv3_load):
    current = Placement.initial(256, DSV3, 58, layout="vllm")
    plan = SwiftPolicy(rules="eplb", intra_node=True).rebalance(dsv3_load, DSV3, current)
    assert plan.par_after.mean() < plan.par_before.mean() - 0.3  # 2.01 -> 1.53; nodes alone stay at 1.28
    node = DSV3.node_of_rank
    for layer in range(58):
        moves = transfers(current.phy2log[layer], plan.placement.phy2log[layer], DSV3, 256)
        assert moves and all(node[s] == node[d] for s, d, _ in moves)
    check_layer_rules(plan, current, DSV3)


def test_dsv3_repeated_cycles_settle(dsv3_load):
    """Re-planning on the same load keeps improving or stops: the spreading does not churn slots every cycle."""
    current = Placement.initial(256, DSV3, 58, layout="vllm")
    policy = SwiftPolicy(rules="eplb")
    moved = []
    for _ in range(4):
        plan = policy.rebalance(dsv3_load, DSV3, current)
        assert (plan.par_after <= plan.par_before).all()
        moved.append(plan.moved_slots.mean())
        current = plan.placement
    assert moved == sorted(moved, reverse=True) and moved[-1] < 10
    assert plan.par_after.mean() < 1.02
