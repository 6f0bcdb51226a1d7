import numpy as np
import pytest

from eplb import LoadError, Placement, Topology
from eplb.load import as_load, episodes
from eplb.metrics import balancedness, par, rank_loads, step_par, summarize_par, weighted_quantile


def test_imbalance_vector(ascend_vectors):
    case = ascend_vectors["imbalance_metric"]
    slot_loads = np.array(case["slot_loads"], dtype=float)
    assert par(slot_loads.sum(axis=1)) == pytest.approx(case["peak_to_average"], abs=1e-4)


def test_deepseek_per_gpu_load(deepseek_vectors):
    phy2log = np.array(deepseek_vectors["outputs"]["phy2log"])
    weight = np.array(deepseek_vectors["inputs"]["weight"])
    p = Placement(phy2log, weight.shape[1], Topology(8, 2, 2, 4))
    loads = rank_loads(p, weight)
    np.testing.assert_allclose(loads, deepseek_vectors["derived"]["per_gpu_load"])
    np.testing.assert_allclose(1 / par(loads), deepseek_vectors["derived"]["balancedness_avg_over_max"])


def test_vllm_balancedness(vllm_vectors):
    case = next(c for c in vllm_vectors["cases"] if c["name"] == "load_stats_reduce_across_ranks")
    tokens = np.array(case["inputs"]["num_tokens_per_rank[layers,ranks]"], dtype=float)
    assert balancedness(tokens) == case["asserts"]["balancedness"]
    assert balancedness(np.zeros((2, 4))) == 0.0


def test_step_par_matches_a_direct_loop():
    rng = np.random.default_rng(0)
    t = Topology(4, 3)
    p = Placement(np.stack([rng.permutation(np.arange(12) % 10) for _ in range(3)]), 10, t)
    load = rng.integers(0, 50, size=(7, 3, 10))
    values, tokens = step_par(p, load)
    for s in range(7):
        for l in range(3):
            ranks = np.zeros(4)
            for slot, e in enumerate(p.phy2log[l]):
                ranks[slot // 3] += load[s, l, e] / p.replica_count[l, e]
            assert values[s, l] == pytest.approx(ranks.max() / ranks.mean())
            assert tokens[s, l] == pytest.approx(load[s, l].sum())


def test_summaries_are_token_weighted():
    values = np.array([1.0, 3.0])
    tokens = np.array([3.0, 1.0])
    s = summarize_par(values, tokens)
    assert s["par_mean"] == pytest.approx(1.5)
    assert s["par_max"] == 3.0
    assert weighted_quantile(values, tokens, 0.5) == 1.0
    assert weighted_quantile(values, tokens, 0.99) == 3.0


def test_par_of_empty_layer_is_one():
    assert par(np.zeros((2, 4))).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("bad, match", [
    (np.ones(5), "must be \\[layers, experts\\]"),
    (np.array([[1.0, np.nan]]), "nan at index \\(0, 1\\)"),
    (np.array([[[1, -2]]]), "negative load -2 at index \\(0, 0, 1\\) \\(step 0, layer 0, expert 1\\)"),
    (np.array([["a"]]), "must hold numbers"),
])
def test_bad_loads(bad, match):
    with pytest.raises(LoadError, match=match):
        as_load(bad)


def test_shape_mismatch_is_named():
    p = Placement.initial(8, Topology(2, 5), num_layers=2)
    with pytest.raises(LoadError, match="9 experts per layer, expected 8"):
        rank_loads(p, np.ones((2, 9)))
    with pytest.raises(LoadError, match="3 layers, expected 2"):
        rank_loads(p, np.ones((3, 8)))


def test_episodes_keep_the_latest_steps():
    load = np.arange(10)[:, None, None] * np.ones((1, 1, 2))
    ep = episodes(load, 3)
    assert ep[:, 0, 0].tolist() == [1 + 2 + 3, 4 + 5 + 6, 7 + 8 + 9]
