"""The ``balanced`` split on real DeepSeek-V3 loads: its cost per layer and its distance from the exact optimum.

Prints one JSON object. For DeepSeek-V3 EP32 (32 ranks x 9 slots) and EP64 (64 ranks x 5 slots), a ``default``
plan of the real SGLang loads (``tests/data``) on 58 layers x 256 experts, and per-step loads of the ``bursty``
trace drawn from the same real workloads:

- ``route_us``: one balanced route of one layer (``--tokens`` tokens x top-8 on this rank) on CPU, one thread,
  median: ``device`` the router as it runs (the torch split, no host copy) and ``host`` the route with the split
  computed on the host by the compiled numpy reference (the old way: copy the counts to the host, split, upload);
- ``split_us``: the split alone, torch (``device``) and the compiled reference (``host``);
- ``ops_per_route``: torch ops one balanced route launches (a GPU launches a kernel for nearly each);
- ``peak_excess``: the busiest rank's load over the exact min-max optimum (:func:`eplb.dispatch.optimal_peak`,
  HiGHS) minus 1, mean and max over ``--steps`` steps of every layer, for the split of
  :data:`eplb.dispatch.BALANCED_PASSES` passes (the router's), and for other pass counts: 0 (the even split in
  whole tokens), 4, 8, 16, 24 and 200 (converged).

    python benchmarks/dispatch.py [--tokens 256] [--steps 4] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from eplb import Topology, get_policy
from eplb.dispatch import BALANCED_PASSES, balanced_rank_load, balanced_replica_load, optimal_peak, replica_ranks
from eplb.runtime.router import ReplicaRouter
from eplb.sim.traces import builtin_trace, real_regimes

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "sglang_dsv3_ep_statistics.npz"
TOPOLOGIES = {"EP32": Topology(32, 9, num_nodes=4, num_groups=8), "EP64": Topology(64, 5, num_nodes=8, num_groups=8)}
TOP_K = 8


def median_us(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e6, 1)


def host_split(router: ReplicaRouter, layer: int, total: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """The split by the compiled numpy reference, with the router's prebuilt schedule."""
    schedule = router.split_schedule[layer:layer + 1].numpy()
    return balanced_replica_load(total[None], ranks[None], router.topology.num_ranks, schedule=schedule)[0][0]


def host_route(router: ReplicaRouter, layer: int, ids: torch.Tensor, group_counts: torch.Tensor, ranks) -> None:
    """The route with the split on the host: what the router did before the device split (one host copy)."""
    counts = group_counts.cpu().numpy()
    split = torch.as_tensor(host_split(router, layer, counts.sum(0), ranks))
    bounds = split.cumsum(1)
    flat = ids.reshape(-1)
    offset = group_counts[:router.rank].sum(0)
    order = torch.sort(flat, stable=True).indices
    sorted_ids = flat[order]
    occurrence = torch.empty_like(flat)
    occurrence[order] = torch.arange(flat.numel()) - torch.searchsorted(sorted_ids, sorted_ids)
    replica = ((offset[flat] + occurrence)[:, None] >= bounds[flat]).sum(1).clamp_(max=bounds.shape[1] - 1)
    router.replica_slot[layer][flat, replica]


def ops_per_route(router: ReplicaRouter, ids: torch.Tensor, group_counts: torch.Tensor) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        router.route(0, ids, group_counts)
    return sum(1 for event in prof.events() if event.cpu_parent is None and event.name.startswith("aten::"))


def measure(name: str, topology: Topology, real: np.ndarray, trace, args) -> dict:
    plan = get_policy("default").rebalance(real, topology).placement
    num_ranks = topology.num_ranks
    rng = np.random.default_rng(0)
    layer = 0
    p = real[:, layer].sum(0) / real[:, layer].sum()
    ids = torch.as_tensor(np.stack([rng.choice(real.shape[2], TOP_K, replace=False, p=p) for _ in range(args.tokens)]))
    group_counts = torch.as_tensor(rng.multinomial(args.tokens * TOP_K, p, size=num_ranks))
    rank = 5
    group_counts[rank] = torch.bincount(ids.reshape(-1), minlength=real.shape[2])
    router = ReplicaRouter(plan, rank, "balanced")
    ranks = replica_ranks(plan)[layer]
    total = group_counts.sum(0)
    out = {
        "route_us": {"device": median_us(lambda: router.route(layer, ids, group_counts), args.repeats),
                     "host": median_us(lambda: host_route(router, layer, ids, group_counts, ranks), args.repeats)},
        "split_us": {"device": median_us(lambda: router.replica_split(layer, total), args.repeats),
                     "host": median_us(lambda: host_split(router, layer, total.numpy(), ranks), args.repeats)},
        "ops_per_route": ops_per_route(router, ids, group_counts),
    }
    table = replica_ranks(plan)
    excess: dict = {passes: [] for passes in (0, 4, 8, BALANCED_PASSES, 16, 24, 200)}
    for layer in range(plan.num_layers):
        load = trace.counts[:args.steps, layer]
        optimum = np.array([optimal_peak(row, table[layer], num_ranks) for row in load])
        for passes in excess:
            peak = balanced_rank_load(load, table[layer][None], num_ranks, passes=passes).max(axis=1)
            excess[passes].append(peak / optimum - 1)
    out["peak_excess"] = {f"passes_{passes}": {"mean": round(float(np.mean(values)), 5),
                                               "max": round(float(np.max(values)), 5)}
                          for passes, values in excess.items()}
    out["tokens_per_expert_per_step"] = round(float(trace.counts[:args.steps].mean()), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="tokens per rank per step (route timing)")
    parser.add_argument("--steps", type=int, default=4, help="trace steps per layer scored against the optimum")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", action="store_true", help="print one JSON object (the only output format)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    real = np.load(DATA)["counts"].astype(np.float64)  # [workloads, 58, 256]
    trace = builtin_trace("bursty", steps=args.steps, seed=0, regimes=real_regimes(DATA))
    out = {"passes": BALANCED_PASSES, "layers": real.shape[1], "experts": real.shape[2], "tokens": args.tokens,
           "threads": 1}
    for name, topology in TOPOLOGIES.items():
        out[name] = measure(name, topology, real, trace, args)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
