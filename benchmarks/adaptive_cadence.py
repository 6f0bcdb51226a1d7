"""Adaptive cadence against the fixed cadences ``eplb tune`` tries (prints JSON, one object per trace, then a summary).

For each trace, the sweep of ``eplb tune --engine eplb --policies POLICY --redundant-range 32`` on DeepSeek-V3's
size (32 ranks x 9 slots, 58 layers x 256 experts): the fixed cadences of its default grid (windows of 1/20, 1/10
and 1/5 of the trace, a plan every window), the default cadence of ``eplb simulate`` (a plan every 100 steps on the
last 100) and the adaptive cadence, all scored on the same steps. Goals: the adaptive cadence's estimated step time
within 1% of the best fixed cadence, and below the default cadence's.

Traces: the built-in scenarios at their own lengths, and held-out ones drawn here with other seeds and dynamics
(``switch``: abrupt changes of a concentrated mix every 300-900 steps; ``fast``: drift every 60-150 steps with
requests; ``real``: the default dynamics over the real DeepSeek-V3 workloads of ``tests/data``;
``calm-storm``: 1,500 steady steps, then fast drift).

Usage: ``python benchmarks/adaptive_cadence.py [--policy auto] [--traces a,b] [--jobs N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

BUILTIN = ("default", "drift", "bursty", "phases", "steady", "batching")
HELD_OUT = ("switch", "fast", "real", "calm-storm")
DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "sglang_dsv3_ep_statistics.npz"


def held_out(name: str):
    from eplb.sim.regimes import parametric_regimes, real_regimes
    from eplb.sim.traces import Trace, TraceSpec, generate_trace

    if name == "switch":
        return generate_trace(parametric_regimes(seed=11), TraceSpec(steps=3000, segment=(300, 900), blend=0.02,
                                                                      concentration=0.1), 11, name)
    if name == "fast":
        return generate_trace(parametric_regimes(seed=12), TraceSpec(steps=3000, segment=(60, 150), blend=0.5,
                                                                      requests=4, request_share=0.3), 12, name)
    if name == "real":
        return generate_trace(real_regimes(DATA), TraceSpec(steps=3000, prefill_run=3, decode_run=40,
                                                            segment=(200, 600), requests=4, request_share=0.3), 13,
                              name)
    calm = generate_trace(parametric_regimes(seed=14), TraceSpec(steps=1500, segment=None), 14)
    storm = generate_trace(parametric_regimes(seed=14), TraceSpec(steps=1500, segment=(40, 120), concentration=0.1),
                           15)
    return Trace.from_counts(np.concatenate([calm.counts, storm.counts]), name=name)


def one_trace(trace, policy: str, jobs: int) -> dict:
    from eplb import Topology
    from eplb.cycle import CycleConfig
    from eplb.sim.runs import simulate_runs
    from eplb.sim.simulator import SimConfig
    from eplb.sim.sweep import Candidate, candidates_for, default_windows, rank_rows, reducer, sweep_specs

    windows = default_windows(trace.num_steps)
    candidates = candidates_for("eplb", [policy], windows, None, [32], adaptive=True)
    default = Candidate(policy, 32, 100, 100)
    candidates = [*candidates, default] if default not in candidates else candidates
    base = SimConfig(Topology(32, 9), CycleConfig(cycle_steps=min(windows), planner_steps=10))
    plan = sweep_specs("eplb", candidates, base, trace.num_steps, trace.num_layers, trace.num_experts)
    started = time.perf_counter()
    rows = {}
    simulate_runs(trace, base, list(plan.specs), jobs, reduce=reducer(plan.warmup),
                  done=lambda index, row: rows.__setitem__(row["key"], row))
    ranked = {row["key"]: row for row in rank_rows(rows, plan)}
    fixed = [ranked[c.key] for c in candidates if c.kind == "dynamic"]
    best = min(fixed, key=lambda row: row["step_ms"])
    adaptive = next(ranked[c.key] for c in candidates if c.kind == "adaptive")
    base_row = ranked[default.key]
    return {"trace": trace.name, "steps": trace.num_steps, "warmup": plan.warmup,
            "best_fixed": best["key"], "best_fixed_ms": best["step_ms"], "default_ms": base_row["step_ms"],
            "adaptive": adaptive["key"], "adaptive_ms": adaptive["step_ms"],
            "adaptive_over_best": adaptive["step_ms"] / best["step_ms"] - 1,
            "adaptive_over_default": adaptive["step_ms"] / base_row["step_ms"] - 1,
            "within_1pct": adaptive["step_ms"] <= 1.01 * best["step_ms"],
            "beats_default": adaptive["step_ms"] < base_row["step_ms"],
            "fixed_ms": {row["key"]: row["step_ms"] for row in fixed}, "seconds": time.perf_counter() - started}


def main() -> None:
    from eplb.sim.traces import builtin_trace

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="auto")
    parser.add_argument("--traces", default=",".join(BUILTIN + HELD_OUT))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    results = []
    for name in args.traces.split(","):
        trace = builtin_trace(name) if name in BUILTIN else held_out(name)
        results.append(one_trace(trace, args.policy, args.jobs))
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"policy": args.policy, "traces": len(results),
                      "within_1pct": sum(r["within_1pct"] for r in results),
                      "beats_default": sum(r["beats_default"] for r in results),
                      "worst_over_best": max(r["adaptive_over_best"] for r in results)}))


if __name__ == "__main__":
    main()
