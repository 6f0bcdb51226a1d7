"""Planner worker: runs the planning function (:func:`eplb.planning.plan_cycle`, the one the simulator calls) in a
separate (spawned) process so that serving never waits for it.

The serving process hands a request to :meth:`PlannerWorker.submit` and calls :meth:`PlannerWorker.poll` once per
step; ``poll`` never blocks. It reports ``"pending"``, ``"ready"`` (with the result) or ``"failed"`` (with the reason):
the worker crashed, missed its deadline (it is then killed, as it may be hung), or returned a plan that is not a valid
placement for the model. After a failure the worker is restarted in the background, so the next cycle has one.

This module and everything the worker imports are torch-free: the worker starts in about a second.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from eplb.cycle import CycleConfig
from eplb._process import exit_with_parent
from eplb.errors import EplbError
from eplb.placement import Placement
from eplb.planning import CyclePlan, PlanState, check_cycle_plan, cycle_policy, plan_cycle
from eplb.policies.resilience import Resilience
from eplb.topology import Topology

__all__ = ["PlanRequest", "PlannerReply", "PlannerWorker", "READY", "run_request", "worker_main", "warm_up"]

log = logging.getLogger(__name__)

_PARENT_CHECK_S = 1.0


@dataclass(frozen=True)
class PlanRequest:
    """One planning job: the arguments of :func:`eplb.planning.plan_cycle`.

    Attributes:
        cycle: the controller's cycle number (results of older cycles are dropped).
        load: ``[L, E]`` or ``[T, L, E]`` logical load of the window.
        current: int64 ``[L, P]`` placement in force.
        topology: the cluster.
        policy: registry name or vllm-ascend id.
        options: policy keyword options.
        dispatch: the replica choice of the router (a policy that plans for ``balanced`` is told so).
        cycle_config: thresholds and pace of the cycle (:class:`~eplb.cycle.CycleConfig`).
        expert_bytes: bytes of one expert's weights, an integer or int ``[L]``.
        live_ranks: optional bool ``[W]``: the ranks still serving; the plan places experts on them only and no
            transfer involves a failed rank.
        resilience: optional :class:`~eplb.policies.resilience.Resilience` of the plan.
        state: the :class:`~eplb.planning.PlanState` the previous cycle handed on (kept by the serving process, so
            a restarted worker plans from it too).
        price: the :class:`~eplb.pricing.MovePrice` measured by the runtime (None: the cost model's defaults).
    """

    cycle: int
    load: np.ndarray
    current: np.ndarray
    topology: Topology
    policy: str | int
    options: dict
    dispatch: str = "even"
    cycle_config: CycleConfig = field(default_factory=lambda: CycleConfig(cycle_steps=1))
    expert_bytes: object = 0
    live_ranks: np.ndarray | None = None
    resilience: Resilience | None = None
    state: PlanState | None = None
    price: object = None


@dataclass(frozen=True)
class PlannerReply:
    """What the worker returns for a request: its cycle number, the :class:`~eplb.planning.CyclePlan` and the
    seconds the planning function took."""

    cycle: int
    plan: CyclePlan
    seconds: float


def run_request(request: PlanRequest) -> PlannerReply:
    """Run the planning function on ``request`` (what the worker does with each request)."""
    start = time.perf_counter()
    policy = cycle_policy(request.policy, request.options, request.dispatch)
    num_experts = request.load.shape[-1]
    plan = plan_cycle(policy, request.load, Placement(request.current, num_experts, request.topology),
                      request.cycle_config, request.expert_bytes, request.live_ranks, request.resilience,
                      request.state, price=request.price)
    return PlannerReply(request.cycle, plan, time.perf_counter() - start)


READY = "ready"


def warm_up(policy, options: dict) -> None:
    """Import and run ``policy`` once on a tiny problem, and once more over live ranks only, so that imports and
    compiled kernels (numba cache loads, or compiles on a fresh machine) are not charged to a cycle's deadline, nor to
    the first cycle after a rank failure."""
    from eplb.policies import get_policy

    topology = Topology(3, 2)
    load = np.arange(1, 5, dtype=np.float64)[None, :]
    try:
        planner = get_policy(policy, **options)
        initial = Placement.initial(4, topology, 1)
        planner.rebalance(load, topology, initial)
        planner.rebalance(load, topology, initial, live_ranks=[0, 1])
    except Exception:  # noqa: BLE001 - a real request will report the problem with its own traceback
        log.debug("planner warm-up failed", exc_info=True)


def worker_main(requests, results, warmup=None) -> None:
    """Worker process loop: warm up ``(policy, options)``, put :data:`READY`, then one result (or an error string)
    per request; ``None`` stops it, and so does the death of the serving process."""
    parent = mp.parent_process().pid  # not os.getppid(): the serving process may have died while this one started
    exit_with_parent(parent)  # also while warming up or planning, when the loop below cannot look
    if warmup is not None:
        warm_up(*warmup)
    results.put(READY)
    while True:
        try:
            request = requests.get(timeout=_PARENT_CHECK_S)
        except queue.Empty:
            if os.getppid() != parent:  # the serving process died without stopping us (a rank failure)
                return
            continue
        if request is None:
            return
        try:
            results.put(run_request(request))
        except Exception:  # noqa: BLE001 - every failure goes back to the serving process, which decides
            results.put((request.cycle, traceback.format_exc(limit=4)))


class PlannerWorker:
    """A policy process with a deadline.

    Args:
        deadline_s: seconds a request may take before it counts as hung, counted from :meth:`submit` or from the
            moment a (re)started worker reported :data:`READY`, whichever is later.
        startup_s: seconds a fresh worker may take to start (spawn and imports) before it counts as failed.
        target: the worker loop ``target(requests, results, warmup)`` (tests replace it to simulate a crash or a
            hang); it must put :data:`READY` on its results queue once started.
        warmup: ``(policy, options)`` the worker runs once on a tiny problem before reporting :data:`READY`.
    """

    def __init__(self, deadline_s: float = 30.0, target=worker_main, startup_s: float = 120.0, warmup=None):
        if not deadline_s > 0:
            raise EplbError(f"planner deadline must be > 0 seconds, got {deadline_s}")
        self.deadline_s, self.startup_s, self.warmup = deadline_s, startup_s, warmup
        self._started = 0.0
        self._ready_at: float | None = None
        self._target = target
        self._ctx = mp.get_context("spawn")
        self._process = None
        self._requests = self._results = None
        self._request: PlanRequest | None = None
        self._submitted = 0.0
        self._arrived = None  # a reply :meth:`wait` took off the queue, for the next poll
        self.restarts = 0

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker process (non-blocking: the child imports its modules on its own)."""
        self._requests, self._results = self._ctx.Queue(), self._ctx.Queue()
        self._started, self._ready_at = time.monotonic(), None
        self._process = self._ctx.Process(target=self._target, args=(self._requests, self._results, self.warmup),
                                          name="eplb-planner", daemon=True)
        self._process.start()

    def restart(self) -> None:
        """Kill the current worker (if any) without waiting for it and start a fresh one."""
        self._kill()
        self.restarts += 1
        self.start()

    def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
        for q in (self._requests, self._results):
            if q is not None:
                q.cancel_join_thread()  # never block the serving process on a dead peer's pipe
                q.close()
        self._process = None
        self._request = None
        self._arrived = None

    def close(self) -> None:
        """Stop the worker; waits at most a second for it to exit."""
        if self._process is not None and self._process.is_alive():
            try:
                self._requests.put_nowait(None)
            except (ValueError, OSError):
                pass
            self._process.join(timeout=1.0)
        self._kill()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def busy(self) -> bool:
        return self._request is not None

    # -- requests -----------------------------------------------------------------------------------------------
    def submit(self, request: PlanRequest) -> None:
        """Hand a request to the worker; it starts (or restarts) the worker when needed. Non-blocking."""
        if self._process is None or not self._process.is_alive():
            if self._process is not None:
                log.warning("eplb planner worker (pid %s) is gone; starting a new one", self._process.pid)
                self.restarts += 1
            self._kill()
            self.start()
        self._request, self._arrived = request, None
        self._submitted = time.monotonic()
        self._requests.put(request)  # pickled by the queue's feeder thread, not here

    def wait(self, timeout_s: float) -> None:
        """Block until the current request's reply arrived, the worker died or ``timeout_s`` passed; the next
        :meth:`poll` reports it. Serving never calls this (it would wait on the planner); a replay that must accept
        each plan in a known step does (the parity test of the simulator and the runtime)."""
        deadline = time.monotonic() + timeout_s
        while self._request is not None and self._arrived is None and time.monotonic() < deadline:
            try:
                item = self._results.get(timeout=0.05)
            except queue.Empty:
                if not self._process.is_alive():
                    return
                continue
            if item == READY:
                self._ready_at = time.monotonic()
            else:
                self._arrived = item

    def poll(self) -> tuple[str, PlannerReply | str | None]:
        """The state of the current request: ``("idle", None)``, ``("pending", None)``, ``("ready", PlannerReply)`` or
        ``("failed", reason)``. Never blocks. On failure the worker is restarted."""
        request = self._request
        if request is None:
            return "idle", None
        while True:
            item, self._arrived = self._arrived, None
            if item is None:
                try:
                    item = self._results.get_nowait()
                except queue.Empty:
                    break
            if item == READY:
                self._ready_at = time.monotonic()
                continue
            cycle = item.cycle if isinstance(item, PlannerReply) else item[0]
            if cycle != request.cycle:
                continue  # a result of an abandoned cycle
            self._request = None
            if isinstance(item, PlannerReply):
                problem = check_cycle_plan(item.plan, request.current, request.load.shape[-1], request.topology)
                if problem is None:
                    return "ready", item
                return self._fail(f"planner returned an invalid plan: {problem}", restart=False)
            return self._fail(f"planner raised an error:\n{item[1]}", restart=False)
        if not self._process.is_alive():
            return self._fail(f"planner worker died (exit code {self._process.exitcode})")
        now = time.monotonic()
        if self._ready_at is None:
            if now - self._started > self.startup_s:
                return self._fail(f"planner worker did not start within {self.startup_s:g} s")
        elif now - max(self._submitted, self._ready_at) > self.deadline_s:
            return self._fail(f"planner missed its deadline of {self.deadline_s:g} s (killed as hung)")
        return "pending", None

    def _fail(self, reason: str, restart: bool = True) -> tuple[str, str]:
        self._request = None
        if restart:
            self.restart()
        return "failed", reason
