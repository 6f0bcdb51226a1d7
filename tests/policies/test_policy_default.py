"""The default (DeepSeek EPLB) and random policies, the shared kernels and the slot-retention passes."""

import numpy as np
import pytest

import eplb
from eplb import PolicyError, Topology
from eplb.metrics import rank_loads
from eplb.policies.default import deepseek_placement
from eplb.policies.shared.packing import balanced_packing, replicate, replicate_counts
from eplb.policies.shared.retention import match_ranks, preserve_slots, rank_overlap


def _deepseek_cases(deepseek_vectors, vllm_vectors):
    inputs = deepseek_vectors["inputs"]
    cases = [(inputs["weight"], inputs["num_replicas"], inputs["num_groups"], inputs["num_nodes"],
              inputs["num_gpus"], deepseek_vectors["outputs"])]
    for case in deepseek_vectors["extra_cases"]:
        cases.append((inputs["weight"], case["num_replicas"], case["num_groups"], case["num_nodes"],
                      case["num_gpus"], case))
    for case in vllm_vectors["cases"]:
        if "deepseek_torch" in case:
            i, out = case["inputs"], case["deepseek_torch"]
            cases.append((i["weight"], i["num_replicas"], i["num_groups"], i["num_nodes"], i["num_ranks"],
                          {"phy2log": out["phy2log"], "log2phy": out["log2phy_by_replica_rank"],
                           "logcnt": out["logcnt"]}))
    return cases


def test_rebalance_experts_matches_deepseek_reference(deepseek_vectors, vllm_vectors):
    cases = _deepseek_cases(deepseek_vectors, vllm_vectors)
    assert len(cases) >= 15
    for weight, replicas, groups, nodes, gpus, expected in cases:
        phy2log, log2phy, logcnt = eplb.rebalance_experts(np.array(weight), replicas, groups, nodes, gpus)
        assert phy2log.tolist() == expected["phy2log"], (weight, replicas, groups, nodes, gpus)
        assert log2phy.tolist() == expected["log2phy"], (weight, replicas, groups, nodes, gpus)
        assert logcnt.tolist() == expected["logcnt"], (weight, replicas, groups, nodes, gpus)


def test_rebalance_experts_torch_in_torch_out(deepseek_vectors):
    torch = pytest.importorskip("torch")
    inputs = deepseek_vectors["inputs"]
    weight = torch.tensor(inputs["weight"], dtype=torch.float32)
    outputs = eplb.rebalance_experts(weight, inputs["num_replicas"], inputs["num_groups"], inputs["num_nodes"],
                                     inputs["num_gpus"])
    assert all(isinstance(o, torch.Tensor) for o in outputs)
    assert outputs[0].tolist() == deepseek_vectors["outputs"]["phy2log"]
    assert outputs[2].tolist() == deepseek_vectors["outputs"]["logcnt"]


@pytest.mark.parametrize("args, match", [
    ((7, 2, 2, 4), "multiple of num_gpus"),
    ((8, 2, 3, 3), "num_nodes=3 must divide num_gpus=3|multiple"),
    ((2, 1, 1, 1), "cannot hold the 4 experts"),
])
def test_rebalance_experts_rejects_bad_sizes(args, match):
    with pytest.raises(PolicyError, match=match):
        eplb.rebalance_experts(np.array([[10, 20, 30, 40]]), *args)


def test_modes_and_auto():
    rng = np.random.default_rng(0)
    weight = rng.integers(0, 1000, size=(3, 16))
    hier = deepseek_placement(weight, 24, 4, 2, 4, "hierarchical")[0]
    glob = deepseek_placement(weight, 24, 4, 2, 4, "global")[0]
    assert np.array_equal(deepseek_placement(weight, 24, 4, 2, 4, "auto")[0], hier)
    assert np.array_equal(deepseek_placement(weight, 24, 1, 1, 4)[0], glob)
    # hierarchical keeps every expert group on one node
    group_of_slot = hier // 4
    node_of_slot = np.arange(24) // 12
    for layer in range(3):
        for group in range(4):
            assert len(set(node_of_slot[group_of_slot[layer] == group])) == 1
    with pytest.raises(PolicyError, match="hierarchical mode needs"):
        deepseek_placement(weight, 24, 4, 3, 6, "hierarchical")
    with pytest.raises(PolicyError, match="mode must be one of"):
        eplb.get_policy("default", mode="flat")


def test_replicate_counts_greedy():
    counts = replicate_counts(np.array([[600, 560, 120, 120, 20, 10, 10, 10.0], [1, 1, 1, 1, 0, 0, 0, 0]]), [16, 10])
    assert counts.tolist() == [[5, 5, 1, 1, 1, 1, 1, 1], [2, 2, 1, 1, 1, 1, 1, 1]]
    # the same totals as the creation-order version
    weight = np.random.default_rng(1).random((5, 9))
    assert np.array_equal(replicate_counts(weight, 20), replicate(weight, 20)[2])
    with pytest.raises(PolicyError, match="num_slots must be >="):
        replicate_counts(weight, 8)


def test_balanced_packing_fills_packs_lightest_first():
    weight = np.array([[5.0, 1, 4, 2, 3, 3]])
    pack, rank_in_pack = balanced_packing(weight, 3)
    # 5 -> p0, 4 -> p1, 3 (item 4) -> p2, 3 (item 5) -> p2, 2 -> p1, 1 -> p0
    assert pack.tolist() == [[0, 0, 1, 1, 2, 2]]
    assert rank_in_pack.tolist() == [[0, 1, 0, 1, 0, 1]]
    identity, zeros = balanced_packing(np.array([[1.0, 9, 5]]), 3)
    assert identity.tolist() == [[0, 1, 2]] and zeros.tolist() == [[0, 0, 0]]


def _check_preserved(new, old, post, num_ranks):
    new, old, post = (np.asarray(a).reshape(num_ranks, -1) for a in (new, old, post))
    for rank in range(num_ranks):
        assert sorted(post[rank]) == sorted(new[rank])
        remaining = list(new[rank])
        for slot, expert in enumerate(old[rank]):
            if expert in remaining:  # an old copy the new rank still holds stays in its slot
                remaining.remove(expert)
                assert post[rank][slot] == expert


def test_preserve_slots_vectors(vllm_vectors):
    cases = [c for c in vllm_vectors["cases"] if c["name"].startswith("preserve_intragpu_slots")]
    assert len(cases) == 3
    for case in cases:
        i = case["inputs"]
        post = preserve_slots(i["new_phy2log"], i["old_phy2log"], i["num_ranks"])
        _check_preserved(i["new_phy2log"], i["old_phy2log"], post, i["num_ranks"])
        assert post.tolist() == case["computed_post_phy2log"]


def test_preserve_slots_random_rows():
    rng = np.random.default_rng(2)
    old = rng.integers(0, 6, size=(20, 12))
    new = rng.integers(0, 6, size=(20, 12))
    post = preserve_slots(new, old, 3)
    for layer in range(20):
        _check_preserved(new[layer], old[layer], post[layer], 3)


def test_match_ranks_vectors(ascend_vectors):
    for case in ascend_vectors["flashlb_primitives"]["minimal_redeploy"]:
        old = np.array(case["old"])
        num_ranks = old.shape[0]
        out = match_ranks(np.array(case["new"]).reshape(1, -1), old.reshape(1, -1), num_ranks)
        assert out.reshape(old.shape).tolist() == case["result"]


def test_match_ranks_stays_within_nodes_unless_asked():
    old = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    reversed_ranks = np.array([[6, 7, 4, 5, 2, 3, 0, 1]])  # whole nodes swapped: matching nodes recovers `old`
    for nodes, across in ((1, False), (2, False), (2, True)):
        assert match_ranks(reversed_ranks, old, 4, nodes, across).tolist() == old.tolist()
    mixed = np.array([[0, 1, 4, 5, 2, 3, 6, 7]])  # only a cross-node relabelling recovers `old`
    assert match_ranks(mixed, old, 4, num_nodes=2, across_nodes=True).tolist() == old.tolist()
    assert match_ranks(mixed, old, 4, num_nodes=2).tolist() == mixed.tolist()  # each node keeps its experts
    assert rank_overlap(mixed, old, 4)[0].tolist() == [[2, 0, 0, 0], [0, 0, 2, 0], [0, 2, 0, 0], [0, 0, 0, 2]]


@pytest.mark.parametrize("nodes, mode", [(1, "auto"), (4, "hierarchical"), (4, "global")])
def test_default_retains_slots_without_changing_loads(dsv3_counts, nodes, mode):
    topology = Topology(32, 9, num_nodes=nodes, num_groups=8)
    policy = eplb.get_policy("default", mode=mode)
    first = policy.rebalance(dsv3_counts[0], topology)
    fresh = eplb.get_policy("default", mode=mode, retain_slots=False).rebalance(dsv3_counts[1], topology,
                                                                                first.placement)
    kept = policy.rebalance(dsv3_counts[1], topology, first.placement)
    assert np.allclose(np.sort(rank_loads(kept.placement, dsv3_counts[1]), axis=1),
                       np.sort(rank_loads(fresh.placement, dsv3_counts[1]), axis=1))
    assert np.allclose(kept.par_after, fresh.par_after)
    assert kept.total_moved_slots < 0.85 * fresh.total_moved_slots
    if mode == "hierarchical":  # every expert group still sits on one node
        node = kept.placement.rank_of_slot // 8
        group = kept.placement.phy2log // 32
        for layer in range(0, 58, 7):
            assert all(len(set(node[group[layer] == g])) == 1 for g in range(8))
    else:
        assert first.par_after.mean() <= 1.01


def test_random_policy_is_seeded_and_valid():
    topology = Topology(4, 3)
    load = np.ones((5, 10))
    a = eplb.get_policy("random", seed=7, num_moves=2).rebalance(load, topology)
    b = eplb.get_policy(0, seed=7, num_moves=2).rebalance(load, topology)
    c = eplb.get_policy("random", seed=8, num_moves=2).rebalance(load, topology)
    assert a.placement == b.placement and a.placement != c.placement
    assert np.array_equal(a.placement.replica_count, a.reference.replica_count)
    assert (a.moved_slots <= 4).all() and a.moved_slots.sum() > 0
    with pytest.raises(PolicyError, match="num_moves"):
        eplb.get_policy("random", num_moves=-1)


def _plan(capsys, *argv):
    """``eplb plan --policy default ...`` (the command's default policy is auto)."""
    from eplb.cli import main

    code = main(["plan", "--policy", "default", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_command_dsv3(data_dir, tmp_path, capsys):
    import json

    from eplb import formats

    npz = data_dir / "sglang_dsv3_ep_statistics.npz"
    first = tmp_path / "plan0.json"
    code, out, _ = _plan(capsys, npz, "--select", 0, "--ranks", 32, "--redundant", 32, "--groups", 8,
                         "-o", first, "--format", "ascend", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["par_after_mean"] <= 1.01 < result["par_before_mean"]
    placement = formats.read_map(first, num_experts=256)  # ascend maps: no expert twice on a rank
    assert placement.topology.num_physical == 288 and not placement.problems(allow_shared_rank=False)
    code, out, _ = _plan(capsys, npz, "--select", 1, "--ranks", 32, "--slots-per-rank", 9, "--current", first,
                         "--option", "mode=global", "-o", tmp_path / "plan1.npy", "--json")
    again = json.loads(out)
    assert code == 0 and again["reference"] == "current map" and 0 < again["moved_slots"] < 16704
    assert "mode='global'" in again["policy"]
    code, out, _ = _plan(capsys, npz, "--select", "sum", "--ranks", 64, "--slots-per-rank", 5, "--nodes", 8,
                         "--groups", 8, "--policy", 1, "-o", tmp_path / "plan2.npy")
    assert code == 0 and "mean PAR after" in out


def test_plan_command_errors(data_dir, tmp_path, capsys):
    npz = data_dir / "sglang_dsv3_ep_statistics.npz"
    base = [npz, "--ranks", 32, "--slots-per-rank", 9]
    cases = [
        ([*base, "-o", tmp_path / "x.txt"], "pass --format"),
        ([*base, "--select", 12, "-o", tmp_path / "x.npy"], "--select 12 is out of range"),
        ([*base, "--select", "first", "-o", tmp_path / "x.npy"], "index or 'sum'"),
        ([*base, "--option", "mode", "-o", tmp_path / "x.npy"], "KEY=VALUE"),
        ([*base, "--option", "mood=global", "-o", tmp_path / "x.npy"], "did you mean 'mode'"),
        ([npz, "--ranks", 32, "--redundant", 30, "--select", 0, "-o", tmp_path / "x.npy"],
         "do not split evenly over --ranks 32"),
    ]
    for argv, message in cases:
        code, _, err = _plan(capsys, *argv)
        assert code == 1 and message in err, (argv, err)
    assert not list(tmp_path.iterdir())


def test_spread_duplicates_keeps_counts_and_nodes(dsv3_counts):
    from eplb.policies.shared.packing import spread_duplicates

    phy2log = np.array([[0, 0, 1, 2, 3, 4, 5, 5]])  # ranks of 2 slots: rank 0 and rank 3 hold an expert twice
    load = np.array([[4.0, 4.0, 3, 3, 2, 2, 1, 1]])
    out = spread_duplicates(phy2log, load, 4)
    assert np.array_equal(np.sort(out), np.sort(phy2log))
    assert all(len(set(row)) == 2 for row in out.reshape(4, 2))
    within = spread_duplicates(phy2log, load, 4, ranks_per_block=2)
    assert sorted(within[0, :4]) == [0, 0, 1, 2] and all(len(set(r)) == 2 for r in within.reshape(4, 2))
    stuck = spread_duplicates(np.array([[0, 0, 0, 0]]), np.ones((1, 4)), 2)  # nowhere to go: left as is
    assert stuck.tolist() == [[0, 0, 0, 0]]

    for nodes, mode in ((1, "auto"), (4, "hierarchical")):
        topology = Topology(32, 9, num_nodes=nodes, num_groups=8)
        shared = eplb.get_policy("default", mode=mode).rebalance(dsv3_counts[0], topology)
        spread = eplb.get_policy("default", mode=mode, allow_shared_rank=False).rebalance(dsv3_counts[0], topology)
        assert shared.placement.problems(allow_shared_rank=False)  # the reference does share ranks here
        assert not spread.placement.problems(allow_shared_rank=False)
        assert np.array_equal(spread.placement.replica_count, shared.placement.replica_count)
        assert spread.par_after.mean() <= shared.par_after.mean() + 0.002


@pytest.mark.parametrize("mode", ["hierarchical", "global"])
def test_replanning_the_same_load_moves_nothing(dsv3_counts, mode):
    topology = Topology(32, 9, num_nodes=4, num_groups=8)
    policy = eplb.get_policy("default", mode=mode)
    first = policy.rebalance(dsv3_counts[3], topology)
    rng = np.random.default_rng(0)
    table = first.placement.rank_table
    if mode == "global":  # ranks are interchangeable across nodes only in global mode
        table = table[:, rng.permutation(32)]
    else:  # whole nodes are
        table = table.reshape(58, 4, 8, 9)[:, rng.permutation(4)].reshape(58, 32, 9)
    shuffled = rng.permuted(table, axis=2).reshape(58, -1)  # and slots within a rank
    again = policy.rebalance(dsv3_counts[3], topology, shuffled)
    assert again.total_moved_slots == 0 and np.array_equal(again.placement.phy2log, shuffled)
    assert first.total_moved_slots > 0
