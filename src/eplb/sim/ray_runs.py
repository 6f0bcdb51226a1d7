"""The runs of :func:`eplb.sim.runs.simulate_runs` on a Ray cluster: one Ray task per run, the trace put in the
object store once.

Each task calls :func:`eplb.sim.runs.run_spec`, the function a local worker process calls, with the same trace,
config and spec, so the results are the local ones (only the measured planner wall time differs). Ray is an optional
dependency (``pip install "eplb[ray]"``); it is imported only here, when asked for.
"""

from __future__ import annotations

import logging
from typing import Callable

from eplb.errors import EplbError
from eplb.sim.runs import RunSpec, run_spec
from eplb.sim.simulator import SimConfig
from eplb.sim.traces import Trace

__all__ = ["ray_runs", "connect"]

logger = logging.getLogger(__name__)

_WAIT_S = 0.5  # how often finished tasks are collected (and Ctrl-C noticed)


def connect(address: str | None, timeout_s: float = 20.0):
    """Join the Ray cluster at ``address`` (``host:port`` or ``ray://host:port``), or start a local instance when
    None; returns the ``ray`` module.

    Raises:
        EplbError: Ray is not installed, or nothing answers at ``address`` within ``timeout_s``.
    """
    try:
        import ray
    except ImportError:
        raise EplbError('--ray needs Ray, which is not installed: pip install "eplb[ray]"') from None
    if ray.is_initialized():
        return ray
    if address is not None and not address.startswith("ray://") and not _answers(address, timeout_s):
        raise EplbError(f"--ray {address}: no Ray cluster answers there (expected host:port of a running head, "
                        "e.g. 10.0.0.1:6379, or ray://host:10001; --ray alone starts a local instance)")
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                 include_dashboard=False if address is None else None)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        where = f"--ray {address}" if address else "--ray (a local instance)"
        raise EplbError(f"{where}: cannot start or join Ray: {str(exc).splitlines()[0] if str(exc) else exc}") \
            from None
    return ray


def _answers(address: str, timeout_s: float) -> bool:
    """Whether something accepts a TCP connection at ``host:port`` (Ray's own connect retries for a minute)."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise EplbError(f"--ray {address!r}: expected host:port (e.g. 10.0.0.1:6379) or ray://host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _task(trace: Trace, config: SimConfig, spec: RunSpec, reduce):
    return run_spec(trace, config, spec, None, reduce)


def ray_runs(trace: Trace, config: SimConfig, specs: list[RunSpec], address: str | None,
             reduce: Callable | None = None, done: Callable[[int, object], None] | None = None) -> list:
    """Run ``specs`` as Ray tasks (see :func:`eplb.sim.runs.simulate_runs` for the arguments); the results in the
    order of ``specs``. A local instance started here is shut down at the end; on an error or Ctrl-C the tasks
    still running are cancelled."""
    ray = connect(address)
    started_here = address is None
    finished = done or (lambda index, result: None)
    try:
        trace_ref = ray.put(trace)  # once: every task reads it from the object store
        task = ray.remote(num_cpus=1, max_retries=0)(_task)
        refs = {task.remote(trace_ref, config, spec, reduce): index for index, spec in enumerate(specs)}
        results: list = [None] * len(specs)
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=_WAIT_S)
                for ref in ready:
                    try:
                        results[refs[ref]] = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        cause = exc.as_instanceof_cause()
                        if isinstance(cause, EplbError):
                            raise EplbError(str(cause).splitlines()[0]) from None
                        raise
                    finished(refs[ref], results[refs[ref]])
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        return results
    finally:
        if started_here:
            ray.shutdown()
