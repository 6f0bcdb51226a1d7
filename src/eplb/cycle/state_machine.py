"""The rebalancing cycle: one state machine shared by the simulator (:mod:`eplb.sim`) and the runtime.

It only decides *when* things happen; it knows nothing about torch, processes or how a plan is computed. Both the
simulator and the runtime controller drive the same :class:`Cycle`, so what the simulator reports is what the
runtime does.

Phases, per cycle::

    COLLECT --(window of H steps recorded)--> PLAN --(plan ready, >= A steps later)--> APPLY --(last layer)--> COLLECT
                                               |  \\--(plan failed / no plan after deadline_steps)--> COLLECT (skipped)
                                               \\--(plan changes no layer worth applying)-----------> COLLECT (skipped)

Driving it (once per step, before the step's forward; steps are consecutive integers)::

    cycle = Cycle(CycleConfig(cycle_steps=H, planner_steps=A, deadline_steps=D), num_layers=L)
    # (plans: eplb.cycle.planning.plan_cycle(policy, window, current, cycle.planning_config, ..., state=cycle.state))
    for step in itertools.count():
        action = cycle.on_step(step)
        if action.submit:
            # the window is the steps [action.window_start, step): gather its load, hand it to the planner,
            # and start recording the next window (recording never stops).
            ...
        if action.poll:
            # runtime: ask the planner (never block). When a plan arrived: cycle.plan_ready(step, plan);
            # when it failed or came back invalid: cycle.plan_failed(step, reason). The simulator plans at once
            # and calls plan_ready in the submit step; the plan is then held back until step >= submitted + A.
            ...
        for layer, part in zip(action.apply_layers, action.apply_parts):
            # post this part's weight transfers (plan.parts[part]) before the forward; once they landed on
            # every rank (agreed), switch the layers and call cycle.switched(s) in that step s, before on_step(s):
            # the parts are in force from s on, and the next apply step can come in s.
            ...
        forward(step)

The apply rule: one apply step's parts are in flight at a time. Parts posted in step ``s`` are in force from step
``s + n + 1``, where ``n >= 1`` is the number of forwards their transfers span (they land during forward
``s + n - 1``): every rank reports that they landed in step ``s + n`` and that agreement is read in step ``s + n + 1``
(:data:`EARLIEST_SWITCH` is ``s + 2``). Until then the old placement serves, and serving never waits for a transfer.
The runtime learns ``n`` from its agreements, the simulator from its cost model
(:meth:`eplb.sim.cost.CostModel.transfer_forwards`). A transfer that fails, or misses its deadline, on some rank is
abandoned on every rank (:meth:`Cycle.abandon`): the rest of the plan is given up and the placement in force stays.

Which layers of a plan are applied, and in which steps, is decided by the planning function
(:func:`eplb.cycle.planning.plan_cycle`) from the options of :class:`CycleConfig`; the cycle hands the plan's schedule
out step by step (a layer split into parts to fit ``bytes_per_step`` is applied in consecutive steps, one part each)
and keeps the :class:`~eplb.cycle.planning.PlanState` of the last plan that came back (applied or "no gain"), for the
next call. A layer without change is never scheduled.

Every decision depends only on the calls made, so ranks that make the same calls in the same steps stay in
lock-step. :attr:`Cycle.records` keeps one :class:`CycleRecord` per submitted window.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from eplb.cycle.cadence import AdaptiveCadence, Cadence
from eplb.errors import CycleError

__all__ = ["Phase", "CycleConfig", "Action", "CycleRecord", "Cycle", "CycleError", "EARLIEST_SWITCH"]

#: steps from posting parts to their switch when their transfers land within the forward of the post step: they land
#: there, every rank reports it in the next step, and that agreement is read in the one after
EARLIEST_SWITCH = 2

class Phase(enum.Enum):
    COLLECT = "collect"
    PLAN = "plan"
    APPLY = "apply"


@dataclass(frozen=True)
class CycleConfig:
    """How a rebalancing cycle runs.

    Attributes:
        cycle_steps: H, steps of expert load in each planning window (>= 1); a cycle starts every H steps at most
            (the runtime's ``EplbConfig.cycle_steps``, ``eplb simulate --interval``).
        planner_steps: A, steps between submitting a window and applying its plan (the simulator's planner latency;
            the runtime leaves it 0 and polls). A plan is applied one step after submission at the earliest.
        deadline_steps: steps after submission after which a missing plan is given up (the cycle is skipped and
            serving goes on with the current placement); None waits forever.
        layers_per_step: layers applied per step; 0 applies every selected layer in one step.
        bytes_per_step: the most staging memory EPLB takes on any rank in any step, in bytes (overrides
            ``layers_per_step``): the received experts and the experts changing slot on the rank, and with
            ``host_staging`` also its sent and received experts in pinned host memory, each arena then within half
            (:mod:`eplb.cycle.staging`). A layer whose move does not fit is split into parts applied in consecutive
            steps, each a valid placement; changes that must go together and do not fit even alone are left out. Must
            be at least one expert's bytes (two with ``host_staging``). None: no bound.
        host_staging: the transfer backend stages sent and received experts in host memory too (the runtime's
            ``gloo`` backend on an accelerator).
        min_par: layers whose predicted PAR before is below this are left alone (already balanced).
        min_gain: apply a layer only if ``par_before - par_after > min_gain``.
        max_layers: apply at most this many layers per cycle, the largest gains first (None: no limit).
        similarity_threshold: when set (0..1), apply a layer only if the cosine similarity between its window load
            and its load when last applied (both max-normalised) is below it.
        window_steps: each plan is made on the last ``window_steps`` steps before its submit (never before the start
            or a restart): shorter than ``cycle_steps`` as vLLM's ``window_size`` < ``step_interval``, longer for a
            window that slides. None: the steps since the previous submit. Ignored with ``adaptive``.
        adaptive: an :class:`~eplb.cycle.cadence.AdaptiveCadence`: the interval and the window follow the load's drift
            (:mod:`eplb.cycle.cadence`); ``cycle_steps`` is then the first interval. None: a window every
            ``cycle_steps``.
    """

    cycle_steps: int
    planner_steps: int = 0
    deadline_steps: int | None = None
    layers_per_step: int = 1
    bytes_per_step: float | None = None
    host_staging: bool = False
    min_par: float = 1.0
    min_gain: float = 0.0
    max_layers: int | None = None
    similarity_threshold: float | None = None
    window_steps: int | None = None
    adaptive: AdaptiveCadence | None = None

    def __post_init__(self):
        def need(ok: bool, name: str, expected: str):
            if not ok:
                raise CycleError(f"{name} must be {expected}, got {getattr(self, name)!r}")

        need(_is_int(self.cycle_steps) and self.cycle_steps >= 1, "cycle_steps", "an integer >= 1")
        need(_is_int(self.planner_steps) and self.planner_steps >= 0, "planner_steps", "an integer >= 0")
        need(self.deadline_steps is None or (_is_int(self.deadline_steps) and self.deadline_steps >= 1),
             "deadline_steps", "None or an integer >= 1")
        need(self.deadline_steps is None or self.deadline_steps >= self.planner_steps, "deadline_steps",
             f">= planner_steps={self.planner_steps}")
        need(_is_int(self.layers_per_step) and self.layers_per_step >= 0, "layers_per_step", "an integer >= 0")
        need(self.bytes_per_step is None or self.bytes_per_step > 0, "bytes_per_step", "None or > 0")
        need(self.min_par >= 0, "min_par", ">= 0")
        need(self.min_gain >= 0, "min_gain", ">= 0")
        need(self.max_layers is None or (_is_int(self.max_layers) and self.max_layers >= 1), "max_layers",
             "None or an integer >= 1")
        need(self.similarity_threshold is None or 0 <= self.similarity_threshold <= 1, "similarity_threshold",
             "None or within [0, 1]")
        need(self.window_steps is None or (_is_int(self.window_steps) and self.window_steps >= 1), "window_steps",
             "None or an integer >= 1")
        need(self.adaptive is None or isinstance(self.adaptive, AdaptiveCadence), "adaptive",
             "None or an eplb.cycle.cadence.AdaptiveCadence")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Action:
    """What to do in one step (returned by :meth:`Cycle.on_step`).

    Attributes:
        step: the step this action is for.
        phase: the phase the cycle is in during this step.
        submit: hand the window ``[window_start, step)`` to the planner now (and start the next window).
        window_start: first step of the window being recorded (of the submitted window when ``submit``).
        poll: a plan is awaited: check the planner (runtime) without blocking.
        apply_layers: layers whose new placement to transfer in this step (post before the forward); in force from
            the step :meth:`Cycle.switched` reports, ``step + 2`` at the earliest.
        apply_parts: for each of ``apply_layers``, the index of its part in the plan's ``transfers``.
        skipped: why the cycle was abandoned in this step ("late", "failed: ...", "no gain"), else None.
    """

    step: int
    phase: Phase
    submit: bool = False
    window_start: int = 0
    poll: bool = False
    apply_layers: tuple[int, ...] = ()
    apply_parts: tuple[int, ...] = ()
    skipped: str | None = None


@dataclass
class CycleRecord:
    """One cycle, from its window to its last applied layer.

    Attributes:
        window_start, window_end: the planning window is steps ``[window_start, window_end)``; submitted at
            ``window_end``.
        ready_step: step in which the plan was reported (None when it never came).
        apply_start, apply_end: first and last step in which layers were applied (their transfers posted; None when
            none).
        layers: layers applied, in order.
        schedule: the layers applied in each apply step, from ``apply_start`` on (a layer split into parts appears
            once per part).
        switch_steps: the step each apply step's parts came into force (one per switched entry of ``schedule``).
        deferred_steps: steps the switches waited beyond :data:`EARLIEST_SWITCH` for transfers that took more than
            one forward (0 when every transfer landed within the forward it was posted in).
        moved_slots: slots moved over the applied layers.
        bytes_moved: bytes moved over the network for the applied layers (their transfers x expert bytes).
        par_before, par_after: predicted PAR (mean over the applied layers) before / after, on the window.
        skipped: why nothing was applied, or None.
        checksum: :attr:`eplb.cycle.planning.CyclePlan.checksum` of the plan (placement, transfers, schedule), 0 when no
            plan came.
    """

    window_start: int
    window_end: int
    ready_step: int | None = None
    apply_start: int | None = None
    apply_end: int | None = None
    layers: list[int] = field(default_factory=list)
    schedule: list[tuple[int, ...]] = field(default_factory=list)
    switch_steps: list[int] = field(default_factory=list)
    deferred_steps: int = 0
    moved_slots: int = 0
    bytes_moved: int = 0
    par_before: float = float("nan")
    par_after: float = float("nan")
    skipped: str | None = None
    checksum: int = 0

    @property
    def in_force_step(self) -> int | None:
        """The step from which every applied part is in force (None when nothing was applied, or the last part
        never switched)."""
        if not self.switch_steps or len(self.switch_steps) < len(self.schedule):
            return None
        return self.switch_steps[-1]


class Cycle:
    """The rebalancing state machine (see the module docstring for how to drive it).

    Args:
        config: a :class:`CycleConfig`.
        num_layers: L, MoE layers; plans must cover all of them.
    """

    def __init__(self, config: CycleConfig, num_layers: int):
        if not isinstance(config, CycleConfig):
            raise CycleError(f"config must be a CycleConfig, got {type(config).__name__}")
        if not _is_int(num_layers) or num_layers < 1:
            raise CycleError(f"num_layers must be an integer >= 1, got {num_layers!r}")
        self.config = config
        self.num_layers = int(num_layers)
        self.phase = Phase.COLLECT
        self.records: list[CycleRecord] = []
        self._last_step: int | None = None
        self._window_start: int | None = None
        self._submitted: int | None = None
        self._plan_ready = False
        self._failed: str | None = None
        self._queue: list[tuple[tuple[int, ...], tuple[int, ...]]] = []  # apply steps to come: (layers, parts)
        self._in_flight: int | None = None  # the step the parts in flight were posted in
        self._plan = None
        #: the :class:`~eplb.cycle.planning.PlanState` of the last plan that came back, applied or not (None before the
        #: first)
        self.state = None
        #: the collect side: when a window closes and where it starts (fixed or adaptive, :mod:`eplb.cycle.cadence`)
        self.cadence = Cadence(config)

    @property
    def planning_config(self) -> CycleConfig:
        """The config to plan the window just submitted with (:func:`eplb.cycle.planning.plan_cycle`): :attr:`config`,
        with ``cycle_steps`` the plan's life when the window is not one interval long (:mod:`eplb.cycle.cadence`)."""
        return self.cadence.planning_config

    @property
    def in_flight(self) -> int | None:
        """The step the parts in flight were posted in (None when none is)."""
        return self._in_flight

    @property
    def pending_layers(self) -> tuple[int, ...]:
        """Layers of the current plan still to apply (a part or more), in order."""
        return tuple(dict.fromkeys(layer for layers, _ in self._queue for layer in layers))

    def on_step(self, step: int, end_window: bool | None = None) -> Action:
        """Advance to ``step`` (call once per step, before its forward) and say what to do in it. ``end_window``:
        whether a window ends now, when the caller's clock decides (None: after ``cycle_steps`` steps)."""
        if not _is_int(step):
            raise CycleError(f"step must be an integer, got {step!r}")
        step = int(step)
        if self._last_step is not None and step != self._last_step + 1:
            raise CycleError(f"steps must be consecutive: got step {step} after step {self._last_step}")
        self._last_step = step
        if self._window_start is None:
            self._window_start = step
            self.cadence.restart(step)
        skipped = None
        if self.phase is Phase.PLAN:
            skipped = self._check_plan(step)
            if self.phase is Phase.PLAN:
                return Action(step, Phase.PLAN, window_start=self._window_start, poll=not self._plan_ready)
        if self.phase is Phase.APPLY:
            return self._apply(step)
        if self.cadence.due(step, self._window_start) if end_window is None else end_window:
            start, self._window_start = self.cadence.window_start(step, self._window_start), step
            self.records.append(CycleRecord(window_start=start, window_end=step))
            self.phase, self._submitted, self._plan_ready, self._failed = Phase.PLAN, step, False, None
            return Action(step, Phase.PLAN, submit=True, window_start=start, poll=True, skipped=skipped)
        return Action(step, Phase.COLLECT, window_start=self._window_start, skipped=skipped)

    def plan_ready(self, step: int, plan) -> tuple[int, ...]:
        """Report the plan of the submitted window; returns the layers that will be applied, in order.

        Args:
            step: the current step (the submit step or a later one).
            plan: the :class:`~eplb.cycle.planning.CyclePlan` of :func:`eplb.cycle.planning.plan_cycle`.
        """
        self._expect_plan(step)
        if np.shape(plan.par_before) != (self.num_layers,):
            raise CycleError(f"the plan covers {np.shape(plan.par_before)} layers, the cycle {self.num_layers}")
        order = list(plan.layers)
        record = self.records[-1]
        record.ready_step = int(step)
        record.checksum = plan.checksum
        if order:
            record.layers = order
            record.moved_slots = int(plan.moved_slots[order].sum())
            record.bytes_moved = int(plan.layer_bytes[order].sum())
            record.par_before = float(plan.par_before[order].mean())
            record.par_after = float(plan.par_after[order].mean())
        self._queue, first = [], 0
        for layers in plan.schedule:  # the i-th layer named by the schedule applies the plan's i-th part
            self._queue.append((tuple(layers), tuple(range(first, first + len(layers)))))
            first += len(layers)
        self._plan = plan
        self._plan_ready = True
        self.cadence.observe(plan, order)  # adaptive cadence: the next window's interval and start
        return tuple(order)

    def switched(self, step: int) -> None:
        """Report that the parts in flight are in force from ``step`` (call in that step, before :meth:`on_step`):
        the next apply step can come in ``step``."""
        if self._in_flight is None or self._last_step is None or step <= self._in_flight:
            raise CycleError(f"step {step}: no parts in flight to switch")
        record = self.records[-1]
        record.switch_steps.append(int(step))
        record.deferred_steps += int(step) - self._in_flight - EARLIEST_SWITCH
        self._in_flight = None
        if not self._queue:
            self.phase = Phase.COLLECT

    def abandon(self, step: int, reason: str) -> None:
        """Give up the parts in flight and the rest of the plan in ``step`` (a transfer failed, or missed its
        deadline, on some rank; every rank calls it in the same step): the placement in force stays."""
        if self._in_flight is None:
            raise CycleError(f"step {step}: no parts in flight to abandon")
        self.records[-1].skipped = reason
        self.records[-1].apply_end = self._in_flight
        self._queue, self._in_flight, self.phase = [], None, Phase.COLLECT

    def plan_failed(self, step: int, reason: str) -> None:
        """Report that the planner failed (crashed, invalid plan, ...): the cycle is skipped at the next step."""
        self._expect_plan(step)
        self._failed = f"failed: {reason}"

    def restart(self, next_step: int, reason: str) -> None:
        """Give up the cycle in progress (its plan, and the layers it has not applied yet) and start a new window at
        ``next_step``, the next step :meth:`on_step` will see. Ranks that lost step agreement (a rank failure
        caught in different steps) call it with the same ``next_step`` and are in lock-step again."""
        if not _is_int(next_step) or (self._last_step is not None and next_step <= self._last_step):
            raise CycleError(f"next_step must be an integer after the last step {self._last_step}, got {next_step!r}")
        if self.phase is not Phase.COLLECT and self.records:
            record = self.records[-1]
            record.skipped = reason
            if self.phase is Phase.APPLY:
                record.apply_end = int(next_step) - 1
        self.phase = Phase.COLLECT
        self._queue, self._plan, self._plan_ready, self._failed = [], None, False, None
        self._in_flight = None
        self._last_step = int(next_step) - 1
        self._window_start = int(next_step)
        self.cadence.restart(int(next_step))

    # -- internals ----------------------------------------------------------------------------------------------
    def _expect_plan(self, step: int) -> None:
        if self.phase is not Phase.PLAN or self._plan_ready or self._failed:
            raise CycleError(f"step {step}: no plan is awaited (phase {self.phase.value})")
        if self._last_step is None or step != self._last_step:
            raise CycleError(f"plan reported for step {step} during step {self._last_step}")

    def _check_plan(self, step: int) -> str | None:
        """Move out of PLAN when the plan can be applied, failed or is late; returns the skip reason."""
        waited = step - self._submitted
        reason = None
        if self._failed:
            reason = self._failed
        elif self._plan_ready:
            if waited < max(1, self.config.planner_steps):
                return None
            if self._queue:
                self.phase = Phase.APPLY
                self.records[-1].apply_start = step
                self.state = self._plan.state
                return None
            self.state = self._plan.state  # a plan that applies nothing still hands on (e.g. an unspent budget)
            reason = "no gain"
        elif self.config.deadline_steps is not None and waited >= self.config.deadline_steps:
            reason = "late"
        else:
            return None
        self.records[-1].skipped = reason
        self.phase = Phase.COLLECT
        return reason

    def _apply(self, step: int) -> Action:
        if self._in_flight is not None:  # the last parts have not switched: nothing new is posted
            return Action(step, Phase.APPLY, window_start=self._window_start)
        layers, parts = self._queue.pop(0)
        record = self.records[-1]
        record.schedule.append(layers)
        if not self._queue:
            record.apply_end = step
        self._in_flight = step
        return Action(step, Phase.APPLY, window_start=self._window_start, apply_layers=layers, apply_parts=parts)
