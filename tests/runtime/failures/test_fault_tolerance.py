"""Fault tolerance: planning on live ranks, the resilience option, failover routing (placement and router).

Checked against plain loops over slots, not against the code's own views.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
from eplb import Placement, PolicyError, Topology
from eplb.errors import PlacementError
from eplb.policies.shared.resilience import Resilience, make_resilient

POLICIES = eplb.available_policies()
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def clusters(draw, min_ranks=2):
    """(load [L, E], topology, current phy2log [L, P] with every expert somewhere, rng)."""
    num_layers = draw(st.integers(1, 4))
    num_experts = draw(st.integers(2, 80))
    num_ranks = draw(st.integers(min_ranks, 24))
    slots = min(-(-num_experts // num_ranks) + draw(st.integers(0, 3)), num_experts)  # flashlb needs K <= E
    num_nodes = draw(st.sampled_from(_divisors(num_ranks)))
    topology = Topology(num_ranks, slots, num_nodes)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    load = np.minimum(rng.zipf(1.4, size=(num_layers, num_experts)), 10**6).astype(np.int64)
    row = np.arange(topology.num_physical) % num_experts
    current = np.stack([rng.permutation(row) for _ in range(num_layers)])
    return load, topology, current, rng


def _holders(phy2log_row: np.ndarray, slots: int) -> dict[int, list[int]]:
    """expert -> ranks of its replicas (with repeats), by a loop."""
    out: dict[int, list[int]] = {}
    for slot, expert in enumerate(phy2log_row):
        out.setdefault(int(expert), []).append(slot // slots)
    return out


def _live_ranks(rng, topology: Topology, num_experts: int) -> np.ndarray:
    """A random live set that still has a slot for every expert (W-1 when that is all that fits)."""
    need = -(-num_experts // topology.slots_per_rank)
    count = int(rng.integers(need, topology.num_ranks)) if need < topology.num_ranks else topology.num_ranks
    live = np.zeros(topology.num_ranks, dtype=bool)
    live[rng.choice(topology.num_ranks, size=count, replace=False)] = True
    return live


# -- planning on live ranks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", POLICIES)
@FAST
@given(case=clusters(), with_current=st.booleans())
def test_every_policy_places_only_on_live_ranks(name, case, with_current):
    load, topology, current, rng = case
    num_layers, num_experts = load.shape
    live = _live_ranks(rng, topology, num_experts)
    reference = current if with_current else Placement.initial(num_experts, topology, num_layers).phy2log
    plan = eplb.get_policy(name).rebalance(load, topology, current if with_current else None, live_ranks=live)
    new = plan.placement.phy2log
    slots = topology.slots_per_rank
    for layer in range(num_layers):
        holders = _holders(new[layer], slots)
        for expert in range(num_experts):  # every expert has a replica on a live rank
            assert any(live[r] for r in holders[expert]), (layer, expert)
        for slot in range(topology.num_physical):  # failed ranks keep their slots: nothing moves to them
            if not live[slot // slots]:
                assert new[layer, slot] == reference[layer, slot]
    assert plan.placement.without_ranks(~live).lost.size == 0
    # par_after is over the live ranks, load split evenly over the live replicas
    window = load.astype(float)
    for layer in range(num_layers):
        live_count = {e: sum(1 for r in rs if live[r]) for e, rs in _holders(new[layer], slots).items()}
        rank_load = np.zeros(topology.num_ranks)
        for slot, expert in enumerate(new[layer]):
            if live[slot // slots]:
                rank_load[slot // slots] += window[layer, expert] / live_count[expert]
        mean = rank_load[live].mean()
        expected = rank_load.max() / mean if mean > 0 else 1.0
        assert plan.par_after[layer] == pytest.approx(expected)


@pytest.mark.parametrize("name", POLICIES)
def test_degraded_cluster_of_w_minus_1_and_w_minus_8(name):
    rng = np.random.default_rng(5)
    load = rng.zipf(1.5, size=(2, 256)).clip(max=10**5)
    policy = eplb.get_policy(name)
    # DeepSeek-V3 sizes: EP32 with 288 slots loses a rank; EP64 with 320 slots loses a node of 8 (280 slots left)
    for topology, dead in ((Topology(32, 9, 4, 8), [7]), (Topology(64, 5, 8, 8), list(range(8, 16)))):
        current = Placement.initial(256, topology, 2)
        live = ~np.isin(np.arange(topology.num_ranks), dead)
        plan = policy.rebalance(load, topology, current, live_ranks=live)
        failover = plan.placement.without_ranks(dead)
        assert failover.lost.size == 0
        assert np.array_equal(plan.live_ranks, live)
    # EP32 x 9 slots without a node of 8 has 216 slots for 256 experts: the 40 coldest of each layer are named
    with pytest.raises(PolicyError, match=r"40 experts per layer would have no slot") as info:
        policy.rebalance(load, Topology(32, 9, 4, 8), live_ranks=np.arange(32) >= 8)
    coldest = np.sort(np.argsort(load[0], kind="stable")[:8])
    assert "layer 0: experts " + ", ".join(map(str, coldest)) in str(info.value)


def test_too_few_live_slots_names_the_experts_left_out():
    topology = Topology(4, 2, 1)
    load = np.arange(1, 9)[None, :] * 10  # expert 0 is the coldest, then 1
    with pytest.raises(PolicyError, match=r"(?s)cannot place 8 experts on 3 live ranks .* experts 0, 1$"):
        eplb.get_policy("default").rebalance(load, topology, live_ranks=[0, 1, 2])


def test_live_ranks_errors_and_all_live_is_the_plain_plan():
    topology = Topology(4, 3, 2)
    load = np.arange(1, 11)[None, :]
    policy = eplb.get_policy("default")
    with pytest.raises(PlacementError, match="rank 9 is out of range"):
        policy.rebalance(load, topology, live_ranks=[0, 9])
    with pytest.raises(PlacementError, match="no rank of 4 is live"):
        policy.rebalance(load, topology, live_ranks=np.zeros(4, dtype=bool))
    plain = policy.rebalance(load, topology)
    assert policy.rebalance(load, topology, live_ranks=range(4)).placement == plain.placement


# -- resilience ---------------------------------------------------------------------------------------------------
def _lost_replicated(phy2log_row: np.ndarray, topology: Topology, failed, already_failed=()) -> list[int]:
    """Experts with >= 2 replicas on ranks not in ``already_failed`` that have none left when ``failed`` fail too
    (loop)."""
    out = []
    for expert, ranks in _holders(phy2log_row, topology.slots_per_rank).items():
        serving = [r for r in ranks if r not in already_failed]
        if len(serving) >= 2 and all(r in failed for r in serving):
            out.append(expert)
    return out


@FAST
@given(case=clusters())
def test_resilient_random_placements_survive_any_single_rank_failure(case):
    load, topology, current, _ = case
    resilient = make_resilient(current, load.astype(float), topology, Resilience())
    Placement(resilient, load.shape[1], topology)  # still valid
    assert np.array_equal(np.sort(resilient, axis=1), np.sort(current, axis=1))  # replica counts kept
    for layer in range(load.shape[0]):
        for rank in range(topology.num_ranks):
            assert _lost_replicated(resilient[layer], topology, {rank}) == [], (layer, rank)
        if topology.num_nodes > 1:
            for node in range(topology.num_nodes):
                dead = {r for r in range(topology.num_ranks) if r // topology.ranks_per_node == node}
                assert _lost_replicated(resilient[layer], topology, dead) == [], (layer, node)


@pytest.mark.parametrize("name", POLICIES)
@FAST
@given(case=clusters())
def test_every_policy_with_resilience_survives_any_single_rank_failure(name, case):
    load, topology, current, rng = case
    live = _live_ranks(rng, topology, load.shape[1]) if rng.random() < 0.5 else None
    plan = eplb.get_policy(name).rebalance(load, topology, current, live_ranks=live, resilience=Resilience())
    phy2log = plan.placement.phy2log
    dead = set() if live is None else set(np.flatnonzero(~live).tolist())
    for layer in range(load.shape[0]):
        for rank in set(range(topology.num_ranks)) - dead:
            assert _lost_replicated(phy2log[layer], topology, {rank}, dead) == [], (layer, rank)
        replicated = sum(1 for ranks in _holders(phy2log[layer], topology.slots_per_rank).values()
                         if len([r for r in ranks if r not in dead]) >= 2)
        for node in range(topology.num_nodes if topology.num_nodes > 1 else 0):  # nodes left unequal included
            ranks = {r for r in range(topology.num_ranks) if r // topology.ranks_per_node == node}
            others = set(range(topology.num_ranks)) - dead - ranks
            # "where the slot budget allows": every replicated expert needs a live slot outside the node; with
            # failed ranks the other nodes can be left with fewer slots than that
            if ranks - dead and others and replicated <= topology.slots_per_rank * len(others):
                assert _lost_replicated(phy2log[layer], topology, ranks, dead) == [], (layer, node)


@pytest.mark.parametrize("name", POLICIES)
def test_a_quiet_layer_kept_with_resilience_has_its_replicas_spread(name):
    # 8 ranks x 1 slot on 2 nodes, 7 experts: expert 1 twice, both on node 0. Layer 0 has no load (quiet: it keeps
    # its experts), layer 1 is loaded. Resilience must still take expert 1 to node 1 in the quiet layer, and move
    # nothing else there: same experts, same replica counts.
    topology = Topology(8, 1, 2)
    row = np.array([0, 1, 1, 2, 3, 4, 5, 6])
    current = np.stack([row, row])
    load = np.zeros((2, 7))
    load[1] = np.arange(1, 8) * 10.0
    plan = eplb.get_policy(name).rebalance(load, topology, current, resilience=Resilience())
    quiet = plan.placement.phy2log[0]
    assert sorted(quiet.tolist()) == sorted(row.tolist())
    assert set(np.flatnonzero(quiet == 1) // 4) == {0, 1}, quiet
    assert (quiet != row).sum() == 2  # one swap
    # without resilience the quiet layer is kept as it is
    assert np.array_equal(eplb.get_policy(name).rebalance(load, topology, current).placement.phy2log[0], row)


def test_min_replicas_for_the_hottest_experts():
    topology = Topology(8, 5, 2)
    load = np.ones((1, 32))
    load[0, [3, 17]] = 1000.0
    row = (np.arange(40) % 32)[None, :]  # experts 0..7 have two replicas, 3 and 17 only one... 3 has two
    out = make_resilient(row, load, topology, Resilience(min_replicas=3, hot_experts=2))
    count = np.bincount(out[0], minlength=32)
    assert count[3] >= 3 and count[17] >= 3
    assert (count >= 1).all() and count.sum() == 40
    for expert in (3, 17):  # on distinct ranks, and on both nodes
        ranks = np.flatnonzero(out[0] == expert) // 5
        assert len(set(ranks)) == count[expert] and len(set(ranks // 4)) == 2


def test_resilience_option_is_checked():
    with pytest.raises(PolicyError, match="min_replicas"):
        Resilience(min_replicas=0)
    with pytest.raises(PolicyError, match="hot_experts"):
        Resilience(hot_experts=-1)


# -- failover routing ---------------------------------------------------------------------------------------------
@FAST
@given(case=clusters(min_ranks=1), data=st.data())
def test_failover_never_routes_to_a_dead_rank(case, data):
    load, topology, current, rng = case
    placement = Placement(current, load.shape[1], topology)
    dead = data.draw(st.lists(st.integers(0, topology.num_ranks - 1), max_size=topology.num_ranks))
    failover = placement.without_ranks(dead)
    slots = topology.slots_per_rank
    expected_lost = []
    for layer in range(placement.num_layers):
        for expert, ranks in sorted(_holders(current[layer], slots).items()):
            if all(r in dead for r in ranks):
                expected_lost.append((layer, expert))
    assert [tuple(x) for x in failover.lost] == expected_lost
    for rank in range(topology.num_ranks):
        for tp_size in (1, 2):
            route = failover.log2phy_for_rank(rank, tp_size)
            lost = failover.lost_mask
            assert (route[lost] == -1).all()
            assert (route[~lost] >= 0).all()
            assert not np.isin(route[~lost] // slots, dead).any()
            assert (np.take_along_axis(current, np.maximum(route, 0), axis=1)[~lost]
                    == np.nonzero(~lost)[1]).all()  # the slot holds the expert
    share = failover.rank_share()
    assert np.allclose(share[..., dead], 0.0)
    assert np.allclose(share.sum(axis=2), np.where(failover.lost_mask, 0.0, 1.0))


def test_router_fails_over_in_place_and_keeps_routing_around_the_failed_rank():
    torch = pytest.importorskip("torch")
    from eplb.runtime.router import ReplicaRouter

    topology = Topology(4, 3, 2)
    placement = Placement.initial(10, topology, 2)  # experts 0 and 1 also on rank 3; 9 only on rank 3
    ids = torch.arange(10).repeat(6, 1)
    for mode in ("rank", "token", "local", "balanced"):
        router = ReplicaRouter(placement, rank=1, mode=mode)
        table = router.rank_table
        counts = torch.full((4, 10), 6, dtype=torch.int64)  # every rank routes the same 6 tokens per expert
        before = router.route(0, ids, counts if mode == "balanced" else None)
        assert (before // 3 == 3).any()
        failover = router.set_failed_ranks(placement, [3])
        assert router.rank_table.data_ptr() == table.data_ptr()
        assert [tuple(x) for x in failover.lost] == [(0, 9), (1, 9)]
        for layer in range(2):
            slots = router.route(layer, ids, counts if mode == "balanced" else None)
            assert (slots[:, 9] == -1).all(), mode
            served = slots[:, :9]
            assert (served >= 0).all() and not (served // 3 == 3).any(), mode
            assert (torch.tensor(placement.phy2log[layer])[served] == torch.arange(9)).all(), mode
        # a later layer update (a re-plan) still keeps the failed rank out
        moved = placement.phy2log.copy()
        moved[:, [2, 11]] = moved[:, [11, 2]]  # expert 2 goes to rank 3 and 1 to rank 0
        router.update_layers([0], Placement(moved, 10, topology))
        slots = router.route(0, ids, counts if mode == "balanced" else None)
        assert not (slots[:, :9] // 3 == 3).any() and (slots[:, 2] == -1).all(), mode
        router.set_failed_ranks(Placement(moved, 10, topology), [])
        assert (router.route(0, ids, counts if mode == "balanced" else None) >= 0).all()


def test_spread_lets_an_expert_with_more_replicas_than_ranks_share_one():
    # live ranks 0, 1 (node 0) and 2 (node 1): expert 1 has 4 replicas on 3 ranks, so it shares a rank anyway; expert
    # 0 must still get a replica off node 0 (found by hypothesis: the swap that does it was refused before)
    topology = Topology(num_ranks=4, slots_per_rank=2, num_nodes=2, num_groups=1)
    current = Placement(np.array([[0, 1, 1, 0, 0, 1, 1, 0]]), 2, topology)
    live = np.array([True, True, True, False])
    plan = eplb.get_policy("default").rebalance(np.array([[68, 130]]), topology, current, live_ranks=live,
                                                resilience=Resilience())
    row = plan.placement.phy2log[0]
    assert _lost_replicated(row, topology, {0, 1}, {3}) == []
    for rank in range(3):
        assert _lost_replicated(row, topology, {rank}, {3}) == []
