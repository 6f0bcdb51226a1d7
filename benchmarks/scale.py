"""Planner time at 1,024 ranks against DeepSeek-V3 size, and ``eplb simulate`` at 1,024 ranks (prints ONE JSON object).

Two sizes, measured in the same run, on windows of the built-in parametric ``default`` trace:

- ``large``: 100 layers x 1,024 experts on 1,024 ranks x 2 slots (204,800 slots), 128 nodes, 8 expert groups;
- ``dsv3``: DeepSeek-V3, 58 layers x 256 experts on 64 ranks x 5 slots (18,560 slots), 8 nodes, 8 expert groups.

Per policy and size, each policy in a process of its own (so that its peak memory is its own):

- ``first``: a first plan (no placement in force) from a 32-step window;
- ``in_force``: a re-plan of the next 32-step window with that plan in force (what a running cycle does; the
  figure the targets are about);
- for each, the minimum, median and every run's wall seconds over ``--repeats`` runs (after one call on 2 layers that
  compiles or loads the numba kernels), and the time per slot (median seconds over layers x slots);
- ``slot_time_ratio``: large over dsv3 per slot, re-plan in force (target <= 1.5);
- ``peak_rss_mb``: the process's peak resident memory (trace windows, interpreter and the policy's arrays).

Targets at the large size on this machine: a re-plan in force <= 1 s for ``default``, ``swift`` and ``auto``,
<= 5 s for ``flashlb``. With ``--simulate``: ``eplb simulate`` at the large size, 1,200 steps, ``default`` and ``auto``
(no clairvoyant run, one process), its wall seconds and peak memory (targets <= 120 s, <= 4 GB; the trace file is
written first, not timed). ``load_avg`` is the machine's 1-minute load average before and after: the machine is
shared, read the timings with it.

Usage: ``python benchmarks/scale.py [--policies default,swift,auto,flashlb] [--repeats 5] [--large-repeats N]
[--simulate]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"large": dict(layers=100, experts=1024, ranks=1024, slots=2, nodes=128),
         "dsv3": dict(layers=58, experts=256, ranks=64, slots=5, nodes=8)}
WINDOW = 32
SIMULATE_STEPS = 1200


def _timed(call, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        runs.append(time.perf_counter() - started)
    return {"median_s": round(statistics.median(runs), 4), "min_s": round(min(runs), 4),
            "runs_s": [round(r, 4) for r in runs]}


def one_policy(name: str, repeats: int, large_repeats: int) -> dict:
    """Every figure of one policy, in this process."""
    from eplb import Topology, get_policy
    from eplb.sim.traces import builtin_trace

    policy = get_policy(name)
    result = {}
    for size_name, size in SIZES.items():
        counts = builtin_trace("default", steps=2 * WINDOW, seed=0, num_layers=size["layers"],
                               num_experts=size["experts"]).counts
        topology = Topology(num_ranks=size["ranks"], slots_per_rank=size["slots"], num_nodes=size["nodes"],
                            num_groups=8)
        first, second = counts[:WINDOW], counts[WINDOW:]
        warm = policy.rebalance(first[:, :2], topology)  # compile / load the kernels, both paths
        policy.rebalance(second[:, :2], topology, warm.placement)
        in_force = policy.rebalance(first, topology).placement
        count = repeats if size_name == "dsv3" else large_repeats
        slots = size["layers"] * size["ranks"] * size["slots"]
        figures = {"first": _timed(lambda: policy.rebalance(first, topology), count),
                   "in_force": _timed(lambda: policy.rebalance(second, topology, in_force), count)}
        for figure in figures.values():
            figure["us_per_slot"] = round(figure["median_s"] / slots * 1e6, 4)
        result[size_name] = figures
    result["slot_time_ratio"] = round(result["large"]["in_force"]["us_per_slot"]
                                      / result["dsv3"]["in_force"]["us_per_slot"], 3)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def simulate_at_scale() -> dict:
    """``eplb simulate`` at the large size as a user runs it, in a child process: wall seconds and peak memory."""
    import numpy as np

    from eplb.sim.traces import builtin_trace

    size = SIZES["large"]
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.npz"
        np.savez(trace, counts=builtin_trace("default", steps=SIMULATE_STEPS, seed=0, num_layers=size["layers"],
                                             num_experts=size["experts"]).counts)
        command = [sys.executable, "-m", "eplb.cli", "simulate", "--trace", str(trace), "--ranks", str(size["ranks"]),
                   "--slots-per-rank", str(size["slots"]), "--policies", "default,auto", "--clairvoyant", "none",
                   "--jobs", "1", "--no-files", "--json"]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - started
    report = json.loads(done.stdout)
    return {"steps": SIMULATE_STEPS, "policies": ["default", "auto"], "wall_s": round(wall, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "step_par_mean": {name: round(figures["step_par_mean"], 4)
                              for name, figures in report["policies"].items()},
            "planner_ms": {name: round(figures["planner_ms"], 1) for name, figures in report["policies"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", default="default,swift,auto,flashlb")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--large-repeats", type=int, default=None, help="runs at the large size (default --repeats)")
    parser.add_argument("--simulate", action="store_true", help="also time eplb simulate at the large size")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    large_repeats = args.large_repeats or args.repeats
    if args.one:
        print(json.dumps(one_policy(args.one, args.repeats, large_repeats)))
        return
    out = {"window_steps": WINDOW, "load_avg_before": os.getloadavg()[0], "cpus": os.cpu_count(), "sizes": SIZES,
           "policies": {}}
    for name in args.policies.split(","):
        done = subprocess.run([sys.executable, __file__, "--one", name, "--repeats", str(args.repeats),
                               "--large-repeats", str(large_repeats)], capture_output=True, text=True, check=True)
        out["policies"][name] = json.loads(done.stdout)
    if args.simulate:
        out["simulate"] = simulate_at_scale()
    out["load_avg_after"] = os.getloadavg()[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
