"""EplbController: dynamic expert load balancing inside a serving engine, driven by two hooks per step.

Where to call it (every rank of the EP group, every step, dummy steps included, so all ranks stay in lock-step)::

    ctl = EplbController(EplbConfig.from_dict(user_cfg), num_layers=L, num_experts=E, topology=topo,
                         rank=ep_rank, layer_tensors=[[moe.w13, moe.w2, moe.w13_scale] for moe in moe_layers],
                         group=ep_group, device=device)
    # ctl.placement.rank_table[:, ep_rank] says which expert each local slot holds at start (load weights so)
    while serving:
        ctl.before_forward(is_prefill=batch_has_prefill)      # same value on every rank
        for l, moe in enumerate(moe_layers):                    # inside the forward
            slots = ctl.route(l, topk_ids)                      # logical ids -> physical slots, recorded on device
            ...dispatch tokens to slots, compute, combine...
        ctl.after_forward()
    ctl.close()

What runs where (see :mod:`eplb.runtime.transport`): the serving thread only launches device ops and reads
``Future.done()``. Everything that blocks runs on EPLB's side thread, on process groups created for EPLB alone (a
Gloo group, plus an NCCL one with ``communicator: torch_nccl``) and, on a GPU, a side stream: the window gather (the
recorder's buffers are copied on the device at the window end, then gathered on the Gloo side group), the PAR of the
window, the planner request, a planner restart and the record-mode map write; each layer's transfers (packed, staged
through pinned host memory, sent and received) and the tables of its switch (router, recorder fold, uploaded from
pinned memory without blocking); and every agreement (plan checksums in check steps, one started in a check step and
read in the next; "every rank's transfers completed" after each transfer). The serving group carries only the
model's collectives. A layer posted in step ``s`` switches at the start of step ``s + 1`` on every rank (its weights
are copied in place and its tables written, device ops only), so a transfer overlaps one forward; the serving
thread waits only when the side thread has not finished by then (counted in :attr:`CycleMetrics.late_steps`).
``route`` is a gather plus an ``index_add_`` on the device per layer. ``benchmarks/runtime.py --json`` measures the
host time EPLB adds per step kind; ``tests/test_sync_free.py`` holds the contract.

What happens when a rank fails (the process or its device is lost): the engine finds out (a collective raises, its
health check says so, or EPLB's heartbeat declares it: :meth:`EplbController.failed_peers`, see
:mod:`eplb.runtime.heartbeat`), builds the process group of the survivors and calls
:meth:`EplbController.fail_ranks` on every survivor between two steps. From the next step on no token goes to a
failed rank, and every expert that lost its last replica is back, loaded from ``expert_loader`` into a slot of a
spare replica; later windows are planned over the live ranks only. See :meth:`EplbController.fail_ranks`.

What happens when the planner fails: a planner that crashes, hangs past ``planner_deadline_s``, raises, or returns
an invalid plan makes the ranks skip the cycle together (the decision is an all-reduce of a ready/failed flag and a checksum of
the plan, so either every rank applies the same plan or none does). Serving continues on the current placement, a
warning is logged, and the worker process is restarted for the next cycle. A layer switches only after its weights
arrived on every rank, on all ranks in the same step; a peer that never sends is a dead rank, which the side group's
own timeout reports (its jobs fail, and the switch raises on every rank).

Modes: ``dynamic`` plans and moves; ``record`` plans and writes the map (vllm-ascend JSON) to ``record_path`` every
cycle, moves nothing and keeps attributing load through the placement actually in force; ``static`` loads
``map_path`` at start and only records; ``off`` only routes.
"""

from __future__ import annotations

import collections
import logging
import time

import numpy as np
import torch
import torch.distributed as dist

from eplb.cycle import Cycle, CycleConfig, Phase
from eplb.errors import EplbError
from eplb.placement import Placement
from eplb.planning import cycle_policy
from eplb.policies import policy_options
from eplb.policies.resilience import check_capacity, reload_lost
from eplb.runtime.agreement import agree_on_plan
from eplb.runtime.config import ConfigError, EplbConfig
from eplb.runtime.export import CycleMetrics, PrometheusExporter, log_cycle
from eplb.runtime.failover import FailoverReport, agree_after_failure, load_layer
from eplb.runtime.heartbeat import watch
from eplb.runtime.live import LivePlacement
from eplb.runtime.mover import ExpertMover
from eplb.runtime.startup import describe, prepare
from eplb.runtime.timing import UpdateTimer
from eplb.runtime.transport import SideChannel, hand_over, side_event
from eplb.runtime.window_end import WindowEnd, window_par
from eplb.runtime.planner import PlannerReply, PlannerWorker, PlanRequest, worker_main
from eplb.runtime.recorder import LoadRecorder
from eplb.runtime.router import ReplicaRouter
from eplb.topology import Topology

__all__ = ["EplbController", "CycleMetrics", "FailoverReport", "STEP_KINDS"]

#: the kinds of step the serving thread sees: nothing to do, a planner poll, a poll that starts an agreement, a window
#: end, a layer's transfers posted, a layer switched (a step can be several)
STEP_KINDS = ("ordinary", "poll", "check", "submit", "move", "switch")

log = logging.getLogger(__name__)


def _policy_options(config: EplbConfig) -> dict:
    """The policy's options; record mode writes vllm-ascend maps, which cannot hold an expert twice on one rank, so
    it asks a policy that has the option not to do that (unless the user set it)."""
    options = dict(config.policy_options)
    if (config.mode == "record" and "allow_shared_rank" not in options
            and "allow_shared_rank" in policy_options(config.policy)):
        options["allow_shared_rank"] = False
    return options


class EplbController:
    """Ties recorder, router, planner worker and mover to the :class:`eplb.cycle.Cycle` state machine.

    Args:
        config: validated settings.
        num_layers, num_experts: L MoE layers, E logical experts per layer.
        topology: the EP group's shape (``num_ranks`` = the group's size).
        rank: this rank's index in the EP group.
        layer_tensors: ``layer_tensors[l]`` = the live per-expert tensors of layer ``l`` on this rank, each
            ``[K, ...]`` (weights, scales, biases; any dtype). Needed in ``dynamic`` mode only.
        group: the EP process group (None: default group). Collectives run on tensors on ``device``.
        device: device of the MoE layers (recorder and router tables live there).
        placement: the placement the weights were loaded with; default: the map file, else vLLM's initial layout.
        recorder_source: ``"ids"`` (:meth:`route` records the physical ids) or ``"counts"`` (the engine calls
            ``recorder.record_counts`` with its kernel's per-slot counts).
        tp_size: for the ``rank`` router rule.
        planner_target: the worker loop (tests inject crashing or hanging workers).
        expert_loader: ``expert_loader(layer, expert)`` -> the tensors of one logical expert, one per entry of
            ``layer_tensors[layer]`` and shaped like one of its slots (``t[0]``), read from a checkpoint or a host
            copy. Used only after a rank failure, for experts with no surviving replica (:meth:`fail_ranks`).
    """

    def __init__(self, config: EplbConfig, num_layers: int, num_experts: int, topology: Topology, rank: int,
                 layer_tensors=None, group=None, device="cpu", placement: Placement | None = None,
                 recorder_source: str = "ids", tp_size: int = 1, planner_target=worker_main, expert_loader=None):
        if not isinstance(config, EplbConfig):
            raise EplbError(f"config must be an EplbConfig (use EplbConfig.from_dict), got {type(config).__name__}")
        if dist.is_initialized() and dist.get_world_size(group) != topology.num_ranks:
            raise EplbError(f"the EP group has {dist.get_world_size(group)} ranks, the topology {topology.num_ranks}")
        self.config, self.rank, self.group, self.topology = config, rank, group, topology
        self.device = torch.device(device)
        from_file = prepare(config, num_layers, num_experts, topology)
        if placement is None:
            placement = from_file or Placement.initial(num_experts, topology, num_layers)
        elif from_file is not None and placement != from_file:
            raise EplbError(f"the placement passed differs from the map file {config.map_path}")
        if placement.num_layers != num_layers or placement.num_experts != num_experts:
            raise EplbError(f"placement has {placement.num_layers} layers x {placement.num_experts} experts, the "
                            f"model {num_layers} x {num_experts}")
        placement = Placement(placement.phy2log, num_experts, topology)
        self.num_experts = num_experts
        self.router = ReplicaRouter(placement, rank, config.dispatch, tp_size, device)
        self._policy_options = _policy_options(config)
        planning = config.mode in ("dynamic", "record")
        ring = config.ring_steps
        if ring is None:
            if planning and config.cycle_steps > config.window_steps:  # vLLM: every step_interval, last window_size
                ring = config.window_steps
            elif planning and cycle_policy(config.policy, self._policy_options, config.dispatch).wants_steps:
                ring = config.window_steps  # the policy plans on the window's per-step rows, as in the simulator
            else:
                ring = 0
            if planning and config.adaptive_cadence is not None:  # windows slide: every step of an interval kept
                ring = max(ring, config.adaptive_cadence.max_steps)
        self.recorder = LoadRecorder(num_layers, num_experts, topology.num_ranks, topology.slots_per_rank, rank,
                                     recorder_source, ring, config.stage, device)
        #: the placement in force: the one owner, which the router and the recorder follow
        self.live = LivePlacement(placement, rank, self.router, self.recorder)
        self.mover = None
        self._layer_tensors = None if layer_tensors is None else [list(ts) for ts in layer_tensors]
        self.expert_loader = expert_loader
        #: bool [W]: ranks that failed (:meth:`fail_ranks`); all False while every rank serves
        self.failed = np.zeros(topology.num_ranks, dtype=bool)
        self.failovers: list[FailoverReport] = []
        self._expert_bytes = np.zeros(num_layers, dtype=np.int64)
        # the gloo backend on an accelerator stages in pinned host memory too: each arena within half the budget
        host_staging = config.transfer_backend == "gloo" and self.device.type != "cpu"
        if config.mode == "dynamic":
            if layer_tensors is None or len(layer_tensors) != num_layers:
                raise EplbError(f"dynamic mode needs layer_tensors for all {num_layers} MoE layers")
            self._expert_bytes = np.array([sum(t[0].numel() * t.element_size() for t in ts) if len(ts) else 0
                                           for ts in layer_tensors], dtype=np.int64)
            largest = int(self._expert_bytes.max()) * (2 if host_staging else 1)
            if config.bytes_per_step is not None and config.bytes_per_step < largest:  # before anything starts
                raise ConfigError(f"bytes_per_step={config.bytes_per_step} is smaller than one expert of layer "
                                  f"{int(self._expert_bytes.argmax())} ({largest} bytes over its tensors"
                                  f"{', staged on the device and in host memory' if host_staging else ''}); "
                                  f"expected >= {largest} so that a step can move at least one expert")
        #: EPLB's side thread, groups and stream (transfers, agreements); None in ``off`` and ``static`` modes
        self.channel = (SideChannel(group, config.transfer_backend, self.device, config.enable_migration_batching)
                        if planning else None)
        if config.mode == "dynamic":
            self.mover = ExpertMover(layer_tensors, rank, topology.slots_per_rank, group, self.channel)
        self.planner = None
        if planning:
            self.planner = PlannerWorker(config.planner_deadline_s, planner_target,
                                         warmup=(config.policy, self._policy_options))
            self.planner.start()
        self.cycle = Cycle(CycleConfig(cycle_steps=config.cycle_steps, planner_steps=config.apply_steps or 0,
                                       layers_per_step=config.layers_per_step,
                                       bytes_per_step=config.bytes_per_step, host_staging=host_staging,
                                       similarity_threshold=config.update_threshold,
                                       adaptive=config.adaptive_cadence), num_layers)
        self.metrics: list[CycleMetrics] = []
        self.step = 0
        self._in_step = False  # between before_forward and after_forward
        self._window_load: np.ndarray | None = None
        self._result: PlannerReply | None = None
        self._local: tuple[int, str] = (0, "")  # this rank's planner state: (flag, reason)
        self._submitted_step = 0
        #: the transfers of the cycle being applied, by part (the plan's ``transfers`` index, ``Action.apply_parts``)
        self.transfers: dict = {}
        #: (post step, transfers, PendingMove) in flight on the side thread, switched before the next forward
        self._pending = None
        #: Future of the plan agreement started on the side group in a check step, read in the next step
        self._agreement = None
        #: Future of the window gather and planner request running on the side thread
        self._gathering = None
        #: Future of the switch tables of the accepted plan's layers (:meth:`_prepare_switches`)
        self._tables = None
        #: what the last :meth:`before_forward` did, of :data:`STEP_KINDS` ("check" is a poll that started an
        #: agreement; benchmarks and tests classify steps with it)
        self.step_kinds: list[str] = ["ordinary"]
        # what a move and a step cost here, for the next plan's price (eplb.pricing.measured_price)
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
        if self.config.mode == "off":
            return
        self._in_step = True
        now = time.perf_counter()
        if self._step_started is not None:
            self._step_s.append(now - self._step_started)
            if self._prometheus is not None:
                self._prometheus.step(now - self._step_started)
        self._step_started = now
        if self.config.mode == "static":
            self._static_window()
            self.recorder.begin_step(is_prefill)
            return
        kinds = []
        if self._pending is not None:  # the layers posted in the last step are in force from this one on
            self._switch()
            kinds.append("switch")
        if self._gathering is not None and self._gathering.done():
            self._gathered()
        due = self._timer.due(self.step, self.channel, self.cycle.phase is Phase.COLLECT) if self._timer else None
        action = self.cycle.on_step(self.step, due)
        if action.skipped:
            self._agreement = None
            self._skip(action.skipped)
        if action.submit:  # the window is the steps before this one: gather it before this step records
            self._submit(action.window_start)
            kinds.append("submit")
        self.recorder.begin_step(is_prefill)
        if action.poll:
            agreement = self._agreement
            self._poll()
            kinds.append("check" if self._agreement is not None and self._agreement is not agreement else "poll")
        if action.apply_layers and self.mover is not None:
            pending = self.mover.post([self.transfers[part] for part in action.apply_parts])
            self._pending = (self.step, action.apply_parts, pending, self._tables)
            kinds.append("move")
        self.step_kinds = kinds or ["ordinary"]

    def after_forward(self) -> None:
        """Call after every forward step."""
        if self.config.mode == "off":
            return
        record = self.cycle.records[-1] if self.cycle.records else None
        if record is not None and record.apply_end == self.step and self.metrics and self.mover is None:
            self._finish_cycle()
        self.step += 1
        self._in_step = False

    def _prepare_switches(self, transfers: tuple, stream) -> tuple[dict, object]:
        """Side thread, once a plan is accepted: the recorder fold and router tables of every part's switch, by part
        (the plan's ``transfers`` index), built in one vectorised pass per round of parts (a layer's k-th parts in
        round k; one round unless ``bytes_per_step`` split layers) and uploaded to the device (so a move step hands
        the side thread only its transfers)."""
        rounds, seen, by_part = [], {}, {}
        for index, transfer in enumerate(transfers):
            k = seen[transfer.layer] = seen.get(transfer.layer, -1) + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(index)
        for parts in rounds:
            round_of = [transfers[i] for i in parts]
            built = self.live.prepare([t.layer for t in round_of],
                                      np.stack([t.new_row.reshape(-1) for t in round_of]),
                                      np.stack([t.old_row.reshape(-1) for t in round_of]))
            by_part.update({i: built[t.layer] for i, t in zip(parts, round_of)})
        return by_part, side_event(stream)  # the stream it was posted with (a failover replaces the channel)

    def _switch(self) -> None:
        """Switch the layers posted in the last step: every rank's transfers completed (the side thread agreed on
        it), so every rank switches them in this same step. Waits only when the side thread is late."""
        start = time.perf_counter()
        posted, parts, pending, tables = self._pending
        self._pending = None
        self.mover.commit(pending)
        late = pending.late or not tables.done()
        by_part, event = tables.result()
        transfers, prepared = [self.transfers[part] for part in parts], [by_part[part] for part in parts]
        hand_over(event, [t for p in prepared for t in (p["fold"], *p["router"].values())
                          if isinstance(t, torch.Tensor)])
        for transfer, tables_of_layer in zip(transfers, prepared):
            self.live.switch(transfer.layer, transfer.new_row.reshape(-1), tables_of_layer)
        current = self.metrics[-1]
        current.transfer_s += pending.post_s + pending.wait_s
        current.switch_s += time.perf_counter() - start - pending.wait_s
        current.bytes_received += pending.bytes_received
        self._move_s += pending.side_s
        self._moved_experts += pending.bytes_received // max(int(self._expert_bytes[transfers[0].layer]), 1)
        current.applied_layers += [t.layer for t in transfers]
        current.staging_bytes = max(current.staging_bytes, self.mover.staging_bytes)
        current.late_steps += int(late)
        if self.cycle.records[-1].apply_end == posted:
            self._finish_cycle()

    def failed_peers(self) -> list[int]:
        """The EP ranks the heartbeat declared failed so far, agreed by every survivor (never blocks; empty without
        a heartbeat). Fail over with :meth:`fail_ranks` when it lists ranks not yet in :attr:`failed`."""
        return self.heartbeat.failed_peers() if self.heartbeat is not None else []

    def close(self) -> None:
        """Stop the planner worker. Call once when serving ends."""
        if self.heartbeat is not None:
            self.heartbeat.close()
        if self._pending is not None:  # transfers posted in the last step: in force from now on
            self._switch()
        if self.planner is not None:
            self.planner.close()
        if self.channel is not None:
            self.channel.close()
        if self._prometheus is not None:
            self._prometheus.close()

    def fail_ranks(self, ranks, group=None) -> FailoverReport:
        """Keep serving after ``ranks`` failed. Call on every surviving rank, between two steps (also when the
        failure interrupted a step: that step is abandoned and its batch should be served again).

        Collective over ``group``, the process group of the survivors: the live ranks of the EP group in rank order
        (e.g. ``dist.new_group(live, use_local_synchronization=True)``, which needs no call from the failed ranks).
        Ranks keep their ids; the topology still has ``W`` ranks, the failed ones' slots are simply never used.

        In order:

        1. The survivors agree on the step to resume at and on every layer's placement: a survivor that caught the
           failure one step later may have switched one more layer of the cycle in progress; the others complete it
           from ``expert_loader``. The rest of that cycle is given up and a new window starts.
        2. Every expert whose replicas were all on failed ranks takes the slot of the expert with a spare live
           replica whose per-replica load grows least (on the last window's load), and the rank owning that slot
           loads it with ``expert_loader``. Tokens wait for these experts only during this call.
        3. The router routes around the failed ranks (:meth:`ReplicaRouter.set_failed_ranks`) from the next step on.
        4. Later windows are gathered over ``group`` and planned over the live ranks only; no transfer involves a
           failed rank.

        Args:
            ranks: the ranks that failed (ids or bool mask ``[W]``); added to those that failed before.
            group: the survivors' process group (None: the default group, when it holds just the survivors).

        Returns:
            A :class:`FailoverReport`.

        Raises:
            EplbError: bad ranks (out of range, this rank, every rank), a group that does not hold exactly the live
                ranks, fewer live slots than experts (the error names the experts left out; nothing was changed),
                or experts to load and no ``expert_loader`` (or no ``layer_tensors``) to load them with.
        """
        start = time.perf_counter()
        failed = self.failed | self.placement.without_ranks(ranks).failed
        if failed[self.rank]:
            raise EplbError(f"rank {self.rank} is in the failed ranks {np.flatnonzero(failed).tolist()}; call "
                            "fail_ranks on the survivors only")
        live = ~failed
        if dist.is_initialized() and dist.get_world_size(group) != int(live.sum()):
            raise EplbError(f"the survivors' group has {dist.get_world_size(group)} ranks, expected the "
                            f"{int(live.sum())} live ranks {np.flatnonzero(live).tolist()}")
        load = self._window_load if self._window_load is not None else np.ones(
            (self.placement.num_layers, self.num_experts))
        check_capacity(load, self.topology, live)  # names the experts that cannot be served any more
        lost = self.placement.without_ranks(failed).lost
        if lost.size and (self.expert_loader is None or self._layer_tensors is None):
            raise EplbError(f"{len(lost)} experts lost their last replica ((layer, expert): {lost[:8].tolist()}"
                            f"{' ...' if len(lost) > 8 else ''}) and the controller has no expert_loader and "
                            "layer_tensors to load them again")
        self.failed, self.group = failed, group
        if self.heartbeat is not None:
            self.heartbeat.acknowledge(failed)
        moving = self._pending is not None  # the cycle's last layer may be posted and not yet switched
        if self.channel is not None:  # EPLB's groups are rebuilt over the survivors; the old ones are dropped
            self.channel = self.channel.rebuilt(group)
        if self.mover is not None:  # transfers posted in the abandoned step are never switched
            self.mover.abandon(self.channel)
        self._pending = self._agreement = self._gathering = self._tables = None
        self.recorder.live = live

        resume, complete = agree_after_failure(self.live, self.step + int(self._in_step), self.transfers, self.group,
                                               self.device)
        for layer, row in complete.items():
            load_layer(self.live, layer, row, self._layer_tensors, self.expert_loader)
        completed = sorted(complete)
        reason = f"ranks {np.flatnonzero(failed).tolist()} failed"
        if self.cycle.phase is not Phase.COLLECT or moving:
            if len(self.metrics) < len(self.cycle.records):  # the failure hit while the window was gathered
                self.metrics.append(CycleMetrics(cycle=len(self.metrics), submit_step=self.step,
                                                 window_par=np.full(self.live.phy2log.shape[0], np.nan)))
            self.metrics[-1].skipped = reason
        self.cycle.restart(resume, reason)
        self._result, self._local, self.transfers = None, (0, ""), {}
        if self.planner is not None and self.planner.busy:
            self.planner.restart()
        self.recorder.reset()
        self.step, self._in_step = resume, False

        repaired = reload_lost(self.live.phy2log, load, self.topology, live)
        reloaded = []
        for layer in np.flatnonzero((repaired != self.live.phy2log).any(axis=1)).tolist():
            reloaded += load_layer(self.live, layer, repaired[layer], self._layer_tensors, self.expert_loader)
        self.live.fail_over(failed)
        report = FailoverReport(step=resume, failed_ranks=np.flatnonzero(failed).tolist(), lost=lost,
                                reloaded=np.asarray(reloaded, dtype=np.int64).reshape(-1, 3),
                                completed_layers=completed, seconds=time.perf_counter() - start)
        self.failovers.append(report)
        log.warning("eplb: %s; serving resumes at step %d on %d ranks; %d experts had no live replica and were "
                    "reloaded (%d slots here), %d layers completed, %.3f s", reason, resume, int(live.sum()),
                    len(lost), len(report.reloaded), len(completed), report.seconds)
        return report

    def added_memory(self) -> dict:
        """Bytes EPLB adds on this rank: ``redundant_slots`` (expert weights beyond ``E / W`` slots),
        ``staging`` (transfer arenas, device and pinned host), ``tables`` (router tables and recorder buffers), and
        their ``total``."""
        spare = self.topology.slots_per_rank - self.num_experts / self.topology.num_ranks
        tensors = [self.router.log2phy, self.router.replica_count, self.router.rank_table, self.router.replica_slot,
                   self.recorder.window, self.recorder.folded, self.recorder.ring, self.recorder.ring_folded]
        out = {"redundant_slots": int(round(spare * float(self._expert_bytes.sum()))),
               "staging": self.mover.staging_bytes if self.mover is not None else 0,
               "tables": sum(t.numel() * t.element_size() for t in tensors if t is not None)}
        out["total"] = sum(out.values())
        return out

    # -- cycle steps --------------------------------------------------------------------------------------------
    @property
    def placement(self) -> Placement:
        """The placement in force on this rank now (switched layer by layer as plans are applied)."""
        return self.live.placement

    def gather_load(self) -> np.ndarray:
        """The window's logical load over the group (collective), and a new window starts."""
        load = self.recorder.logical_load(self.live.phy2log, self.group)
        self.recorder.reset()
        return load

    def _static_window(self) -> None:
        if self.step and self.step % self.config.window_steps == 0:
            load = self.gather_load()
            window_par(load.sum(axis=0) if load.ndim == 3 else load, self.placement, self.failed, self.step,
                       self.config.log_balancedness)

    def _submit(self, window_start: int) -> None:
        """Window end: the recorder's buffers are copied on the device and everything else (gather on the side
        group, PAR, the interval agreement, the planner request) runs on the side thread."""
        if self._gathering is not None:  # the last window's gather is still running (a very short window)
            self._gathered(late=True)
        self.metrics.append(CycleMetrics(cycle=len(self.metrics), submit_step=self.step,
                                         window_par=np.full(self.live.phy2log.shape[0], np.nan)))
        self._result, self._local, self._submitted_step = None, (0, ""), self.step
        request = PlanRequest(self.metrics[-1].cycle, None, self.live.phy2log.copy(), self.topology,
                              self.config.policy, self._policy_options, dispatch=self.config.dispatch,
                              cycle_config=self.cycle.planning_config, expert_bytes=self._expert_bytes,
                              live_ranks=~self.failed if self.failed.any() else None,
                              resilience=self.config.resilience, state=self.cycle.state)
        # what a move and a step cost on this rank (for the plan's price; agreed on the side thread)
        measured = (self._move_s / self._moved_experts if self._moved_experts else 0.0, list(self._step_s))
        self._gathering = self.channel.submit(self._window_end.run, self.channel, self.recorder.snapshot(),
                                              self.channel.record_event(), request, self.failed.copy(), self.step,
                                              measured, window_start)

    def _gathered(self, late: bool = False) -> None:
        """Take the side thread's window figures (it finished, unless ``late``: then this waits)."""
        future, self._gathering = self._gathering, None
        window, window_par, figures = future.result()
        current = self.metrics[-1]
        current.late_steps += int(late)
        current.window_par, current.rank_load, current.step_s = window_par, figures.rank_load, figures.step_s
        if len(self.metrics) > 1 and self.metrics[-2].next_window_par is None:
            self.metrics[-2].next_window_par, self.metrics[-2].next_step_s = window_par, figures.step_s
        self._window_load = window

    def _poll(self) -> None:
        check = self.config.check_step(self.step - self._submitted_step)
        if self._agreement is not None:
            if not check:  # it runs on the side group until the next check step
                return
            # started in the last check step; every rank reads it now, so all decide in the same step
            future, self._agreement = self._agreement, None
            self.metrics[-1].late_steps += int(not future.done())
            low_flag, same = future.result()
            if low_flag < 0:
                self.cycle.plan_failed(self.step, self._local[1] or "the planner of another rank failed")
                return
            if low_flag > 0:
                if same:
                    self._accept(self._result)
                else:
                    self.cycle.plan_failed(self.step, "ranks computed different plans (checksums differ)")
                return
        if self._gathering is not None:
            if not self._gathering.done():  # the planner has not been asked yet
                self._start_agreement()
                return
            self._gathered()
        if self._local[0] == 0:
            state, value = self.planner.poll()
            if state == "ready":
                self._result, self._local = value, (1, "")
            elif state == "failed":
                self._local = (-1, value)
        self._start_agreement()

    def _start_agreement(self) -> None:
        """In check steps: the ranks' planner states and plan checksums, agreed on the side group (read in the next
        check step)."""
        if not self.config.check_step(self.step - self._submitted_step):
            return
        flag = self._local[0]
        self._agreement = self.channel.submit(self._agree, flag, self._result.plan if flag == 1 else None)

    def _agree(self, flag: int, plan) -> tuple[int, bool]:
        """Side thread: every rank's planner flag and plan checksum (hashed here, not in the step), agreed on the
        side group."""
        if self.channel.world == 1:
            return flag, True
        return agree_on_plan(flag, plan.checksum if plan is not None else 0, self.channel.cpu_group)

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
                self.channel.submit(self._write_record, plan.phy2log, current.cycle)
            return
        self.transfers = dict(enumerate(plan.transfers))
        if self.mover is not None:
            self._tables = self.channel.submit(self._prepare_switches, plan.transfers, self.channel.stream)

    def _write_record(self, phy2log: np.ndarray, cycle: int) -> None:
        from eplb.formats import write_map

        try:  # written atomically; a plan the format cannot hold must not stop serving
            write_map(Placement(phy2log, self.placement.num_experts, self.topology), self.config.record_path,
                      "ascend")
        except (EplbError, OSError) as exc:
            log.error("eplb record mode: cycle %d map not written: %s", cycle, exc)
            return
        log.info("eplb record mode: cycle %d map written to %s", cycle, self.config.record_path)

    def _skip(self, reason: str) -> None:
        current = self.metrics[-1]
        current.skipped = reason
        self._result = None
        self.channel.submit(self._restart_busy_planner)  # a restart takes milliseconds: not in a step
        level = logging.INFO if reason == "no gain" else logging.WARNING
        log.log(level, "eplb cycle %d skipped at step %d: %s; serving continues on the current placement",
                current.cycle, self.step, reason)
        self._export(current)

    def _restart_busy_planner(self) -> None:
        """Side thread: abandon a request still running (it may be hung)."""
        if self.planner.busy:
            self.planner.restart()

    def _finish_cycle(self) -> None:
        current = self.metrics[-1]
        log_cycle(current, self.config.mode == "record")
        self._export(current)

    def _export(self, current: CycleMetrics) -> None:
        if self._prometheus is not None:
            self._prometheus.update(current, self.config.mode == "record")
