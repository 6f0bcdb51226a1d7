"""Benchmark every placement policy on DeepSeek-V3 (58 layers x 256 experts, 8 groups) with the real SGLang loads.

Prints one JSON object. For each policy (``default`` once per mode, ``swift`` and ``flashlb`` once per rule set) and
each topology (EP32: 32 ranks x 9 slots on 4 nodes; EP64: 64 ranks x 5 slots on 8 nodes):

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

``--replay`` instead replays ``swift`` and ``flashlb`` through the simulator the way vllm-ascend runs them: ``drift``
and ``bursty`` traces drawn from the real workloads (``--seeds``, three by default), cut to the first 16 layers, one
re-plan every 600 steps applied at once, even split, vLLM's initial layout, at 32 ranks x 9 slots and 64 ranks x 5
slots. With ``--peer-dir DIR`` (a vllm-ascend checkout; implies ``--replay``) vllm-ascend's own policy files are
loaded from it at run time (``benchmarks/peers.py``; nothing of them is part of this project) and replayed beside
ours on the same traces, each keeping its state across cycles: per run step PAR (token-weighted mean after the
warm-up) and slots moved per re-plan; per cell (trace, topology, policy) the means over the seeds and whether ours
equal theirs (step PAR within 0.005, moved slots within 5%), on the mean and in every seed. Without ``--peer-dir``
only ours run, and the table of issue 22 is printed under ``reference_not_rerun``: constants, not measured here.
``--options`` gives our policies options (e.g. the better-on-purpose ones of docs/peers.md).

    python benchmarks/policies.py [--policies default,swift] [--repeats 7] [--steps 600] [--cold]
    python benchmarks/policies.py --replay [--peer-dir ../vllm-ascend] [--seeds 0,1,2] [--replay-steps 6000]
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
#: policy variants benchmarked: default once per mode, swift and flashlb with vllm-ascend's rules and ours, the
#: others with their defaults
VARIANTS = {"default": [{"mode": "hierarchical"}, {"mode": "global"}],
            "swift": [{}, {"rules": "eplb"}], "flashlb": [{}, {"rules": "eplb"}]}


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


#: the table of issue 22, measured when it was filed by replaying vllm-ascend's own policy files beside ours (16
#: DeepSeek-V3-like layers, a re-plan every 600 steps, even split): step PAR and moved slots per re-plan. Constants:
#: printed under "reference_not_rerun" when no --peer-dir is given, never mixed with what a run measures.
ISSUE_REFERENCE = {
    "note": "figures of issue 22 (before swift and flashlb were made faithful), not re-run here; run with "
            "--peer-dir DIR (a vllm-ascend checkout) to measure vllm-ascend's policies beside ours",
    "cells": [
        {"trace": trace, "topology": topology, "policy": policy,
         "eplb": {"step_par_mean": ours_par, "moved_slots_per_cycle": ours_moved},
         "vllm_ascend": {"step_par_mean": peer_par, "moved_slots_per_cycle": peer_moved}}
        for trace, topology, policy, ours_par, peer_par, ours_moved, peer_moved in (
            ("drift", "EP32", "flashlb", 1.164, 1.186, 531, 1815),
            ("drift", "EP64", "flashlb", 1.257, 1.296, 563, 3784),
            ("bursty", "EP32", "flashlb", 1.487, 1.482, 3689, 3689),
            ("bursty", "EP64", "flashlb", 1.802, 1.801, 3872, 3872),
            ("drift", "EP32", "swift", 1.216, 1.275, 763, 435),
            ("drift", "EP64", "swift", 1.366, 1.372, 1250, 853),
            ("bursty", "EP32", "swift", 1.500, 1.547, 1019, 995),
            ("bursty", "EP64", "swift", 1.841, 1.860, 1463, 2106))],
}
REPLAY_LAYERS, REPLAY_INTERVAL = 16, 600
#: a cell is equal when its step PAR is within this of vllm-ascend's and its moved slots within this fraction
PAR_TOLERANCE, MOVED_TOLERANCE = 0.005, 0.05


def _replay_runs(args, peers) -> list[dict]:
    """One simulated run per trace, seed, topology, policy and side (eplb; vllm-ascend with ``peers``)."""
    from eplb.cycle import CycleConfig
    from eplb.sim.simulator import SimConfig, simulate
    from eplb.sim.traces import Regimes, builtin_trace, real_regimes
    from peers import PeerPolicy, set_group_size

    regimes = real_regimes(DATA)
    regimes = Regimes(regimes.profiles[:, :REPLAY_LAYERS], regimes.names, regimes.prefill, regimes.top_k,
                      regimes.source)
    runs = []
    for scenario in args.traces.split(","):
        for seed in args.seeds:
            trace = builtin_trace(scenario, args.replay_steps, seed=seed, regimes=regimes)
            for topology_name in args.topologies.split(","):
                topology = TOPOLOGIES[topology_name]
                set_group_size(topology.num_ranks)  # FlashLB's thresholds follow the EPLB group's size
                config = SimConfig(topology, CycleConfig(cycle_steps=REPLAY_INTERVAL, layers_per_step=0))
                for name in args.replay_policies.split(","):
                    sides = [("eplb", eplb.get_policy(name, **json.loads(args.options or "{}")))]
                    if peers is not None:
                        sides.append(("vllm_ascend", PeerPolicy(name, peers[name])))
                    for side, policy in sides:
                        started = time.perf_counter()
                        summary = simulate(trace, policy, config, name=policy.name).summary()
                        runs.append({"trace": scenario, "seed": seed, "topology": topology_name, "policy": name,
                                     "side": side, "step_par_mean": round(summary["step_par_mean"], 4),
                                     "moved_slots_per_cycle": round(summary["moved_slots_per_cycle"], 1),
                                     "cycles": summary["cycles"], "cycles_applied": summary["cycles_applied"],
                                     "run_s": round(time.perf_counter() - started, 1)})
                        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    return runs


def _cells(runs: list[dict]) -> list[dict]:
    """Per trace, topology and policy: each side's figures averaged over the seeds, and with both sides whether
    eplb's equal vllm-ascend's (step PAR within PAR_TOLERANCE, moved slots within MOVED_TOLERANCE), over the mean
    and in every seed."""
    cells = {}
    for run in runs:
        cells.setdefault((run["trace"], run["topology"], run["policy"]), []).append(run)
    out = []
    for (trace, topology, policy), group in cells.items():
        cell = {"trace": trace, "topology": topology, "policy": policy}
        for side in ("eplb", "vllm_ascend"):
            mine = [run for run in group if run["side"] == side]
            if mine:
                cell[side] = {key: round(statistics.mean(run[key] for run in mine), 4)
                              for key in ("step_par_mean", "moved_slots_per_cycle")}
        if "vllm_ascend" in cell:
            pairs = [(a, b) for a in group for b in group if a["side"] == "eplb" and b["side"] == "vllm_ascend"
                     and a["seed"] == b["seed"]]
            cell["equal"] = _equal(cell["eplb"], cell["vllm_ascend"])
            cell["equal_in_every_seed"] = all(_equal(a, b) for a, b in pairs)
        out.append(cell)
    return out


def _equal(ours: dict, theirs: dict) -> bool:
    moved = max(theirs["moved_slots_per_cycle"], 1e-9)
    return bool(abs(ours["step_par_mean"] - theirs["step_par_mean"]) <= PAR_TOLERANCE
                and abs(ours["moved_slots_per_cycle"] - theirs["moved_slots_per_cycle"]) <= MOVED_TOLERANCE * moved)


def replay(args) -> dict:
    """The side-by-side replay (see the module docstring)."""
    peers = None
    if args.peer_dir:
        from peers import load_peer_policies

        peers = load_peer_policies(args.peer_dir)
    runs = _replay_runs(args, peers)
    out = {"benchmark": "policies --replay", "layers": REPLAY_LAYERS, "interval": REPLAY_INTERVAL,
           "steps": args.replay_steps, "seeds": args.seeds, "dispatch": "even", "layout": "vllm",
           "options": json.loads(args.options or "{}"), "peer_dir": args.peer_dir,
           "tolerance": {"step_par": PAR_TOLERANCE, "moved_fraction": MOVED_TOLERANCE},
           "cells": _cells(runs), "runs": runs}
    if peers is None:
        out["reference_not_rerun"] = ISSUE_REFERENCE
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
                        help="replay swift and flashlb through the simulator (see the docstring)")
    parser.add_argument("--peer-dir", metavar="DIR",
                        help="a vllm-ascend checkout: replay its own policy files beside ours (implies --replay)")
    parser.add_argument("--replay-steps", type=int, default=6000, help="steps of each replayed trace")
    parser.add_argument("--seeds", type=lambda text: [int(x) for x in text.split(",")], default=[0, 1, 2],
                        help="comma-separated trace seeds of the replay")
    parser.add_argument("--traces", default="drift,bursty", help="comma-separated built-in traces of the replay")
    parser.add_argument("--replay-policies", default="swift,flashlb", help="comma-separated: swift, flashlb")
    parser.add_argument("--options", help="JSON options for our policies in the replay, e.g. '{\"spread\": true}'")
    args = parser.parse_args()
    if args.replay or args.peer_dir:
        print(json.dumps(replay(args), indent=1))
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
