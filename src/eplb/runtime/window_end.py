"""What EPLB's side thread does when a load window ends: the window's load over the side group, its PAR, the
seconds-based interval, the measured move price and the planner request. The serving thread only snapshots the
recorder's buffers (device copies) and submits :meth:`WindowEnd.run`; the controller reads the figures later.

A cycle that waits for the interval (``eplb_update_interval``) returns :data:`WAITING_FOR_INTERVAL` instead of asking
the planner; every rank decides it alike (one all-reduce of "my clock is past it").
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch
import torch.distributed as dist

from eplb.metrics import balancedness, par, rank_loads
from eplb.placement import Placement
from eplb.pricing import MovePrice, measured_price
from eplb.runtime.agreement import all_reduce

__all__ = ["WindowEnd", "WAITING_FOR_INTERVAL", "window_par"]

log = logging.getLogger(__name__)

WAITING_FOR_INTERVAL = "eplb_update_interval has not elapsed since the last cycle"


def window_par(window: np.ndarray, placement: Placement, failed: np.ndarray, step: int,
               log_balancedness: bool = False) -> np.ndarray:
    """float64 ``[L]``: the PAR of the window's load ``[L, E]`` on ``placement`` over the live ranks (``failed``
    bool ``[W]``), logged with the balancedness when asked."""
    if failed.any():
        loads = placement.without_ranks(failed).rank_loads(window)[:, ~failed]
    else:
        loads = rank_loads(placement, window)
    out = par(loads)
    if log_balancedness:
        log.info("eplb step %d: balancedness %.4f, mean PAR %.3f", step, balancedness(loads), float(out.mean()))
    return out


class WindowEnd:
    """The side thread's window-end job of one controller.

    Args:
        config: the :class:`~eplb.runtime.config.EplbConfig`.
        recorder: the :class:`~eplb.runtime.recorder.LoadRecorder` whose snapshots are gathered.
        planner: the :class:`~eplb.runtime.planner.PlannerWorker` asked for a plan.
        prices_moves: whether the plan is priced with this runtime's measured move and step times.
        cycle_steps: the re-plan interval in steps (the life of a plan, for the price).
    """

    def __init__(self, config, recorder, planner, prices_moves: bool, cycle_steps: int):
        self.config, self.recorder, self.planner = config, recorder, planner
        self.prices_moves, self.cycle_steps = prices_moves, cycle_steps
        self._interval_start = time.monotonic()
        #: adaptive cadence: the per-step rows of the last window_steps steps (a window reaches back past the
        #: previous submit; the recorder restarts at each one) and the step after the last of them
        self._rows, self._rows_end = None, None

    def run(self, channel, snapshot, event, request, failed: np.ndarray, step: int, measured: tuple,
            window_start: int | None = None) -> tuple:
        """Side thread: ``(window [L, E], window PAR [L], reason to wait or None)``, and the planner asked for the
        plan of ``request`` (its load filled in, priced with ``measured``: this rank's seconds per moved expert and
        its recent step times). ``event``: the serving stream's work the snapshot came from (None on CPU);
        ``window_start``: the first step of the window the cycle named (adaptive cadence)."""
        if event is not None:
            channel.stream.wait_event(event)
        load = self.recorder.logical_load(request.current, channel.cpu_group, snapshot.to_host(channel.stream))
        if self.config.adaptive_cadence is not None and load.ndim == 3 and window_start is not None:
            load = self._slide(load, window_start, step)
        window = load.sum(axis=0) if load.ndim == 3 else load
        placement = Placement(request.current, window.shape[-1], request.topology)
        figures = window_par(window, placement, failed, step, self.config.log_balancedness)
        if not self._interval_elapsed(channel):
            return window, figures, WAITING_FOR_INTERVAL
        if self.planner.busy:  # an abandoned request still runs: start afresh rather than queue behind it
            self.planner.restart()
        if load.size and load.max() <= np.iinfo(np.int32).max:
            load = load.astype(np.int32)  # half the bytes to pickle to the worker (a per-step window is large)
        move_s, step_s = measured
        price = self._price(channel, load, request, move_s, float(np.median(step_s)) if step_s else 0.0)
        self.planner.submit(dataclasses.replace(request, load=load, price=price))
        return window, figures, None

    def _slide(self, rows: np.ndarray, window_start: int, step: int) -> np.ndarray:
        """The rows of steps ``[window_start, step)``: this submit's rows after those kept from earlier ones."""
        if self._rows is not None and self._rows_end == step - rows.shape[0]:
            rows = np.concatenate([self._rows, rows])
        first = step - rows.shape[0]
        rows = rows[max(0, window_start - first):]
        self._rows, self._rows_end = rows[-self.config.adaptive_cadence.window_steps:], step
        return rows

    def _price(self, channel, load, request, move_s: float, step_s: float) -> MovePrice | None:
        """The price of a move from the transfer time per received expert and the median step time measured on
        this rank, the largest of every rank's (one all-reduce, so every rank plans on the same figures); None
        while either is unmeasured, with ``measured_price`` off or for a policy that does not price its moves (the
        model's defaults then apply)."""
        if not (self.config.measured_price and self.prices_moves):
            return None
        agreed = torch.tensor([move_s, step_s], dtype=torch.float64)
        if channel.world > 1:
            agreed = all_reduce(agreed, dist.ReduceOp.MAX, channel.cpu_group)
        return measured_price(float(agreed[0]), float(agreed[1]), load, request.current,
                              request.topology.num_ranks, float(self.cycle_steps))

    def _interval_elapsed(self, channel) -> bool:
        """xLLM's seconds-based interval, agreed by all ranks (any rank's clock past it starts the cycle)."""
        if self.config.update_interval_s is None:
            return True
        elapsed = float(time.monotonic() - self._interval_start >= self.config.update_interval_s)
        flag = torch.tensor([elapsed])
        if channel.world > 1:  # rare (a cycle start), on the side group
            flag = all_reduce(flag, dist.ReduceOp.MAX, channel.cpu_group)
        if flag[0] > 0:
            self._interval_start = time.monotonic()
            return True
        return False
