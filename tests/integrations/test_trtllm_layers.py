"""TensorRT-LLM keys both its expert statistics and its load-balancer config by the MoE module's ``layer_idx`` (the
model's layer index: DeepSeek-V3's MoE layers are 3..60), and looks a layer up by that key
(``MoeLoadBalancerConfig.get_layer_initial_global_assignments(layer_idx)``). A plan made from a statistics folder must
come back under the same keys."""

from __future__ import annotations

import json

import numpy as np
import yaml

import eplb
from eplb.formats import read_load, read_map, write_map


def test_a_plan_from_statistics_keeps_tensorrt_llms_layer_keys(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    moe_layers, experts, ranks, slots = [3, 4, 5], 16, 4, 5
    loads = {layer: rng.zipf(1.4, size=experts).clip(max=10**4).astype(np.int64) * (layer + 1) for layer in moe_layers}
    folder = tmp_path / "expert_statistic"
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": experts, "num_experts_per_token": 2}))
    save_file({f"100_{layer}": load for layer, load in loads.items()}, str(folder / "rank0.safetensors"))

    load = read_load(folder)
    assert load.shape == (1, 6, experts) and not load[:, :3].any()
    plan = eplb.get_policy("default").rebalance(load, eplb.Topology(ranks, slots))
    write_map(plan.placement, tmp_path / "lb.yaml", format="trtllm")
    config = yaml.safe_load((tmp_path / "lb.yaml").read_text())
    for layer in moe_layers:  # what TensorRT-LLM's MoE layer `layer_idx` fetches, and the checks it makes on it
        row = config["initial_global_assignments"][layer]
        assert len(row) == config["num_slots"] == ranks * slots and set(row) == set(range(experts))
        alone = eplb.get_policy("default").rebalance(loads[layer][None], eplb.Topology(ranks, slots))
        assert row == alone.placement.phy2log[0].tolist()  # planned on that layer's own load
    assert np.array_equal(read_map(tmp_path / "lb.yaml").phy2log, plan.placement.phy2log)
