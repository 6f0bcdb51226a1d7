"""Several simulations of one trace, side by side in worker processes.

``eplb simulate`` replays one trace with static, every policy and the clairvoyant floor. The runs are independent,
so :func:`simulate_runs` can spread them over worker processes. Workers are started with ``spawn``: numba's threading
layer and a forked copy of a parent's threads do not mix. The trace goes to each worker once, when it starts
(pickling the default scenario's 59 MB takes ~0.1 s; drawing it again would take ~2.4 s). Each run builds its own
policy from its name and the simulation is deterministic, so the results are those of the runs one after the other;
only the measured planner wall time differs. Workers' log records and progress come back to the parent through one
queue.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import multiprocessing
import queue as queue_module
import signal
import threading
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

from eplb.cycle.planning import cycle_policy
from eplb.placement import Placement
from eplb.sim.simulator import RunResult, SimConfig, simulate
from eplb.sim.traces import Trace

__all__ = ["RunSpec", "simulate_runs", "run_spec", "static_map"]

log = logging.getLogger(__name__)

_POLL_S = 0.1  # how often the parent forwards workers' progress and log records

# A worker's trace, config and queue to the parent, set once by _start_worker.
_worker: dict = {}


@dataclass(frozen=True)
class RunSpec:
    """One run: ``name`` in the report, ``policy`` a registered policy name (None: static), ``clairvoyant`` for the
    floor (see :func:`~eplb.sim.simulator.simulate`). ``config`` replaces the shared :class:`SimConfig` for this run
    (another cycle, topology or dispatch: a sweep). ``static_steps``: plan once with ``policy`` on the first
    ``static_steps`` steps and serve that placement throughout (a static expert map, as an engine loads one)."""

    name: str
    policy: str | None
    clairvoyant: bool = False
    config: SimConfig | None = None
    static_steps: int | None = None


def simulate_runs(trace: Trace, config: SimConfig, specs: list[RunSpec], jobs: int = 1,
                  progress: Callable[[int, float], None] | None = None,
                  reduce: Callable[[RunSpec, RunResult], object] | None = None,
                  done: Callable[[int, object], None] | None = None) -> list:
    """Simulate each run of ``specs`` on ``trace`` with ``config``; results in the order of ``specs``.

    Args:
        trace: per-step load ``[T, L, E]``.
        config: topology, cycle, dispatch rule, cost model, failures (a spec's own ``config`` replaces it).
        specs: the runs.
        jobs: worker processes (at most one per run); 1 runs them one after the other in this process.
        progress: called with (index of the run in ``specs``, fraction done 0..1) now and then.
        reduce: a module-level function ``(spec, RunResult) -> value`` applied where the run ran (in the worker),
            so that only its value travels back; the results are then these values.
        done: called in this process with (index, result) as each run finishes, in the order they finish.

    Raises:
        EplbError: as :func:`~eplb.sim.simulator.simulate` (from a worker: the same error, re-raised here). The
            other runs are stopped.
    """
    report = progress or (lambda index, fraction: None)
    finished = done or (lambda index, result: None)
    if jobs <= 1 or len(specs) <= 1:
        results = []
        with _interrupt_between_runs() as interrupted:
            for index, spec in enumerate(specs):
                results.append(run_spec(trace, config, spec, lambda fraction, index=index: report(index, fraction),
                                        reduce))
                finished(index, results[-1])
                if interrupted():
                    raise KeyboardInterrupt
        return results
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    executor = ProcessPoolExecutor(min(jobs, len(specs)), mp_context=context, initializer=_start_worker,
                                   initargs=(trace, config, messages, logging.getLogger().getEffectiveLevel()))
    try:
        # Submitted in reverse: the command lists the newest, slowest policies and the floor last, and starting
        # them first shortens the tail (cold numba caches: auto ~24 s, swift ~19 s, flashlb ~14 s).
        futures = {index: executor.submit(_run_in_worker, index, specs[index], reduce)
                   for index in reversed(range(len(specs)))}
        index_of = {future: index for index, future in futures.items()}
        pending = set(futures.values())
        while pending:
            ready, pending = wait(pending, timeout=_POLL_S, return_when=FIRST_EXCEPTION)
            _forward(messages, report)
            for future in ready:
                finished(index_of[future], future.result())  # a worker's error, here, now
    except BaseException:
        # An error or Ctrl-C: stop the other runs now rather than after them (no public API before Python 3.14).
        for process in list((executor._processes or {}).values()):
            process.terminate()
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    executor.shutdown(wait=True)  # workers flush what they queued as they exit
    _forward(messages, report)
    return [futures[index].result() for index in range(len(specs))]


def run_spec(trace: Trace, config: SimConfig, spec: RunSpec, progress: Callable[[float], None] | None = None,
             reduce: Callable[[RunSpec, RunResult], object] | None = None):
    """One run of :func:`simulate_runs`, wherever it runs (this process, a worker, a Ray task): its
    :class:`RunResult`, or ``reduce(spec, result)``."""
    config = spec.config or config
    policy = None if spec.policy is None else cycle_policy(spec.policy, dispatch=config.dispatch)
    if spec.static_steps is None:
        result = simulate(trace, policy, config, name=spec.name, clairvoyant=spec.clairvoyant, progress=progress)
    else:
        result = simulate(trace, None, config, name=spec.name, progress=progress,
                          initial=static_map(trace, policy, config, spec.static_steps))
    return result if reduce is None else reduce(spec, result)


def static_map(trace: Trace, policy, config: SimConfig, steps: int) -> Placement:
    """The placement ``policy`` plans on the first ``steps`` steps of ``trace``, as ``eplb plan`` plans a map from
    a recorded load for an engine that loads one at start."""
    return policy.rebalance(trace.counts[:steps], config.topology, resilience=config.resilience).placement


@contextlib.contextmanager
def _interrupt_between_runs():
    """Runs in this process: a first Ctrl-C is held until the run in progress ends, then raised between runs, where
    every finished run has been handed over. Raised at once, it could land inside a compiled kernel, which turns it
    into a ``SystemError``. A second Ctrl-C stops at once. Yields a function saying whether Ctrl-C was pressed."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield lambda: False
        return
    pressed = []

    def hold(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)
        log.warning("interrupted: stopping after the run in progress (Ctrl-C again to stop now)")

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def _start_worker(trace: Trace, config: SimConfig, messages, level: int) -> None:
    from eplb._process import exit_with_parent

    exit_with_parent()  # dies with the parent however it ends; Ctrl-C is left to the parent, which decides
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(messages)]
    root.setLevel(level)
    _worker.update(trace=trace, config=config, messages=messages)


def _run_in_worker(index: int, spec: RunSpec, reduce=None):
    messages = _worker["messages"]
    return run_spec(_worker["trace"], _worker["config"], spec,
                    lambda fraction: messages.put(("progress", index, fraction)), reduce)


def _forward(messages, report: Callable[[int, float], None]) -> None:
    """Workers' progress to ``report`` and their log records to this process's loggers."""
    while True:
        try:
            item = messages.get_nowait()
        except queue_module.Empty:
            return
        if isinstance(item, logging.LogRecord):
            logger = logging.getLogger(item.name)
            if logger.isEnabledFor(item.levelno):
                logger.handle(item)
        else:
            _, index, fraction = item
            report(index, fraction)
