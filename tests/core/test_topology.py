import numpy as np
import pytest

from eplb import Topology, TopologyError


def test_derived_sizes():
    t = Topology(32, 9, num_nodes=4, num_groups=8)
    assert t.num_physical == 288
    assert t.ranks_per_node == 8
    assert t.rank_of_slot[0] == 0 and t.rank_of_slot[287] == 31 and t.rank_of_slot[9] == 1
    assert list(t.node_of_rank[[0, 7, 8, 31]]) == [0, 0, 1, 3]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_ranks=6, slots_per_rank=2, num_nodes=4), "num_ranks=6 is not divisible by num_nodes=4"),
    (dict(num_ranks=0, slots_per_rank=2), "num_ranks must be >= 1, got 0"),
    (dict(num_ranks=2, slots_per_rank=1.5), "slots_per_rank must be an integer"),
])
def test_bad_topology(kwargs, match):
    with pytest.raises(TopologyError, match=match):
        Topology(**kwargs)


def test_from_redundant(ascend_vectors):
    for case in ascend_vectors["default_initial_placement"]:
        t = Topology.from_redundant(case["ep_size"], case["num_experts"], case["num_redundant"])
        if "error" in case:
            # The vector records vllm-ascend's error "(n_expert + n_redundant) % ep_size must be 0" for 8 experts and 1
            # redundant on 3 ranks, but the rule holds for those inputs ((8 + 1) % 3 == 0): vllm-ascend's own check,
            # generate_global_placement, accepts them, and so does eplb (3 slots per rank).
            assert (case["num_experts"], case["num_redundant"], case["ep_size"]) == (8, 1, 3)
            assert t.slots_per_rank == 3
            continue
        assert t.slots_per_rank == len(case["placement"][0])
    with pytest.raises(TopologyError,
                       match=r"\(num_experts \+ num_redundant\) % num_ranks must be 0: \(8 \+ 2\) % 3 = 1"):
        Topology.from_redundant(3, 8, 2)


def test_from_redundant_follows_the_rule_on_every_small_size():
    """Brute force against vllm-ascend's rule, written out: accepted exactly when (E + R) % W == 0, with
    K = (E + R) / W slots per rank."""
    for ranks in range(1, 7):
        for experts in range(1, 10):
            for redundant in range(0, 7):
                total = experts + redundant
                if total % ranks:
                    message = rf"\({experts} \+ {redundant}\) % {ranks} = {total % ranks}"
                    with pytest.raises(TopologyError, match=message):
                        Topology.from_redundant(ranks, experts, redundant)
                else:
                    t = Topology.from_redundant(ranks, experts, redundant)
                    assert (t.num_ranks, t.slots_per_rank) == (ranks, total // ranks)


def test_check_experts():
    t = Topology(4, 2, num_groups=3)
    with pytest.raises(TopologyError, match="do not fit"):
        t.check_experts(9)
    with pytest.raises(TopologyError, match="not divisible by num_groups=3"):
        t.check_experts(8)
    Topology(4, 2).check_experts(8)
    assert np.all(t.rank_of_slot.reshape(4, 2) == np.arange(4)[:, None])
