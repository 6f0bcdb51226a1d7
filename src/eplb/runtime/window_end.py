"""What EPLB's side thread does when a load window ends: the window's load over the side group, its PAR and figures,
the load the plan sees (:mod:`eplb.runtime.load_history`), the measured move price and the planner request. The
serving thread only snapshots the recorder's buffers (device copies) and submits :meth:`WindowEnd.run`; the controller
reads the figures later.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
import torch.distributed as dist

from eplb.cycle.pricing import MovePrice, measured_price
from eplb.metrics import balancedness, par, rank_loads
from eplb.placement import Placement
from eplb.runtime.agreement import all_reduce
from eplb.runtime.export import window_figures
from eplb.runtime.load_history import LoadHistory

__all__ = ["WindowEnd", "window_par", "gathered_load", "static_window", "write_record"]

log = logging.getLogger(__name__)


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


def gathered_load(channel, recorder, snapshot, event, current: np.ndarray, failed: np.ndarray) -> np.ndarray:
    """Side thread: the logical load of a recorder's ``snapshot`` over the side group (see
    :meth:`~eplb.runtime.recorder.LoadRecorder.logical_load`), once the serving stream's work before ``event`` is
    done (None on CPU); ``current``: the placement in force, int64 ``[L, P]``; ``failed``: bool ``[W]``."""
    if event is not None:
        channel.stream.wait_event(event)
    return recorder.logical_load(current, channel.cpu_group, snapshot.to_host(channel.stream),
                                 ~failed if failed.any() else None)


def static_window(channel, recorder, snapshot, event, current: Placement, failed: np.ndarray, step: int,
                  log_balancedness: bool) -> np.ndarray:
    """Side thread, static mode: the window's PAR ``[L]`` on the placement in force (logged when asked)."""
    load = gathered_load(channel, recorder, snapshot, event, current.phy2log, failed)
    return window_par(load.sum(axis=0) if load.ndim == 3 else load, current, failed, step, log_balancedness)


def write_record(placement: Placement, path: str, cycle: int) -> None:
    """Side thread, record mode: the plan's map written to ``path`` (vllm-ascend JSON, atomically); a plan the format
    cannot hold, or a file that cannot be written, is logged, never raised into serving."""
    from eplb.errors import EplbError
    from eplb.formats import write_map

    try:
        write_map(placement, path, "ascend")
    except (EplbError, OSError) as exc:
        log.error("eplb record mode: cycle %d map not written: %s", cycle, exc)
        return
    log.info("eplb record mode: cycle %d map written to %s", cycle, path)


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
        self.history = LoadHistory(config.load_history)
        #: adaptive cadence: the per-step rows of the last window_steps steps (a window reaches back past the
        #: previous submit; the recorder restarts at each one) and the step after the last of them
        self._rows, self._rows_end = None, None

    def run(self, channel, snapshot, event, request, failed: np.ndarray, step: int, measured: tuple,
            window_start: int | None = None) -> tuple:
        """Side thread: ``(window [L, E], window PAR [L], WindowFigures)``, and the planner asked for the plan of
        ``request`` (its load filled in from the load history, priced with ``measured``: this rank's seconds per
        moved expert and its recent step times). ``event``: the serving stream's work the snapshot came from (None on
        CPU); ``window_start``: the first step of the window the cycle named (adaptive cadence)."""
        load = gathered_load(channel, self.recorder, snapshot, event, request.current, failed)
        if self.config.adaptive_cadence is not None and load.ndim == 3 and window_start is not None:
            load = self._slide(load, window_start, step)
        window = load.sum(axis=0) if load.ndim == 3 else load
        placement = Placement(request.current, window.shape[-1], request.topology)
        par_of_window = window_par(window, placement, failed, step, self.config.log_balancedness)
        move_s, step_s = measured
        figures = window_figures(window, placement, failed, step_s)
        if self.planner.busy:  # an abandoned request still runs: start afresh rather than queue behind it
            self.planner.restart()
        price = self._price(channel, load, request, move_s, float(np.median(step_s)) if step_s else 0.0)
        load = self.history.add(load)
        if load.size and load.max() <= np.iinfo(np.int32).max:
            load = load.astype(np.int32)  # half the bytes to pickle to the worker (a per-step window is large)
        self.planner.submit(dataclasses.replace(request, load=load, price=price))
        self.history.planned()
        return window, par_of_window, figures

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
