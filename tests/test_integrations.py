"""Engine adapters: vLLM's policy class and vllm-ascend's rebalance_experts, for every registered policy."""

import subprocess
import sys

import numpy as np
import pytest

import eplb
from eplb import LoadError, PlacementError, PolicyError
from eplb.integrations import AscendPolicy, VllmPolicy, rebalance_experts, vllm_policy
from eplb.integrations.vllm_ascend import logical_load

POLICIES = eplb.available_policies()


def test_no_engine_imported_at_load():
    code = ("import sys, eplb.integrations; "
            "print(any(m in sys.modules for m in ('torch', 'vllm', 'vllm_ascend', 'torch_npu')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_logical_load_folds_replicas():
    table = np.array([[[0, 1], [2, 0]]])  # expert 0 twice
    workload = np.array([[[5, 1], [2, 7]]])
    assert logical_load(table, workload, 3).tolist() == [[12, 1, 2]]
    steps = np.stack([workload, 2 * workload])
    assert logical_load(table, steps, 3).tolist() == [[[12, 1, 2]], [[24, 2, 4]]]


def _ascend_problem(seed=0, layers=3, ranks=4, slots=3, experts=10):
    rng = np.random.default_rng(seed)
    table = (np.arange(ranks * slots) % experts)[None].repeat(layers, 0).reshape(layers, ranks, slots)
    workload = rng.zipf(1.5, size=(layers, ranks, slots)).astype(np.int64)
    return table, workload


@pytest.mark.parametrize("name", POLICIES)
def test_ascend_adapter_every_policy(name):
    table, workload = _ascend_problem()
    changed, priority, new_table = AscendPolicy(name).rebalance_experts(table, workload)
    assert changed in (0, 1)
    assert sorted(priority.tolist()) == [0, 1, 2]
    assert new_table.shape == table.shape
    placement = eplb.Placement(new_table.reshape(3, -1), 10, eplb.Topology(4, 3))
    assert changed == int((placement.phy2log != table.reshape(3, -1)).any())
    per_step = np.stack([workload, workload])
    again = AscendPolicy(name).rebalance_experts(table, per_step)
    assert again[2].shape == table.shape


def test_ascend_adapter_priority_and_torch():
    torch = pytest.importorskip("torch")
    table, workload = _ascend_problem(layers=4)
    workload[1] = 10  # layer 1 is balanced and has nothing to gain: it comes last
    changed, priority, new_table = rebalance_experts(torch.tensor(table), torch.tensor(workload), policy=1)
    assert isinstance(new_table, torch.Tensor) and new_table.shape == table.shape
    policy = eplb.get_policy("default", allow_shared_rank=False)  # vllm-ascend forbids an expert twice on a rank
    plan = policy.rebalance(logical_load(table, workload, 10), eplb.Topology(4, 3), table.reshape(4, -1))
    assert np.array_equal(new_table.numpy(), plan.placement.rank_table)
    assert not plan.placement.problems(allow_shared_rank=False)
    assert changed == 1 and priority[-1] == 1
    gain = (plan.par_before - plan.par_after)[priority[:-1]]
    assert (np.diff(gain) <= 0).all()


def test_ascend_adapter_errors():
    table, workload = _ascend_problem()
    with pytest.raises(LoadError, match="expert_workload must be"):
        rebalance_experts(table, workload[:, :2])
    with pytest.raises(LoadError, match="negative"):
        rebalance_experts(table, -workload)
    with pytest.raises(PlacementError, match="current_expert_table must be"):
        rebalance_experts(table[0], workload)
    with pytest.raises(PolicyError, match="unknown policy"):
        AscendPolicy("nope")


@pytest.mark.parametrize("name", POLICIES)
def test_vllm_adapter_every_policy(name):
    cls = vllm_policy(name)
    assert issubclass(cls, VllmPolicy)
    rng = np.random.default_rng(1)
    weight = rng.integers(0, 1000, size=(3, 16))
    phy2log = cls.rebalance_experts(weight, 24, 4, 2, 4)
    eplb.Placement(phy2log, 16, eplb.Topology(4, 6))
    old = np.tile(np.arange(24) % 16, (3, 1))
    again = cls.rebalance_experts(weight, 24, 4, 2, 4, old_global_expert_indices=old)
    assert again.shape == (3, 24)
    assert np.array_equal(again, cls.rebalance_experts(weight, 24, 4, 2, 4, old_global_expert_indices=old))


def test_vllm_default_is_deepseek(vllm_vectors):
    torch = pytest.importorskip("torch")
    cases = [c for c in vllm_vectors["cases"] if "deepseek_torch" in c]
    for case in cases:
        i = case["inputs"]
        out = VllmPolicy.rebalance_experts(torch.tensor(i["weight"]), i["num_replicas"], i["num_groups"],
                                           i["num_nodes"], i["num_ranks"])
        assert isinstance(out, torch.Tensor)
        assert out.tolist() == case["deepseek_torch"]["phy2log"], case["name"]


def test_vllm_adapter_errors():
    with pytest.raises(PolicyError, match="multiple of num_ranks"):
        VllmPolicy.rebalance_experts(np.ones((1, 4)), 7, 1, 1, 4)
    with pytest.raises(PolicyError, match="has no option"):
        vllm_policy("default", nope=1)
    seeded = vllm_policy("random", seed=3)
    assert seeded.policy_options == {"seed": 3}
