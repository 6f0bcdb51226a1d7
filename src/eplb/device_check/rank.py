"""One rank of the device check: the controller's hooks called around a stand-in forward, as an engine calls them,
through whole rebalancing cycles in every dispatch rule, watched for host syncs (:class:`~.watch.HookWatch`).

:func:`check_rank` is the ``target`` of :func:`eplb.engine.launch.launch`. Every rank serves on the same device.
The ranks stop together: after each step they all-reduce (MAX, on a Gloo group of the check's own, never the
serving group) two flags, "my share of the budget is spent" and "not done", so every rank leaves the loop after the
same step whatever its clock says. "Done" is a count the ranks agree on by construction: ``cycles`` windows were
handed to the planner and a further one started, so every cycle went through a window end, planner polls and
checks, and (each cycle serving a new load profile) moves and switches. No rank waits for a time window, and none
depends on a transfer landing within one step: a layer in flight is simply in flight until it switches.

Each finished dispatch rule is emitted as ``("mode", rank, dispatch, figures)``; an exception is emitted as
``("error", rank, traceback)`` and ends the rank (its result carries it too), so the parent can report it even if
a peer then hangs and the launch times out.
"""

from __future__ import annotations

import collections
import faulthandler
import gc
import os
import statistics
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist

from eplb.device_check.watch import HookWatch
from eplb.device_check.workload import PROFILES, Workload, expert_tensors, weights_match
from eplb.runtime.controller import STEP_KINDS

__all__ = ["check_rank"]


def check_rank(rank: int, world: int, emit, settings, folder: str, stacks_at: float) -> dict:
    """Serve every dispatch rule of ``settings`` on this rank; see the module docstring. Returns a picklable dict.
    A rank still running at ``stacks_at`` (``time.time()``) writes its threads' stacks to ``folder/rank{rank}.stacks``
    (a hang, for the result)."""
    stacks = open(os.path.join(folder, f"rank{rank}.stacks"), "w")  # noqa: SIM115 - open until the process ends
    faulthandler.dump_traceback_later(max(1.0, stacks_at - time.time()), file=stacks)
    device = torch.device(settings.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = {"rank": rank, "modes": {}}
    try:
        side = dist.new_group(list(range(world)), backend="gloo")  # the check's own agreements
        watch = HookWatch(device.type == "cuda")
        deadline = time.monotonic() + settings.budget_s
        for index, dispatch in enumerate(settings.modes):
            share = time.monotonic() + (deadline - time.monotonic()) / (len(settings.modes) - index)
            out["modes"][dispatch] = figures = _serve(rank, dispatch, settings, device, side, watch, share, emit)
            emit(("mode", rank, dispatch, figures))
            gc.collect()  # the mode's expert tensors (GBs on a GPU) go before the next mode allocates its own
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if rank == 0 and device.type == "cuda":
            from eplb.device_check.graphs import graph_recording

            out["graph_recording"] = graph_recording(settings, device)
    except Exception:  # noqa: BLE001 - reported by the parent; the peers fail on their next collective with us
        out["error"] = traceback.format_exc(limit=12)
        emit(("error", rank, out["error"]))
    finally:
        faulthandler.cancel_dump_traceback_later()
    return out


class _Steps:
    """What the check measures per step, by step kind."""

    def __init__(self):
        self.kinds = collections.Counter()
        self.blocking: dict = collections.defaultdict(collections.Counter)  # kind -> label -> calls
        self.host_s: dict = collections.defaultdict(list)  # kind -> seconds in the hooks
        self.forwards: list = []  # (timing, a transfer was in flight) after the first cycle
        self.starts: list[float] = []  # perf_counter at each step's before_forward
        self.in_flight: list[bool] = []

    def add(self, kinds, hits, host_s: float, forward, in_flight: bool, warm: bool) -> None:
        for kind in kinds:
            self.kinds[kind] += 1
            self.host_s[kind].append(host_s)
            self.blocking[kind].update(hits)
        if warm:
            self.forwards.append((forward, in_flight))
        self.in_flight.append(in_flight)

    def transfer_seconds(self, end: float) -> float:
        """Wall time of the steps in which a transfer was in flight (from the step's start to the next one's)."""
        bounds = self.starts[1:] + [end]
        return sum(b - a for a, b, flying in zip(self.starts, bounds, self.in_flight) if flying)


def _forward(settings, device):
    """The stand-in forward (a matmul per layer) and how it is timed: CUDA events, or the host clock on CPU."""
    gen = torch.Generator().manual_seed(settings.seed)
    hidden = torch.randn(settings.tokens, settings.hidden, generator=gen).to(device)
    weight = (torch.randn(settings.hidden, settings.hidden, generator=gen) / settings.hidden ** 0.5).to(device)

    def run():
        x = hidden
        for _ in range(settings.layers):
            x = torch.tanh(x @ weight)
        return x

    if device.type == "cuda":
        def timed():
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            run()
            end.record()
            return begin, end
    else:
        def timed():
            start = time.perf_counter()
            run()
            return time.perf_counter() - start
    return timed


def _seconds(timing) -> float:
    return timing if isinstance(timing, float) else timing[0].elapsed_time(timing[1]) / 1e3


def _layers_posted(ctl) -> int:
    return sum(len(layers) for record in ctl.cycle.records for layers in record.schedule)


def _layers_switched(ctl) -> int:
    return sum(len(m.applied_layers) for m in ctl.metrics)


def _config(settings, dispatch: str):
    from eplb.runtime import EplbConfig

    return EplbConfig.from_dict({"mode": "dynamic", "window_steps": settings.window_steps, "planner_check_steps": 2,
                                 "policy": "default", "dispatch": dispatch, "layers_per_step": settings.layers_per_step,
                                 "planner_deadline_s": 120.0})


def _serve(rank: int, dispatch: str, settings, device, side, watch: HookWatch, deadline: float, emit) -> dict:
    from eplb import Placement, Topology
    from eplb.runtime import EplbController

    topology = Topology(settings.ranks, settings.slots_per_rank)
    start = Placement.initial(settings.experts, topology, settings.layers)
    tensors = expert_tensors(settings, start.phy2log, rank, device)
    work = Workload(settings, rank, device, side, dispatch == "balanced")
    forward = _forward(settings, device)
    group_calls = watch.serving_group_calls
    ctl = EplbController(_config(settings, dispatch), settings.layers, settings.experts, topology, rank,
                         layer_tensors=tensors, device=device, placement=start)
    steps, stopped = _Steps(), None
    while stopped is None:
        first_hit = len(watch.hits)
        steps.starts.append(time.perf_counter())
        with watch.hook():
            ctl.before_forward()
        kinds = list(ctl.step_kinds)
        emit(("step", dispatch, ctl.step, kinds))  # where this rank was last seen, should it hang
        if settings.fault is not None and settings.fault[0] == rank and ("move" in kinds
                                                                        or settings.fault[1] == "hang"):
            _fail(rank, settings.fault[1])
        profile = len(ctl.metrics) % PROFILES
        ids, counts = work.ids[profile], work.counts[profile]
        with watch.hook():
            for layer in range(settings.layers):
                ctl.route(layer, ids[layer], counts[layer])
        host = time.perf_counter() - steps.starts[-1]
        in_flight = _layers_posted(ctl) > _layers_switched(ctl)
        warm = len(ctl.metrics) > 1  # the first cycle starts the planner and touches everything once
        timing = forward()
        begin = time.perf_counter()
        with watch.hook():
            ctl.after_forward()
        host += time.perf_counter() - begin
        steps.add(kinds, watch.hits[first_hit:], host, timing, in_flight, warm)
        flags = torch.tensor([int(time.monotonic() > deadline), int(len(ctl.metrics) <= settings.cycles)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=side)  # every rank stops after the same step
        if flags[0]:
            stopped = "deadline"
        elif not flags[1]:
            stopped = "cycles"
    end = time.perf_counter()
    stop_step = ctl.step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    routes_equal = _routes_equal_numpy(ctl, rank, dispatch, work.ids[profile], work.counts[profile])
    ctl.close()  # the layers posted in the last step switch here
    figures = _figures(ctl, steps, end)
    figures.update(stop_step=stop_step, stopped=stopped, serving_group_calls=watch.serving_group_calls - group_calls,
                   routes_equal_numpy=routes_equal,
                   weights_match_placement=weights_match(settings, tensors, ctl.placement.phy2log, rank))
    return figures


def _fail(rank: int, how: str) -> None:
    """A failure on purpose (tests: :attr:`CheckSettings.fault`): raise or exit in the first move step, hang in the
    first step."""
    if how == "exit":
        os._exit(17)
    while how == "hang":
        time.sleep(1.0)
    raise RuntimeError(f"rank {rank} fails on purpose in its first move step (fault {how!r})")


def _routes_equal_numpy(ctl, rank: int, dispatch: str, ids, counts) -> bool:
    """Whether the router's slots for the last profile equal :func:`eplb.dispatch.route`, the numpy reference, in
    every layer (in ``balanced`` dispatch: the split of the group's tokens over the replicas)."""
    from eplb.dispatch import route

    for layer, layer_ids in enumerate(ids):
        got = ctl.router.route(layer, layer_ids, counts[layer]).cpu().numpy()
        group_counts = None if counts[layer] is None else counts[layer].cpu().numpy()
        want = route(ctl.placement, layer, rank, layer_ids.cpu().numpy(), dispatch, group_counts=group_counts)
        if not np.array_equal(got, want):
            return False
    return True


def _figures(ctl, steps: _Steps, end: float) -> dict:
    seconds = [(_seconds(timing), flying) for timing, flying in steps.forwards]
    flying = [s for s, f in seconds if f]
    idle = [s for s, f in seconds if not f]
    received = sum(m.bytes_received for m in ctl.metrics)
    transfer_s = steps.transfer_seconds(end)
    return {
        "steps": len(steps.in_flight),
        "kinds": {kind: steps.kinds[kind] for kind in STEP_KINDS},
        "blocking": {kind: dict(labels) for kind, labels in steps.blocking.items() if labels},
        "cycles": [{"cycle": m.cycle, "layers_switched": len(set(m.applied_layers)), "skipped": m.skipped,
                    "bytes_received": m.bytes_received} for m in ctl.metrics],
        "forward_ms": {"in_flight": _median_ms(flying), "idle": _median_ms(idle)},
        "forward_ratio_during_transfer": (statistics.median(flying) / statistics.median(idle)
                                          if flying and idle else None),
        "bytes_received": received,
        "transfer_s": transfer_s,
        "transfer_gbps": received / transfer_s / 1e9 if received and transfer_s else None,
        "staging_bytes": max((m.staging_bytes for m in ctl.metrics), default=0),
        "added_memory": ctl.added_memory(),
        "host_us": {kind: {"median": statistics.median(v) * 1e6, "p99": float(np.percentile(v, 99)) * 1e6}
                    for kind, v in steps.host_s.items()},
    }


def _median_ms(values: list[float]) -> float | None:
    return statistics.median(values) * 1e3 if values else None
