"""The beating process of a rank: it writes the rank's heartbeat to the store while the rank process runs.

Why a process: a thread of the rank needs the interpreter lock to beat, and the serving thread can hold it for a
second or more inside a C++ call (a Gloo group's construction, a ``Work.wait``, or a CPU shared by many processes);
the others would then declare a live rank failed. This process shares nothing with the rank but its pid: it beats
while the rank is running, stops beating while the rank is stopped (SIGSTOP: state ``T`` in ``/proc``), and exits
once the rank is gone. Linux only (it reads ``/proc``); elsewhere the heartbeat thread beats alone.

It runs as a script (``python beat.py HOST PORT KEY INTERVAL_S TIMEOUT_S PID``), not through the ``eplb`` package,
so that its start-up is only the interpreter and torch's import.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

__all__ = ["running", "main"]


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


def main(host: str, port: int, key: str, interval_s: float, timeout_s: float, rank_pid: int) -> None:
    """Write ``p<n>`` to ``key`` every ``interval_s`` while process ``rank_pid`` runs; return when it is gone."""
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


if __name__ == "__main__":
    host, port, key, interval_s, timeout_s, pid = sys.argv[1:]
    main(host, int(port), key, float(interval_s), float(timeout_s), int(pid))
