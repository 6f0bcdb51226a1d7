"""The beating process of a rank: it writes the rank's heartbeat to the store while the rank process runs.

Why a process: a thread of the rank needs the interpreter lock to beat, and the serving thread can hold it for a
second or more inside a C++ call (a Gloo group's construction, a ``Work.wait``, or a CPU shared by many processes);
the others would then declare a live rank failed. This process shares nothing with the rank but its pid: it beats
while the rank is running, stops beating while the rank is stopped (SIGSTOP, state ``T`` in ``/proc``), and dies
with it (``PR_SET_PDEATHSIG``). Linux only (it reads ``/proc``); elsewhere the heartbeat thread beats alone.

Kept free of eplb's heavier imports: it is spawned, and its start-up is the time until its first beat.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

__all__ = ["beat_main", "running"]


def running(pid: int) -> bool | None:
    """Whether process ``pid`` runs (True), is stopped (False), or is gone (None), from ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    state = stat[stat.rindex(b")") + 2:][:1]  # the name, in parentheses, may hold spaces
    if state in (b"Z", b"X"):
        return None
    return state not in (b"T", b"t")


def beat_main(host: str, port: int, key: str, interval_s: float, timeout_s: float, rank_pid: int) -> None:
    """Write ``p<n>`` to ``key`` every ``interval_s`` while process ``rank_pid`` runs; return when it is gone."""
    from eplb._process import exit_with_parent

    exit_with_parent(rank_pid)
    import torch.distributed as dist

    store = None
    beats = 0
    while True:
        state = running(rank_pid)
        if state is None:
            return
        if state:
            try:
                if store is None:
                    store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s),
                                          wait_for_workers=False)
                beats += 1
                store.set(key, f"p{beats}")
            except Exception:  # noqa: BLE001 - the rank's heartbeat thread reports a store that does not answer
                store = None
        time.sleep(interval_s)
