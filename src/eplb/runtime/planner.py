"""Planner worker: runs the planning function (:func:`eplb.cycle.planning.plan_cycle`, the one the simulator calls) in a
separate (spawned) process so that serving never waits for it.

The serving process hands a request to :meth:`PlannerWorker.submit` and calls :meth:`PlannerWorker.poll` once per
step; ``poll`` never blocks and does no work. The worker answers with everything the rank needs ready-made
(:func:`finish`): the plan checked against the request, its checksum, and this rank's recipes and switch tables of
every part (:mod:`eplb.runtime.recipes`), so that no thread of the serving process builds them. A reader thread only
takes the replies off the queue (a compact pickle: ~1 ms at DeepSeek-V3 size) and watches the worker. ``poll``
reports ``"pending"``, ``"ready"`` (with the result) or ``"failed"`` (with the reason): the worker crashed, missed its
deadline (it is then killed, as it may be hung), or planned a placement that is not valid for the model. After a
failure the worker is restarted in the background, so the next cycle has one. If the reader thread itself dies, the
request fails with the cause and :attr:`PlannerWorker.broken` says so (the controller then turns EPLB off).

This module and everything the worker imports are torch-free: the worker starts in about a second.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from eplb._process import exit_with_parent
from eplb.cycle import CycleConfig
from eplb.cycle.planning import CyclePlan, PlanState, check_cycle_plan, cycle_policy, plan_cycle
from eplb.errors import EplbError
from eplb.placement import Placement
from eplb.policies.shared.resilience import Resilience
from eplb.runtime.recipes import rank_recipes
from eplb.runtime.tables import TableSpec
from eplb.topology import Topology

__all__ = ["PlanRequest", "PlannerReply", "PlannerWorker", "READY", "run_request", "plan_request", "finish",
           "worker_main", "warm_up"]

log = logging.getLogger(__name__)

_PARENT_CHECK_S = 1.0
_READ_S = 0.05  # how often the reader thread looks at a silent worker


@dataclass(frozen=True)
class PlanRequest:
    """One planning job: the arguments of :func:`eplb.cycle.planning.plan_cycle`.

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
        resilience: optional :class:`~eplb.policies.shared.resilience.Resilience` of the plan.
        state: the :class:`~eplb.cycle.planning.PlanState` the previous cycle handed on (kept by the serving process, so
            a restarted worker plans from it too).
        price: the :class:`~eplb.cycle.pricing.MovePrice` measured by the runtime (None: the cost model's defaults).
        spec: the requesting rank's :class:`~eplb.runtime.tables.TableSpec`: the reply then carries that rank's
            recipes and switch tables (None: the plan only, e.g. record mode).
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
    spec: TableSpec | None = None


@dataclass(frozen=True)
class PlannerReply:
    """What the worker returns for a request: its cycle number, the :class:`~eplb.cycle.planning.CyclePlan` (its
    checksum computed), the seconds the planning function took and, per part of the plan, the requesting rank's
    :class:`~eplb.runtime.recipes.MoveRecipe` and :class:`~eplb.runtime.recipes.SwitchRows`."""

    cycle: int
    plan: CyclePlan
    seconds: float
    moves: tuple = ()
    switches: tuple = ()


def run_request(request: PlanRequest) -> PlannerReply | tuple[int, str]:
    """What the worker answers to ``request``: the planning function's plan, :func:`finish` ed (checked, hashed,
    with the requesting rank's recipes), or ``(cycle, reason)`` when the plan is invalid."""
    return finish(request, plan_request(request))


def plan_request(request: PlanRequest) -> PlannerReply:
    """The planning function on ``request``: its plan alone, not yet :func:`finish` ed."""
    start = time.perf_counter()
    policy = cycle_policy(request.policy, request.options, request.dispatch)
    num_experts = request.load.shape[-1]
    plan = plan_cycle(policy, request.load, Placement(request.current, num_experts, request.topology),
                      request.cycle_config, request.expert_bytes, request.live_ranks, request.resilience,
                      request.state, price=request.price)
    return PlannerReply(request.cycle, plan, time.perf_counter() - start)


def finish(request: PlanRequest, reply: PlannerReply) -> PlannerReply | tuple[int, str]:
    """Worker: ``reply`` checked against ``request`` (a valid placement, transfers that lead from the current
    placement to it), hashed, with the requesting rank's recipes; or ``(cycle, reason)`` when it is invalid."""
    num_experts = request.load.shape[-1]
    problem = check_cycle_plan(reply.plan, request.current, num_experts, request.topology)
    if problem is not None:
        return request.cycle, f"planner returned an invalid plan: {problem}"
    reply.plan.__dict__.pop("checksum", None)  # hashed here, from the plan as it is now
    reply.plan.checksum  # noqa: B018 - cached with the plan, so no thread of the serving process hashes it
    if request.spec is None:
        return reply
    failed = None if request.live_ranks is None else ~np.asarray(request.live_ranks, dtype=bool)
    moves, switches = rank_recipes(reply.plan.parts, request.spec, num_experts, request.topology, failed)
    return dataclasses.replace(reply, moves=moves, switches=switches)


READY = "ready"


def warm_up(policy, options: dict, dispatch: str = "even") -> None:
    """Answer a tiny request the way a real one is answered (the policy, the cycle's plan, its transfers and checks),
    once with every rank and once over live ranks only, so that imports and compiled kernels (numba cache loads, or
    compiles on a fresh machine) are not charged to a cycle's deadline, nor to the first cycle after a rank failure.
    The load is skewed so that the plan replicates, moves experts and is applied."""
    topology = Topology(3, 2)
    load = np.array([[[9, 1, 1, 2]], [[8, 2, 1, 1]]], dtype=np.int64)  # [T, L, E], counts as the recorder's
    current = Placement.initial(4, topology, 1).phy2log
    try:
        for live in (None, np.array([True, True, False])):
            reply = run_request(PlanRequest(0, load, current, topology, policy, options, dispatch, expert_bytes=1,
                                            live_ranks=live))
            if not isinstance(reply, PlannerReply):
                log.debug("planner warm-up: %s", reply[1])
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
            results.put((request.cycle, f"planner raised an error:\n{traceback.format_exc(limit=4)}"))


class PlannerWorker:
    """A policy process with a deadline, and a reader thread that takes its replies.

    The reader thread unpickles each reply (checked, hashed and with its recipes already: :func:`finish`), notices a
    dead or hung worker and restarts it: the serving thread's :meth:`poll` only reads what the reader left.

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
        self._requests = None
        self._request: PlanRequest | None = None
        self._submitted = 0.0
        #: ("ready", reply) or ("failed", reason) of the current request, left by the reader thread
        self._outcome: tuple | None = None
        self._generation = 0  # bumped by every start and kill: a reader of an older worker stops
        self._lock = threading.RLock()  # the serving, side and reader threads all start, kill and submit
        self._changed = threading.Condition(self._lock)
        self.restarts = 0
        #: why a reader thread died (None while they work): the worker's replies can no longer be read
        self.broken: str | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker process and its reader thread (non-blocking: the child imports its modules on its
        own)."""
        with self._lock:
            self._requests, results = self._ctx.Queue(), self._ctx.Queue()
            self._started, self._ready_at = time.monotonic(), None
            self._process = self._ctx.Process(target=self._target, args=(self._requests, results, self.warmup),
                                              name="eplb-planner", daemon=True)
            self._process.start()
            self._generation += 1
            threading.Thread(target=self._read, args=(self._generation, results, self._process),
                             name="eplb-planner-reply", daemon=True).start()

    def restart(self) -> None:
        """Kill the current worker (if any) without waiting for it and start a fresh one."""
        with self._lock:
            self._kill()
            self.restarts += 1
            self.start()

    def _kill(self) -> None:
        with self._lock:
            if self._process is not None and self._process.is_alive():
                self._process.kill()
            if self._requests is not None:
                self._requests.cancel_join_thread()  # never block on a dead peer's pipe
                self._requests.close()
            self._generation += 1  # its reader closes the results queue and stops
            self._process = self._requests = self._request = self._outcome = None
            self._changed.notify_all()

    def restart_if_busy(self) -> None:
        """Abandon a request still running (it may be hung): a fresh worker takes the next one."""
        if self.busy:
            self.restart()

    def close(self, wait: bool = True) -> None:
        """Stop the worker; waits at most a second for it to exit (``wait=False``: kill it at once)."""
        process = self._process
        if wait and process is not None and process.is_alive():
            try:
                self._requests.put_nowait(None)
            except (ValueError, OSError, AttributeError):
                pass
            process.join(timeout=1.0)
        self._kill()

    @property
    def pid(self) -> int | None:
        process = self._process
        return None if process is None else process.pid

    @property
    def busy(self) -> bool:
        return self._request is not None

    # -- requests -----------------------------------------------------------------------------------------------
    def submit(self, request: PlanRequest) -> None:
        """Hand a request to the worker; it starts (or restarts) the worker when needed. Non-blocking."""
        with self._lock:
            if self._process is None or not self._process.is_alive():
                if self._process is not None:
                    log.warning("eplb planner worker (pid %s) is gone; starting a new one", self._process.pid)
                    self.restarts += 1
                self._kill()
                self.start()
            self._request, self._outcome = request, None
            self._submitted = time.monotonic()
            self._requests.put(request)  # pickled by the queue's feeder thread, not here

    def wait(self, timeout_s: float) -> None:
        """Block until the current request's outcome is known or ``timeout_s`` passed; the next :meth:`poll` reports
        it. Serving never calls this (it would wait on the planner); a replay that must accept each plan in a known
        step does (the parity test of the simulator and the runtime)."""
        with self._changed:
            self._changed.wait_for(lambda: self._request is None or self._outcome is not None, timeout_s)

    def poll(self) -> tuple[str, PlannerReply | str | None]:
        """The state of the current request: ``("idle", None)``, ``("pending", None)``, ``("ready", PlannerReply)`` or
        ``("failed", reason)``. Never blocks, and does no work: the reader thread did it."""
        with self._lock:
            if self._request is None:
                return "idle", None
            if self._outcome is None:
                return "pending", None
            outcome, self._request, self._outcome = self._outcome, None, None
            return outcome

    # -- the reader thread --------------------------------------------------------------------------------------
    def _read(self, generation: int, results, process) -> None:
        """Take the worker's replies off ``results`` until the worker is killed or replaced."""
        try:
            while generation == self._generation:
                try:
                    item = results.get(timeout=_READ_S)
                except queue.Empty:
                    self._watch(generation, process)
                    continue
                if item == READY:
                    self._ready_at = time.monotonic()
                    continue
                request = self._request
                cycle = item.cycle if isinstance(item, PlannerReply) else item[0]
                if request is None or cycle != request.cycle:
                    continue  # a result of an abandoned cycle
                self._publish(generation, request, ("ready", item) if isinstance(item, PlannerReply)
                              else ("failed", item[1]))
        except (OSError, ValueError, EOFError):  # the queue was closed under us: this worker is gone
            pass
        except BaseException as exc:  # noqa: BLE001 - a dead reader must not leave the request pending forever
            self.broken = f"the planner's reply thread died: {type(exc).__name__}: {exc}"
            log.error("eplb: %s", self.broken)
            request = self._request
            if request is not None:
                self._publish(generation, request, ("failed", self.broken))
        finally:
            results.cancel_join_thread()
            results.close()

    def _watch(self, generation: int, process) -> None:
        """A dead or hung worker fails the current request and is replaced (here, not in a step)."""
        request = self._request
        if request is None:
            return
        if not process.is_alive():
            reason = f"planner worker died (exit code {process.exitcode})"
        else:
            now, ready_at = time.monotonic(), self._ready_at
            if ready_at is None and now - self._started > self.startup_s:
                reason = f"planner worker did not start within {self.startup_s:g} s"
            elif ready_at is not None and now - max(self._submitted, ready_at) > self.deadline_s:
                reason = f"planner missed its deadline of {self.deadline_s:g} s (killed as hung)"
            else:
                return
        with self._lock:
            if generation != self._generation or self._request is not request:
                return
            self.restart()
            self._request = request  # the failure is this request's outcome
            self._publish(self._generation, request, ("failed", reason))

    def _publish(self, generation: int, request: PlanRequest, outcome: tuple) -> None:
        with self._lock:
            if generation == self._generation and self._request is request:
                self._outcome = outcome
                self._changed.notify_all()
