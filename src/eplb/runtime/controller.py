"""EplbController: dynamic expert load balancing inside a serving engine, driven by two hooks per step.

Where to call it (every rank of the EP group, every step, dummy steps included, so all ranks stay in lock-step)::

    ctl = EplbController(EplbConfig.from_dict(user_cfg), num_layers=L, num_experts=E, topology=topo,
                         rank=ep_rank, layer_tensors=[[moe.w13, moe.w2, moe.w13_scale] for moe in moe_layers],
                         group=ep_group, device=device)       # stream=: the stream the forward runs on
    # ctl.placement.rank_table[:, ep_rank] says which expert each local slot holds at start (load weights so)
    while serving:
        ctl.before_forward(is_prefill=batch_has_prefill)      # same value on every rank
        for l, moe in enumerate(moe_layers):                    # inside the forward
            slots = ctl.route(l, topk_ids)                      # logical ids -> physical slots, recorded on device
            ...dispatch tokens to slots, compute, combine...
        ctl.after_forward()
    ctl.close()

What runs where (see :mod:`eplb.runtime.transport`): the serving thread only launches device ops, submits jobs and
reads ``Future.done()``. EPLB's side thread gathers each window on a Gloo group of its own and asks the planner
worker, which answers with the plan, its checksum and this rank's recipes and switch tables ready-made
(:mod:`eplb.runtime.recipes`); it moves each part's rows. The ranks agree with asynchronous all-reduces of a few
integers on another group (:class:`~eplb.runtime.agreement.Agreement`), so an agreement never queues behind a
transfer. The serving group carries only the model's collectives. A late transfer never makes serving wait: posted parts switch at the first step at which every
rank knows they landed everywhere, ``s + 2`` at the earliest (:mod:`eplb.runtime.landing`); the serving thread waits
only if an agreement has not finished one step after it started (a hung peer; :attr:`CycleMetrics.late_steps`).

Failures: a planner that crashes, hangs past ``planner_deadline_s``, raises or plans an invalid placement makes every
rank skip the cycle together. If EPLB's own threads die or their work raises, every rank turns EPLB off together
(one error log, the metric ``eplb_disabled_total``) and serving goes on with the placement in force. A rank failure
is the engine's to notice (a collective raises, or EPLB's heartbeat declares it: :meth:`EplbController.failed_peers`);
it then calls :meth:`EplbController.fail_ranks` on every survivor (see :mod:`eplb.runtime.failover`).

Modes: ``dynamic`` plans and moves; ``record`` plans and writes the map (vllm-ascend JSON) to ``record_path`` every
cycle, moves nothing and keeps attributing load through the placement actually in force; ``static`` loads
``map_path`` at start and only records (the window's PAR measured on the side thread); ``off`` only routes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from eplb.cycle import Cycle, Phase
from eplb.cycle.planning import cycle_policy
from eplb.errors import EplbError, EplbFailure
from eplb.placement import Placement
from eplb.runtime.agreement import Status
from eplb.runtime.config import EplbConfig
from eplb.runtime.export import CycleMetrics, PrometheusExporter, count_event, log_cycle
from eplb.runtime.failover import FailoverReport, fail_over
from eplb.runtime.heartbeat import watch
from eplb.runtime.landing import PendingSwitch, land
from eplb.runtime.in_force import PlacementInForce
from eplb.runtime.mover import ExpertMover, check_tensors
from eplb.runtime.planner import PlannerReply, PlannerWorker, PlanRequest, worker_main
from eplb.runtime.recorder import LoadRecorder
from eplb.runtime.round import Agreed, PlanRound, failure_of
from eplb.runtime.router import ReplicaRouter
from eplb.runtime.startup import (check_budget, controller_policy_options, cycle_config, describe, ring_steps,
                                  start_placement)
from eplb.runtime.timing import UpdateTimer
from eplb.runtime.transport import SideChannel, runtime_device
from eplb.runtime.window_end import WindowEnd, static_window, write_record
from eplb.topology import Topology

__all__ = ["EplbController", "CycleMetrics", "FailoverReport", "STEP_KINDS"]

#: the kinds of step the serving thread sees: nothing to do, a planner poll, a poll that starts an agreement, a window
#: end, parts' transfers posted, posted parts waiting for every rank to report them landed, parts switched (a step
#: can be several)
STEP_KINDS = ("ordinary", "poll", "check", "submit", "move", "landing", "switch")

log = logging.getLogger(__name__)


_policy_options = controller_policy_options  # the old name


class EplbController:
    """Ties recorder, router, planner worker and mover to the :class:`eplb.cycle.Cycle` state machine.

    Args:
        config: validated settings.
        num_layers, num_experts: L MoE layers, E logical experts per layer.
        topology: the EP group's shape (``num_ranks`` = the group's size).
        rank: this rank's index in the EP group.
        layer_tensors: ``layer_tensors[l]`` = the live per-expert tensors of layer ``l`` on this rank, each
            ``[K, ...]`` (weights, scales, biases; any dtype: moved as bytes). Needed in ``dynamic`` mode only.
        group: the EP process group (None: default group). Collectives run on tensors on ``device``.
        device: device of the MoE layers (recorder and router tables live there); ``cuda`` means the current one.
        placement: the placement the weights were loaded with; default: the map file, else vLLM's initial layout.
        recorder_source: ``"ids"`` (:meth:`route` records the physical ids) or ``"counts"`` (the engine calls
            ``recorder.record_counts`` with its kernel's per-slot counts).
        tp_size: for the ``rank`` router rule.
        planner_target: the worker loop (tests inject crashing or hanging workers).
        expert_loader: ``expert_loader(layer, expert)`` -> the tensors of one logical expert, one per entry of
            ``layer_tensors[layer]`` and shaped like one of its slots (``t[0]``), read from a checkpoint or a host
            copy. Used only after a rank failure, for experts with no surviving replica (:meth:`fail_ranks`).
        stream: the CUDA stream the forward runs on (default: the current stream now): EPLB records its events on
            it and issues its hooks' device ops on it.

    Raises:
        EplbError: bad arguments, a device, stream or communicator the runtime cannot use, or expert tensors that
            cannot be moved (nothing is started).
    """

    def __init__(self, config: EplbConfig, num_layers: int, num_experts: int, topology: Topology, rank: int,
                 layer_tensors=None, group=None, device="cpu", placement: Placement | None = None,
                 recorder_source: str = "ids", tp_size: int = 1, planner_target=worker_main, expert_loader=None,
                 stream=None):
        if not isinstance(config, EplbConfig):
            raise EplbError(f"config must be an EplbConfig (use EplbConfig.from_dict), got {type(config).__name__}")
        if dist.is_initialized() and dist.get_world_size(group) != topology.num_ranks:
            raise EplbError(f"the EP group has {dist.get_world_size(group)} ranks, the topology {topology.num_ranks}")
        self.config, self.rank, self.group, self.topology = config, rank, group, topology
        self.device = runtime_device(device)
        placement = start_placement(config, placement, num_layers, num_experts, topology)
        self.num_experts = num_experts
        self.router = ReplicaRouter(placement, rank, config.dispatch, tp_size, self.device)
        self._policy_options = controller_policy_options(config)
        planning = config.mode in ("dynamic", "record")
        self.recorder = LoadRecorder(num_layers, num_experts, topology.num_ranks, topology.slots_per_rank, rank,
                                     recorder_source, ring_steps(config, self._policy_options), config.stage,
                                     self.device)
        #: the placement in force and the failed ranks: the one owner, which the router and the recorder follow
        self.in_force = PlacementInForce(placement, rank, self.router, self.recorder)
        self.mover = None
        self._layer_tensors = None if layer_tensors is None else [list(ts) for ts in layer_tensors]
        self.expert_loader = expert_loader
        self.failovers: list[FailoverReport] = []
        # the gloo backend on an accelerator stages in pinned host memory too: each arena within half the budget
        host_staging = config.transfer_backend == "gloo" and self.device.type != "cpu"
        self._expert_bytes = np.zeros(num_layers, dtype=np.int64)
        if config.mode == "dynamic":
            self._expert_bytes = check_tensors(layer_tensors, num_layers, topology.slots_per_rank, self.device)
            check_budget(config, self._expert_bytes, host_staging)
        #: EPLB's side threads, groups and stream (transfers, agreements, window gathers); None in ``off`` mode
        self.channel = (SideChannel(group, config.transfer_backend, self.device, config.enable_migration_batching,
                                    stream=stream) if config.mode != "off" else None)
        self._stream = self.channel.serving_stream if self.channel is not None else None
        #: what this rank's switch tables depend on (the planner worker builds them; None: nothing moves)
        self._spec = None
        if config.mode == "dynamic":
            self.mover = ExpertMover(layer_tensors, rank, topology.slots_per_rank, group, self.channel)
            self._spec = dataclasses.replace(self.router.spec, recorder_source=self.recorder.source)
        self.planner = None
        if planning:
            self.planner = PlannerWorker(config.planner_deadline_s, planner_target,
                                         warmup=(config.policy, self._policy_options, config.dispatch))
            self.planner.start()
        self.cycle = Cycle(cycle_config(config, host_staging), num_layers)
        self.metrics: list[CycleMetrics] = []
        self.step = 0
        self._in_step = False  # between before_forward and after_forward
        #: the plan of the last window, from its window end to its acceptance (None when none is in flight)
        self.round: PlanRound | None = None
        self._window_load: np.ndarray | None = None
        #: the accepted plan being applied (its parts' recipes and switch tables), and its parts by index
        self._reply: PlannerReply | None = None
        self.parts: dict = {}
        #: parts posted and not yet switched
        self.pending: PendingSwitch | None = None
        self._static_job = None
        #: why EPLB turned itself off (None while it runs): serving goes on with the placement in force
        self.disabled: str | None = None
        #: what the last :meth:`before_forward` did, of :data:`STEP_KINDS` (benchmarks and tests classify steps)
        self.step_kinds: list[str] = ["ordinary"]
        # what a move and a step cost here, for the next plan's price (eplb.cycle.pricing.measured_price)
        self._step_started: float | None = None
        self._step_s: collections.deque = collections.deque(maxlen=max(1, config.window_steps))
        self._move_s, self._moved_experts = 0.0, 0
        #: the side thread's window-end job (gather, PAR, interval, price, planner request)
        self._window_end = None
        if planning:
            prices_moves = (self.mover is not None
                            and cycle_policy(config.policy, self._policy_options, config.dispatch).prices_moves)
            self._window_end = WindowEnd(config, self.recorder, self.planner, prices_moves, config.cycle_steps)
        self._prometheus = PrometheusExporter(config.prometheus_port) if config.prometheus_port and rank == 0 else None
        #: xLLM's seconds-based cycle start (None: windows end by the step count)
        self._timer = (UpdateTimer(config.update_interval_s, config.planner_check_steps)
                       if planning and config.update_interval_s else None)
        if rank == 0:
            log.info("eplb: %s", describe(config))
        #: EPLB's failure detector (:mod:`eplb.runtime.heartbeat`; None unless ``heartbeat_interval_s`` is set)
        self.heartbeat = watch(self)

    # -- hooks --------------------------------------------------------------------------------------------------
    def route(self, layer: int, expert_ids: torch.Tensor, group_counts: torch.Tensor | None = None,
              valid: torch.Tensor | None = None) -> torch.Tensor:
        """Physical slots for the logical ``expert_ids`` ``[N, k]`` of ``layer`` (see :class:`ReplicaRouter`), and
        record them when the recorder counts ids; ``valid`` bool ``[N]`` marks the real tokens of a padded batch
        (padding is routed but not counted). Device ops only, nothing read on the host: safe to capture in a CUDA
        graph."""
        slots = self.router.route(layer, expert_ids, group_counts)
        if self.recorder.source == "ids":
            self.recorder.record_ids(layer, slots, valid)
        return slots

    def before_forward(self, is_prefill: bool = False) -> None:
        """Call before every forward step (same step on every rank; ``is_prefill`` the same on every rank)."""
        if self.config.mode == "off" or self.disabled:
            return
        self._in_step = True
        now = time.perf_counter()
        if self._step_started is not None:
            self._step_s.append(now - self._step_started)
            if self._prometheus is not None:
                self._prometheus.step(now - self._step_started)
        self._step_started = now
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            if self.config.mode == "static":
                self.step_kinds = ["submit"] if self._static_window() else ["ordinary"]
                self.recorder.begin_step(is_prefill)
                return
            kinds = self._steps(is_prefill)
        self.step_kinds = kinds or ["ordinary"]

    def _steps(self, is_prefill: bool) -> list[str]:
        kinds = []
        if self.pending is not None:
            kinds.append(land(self))
        elif self.mover is None and self.cycle.in_flight is not None:  # record mode: nothing moves
            self.cycle.switched(self.step)
            self._end_of_apply()
        if self.disabled:
            return kinds
        if self.round is not None and self.round.gathered() and self.round.window is not None:
            self._window_load = self.round.record(self.metrics)
        due = self._timer.due(self.step, self.channel, self.cycle.phase is Phase.COLLECT) if self._timer else None
        action = self.cycle.on_step(self.step, due)
        if action.skipped:
            self._skip(action.skipped)
        if action.submit:  # the window is the steps before this one: gather it before this step records
            self._submit(action.window_start)
            kinds.append("submit")
        self.recorder.begin_step(is_prefill)
        if action.poll and self.round is not None:
            kinds.append("check" if self._poll() else "poll")
        if action.apply_layers and self.mover is not None and not self.disabled:
            parts = action.apply_parts
            move = self.mover.post([self._reply.moves[p] for p in parts], [self._reply.switches[p] for p in parts],
                                   self.in_force.upload)
            self.pending = PendingSwitch(parts, self.step, move)
            kinds.append("move")
        return kinds

    def after_forward(self) -> None:
        """Call after every forward step."""
        if self.config.mode == "off" or self.disabled:
            return
        self.step += 1
        self._in_step = False

    def record_move(self, seconds: float, experts: int) -> None:
        """The side thread's seconds for a move of ``experts`` received here (the measured price of a move)."""
        self._move_s += seconds
        self._moved_experts += experts

    def _end_of_apply(self) -> None:
        """The cycle's last parts switched (or record mode's schedule ended): the cycle is logged."""
        if self.cycle.phase is Phase.COLLECT:
            log_cycle(self.metrics[-1], self.config.mode == "record")
            self._export(self.metrics[-1])

    # -- plans ----------------------------------------------------------------------------------------------------
    def _submit(self, window_start: int) -> None:
        """Window end: the recorder's buffers are copied on the device and everything else (gather on the side
        group, PAR, the interval agreement, the planner request) runs on the side thread."""
        failed = self.in_force.failed
        self.metrics.append(CycleMetrics(cycle=len(self.metrics), submit_step=self.step,
                                         window_par=np.full(self.in_force.phy2log.shape[0], np.nan)))
        request = PlanRequest(self.metrics[-1].cycle, None, self.in_force.phy2log.copy(), self.topology,
                              self.config.policy, self._policy_options, dispatch=self.config.dispatch,
                              cycle_config=self.cycle.planning_config, expert_bytes=self._expert_bytes,
                              live_ranks=~failed if failed.any() else None, resilience=self.config.resilience,
                              state=self.cycle.state, spec=self._spec)
        # what a move and a step cost on this rank (for the plan's price; agreed on the side thread)
        measured = (self._move_s / self._moved_experts if self._moved_experts else 0.0, list(self._step_s))
        gathering = self.channel.submit(self._window_end.run, self.channel, self.recorder.snapshot(),
                                        self.channel.record_event(), request, failed.copy(), self.step, measured,
                                        window_start)
        self.round = PlanRound(self.metrics[-1].cycle, self.step, gathering)

    def _poll(self) -> bool:
        """A poll step (see :meth:`PlanRound.poll`); whether it started an agreement."""
        agreed, late, started = self.round.poll(self.config.check_step(self.step - self.round.submitted), self.channel,
                                                self.planner)
        self.metrics[-1].late_steps += int(late)
        if agreed is not None:
            self._decide(agreed)
        return started

    def _decide(self, agreed: Agreed) -> None:
        """What every rank agreed on the plan: accept it, skip the cycle, or turn EPLB off."""
        plan_round, self.round = self.round, None
        if agreed.status is Status.OFF:
            self.disable(plan_round.reason if plan_round.status is Status.OFF
                         else "EPLB's threads failed on another rank")
        elif agreed.status < Status.PENDING:
            self.cycle.plan_failed(self.step, plan_round.reason or "the planner of another rank failed")
        elif agreed.same:
            self._accept(plan_round.reply)
        else:
            self.cycle.plan_failed(self.step, "ranks computed different plans (checksums differ)")

    def _accept(self, reply: PlannerReply) -> None:
        plan = reply.plan
        current = self.metrics[-1]
        current.par_before, current.par_after, current.planner_s = plan.par_before, plan.par_after, reply.seconds
        layers = list(self.cycle.plan_ready(self.step, plan))
        current.planned_layers = layers
        current.skipped_layers = plan.skipped_layers
        current.moved_slots = int(plan.moved_slots[layers].sum())
        current.bytes_moved = int(plan.layer_bytes[layers].sum())
        if self.config.mode == "record":
            if self.rank == 0:  # written by the side thread, never inside a step
                self.channel.submit(write_record, Placement(plan.phy2log, self.num_experts, self.topology),
                                    self.config.record_path, current.cycle)
            return
        self._reply, self.parts = reply, dict(enumerate(plan.parts))

    def _skip(self, reason: str) -> None:
        current = self.metrics[-1]
        current.skipped = reason
        self.round = None
        self.channel.submit(self.planner.restart_if_busy)  # a restart takes milliseconds: not in a step
        level = logging.INFO if reason == "no gain" else logging.WARNING
        log.log(level, "eplb cycle %d skipped at step %d: %s; serving continues on the current placement",
                current.cycle, self.step, reason)
        self._export(current)

    def _static_window(self) -> bool:
        """Static mode: at a window end, the window's PAR is measured and logged on the side thread (the recorder's
        buffers copied on the device here); whether this step ended a window."""
        if not (self.step and self.step % self.config.window_steps == 0):
            return False
        last = self._static_job
        if last is not None and last.done() and failure_of(last) is not None:
            self.disable(f"the window gather failed: {failure_of(last)}")
            return False
        self._static_job = self.channel.submit(static_window, self.channel, self.recorder, self.recorder.snapshot(),
                                               self.channel.record_event(), self.placement, self.in_force.failed.copy(),
                                               self.step, self.config.log_balancedness)
        return True

    def _export(self, current: CycleMetrics) -> None:
        if self._prometheus is not None:
            self._prometheus.update(current, self.config.mode == "record")

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def disable(self, reason: str) -> None:
        """Turn EPLB off for the rest of the job (every rank does it in the same step when it is agreed): one error
        log, ``eplb_disabled_total``; serving goes on with the placement in force, which no longer changes."""
        if self.disabled:
            return
        self.disabled = reason
        log.error("eplb turned itself off at step %d: %s; serving goes on with the placement in force", self.step,
                  reason)
        count_event(self._prometheus, "disabled", "Times EPLB turned itself off (its own threads failed)")
        if self.metrics and self.cycle.phase is not Phase.COLLECT:
            self.metrics[-1].skipped = f"EPLB turned off: {reason}"
        self.pending = self.round = None
        if self.channel is not None:
            self.channel.abort(EplbFailure(f"EPLB is off: {reason}"))
            self.channel.close(wait=False)
        if self.planner is not None:
            self.planner.close(wait=False)

    @property
    def failed(self) -> np.ndarray:
        """bool ``[W]``: ranks that failed (:meth:`fail_ranks`); all False while every rank serves."""
        return self.in_force.failed

    @property
    def placement(self) -> Placement:
        """The placement in force on this rank now (switched layer by layer as plans are applied)."""
        return self.in_force.placement

    @property
    def transfers(self) -> dict:
        """Deprecated spelling of :attr:`parts`."""
        warnings.warn("EplbController.transfers is now EplbController.parts (transfers goes in the next release)",
                      DeprecationWarning, stacklevel=2)
        return self.parts

    @property
    def live(self) -> PlacementInForce:
        """Deprecated spelling of :attr:`in_force` ("live" now names only the ranks still serving)."""
        warnings.warn("EplbController.live is now EplbController.in_force (live goes in the next release)",
                      DeprecationWarning, stacklevel=2)
        return self.in_force

    def failed_peers(self) -> list[int]:
        """The EP ranks the heartbeat declared failed so far, agreed by every survivor (never blocks; empty without
        a heartbeat). Fail over with :meth:`fail_ranks` when it lists ranks not yet in :attr:`failed`."""
        return self.heartbeat.failed_peers() if self.heartbeat is not None else []

    def fail_ranks(self, ranks, group=None) -> FailoverReport:
        """Keep serving after ``ranks`` (ids or a bool mask ``[W]``) failed: call on every surviving rank between two
        steps, collective over ``group``, the survivors' process group (:func:`eplb.runtime.failover.fail_over`).

        Raises:
            EplbError: bad ranks (out of range, this rank, every rank), a group that does not hold exactly the live
                ranks, fewer live slots than experts (the error names the experts left out; nothing was changed),
                or experts to load and no ``expert_loader`` (or no ``layer_tensors``) to load them with.
        """
        report = fail_over(self, ranks, group)
        self.failovers.append(report)
        return report

    def added_memory(self) -> dict:
        """Bytes EPLB adds on this rank: ``redundant_slots`` (expert weights beyond ``E / W`` slots),
        ``staging`` (transfer arenas, device and pinned host), ``tables`` (router tables and recorder buffers), and
        their ``total``."""
        spare = self.topology.slots_per_rank - self.num_experts / self.topology.num_ranks
        tensors = [self.router.tables, self.recorder.window, self.recorder.folded, self.recorder.ring,
                   self.recorder.ring_folded]
        out = {"redundant_slots": int(round(spare * float(self._expert_bytes.sum()))),
               "staging": self.mover.staging_bytes if self.mover is not None else 0,
               "tables": sum(t.numel() * t.element_size() for t in tensors if t is not None)}
        out["total"] = sum(out.values())
        return out

    def close(self) -> None:
        """Stop the heartbeat, the planner worker and EPLB's threads. Call once when serving ends (parts still in
        flight are dropped: they never switch)."""
        if self.heartbeat is not None:
            self.heartbeat.close()
        if self.planner is not None:
            self.planner.close()
        if self.channel is not None:
            self.channel.close(wait=not self.disabled)
        if self._prometheus is not None:
            self._prometheus.close()
