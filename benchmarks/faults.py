"""Availability and balance under rank and node failures, with and without the resilience option (prints JSON).

DeepSeek-V3 size (58 layers x 256 experts, built-in ``default`` dynamics) at EP32 (9 slots per rank, 288 slots, 4
nodes) and EP64 (5 slots per rank, 320 slots, 8 nodes). For each policy and option:

- ``balance``: a run without failures: token-weighted mean step PAR and window PAR (the option's cost in balance),
  and ``plan_par``: the in-sample PAR of one plan on the first window (mean over layers);
- ``exposure``: on that run's final placement, the most experts with two or more replicas that one rank failure or
  one node failure would leave without a replica (what the option is meant to make 0), and all experts it would
  leave without a replica (experts with one replica are always exposed);
- ``failures``: a run where one rank fails and comes back, then one node fails for good: per failure the lost
  experts (and those of them that had two or more replicas), steps with experts unavailable, tokens that waited for
  a reload, PAR before, after failover and after the re-plan over the live ranks; over the run the share of routed
  tokens that waited.

Usage: ``python benchmarks/faults.py [--steps T] [--ranks 32,64] [--policies static,default,swift]``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

TOPOLOGIES = {32: (9, 4), 64: (5, 8)}  # ranks -> (slots per rank, nodes)
OPTIONS = {"plain": None, "resilient": {}, "resilient_hot2": {"min_replicas": 2, "hot_experts": 32}}


def exposure(placement) -> dict:
    """Worst single rank / node failure of ``placement``: experts left with no replica, all and replicated."""
    topology = placement.topology
    replicated = placement.replica_count >= 2
    groups = {"rank": [[r] for r in range(topology.num_ranks)],
              "node": [np.flatnonzero(topology.node_of_rank == n) for n in range(topology.num_nodes)]}
    out = {}
    for kind, failed in groups.items():
        lost = [placement.without_ranks(ranks).lost_mask for ranks in failed]
        out[f"{kind}_lost_max"] = int(max(mask.sum() for mask in lost))
        out[f"{kind}_lost_replicated_max"] = int(max((mask & replicated).sum() for mask in lost))
    return out


def run_case(trace, ranks: int, policy_name: str, option, steps: int) -> dict:
    import eplb
    from eplb.cycle import CycleConfig
    from eplb.policies.shared.resilience import Resilience
    from eplb.sim.simulator import Failure, SimConfig, simulate

    slots, nodes = TOPOLOGIES[ranks]
    topology = eplb.Topology(ranks, slots, nodes, 8)
    resilience = None if option is None else Resilience(**option)
    cycle = CycleConfig(cycle_steps=100, planner_steps=10)
    policy = None if policy_name == "static" else eplb.get_policy(policy_name)
    failures = (Failure("rank", 5, int(steps * 0.4), int(steps * 0.6)), Failure("node", 2, int(steps * 0.73)))
    started = time.perf_counter()
    clean = simulate(trace, policy, SimConfig(topology, cycle, resilience=resilience))
    failed = simulate(trace, policy, SimConfig(topology, cycle, failures=failures, resilience=resilience))
    out = {"balance": {k: clean.summary()[k] for k in ("step_par_mean", "step_par_p99", "window_par_mean")}}
    if policy is not None:
        window = trace.counts[:cycle.cycle_steps]
        out["balance"]["plan_par"] = float(policy.rebalance(window, topology, resilience=resilience).par_after.mean())
    out["exposure"] = exposure(clean.final)
    summary = failed.summary()["failures"]
    keep = ("spec", "lost_experts", "lost_replicated_experts", "steps_with_unavailable_experts", "tokens_waiting",
            "par_before", "par_after_failover", "replan_step", "par_after_replan")
    out["failures"] = {"tokens_waiting_share": summary["tokens_waiting_share"],
                       "steps_with_unavailable_experts": summary["steps_with_unavailable_experts"],
                       "step_par_mean": failed.summary()["step_par_mean"],
                       "events": [{k: e.get(k) for k in keep} for e in summary["events"]]}
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", default="32,64")
    parser.add_argument("--policies", default="static,default,swift")
    parser.add_argument("--options", default=",".join(OPTIONS))
    args = parser.parse_args()
    from eplb.sim.traces import builtin_trace

    trace = builtin_trace("default", steps=args.steps, seed=args.seed)
    out = {"steps": args.steps, "seed": args.seed, "trace": "builtin:default (58 layers x 256 experts)",
           "topologies": {f"EP{r}": {"slots_per_rank": s, "nodes": n} for r, (s, n) in TOPOLOGIES.items()},
           "options": {k: OPTIONS[k] for k in args.options.split(",")}, "results": {}}
    for ranks in (int(r) for r in args.ranks.split(",")):
        for name in args.policies.split(","):
            for option in args.options.split(","):
                if name == "static" and option == "resilient_hot2":
                    continue  # static has no load to find the hottest experts with
                key = f"EP{ranks}/{name}/{option}"
                out["results"][key] = run_case(trace, ranks, name, OPTIONS[option], args.steps)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
