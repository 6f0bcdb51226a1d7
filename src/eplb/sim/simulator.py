"""Trace-driven simulation of dynamic expert rebalancing.

:func:`simulate` replays a :class:`~eplb.sim.traces.Trace` step by step through the same :class:`~eplb.cycle.Cycle`
the runtime uses: the load of each window of ``H`` steps goes to the policy, the plan comes back ``A`` steps later
and its layers are applied one apply step at a time (a layer, or what fits a byte budget); a layer's new placement is
in force from the step after every rank knows its transfer landed, as in the runtime: ``s + n + 1`` for a transfer
posted in step ``s`` that spans ``n`` forwards (:meth:`~eplb.sim.cost.CostModel.transfer_forwards`, ``n >= 1``; the
next apply step comes then). Every step is then scored with the placement that was in force in it:

- per step and layer: the rank loads under the replica-choice mode (:mod:`eplb.dispatch`), their PAR
  (busiest rank / mean rank) and the routings behind it;
- per window of ``H`` steps: the PAR of the summed rank loads (what a policy that only sees sums is judged on);
- per cycle: applied layers, moved slots and bytes, planner wall time, predicted PAR before / after;
- step time from :class:`~eplb.sim.cost.CostModel`, including the exposed part of weight transfers.

Failures (:class:`Failure`): a rank or a whole node stops serving at a step and may come back later. As in the
runtime (:meth:`eplb.runtime.EplbController.fail_ranks`): from that step on, tokens go to the surviving replicas only
(the failover routing of :meth:`Placement.without_ranks`, split evenly over them whatever the dispatch rule); the
cycle in progress is given up and a new window starts; every expert with no surviving replica is reloaded into the
slot of a spare replica on a live rank, in force from the next step, so its tokens of the failure step wait (counted,
not served). With ``reload_lost=False`` they wait until a re-plan over the live ranks (the normal cycle,
``live_ranks=``) places those experts again. A layer of a plan made for another set of live ranks is not applied. A
rank that comes back holds what it held when it failed (the runtime has no way back yet). PAR during a failure is over
the live ranks.

``policy=None`` is the static run (the initial layout is kept). ``clairvoyant=True`` gives the policy, at each
cycle, the load of the steps its plan will be scored on (the window after submission) and applies every layer at
once with no planner delay and free weight transfers: a floor no online policy can beat with the same planner.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from eplb.cycle import EARLIEST_SWITCH, Cycle, CycleConfig, CycleRecord
from eplb.cycle.planning import plan_cycle
from eplb.dispatch import BALANCED_PASSES, DISPATCH_RULES
from eplb.errors import EplbError, PolicyError
from eplb.metrics import summarize_par
from eplb.placement import LAYOUTS, Placement
from eplb.policies.base import Policy
from eplb.policies.shared.resilience import Resilience, make_resilient, reload_lost
from eplb.sim.cost import MODEL_EXPERT_BYTES, CostModel
from eplb.sim.failures import Failure, failed_ranks, failure_events
from eplb.sim.scoring import Timeline, score
from eplb.sim.traces import Trace
from eplb.topology import Topology

__all__ = ["SimConfig", "RunResult", "Failure", "simulate", "clairvoyant_cycle", "warmup_steps", "failed_ranks"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class SimConfig:
    """What is simulated besides the trace and the policy.

    Attributes:
        topology: ranks, slots per rank, nodes, groups.
        cycle: the rebalancing cycle (window ``H``, planner latency ``A``, application pace, thresholds).
        dispatch: replica choice, one of :data:`~eplb.dispatch.DISPATCH_RULES`.
        tp_size: tensor-parallel size for the ``rank`` mode's rotation.
        expert_bytes: bytes of one expert's weights.
        cost: the step-time model.
        layout: initial placement, one of :data:`eplb.placement.LAYOUTS`.
        balanced_passes: ``balanced`` mode: water-filling passes of the split (0 keeps the even split; the default
            :data:`~eplb.dispatch.BALANCED_PASSES` is what the runtime's router runs; see
            :func:`eplb.dispatch.balanced_replica_load`).
        failures: ranks or nodes that fail during the run (:class:`Failure`).
        resilience: the policies' resilience option (also applied to the initial layout), or None.
        reload_lost: after a failure, reload the experts left with no replica in the next step, as the runtime does;
            False: they wait for the next re-plan.
        window_sum: plan on the window's sum even with a policy that reads per-step rows, as engines that run
            their own window hand their policy (vLLM, vllm-ascend, SGLang).
    """

    topology: Topology
    cycle: CycleConfig
    dispatch: str = "even"
    tp_size: int = 1
    expert_bytes: float = float(MODEL_EXPERT_BYTES["deepseek-v3"])
    cost: CostModel = field(default_factory=CostModel)
    layout: str = "vllm"
    balanced_passes: int = BALANCED_PASSES
    failures: tuple[Failure, ...] = ()
    resilience: Resilience | None = None
    reload_lost: bool = True
    window_sum: bool = False

    def __post_init__(self):
        if self.dispatch not in DISPATCH_RULES:
            raise EplbError(f"dispatch rule must be one of {', '.join(DISPATCH_RULES)}, got {self.dispatch!r}")
        if self.layout not in LAYOUTS:
            raise EplbError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.expert_bytes < 0:
            raise EplbError(f"expert_bytes must be >= 0, got {self.expert_bytes}")
        smallest = self.expert_bytes * (2 if self.cycle.host_staging else 1)  # what moving one expert stages
        if self.cycle.bytes_per_step is not None and self.cycle.bytes_per_step < smallest:
            raise EplbError(f"cycle.bytes_per_step={self.cycle.bytes_per_step:g} is smaller than one expert "
                            f"(expert_bytes={self.expert_bytes:g}, host_staging={self.cycle.host_staging}); "
                            f"expected >= {smallest:g}")
        if self.tp_size < 1:
            raise EplbError(f"tp_size must be >= 1, got {self.tp_size}")


@dataclass
class RunResult:
    """One simulated run.

    Attributes:
        name: policy name ("static", "clairvoyant:<policy>", ...).
        step_par: float64 ``[T, L]`` PAR of every step and layer.
        tokens: float64 ``[T, L]`` routings of every step and layer.
        window_start: int64 ``[N]`` first step of each window of ``H`` steps.
        window_par: float64 ``[N, L]`` PAR of the rank loads summed over each window.
        window_tokens: float64 ``[N, L]`` routings behind each.
        moe_us: float64 ``[T]`` estimated MoE time of each step.
        perfect_us: float64 ``[T]`` the same at perfect balance (PAR = 1).
        transfer_us: float64 ``[T]`` weight-transfer time of each step; ``exposed_us`` the part compute does not
            hide (added to the step).
        rank_load: float64 ``[L, W]`` load each rank served in each layer after the warm-up.
        cycles: one :class:`~eplb.cycle.CycleRecord` per submitted window.
        planner_ms: wall time of each planner call (one per cycle, in order).
        final: the placement in force at the end.
        warmup: leading steps left out of the summaries: the first window, which every run serves on the initial
            layout before it has seen any load, plus the first plan's delay and layer-by-layer application
            (``H + A + L`` steps, at most half the trace), so the figures describe the steady state.
        waiting: float64 ``[T, L]`` tokens routed to experts with no live replica (they wait for a reload; not in
            ``tokens``); zeros without failures.
        unavailable: int64 ``[T, L]`` experts with no live replica in each step and layer.
        live_count: int64 ``[T]`` live ranks in each step.
        failures: one dict per injected failure (see :func:`simulate`), in order.
    """

    name: str
    step_par: np.ndarray
    tokens: np.ndarray
    window_start: np.ndarray
    window_par: np.ndarray
    window_tokens: np.ndarray
    moe_us: np.ndarray
    perfect_us: np.ndarray
    transfer_us: np.ndarray
    exposed_us: np.ndarray
    rank_load: np.ndarray
    cycles: list[CycleRecord]
    planner_ms: list[float]
    final: Placement
    warmup: int = 0
    waiting: np.ndarray | None = None
    unavailable: np.ndarray | None = None
    live_count: np.ndarray | None = None
    failures: list[dict] = field(default_factory=list)

    @property
    def step_us(self) -> np.ndarray:
        """float64 ``[T]``: estimated MoE time of each step including exposed transfers."""
        return self.moe_us + self.exposed_us

    def step_par_series(self) -> np.ndarray:
        """float64 ``[T]``: token-weighted mean PAR over the layers of each step."""
        total = self.tokens.sum(axis=1)
        weighted = (self.step_par * self.tokens).sum(axis=1)
        return np.where(total > 0, weighted / np.where(total > 0, total, 1.0), 1.0)

    def summary(self, static: "RunResult | None" = None) -> dict:
        """The run's figures as a JSON-ready dict (``static`` gives ``speedup_vs_static``)."""
        scored = slice(self.warmup, None)
        steps = summarize_par(self.step_par[scored], self.tokens[scored])
        first_window = int(np.searchsorted(self.window_start, self.warmup))
        windows = summarize_par(self.window_par[first_window:], self.window_tokens[first_window:])
        moved = [c.moved_slots for c in self.cycles]
        moved_bytes = [c.bytes_moved for c in self.cycles]
        total_us = float(self.step_us[scored].sum())
        out = {
            "step_par_mean": steps["par_mean"],
            "step_par_p99": steps["par_p99"],
            "step_par_max": steps["par_max"],
            "window_par_mean": windows["par_mean"],
            "cycles": len(self.cycles),
            "cycles_applied": sum(1 for c in self.cycles if c.layers),
            "cycles_skipped": sum(1 for c in self.cycles if c.skipped),
            "layers_per_cycle": float(np.mean([len(c.layers) for c in self.cycles])) if self.cycles else 0.0,
            "moved_slots_per_cycle": float(np.mean(moved)) if moved else 0.0,
            "bytes_moved_per_cycle": float(np.mean(moved_bytes)) if moved_bytes else 0.0,
            "bytes_moved_total": float(np.sum(moved_bytes)),
            "planner_ms": float(np.median(self.planner_ms)) if self.planner_ms else 0.0,
            "planner_ms_max": float(np.max(self.planner_ms)) if self.planner_ms else 0.0,
            "moe_ms_per_step": float(self.moe_us[scored].mean() / 1e3),
            "exposed_transfer_ms_per_step": float(self.exposed_us[scored].mean() / 1e3),
            "step_ms": total_us / 1e3 / max(1, len(self.moe_us[scored])),
            "speedup_vs_perfect": float(self.perfect_us[scored].sum() / total_us) if total_us > 0 else 1.0,
        }
        if static is not None:
            static_us = float(static.step_us[scored].sum())
            out["speedup_vs_static"] = static_us / total_us if total_us > 0 else 1.0
        if self.failures:
            out["failures"] = self.failure_summary()
        return out

    def failure_summary(self) -> dict:
        """Availability over the whole run (warm-up included): steps with an expert unavailable, expert-layer-steps
        unavailable, tokens that waited for a reload (and their share of all routed tokens), and each failure's
        figures."""
        waited = float(self.waiting.sum())
        routed = float(self.tokens.sum()) + waited
        return {
            "steps_with_unavailable_experts": int((self.unavailable.sum(axis=1) > 0).sum()),
            "unavailable_expert_layer_steps": int(self.unavailable.sum()),
            "tokens_waiting": waited,
            "tokens_waiting_share": waited / routed if routed > 0 else 0.0,
            "events": self.failures,
        }

    def per_layer(self) -> dict[str, list[float]]:
        """Token-weighted mean step PAR and window PAR of each layer."""
        def weighted(values, weights):
            total = weights.sum(axis=0)
            return np.where(total > 0, (values * weights).sum(axis=0) / np.where(total > 0, total, 1.0), 1.0)

        return {"step_par_mean": weighted(self.step_par, self.tokens).tolist(),
                "window_par_mean": weighted(self.window_par, self.window_tokens).tolist()}


def warmup_steps(cycle: CycleConfig, num_layers: int, num_steps: int) -> int:
    """Steps left out of the summaries: ``H + A + L``, at most half of the ``num_steps``."""
    return min(cycle.cycle_steps + cycle.planner_steps + num_layers, num_steps // 2)


def clairvoyant_cycle(cycle: CycleConfig) -> CycleConfig:
    """The cycle of a clairvoyant run: same window length, no planner delay, every layer applied at once."""
    return CycleConfig(cycle_steps=cycle.cycle_steps, planner_steps=0, layers_per_step=0)


def simulate(trace: Trace, policy: Policy | None, config: SimConfig, name: str | None = None,
             clairvoyant: bool = False, progress: Callable[[float], None] | None = None,
             initial: Placement | None = None) -> RunResult:
    """Replay ``trace`` with ``policy`` (None: static) and score every step.

    Args:
        trace: per-step load ``[T, L, E]``.
        policy: a :class:`~eplb.policies.base.Policy`, or None to keep the initial layout.
        config: topology, cycle, dispatch rule, cost model.
        name: the run's name (default: the policy's name, or "static").
        clairvoyant: plan each cycle on the steps it will be scored on (see the module docstring).
        progress: called with the fraction done (0..1) now and then.
        initial: the placement at step 0 (default: the ``config.layout`` initial placement); with ``policy=None``,
            a static map served throughout.

    Returns:
        A :class:`RunResult`.

    Raises:
        EplbError: the trace does not fit the topology.
    """
    topology = config.topology
    num_steps, num_layers, num_experts = trace.counts.shape
    topology.check_experts(num_experts)
    name = name or (policy.name if policy is not None else "static")
    initial = _initial_placement(trace, config, initial)
    report = progress or (lambda fraction: None)
    timeline = Timeline(initial.phy2log, num_steps)
    failed = failed_ranks(config.failures, topology, num_steps)
    failing = (failed & ~np.vstack([np.zeros((1, topology.num_ranks), dtype=bool), failed[:-1]])).any(axis=1)
    if policy is None:
        cycles, planner_ms, received, cycle_live = [], [], np.zeros(num_steps), []
        for step in np.flatnonzero(failing).tolist():
            if config.reload_lost:
                _reload_lost(timeline, trace, topology, ~failed[step], step, None)
    else:
        cycles, planner_ms, received, cycle_live = _replay(trace, policy, config, timeline, failed, failing,
                                                           clairvoyant, report)
    warmup = warmup_steps(config.cycle, num_layers, num_steps)
    result = score(trace, topology, config, timeline, warmup, report, failed if failed.any() else None)
    transfer_us = config.cost.transfer_us(received)
    moe_us = config.cost.moe_us(result["peak"])
    live_count = (~failed).sum(axis=1)
    return RunResult(
        name=name,
        step_par=result["step_par"],
        tokens=result["tokens"],
        window_start=np.arange(0, num_steps, config.cycle.cycle_steps),
        window_par=result["window_par"],
        window_tokens=result["window_tokens"],
        moe_us=moe_us,
        perfect_us=config.cost.moe_us(result["tokens"] / live_count[:, None]),
        transfer_us=transfer_us,
        exposed_us=config.cost.exposed_us(transfer_us, moe_us),
        rank_load=result["rank_load"],
        cycles=cycles,
        planner_ms=planner_ms,
        final=Placement.from_valid(timeline.current, num_experts, topology),
        warmup=warmup,
        waiting=result["waiting"],
        unavailable=result["unavailable"],
        live_count=live_count,
        failures=failure_events(config, result, failed, cycles, cycle_live),
    )


def _initial_placement(trace: Trace, config: SimConfig, initial: Placement | None) -> Placement:
    """The placement at step 0: ``initial`` checked against the trace, or the ``config.layout`` initial one; with
    resilience, its replicas spread (no load seen yet)."""
    topology = config.topology
    _, num_layers, num_experts = trace.counts.shape
    if initial is None:
        initial = Placement.initial(num_experts, topology, num_layers, layout=config.layout)
    elif initial.phy2log.shape != (num_layers, topology.num_physical) or initial.num_experts != num_experts:
        raise EplbError(f"initial placement is {initial.num_layers} layers x {initial.num_experts} experts on "
                        f"{initial.num_physical} slots; the trace has {num_layers} x {num_experts} on "
                        f"{topology.num_physical}")
    if config.resilience is not None:
        flat = np.ones((num_layers, num_experts))  # no load seen yet: spread replicas only
        initial = Placement(make_resilient(initial.phy2log, flat, topology, config.resilience), num_experts, topology)
    return initial


def _replay(trace, policy, config, timeline, failed, failing, clairvoyant, report):
    """The cycle driven step by step over the trace, as the runtime drives it: windows planned, parts applied to
    ``timeline`` once their transfers landed. Returns the cycle records, planner ms per plan, bytes received per
    step (``[T]``, the busiest receiver) and the live ranks each cycle planned for."""
    topology = config.topology
    num_steps, num_layers, _ = trace.counts.shape
    planner_ms: list[float] = []
    received = np.zeros(num_steps)
    cycle_live: list[np.ndarray] = []  # live ranks each cycle planned for
    cycle_config = clairvoyant_cycle(config.cycle) if clairvoyant else config.cycle
    cycle = Cycle(cycle_config, num_layers)
    plan = in_flight = None  # in_flight: (switch step, layers, rows or None)
    # each step's MoE time at perfect balance: how many forwards a transfer spans (free for the clairvoyant floor)
    nominal_us = config.cost.moe_us(trace.counts.sum(axis=-1, dtype=np.float64) / (~failed).sum(axis=1)[:, None])
    for step in range(num_steps):
        if failing[step]:
            cycle.restart(step, f"ranks {np.flatnonzero(failed[step]).tolist()} failed")
            in_flight = None
            if config.reload_lost:
                last = cycle.records[-1] if cycle.records else None
                _reload_lost(timeline, trace, topology, ~failed[step], step, last)
        if in_flight is not None and in_flight[0] == step:
            cycle.switched(step)
            if in_flight[2] is not None:
                timeline.apply(step, in_flight[1], in_flight[2])
            in_flight = None
        action = cycle.on_step(step)
        if action.submit:
            live = ~failed[step]
            cycle_live.append(live)
            try:
                plan = _plan(trace, policy, config, cycle, timeline, action.window_start, step, clairvoyant,
                             planner_ms, live)
                reason = "end of trace"
            except PolicyError as exc:  # too few live slots: keep serving on failover
                logger.warning("step %d: no plan over the live ranks: %s", step, exc)
                plan, reason = None, "too few live slots"
            if plan is None:
                cycle.plan_failed(step, reason)
            else:
                cycle.plan_ready(step, plan)
        if action.apply_layers and not np.array_equal(cycle_live[-1], ~failed[step]):
            logger.info("step %d: layers %s not applied: planned for other live ranks", step,
                        list(action.apply_layers))
            in_flight = (step + EARLIEST_SWITCH, action.apply_layers, None)
        elif action.apply_layers:
            parts = [plan.parts[index] for index in action.apply_parts]
            forwards = 1
            if not clairvoyant:  # the floor moves weights for free
                received[step] = _received_experts(parts, topology.num_ranks).max() * config.expert_bytes
                forwards = config.cost.transfer_forwards(received[step], nominal_us[step:])
            in_flight = (step + forwards + 1, action.apply_layers, [part.new_row for part in parts])
        if step % 256 == 0:
            report(0.5 * step / num_steps)
    return cycle.records, planner_ms, received, cycle_live


def _plan(trace, policy, config, cycle, timeline, window_start, step, clairvoyant, planner_ms, live):
    """The planning function on the window over the ``live`` ranks, from the state the cycle keeps; clairvoyant: on
    the steps the plan will be in force, fresh every cycle (a floor, not held back by what was planned before).
    None at the end."""
    topology = config.topology
    if clairvoyant:
        start = step + 1 + EARLIEST_SWITCH  # applied in step + 1, in force from step + 3
        window = trace.counts[start:start + (step - window_start)]
    else:
        window = trace.counts[window_start:step]
    if window.shape[0] == 0:
        return None
    if config.window_sum:
        window = window.sum(axis=0, dtype=np.float64)
    current = Placement.from_valid(timeline.current, trace.num_experts, topology)
    started = time.perf_counter()
    plan = plan_cycle(policy, window, current, cycle.planning_config, expert_bytes=int(round(config.expert_bytes)),
                      live_ranks=None if live.all() else live, resilience=config.resilience,
                      state=None if clairvoyant else cycle.state,
                      from_checkpoint=not config.reload_lost, price=config.cost.move_price(config.expert_bytes))
    planner_ms.append((time.perf_counter() - started) * 1e3)
    return plan


def _reload_lost(timeline: Timeline, trace: Trace, topology: Topology, live: np.ndarray, step: int,
                 last: CycleRecord | None) -> None:
    """Put every expert with no replica on the ``live`` ranks into the slot of a spare replica, in force from
    ``step + 1`` (the runtime's reload, on the load of the ``last`` submitted window)."""
    if last is None:
        load = np.ones((trace.num_layers, trace.num_experts))
    else:
        load = trace.counts[last.window_start:last.window_end].sum(axis=0, dtype=np.float64)
    try:
        repaired = reload_lost(timeline.current, load, topology, live)
    except PolicyError as exc:
        logger.warning("step %d: lost experts cannot be reloaded: %s", step, exc)
        return
    layers = np.flatnonzero((repaired != timeline.current).any(axis=1))
    timeline.apply(step + 1, layers, repaired[layers])


def _received_experts(parts: list, num_ranks: int) -> np.ndarray:
    """int64 ``[W]``: experts each rank receives over the network for ``parts`` (their transfers)."""
    targets = np.concatenate([part.moves[:, 2] for part in parts])
    return np.bincount(targets, minlength=num_ranks)
