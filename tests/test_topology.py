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
        if "error" in case:
            # The vector's own inputs (8 + 1) % 3 == 0 do not trip the rule its message states; check the rule.
            assert "(n_expert + n_redundant) % ep_size must be 0" in case["error"]
            continue
        t = Topology.from_redundant(case["ep_size"], case["num_experts"], case["num_redundant"])
        assert t.slots_per_rank == len(case["placement"][0])
    with pytest.raises(TopologyError, match=r"\(num_experts \+ num_redundant\) % num_ranks must be 0: \(8 \+ 2\) % 3 = 1"):
        Topology.from_redundant(3, 8, 2)


def test_check_experts():
    t = Topology(4, 2, num_groups=3)
    with pytest.raises(TopologyError, match="do not fit"):
        t.check_experts(9)
    with pytest.raises(TopologyError, match="not divisible by num_groups=3"):
        t.check_experts(8)
    Topology(4, 2).check_experts(8)
    assert np.all(t.rank_of_slot.reshape(4, 2) == np.arange(4)[:, None])
