"""FlashLB (policy ``flashlb``, vllm-ascend type 3): vectors, validity, gain rule, cherry-picking, determinism.

Scores are checked against :func:`reference_score`, a plain loop over episodes and ranks written here, never against
the kernels FlashLB decides with."""

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb import EplbError
from eplb.cycle import CycleConfig
from eplb.metrics import rank_loads
from eplb.placement import Placement
from eplb.cycle.planning import PlanState, plan_cycle
from eplb.policies import get_policy
from eplb.policies import _flashlb_ascend_kernels as ascend_kernels
from eplb.policies import _flashlb_kernels as kernels
from eplb.policies.flashlb import Z_75, episode_load
from eplb.policies.shared.packing import allot_replicas
from eplb.policies.shared.retention import match_ranks
from eplb.topology import Topology


def _counts(weight, extra, max_count):
    weight = np.asarray(weight, dtype=np.float64)
    order = allot_replicas(weight, np.ones(weight.size, dtype=np.bool_), extra, max_count)
    return 1 + np.bincount(order, minlength=weight.size)


def reference_score(load, placement, num_episodes=64):
    """float64 ``[L]``: FlashLB's score by plain loops: +1 to every per-step count, the last steps cut into
    ``min(num_episodes, T)`` episodes of ``T // S`` steps and summed; per episode, the busiest rank's load (tokens split
    evenly over replicas) times the ranks plus 0.01, over all tokens plus 0.01; the mean over episodes."""
    load = np.asarray(load, dtype=np.float64)
    if load.ndim == 2:
        load = load[None]
    steps = load.shape[0]
    count = max(1, min(num_episodes, steps))
    length = steps // count
    num_ranks = placement.topology.num_ranks
    out = []
    for layer, row in enumerate(placement.phy2log):
        replicas = {e: list(row).count(e) for e in set(row.tolist())}
        scores = []
        for episode in range(count):
            first = steps - count * length + episode * length
            tokens = [sum(load[t, layer, e] + 1 for t in range(first, first + length)) for e in range(load.shape[2])]
            slots = len(row) // num_ranks
            ranks = [sum(tokens[e] / replicas[e] for e in row[r * slots:(r + 1) * slots]) for r in range(num_ranks)]
            scores.append((max(ranks) * num_ranks + 0.01) / (sum(tokens) + 0.01))
        out.append(sum(scores) / count)
    return np.array(out)


def test_paper_example_beats_greedy(ascend_vectors):
    case = ascend_vectors["flashlb_paper_example"]
    hotness = np.array([case["hotness"]])
    topology = Topology(case["ranks"], case["slots_per_rank"])
    plan = get_policy("flashlb").rebalance(hotness, topology)
    assert plan.placement.problems(allow_shared_rank=False) == []
    peak = rank_loads(plan.placement, hotness).max()
    assert peak <= case["flashlb_claimed_max_rank_load"]
    assert peak < case["default_greedy_max_rank_load"]
    assert plan.placement.replica_count[0].tolist() == case["flashlb_measured_replicas"]


def test_min_max_replica_vectors(ascend_vectors):
    for case in ascend_vectors["flashlb_primitives"]["min_max_replica"]:
        mean = np.array(case["mean"], dtype=np.float64)
        std = np.array(case["std"]) if "std" in case else np.sqrt(case["var"])
        weight = mean + case.get("z", 0.6745) * std
        assert _counts(weight, case["extra"], case["extra"] + 1).tolist() == case["replicas"]


def test_allotment_respects_the_cap_and_subset():
    weight = np.array([100.0, 1.0, 50.0, 1.0])
    order = allot_replicas(weight, np.array([True, True, False, True]), 4, 3)
    assert order.tolist() == [0, 0, 1, 3]  # expert 0 stops at 3 replicas, expert 2 is not eligible


def test_score_episode_par_vectors(ascend_vectors):
    vec = ascend_vectors["flashlb_primitives"]["score_episode_par"]
    x = np.array(vec["X"], dtype=np.float64)
    xt = np.ascontiguousarray(x.T)
    for case in vec["cases"]:
        members = np.array(case["deployment"], dtype=np.int64)
        count = np.bincount(members.ravel(), minlength=x.shape[1]).astype(np.float64)
        scratch = np.empty(x.shape[0]), np.empty(x.shape[0])
        score = kernels.episode_score(xt, x.sum(axis=1), members, 1.0 / count, *scratch)
        assert score == pytest.approx(case["score"], abs=1e-4)


def test_statistics_vectors(ascend_vectors):
    vec = ascend_vectors["flashlb_primitives"]["statistics"]
    xt = np.ascontiguousarray(np.array(vec["X"], dtype=np.float64).T)
    num_experts = xt.shape[0]
    mean, var, cov = np.empty(num_experts), np.empty(num_experts), np.empty((num_experts, num_experts))
    kernels.episode_statistics(xt, mean, var, cov)
    np.testing.assert_allclose(mean, vec["mean"], atol=1e-3)
    np.testing.assert_allclose(var, vec["var_unbiased"], atol=1e-3)
    np.testing.assert_allclose(cov[0], vec["cov_row0"], atol=1e-3)
    np.testing.assert_allclose(cov, np.cov(xt), atol=1e-12)


def test_single_episode_has_no_variance():
    xt = np.array([[3.0], [5.0]])
    mean, var, cov = np.empty(2), np.ones(2), np.ones((2, 2))
    kernels.episode_statistics(xt, mean, var, cov)
    assert mean.tolist() == [3.0, 5.0] and not var.any() and not cov.any()


def test_minimal_redeploy_vectors(ascend_vectors):
    for case in ascend_vectors["flashlb_primitives"]["minimal_redeploy"]:
        old, new = np.array(case["old"]), np.array(case["new"])
        num_ranks = old.shape[0]
        out = match_ranks(new.reshape(1, -1), old.reshape(1, -1), num_ranks, across_nodes=True)
        assert out.reshape(old.shape).tolist() == case["result"]


def test_episode_load_adds_one_per_step():
    load = np.zeros((10, 1, 3), dtype=np.int64)
    load[:, 0, 1] = 2
    x = episode_load(load, 4)  # 4 episodes of 2 steps; the 2 oldest steps are dropped
    assert x.shape == (1, 4, 3)
    assert np.all(x[0, :, 0] == 2) and np.all(x[0, :, 1] == 6)
    assert episode_load(np.array([[4, 0]]), 64).tolist() == [[[5.0, 1.0]]]


def _zipf_steps(rng, steps, layers, experts, tokens=512):
    weight = 1.0 / np.arange(1, experts + 1) ** 1.2
    out = np.empty((steps, layers, experts), dtype=np.int64)
    for layer in range(layers):
        p = rng.permutation(weight / weight.sum())
        out[:, layer] = rng.multinomial(tokens, p, size=steps)
    return out


@settings(max_examples=50, deadline=None)
@given(
    num_ranks=st.integers(1, 8),
    slots=st.integers(1, 4),
    extra=st.integers(0, 12),
    steps=st.sampled_from([1, 3, 20, 70]),
    with_current=st.booleans(),
    seed=st.integers(0, 2**16),
    rules=st.sampled_from(["vllm-ascend", "eplb"]),
)
def test_valid_without_shared_ranks(num_ranks, slots, extra, steps, with_current, seed, rules):
    num_physical = num_ranks * slots
    num_experts = max(slots, num_physical - extra)
    topology = Topology(num_ranks, slots)
    rng = np.random.default_rng(seed)
    load = _zipf_steps(rng, steps, 2, num_experts)
    current = None
    if with_current:
        current = Placement(np.stack([rng.permutation(np.arange(num_physical) % num_experts) for _ in range(2)]),
                            num_experts, topology)
    plan = get_policy("flashlb", rules=rules, depth=3, width=3).rebalance(load, topology, current)
    assert plan.placement.problems(allow_shared_rank=False) == []
    if current is not None:
        assert np.array_equal(plan.changed, (plan.placement.phy2log != current.phy2log).any(axis=1))


def test_our_rules_change_a_layer_only_with_a_gain():
    rng = np.random.default_rng(1)
    load = _zipf_steps(rng, 64, 3, 16)
    topology = Topology(4, 5)
    good = get_policy("flashlb", rules="eplb").rebalance(load, topology).placement
    weak = get_policy("flashlb", rules="eplb", depth=1, z=0.0)  # no search: its own plans mostly score worse
    gain = reference_score(load, good) - reference_score(load, weak.rebalance(load, topology).placement)
    assert np.any(gain < 0) and np.any(gain > 0)
    plan = weak.rebalance(load, topology, good)
    assert np.array_equal(plan.changed, gain > 0)
    kept = ~plan.changed
    assert np.array_equal(plan.placement.phy2log[kept], good.phy2log[kept])


def test_vllm_ascend_rules_change_every_replanned_layer_better_or_not():
    """Without a recorded balance every layer is re-planned, and each takes its new placement even where it scores
    worse than the one in force: the reference applies what it planned (only its record needs a gain)."""
    rng = np.random.default_rng(1)
    load = _zipf_steps(rng, 64, 3, 16)
    topology = Topology(4, 5)
    good = get_policy("flashlb").rebalance(load, topology).placement
    weak = get_policy("flashlb", depth=1, z=0.0)
    fresh = weak.rebalance(load, topology).placement
    worse = reference_score(load, fresh) > reference_score(load, good)
    assert worse.any()
    plan = weak.rebalance(load, topology, good)
    multiset = lambda p, layer: sorted(map(tuple, np.sort(p.phy2log[layer].reshape(4, -1), axis=1)))
    for layer in range(3):
        assert multiset(plan.placement, layer) == multiset(fresh, layer)
        assert plan.changed[layer] == (multiset(fresh, layer) != multiset(good, layer))
    assert plan.changed[worse].all()


def test_applied_layers_gain_on_the_same_episodes():
    rng = np.random.default_rng(2)
    load = _zipf_steps(rng, 128, 4, 24)
    topology = Topology(8, 4)
    current = Placement.initial(24, topology, 4)
    balanced = get_policy("flashlb", rules="eplb").rebalance(load, topology).placement
    current = current.replace_layers([0, 2], balanced)  # layers 0 and 2 are already as good as FlashLB gets
    plan = get_policy("flashlb", rules="eplb").rebalance(load, topology, current)
    assert plan.changed.tolist() == [False, True, False, True]
    before, after = reference_score(load, current), reference_score(load, plan.placement)
    assert np.all(after[plan.changed] < before[plan.changed])
    assert plan.placement.problems(allow_shared_rank=False) == []


@pytest.mark.parametrize("rules", ["vllm-ascend", "eplb"])
def test_cherry_picking_with_last_balance(rules):
    rng = np.random.default_rng(3)
    load = _zipf_steps(rng, 64, 2, 16)
    topology = Topology(4, 5)
    current = Placement.initial(16, topology, 2)
    # average-to-peak now: vllm-ascend's on the raw steps (an episode each), ours on the episodes the search uses
    balance = 1.0 / reference_score(load, current, num_episodes=64 if rules == "eplb" else load.shape[0])
    # layer 0 is as balanced as at its last plan, layer 1 got much worse
    last = np.array([balance[0], min(1.0, balance[1] / 0.8)])
    plan = get_policy("flashlb", rules=rules, replan_floor=0.1, last_balance=last).rebalance(load, topology, current)
    assert plan.changed.tolist() == [False, True]
    everything = get_policy("flashlb", rules=rules).rebalance(load, topology, current)
    assert everything.changed.tolist() == [True, True]


@pytest.mark.parametrize("num_ranks, ratio, floor", [(16, 0.95, 0.9), (32, 0.9, 0.85)])
def test_thresholds_follow_the_group_size(num_ranks, ratio, floor):
    """Below 32 ranks a layer is re-planned once its balance falls under 0.95 x its record (or 0.9), from 32 ranks
    on under 0.9 x (or 0.85)."""
    rng = np.random.default_rng(6)
    topology = Topology(num_ranks, 3)
    load = _zipf_steps(rng, 32, 4, 3 * num_ranks - num_ranks // 2, tokens=200_000)
    current = get_policy("flashlb").rebalance(load, topology).placement
    balance = 1.0 / reference_score(load, current, num_episodes=32)  # raw steps
    assert (balance > floor).all() and (balance < 0.94).all()  # no floor applies, no record capped
    # records such that balance / record is 0.94, 0.96, 0.96, 0.94: between the two ratios or above both
    record = balance / np.array([0.94, 0.96, 0.96, 0.94])
    plan = get_policy("flashlb", last_balance=record).rebalance(load, topology, current)
    replanned = balance < ratio * record
    assert replanned.tolist() == ([True, False, False, True] if ratio == 0.95 else [False] * 4)
    unchanged = ~replanned
    np.testing.assert_array_equal(plan.placement.phy2log[unchanged], current.phy2log[unchanged])


def test_score_hand_computed():
    """Two ranks of one slot, experts 0 and 1 with 3, 1 then 1, 3 tokens (+1 each: 4, 2 then 2, 4). One episode per
    step: each scores (4 x 2 + 0.01) / (6 + 0.01); both steps in one episode: 6 and 6, (6 x 2 + 0.01) / (12 + 0.01)."""
    topology = Topology(2, 1)
    load = np.array([[[3, 1]], [[1, 3]]])
    placement = Placement.initial(2, topology, 1)
    assert reference_score(load, placement, 2)[0] == pytest.approx(8.01 / 6.01)
    assert reference_score(load, placement, 1)[0] == pytest.approx(1.0)
    for episodes, expected in ((2, 8.01 / 6.01), (1, 1.0)):
        x = episode_load(load, episodes)
        xt = np.ascontiguousarray(x.transpose(0, 2, 1))
        assert kernels.score_layers(xt, x.sum(axis=2), placement.phy2log, 2)[0] == pytest.approx(expected)
        assert float(ascend_kernels.score(x[0], np.ones(2, dtype=np.int32), np.array([[0], [1]]))) == \
            pytest.approx(expected, rel=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 12), st.sampled_from([1, 5, 64]), st.integers(0, 2**16))
def test_score_kernels_equal_the_plain_loop(num_ranks, slots, steps, num_episodes, seed):
    rng = np.random.default_rng(seed)
    num_experts = int(rng.integers(1, num_ranks * slots + 1))
    topology = Topology(num_ranks, slots)
    placement = Placement(np.stack([rng.permutation(np.arange(num_ranks * slots) % num_experts) for _ in range(2)]),
                          num_experts, topology)
    load = rng.integers(0, 30, size=(steps, 2, num_experts))
    expected = reference_score(load, placement, num_episodes)
    x = episode_load(load, num_episodes)
    xt = np.ascontiguousarray(x.transpose(0, 2, 1))
    np.testing.assert_allclose(kernels.score_layers(xt, x.sum(axis=2), placement.phy2log, num_ranks), expected)
    for layer in range(2):
        members = placement.phy2log[layer].reshape(num_ranks, -1)
        counts = placement.replica_count[layer].astype(np.int32)
        assert float(ascend_kernels.score(np.ascontiguousarray(x[layer]), counts, members)) == \
            pytest.approx(expected[layer], rel=1e-6)


#: vllm-ascend's FlashTree (its policy file's output) on 8 episodes of 20 experts, 8 ranks x 3 slots
VLLM_ASCEND_FLASH_TREE = {
    "episodes": [[17, 10, 1, 2, 5, 52, 3, 15, 9, 14, 2, 27, 7, 1, 24, 2, 5, 3, 20, 1],
                 [22, 9, 1, 1, 6, 49, 5, 15, 5, 14, 3, 29, 7, 2, 27, 1, 4, 1, 18, 1],
                 [25, 11, 1, 1, 11, 35, 3, 12, 5, 17, 3, 32, 5, 2, 24, 1, 8, 1, 22, 1],
                 [16, 2, 1, 1, 9, 50, 5, 15, 8, 15, 3, 32, 4, 1, 21, 1, 5, 3, 27, 1],
                 [21, 6, 1, 1, 7, 53, 5, 11, 10, 10, 3, 30, 6, 1, 17, 1, 6, 4, 26, 1],
                 [24, 7, 1, 1, 5, 36, 6, 19, 7, 13, 1, 35, 5, 3, 20, 2, 5, 1, 28, 1],
                 [25, 7, 1, 1, 4, 38, 3, 11, 7, 10, 4, 43, 1, 1, 24, 1, 7, 6, 25, 1],
                 [20, 8, 1, 1, 8, 42, 4, 14, 8, 9, 3, 42, 6, 4, 19, 2, 5, 2, 21, 1]],
    "deployment": [[14, 12, 19], [0, 16, 3], [11, 8, 17], [11, 4, 10], [5, 18, 13], [5, 18, 15], [5, 1, 6],
                   [7, 9, 2]],
    "score": 1.196960687637329,
}


def test_vllm_ascend_search_equals_vllm_ascend_output():
    case = VLLM_ASCEND_FLASH_TREE
    deployment, score = ascend_kernels.flash_tree(np.array(case["episodes"], dtype=np.float64), 8, 3, Z_75, 4, 8)
    assert deployment.tolist() == case["deployment"]
    assert float(score) == case["score"]


def test_deterministic_and_window_input():
    rng = np.random.default_rng(4)
    load = _zipf_steps(rng, 40, 3, 12)
    topology = Topology(4, 4)
    policy = get_policy(3)
    assert policy.rebalance(load, topology).placement == policy.rebalance(load.copy(), topology).placement
    window = load.sum(axis=0)
    plan = policy.rebalance(window, topology)
    assert plan.placement == policy.rebalance(window, topology).placement
    assert plan.placement.problems(allow_shared_rank=False) == []
    assert plan.par_after.max() < plan.par_before.max()


def test_rejects_bad_options_and_too_many_slots():
    with pytest.raises(EplbError, match="depth"):
        get_policy("flashlb", depth=0)
    with pytest.raises(EplbError, match="z"):
        get_policy("flashlb", z=float("nan"))
    with pytest.raises(EplbError, match="last_balance"):
        get_policy("flashlb", last_balance=[0.5, 1.5])
    with pytest.raises(EplbError, match="slots_per_rank"):
        get_policy("flashlb").rebalance(np.ones((1, 2)), Topology(1, 4))
    with pytest.raises(EplbError, match="last_balance has 1 layers"):
        get_policy("flashlb", last_balance=[0.5]).rebalance(np.ones((2, 4)), Topology(2, 2),
                                                             Placement.initial(4, Topology(2, 2), 2))


def test_lpt_makes_room_when_every_free_rank_holds_the_expert():
    # expert 0 fills rank 0 alone; the three light experts fill rank 1; expert 4's second replica then finds
    # only rank 0 free, which already holds it
    mean = np.array([100.0, 1.0, 1.0, 1.0, 0.2])
    count = np.array([1, 1, 1, 1, 2])
    num_ranks, slots = 2, 3
    members = np.empty((num_ranks, slots), dtype=np.int64)
    scratch = (np.empty(num_ranks, dtype=np.int64), np.empty(num_ranks), np.empty(num_ranks),
               np.empty((num_ranks, 5)), np.empty(num_ranks, dtype=np.int64))
    kernels.lpt(mean, np.zeros(5), np.zeros((5, 5)), count, 0.6745, np.arange(5), members, *scratch)
    assert sorted(members.ravel().tolist()) == [0, 1, 2, 3, 4, 4]
    assert all(len(set(row)) == slots for row in members.tolist())


def test_the_planning_function_carries_the_balance_of_the_last_plan_to_the_next_cycle():
    rng = np.random.default_rng(3)
    topology = Topology(4, 5)
    cycle = CycleConfig(cycle_steps=64, layers_per_step=0)
    policy = get_policy("flashlb", rules="eplb", replan_floor=0.1)
    load = _zipf_steps(rng, 64, 2, 16)
    initial = Placement.initial(16, topology, 2)
    first = plan_cycle(policy, load, initial, cycle)
    assert first.layers == (0, 1)  # nothing was planned before: every layer is a candidate
    np.testing.assert_allclose(first.state.policy, 1.0 / reference_score(load, Placement(first.phy2log, 16, topology)))
    # a layer whose balance did not fall below 0.95 of its last one is no candidate
    assert plan_cycle(policy, load, initial, cycle, state=PlanState(policy=np.array([0.01, np.nan]))).layers == (1,)
    # the state is what the next call plans from, also after a trip through a pickle (to the planner worker)
    current = Placement(first.phy2log, 16, topology)
    carried = plan_cycle(policy, load, current, cycle, state=first.state)
    revived = plan_cycle(policy, load, current, cycle, state=pickle.loads(pickle.dumps(first.state)))
    assert carried.layers == () and revived.checksum == carried.checksum


def test_vllm_ascend_state_records_a_gain_of_a_plan_in_force():
    """The record of a re-planned layer whose plan is in force is its new average-to-peak on the episodes, when that
    beats its old one on the raw steps; a plan the cycle did not apply leaves the record as it was."""
    rng = np.random.default_rng(7)
    topology = Topology(4, 5)
    load = _zipf_steps(rng, 64, 3, 16)
    policy = get_policy("flashlb")
    current = Placement.initial(16, topology, 3)
    plan = policy.rebalance(load, topology, current)
    assert plan.changed.all()
    record = policy.next_state(None, plan, [0, 1], load)  # layer 2 planned but not applied
    before = 1.0 / reference_score(load, current, num_episodes=64 * 64)  # raw steps
    after = 1.0 / reference_score(load, plan.placement)
    assert (after[:2] > before[:2]).all()
    np.testing.assert_allclose(record[:2], after[:2], rtol=1e-6)
    assert np.isnan(record[2])
    # a layer whose balance held is not re-planned, and its record stays
    again = policy.rebalance(load, topology, plan.placement, state=record)
    assert not again.changed[:2].any()
    np.testing.assert_array_equal(policy.next_state(record, again, [], load)[:2], record[:2])
