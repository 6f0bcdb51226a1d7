"""Replica choice: the numpy reference (eplb.dispatch.route) and the router, its torch twin, give the same slots."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb import Placement, Topology
from eplb.dispatch import (
    BALANCED_PASSES,
    RUNTIME_RULES,
    balanced_replica_load,
    balanced_schedule,
    balanced_sets,
    balanced_split,
    dispatch_share,
    rank_choice,
    replica_ranks,
    route,
)

torch = pytest.importorskip("torch")
from eplb.runtime.router import ReplicaRouter  # noqa: E402 - needs torch

from conftest import reached  # noqa: E402


def _placement(rng, num_ranks, slots, num_experts, num_nodes, num_layers=2):
    topology = Topology(num_ranks, slots, num_nodes=num_nodes)
    extra = topology.num_physical - num_experts
    rows = [rng.permutation(np.concatenate([np.arange(num_experts), rng.integers(0, num_experts, extra)]))
            for _ in range(num_layers)]
    return Placement(np.stack(rows), num_experts, topology)


def _placement_and_failure(rng, shape, failed: bool):
    """A random placement of ``shape`` (ranks, slots, experts, nodes) and a bool mask of one failed rank or none."""
    num_ranks, slots, num_experts, num_nodes = shape
    placement = _placement(rng, num_ranks, slots, num_experts, num_nodes)
    failed_ranks = np.zeros(num_ranks, dtype=bool)
    if failed:
        failed_ranks[rng.integers(num_ranks)] = True
    return placement, failed_ranks


def _balanced_route_after_failure(placement, failed_ranks, layer, rank, ids, group):
    """Plain-loop reference of the router's ``balanced`` route after a failure: each expert's tokens are split (by
    :func:`balanced_split`) over its live ranks, each served by its lowest live slot there; an expert with no live
    replica keeps the first live rank as a stand-in, so its tokens count on that rank in the split, and routes to -1.
    Rank ``rank``'s tokens of an expert take the group-wide positions after those of ranks ``0..rank-1``, in row-major
    order, and go to the first replica whose cumulative share is past their position."""
    num_ranks, slots = placement.topology.num_ranks, placement.topology.slots_per_rank
    stand_in = int(np.flatnonzero(~failed_ranks)[0])
    row = placement.phy2log[layer].tolist()
    holders = []  # per expert: [(rank, lowest slot on it)], ranks ascending
    for expert in range(placement.num_experts):
        lowest = {}
        for slot, held in enumerate(row):
            if held == expert and not failed_ranks[slot // slots]:
                lowest.setdefault(slot // slots, slot)
        holders.append(sorted(lowest.items()) or [(stand_in, -1)])
    ranks = np.full((placement.num_experts, max(map(len, holders))), -1)
    for expert, held in enumerate(holders):
        ranks[expert, :len(held)] = [r for r, _ in held]
    split = balanced_split(group.sum(axis=0), ranks, num_ranks)
    position = group[:rank].sum(axis=0)
    out = np.empty_like(ids)
    for index, expert in np.ndenumerate(ids):
        bounds = np.cumsum(split[expert, :len(holders[expert])])
        out[index] = holders[expert][int(np.argmax(position[expert] < bounds))][1]
        position[expert] += 1
    return out


@pytest.mark.reaches(balanced_after_failure=6, lost_expert=6)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), shape=st.sampled_from([(2, 3, 4, 1), (4, 3, 9, 2), (4, 4, 10, 2), (6, 2, 7, 3)]),
       tp_size=st.sampled_from([1, 2]), failed=st.booleans())
def test_the_router_routes_as_the_numpy_reference(seed, shape, tp_size, failed):
    rng = np.random.default_rng(seed)
    num_ranks, _, num_experts, _ = shape
    placement, failed_ranks = _placement_and_failure(rng, shape, failed)
    reference = placement.without_ranks(failed_ranks) if failed else placement
    ids = rng.integers(0, num_experts, (int(rng.integers(1, 40)), 3))
    counts = rng.integers(0, 6, (num_ranks, num_experts))
    for mode in RUNTIME_RULES:
        for rank in np.flatnonzero(~failed_ranks).tolist():
            router = ReplicaRouter(placement, rank, dispatch=mode, tp_size=tp_size)
            if failed:
                router.set_failed_ranks(placement, failed_ranks)
            group = counts.copy()
            group[rank] = np.bincount(ids.ravel(), minlength=num_experts)  # this rank's tokens are in the counts
            for layer in range(placement.num_layers):
                got = router.route(layer, torch.as_tensor(ids), torch.as_tensor(group)).numpy()
                if failed and mode == "balanced":
                    expected = _balanced_route_after_failure(placement, failed_ranks, layer, rank, ids, group)
                else:
                    expected = route(reference, layer, rank, ids, mode, tp_size, group)
                np.testing.assert_array_equal(got, expected, err_msg=f"{mode} rank {rank} layer {layer}")
    if failed:
        reached("balanced_after_failure")
        if reference.lost_mask[:, ids.ravel()].any():
            reached("lost_expert")  # a lost expert had tokens: its stand-in rank carried them in the split


def test_the_simulator_share_is_the_routers_choice_averaged_over_source_ranks():
    rng = np.random.default_rng(0)
    placement = _placement(rng, 4, 3, 9, 2)
    for mode in ("rank", "local"):
        share = dispatch_share(placement, mode, tp_size=2)
        expected = np.zeros_like(share)
        for rank in range(4):
            slot = rank_choice(placement, rank, mode, 2)
            np.add.at(expected, (np.arange(2)[:, None], np.arange(9)[None, :], placement.rank_of_slot[slot]), 0.25)
            router = ReplicaRouter(placement, rank, dispatch=mode, tp_size=2)
            assert router.rank_table.numpy().tolist() == slot.tolist()
        np.testing.assert_allclose(share, expected)


def test_old_spelling_of_the_dispatch_argument_still_works():
    placement = Placement.initial(4, Topology(2, 3), 1)
    assert ReplicaRouter(placement, 0, mode="token").dispatch == "token"
    with pytest.raises(Exception, match="dispatch must be one of"):
        ReplicaRouter(placement, 0, dispatch="fastest")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), shape=st.sampled_from([(2, 3, 4, 1), (4, 3, 9, 2), (4, 4, 10, 2), (6, 2, 7, 3),
                                                          (8, 4, 12, 2)]),
       tp_size=st.sampled_from([1, 2]), failed=st.booleans(), scale=st.sampled_from([5, 200, 5000]))
def test_the_device_split_is_the_numpy_split_in_whole_tokens(seed, shape, tp_size, failed, scale):
    rng = np.random.default_rng(seed)
    num_ranks, _, num_experts, _ = shape
    placement, failed_ranks = _placement_and_failure(rng, shape, failed)
    rank = int(np.flatnonzero(~failed_ranks)[0])
    router = ReplicaRouter(placement, rank, dispatch="balanced", tp_size=tp_size)
    if failed:
        router.set_failed_ranks(placement, failed_ranks)
    total = rng.integers(0, scale, num_experts) * (rng.random(num_experts) < 0.8)
    for layer in range(placement.num_layers):
        got = router.replica_split(layer, torch.as_tensor(total)).numpy()
        ranks = router.split_rank[layer, :-1].numpy()
        live = ranks[:, 0] < num_ranks
        expected = balanced_split(total, np.where(ranks < num_ranks, ranks, -1), num_ranks)
        np.testing.assert_array_equal(got, expected)  # within one token: here bit for bit
        assert (got.sum(axis=1) == total).all() and (got >= 0).all() and not got[ranks >= num_ranks].any()
        assert live.all()  # a lost expert has a stand-in rank, so every expert's tokens are split
        # a pass never raises the busiest rank (each expert's water-filling minimises the peak of its ranks)
        reference = np.where(ranks < num_ranks, ranks, -1)[None]
        _, even = balanced_replica_load(total[None], reference, num_ranks, passes=0)
        _, balanced = balanced_replica_load(total[None], reference, num_ranks)
        assert balanced.max() <= even.max()


def test_the_split_of_the_router_needs_no_host_and_no_new_shapes():
    # the same code path on the device: every table is the router's, only the counts change
    rng = np.random.default_rng(3)
    placement = _placement(rng, 8, 4, 12, 2)
    router = ReplicaRouter(placement, 0, dispatch="balanced")
    assert router.split_schedule.shape == (2, BALANCED_PASSES, 4)
    pointers = [t.data_ptr() for t in (router.split_rank, router.split_schedule, router.replica_slot)]
    router.update_layer(1, placement.phy2log[0])
    assert pointers == [t.data_ptr() for t in (router.split_rank, router.split_schedule, router.replica_slot)]
    assert torch.equal(router.split_rank[0], router.split_rank[1])


@pytest.mark.reaches(30)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), shape=st.sampled_from([(4, 3, 9, 2), (8, 4, 12, 2), (16, 3, 20, 4)]))
def test_each_pass_takes_experts_that_share_no_rank_and_every_replicated_expert_is_taken(seed, shape):
    rng = np.random.default_rng(seed)
    placement = _placement(rng, *shape, num_layers=1)
    ranks = replica_ranks(placement)
    schedule = balanced_schedule(ranks, shape[0])[0]
    num_experts = shape[2]
    taken = set()
    for experts in schedule:
        real = experts[experts < num_experts]
        held = ranks[0][real]
        held = held[held >= 0]
        assert held.size == np.unique(held).size  # no rank twice in one pass
        assert ((ranks[0][real] >= 0).sum(axis=1) > 1).all()  # only replicated experts
        taken.update(real.tolist())
    replicated = set(np.flatnonzero((ranks[0] >= 0).sum(axis=1) > 1).tolist())
    if len(balanced_sets(ranks[0])) <= BALANCED_PASSES:  # every set gets a pass
        reached()
        assert taken == replicated
