"""Every policy's tables pass vllm-ascend's acceptance check, so no layer is silently reverted.

vllm-ascend's EPLB worker checks each new table per layer before using it and keeps the old layer when: fewer
distinct experts remain than before (an expert is missing), an NPU holds an expert twice, or an expert the NPU
already held sits in another local slot ("expert movement inside NPU"). ``reverted_layers`` is that rule, written
here from its description (the real package needs NPU libraries).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
from eplb.integrations import AscendPolicy
from eplb.integrations.vllm_ascend import logical_load
from eplb.metrics import par, rank_loads

POLICIES = eplb.available_policies()


def reverted_layers(old: np.ndarray, new: np.ndarray) -> list[tuple[int, str]]:
    """The layers vllm-ascend would revert, with the reason; ``old`` / ``new`` int ``[L, W, K]``."""
    out = []
    for layer in range(old.shape[0]):
        if np.unique(new[layer]).size < np.unique(old[layer]).size:
            out.append((layer, "expert missing"))
            continue
        for rank in range(old.shape[1]):
            now, was = new[layer, rank], old[layer, rank]
            if np.unique(now).size != now.size:
                out.append((layer, f"rank {rank} holds an expert twice"))
                break
            stays = np.isin(now, was)
            if not np.array_equal(now[stays], was[stays]):
                out.append((layer, f"rank {rank}: an expert moves inside the NPU"))
                break
    return out


def test_the_rule_catches_each_case():
    old = np.array([[[0, 1], [2, 3]]])
    assert reverted_layers(old, old) == []
    assert reverted_layers(old, np.array([[[0, 1], [2, 2]]])) == [(0, "expert missing")]
    assert reverted_layers(np.array([[[0, 1], [2, 0]]]), np.array([[[0, 0], [2, 1]]])) == [
        (0, "rank 0 holds an expert twice")]
    assert reverted_layers(old, np.array([[[1, 0], [2, 3]]])) == [(0, "rank 0: an expert moves inside the NPU")]
    assert reverted_layers(old, np.array([[[0, 2], [1, 3]]])) == []  # 1 and 2 change rank: allowed


def _slot_workload(table: np.ndarray, load: np.ndarray) -> np.ndarray:
    """``[L, W, K]`` tokens per slot: each expert's load split evenly over its replicas in ``table``."""
    num_layers = table.shape[0]
    flat = table.reshape(num_layers, -1)
    count = np.stack([np.bincount(row, minlength=load.shape[1]) for row in flat])
    per_slot = np.take_along_axis(load / np.maximum(count, 1), flat, axis=1)
    return np.round(per_slot).astype(np.int64).reshape(table.shape)


@st.composite
def _problems(draw):
    ranks = draw(st.integers(2, 6))
    slots = draw(st.integers(1, 4))
    experts = draw(st.integers(max(slots, 2), ranks * slots))
    layers = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    policy = draw(st.sampled_from(POLICIES))
    return ranks, slots, experts, layers, seed, policy


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_problems())
def test_every_policy_passes_the_check_property(problem):
    ranks, slots, experts, layers, seed, name = problem
    rng = np.random.default_rng(seed)
    topology = eplb.Topology(ranks, slots)
    # a table vllm-ascend could hold: its initial layout, shuffled between ranks without sharing one, slots shuffled
    start = eplb.get_policy("random", seed=seed, num_moves=3, allow_shared_rank=False).rebalance(
        np.ones((layers, experts)), topology, eplb.Placement.initial(experts, topology, layers)).placement
    table = rng.permuted(start.rank_table, axis=2)
    assert reverted_layers(table, table) == []
    policy = AscendPolicy(name)
    for _ in range(2):  # two cycles: the second starts from the first's table
        load = rng.zipf(1.4, size=(layers, experts)).clip(max=10**6) * rng.integers(1, 50)
        changed, _, new = policy.rebalance_experts(table, _slot_workload(table, load))
        assert reverted_layers(table, new) == []
        assert changed == int((new != table).any())
        table = new


def test_ascend_reorder_never_changes_the_balance(dsv3_counts):
    """The adapter only re-orders slots within ranks: its table has the policy's rank loads exactly."""
    topology = eplb.Topology(32, 9)
    table = eplb.Placement.initial(256, topology, 58).rank_table
    workload = _slot_workload(table, dsv3_counts[0])
    _, _, new = AscendPolicy("default").rebalance_experts(table, workload)
    plan = eplb.get_policy("default", allow_shared_rank=False).rebalance(
        logical_load(table, workload, 256), topology, table.reshape(58, -1))
    assert np.array_equal(np.sort(new, axis=2), np.sort(plan.placement.rank_table, axis=2))


@pytest.mark.parametrize("name", POLICIES)
def test_deepseek_v3_cycles_pass_the_check(name, dsv3_counts):
    """58 layers, 256 experts on 32 NPUs x 9 slots, three cycles on three recorded workloads, as vllm-ascend runs."""
    topology = eplb.Topology(32, 9)
    table = eplb.Placement.initial(256, topology, 58).rank_table
    policy = AscendPolicy(name)
    for cycle in range(3):
        load = dsv3_counts[cycle].astype(np.float64)
        changed, priority, new = policy.rebalance_experts(table, _slot_workload(table, load))
        assert reverted_layers(table, new) == [], (name, cycle)
        eplb.Placement(new.reshape(58, -1), 256, topology).validate(allow_shared_rank=False)
        if cycle == 0 and name != "random":  # balancing does something, and not only on paper
            assert changed == 1
            before = par(rank_loads(eplb.Placement(table.reshape(58, -1), 256, topology), load)).mean()
            after = par(rank_loads(eplb.Placement(new.reshape(58, -1), 256, topology), load)).mean()
            assert after < before
        table = new
