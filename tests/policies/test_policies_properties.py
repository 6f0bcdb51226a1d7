"""Properties every registered policy must have, on random problems (hypothesis).

For each policy in ``eplb.available_policies()``: the placement is valid, the plan's ``moved_slots`` and
``par_after`` agree with a plain recomputation (loops, not :mod:`eplb.metrics`), a layer with no load or fewer tokens
than ranks keeps the placement in force, the same input gives the same output, and torch tensors give the same plan
as numpy arrays.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
from eplb import Placement, PolicyError, Topology

POLICIES = eplb.available_policies()
LOAD_KINDS = ("zero", "near-zero", "uniform", "zipf", "one-hot")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def problems(draw):
    num_layers = draw(st.integers(1, 8))
    num_experts = draw(st.integers(2, 300))
    num_ranks = draw(st.integers(1, 64))
    slots = -(-num_experts // num_ranks) + draw(st.integers(0, 2))
    num_nodes = draw(st.sampled_from(_divisors(num_ranks)))
    num_groups = draw(st.sampled_from([d for d in _divisors(num_experts) if d <= 16]))
    topology = Topology(num_ranks, slots, num_nodes, num_groups)
    kind = draw(st.sampled_from(LOAD_KINDS))
    steps = draw(st.sampled_from([0, 1, 3]))  # 0: a window [L, E], else per step [T, L, E]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shape = (num_layers, num_experts) if steps == 0 else (steps, num_layers, num_experts)
    if kind == "zero":
        load = np.zeros(shape, dtype=np.int64)
    elif kind == "near-zero":  # fewer tokens than ranks in some layers of the window
        load = (rng.random(shape) < 0.3 / num_experts).astype(np.int64)
    elif kind == "uniform":
        load = np.full(shape, 100, dtype=np.int64)
    elif kind == "zipf":
        load = np.minimum(rng.zipf(1.3, size=shape), 10**6).astype(np.int64)
    else:
        load = np.zeros(shape, dtype=np.int64)
        hot = rng.integers(0, num_experts, size=num_layers)
        load[..., np.arange(num_layers), hot] = 1000
    current_kind = draw(st.sampled_from(["none", "shuffled", "rotated"]))
    current = None
    if current_kind == "shuffled":  # every expert at least once, anywhere (ranks may hold an expert twice)
        row = np.arange(topology.num_physical) % num_experts
        current = np.stack([rng.permutation(row) for _ in range(num_layers)])
    elif current_kind == "rotated":  # K consecutive ids per rank: no rank holds an expert twice when K <= E
        rows = []
        for _ in range(num_layers):
            row = (np.arange(topology.num_physical) + rng.integers(num_experts)) % num_experts
            table = row.reshape(num_ranks, slots)[rng.permutation(num_ranks)]
            rows.append(rng.permuted(table, axis=1).ravel())
        current = np.stack(rows)
    return load, topology, current


def _expected_par(phy2log: np.ndarray, window: np.ndarray, num_ranks: int) -> np.ndarray:
    num_layers, num_slots = phy2log.shape
    slots = num_slots // num_ranks
    out = np.empty(num_layers)
    for layer in range(num_layers):
        count = {}
        for expert in phy2log[layer]:
            count[expert] = count.get(expert, 0) + 1
        rank_load = [0.0] * num_ranks
        for slot in range(num_slots):
            expert = phy2log[layer, slot]
            rank_load[slot // slots] += window[layer, expert] / count[expert]
        mean = sum(rank_load) / num_ranks
        out[layer] = max(rank_load) / mean if mean > 0 else 1.0
    return out


def _rank_rows(phy2log: np.ndarray, topology: Topology) -> list:
    return [[list(layer[r * topology.slots_per_rank:(r + 1) * topology.slots_per_rank])
             for r in range(topology.num_ranks)] for layer in phy2log]


def _expected_moves(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    return np.array([sum(int(a != b) for a, b in zip(new_row, old_row)) for new_row, old_row in zip(new, old)])


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problem=problems())
def test_policy_properties(name, problem):
    load, topology, current = problem
    policy = eplb.get_policy(name)
    num_layers, num_experts = load.shape[-2:]
    try:
        plan = policy.rebalance(load, topology, current)
    except PolicyError:
        # the one refusal allowed: a policy that never shares a rank, asked for more slots per rank than experts
        if policy.allow_shared_rank or topology.slots_per_rank <= num_experts:
            raise
        return
    new = plan.placement.phy2log

    # a valid placement of the right size (the Placement constructor rejects invalid ones; check independently)
    assert new.shape == (num_layers, topology.num_physical)
    assert ((new >= 0) & (new < num_experts)).all()
    for layer in range(num_layers):
        assert set(new[layer].tolist()) == set(range(num_experts))
    reference = current if current is not None else Placement.initial(num_experts, topology, num_layers).phy2log
    if not policy.allow_shared_rank and topology.slots_per_rank <= num_experts:
        # no new shared ranks: a layer the policy found clean stays clean
        for before, after in zip(_rank_rows(reference, topology), _rank_rows(new, topology)):
            if all(len(set(row)) == len(row) for row in before):
                assert all(len(set(row)) == len(row) for row in after), after

    # a quiet layer keeps the placement in force (a policy that never shares a rank may repair one that does)
    window = load.sum(axis=0) if load.ndim == 3 else load
    for layer in np.flatnonzero((window.sum(axis=1) == 0) | (window.sum(axis=1) < topology.num_ranks)):
        rows = _rank_rows(reference[layer:layer + 1], topology)[0]
        if policy.allow_shared_rank or all(len(set(row)) == len(row) for row in rows):
            assert new[layer].tolist() == reference[layer].tolist(), f"quiet layer {layer} moved"

    # moved slots and predicted PAR, recomputed
    assert plan.moved_slots.tolist() == _expected_moves(new, reference).tolist()
    assert plan.changed.tolist() == (plan.moved_slots > 0).tolist()
    np.testing.assert_allclose(plan.par_after, _expected_par(new, window.astype(float), topology.num_ranks),
                               rtol=1e-9)
    np.testing.assert_allclose(plan.par_before, _expected_par(reference, window.astype(float),
                                                              topology.num_ranks), rtol=1e-9)

    # deterministic: a fresh instance on a copy of the input gives the same placement
    again = eplb.get_policy(name).rebalance(load.copy(), topology, None if current is None else current.copy())
    assert np.array_equal(again.placement.phy2log, new)


@pytest.mark.parametrize("name", POLICIES)
def test_policy_accepts_torch(name):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    topology = Topology(8, 5, num_nodes=2, num_groups=4)
    load = rng.zipf(1.4, size=(4, 3, 32)).astype(np.int64)
    current = np.stack([rng.permutation(np.arange(40) % 32) for _ in range(3)])
    from_numpy = eplb.get_policy(name).rebalance(load, topology, current)
    from_torch = eplb.get_policy(name).rebalance(torch.from_numpy(load), topology, torch.from_numpy(current))
    assert np.array_equal(from_numpy.placement.phy2log, from_torch.placement.phy2log)
    np.testing.assert_allclose(from_numpy.par_after, from_torch.par_after)
