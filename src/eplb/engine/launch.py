"""Spawn the ranks of a process group on this machine and collect their results, with a timeout on everything.

Each rank is a real (spawned) process that joins a ``torch.distributed`` group (Gloo over loopback by default) and
runs ``target(rank, world_size, emit, *args)``; ``emit(payload)`` sends a progress event to the parent at once.
The parent never blocks for longer than the timeout: a rank that raises, dies or hangs ends the whole launch with
an :class:`eplb.EplbError`, and every rank still running is killed.

With ``rank_failures=True`` the parent is the control plane of a cluster that keeps serving when ranks die: it hosts
the group's key-value store (so the store outlives any rank, rank 0 included), and when rank processes die it
publishes the failed ranks in the store (ranks dying within half a second, such as a whole node, form one event).
A surviving rank reads the ``n``-th event with :func:`failure_notice`. It also fences: a rank that EPLB's heartbeat
declared failed (:func:`eplb.runtime.heartbeat.published_failures`) is killed, so a hung process cannot come back
and talk to survivors that went on without it.

Ranks are not daemonic processes because they start processes of their own (the runtime's planner worker). No rank
outlives the launch: the launcher kills the ranks still running when it returns or raises, and each rank is killed by
the kernel when the parent process dies, however it dies (:func:`eplb._process.exit_with_parent`).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from datetime import timedelta

from eplb._process import exit_with_parent
from eplb.errors import EplbError, LaunchError

__all__ = ["launch", "LaunchError", "failure_notice", "last_words"]

log = logging.getLogger(__name__)

_FAILURE_KEY = "eplb/failure/{}"
_FAILURE_GRACE_S = 0.5
_store = None  # this rank's client of the group's store
_messages = None  # this rank's queue to the parent

def failure_notice(index: int, timeout_s: float = 30.0) -> list[int]:
    """In a rank of a launch with ``rank_failures=True``: the failed ranks (all so far, ascending) of the ``index``-th
    failure event (0-based), waiting up to ``timeout_s`` for the parent to publish it.

    Raises:
        LaunchError: no such event within ``timeout_s`` (or not in such a launch).
    """
    if _store is None:
        raise LaunchError("failure_notice works only in the ranks of launch(..., rank_failures=True)")
    key = _FAILURE_KEY.format(index)
    try:
        _store.wait([key], timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 - the store raises a bare RuntimeError/DistStoreError on timeout
        raise LaunchError(f"no failure event {index} was published within {timeout_s:g} s") from exc
    return json.loads(_store.get(key).decode())


def last_words(payload) -> None:
    """In a rank about to die on purpose (tests): send ``payload`` as an event and wait until it left the process
    (an ``emit`` still in the queue's buffer is lost with the process). No event can be sent after it."""
    import torch.distributed as dist

    _messages.put(("event", dist.get_rank(), payload))
    _messages.close()
    _messages.join_thread()


def _rank_main(rank: int, world_size: int, port: int, backend: str, collective_timeout_s: float, threads: int,
               log_level: int, messages, target, args) -> None:
    exit_with_parent()
    import torch
    import torch.distributed as dist

    global _store, _messages
    _messages = messages
    logging.basicConfig(level=log_level, format=f"%(levelname)s rank {rank} %(name)s: %(message)s")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        timeout = timedelta(seconds=collective_timeout_s)
        _store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=_store, rank=rank, world_size=world_size, timeout=timeout)
        result = target(rank, world_size, lambda payload: messages.put(("event", rank, payload)), *args)
        messages.put(("result", rank, result))
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the parent, which ends the launch
        summary = traceback.format_exception_only(type(exc), exc)[-1].strip()
        messages.put(("error", rank, (summary, traceback.format_exc(limit=8))))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_ranks(world_size: int, backend: str) -> None:
    """Refuse, before any rank starts, a launch that cannot run here."""
    if world_size < 1:
        raise EplbError(f"world_size must be >= 1, got {world_size}")
    if backend == "nccl":
        import torch

        gpus = torch.cuda.device_count()
        if gpus < world_size:  # NCCL cannot put two ranks on one device
            raise EplbError(f"backend 'nccl' needs one GPU per rank: {world_size} ranks, {gpus} GPUs visible; use "
                            "backend 'gloo' to put several ranks on one GPU")


def _take_message(messages, processes, results: dict, on_event) -> None:
    """The next message of a rank, if one comes within 0.2 s: an event (to ``on_event``), a result (into
    ``results``), or an error, raised as a :class:`LaunchError` naming the peers that died before it."""
    try:
        kind, rank, payload = messages.get(timeout=0.2)
    except queue.Empty:
        return
    if kind == "event":
        if on_event is not None:
            on_event(rank, payload)
    elif kind == "result":
        results[rank] = payload
    elif kind == "error":
        summary, trace = payload
        log.debug("rank %d failed:\n%s", rank, trace)
        dead = [r for r, p in enumerate(processes) if r != rank and p.exitcode not in (None, 0)]
        cause = "".join(f"{_death(r, processes[r])}; " for r in dead)  # the usual reason of a peer's error
        raise LaunchError(f"{cause}rank {rank} failed: {summary} (-vv shows its traceback)")


def _death(rank: int, process) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        try:
            return f"rank {rank} died (killed by {signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"rank {rank} died (exit code {code})"


def launch(target, world_size: int, args: tuple = (), timeout_s: float = 120.0, on_event=None,
           backend: str = "gloo", collective_timeout_s: float = 60.0, threads: int = 1,
           log_level: int = logging.WARNING, rank_failures: bool = False) -> list:
    """Run ``target`` on ``world_size`` ranks and return their results, rank order (None for a rank that died, with
    ``rank_failures``).

    Args:
        target: a picklable function ``target(rank, world_size, emit, *args) -> result`` (picklable result).
        world_size: number of ranks (processes).
        args: extra picklable arguments.
        timeout_s: wall-clock limit of the whole launch (start-up included).
        on_event: called in the parent as ``on_event(rank, payload)`` for each ``emit`` of a rank, in arrival order.
        backend: ``gloo`` (CPU, or ranks sharing a GPU) or ``nccl`` (rank ``r`` then uses GPU ``r``, one GPU per
            rank; the target picks its device).
        collective_timeout_s: the process group's timeout (a rank stuck in a collective fails after it).
        threads: torch threads per rank (1: ranks do not fight over the cores).
        log_level: ``logging`` level of the ranks (their records go to stderr, prefixed with the rank).
        rank_failures: a rank process that dies is a failure the others survive: it is published to them (see
            :func:`failure_notice`) instead of ending the launch.

    Raises:
        LaunchError: a rank raised (its exception is in the message, its traceback in the debug log), died
            (without ``rank_failures``), or the launch ran past ``timeout_s``.
    """
    import torch.distributed as dist

    from eplb.runtime.heartbeat import published_failures

    _check_ranks(world_size, backend)
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    port = store.port
    failed: list[int] = []  # ranks published as failed
    first_death = None  # when the first death not yet published was seen
    events = 0
    fenced = 0  # heartbeat failure events acted on
    processes = [ctx.Process(target=_rank_main, name=f"eplb-rank{rank}",
                             args=(rank, world_size, port, backend, collective_timeout_s, threads, log_level, messages,
                                   target, args))
                 for rank in range(world_size)]
    results: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    try:
        for process in processes:
            process.start()
        while len(results) < world_size:
            _take_message(messages, processes, results, on_event)
            if time.monotonic() > deadline:
                raise LaunchError(f"ranks {sorted(set(range(world_size)) - set(results))} did not finish within "
                                  f"{timeout_s:g} s")
            if rank_failures:
                for declared in published_failures(store, fenced):
                    fenced += 1
                    for r in declared:
                        if processes[r].is_alive():
                            log.warning("rank %d was declared failed by the heartbeat: killed", r)
                            processes[r].kill()
            dead = [r for r, p in enumerate(processes) if r not in results and p.exitcode not in (None, 0)]
            if dead and not rank_failures:
                raise LaunchError(_death(dead[0], processes[dead[0]]))
            if dead:
                first_death = first_death or time.monotonic()
                if time.monotonic() - first_death >= _FAILURE_GRACE_S:
                    failed = sorted(failed + dead)
                    store.set(_FAILURE_KEY.format(events), json.dumps(failed))
                    events += 1
                    results.update({r: None for r in dead})
                    first_death = None
        for process in processes:
            process.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=5.0)
        messages.cancel_join_thread()
        messages.close()
    return [results[rank] for rank in range(world_size)]
