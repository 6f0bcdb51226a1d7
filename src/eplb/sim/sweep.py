"""The sweep behind ``eplb tune``: every candidate setting of an engine, simulated on one trace and scored alike.

A :class:`Candidate` is what an engine lets its user choose: the policy, the planning window, the interval between
plans and the redundant slots, or a static map planned once (engines that load a map at start), or eplb's adaptive
cadence (:mod:`eplb.cycle.cadence`, eplb's own runtime only). :func:`sweep_specs` turns each into a simulator run that
does what that engine does with it (:data:`ENGINES`):

==============  ============================================================================================
engine          a dynamic candidate (window W, interval I) runs as
==============  ============================================================================================
``eplb``        eplb's runtime: a plan every I steps on the last W <= I steps (per-step rows for ``auto`` and
                ``flashlb``), applied a layer per step; the adaptive cadence besides
``vllm``        vLLM's EPLB: a plan every ``step_interval`` I on the last ``window_size`` W steps (any W), the
                policy handed the window's sum (``EPLB_VLLM_POLICY``)
``vllm-ascend`` vllm-ascend's cycle: ``expert_heat_collection_interval`` W steps of heat, the plan after
                ``algorithm_execution_interval`` I steps, then one layer per step; the policy handed the sum
``sglang``      SGLang's EPLB (DeepSeek's algorithm, eplb's ``default``): every
                ``eplb_rebalance_num_iterations`` I on the recorder's last W <= I steps, all layers at once,
                serving paused (no transfer hidden); and static maps for ``--init-expert-location``
``trtllm``      static maps for the load balancer's ``initial_global_assignments`` only
==============  ============================================================================================

Every run is scored on the same steps (after the longest warm-up of the grid), so rows compare: step PAR, the
step time of the cost model with moves priced (exposed transfer time; the planner's lateness as its ``planner_steps``
of delay), the bytes moved per hour at that step time, and the distance to the clairvoyant floor of the same
cluster. :func:`row_of` runs where the simulation ran (a worker process or a Ray task), so only a row travels back.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from eplb.cycle import CycleConfig
from eplb.cycle.cadence import AdaptiveCadence
from eplb.errors import EplbError
from eplb.metrics import summarize_par
from eplb.sim.runs import RunSpec
from eplb.sim.simulator import RunResult, SimConfig, warmup_steps
from eplb.topology import Topology

__all__ = ["ENGINES", "Candidate", "SweepPlan", "sweep_specs", "row_of", "rank_rows", "pareto", "redundant_range"]

ENGINES = ("eplb", "vllm", "vllm-ascend", "sglang", "trtllm")
#: the policy each engine's own balancer runs when eplb does not provide it
ENGINE_POLICY = {"sglang": "default"}
#: row fields that are measured wall time, not simulated: they differ between two runs of the same sweep
MEASURED_FIELDS = ("planner_ms",)


@dataclass(frozen=True)
class Candidate:
    """One setting to try.

    Attributes:
        policy: a registered policy name.
        redundant: R, redundant slots in all (``(E + R) / W`` slots per rank).
        window: W, steps of load a plan is made on (static: the steps the map is planned on; adaptive: the
            longest window).
        interval: I, the engine's interval (see :data:`ENGINES`; adaptive: the shortest interval); None for a
            static map.
        kind: ``dynamic``, ``static`` (a map planned once on the first W steps, never moved) or ``adaptive``.
        max_steps: adaptive: the longest interval.
    """

    policy: str
    redundant: int
    window: int
    interval: int | None = None
    kind: str = "dynamic"
    max_steps: int | None = None

    @property
    def cadence(self) -> AdaptiveCadence:
        """The adaptive cadence of an adaptive candidate."""
        return AdaptiveCadence(min_steps=self.interval, max_steps=self.max_steps, window_steps=self.window)

    @property
    def key(self) -> str:
        """A unique, readable name: ``auto W200 I200 R32``, ``static auto W200 R32``, ``adaptive auto ...``."""
        if self.kind == "static":
            return f"static {self.policy} W{self.window} R{self.redundant}"
        prefix = "adaptive " if self.kind == "adaptive" else ""
        return f"{prefix}{self.policy} W{self.window} I{self.interval} R{self.redundant}"


@dataclass(frozen=True)
class SweepPlan:
    """The runs of a sweep: one per candidate, and per redundancy the two references (no balancing, and the
    clairvoyant floor). ``warmup``: the steps every row leaves out."""

    candidates: tuple[Candidate, ...]
    specs: tuple[RunSpec, ...]
    references: dict
    warmup: int


def redundant_range(num_experts: int, num_ranks: int, redundant: int) -> list[int]:
    """The default redundancies around ``redundant``: one slot per rank less, the same, one more (those that hold
    every expert)."""
    out = [redundant + delta * num_ranks for delta in (-1, 0, 1)]
    return [r for r in out if r >= 0 and num_experts + r >= num_ranks]


def default_windows(num_steps: int) -> list[int]:
    """Windows of 1/20, 1/10 and 1/5 of the trace (at least one step each), so that every run plans several
    times after the warm-up."""
    return sorted({max(1, num_steps // d) for d in (20, 10, 5)})


def adaptive_cadence(windows, intervals) -> AdaptiveCadence:
    """The adaptive cadence a sweep tries beside its fixed grid: a plan every half to one shortest interval, on a
    window that slides back up to twice the longest window while the load is stable and restarts after a drift."""
    shortest = min(intervals)
    low = max(1, shortest // 2)
    return AdaptiveCadence(min_steps=low, max_steps=max(low, shortest), window_steps=max(shortest, 2 * max(windows)))


def candidates_for(engine: str, policies, windows, intervals, redundancies, adaptive: bool) -> list[Candidate]:
    """Every candidate of ``engine`` over the grid (pairs that the engine refuses, such as W > I where the engine
    requires W <= I, are left out)."""
    if engine not in ENGINES:
        raise EplbError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    out: list[Candidate] = []
    for redundant in redundancies:
        if engine in ("sglang", "trtllm"):
            out += [Candidate(policy, redundant, window, kind="static") for policy in policies for window in windows]
        if engine == "trtllm":
            continue
        dynamic_policies = [ENGINE_POLICY[engine]] if engine in ENGINE_POLICY else list(policies)
        for policy in dynamic_policies:
            for window in windows:
                for interval in intervals or [window]:
                    if engine in ("eplb", "sglang") and window > interval:
                        continue
                    out.append(Candidate(policy, redundant, window, interval))
            if adaptive and engine == "eplb":
                cadence = adaptive_cadence(windows, intervals or windows)
                out.append(Candidate(policy, redundant, cadence.window_steps, cadence.min_steps, kind="adaptive",
                                     max_steps=cadence.max_steps))
    return list(dict.fromkeys(out))


def cycle_of(engine: str, candidate: Candidate, base: CycleConfig, num_layers: int) -> CycleConfig:
    """The cycle a candidate runs with on ``engine`` (thresholds and pace from ``base``)."""
    if candidate.kind == "adaptive":
        return dataclasses.replace(base, cycle_steps=candidate.interval, window_steps=None,
                                   adaptive=candidate.cadence)
    if engine == "vllm-ascend":  # heat W steps, plan I steps later, one layer per step, then a new heat window
        return dataclasses.replace(base, cycle_steps=candidate.window + candidate.interval + num_layers,
                                   window_steps=candidate.window, planner_steps=candidate.interval,
                                   layers_per_step=1)
    window = None if candidate.window == candidate.interval else candidate.window
    cycle = dataclasses.replace(base, cycle_steps=candidate.interval, window_steps=window)
    if engine == "sglang":
        cycle = dataclasses.replace(cycle, planner_steps=0, layers_per_step=0)
    return cycle


def sweep_specs(engine: str, candidates, base: SimConfig, num_steps: int, num_layers: int,
                num_experts: int) -> SweepPlan:
    """The runs of ``candidates`` on ``engine`` (``base``: cost model, dispatch, pace and planner delay)."""
    specs, warmups, references = [], [], {}
    topologies: dict[int, Topology] = {}
    for candidate in candidates:
        topology = topologies.setdefault(candidate.redundant, _topology(base.topology, num_experts,
                                                                         candidate.redundant))
        config = dataclasses.replace(base, topology=topology, window_sum=engine != "eplb")
        if engine == "sglang" and candidate.kind != "static":
            config = dataclasses.replace(config, cost=dataclasses.replace(config.cost, overlap=0.0))
        if candidate.kind == "static":
            specs.append(RunSpec(candidate.key, candidate.policy, config=config, static_steps=candidate.window))
            warmups.append(min(candidate.window, num_steps // 2))
            continue
        cycle = cycle_of(engine, candidate, base.cycle, num_layers)
        config = dataclasses.replace(config, cycle=cycle)
        specs.append(RunSpec(candidate.key, candidate.policy, config=config))
        warmups.append(warmup_steps(cycle, num_layers, num_steps))
    shortest = min(c.interval if c.kind == "adaptive" else c.window for c in candidates)
    for redundant, topology in topologies.items():
        config = dataclasses.replace(base, topology=topology, cycle=dataclasses.replace(base.cycle,
                                     cycle_steps=shortest, window_steps=None, adaptive=None))
        names = {"static": f"no balancing R{redundant}", "floor": f"clairvoyant auto R{redundant}"}
        specs.append(RunSpec(names["static"], None, config=config))
        specs.append(RunSpec(names["floor"], "auto", clairvoyant=True, config=config))
        references[redundant] = names
    return SweepPlan(tuple(candidates), tuple(specs), references, max(warmups, default=0))


def _topology(base: Topology, num_experts: int, redundant: int) -> Topology:
    slots = num_experts + redundant
    if slots % base.num_ranks:
        raise EplbError(f"redundant slots {redundant}: {num_experts} experts + {redundant} do not split evenly over "
                        f"{base.num_ranks} ranks; pick R so that {base.num_ranks} divides {num_experts} + R")
    if slots < base.num_ranks:
        raise EplbError(f"redundant slots {redundant}: {slots} slots leave a rank without a slot")
    return Topology(base.num_ranks, slots // base.num_ranks, base.num_nodes, base.num_groups)


def row_of(spec: RunSpec, result: RunResult, warmup: int) -> dict:
    """The figures of one run over the steps from ``warmup`` on (a reducer for :func:`~eplb.sim.runs.simulate_runs`:
    it runs where the simulation ran)."""
    scored = slice(warmup, None)
    steps = result.step_us[scored].size
    par = summarize_par(result.step_par[scored], result.tokens[scored])
    step_ms = float(result.step_us[scored].mean() / 1e3) if steps else float("nan")
    applied = [c for c in result.cycles if c.apply_start is not None and c.apply_start >= warmup]
    moved = float(sum(c.bytes_moved for c in applied))
    hours = steps * step_ms / 1e3 / 3600.0
    return {
        "key": spec.name,
        "step_par": par["par_mean"],
        "step_par_p99": par["par_p99"],
        "step_ms": step_ms,
        "moe_ms": float(result.moe_us[scored].mean() / 1e3) if steps else float("nan"),
        "exposed_transfer_ms": float(result.exposed_us[scored].mean() / 1e3) if steps else float("nan"),
        "perfect_ms": float(result.perfect_us[scored].mean() / 1e3) if steps else float("nan"),
        "bytes_moved": moved,
        "bytes_per_hour": moved / hours if hours > 0 else 0.0,
        "moved_slots": int(sum(c.moved_slots for c in applied)),
        "cycles": sum(1 for c in result.cycles if c.window_end >= warmup),
        "cycles_applied": len(applied),
        "planner_ms": float(np.median(result.planner_ms)) if result.planner_ms else 0.0,
    }


def reducer(warmup: int):
    """:func:`row_of` for runs scored from ``warmup`` on (picklable, for worker processes and Ray tasks)."""
    return functools.partial(row_of, warmup=warmup)


def rank_rows(rows: dict[str, dict], plan: SweepPlan) -> list[dict]:
    """The candidates' rows, fastest first (ties: fewer bytes, then the key), each with its candidate's settings,
    its distance to the floor and its speed-up over no balancing of the same redundancy."""
    out = []
    for candidate in plan.candidates:
        row = rows.get(candidate.key)
        if row is None:
            continue
        names = plan.references[candidate.redundant]
        floor, static = rows.get(names["floor"]), rows.get(names["static"])
        out.append({**row, "policy": candidate.policy, "window": candidate.window, "interval": candidate.interval,
                    "redundant": candidate.redundant, "kind": candidate.kind, "max_steps": candidate.max_steps,
                    "tolerance": candidate.cadence.tolerance if candidate.kind == "adaptive" else None,
                    "over_floor": row["step_par"] / floor["step_par"] if floor else None,
                    "over_floor_ms": row["step_ms"] / floor["step_ms"] if floor else None,
                    "speedup_vs_static": static["step_ms"] / row["step_ms"] if static else None})
    return sorted(out, key=lambda r: (r["step_ms"], r["bytes_per_hour"], r["key"]))


def pareto(rows: list[dict]) -> list[str]:
    """Keys of the rows no other row beats on both step time and bytes moved per hour, fastest first."""
    front, fewest = [], float("inf")
    for row in sorted(rows, key=lambda r: (r["step_ms"], r["bytes_per_hour"], r["key"])):
        if row["bytes_per_hour"] < fewest:
            front.append(row["key"])
            fewest = row["bytes_per_hour"]
    return front
