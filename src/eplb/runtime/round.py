"""One cycle's plan in flight: from the window end to the step every rank accepts (or skips) it together.

A :class:`PlanRound` starts when a window ends: the side thread gathers the window over the side group and asks the
planner worker (:class:`~eplb.runtime.window_end.WindowEnd`). In every check step (``planner_check_steps`` apart,
:meth:`~eplb.runtime.config.EplbConfig.check_step`) the
serving thread takes what has finished, without waiting, into this rank's :class:`~eplb.runtime.agreement.Status`
and starts an agreement on it; the next check step reads the agreement on every rank, so all of them act alike:
``READY`` everywhere with equal checksums accepts the plan, ``FAILED`` anywhere skips the cycle, ``OFF`` anywhere turns
EPLB off, ``PENDING`` waits for the next check step.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future

import numpy as np

from eplb.runtime.agreement import Agreement, PeerError, Status
from eplb.runtime.heartbeat import RankFailure
from eplb.runtime.planner import PlannerReply

__all__ = ["PlanRound", "Agreed", "failure_of"]

log = logging.getLogger(__name__)


def failure_of(future: Future) -> str | None:
    """A done ``future``'s failure that must turn EPLB off (its description), None when it succeeded. A rank
    failure (the heartbeat's, or a collective with a dead peer) is raised instead: the engine fails over."""
    exc = future.exception()
    if exc is None:
        return None
    if isinstance(exc, (RankFailure, PeerError)):
        raise exc
    return f"{type(exc).__name__}: {exc}"


class Agreed:
    """What an agreement decided: the lowest status of every rank and whether their checksums are equal."""

    def __init__(self, status: Status, same: bool):
        self.status, self.same = status, same


class PlanRound:
    """The plan of one window, in flight.

    Args:
        cycle: the cycle's number.
        submitted: the step its window ended in.
        gathering: the side thread's window-end job: ``(window [L, E], window PAR [L], WindowFigures)``.
    """

    def __init__(self, cycle: int, submitted: int, gathering: Future):
        self.cycle, self.submitted = cycle, submitted
        self.gathering: Future | None = gathering
        #: this rank's part in the next agreement, and why when it is FAILED or OFF
        self.status, self.reason = Status.PENDING, ""
        self.reply: PlannerReply | None = None
        #: the agreement started in the last check step (read in the next)
        self.agreement: Agreement | None = None
        #: the window's load ``[L, E]``, PAR ``[L]`` and :class:`~eplb.runtime.export.WindowFigures` once gathered
        self.window: np.ndarray | None = None
        self.window_par: np.ndarray | None = None
        self.figures = None

    def gathered(self) -> bool:
        """Serving thread: take the window figures if the side thread finished them (never waits); whether it did
        now."""
        if self.gathering is None or not self.gathering.done():
            return False
        future, self.gathering = self.gathering, None
        failure = failure_of(future)
        if failure is not None:
            self._set(Status.OFF, f"the window-end job failed: {failure}")
            return True
        self.window, self.window_par, self.figures = future.result()
        return True

    def record(self, metrics: list) -> np.ndarray | None:
        """Put the window's PAR into its cycle's :class:`~eplb.runtime.export.CycleMetrics` (the last of
        ``metrics``) and the one before's ``next_window_par``; returns the window's load (None: not gathered)."""
        if self.window_par is not None:
            current = metrics[-1]
            current.window_par, current.rank_load, current.step_s = (self.window_par, self.figures.rank_load,
                                                                     self.figures.step_s)
            if len(metrics) > 1 and metrics[-2].next_window_par is None:
                metrics[-2].next_window_par, metrics[-2].next_step_s = self.window_par, self.figures.step_s
        return self.window

    def poll(self, check: bool, channel, planner) -> tuple[Agreed | None, bool, bool]:
        """A poll step (a check step when ``check``): read the agreement of the last check step when this is a check
        step, else (or when it says PENDING) refresh this rank's status and, in a check step, start the next
        agreement. Returns ``(what was agreed or None, whether the agreement was late, whether one was
        started)``."""
        if self.agreement is not None:
            if not check:  # it runs beside serving until the next check step
                return None, False, False
            agreed, late = self.read_agreement()
            if agreed.status is not Status.PENDING:
                return agreed, late, False
        else:
            late = False
        self.refresh(planner)
        if check:
            self.start_agreement(channel)
        return None, late, check

    def refresh(self, planner) -> None:
        """Serving thread: this rank's status from the planner (never waits; the window figures are taken by
        :meth:`gathered` first)."""
        if planner.broken:
            self._set(Status.OFF, planner.broken)
        if self.status is not Status.PENDING or self.gathering is not None:
            return
        state, value = planner.poll()
        if state == "ready":
            self.reply, self.status = value, Status.READY
        elif state == "failed":
            self._set(Status.FAILED, value)

    def _set(self, status: Status, reason: str) -> None:
        if status < self.status:  # the worst news stays
            self.status, self.reason = status, reason

    def start_agreement(self, channel) -> None:
        """Start the agreement on this rank's status and plan checksum (hashed by the planner worker)."""
        checksum = self.reply.plan.checksum if self.status is Status.READY else 0
        self.agreement = channel.agree(self.status, checksum)

    def read_agreement(self) -> tuple[Agreed, bool]:
        """The agreement started in the last check step, and whether it was late (then this waited for it: a tiny
        all-reduce on a group of its own, started a check ago).

        Raises:
            PeerError: the all-reduce failed; RankFailure: the heartbeat aborted the channel.
        """
        agreement, self.agreement = self.agreement, None
        late = not agreement.done()
        status, same = agreement.result()
        return Agreed(status, same), late
