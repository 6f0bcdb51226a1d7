"""Time eplb.metrics.step_par: a [5000, 58, 256] int32 load against a 58 x 320 placement (64 ranks x 5 slots).

Prints one JSON object; the goal is well under a second (median of --repeats runs).

    python benchmarks/metrics.py [--repeats 5] [--steps 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from eplb import Placement, Topology
from eplb.metrics import step_par, summarize_par


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5000)
    args = parser.parse_args()

    layers, experts = 58, 256
    topology = Topology(num_ranks=64, slots_per_rank=5, num_nodes=8, num_groups=8)
    rng = np.random.default_rng(0)
    placement = Placement(np.stack([rng.permutation(np.arange(topology.num_physical) % experts)
                                    for _ in range(layers)]), experts, topology)
    popularity = rng.lognormal(0.0, 1.0, size=(layers, experts))
    load = rng.poisson(popularity * 30, size=(args.steps, layers, experts)).astype(np.int32)

    step_par(placement, load[:10])  # warm-up: caches of the placement, first-touch of buffers
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        par, tokens = step_par(placement, load)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({
        "benchmark": "metrics.step_par",
        "load_shape": list(load.shape),
        "load_dtype": str(load.dtype),
        "placement": f"{layers} x {topology.num_physical} ({topology.num_ranks} ranks x {topology.slots_per_rank} slots)",
        "repeats": args.repeats,
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "par_mean": summarize_par(par, tokens)["par_mean"],
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],  # timings taken on a busy machine are not comparable
    }))


if __name__ == "__main__":
    main()
