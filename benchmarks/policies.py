"""Benchmark every placement policy on DeepSeek-V3 (58 layers x 256 experts, 8 groups) with the real SGLang loads.

Prints one JSON object. For each policy (``default`` once per mode) and each topology (EP32: 32 ranks x 9 slots on 4
nodes; EP64: 64 ranks x 5 slots on 8 nodes):

- ``median_ms`` / ``min_ms``: ``policy.rebalance`` on a per-step window ``[--steps, 58, 256]`` drawn around workload
  0, with a previous plan in force, over ``--repeats`` runs after the first call;
- ``first_call_ms``: the first call in this process (numba kernels loaded from the on-disk cache, or compiled);
  ``first_call_cold_ms`` (with ``--cold``): the first call in a fresh process with an empty numba cache, i.e. the
  compile time a new installation pays once;
- ``par_same``: mean PAR (token-weighted over layers, averaged over the 12 workloads) of the plan made on workload
  ``w`` scored on workload ``w``'s real counts; ``par_cross``: the same plan scored on workload ``w + 1``;
- ``moved_slots``: slots changed per plan relative to the previous plan (workloads planned in turn, each with the
  previous plan as ``current``), mean over plans 2..12, and as a fraction of all slots.

For ``default`` it also reports ``deepseek_ms``: the drop-in ``eplb.rebalance_experts`` on the ``[58, 256]`` load,
the figure comparable with DeepSeek's reference (343-2600 ms) and vLLM's port (50-71 ms).

The 12 SGLang workloads are load profiles, not time steps: per-step windows are Poisson draws of ``--tokens`` routed
tokens per step and layer around each profile (seeded, identical for every policy).

``--replay`` instead replays FlashLB through the simulator the way vllm-ascend runs it: a ``drift`` (and a
``bursty``) trace drawn from the real workloads, cut to the first 16 layers, one re-plan every 600 steps applied at
once, at 32 ranks x 9 slots and 64 ranks x 5 slots; ``flashlb`` carries its state (the balance of each layer's last
plan, which cherry-picking compares with) from one cycle to the next through the planning function, and
``flashlb[stateless]`` forgets it, as every cycle did before. Per run: step PAR (token-weighted mean after the warm-up)
and slots moved per re-plan, next to the reference figures measured when the issue was filed (vllm-ascend's FlashLB
replayed side by side on the same kind of trace; not re-run here, its code is not part of this project).

    python benchmarks/policies.py [--policies default,swift] [--repeats 7] [--steps 600] [--cold]
    python benchmarks/policies.py --replay [--replay-steps 6000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import eplb
from eplb import Placement, Topology
from eplb.metrics import par, rank_loads

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sglang_dsv3_ep_statistics.npz"
TOPOLOGIES = {
    "EP32": Topology(num_ranks=32, slots_per_rank=9, num_nodes=4, num_groups=8),
    "EP64": Topology(num_ranks=64, slots_per_rank=5, num_nodes=8, num_groups=8),
}
#: policy variants benchmarked: default once per mode, the others with their defaults
VARIANTS = {"default": [{"mode": "hierarchical"}, {"mode": "global"}]}


def _steps(profile: np.ndarray, num_steps: int, tokens: int, seed: int) -> np.ndarray:
    """int32 ``[T, L, E]`` per-step loads drawn around one workload's ``[L, E]`` counts."""
    share = profile / profile.sum(axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    return rng.poisson(share * tokens, size=(num_steps, *profile.shape)).astype(np.int32)


def _mean_par(placement: Placement, counts: np.ndarray) -> float:
    loads = rank_loads(placement, counts)
    tokens = loads.sum(axis=1)
    return float((par(loads) * tokens).sum() / tokens.sum())


def _label(name: str, options: dict) -> str:
    return name + "".join(f"[{k}={v}]" for k, v in options.items())


def _time_ms(call, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        out.append(1000 * (time.perf_counter() - start))
    return out


def _cold_first_call(name: str, options: dict, topology_name: str, args) -> float:
    """First-call time in a fresh process with an empty numba cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, __file__, "--first-call", json.dumps([name, options, topology_name]),
                              "--steps", str(args.steps), "--tokens", str(args.tokens)],
                             env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout)["first_call_ms"]


def _first_call_only(spec: str, args, counts: np.ndarray) -> None:
    name, options, topology_name = json.loads(spec)
    window = _steps(counts[0], args.steps, args.tokens, seed=0)
    policy = eplb.get_policy(name, **options)
    start = time.perf_counter()
    policy.rebalance(window, TOPOLOGIES[topology_name])
    print(json.dumps({"first_call_ms": 1000 * (time.perf_counter() - start)}))


def bench(name: str, options: dict, topology_name: str, counts: np.ndarray, windows: list[np.ndarray],
          timing_window: np.ndarray, args) -> dict:
    topology = TOPOLOGIES[topology_name]
    policy = eplb.get_policy(name, **options)
    num_workloads = counts.shape[0]

    start = time.perf_counter()
    previous = policy.rebalance(windows[-1], topology).placement
    first_call_ms = 1000 * (time.perf_counter() - start)
    times = _time_ms(lambda: policy.rebalance(timing_window, topology, previous), args.repeats)

    same, cross, moved = [], [], []
    current = None
    for w in range(num_workloads):
        plan = policy.rebalance(windows[w], topology, current)
        same.append(_mean_par(plan.placement, counts[w]))
        cross.append(_mean_par(plan.placement, counts[(w + 1) % num_workloads]))
        if current is not None:
            moved.append(plan.total_moved_slots)
        current = plan.placement
    result = {
        "policy": _label(name, options),
        "topology": topology_name,
        "slots": f"{topology.num_ranks} ranks x {topology.slots_per_rank} slots, {topology.num_nodes} nodes",
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "first_call_ms": first_call_ms,
        "par_same": statistics.mean(same),
        "par_cross": statistics.mean(cross),
        "par_same_worst_workload": max(same),
        "moved_slots": statistics.mean(moved),
        "moved_fraction": statistics.mean(moved) / (counts.shape[1] * topology.num_physical),
    }
    if name == "default":
        num_groups, num_nodes = topology.num_groups, topology.num_nodes
        if options.get("mode") == "global":
            num_groups = num_nodes = 1  # the reference's global branch
        deepseek = _time_ms(lambda: eplb.rebalance_experts(counts[0], topology.num_physical, num_groups, num_nodes,
                                                           topology.num_ranks), args.repeats)
        result["deepseek_ms"] = statistics.median(deepseek)
    if args.cold:
        result["first_call_cold_ms"] = _cold_first_call(name, options, topology_name, args)
    return result


#: figures of the drift replay at 32 ranks x 9 slots when the issue was filed (issue 16): vllm-ascend's FlashLB, and
#: ours before it kept its state across cycles
REPLAY_REFERENCE = {"vllm-ascend flashlb": {"moved_slots_per_cycle": 1815, "step_par_mean": 1.186},
                    "eplb flashlb without state": {"moved_slots_per_cycle": 3275, "step_par_mean": 1.190}}
REPLAY_LAYERS, REPLAY_INTERVAL = 16, 600


class _Stateless:
    """A policy that forgets its state between cycles (what every cycle did before the planning function kept it)."""

    def __init__(self, policy):
        self.policy, self.name, self.wants_steps = policy, policy.name + "[stateless]", policy.wants_steps

    def rebalance(self, *args, **kwargs):
        return self.policy.rebalance(*args, **kwargs)

    def next_state(self, state, plan, layers, load):
        return None


def replay(args) -> list[dict]:
    from eplb.cycle import CycleConfig
    from eplb.sim.simulator import SimConfig, simulate
    from eplb.sim.traces import Regimes, builtin_trace, real_regimes

    regimes = real_regimes(DATA)
    regimes = Regimes(regimes.profiles[:, :REPLAY_LAYERS], regimes.names, regimes.prefill, regimes.top_k,
                      regimes.source)
    out = []
    for scenario in ("drift", "bursty"):
        trace = builtin_trace(scenario, args.replay_steps, seed=0, regimes=regimes)
        for topology_name, topology in TOPOLOGIES.items():
            config = SimConfig(topology, CycleConfig(cycle_steps=REPLAY_INTERVAL, layers_per_step=0))
            for policy in (eplb.get_policy("flashlb"), _Stateless(eplb.get_policy("flashlb"))):
                summary = simulate(trace, policy, config, name=policy.name).summary()
                out.append({"trace": scenario, "topology": topology_name, "policy": policy.name,
                            "step_par_mean": summary["step_par_mean"],
                            "moved_slots_per_cycle": summary["moved_slots_per_cycle"],
                            "cycles": summary["cycles"], "cycles_applied": summary["cycles_applied"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", help="comma-separated policy names (default: all available)")
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES), help="comma-separated: EP32, EP64")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per policy and topology")
    parser.add_argument("--steps", type=int, default=600, help="steps of the timed per-step window")
    parser.add_argument("--eval-steps", type=int, default=64, help="steps of each workload's planning window")
    parser.add_argument("--tokens", type=int, default=262144,
                        help="routed tokens per step and layer (tokens x top-k; 32 ranks x 1024 tokens x 8)")
    parser.add_argument("--cold", action="store_true", help="also time the first call with an empty numba cache")
    parser.add_argument("--first-call", help=argparse.SUPPRESS)
    parser.add_argument("--replay", action="store_true",
                        help="replay flashlb with and without its state across cycles (see the docstring)")
    parser.add_argument("--replay-steps", type=int, default=6000, help="steps of each replayed trace")
    args = parser.parse_args()
    if args.replay:
        print(json.dumps({"benchmark": "policies --replay", "layers": REPLAY_LAYERS, "interval": REPLAY_INTERVAL,
                          "steps": args.replay_steps, "reference_ep32_drift": REPLAY_REFERENCE,
                          "results": replay(args)}, indent=1))
        return

    with np.load(DATA) as f:
        counts = f["counts"]
    if args.first_call:
        _first_call_only(args.first_call, args, counts)
        return
    names = args.policies.split(",") if args.policies else eplb.available_policies()
    windows = [_steps(counts[w], args.eval_steps, args.tokens, seed=w) for w in range(counts.shape[0])]
    timing_window = _steps(counts[0], args.steps, args.tokens, seed=0)
    results = []
    for name in names:
        for options in VARIANTS.get(name, [{}]):
            for topology_name in args.topologies.split(","):
                results.append(bench(name, options, topology_name, counts, windows, timing_window, args))
    print(json.dumps({
        "benchmark": "policies",
        "model": "DeepSeek-V3: 58 layers x 256 experts, 8 groups",
        "load": str(DATA.name),
        "timing_window": list(timing_window.shape),
        "eval_window": [args.eval_steps, *counts.shape[1:]],
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],  # timings taken on a busy machine are not comparable
        "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
