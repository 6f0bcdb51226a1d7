"""Failover of the runtime: what the survivors of a rank failure agree on, how a layer is loaded again from a
checkpoint, and :func:`fail_over`, what :meth:`eplb.runtime.EplbController.fail_ranks` does."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from eplb.cycle import Phase
from eplb.cycle.planning import placement_checksum
from eplb.errors import EplbError, EplbFailure
from eplb.policies.shared.resilience import check_capacity, reload_lost
from eplb.runtime.agreement import all_reduce
from eplb.runtime.export import CycleMetrics

__all__ = ["FailoverReport", "agree_after_failure", "load_layer", "fail_over"]

log = logging.getLogger("eplb.runtime.controller")


@dataclass(frozen=True)
class FailoverReport:
    """What :meth:`EplbController.fail_ranks` did on this rank.

    Attributes:
        step: the step serving resumes at (agreed by the survivors).
        failed_ranks: every failed rank so far, ascending.
        lost: int64 ``[n, 2]`` ``(layer, expert)`` pairs that had no replica left on a live rank.
        reloaded: int64 ``[m, 3]`` ``(layer, local slot, expert)`` this rank loaded with the expert loader.
        completed_layers: layers of the interrupted cycle that another survivor had already switched, completed here
            from the expert loader.
        seconds: wall time of the call (agreement, reloads, table rewrites).
    """

    step: int
    failed_ranks: list[int]
    lost: np.ndarray
    reloaded: np.ndarray
    completed_layers: list[int]
    seconds: float


def agree_after_failure(in_force, step: int, parts: dict, group=None, device="cpu") -> tuple[int, dict]:
    """The resume step (the latest ``step`` any survivor reached) and ``{layer: row [P]}`` for the layers of the
    interrupted cycle this rank must complete because another survivor had switched one more of their parts
    (``parts``: this rank's :class:`~eplb.cycle.transfers.LayerTransfer` parts of that cycle, by index). Survivors
    are at most one step apart, so they differ by at most one part of a layer. One all-reduce over the survivors."""
    phy2log = in_force.phy2log
    num_layers = phy2log.shape[0]
    checksums = [placement_checksum(row[None]) for row in phy2log]
    mine = torch.tensor([-step, *checksums, *(-c for c in checksums)], dtype=torch.int64)
    agreed = all_reduce(mine, dist.ReduceOp.MIN, group, device)
    low, high = agreed[1:1 + num_layers].numpy(), -agreed[1 + num_layers:].numpy()
    complete = {}
    for layer in np.flatnonzero(low != high).tolist():
        layer_parts = [part for part in parts.values() if part.layer == layer]
        if not layer_parts:
            raise EplbFailure(f"layer {layer}: the survivors hold different placements and this rank has no plan "
                              "for it")
        other = high[layer] if checksums[layer] == low[layer] else low[layer]
        for part in layer_parts:  # the part another survivor switched and this rank did not (none: this rank is ahead)
            if (np.array_equal(part.old_row, phy2log[layer])
                    and placement_checksum(part.new_row[None]) == other):
                complete[layer] = part.new_row
    return -int(agreed[0]), complete


def load_layer(in_force, layer: int, new_row: np.ndarray, layer_tensors, expert_loader) -> list[tuple[int, int, int]]:
    """Switch ``layer`` of the placement in force (:class:`~eplb.runtime.in_force.PlacementInForce`) to ``new_row``
    ``[P]``, loading this rank's changed slots with ``expert_loader(layer, expert)``. Returns the
    ``(layer, local slot, expert)`` loaded."""
    k = in_force.topology.slots_per_rank
    new_local = np.asarray(new_row)[in_force.rank * k:(in_force.rank + 1) * k]
    slots = np.flatnonzero(in_force.local_row(layer) != new_local)
    if slots.size and (expert_loader is None or layer_tensors is None):
        raise EplbError(f"layer {layer}: experts {new_local[slots].tolist()} must be loaded on rank {in_force.rank} "
                        "after the failure, but the controller has no expert_loader and layer_tensors")
    loaded = []
    for slot in slots.tolist():
        expert = int(new_local[slot])
        tensors = expert_loader(layer, expert)
        if len(tensors) != len(layer_tensors[layer]):
            raise EplbError(f"expert_loader({layer}, {expert}) returned {len(tensors)} tensors, the layer has "
                            f"{len(layer_tensors[layer])}")
        for tensor, value in zip(layer_tensors[layer], tensors):
            tensor[slot].copy_(value)
        loaded.append((layer, slot, expert))
    in_force.switch(in_force.tables(layer, new_row))
    return loaded


def fail_over(ctl, ranks, group=None) -> FailoverReport:
    """Keep serving after ``ranks`` failed (ids or a bool mask ``[W]``, added to those that failed before); the
    body of :meth:`~eplb.runtime.EplbController.fail_ranks` on controller ``ctl``. Collective over ``group``, the
    survivors' process group (the live ranks of the EP group in rank order, e.g.
    ``dist.new_group(live, use_local_synchronization=True)``, which needs no call from the failed ranks). Ranks keep
    their ids; the topology still has ``W`` ranks, the failed ones' slots are simply never used. In order:

    1. The survivors agree on the step to resume at and on every layer's placement: a survivor that caught the
       failure one step later may have switched one more layer of the cycle in progress; the others complete it from
       ``expert_loader``. The rest of that cycle is given up (parts in flight never switch) and a new window starts.
    2. Every expert whose replicas were all on failed ranks takes the slot of the expert with a spare live replica
       whose per-replica load grows least (on the last window's load), and the rank owning that slot loads it with
       ``expert_loader``. Tokens wait for these experts only during this call.
    3. The router routes around the failed ranks (:meth:`ReplicaRouter.set_failed_ranks`) from the next step on.
    4. EPLB's side groups are rebuilt over the survivors; later windows are gathered over them and planned over the
       live ranks only; no transfer involves a failed rank.

    Raises:
        EplbError: see :meth:`~eplb.runtime.EplbController.fail_ranks` (nothing is changed then).
    """
    start = time.perf_counter()
    in_force = ctl.in_force
    failed = in_force.failed | in_force.placement.without_ranks(ranks).failed
    if failed[ctl.rank]:
        raise EplbError(f"rank {ctl.rank} is in the failed ranks {np.flatnonzero(failed).tolist()}; call "
                        "fail_ranks on the survivors only")
    live = ~failed
    if dist.is_initialized() and dist.get_world_size(group) != int(live.sum()):
        raise EplbError(f"the survivors' group has {dist.get_world_size(group)} ranks, expected the "
                        f"{int(live.sum())} live ranks {np.flatnonzero(live).tolist()}")
    num_layers = in_force.phy2log.shape[0]
    load = ctl._window_load if ctl._window_load is not None else np.ones((num_layers, ctl.num_experts))
    check_capacity(load, ctl.topology, live)  # names the experts that cannot be served any more
    lost = in_force.placement.without_ranks(failed).lost
    if lost.size and (ctl.expert_loader is None or ctl._layer_tensors is None):
        raise EplbError(f"{len(lost)} experts lost their last replica ((layer, expert): {lost[:8].tolist()}"
                        f"{' ...' if len(lost) > 8 else ''}) and the controller has no expert_loader and "
                        "layer_tensors to load them again")
    ctl.group = group
    if ctl.heartbeat is not None:
        ctl.heartbeat.acknowledge(failed)
    moving = ctl.pending is not None  # parts of the cycle may be posted and not yet switched
    if ctl.channel is not None:  # EPLB's groups are rebuilt over the survivors (collective); the old ones dropped
        ctl.channel = ctl.channel.rebuilt(group)
        if ctl.disabled:
            ctl.channel.close(wait=False)
    if ctl.mover is not None:  # parts posted in the abandoned step never switch
        ctl.mover.abandon(ctl.channel)
    ctl.pending = ctl.round = None

    resume, complete = agree_after_failure(in_force, ctl.step + int(ctl._in_step), ctl.parts, group,
                                           ctl.device)
    for layer, row in complete.items():
        load_layer(in_force, layer, row, ctl._layer_tensors, ctl.expert_loader)
    reason = f"ranks {np.flatnonzero(failed).tolist()} failed"
    if ctl.cycle.phase is not Phase.COLLECT or moving:
        if len(ctl.metrics) < len(ctl.cycle.records):  # the failure hit while the window was gathered
            ctl.metrics.append(CycleMetrics(cycle=len(ctl.metrics), submit_step=ctl.step,
                                            window_par=np.full(num_layers, np.nan)))
        ctl.metrics[-1].skipped = reason
    ctl.cycle.restart(resume, reason)
    ctl.parts, ctl._reply = {}, None
    if ctl.planner is not None and not ctl.disabled:
        ctl.planner.restart_if_busy()
    ctl.recorder.reset()
    ctl.step, ctl._in_step = resume, False

    repaired = reload_lost(in_force.phy2log, load, ctl.topology, live)
    reloaded = []
    for layer in np.flatnonzero((repaired != in_force.phy2log).any(axis=1)).tolist():
        reloaded += load_layer(in_force, layer, repaired[layer], ctl._layer_tensors, ctl.expert_loader)
    in_force.fail_over(failed)
    report = FailoverReport(step=resume, failed_ranks=np.flatnonzero(failed).tolist(), lost=lost,
                            reloaded=np.asarray(reloaded, dtype=np.int64).reshape(-1, 3),
                            completed_layers=sorted(complete), seconds=time.perf_counter() - start)
    log.warning("eplb: %s; serving resumes at step %d on %d ranks; %d experts had no live replica and were "
                "reloaded (%d slots here), %d layers completed, %.3f s", reason, resume, int(live.sum()),
                len(lost), len(report.reloaded), len(report.completed_layers), report.seconds)
    return report
