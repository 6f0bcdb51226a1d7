"""When a cycle starts by the clock: xLLM's ``eplb_update_interval``, seconds from one plan to the next.

xLLM re-plans at the first load update after its interval passed, whatever the step count. Here the ranks must
start a window in the same step, so the clock is read in steps every ``planner_check_steps``: each rank says
whether its own clock passed the interval since the last cycle started (one small all-reduce on EPLB's side group,
started in one check step and read in the next), and the step that reads "some rank's did" ends the window on every
rank. The serving thread reads the agreement one check interval after it started; it waits only if the side thread
has not finished it by then.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

__all__ = ["UpdateTimer"]


class UpdateTimer:
    """The seconds-based cycle trigger of one controller.

    Args:
        interval_s: seconds from one cycle's start to the next (``update_interval_s``).
        check_steps: read the clocks every this many steps (``planner_check_steps``).
        clock: the time source (seconds, monotonic).
    """

    def __init__(self, interval_s: float, check_steps: int, clock=time.monotonic):
        self.interval_s, self.check_steps, self.clock = interval_s, check_steps, clock
        self.started = clock()
        self._agreement = None  # (channel, Future of "some rank's clock passed"), read at the next check step

    def due(self, step: int, channel, collecting: bool) -> bool:
        """Serving thread, every step: whether the window ends now (every rank gets True in the same step; the
        clocks are read in the collecting phase only, every ``check_steps`` steps). ``channel``: the controller's
        :class:`~eplb.runtime.transport.SideChannel` now (a failover replaces it; an agreement started on the old
        one is dropped)."""
        if not collecting or step % self.check_steps:
            return False
        fired = False
        if self._agreement is not None:
            started_on, future = self._agreement
            self._agreement = None
            fired = started_on is channel and bool(future.result())
        if fired:
            self.started = self.clock()
            return True
        passed = self.clock() - self.started >= self.interval_s
        self._agreement = (channel, channel.submit(_any_rank, channel, passed))
        return False


def _any_rank(channel, passed: bool) -> bool:
    """Side thread: whether any rank's clock passed the interval."""
    flag = torch.tensor([int(passed)], dtype=torch.int64)
    if channel.world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=channel.cpu_group)
    return bool(flag[0])
