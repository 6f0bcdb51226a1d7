"""Engine adapters: vLLM's policy class and vllm-ascend's rebalance_experts, for every registered policy."""

import json
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


_INERT = """
import json, sys
before = set(sys.modules)
from eplb.integrations.vllm import register
register()
loaded = sorted(set(sys.modules) - before)
foreign = [m for m in loaded if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != "eplb"]
eplb_modules = [m for m in loaded if m.split(".")[0] == "eplb"]
from eplb.integrations import vllm_policy
vllm_policy("auto").rebalance_experts([[5, 1, 1, 1]], 4, 1, 1, 2)  # the first plan loads the policy code
print(json.dumps([foreign, eplb_modules, "numba" in sys.modules]))
"""


@pytest.mark.parametrize("asked", [None, "auto", "3"])
def test_vllm_plugin_is_inert(asked, monkeypatch):
    """vLLM runs the plug-in in every process and its CPU platform then scans every loaded module (numba's objects
    break that scan): registering imports only the standard library and eplb's registry, asked or not; the policy
    code loads at the first plan."""
    monkeypatch.delenv("EPLB_VLLM_POLICY", raising=False)
    if asked is not None:
        monkeypatch.setenv("EPLB_VLLM_POLICY", asked)
        monkeypatch.setenv("EPLB_VLLM_POLICY_OPTIONS", '{"nope": 1}')  # option names are checked at the first plan
    out = subprocess.run([sys.executable, "-c", _INERT], capture_output=True, text=True, check=True)
    foreign, eplb_modules, numba_after_plan = json.loads(out.stdout)
    assert foreign == []
    assert eplb_modules == ["eplb", "eplb._lazy", "eplb.errors", "eplb.integrations", "eplb.integrations.vllm",
                            "eplb.policies"]
    assert numba_after_plan


def test_vllm_policy_class_is_named_as_eplbs():
    cls = vllm_policy(2)
    assert cls.__module__ == "eplb.integrations.vllm" and cls.__qualname__ == "EplbSwiftPolicy"
    assert repr(cls) == "<class 'eplb.integrations.vllm.EplbSwiftPolicy'>"
    assert cls.policy_name == "swift"


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


@pytest.mark.parametrize("name", POLICIES)
def test_vllm_adapter_empty_slots_and_elastic_ranks(name):
    """vLLM passes -1 for empty slots and, after an elastic scale-down, a map wider than num_replicas; the plan is a
    valid placement and every expert that stays on a rank keeps its slot."""
    cls = vllm_policy(name)
    rng = np.random.default_rng(2)
    weight = rng.zipf(1.5, size=(3, 16)).astype(np.int64)
    old = np.tile(np.arange(24) % 16, (3, 1))  # 4 ranks x 6 slots
    for replicas, ranks, given in [(24, 4, np.where(np.arange(24) >= 18, -1, old)),  # rank 3 newly added
                                   (18, 3, old),  # rank 3 removed: its experts 2..7 must be re-placed
                                   (30, 5, old)]:  # a fifth rank added, the map is narrower than num_replicas
        new = cls.rebalance_experts(weight, replicas, 1, 1, ranks, old_global_expert_indices=given)
        eplb.Placement(new, 16, eplb.Topology(ranks, replicas // ranks)).validate()
        fitted = np.full((3, replicas), -1)
        width = min(replicas, given.shape[1])
        fitted[:, :width] = given[:, :width]
        slots = replicas // ranks
        for layer in range(3):
            for rank in range(ranks):
                was, now = fitted[layer, rank * slots:(rank + 1) * slots], new[layer, rank * slots:(rank + 1) * slots]
                stay = sum(min((was == e).sum(), (now == e).sum()) for e in np.unique(now))
                assert (was == now).sum() == stay, (replicas, layer, rank)


def test_vllm_adapter_bad_engine_input_names_the_argument():
    cls = vllm_policy("default")
    weight = np.ones((2, 16))
    with pytest.raises(PolicyError, match="num_replicas=30 must be a multiple of num_ranks=4"):
        cls.rebalance_experts(weight, 30, 1, 1, 4)
    with pytest.raises(PolicyError, match="num_ranks=4 must be a multiple of num_nodes=3"):
        cls.rebalance_experts(weight, 32, 1, 3, 4)
    with pytest.raises(PolicyError, match="num_replicas=12 cannot hold the 16 experts"):
        cls.rebalance_experts(weight, 12, 1, 1, 4)
    with pytest.raises(PolicyError, match=r"old_global_expert_indices must be \[layers=2"):
        cls.rebalance_experts(weight, 32, 1, 1, 4, np.zeros((3, 32), dtype=np.int64))
    with pytest.raises(PolicyError, match=r"old_global_expert_indices\[0, 0\] = 16: expected an expert id"):
        cls.rebalance_experts(weight, 32, 1, 1, 4, np.full((2, 32), 16))


def test_vllm_plugin_hook_without_vllm(monkeypatch):
    from eplb.integrations.vllm import register

    monkeypatch.delenv("EPLB_VLLM_POLICY", raising=False)
    register()  # unset: nothing to do, vllm is not even imported
    monkeypatch.setenv("EPLB_VLLM_POLICY", "defualt")
    with pytest.raises(PolicyError, match="EPLB_VLLM_POLICY='defualt': unknown policy.*did you mean 'default'"):
        register()
    monkeypatch.setenv("EPLB_VLLM_POLICY", "7")
    with pytest.raises(PolicyError, match="EPLB_VLLM_POLICY='7': unknown policy '7'"):
        register()
    monkeypatch.setenv("EPLB_VLLM_POLICY", "random")
    monkeypatch.setenv("EPLB_VLLM_POLICY_OPTIONS", "[1]")
    with pytest.raises(PolicyError, match="must be a JSON object"):
        register()
    monkeypatch.setenv("EPLB_VLLM_POLICY_OPTIONS", "{seed: 1}")
    with pytest.raises(PolicyError, match="is not JSON"):
        register()
