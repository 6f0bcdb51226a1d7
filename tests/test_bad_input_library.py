"""Bad arguments to the library's public functions: each raises one ``EplbError`` subclass whose message names the
argument, the value and what was expected; never an AttributeError, TypeError or numpy's own error.

One case per line: the call, the error class, and the words the message must hold.
"""

import numpy as np
import pytest

import eplb
import eplb.policies
from eplb import LoadError, Placement, PlacementError, PolicyError, Topology, TopologyError, get_policy
from eplb import metrics
from eplb.policies.shared.resilience import Resilience

T = Topology(4, 5)
CURRENT = Placement.initial(16, T, 2)
LOAD = np.arange(32, dtype=np.int64).reshape(2, 16) * 10


def _rebalance(*args, **kwargs):
    return lambda name: get_policy(name).rebalance(*args, **kwargs)


# (id, call, error, words in the message)
LIBRARY_CASES = [
    # Topology
    ("topology-ranks-none", lambda: Topology(None, 5), TopologyError, ["num_ranks", "None", "integer"]),
    ("topology-ranks-str", lambda: Topology("4", 5), TopologyError, ["num_ranks", "'4'", "integer"]),
    ("topology-ranks-float", lambda: Topology(4.0, 5), TopologyError, ["num_ranks", "4.0", "integer"]),
    ("topology-ranks-bool", lambda: Topology(True, 5), TopologyError, ["num_ranks", "True", "integer"]),
    ("topology-ranks-negative", lambda: Topology(-1, 5), TopologyError, ["num_ranks", ">= 1", "-1"]),
    ("topology-slots-zero", lambda: Topology(4, 0), TopologyError, ["slots_per_rank", ">= 1", "0"]),
    ("topology-nodes-not-dividing", lambda: Topology(4, 5, 3), TopologyError, ["num_ranks=4", "num_nodes=3"]),
    ("topology-groups-none", lambda: Topology(4, 5, 1, None), TopologyError, ["num_groups", "None"]),
    ("from-redundant-negative", lambda: Topology.from_redundant(4, 16, -1), TopologyError,
     ["num_redundant", ">= 0", "-1"]),
    ("from-redundant-none", lambda: Topology.from_redundant(4, 16, None), TopologyError, ["num_redundant", "None"]),
    ("from-redundant-indivisible", lambda: Topology.from_redundant(4, 16, 1), TopologyError,
     ["(16 + 1) % 4", "= 1"]),
    ("check-experts-none", lambda: T.check_experts(None), TopologyError, ["num_experts", "None"]),
    ("check-experts-too-many", lambda: T.check_experts(21), TopologyError, ["21 logical experts", "20 physical"]),
    # Placement
    ("placement-topology-none", lambda: Placement(CURRENT.phy2log, 16, None), TopologyError,
     ["topology", "eplb.Topology", "None"]),
    ("placement-topology-str", lambda: Placement(CURRENT.phy2log, 16, "4x5"), TopologyError,
     ["topology", "eplb.Topology", "'4x5'"]),
    ("placement-experts-none", lambda: Placement(CURRENT.phy2log, None, T), TopologyError, ["num_experts", "None"]),
    ("placement-experts-negative", lambda: Placement(CURRENT.phy2log, -3, T), TopologyError,
     ["num_experts", ">= 1", "-3"]),
    ("placement-experts-float", lambda: Placement(CURRENT.phy2log, 16.5, T), TopologyError,
     ["num_experts", "16.5"]),
    ("placement-phy2log-none", lambda: Placement(None, 16, T), PlacementError, ["phy2log", "array"]),
    ("placement-phy2log-text", lambda: Placement("abc", 16, T), PlacementError, ["phy2log", "integers"]),
    ("placement-phy2log-nan", lambda: Placement(np.full((1, 20), np.nan), 16, T), PlacementError,
     ["phy2log", "integers", "nan"]),
    ("placement-phy2log-3d", lambda: Placement(np.zeros((2, 2, 20), int), 16, T), PlacementError,
     ["phy2log", "2-D", "(2, 2, 20)"]),
    ("placement-phy2log-wrong-slots", lambda: Placement(np.arange(288) % 16, 16, T), PlacementError,
     ["288 slots", "expected 20"]),
    ("placement-phy2log-out-of-range", lambda: Placement(np.arange(20) % 17, 16, T), PlacementError,
     ["expert id 16", "[0, 16)"]),
    ("placement-missing-expert", lambda: Placement(np.zeros(20, int), 16, T), PlacementError,
     ["expert 1 has no replica"]),
    ("initial-topology-none", lambda: Placement.initial(16, None), TopologyError, ["topology", "None"]),
    ("initial-layers-zero", lambda: Placement.initial(16, T, 0), PlacementError, ["num_layers", ">= 1", "0"]),
    ("initial-layers-text", lambda: Placement.initial(16, T, "a"), PlacementError, ["num_layers", "'a'"]),
    ("initial-layout", lambda: Placement.initial(16, T, 1, layout="round"), PlacementError,
     ["layout", "vllm, ascend, spread", "'round'"]),
    ("rank-table-negative", lambda: Placement.from_rank_table([[-1, 0]]), PlacementError, ["expert id -1"]),
    ("expert-map-rank-text", lambda: CURRENT.expert_map("a"), PlacementError, ["rank", "integer", "'a'"]),
    ("expert-map-rank-out-of-range", lambda: CURRENT.expert_map(9), PlacementError, ["rank", "[0, 4)", "9"]),
    ("log2phy-tp-zero", lambda: CURRENT.log2phy_for_rank(0, 0), PlacementError, ["tp_size", ">= 1", "0"]),
    ("log2phy-tp-text", lambda: CURRENT.log2phy_for_rank(0, "2"), PlacementError, ["tp_size", "'2'"]),
    ("without-ranks-none", lambda: CURRENT.without_ranks(None), PlacementError, ["failed ranks", "None"]),
    ("without-ranks-out-of-range", lambda: CURRENT.without_ranks([9]), PlacementError,
     ["failed ranks", "rank 9", "[0, 4)"]),
    ("without-ranks-mask-length", lambda: CURRENT.without_ranks(np.ones(3, bool)), PlacementError,
     ["one entry per rank (4)", "(3,)"]),
    ("moves-to-none", lambda: CURRENT.moves_to(None), PlacementError, ["placement", "NoneType"]),
    ("replace-layers-out-of-range", lambda: CURRENT.replace_layers([5], CURRENT), PlacementError,
     ["layers", "[0, 2)", "[5]"]),
    # get_policy and policy options
    ("policy-unknown", lambda: get_policy("balanced"), PolicyError, ["unknown policy 'balanced'", "auto"]),
    ("policy-none", lambda: get_policy(None), PolicyError, ["unknown policy 'None'"]),
    ("policy-id", lambda: get_policy(99), PolicyError, ["policy id", "99", "[0, 1, 2, 3]"]),
    ("policy-option-typo", lambda: get_policy("swift", treshold=1.1), PolicyError,
     ["no option 'treshold'", "did you mean 'threshold'"]),
    ("policy-option-bool-text", lambda: get_policy("default", allow_shared_rank="false"), PolicyError,
     ["allow_shared_rank", "true or false", "'false'"]),
    ("policy-option-swift-flag", lambda: get_policy("swift", intra_node=1), PolicyError,
     ["intra_node", "true or false", "1"]),
    ("policy-option-number-text", lambda: get_policy("swift", threshold="x"), PolicyError, ["threshold", "'x'"]),
    ("policy-options-unknown", lambda: eplb.policies.policy_options("swfit"), PolicyError,
     ["unknown policy 'swfit'", "did you mean 'swift'"]),
    ("policy-option-random-seed", lambda: get_policy("random", seed="x"), PolicyError, ["seed", "integer", "'x'"]),
    ("policy-option-random-moves", lambda: get_policy("random", num_moves=-1), PolicyError,
     ["num_moves", ">= 0", "-1"]),
    ("policy-option-flashlb-balance", lambda: get_policy("flashlb", last_balance="x"), PolicyError,
     ["last_balance", "numbers"]),
    ("policy-option-auto-dispatch", lambda: get_policy("auto", dispatch=["even"]), PolicyError,
     ["dispatch", "even", "['even']"]),
    ("resilience-min-replicas", lambda: Resilience(min_replicas=0), PolicyError, ["min_replicas", ">= 1", "0"]),
    # eplb.rebalance_experts (DeepSeek's drop-in)
    ("rebalance-experts-weight-none", lambda: eplb.rebalance_experts(None, 20, 1, 1, 4), LoadError,
     ["weight", "array"]),
    ("rebalance-experts-weight-nan", lambda: eplb.rebalance_experts(np.full((2, 16), np.nan), 20, 1, 1, 4),
     LoadError, ["weight", "nan", "finite"]),
    ("rebalance-experts-weight-negative", lambda: eplb.rebalance_experts(-np.ones((2, 16)), 20, 1, 1, 4),
     LoadError, ["weight", "negative", ">= 0"]),
    ("rebalance-experts-weight-1d", lambda: eplb.rebalance_experts(np.ones(16), 20, 1, 1, 4), LoadError,
     ["weight", "(16,)"]),
    ("rebalance-experts-replicas-none", lambda: eplb.rebalance_experts(LOAD, None, 1, 1, 4), PolicyError,
     ["num_replicas", "None", "integer"]),
    ("rebalance-experts-replicas-text", lambda: eplb.rebalance_experts(LOAD, "20", 1, 1, 4), PolicyError,
     ["num_replicas", "'20'"]),
    ("rebalance-experts-replicas-indivisible", lambda: eplb.rebalance_experts(LOAD, 21, 1, 1, 4), PolicyError,
     ["num_replicas=21", "num_gpus=4"]),
    ("rebalance-experts-gpus-zero", lambda: eplb.rebalance_experts(LOAD, 20, 1, 1, 0), PolicyError,
     ["num_gpus", ">= 1", "0"]),
    ("rebalance-experts-groups-negative", lambda: eplb.rebalance_experts(LOAD, 20, -2, 1, 4), PolicyError,
     ["num_groups", ">= 1", "-2"]),
    # metrics
    ("rank-loads-placement-none", lambda: metrics.rank_loads(None, LOAD), PlacementError,
     ["placement", "eplb.Placement", "None"]),
    ("rank-loads-wrong-experts", lambda: metrics.rank_loads(CURRENT, np.ones((2, 8))), LoadError,
     ["8 experts", "expected 16"]),
    ("rank-loads-wrong-layers", lambda: metrics.rank_loads(CURRENT, np.ones((3, 16))), LoadError,
     ["3 layers", "expected 2"]),
    ("rank-loads-nan", lambda: metrics.rank_loads(CURRENT, np.full((2, 16), np.nan)), LoadError, ["nan", "finite"]),
    ("rank-share-placement-array", lambda: metrics.rank_share(CURRENT.phy2log), PlacementError,
     ["placement", "eplb.Placement", "ndarray"]),
    ("step-par-placement-none", lambda: metrics.step_par(None, LOAD), PlacementError, ["placement", "None"]),
    ("par-none", lambda: metrics.par(None), LoadError, ["loads", "array"]),
    ("par-empty", lambda: metrics.par([]), LoadError, ["loads", "at least one rank", "(0,)"]),
    ("par-scalar", lambda: metrics.par(3.0), LoadError, ["loads", "[..., ranks]", "()"]),
    ("par-nan", lambda: metrics.par([np.nan, 1.0]), LoadError, ["loads", "nan", "finite and >= 0"]),
    ("par-negative", lambda: metrics.par([[1.0, -2.0]]), LoadError, ["loads", "-2.0", "(0, 1)"]),
    ("par-text", lambda: metrics.par(["a", "b"]), LoadError, ["loads", "numbers"]),
    ("balancedness-empty", lambda: metrics.balancedness([]), LoadError, ["loads", "at least one rank"]),
    ("balancedness-inf", lambda: metrics.balancedness([[np.inf, 1.0]]), LoadError, ["loads", "inf"]),
    ("quantile-q", lambda: metrics.weighted_quantile([1, 2], [1, 1], 2), LoadError, ["q", "[0, 1]", "2"]),
    ("quantile-shapes", lambda: metrics.weighted_quantile([1, 2], [1, 1, 1], 0.5), LoadError,
     ["values and weights", "(2,)", "(3,)"]),
    ("quantile-negative-weight", lambda: metrics.weighted_quantile([1, 2], [-1, 1], 0.5), LoadError,
     ["weights", ">= 0", "-1"]),
    ("summarize-shapes", lambda: metrics.summarize_par([1.0, 2.0], [1.0]), LoadError,
     ["par_values and tokens", "(2,)", "(1,)"]),
    ("moved-slots-none", lambda: metrics.moved_slots(None, CURRENT), PlacementError, ["old", "eplb.Placement"]),
]

# Policy.rebalance, checked for every registered policy
REBALANCE_CASES = [
    ("topology-none", _rebalance(LOAD, None), TopologyError, ["topology", "eplb.Topology", "None"]),
    ("topology-tuple", _rebalance(LOAD, (4, 5)), TopologyError, ["topology", "eplb.Topology", "(4, 5)"]),
    ("load-none", _rebalance(None, T), LoadError, ["load", "array"]),
    ("load-text", _rebalance("load", T), LoadError, ["load", "numbers"]),
    ("load-nan", _rebalance(np.full((2, 16), np.nan), T), LoadError, ["load", "nan", "finite"]),
    ("load-negative", _rebalance(-LOAD, T), LoadError, ["load", "negative", "layer 0, expert 1", ">= 0"]),
    ("load-1d", _rebalance(np.ones(16), T), LoadError, ["load", "[layers, experts]", "(16,)"]),
    ("load-4d", _rebalance(np.ones((1, 1, 2, 16)), T), LoadError, ["load", "(1, 1, 2, 16)"]),
    ("load-no-layers", _rebalance(np.ones((0, 16)), T), LoadError, ["load is empty", "[0, 16]", "at least one layer"]),
    ("load-no-experts", _rebalance(np.ones((2, 0)), T), LoadError, ["load is empty", "[2, 0] (layers, experts)", "one expert"]),
    ("load-bool", _rebalance(np.ones((2, 16), bool), T), LoadError, ["load", "numbers", "bool"]),
    ("load-ragged", _rebalance([[1, 2], [3]], T), LoadError, ["load", "rectangular"]),
    ("load-too-many-experts", _rebalance(np.ones((2, 32)), T), TopologyError, ["32 logical experts", "20 physical"]),
    ("current-text", _rebalance(LOAD, T, current="map.json"), PlacementError, ["phy2log", "integers"]),
    ("current-layers", _rebalance(LOAD, T, current=CURRENT.phy2log[0]), PolicyError,
     ["current placement has 1 layers", "2 layers"]),
    ("current-other-topology", _rebalance(LOAD, T, current=Placement.initial(16, Topology(5, 4), 2)), PolicyError,
     ["current placement is for 5 ranks", "4 ranks"]),
    ("live-ranks-int", _rebalance(LOAD, T, live_ranks=5), PlacementError, ["live ranks", "rank ids", "5"]),
    ("live-ranks-none-live", _rebalance(LOAD, T, live_ranks=[]), PlacementError, ["live ranks", "no rank of 4"]),
    ("live-ranks-out-of-range", _rebalance(LOAD, T, live_ranks=[0, 7]), PlacementError, ["rank 7", "[0, 4)"]),
    ("resilience-text", _rebalance(LOAD, T, resilience="spread"), PolicyError,
     ["resilience", "Resilience", "'spread'"]),
]


def _check(call, error, words):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize("call, error, words", [c[1:] for c in LIBRARY_CASES], ids=[c[0] for c in LIBRARY_CASES])
def test_library_bad_input(call, error, words):
    _check(call, error, words)


@pytest.mark.parametrize("name", eplb.available_policies())
@pytest.mark.parametrize("call, error, words", [c[1:] for c in REBALANCE_CASES], ids=[c[0] for c in REBALANCE_CASES])
def test_rebalance_bad_input(name, call, error, words):
    _check(lambda: call(name), error, words)


def test_every_error_is_an_eplb_error_and_a_value_error():
    for error in (LoadError, PlacementError, PolicyError, TopologyError):
        assert issubclass(error, eplb.EplbError) and issubclass(error, ValueError)


def test_a_torch_load_with_nan_is_a_load_error():
    torch = pytest.importorskip("torch")
    load = torch.ones(2, 16)
    load[1, 3] = float("nan")
    _check(lambda: get_policy("auto").rebalance(load, T), LoadError, ["load", "nan", "(1, 3)"])
    _check(lambda: eplb.rebalance_experts(load, 20, 1, 1, 4), LoadError, ["weight", "nan"])
