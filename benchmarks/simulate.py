"""Timings of the simulator (prints JSON).

- ``deepseek_v3``: 58 layers x 256 experts, EP64 with 320 slots (5 per rank), 5,000 steps of the built-in default
  dynamics, one policy (``default``): trace generation and simulation, target <= 120 s in all.
- ``builtin_default``: ``eplb simulate --json`` as a user runs it (a fresh process: imports, trace, static, every
  available policy, the clairvoyant floor, report files), target <= 60 s.

Usage: ``python benchmarks/simulate.py [--repeat N] [--skip-cli]``. The figures are medians of ``N`` runs; the
numba caches are warmed by one untimed CLI run first, so JIT compilation is not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time


def deepseek_v3(steps: int) -> dict:
    import eplb
    from eplb.cycle import CycleConfig
    from eplb.sim.simulator import SimConfig, simulate
    from eplb.sim.traces import builtin_trace

    started = time.perf_counter()
    trace = builtin_trace("default", steps=steps, seed=0)
    generated = time.perf_counter()
    topology = eplb.Topology(num_ranks=64, slots_per_rank=5, num_nodes=8, num_groups=8)
    config = SimConfig(topology, CycleConfig(cycle_steps=100, planner_steps=10))
    result = simulate(trace, eplb.get_policy("default"), config)
    done = time.perf_counter()
    summary = result.summary()
    return {"trace_s": generated - started, "simulate_s": done - generated, "total_s": done - started,
            "planner_s": sum(result.planner_ms) / 1e3, "cycles": summary["cycles"],
            "step_par_mean": summary["step_par_mean"]}


def cli(out_dir: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "eplb.cli", "simulate", "--json", "--out", out_dir], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--skip-cli", action="store_true")
    args = parser.parse_args()
    runs = [deepseek_v3(args.steps) for _ in range(args.repeat)]
    out = {"deepseek_v3": {key: statistics.median(r[key] for r in runs) for key in runs[0]},
           "deepseek_v3_runs_total_s": [round(r["total_s"], 2) for r in runs]}
    out["deepseek_v3"]["steps"] = args.steps
    if not args.skip_cli:
        with tempfile.TemporaryDirectory() as tmp:
            cli(tmp)  # warm the numba caches
            times = [cli(tmp) for _ in range(args.repeat)]
        out["builtin_default_cli_s"] = statistics.median(times)
        out["builtin_default_cli_runs_s"] = [round(t, 2) for t in times]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
