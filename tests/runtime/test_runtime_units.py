"""Single-process tests of the runtime parts: transfer plans, router modes, recorder counting."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb import Placement, Topology
from eplb.cycle.transfers import layer_transfer, transfer_plan

torch = pytest.importorskip("torch")

from eplb.runtime.recorder import LoadRecorder, gather_slot_counts  # noqa: E402
from eplb.runtime.router import ReplicaRouter  # noqa: E402


# -- transfer plans -----------------------------------------------------------------------------------------------
def test_transfer_plan_matches_vllm_ascend_vector(ascend_vectors):
    vec = ascend_vectors["transfer_plan"]
    old, new = np.array(vec["old"]), np.array(vec["new"])
    t = layer_transfer(0, old.ravel(), new.ravel(), Topology(*old.shape))
    send, recv = t.send_recv()
    assert {str(k): v for k, v in send.items()} == vec["send"]
    assert {str(k): v for k, v in recv.items()} == vec["recv"]


@st.composite
def placement_pairs(draw):
    num_nodes = draw(st.sampled_from([1, 2]))
    num_ranks = num_nodes * draw(st.integers(1, 3))
    slots = draw(st.integers(1, 4))
    topology = Topology(num_ranks, slots, num_nodes)
    num_experts = draw(st.integers(1, topology.num_physical))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)

    def random_row():
        row = np.concatenate([np.arange(num_experts), rng.integers(0, num_experts, topology.num_physical - num_experts)])
        return rng.permutation(row)

    old, new = random_row(), random_row()
    keep = rng.random(topology.num_physical) < 0.5  # many slots unchanged, as policies do
    new = np.where(keep, old, new)
    if set(new.tolist()) != set(range(num_experts)):  # mixing lost an expert: take a fresh row
        new = random_row()
    return topology, num_experts, old, new


@settings(max_examples=150, deadline=None)
@given(placement_pairs())
def test_transfer_rules(case):
    topology, num_experts, old, new = case
    t = layer_transfer(0, old, new, topology)
    k = topology.slots_per_rank
    old_rows, new_rows = old.reshape(-1, k), new.reshape(-1, k)
    pairs = [(dst, e) for _, _, dst, e in t.moves.tolist()]
    assert len(pairs) == len(set(pairs)), "a rank receives an expert twice in one layer"
    needed = {(r, e) for r in range(topology.num_ranks) for e in set(new_rows[r]) - set(old_rows[r])}
    assert set(pairs) == needed  # staying experts never move; every new one arrives exactly once
    node = topology.node_of_rank
    for src, src_slot, dst, e in t.moves.tolist():
        assert old_rows[src, src_slot] == e
        holders = [r for r in range(topology.num_ranks) if e in old_rows[r]]
        if any(node[h] == node[dst] for h in holders):
            assert node[src] == node[dst], "a same-node holder existed"
    # the commit recipe rebuilds every rank's new row from its old row and what it received
    for rank in range(topology.num_ranks):
        received = t.moves[t.moves[:, 2] == rank, 3]
        row = old_rows[rank].copy()
        for slot, from_recv, source in zip(*t.rank_fills(rank)):
            row[slot] = received[source] if from_recv else old_rows[rank][source]
        assert np.array_equal(row, new_rows[rank])


def test_transfer_spreads_sources():
    topology = Topology(4, 2)
    old = np.array([0, 1, 0, 1, 2, 3, 2, 3])  # experts 0 and 1 on ranks 0 and 1
    new = np.array([0, 1, 0, 1, 0, 1, 0, 1])  # ranks 2 and 3 both need 0 and 1
    t = layer_transfer(0, old, new, topology)
    sent = np.bincount(t.moves[:, 0], minlength=4)
    assert sent[0] == sent[1] == 2


def test_unchanged_layers_are_skipped():
    topology = Topology(2, 3)
    old = Placement.initial(5, topology, 3)
    phy2log = old.phy2log.copy()
    phy2log[1] = np.roll(phy2log[1], 1)
    plan = transfer_plan(old, Placement(phy2log, 5, topology))
    assert [t.layer for t in plan] == [1]


# -- router -------------------------------------------------------------------------------------------------------
def test_rank_rule_matches_vllm_ascend(ascend_vectors):
    vec = ascend_vectors["log2phy_replica_choice"]
    placement = Placement.from_rank_table(vec["placement"])
    for case in vec["cases"]:
        router = ReplicaRouter(placement, case["rank"], "rank", tp_size=case["tp_size"])
        got = router.route(0, torch.arange(placement.num_experts)[None])[0]
        assert got.tolist() == case["log2phy"]
    for case in ascend_vectors["rank_maps"]:
        if "log2phy" not in case or case["log2phy"] is None or "placement" not in case:
            continue
        placement = Placement.from_rank_table(case["placement"])
        router = ReplicaRouter(placement, case["rank"], "rank")
        assert router.route(0, torch.arange(placement.num_experts)[None])[0].tolist() == case["log2phy"]


def test_token_rule_matches_vllm_ascend(ascend_vectors):
    vec = ascend_vectors["per_token_replica_routing"]
    table = torch.tensor(vec["logical_to_physical"])
    placement = Placement(np.array([0, 1, 2, 2, 0, 1]), 3, Topology(2, 3))
    for rank, key in ((0, "rank0_row0"), (1, "rank1_row0")):
        router = ReplicaRouter(placement, rank, "token")
        router.log2phy[0].fill_(-1)
        router.log2phy[0, :, :table.shape[1]] = table  # the vector's tables, written in place
        router.replica_count[0] = torch.tensor(vec["replica_count"])
        got = router.route(0, torch.arange(3)[None, :])  # token 0 (row 0) picks experts 0, 1, 2
        assert got[0].tolist() == vec[key]


def test_local_rule_prefers_rank_then_node():
    topology = Topology(4, 2, num_nodes=2)
    # expert 0 on ranks 0 and 3, expert 1 on rank 1 only, expert 2 on ranks 2 and 3, expert 3 on rank 0
    placement = Placement(np.array([0, 3, 1, 1, 2, 2, 0, 2]), 4, topology)
    slot = {rank: ReplicaRouter(placement, rank, "local").route(0, torch.arange(4)[None])[0].tolist()
            for rank in range(4)}
    assert slot[0][0] == 0 and slot[3][0] == 6  # own replica
    assert slot[1][0] == 0  # rank 1 is on node 0 with rank 0's replica
    assert slot[2][0] == 6  # rank 2 is on node 1 with rank 3's replica
    assert slot[0][2] in (4, 5, 7)  # no replica on node 0: rotation over all replicas
    assert slot[3][2] == 7


def test_router_updates_tables_in_place():
    topology = Topology(2, 3)
    placement = Placement.initial(5, topology, 2)
    router = ReplicaRouter(placement, 1, "rank")
    pointers = [t.data_ptr() for t in (router.log2phy, router.replica_count, router.rank_table)]
    new_row = np.array([4, 3, 2, 1, 0, 0])
    router.update_layer(1, new_row)
    assert pointers == [t.data_ptr() for t in (router.log2phy, router.replica_count, router.rank_table)]
    expected = Placement(np.vstack([placement.phy2log[0], new_row]), 5, topology).log2phy_for_rank(1)
    assert router.rank_table.tolist() == expected.tolist()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from([(2, 3, 4), (4, 3, 8), (4, 4, 10)]))
def test_balanced_split_agrees_with_simulator_dispatch(seed, shape):
    from eplb.dispatch import balanced_replica_load, replica_ranks

    num_ranks, slots, num_experts = shape
    rng = np.random.default_rng(seed)
    topology = Topology(num_ranks, slots)
    row = rng.permutation(np.concatenate([np.arange(num_experts),
                                          rng.integers(0, num_experts, topology.num_physical - num_experts)]))
    placement = Placement(row, num_experts, topology)
    counts = rng.integers(0, 50, (num_ranks, num_experts)) * (rng.random(num_experts) < 0.8)
    routers = [ReplicaRouter(placement, r, "balanced") for r in range(num_ranks)]
    total = counts.sum(0)
    split = routers[0].replica_split(0, torch.as_tensor(total)).numpy()
    expected = balanced_replica_load(total[None], replica_ranks(placement), num_ranks)[0][0]
    assert np.array_equal(split[:, :expected.shape[1]], expected)
    assert not split[:, expected.shape[1]:].any()
    # every rank routes its own tokens; together they fill each replica rank exactly with its share
    ranks_of = replica_ranks(placement)[0]
    got = np.zeros_like(expected)
    for rank, router in enumerate(routers):
        ids = rng.permutation(np.repeat(np.arange(num_experts), counts[rank]))
        slots_out = router.route(0, torch.as_tensor(ids).reshape(-1, 1), torch.as_tensor(counts)).numpy().ravel()
        assert (placement.phy2log[0][slots_out] == ids).all()
        dest = topology.rank_of_slot[slots_out]
        for e, d in zip(ids, dest):
            got[e, int(np.flatnonzero(ranks_of[e] == d)[0])] += 1
    assert np.array_equal(got, expected)


# -- recorder -----------------------------------------------------------------------------------------------------
def test_recorder_ids_equal_bincount_and_logical_load():
    topology = Topology(2, 3)
    placement = Placement.initial(5, topology, 2)
    rec = LoadRecorder(2, 5, 2, 3, rank=0, source="ids", ring_steps=2)
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 6, (7, 2)) for _ in range(3)]
    for step_ids in ids:
        rec.begin_step()
        rec.record_ids(0, torch.as_tensor(step_ids))
    assert rec.window[0].tolist() == np.bincount(np.concatenate(ids).ravel(), minlength=6).tolist()
    assert rec.window[1].sum() == 0
    per_step = rec.logical_load(placement.phy2log)  # the last 2 steps, oldest first
    for row, step_ids in zip(per_step, ids[1:]):
        assert row[0].tolist() == np.bincount(placement.phy2log[0][step_ids].ravel(), minlength=5).tolist()


def test_recorder_kernel_counts_plain_and_cumulative():
    rec = LoadRecorder(1, 4, 2, 2, rank=1, source="counts")
    rec.begin_step()
    rec.record_counts(0, torch.tensor([3, 5]))
    rec.record_counts(0, torch.tensor([2, 7]), cumulative=True)
    assert rec.window[0].tolist() == [5, 10]
    assert gather_slot_counts(rec.window, 2).reshape(-1).tolist() == [5, 10]


def test_recorder_stage_filter():
    rec = LoadRecorder(1, 3, 1, 3, rank=0, source="ids", stage="decode")
    for is_prefill in (True, False, True):
        rec.begin_step(is_prefill=is_prefill)
        rec.record_ids(0, torch.tensor([0, 1]))
    assert rec.window[0].tolist() == [1, 1, 0] and rec.steps == 1


def test_migration_batching_rounds_pair_every_sender_with_its_receiver():
    from eplb.runtime.transport import _rounds

    for world in (2, 3, 8):
        rounds = [_rounds(rank, world, batching=True) for rank in range(world)]
        assert all(len(r) == world - 1 for r in rounds)
        for d in range(world - 1):
            sends = {rank: rounds[rank][d][0] for rank in range(world)}
            receives = {rank: rounds[rank][d][1] for rank in range(world)}
            assert sorted(sends.values()) == list(range(world))  # one peer each way per round
            assert all(receives[dst] == src for src, dst in sends.items())  # the peer posts the matching receive
            assert all(dst != src for src, dst in sends.items())
        # over the rounds, every rank reaches every other rank once
        assert all(sorted(r[0] for r in rounds[rank]) == sorted(set(range(world)) - {rank}) for rank in range(world))
    assert _rounds(0, 4, batching=False) == [(None, None)]


def test_staging_budget_below_one_expert_is_refused_before_anything_starts(tmp_path):
    import threading

    from eplb.runtime import ConfigError, EplbConfig, EplbController

    topology = Topology(1, 4)
    tensors = [[torch.zeros(4, 8), torch.zeros(4, 2, dtype=torch.int8)] for _ in range(2)]  # 34 bytes per expert
    config = EplbConfig.from_dict({"mode": "dynamic", "bytes_per_step": 33})
    threads = threading.active_count()
    with pytest.raises(ConfigError, match=r"bytes_per_step=33 .*34 bytes"):
        EplbController(config, 2, 4, topology, 0, layer_tensors=tensors)
    assert threading.active_count() == threads  # no side thread, no planner started


def test_recorder_leaves_padded_tokens_out_of_window_and_ring():
    rec = LoadRecorder(2, 4, 1, 4, rank=0, source="ids", ring_steps=2)
    ids = torch.tensor([[0, 1], [2, 3], [3, 3]])  # 3 tokens x top-2; the last token is padding
    valid = torch.tensor([True, True, False])
    for _ in range(3):  # the ring wraps: its rows are cleared as they are reused
        rec.begin_step()
        rec.record_ids(1, ids, valid)
    assert rec.window[1].tolist() == [3, 3, 3, 3] and rec.window[0].tolist() == [0, 0, 0, 0]
    assert rec.ring[1].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]


def test_recorder_stage_gate_is_read_on_the_device():
    """What a record call counts is decided by device tensors begin_step sets, so replaying the same recorded ops (as
    a captured CUDA graph does) counts only the steps of the recorded stage."""
    rec = LoadRecorder(1, 3, 1, 3, rank=0, source="counts", stage="prefill", ring_steps=3)
    for step, is_prefill in enumerate((True, False, True)):
        rec.begin_step(is_prefill=is_prefill)
        assert rec._gate.item() == int(is_prefill)
        rec.record_counts(0, torch.tensor([1, 2, 3]))
    assert rec.window[0].tolist() == [2, 4, 6] and rec.steps == 2
    assert rec.ring[0].tolist() == [[1, 2, 3], [1, 2, 3], [0, 0, 0]]
