"""Spawn the ranks of a process group on this machine and collect their results, with a timeout on everything.

Each rank is a real (spawned) process that joins a ``torch.distributed`` group (Gloo over loopback by default) and
runs ``target(rank, world_size, emit, *args)``; ``emit(payload)`` sends a progress event to the parent at once.
The parent never blocks for longer than the timeout: a rank that raises, dies or hangs ends the whole launch with
an :class:`eplb.EplbError`, and every rank still running is killed.

Ranks are not daemonic processes because they start processes of their own (the runtime's planner worker).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from datetime import timedelta

from eplb.errors import EplbError

__all__ = ["launch", "LaunchError"]


class LaunchError(EplbError):
    """A rank failed, died or did not finish in time."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, backend: str, collective_timeout_s: float, threads: int,
               log_level: int, messages, target, args) -> None:
    import torch
    import torch.distributed as dist

    logging.basicConfig(level=log_level, format=f"%(levelname)s rank {rank} %(name)s: %(message)s")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=collective_timeout_s))
        result = target(rank, world_size, lambda payload: messages.put(("event", rank, payload)), *args)
        messages.put(("result", rank, result))
    except BaseException:  # noqa: BLE001 - every failure goes to the parent, which ends the launch
        messages.put(("error", rank, traceback.format_exc(limit=8)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(target, world_size: int, args: tuple = (), timeout_s: float = 120.0, on_event=None,
           backend: str = "gloo", collective_timeout_s: float = 60.0, threads: int = 1,
           log_level: int = logging.WARNING) -> list:
    """Run ``target`` on ``world_size`` ranks and return their results, rank order.

    Args:
        target: a picklable function ``target(rank, world_size, emit, *args) -> result`` (picklable result).
        world_size: number of ranks (processes).
        args: extra picklable arguments.
        timeout_s: wall-clock limit of the whole launch (start-up included).
        on_event: called in the parent as ``on_event(rank, payload)`` for each ``emit`` of a rank, in arrival order.
        backend: ``gloo`` (CPU) or ``nccl`` (rank ``r`` then uses GPU ``r``; the target picks its device).
        collective_timeout_s: the process group's timeout (a rank stuck in a collective fails after it).
        threads: torch threads per rank (1: ranks do not fight over the cores).
        log_level: ``logging`` level of the ranks (their records go to stderr, prefixed with the rank).

    Raises:
        LaunchError: a rank raised (its traceback is in the message), died, or the launch ran past ``timeout_s``.
    """
    if world_size < 1:
        raise EplbError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    port = _free_port()
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
            try:
                kind, rank, payload = messages.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise LaunchError(f"ranks {sorted(set(range(world_size)) - set(results))} did not finish within "
                                      f"{timeout_s:g} s") from None
                dead = [r for r, p in enumerate(processes) if r not in results and p.exitcode not in (None, 0)]
                if dead:
                    raise LaunchError(f"rank {dead[0]} died (exit code {processes[dead[0]].exitcode})") from None
                continue
            if kind == "event":
                if on_event is not None:
                    on_event(rank, payload)
            elif kind == "result":
                results[rank] = payload
            else:
                raise LaunchError(f"rank {rank} failed:\n{payload}")
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
