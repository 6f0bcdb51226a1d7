"""One thread of EPLB's that runs blocking jobs in submission order, and fails every waiting job when it dies.

:class:`SideWorker` is what :class:`~eplb.runtime.transport.SideChannel` runs its side thread with (transfers,
window gathers, the planner hand-off). Jobs are submitted by the serving thread, which only reads ``Future.done()``
afterwards.

A job that raises hands its exception to its future; the thread goes on. If the thread itself dies (its set-up
raises, or a bug in the loop), every queued and running job's future fails with :class:`SideThreadDied` naming the
cause, and so does every job submitted later: nothing waits for a thread that is gone.
"""

from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import Future

from eplb.errors import EplbFailure, SideThreadDied

__all__ = ["SideWorker", "SideThreadDied"]

log = logging.getLogger(__name__)

_IDLE_S = 0.05  # how long the idle thread sleeps between two looks at its queue when nobody wakes it

class SideWorker:
    """A daemon thread running jobs in order.

    Args:
        name: the thread's name (``eplb-<name>``).
        setup: called on the thread before its first job (e.g. its device and stream); if it raises, the thread
            dies.
    """

    def __init__(self, name: str, setup=None):
        self.name = name
        self._setup = setup
        # a deque and an event that wakes the thread per job: an idle thread that polls often would take the
        # interpreter lock from the serving thread at every poll (a hand-over, two context switches, cold caches)
        self._jobs: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # between the thread taking a job and :meth:`abort`
        self._running: Future | None = None
        self._aborted: BaseException | None = None
        #: why the thread died (None while it runs)
        self.died: SideThreadDied | None = None
        # a daemon thread: a job stuck on a dead peer must not keep the process from exiting
        self._thread = threading.Thread(target=self._run, name=f"eplb-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn, *args, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)`` on the thread after every job submitted before it."""
        future: Future = Future()
        failure = self._aborted or self.died
        if failure is not None:
            future.set_exception(failure)
        else:
            self._jobs.append((future, fn, args, kwargs))
            self._wake.set()
        return future

    def _run(self) -> None:
        try:
            if self._setup is not None:
                self._setup()
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - every waiting job learns why
            self._die(exc)

    def _loop(self) -> None:
        while True:
            if not self._jobs:
                self._wake.wait(_IDLE_S)
                self._wake.clear()
                continue
            with self._lock:
                job = self._jobs.popleft()
                if job is None or self._aborted is not None:
                    return
                future, fn, args, kwargs = job
                if not future.set_running_or_notify_cancel():
                    continue
                self._running = future
            try:
                result, error = fn(*args, **kwargs), None
            except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the future
                log.warning("eplb %s thread: %s failed: %s", self.name, getattr(fn, "__name__", fn), exc)
                result, error = None, exc
            with self._lock:
                self._running = None
                if self._aborted is not None:  # its future already failed; the result is of no use
                    return
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)

    def _die(self, cause: BaseException) -> None:
        died = SideThreadDied(self.name, cause)
        log.error("%s", died)
        self._fail_all(died, lambda: setattr(self, "died", died))

    def _fail_all(self, exc: BaseException, mark) -> None:
        """Under the lock, ``mark()`` this thread stopped and take every queued and running job; then fail each
        with ``exc``."""
        with self._lock:
            mark()
            futures = [job[0] for job in self._jobs if job is not None]
            self._jobs.clear()
            self._jobs.append(None)
            self._wake.set()
            if self._running is not None:
                futures.append(self._running)
        for future in futures:
            if not future.done():
                future.set_exception(exc)

    def drain(self) -> None:
        """Wait until every job submitted so far ran (tests and shutdown; never in a serving step)."""
        future = self.submit(lambda: None)
        try:
            future.result()
        except EplbFailure:  # aborted or dead: nothing more will run
            pass

    def abort(self, exc: BaseException) -> None:
        """Any thread: fail the running job and every queued one with ``exc``, at once, and run no more jobs. A job
        blocked in a collective stays blocked until its group's timeout; its result is dropped."""
        if self._aborted is None:
            self._fail_all(exc, lambda: setattr(self, "_aborted", exc))

    def close(self, wait: bool = True) -> None:
        """Stop the thread after the jobs queued so far (``wait=False``: do not wait for a job that may hang)."""
        self._jobs.append(None)
        self._wake.set()
        if wait and self.died is None:
            self._thread.join()
