"""Child processes that never outlive their parent.

eplb starts processes of its own (the demo's ranks, each rank's planner worker). Whatever ends the parent (SIGKILL,
SIGTERM, the OOM killer, an exception), its children must go with it, or they keep running with nobody to stop them.
On Linux the kernel does it: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` kills the child the moment its parent exits.
Elsewhere a daemon thread polls the parent's pid and ends the process within :data:`_POLL_S`. The kernel sends the
signal when the *thread* that started the child ends, so children are started from a thread that lives as long as
its process (the launcher's main thread, the runtime's serving thread).

Ctrl-C in a terminal sends SIGINT to every process of the foreground group, children included. The parent alone
handles it (and stops its children); a child ignores it, so it neither prints a traceback nor quits on its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time

__all__ = ["exit_with_parent"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_POLL_S = 0.5


def exit_with_parent(parent_pid: int | None = None) -> None:
    """Call first thing in a child process: it is killed when its parent exits, and it ignores Ctrl-C (SIGINT).

    ``parent_pid`` is the parent's pid as the parent knew it (default: the process that started this one through
    :mod:`multiprocessing`). If the parent is already gone when this runs (it died while this child was still
    importing), the child exits at once; until this call, nothing ties the child to its parent.
    """
    if parent_pid is None:
        parent = multiprocessing.parent_process()
        if parent is None:
            raise RuntimeError("exit_with_parent() without a pid works only in a multiprocessing child")
        parent_pid = parent.pid
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not (sys.platform.startswith("linux") and _set_parent_death_signal()):
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="eplb-parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:
        os._exit(1)


def _set_parent_death_signal() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            return True
        log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError):
        log.debug("prctl is not available", exc_info=True)
    return False


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_POLL_S)
    os._exit(1)
