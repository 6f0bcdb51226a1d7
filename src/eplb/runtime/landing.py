"""Parts in flight: posted, and switched at the first step at which every rank knows they landed everywhere.

The rule (the same the simulator follows, :mod:`eplb.cycle`): parts posted in step ``s`` never make serving wait.
From step ``s + 1`` on, each step starts an agreement on this rank's :func:`landing_status` (an asynchronous
all-reduce on a group of its own, :class:`~eplb.runtime.agreement.Agreement`, which never queues behind a transfer)
and the next step reads it (:func:`read_landing`): ``READY`` on every rank
switches the parts in that step on every rank (``s + 2`` at the earliest); ``PENDING`` on some rank keeps the old
placement serving one more step; ``FAILED`` (a transfer raised) or ``LATE`` (not landed within
``transfer_deadline_s``) on some rank abandons them on every rank (the rest of the plan is given up; the placement in
force stays); ``OFF`` turns EPLB off everywhere. :func:`land` does it for a controller, once per step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from eplb.runtime.agreement import Agreement, Status
from eplb.runtime.mover import PendingMove
from eplb.runtime.round import failure_of

__all__ = ["PendingSwitch", "landing_status", "read_landing", "land"]

log = logging.getLogger("eplb.runtime.controller")


@dataclass
class PendingSwitch:
    """Parts posted and not yet switched.

    Attributes:
        parts: the plan's part indices (``CyclePlan.parts``).
        posted: the step they were posted in.
        move: the mover's :class:`~eplb.runtime.mover.PendingMove`.
        agreement: the landing agreement started in the last step (None before the first).
    """

    parts: tuple[int, ...]
    posted: int
    move: PendingMove
    agreement: Agreement | None = None
    #: why this rank reported OFF in the last agreement
    trouble: str = ""


def landing_status(pending: PendingSwitch, channel, deadline_s: float | None) -> tuple[Status, str]:
    """This rank's part in the landing agreement, and why when it is ``OFF`` (no wait)."""
    if channel.died is not None:
        return Status.OFF, str(channel.died)
    future = pending.move.future
    if future.done():
        failure = failure_of(future)
        if failure is not None:
            return Status.OFF, f"the transfer job failed: {failure}"
        return (Status.READY if future.result().error is None else Status.FAILED), ""
    if deadline_s is not None and time.monotonic() - pending.move.posted_at > deadline_s:
        return Status.LATE, ""
    return Status.PENDING, ""


def read_landing(pending: PendingSwitch) -> tuple[Status, bool]:
    """The agreement started in the last step: ``(lowest status, whether it was late)``; it waits only when late
    (a tiny all-reduce on a group of its own, started a whole step ago: a peer hung or starved of CPU).

    Raises:
        PeerError: the all-reduce failed; RankFailure: the heartbeat aborted the channel (the engine fails over).
    """
    agreement, pending.agreement = pending.agreement, None
    late = not agreement.done()
    return agreement.result()[0], late


def land(ctl) -> str:
    """Serving thread, before the cycle's step of controller ``ctl``, while parts are in flight: switch them when
    every rank agreed last step that they landed, abandon them or turn EPLB off when that was agreed, else start the
    next agreement. Returns the step's kind: ``switch`` or ``landing``."""
    pending = ctl.pending
    if pending.agreement is not None:
        status, late = read_landing(pending)
        ctl.metrics[-1].late_steps += int(late)
        if status is Status.READY:
            _switch(ctl)
            return "switch"
        if status is Status.OFF:
            ctl.disable(pending.trouble or "EPLB's threads failed on another rank")
            return "landing"
        if status < Status.PENDING:
            if status is Status.LATE:  # a hung NCCL call ends when its communicator is aborted
                ctl.channel.abandon_nccl()
            _abandon(ctl, f"a transfer {'missed transfer_deadline_s' if status is Status.LATE else 'failed'} on "
                          "some rank")
            return "landing"
    status, pending.trouble = landing_status(pending, ctl.channel, ctl.config.transfer_deadline_s)
    pending.agreement = ctl.channel.agree(status)
    return "landing"


def _switch(ctl) -> None:
    """Switch the parts every rank agreed landed: weights copied in place, tables written (device ops only)."""
    pending, ctl.pending = ctl.pending, None
    start = time.perf_counter()
    staged = ctl.mover.commit(pending.move)
    for part in staged.parts:
        ctl.in_force.switch(part.switch)
    current, move = ctl.metrics[-1], pending.move
    current.transfer_s += move.post_s
    current.switch_s += time.perf_counter() - start
    current.bytes_received += move.bytes_received
    ctl.record_move(move.side_s, move.bytes_received // max(ctl.mover.expert_bytes(staged.parts[0].layer), 1))
    current.applied_layers += [part.layer for part in staged.parts]
    current.staging_bytes = max(current.staging_bytes, ctl.mover.staging_bytes)
    ctl.cycle.switched(ctl.step)
    ctl._end_of_apply()


def _abandon(ctl, reason: str) -> None:
    """Every rank gives up the parts in flight and the rest of the plan; the placement in force stays."""
    ctl.pending = None
    ctl.mover.abandon()  # receives in flight may still land in the old staging
    ctl.cycle.abandon(ctl.step, reason)
    current = ctl.metrics[-1]
    current.skipped = reason
    log.warning("eplb cycle %d abandoned at step %d: %s; serving continues on the placement in force",
                current.cycle, ctl.step, reason)
    ctl._export(current)
