"""EPLB's failure detector: every rank beats through the job's key-value store, and a rank whose beat stops is
declared failed by the survivors together, without waiting for a collective to raise.

Why: on NCCL a collective with a dead or hung peer does not raise promptly (it hangs until the watchdog kills the
process), and a Gloo collective with a hung peer (SIGSTOP, a stuck driver) raises only at the group's timeout. The
store is a separate TCP service that stays up when a rank dies, so it can tell who stopped.

How (:class:`Heartbeat`: one daemon thread and, on Linux with a TCP store, one small process per rank):

- every ``interval_s`` the rank's beat is written to the store: a counter, not a timestamp (clocks differ across
  hosts). The beating process (:mod:`eplb.runtime.heartbeat_writer`) writes it while the rank process runs and stops
  while it is stopped (SIGSTOP) or gone, without the rank's interpreter lock: the serving thread can hold that lock for
  seconds inside a C++ call (measured: 0.6 s in a Gloo group's construction on a loaded 2-core machine), which
  would starve a beating thread and get a live rank declared failed. The heartbeat thread beats too: it covers the
  process's start-up (an interpreter and torch's import: one to four seconds here) and stores that are not TCP
  stores; there, a serving thread holding the lock for longer than the timeout gets its rank declared failed;
- the thread reads every watched peer's beat plus the failure-event count in one ``multi_get`` per interval (store
  calls release the GIL), so it runs while serving is blocked inside a collective;
- a peer whose beat has not changed for ``timeout_s`` of this rank's monotonic clock is failed. A hung process
  stops beating exactly like a dead one;
- agreement: the first survivor to see it publishes failure event ``n`` (every failed rank so far) with the store's
  ``compare_set``; the others adopt event ``n`` as published, whether or not their own timer ran out. So every
  survivor acts on the same failed set. Events are numbered and cumulative, job-wide, by global rank; a heartbeat
  reports the ranks of its own group only;
- on a new event it calls its callbacks (the controller's: fail the side channel's jobs, abort EPLB's NCCL group and,
  opt-in, the serving group's NCCL communicators) and wakes a serving thread waiting in :meth:`Heartbeat.wait`.

Assumed: the store outlives the ranks (torchrun's agent store, or a launcher that hosts it, as
:func:`eplb.engine.launch.launch` does with ``rank_failures=True``). When the store does not answer (its host died)
nobody can tell who failed: the heartbeat logs an error, declares nobody failed and retries every interval; serving
is not touched. Each store request of the heartbeat has its own connection with a timeout of ``timeout_s``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from eplb.errors import EplbError, EplbFailure, RankFailure
from eplb.runtime import heartbeat_writer

__all__ = ["Heartbeat", "RankFailure", "FailureEvent", "watch", "survivors_group", "abort_nccl",
           "published_failures"]

log = logging.getLogger(__name__)

_BEAT = "eplb/heartbeat/beat/{}"
_EVENTS = "eplb/heartbeat/events"  # how many failure events were published
_EVENT = "eplb/heartbeat/event/{}"
_CLOSED = b"closed"  # a rank that stopped serving on purpose: no longer watched, not failed
_COMPLETION_POLL_S = 0.001  # how often :meth:`Heartbeat.wait` looks at a work whose future fired (NCCL: queued)

@dataclass(frozen=True)
class FailureEvent:
    """One agreed failure event, as this rank saw it.

    Attributes:
        index: the event's number in the job (0-based).
        ranks: every failed rank of this group so far (group ranks, ascending).
        detected_at: ``time.time()`` when this rank adopted it (for benchmarks on one host).
        proposed_here: this rank published it (its own timer ran out first).
    """

    index: int
    ranks: list[int]
    detected_at: float
    proposed_here: bool


def _raw_store(store):
    """The store under any prefixes (the heartbeat's keys are job-wide, readable by the launcher)."""
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store


class Heartbeat:
    """Beats for this rank and watches the other ranks of a group (see the module docstring).

    Args:
        members: the global rank of every rank of the group (group rank ``i`` is ``members[i]``); includes this one.
        interval_s: seconds between two beats (and two reads of the others').
        timeout_s: a peer whose beat has not changed for this long is failed (> ``interval_s``).
        store: the c10d store of the job (default: the default process group's).
        rank: this rank's global rank (default: the default process group's).

    Call :meth:`start`, and :meth:`close` when serving ends.
    """

    def __init__(self, members: list[int], interval_s: float, timeout_s: float, store=None, rank: int | None = None):
        if not timeout_s > interval_s > 0:
            raise EplbError(f"the heartbeat needs 0 < interval_s < timeout_s, got interval_s={interval_s}, "
                            f"timeout_s={timeout_s}")
        self.members = [int(m) for m in members]
        self.me = dist.get_rank() if rank is None else int(rank)
        if self.me not in self.members:
            raise EplbError(f"global rank {self.me} is not in the heartbeat's group {self.members}")
        self.interval_s, self.timeout_s = float(interval_s), float(timeout_s)
        self._source = _raw_store(store if store is not None else dist.group.WORLD.get_group_store())
        self._store = None  # the heartbeat's own connection (:meth:`_connect`)
        self._lock = threading.Lock()
        self._watched = [m for m in self.members if m != self.me]
        self._last: dict[int, bytes] = {}
        self._changed: dict[int, float] = {}
        self._failed: set[int] = set()  # global ranks of the group declared failed
        self._acknowledged: set[int] = set()
        self._seen = 0  # events read
        self._beats = 0
        self._callbacks: list = []
        self._waiters: set[threading.Event] = set()
        self._news = threading.Condition(self._lock)
        self._stop = threading.Event()
        #: every agreed :class:`FailureEvent` that named ranks of this group
        self.events: list[FailureEvent] = []
        #: the last store error (None while the store answers)
        self.store_error: str | None = None
        #: this rank was itself declared failed (it stopped beating for too long): it must stop serving
        self.declared_failed = False
        self._thread = threading.Thread(target=self._run, name="eplb-heartbeat", daemon=True)
        self._beating = None  # the beating process

    # -- serving thread -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start beating and watching (the first beat is written before this returns).

        Raises:
            EplbError: the store does not answer within ``timeout_s``.
        """
        try:
            self._connect()
            self._seen = int(self._store.add(_EVENTS, 0))  # events of an earlier group of this job are not ours
            self._store.set(_BEAT.format(self.me), "0")
            keys = [_BEAT.format(m) for m in self._watched]
            if not self._store.check(keys):  # a peer not started yet: its key must exist, a read would wait for it
                for key in keys:
                    self._store.compare_set(key, "", "0")
        except Exception as exc:  # noqa: BLE001 - torch raises bare RuntimeErrors / DistStoreErrors
            raise EplbFailure(f"the heartbeat cannot use the store: {exc}") from None
        now = time.monotonic()
        self._changed = {m: now for m in self._watched}
        self._thread.start()
        if sys.platform.startswith("linux") and isinstance(self._source, dist.TCPStore):
            # its own session: Ctrl-C in a terminal is for the rank, which stops it (it exits when the rank is gone)
            args = (self._source.host, self._source.port, _BEAT.format(self.me), self.interval_s, self.timeout_s,
                    os.getpid())
            self._beating = subprocess.Popen([sys.executable, heartbeat_writer.__file__, *map(str, args)],
                                             stdin=subprocess.DEVNULL, start_new_session=True)

    def add_callback(self, fn) -> None:
        """Call ``fn(ranks)`` on the heartbeat thread at each new failure event (``ranks``: every failed group rank
        so far). It must not block: it runs between two beats."""
        self._callbacks.append(fn)

    def failed_peers(self) -> list[int]:
        """The group ranks declared failed so far (agreed by every survivor), ascending. Never blocks."""
        with self._lock:
            return self._ranks(self._failed)

    def unhandled(self) -> list[int]:
        """Failed group ranks the controller has not failed over yet (:meth:`acknowledge`)."""
        with self._lock:
            return self._ranks(self._failed - self._acknowledged)

    def acknowledge(self, failed) -> None:
        """The engine failed over ``failed`` (group ranks: ids or a bool mask); stop watching them."""
        ranks = np.flatnonzero(failed).tolist() if np.asarray(failed).dtype == bool else list(failed)
        with self._lock:
            gone = {self.members[r] for r in ranks}
            self._acknowledged |= gone
            self._watched = [m for m in self._watched if m not in gone]

    def wait(self, work) -> None:
        """Serving thread: wait for a collective's ``work`` (``async_op=True``), or raise :class:`RankFailure` as
        soon as a failure not yet failed over is declared (a collective with a hung peer would never return).

        Completion is :meth:`Work.is_completed`: an NCCL work's future fires when the work is queued on its stream,
        not when it ran, so the future only wakes this wait, which then looks every millisecond (a Gloo work's
        future fires when it completed, so a Gloo wait ends at once).

        Raises:
            RankFailure: the heartbeat declared ranks failed before ``work`` completed.
        """
        if not work.is_completed():
            wake = threading.Event()  # set by the work's future, and by the heartbeat on a failure
            with self._lock:
                self._waiters.add(wake)
            try:
                work.get_future().add_done_callback(lambda _: wake.set())
                while not work.is_completed():
                    if self.unhandled():
                        raise RankFailure(self.unhandled())
                    if wake.is_set():
                        time.sleep(_COMPLETION_POLL_S)
                    else:
                        wake.wait(self.interval_s)
            finally:
                with self._lock:
                    self._waiters.discard(wake)
        work.wait()

    def wait_for_failure(self, timeout_s: float) -> list[int]:
        """Serving thread, after a collective raised: the failed group ranks not failed over yet, waiting up to
        ``timeout_s`` for the heartbeat to declare them (a dead peer's socket error comes before its timeout).

        Raises:
            EplbError: nobody was declared failed in time (the error had another cause).
        """
        with self._news:
            self._news.wait_for(lambda: self._failed - self._acknowledged, timeout=timeout_s)
        pending = self.unhandled()
        if not pending:
            raise EplbFailure(f"no rank was declared failed within {timeout_s:g} s")
        return pending

    def close(self) -> None:
        """Stop beating; the others stop watching this rank (it left on purpose, it did not fail)."""
        self._stop.set()
        if self._thread.is_alive():  # the beating process beats meanwhile: no silence before the goodbye
            self._thread.join(timeout=self.timeout_s + self.interval_s)
        if self._beating is not None:
            self._beating.kill()
            self._beating.wait(timeout=self.timeout_s)
        try:
            if self._store is not None:
                self._store.set(_BEAT.format(self.me), _CLOSED)
        except Exception as exc:  # noqa: BLE001 - the store may be gone at shutdown; nothing to do about it
            log.warning("eplb heartbeat: could not say goodbye through the store: %s", exc)

    # -- heartbeat thread ---------------------------------------------------------------------------------------
    def _ranks(self, ranks: set[int]) -> list[int]:
        return sorted(self.members.index(m) for m in ranks)

    def _connect(self) -> None:
        """A connection of the heartbeat's own, so a request never queues behind another thread's (or blocks it),
        with a timeout of ``timeout_s``: a store that does not answer is reported within that time."""
        try:
            store = self._source.clone()
        except (AttributeError, RuntimeError):  # a store that cannot be cloned is shared
            store = self._source
        store.set_timeout(timedelta(seconds=self.timeout_s))
        self._store = store

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            due = max(due + self.interval_s, time.monotonic())
            try:
                if self._store is None:
                    self._connect()
                self._tick()
            except Exception as exc:  # noqa: BLE001 - a store that does not answer must not end the heartbeat
                self._store_down(exc)
            if self.declared_failed:
                return

    def _store_down(self, exc: Exception) -> None:
        if self.store_error is None:
            log.error("eplb heartbeat: the store does not answer (%s); rank failures cannot be detected until it "
                      "does (the store must outlive the ranks, e.g. torchrun's agent store); serving goes on",
                      exc)
        self.store_error = str(exc)
        self._store = None  # a new connection next time

    def _tick(self) -> None:
        self._beats += 1
        self._store.set(_BEAT.format(self.me), f"t{self._beats}")  # the beating process writes p<n>
        watched = list(self._watched)
        values = self._store.multi_get([_BEAT.format(m) for m in watched] + [_EVENTS])
        now = time.monotonic()
        if self.store_error is not None:  # nothing was seen while it was down: every clock starts again
            log.warning("eplb heartbeat: the store answers again; failure detection resumed")
            self.store_error = None
            self._changed = {m: now for m in self._changed}
        for member, value in zip(watched, values):
            if value == _CLOSED:
                with self._lock:
                    self._watched = [m for m in self._watched if m != member]
            elif value != self._last.get(member):
                self._last[member], self._changed[member] = value, now
        while self._seen < int(values[-1]):
            self._adopt(json.loads(self._store.get(_EVENT.format(self._seen))), False)
        stale = {m for m in self._watched if now - self._changed[m] >= self.timeout_s}
        while stale - self._failed and not self.declared_failed:
            proposal = {"ranks": sorted(self._failed | stale), "by": self.me}
            published = json.loads(self._store.compare_set(_EVENT.format(self._seen), "", json.dumps(proposal)))
            mine = published["by"] == self.me
            self._adopt(published, mine)
            if mine:
                self._store.add(_EVENTS, 1)

    def _adopt(self, event: dict, mine: bool) -> None:
        """Event ``self._seen`` as published (``event["ranks"]``: every failed global rank of the job so far)."""
        index = self._seen
        self._seen += 1
        ranks = set(event["ranks"]) & set(self.members)
        if self.me in ranks:
            self.declared_failed = True
            log.error("eplb heartbeat: this rank (%d) was declared failed by rank %d (it did not beat for %.1f s); "
                      "the survivors serve without it: stop this process", self.me, event["by"], self.timeout_s)
        with self._news:
            new = ranks - self._failed
            if not new:
                return
            self._failed |= new
            self._watched = [m for m in self._watched if m not in self._failed]
            failed = self._ranks(self._failed)
            self.events.append(FailureEvent(index, failed, time.time(), mine))
            waiters = list(self._waiters)
            self._news.notify_all()
        log.warning("eplb heartbeat: ranks %s declared failed (event %d, %s)", self._ranks(new), index,
                    "detected here" if mine else f"published by global rank {event['by']}")
        for done in waiters:
            done.set()
        for fn in self._callbacks:
            try:
                fn(failed)
            except Exception:  # noqa: BLE001 - one callback's error must not stop detection
                log.exception("eplb heartbeat: a failure callback raised")


def published_failures(store, start: int = 0) -> list[list[int]]:
    """The failure events published in the job from ``start`` on: each the failed global ranks so far (a launcher
    reads them to fence the ranks declared failed: a hung process must not come back)."""
    store = _raw_store(store)
    count = int(store.add(_EVENTS, 0))
    return [json.loads(store.get(_EVENT.format(i)))["ranks"] for i in range(start, count)]


def abort_nccl(group) -> bool:
    """Abort the NCCL communicators of ``group`` (None: the default group), so device work and host waits on them
    end with an error instead of hanging. Gloo is left alone: torch 2.13's ``ProcessGroupGloo.abort`` does not end
    an operation in progress and makes the next one hang. Returns whether an NCCL backend was aborted."""
    pg = group if group is not None else dist.group.WORLD
    try:
        backend = pg._get_backend(torch.device("cuda"))
    except (RuntimeError, ValueError):
        return False
    if backend.name().lower() != "nccl":
        return False
    backend.abort()
    return True


def survivors_group(members: list[int], failed):
    """The process group of the live ranks (group ranks not in ``failed``: ids or a bool mask), made without the
    failed ones, as :meth:`eplb.runtime.EplbController.fail_ranks` needs it. Collective over the live ranks."""
    mask = np.zeros(len(members), dtype=bool)
    mask[np.flatnonzero(failed) if np.asarray(failed).dtype == bool else list(failed)] = True
    live = [m for m, dead in zip(members, mask) if not dead]
    return dist.new_group(live, use_local_synchronization=True)


def watch(controller) -> Heartbeat | None:
    """The heartbeat of ``controller``'s EP group when its config sets ``heartbeat_interval_s`` (and the group has
    more than one rank), started, with the controller's reaction to a failure; None otherwise."""
    config = controller.config
    if config.heartbeat_interval_s is None or not (dist.is_available() and dist.is_initialized()):
        return None
    group = controller.group
    size = dist.get_world_size(group)
    if size == 1:
        return None
    members = [dist.get_global_rank(group, r) for r in range(size)] if group is not None else list(range(size))
    heartbeat = Heartbeat(members, config.heartbeat_interval_s, config.heartbeat_timeout_s)

    def react(ranks: list[int]) -> None:
        channel = controller.channel
        if channel is not None:  # no side-thread job stays stuck on the dead peer
            channel.abort(RankFailure(ranks))
            if channel.backend_name == "nccl":
                abort_nccl(channel.backend.group)
        if config.heartbeat_abort_serving and abort_nccl(controller.group):
            log.warning("eplb heartbeat: the serving group's NCCL communicators were aborted")

    heartbeat.add_callback(react)
    heartbeat.start()
    return heartbeat
