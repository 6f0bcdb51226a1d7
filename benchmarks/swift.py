"""The ``swift`` policy on DeepSeek-V3 (58 layers x 256 experts) with the real SGLang loads, from each starting layout,
with vllm-ascend's rules and with ours.

Prints one JSON object. For each topology (EP32: 32 ranks x 9 slots on 4 nodes; EP64: 64 x 5 on 8 nodes), starting
layout (``vllm``: all redundant slots on the last ranks; ``spread``: one redundant slot per rank) and option set:

- ``par_before`` / ``par_same``: mean PAR over layers and the 12 workloads of the starting layout and of the plan made
  on workload ``w``, both scored on workload ``w``; ``par_cross``: the plan scored on every other workload;
- ``moved_per_layer`` (mean, min, max over layers and workloads) and ``relocated_per_layer``: slots that spreading the
  redundant slots rewrites before planning (home experts sent to another rank; part of the moved slots in every
  layer whose plan is accepted);
- ``place_ms``: median time of ``policy.place`` on the ``[58, 256]`` load over ``--repeats`` runs after a warm-up.

``first_call_ms`` is the first call in this process (numba kernels compiled, or loaded from the on-disk cache).

    python benchmarks/swift.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from eplb import Placement, Topology
from eplb.load import window_sum
from eplb.metrics import par, rank_loads
from eplb.policies._swift_prepare_kernels import prepare_layers
from eplb.policies.swift import SwiftPolicy

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "sglang_dsv3_ep_statistics.npz"
TOPOLOGIES = {
    "EP32": Topology(num_ranks=32, slots_per_rank=9, num_nodes=4, num_groups=8),
    "EP64": Topology(num_ranks=64, slots_per_rank=5, num_nodes=8, num_groups=8),
}
#: vllm-ascend's rules (the default), then ours with each of its options
OPTIONS = [{}, {"rules": "eplb"}, {"rules": "eplb", "pin": "replica"}, {"rules": "eplb", "intra_node": True},
           {"rules": "eplb", "spread": False}]


def relocated(current: Placement, load: np.ndarray, policy: SwiftPolicy) -> float:
    """Mean slots per layer that the spreading of redundant slots rewrites before planning."""
    topology = current.topology
    old = np.array(current.rank_table)
    if policy.intra_node:
        group_of_rank = np.array(topology.node_of_rank)
        group_start = np.arange(topology.num_nodes + 1) * topology.ranks_per_node
    else:
        group_of_rank = np.zeros(topology.num_ranks, dtype=np.int64)
        group_start = np.array([0, topology.num_ranks])
    repaired, base = prepare_layers(old, load.astype(np.float64), group_of_rank, group_start, policy.threshold,
                                    policy.spread)[:2]
    return float((base != repaired).sum(axis=(1, 2)).mean())


def bench(topology_name: str, layout: str, options: dict, counts: np.ndarray, repeats: int) -> dict:
    topology = TOPOLOGIES[topology_name]
    policy = SwiftPolicy(**options)
    num_workloads, num_layers, num_experts = counts.shape
    current = Placement.initial(num_experts, topology, num_layers, layout=layout)
    before, same, cross, moved, relocations = [], [], [], [], []
    for w in range(num_workloads):
        plan = policy.rebalance(counts[w], topology, current)
        before.append(plan.par_before.mean())
        same.append(plan.par_after.mean())
        cross += [par(rank_loads(plan.placement, counts[v])).mean() for v in range(num_workloads) if v != w]
        moved.append(plan.moved_slots)
        relocations.append(relocated(current, counts[w], policy))
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        policy.place(counts[r % num_workloads], topology, current, window_sum(counts[r % num_workloads]))
        times.append(1000 * (time.perf_counter() - start))
    moved = np.concatenate(moved)
    return {
        "topology": topology_name,
        "start": layout,
        "options": options,
        "par_before": round(statistics.mean(before), 4),
        "par_same": round(statistics.mean(same), 4),
        "par_cross": round(statistics.mean(cross), 4),
        "moved_per_layer": round(float(moved.mean()), 1),
        "moved_min": int(moved.min()),
        "moved_max": int(moved.max()),
        "relocated_per_layer": round(statistics.mean(relocations), 1),
        "place_ms": round(statistics.median(times), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of policy.place per case")
    args = parser.parse_args()
    with np.load(DATA) as f:
        counts = f["counts"]
    topology = TOPOLOGIES["EP32"]
    start = time.perf_counter()
    SwiftPolicy().place(counts[0], topology, Placement.initial(counts.shape[2], topology, counts.shape[1]),
                        window_sum(counts[0]))
    first_call_ms = 1000 * (time.perf_counter() - start)
    results = [bench(name, layout, options, counts, args.repeats)
               for name in TOPOLOGIES for layout in ("vllm", "spread") for options in OPTIONS]
    print(json.dumps({
        "benchmark": "swift",
        "model": "DeepSeek-V3: 58 layers x 256 experts",
        "load": DATA.name,
        "first_call_ms": round(first_call_ms, 1),
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],  # timings taken on a busy machine are not comparable
        "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
