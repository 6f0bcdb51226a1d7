"""How the ranks agree, on EPLB's CPU side groups: one small all-reduce each time, never on the serving stream.

Every agreement is the minimum over the ranks of a :class:`Status` (and, for a plan, its checksum): each rank acts on
the lowest status any rank reported, so all of them act alike in the same step. In a serving step the serving thread
starts one (:class:`Agreement`: an asynchronous all-reduce of three integers on a Gloo group that carries nothing
else, run by Gloo's own threads, which need neither the interpreter lock nor a Python thread to be scheduled) and
reads it a step (or a check) later; it waits only if the agreement has not finished by then, which takes a peer
that is hung or starved of CPU.
"""

from __future__ import annotations

import enum
import time

import numpy as np
import torch
import torch.distributed as dist

from eplb.errors import PeerError

__all__ = ["Status", "PeerError", "Agreement", "collective", "all_reduce"]

_WAIT_POLL_S = 0.0005  # how often a late agreement is looked at (and whether the channel was aborted meanwhile)
_MIN_OPTIONS = dist.AllreduceOptions()
_MIN_OPTIONS.reduceOp = dist.ReduceOp.MIN


class Status(enum.IntEnum):
    """A rank's part in an agreement; every rank acts on the lowest one reported."""

    #: EPLB's own threads failed on this rank: every rank turns EPLB off, serving goes on with the placement in force
    OFF = -3
    #: the planner failed or the cycle waits for its interval, or a transfer failed: the cycle is skipped
    FAILED = -2
    #: a transfer has not landed by its deadline: it is abandoned and the cycle skipped
    LATE = -1
    #: not yet: ask again at the next agreement
    PENDING = 0
    #: the plan is ready here, or the transfer landed here
    READY = 1

def collective(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, a ``torch.distributed`` call; its failure raised as :class:`PeerError`."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        raise PeerError(f"{getattr(fn, '__name__', fn)} on EPLB's side group failed: {exc}") from exc


def all_reduce(tensor: torch.Tensor, op, group=None, device="cpu") -> torch.Tensor:
    """``tensor`` reduced with ``op`` over ``group`` (itself when not distributed or alone), back on the host.

    Raises:
        PeerError: the collective failed.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tensor
    tensor = tensor.to(device)
    collective(dist.all_reduce, tensor, op=op, group=group)
    return tensor.cpu()


class Agreement:
    """An agreement in flight: every rank's ``status`` and ``checksum``, reduced in one all-reduce to the lowest
    status and whether the checksums are equal, started without blocking.

    Args:
        status, checksum: this rank's part.
        group: the agreement group (None: this rank is alone, the agreement is its own status).
        aborted: returns the exception of an aborted channel, or None (a late agreement then raises it instead of
            waiting for a peer that is gone).
    """

    def __init__(self, status: Status, checksum: int = 0, group=None, aborted=lambda: None):
        self._array = np.array([int(status), checksum, -checksum], dtype=np.int64)
        self._values = torch.from_numpy(self._array)  # the same memory: the result is read from the array
        self._aborted = aborted
        self._work = None
        if group is not None:  # the group's own call: no Python checks of the module function in a serving step
            self._work = collective(group.allreduce, [self._values], _MIN_OPTIONS)

    def done(self) -> bool:
        """Whether every rank's part arrived (no wait)."""
        return self._work is None or self._work.is_completed()

    def result(self) -> tuple[Status, bool]:
        """``(lowest status, same checksums)``; waits only when not :meth:`done`.

        Raises:
            PeerError: the all-reduce failed (a peer died or timed out).
            Exception: the channel was aborted (the heartbeat's :class:`~eplb.runtime.heartbeat.RankFailure`).
        """
        while not self.done():
            failure = self._aborted()
            if failure is not None:
                raise failure
            time.sleep(_WAIT_POLL_S)
        if self._work is not None:
            collective(self._work.wait)
        values = self._array
        return Status(int(values[0])), int(values[1]) == -int(values[2])
