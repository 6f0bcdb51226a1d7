"""Watch EPLB's hooks on the serving thread: every blocking call they make, on any device, and on CUDA every call
torch's sync debug mode flags.

:class:`eplb.runtime.sync_guard.SyncGuard` lists the calls that block on any device (host reads of tensors, uploads,
waits on EPLB's side thread, collectives). On CUDA, torch's sync debug mode is switched to ``warn`` only while a hook
runs, and a warning counts only when the serving thread raised it: EPLB's side thread may synchronise (that is what
it is for), and the mode is process-wide. ``error`` mode is not used: it would raise inside a hook, leave a switch
half-applied, and end the run at the first sync instead of listing every one.
"""

from __future__ import annotations

import os
import threading
import traceback
import warnings
from contextlib import contextmanager

import torch

from eplb.runtime.sync_guard import SyncGuard

__all__ = ["HookWatch"]

_CUDA_SYNC = "called a synchronizing CUDA operation"
_HERE = os.path.dirname(os.path.abspath(__file__))


class HookWatch:
    """The process's watch (install once per rank process, before the controller is built).

    ``with watch.hook():`` around each call of ``before_forward``, ``route`` and ``after_forward``;
    :attr:`hits` lists one label per blocking call, in order (compare its length before and after a step).
    """

    def __init__(self, cuda: bool):
        self.guard = SyncGuard.install()
        self.cuda = cuda
        self._thread: threading.Thread | None = None
        if cuda:
            warnings.filterwarnings("always", message=_CUDA_SYNC)  # every one, not once per call site
            self._show = warnings.showwarning
            warnings.showwarning = self._showwarning

    @property
    def hits(self) -> list[str]:
        return self.guard.hits

    @property
    def serving_group_calls(self) -> int:
        """Collectives on the default (serving) group so far, from any thread."""
        return self.guard.serving_group_calls

    @contextmanager
    def hook(self):
        debug = self.cuda and torch.cuda.is_available()
        with self.guard.serving():
            self._thread = threading.current_thread()
            if debug:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                if debug:
                    torch.cuda.set_sync_debug_mode(0)
                self._thread = None

    def _showwarning(self, message, category, filename, lineno, file=None, line=None):
        if _CUDA_SYNC not in str(message):
            self._show(message, category, filename, lineno, file, line)
        elif threading.current_thread() is self._thread:
            self.guard.hits.append(f"CUDA sync at {_caller()}")
        # a sync of another thread (EPLB's side thread) while a hook runs is allowed: not counted, not shown


def _caller() -> str:
    """Where the serving thread made the call: its innermost frame in eplb's runtime (else any frame outside this
    package and the warnings machinery)."""
    frames = [f for f in reversed(traceback.extract_stack())
              if not f.filename.startswith(_HERE) and os.path.basename(f.filename) != "warnings.py"]
    runtime = [f for f in frames if f"{os.sep}eplb{os.sep}" in f.filename]
    frame = (runtime or frames or [None])[0]
    return "unknown" if frame is None else f"{os.path.basename(frame.filename)}:{frame.lineno} ({frame.name})"
