"""What each cycle did, for the log and for Prometheus: :class:`CycleMetrics`, the window figures the side thread
measures (:func:`window_figures`) and their export (:class:`PrometheusExporter`).

The exporter never costs the serving thread more than a reference or a deque append: step times are queued, the
last cycles kept by reference, and everything else (means, gains, the histogram's buckets) is computed when
Prometheus scrapes, on the HTTP server's thread. The metrics, their labels and a scrape example: docs/runtime.md.
"""

from __future__ import annotations

import bisect
import collections
import logging
from dataclasses import dataclass, field

import numpy as np

from eplb.metrics import rank_loads
from eplb.placement import Placement

__all__ = ["CycleMetrics", "WindowFigures", "PrometheusExporter", "log_cycle", "window_figures", "STEP_BUCKETS",
           "count_event"]

log = logging.getLogger("eplb.runtime.controller")

#: upper bounds (seconds) of the step-time histogram's buckets: a decode step of a large MoE takes 10-100 ms
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class CycleMetrics:
    """Figures of one cycle (also logged, and exported to Prometheus when enabled).

    Attributes:
        cycle: cycle number (0-based).
        submit_step: step at which the window was handed to the planner.
        window_par: float64 ``[L]`` measured PAR of the window, with the placement in force.
        par_before, par_after: float64 ``[L]`` PAR the plan predicts on the window (None when no plan came).
        planned_layers: layers the plan switches (record mode: would switch), in order.
        applied_layers: layers switched to the new placement, in order (a layer switched in parts, to fit
            ``bytes_per_step``, once per part).
        skipped_layers: layers the plan changed but the cycle did not apply (no gain, similarity, ...).
        moved_slots, bytes_moved: over the applied layers (bytes received by this rank in ``bytes_received``).
        planner_s: seconds the policy took in the worker.
        transfer_s: seconds this rank spent posting and waiting for transfers.
        switch_s: seconds of host work switching layers besides the transfers (in-place copies, table updates).
        staging_bytes: staging memory this rank held for the cycle's transfers (device and pinned host arenas).
        late_steps: steps of the cycle in which the serving thread waited for an agreement not finished one step
            (or one check) after it started (a peer hung or starved); 0 when serving never waited.
        skipped: why the whole cycle was skipped, or None.
        next_window_par: float64 ``[L]`` measured PAR of the following window (filled one cycle later).
        rank_load: float64 ``[W]`` routings (token x expert) each rank served in the window, all layers (failed
            ranks: 0); None until the window is gathered.
        step_s, next_step_s: median seconds between two steps on this rank in the window and in the following
            window (filled one cycle later); nan until known.
    """

    cycle: int
    submit_step: int
    window_par: np.ndarray
    par_before: np.ndarray | None = None
    par_after: np.ndarray | None = None
    planned_layers: list[int] = field(default_factory=list)
    applied_layers: list[int] = field(default_factory=list)
    skipped_layers: list[int] = field(default_factory=list)
    moved_slots: int = 0
    bytes_moved: int = 0
    bytes_received: int = 0
    planner_s: float = float("nan")
    transfer_s: float = 0.0
    switch_s: float = 0.0
    staging_bytes: int = 0
    late_steps: int = 0
    skipped: str | None = None
    next_window_par: np.ndarray | None = None
    rank_load: np.ndarray | None = None
    step_s: float = float("nan")
    next_step_s: float = float("nan")

    @property
    def predicted_par(self) -> tuple[float, float]:
        """Mean PAR over all layers the plan predicts on its window, before and after the cycle (a layer the plan
        does not switch keeps its PAR before); nan without a plan."""
        if self.par_before is None:
            return float("nan"), float("nan")
        after = np.array(self.par_before, dtype=np.float64)
        layers = list(dict.fromkeys(self.planned_layers))
        after[layers] = np.asarray(self.par_after, dtype=np.float64)[layers]
        return float(np.mean(self.par_before)), float(np.mean(after))

    @property
    def predicted_gain(self) -> float:
        """Share of the step time the plan should save: ``1 - PAR after / PAR before`` (means over layers: every
        layer serves the same routings in a step, so the sum of the busiest ranks' loads scales with the mean PAR).
        An upper bound: it counts the whole step as the busiest ranks' expert work. nan without a plan."""
        before, after = self.predicted_par
        return 1.0 - after / before if before > 0 else float("nan")

    @property
    def measured_gain(self) -> float:
        """Share of the step time the cycle saved as measured: ``1 - next_step_s / step_s`` (median step times of
        the window after the cycle and of the window it planned on); nan until the next window ended. It also moves
        with the batch sizes of the two windows."""
        return 1.0 - self.next_step_s / self.step_s if self.step_s > 0 else float("nan")


@dataclass(frozen=True)
class WindowFigures:
    """What the side thread measures at a window's end besides its PAR: :attr:`CycleMetrics.rank_load` and
    :attr:`CycleMetrics.step_s`."""

    rank_load: np.ndarray
    step_s: float


def window_figures(window: np.ndarray, placement: Placement, failed: np.ndarray, step_s) -> WindowFigures:
    """Side thread: the figures of a window's load ``[L, E]`` on ``placement`` (``failed`` bool ``[W]``: those ranks
    serve nothing) and the step times measured over it (seconds; the median is kept)."""
    if failed.any():
        loads = placement.without_ranks(failed).rank_loads(window)
    else:
        loads = rank_loads(placement, window)
    return WindowFigures(loads.sum(axis=0), float(np.median(step_s)) if len(step_s) else float("nan"))


def log_cycle(current: CycleMetrics, record_mode: bool) -> None:
    """Log the end of a cycle (record mode: the plan was written, nothing moved)."""
    before, after = current.predicted_par
    if record_mode:
        log.info("eplb cycle %d (record mode): plan for %d layers written, predicted mean PAR %.3f -> %.3f "
                 "(step time up to %.1f%% shorter), nothing moved", current.cycle, len(current.planned_layers),
                 before, after, 100 * current.predicted_gain)
        return
    applied = list(dict.fromkeys(current.applied_layers))
    log.info("eplb cycle %d: %d layers switched (%s), %d slots moved, %d bytes received here, predicted mean "
             "PAR %.3f -> %.3f (step time up to %.1f%% shorter), planner %.3f s, transfers %.3f s and switching "
             "%.3f s on this rank", current.cycle, len(applied), applied, current.moved_slots,
             current.bytes_received, before, after, 100 * current.predicted_gain, current.planner_s,
             current.transfer_s, current.switch_s)


class PrometheusExporter:
    """The runtime's metrics on ``port`` (rank 0), in a registry of their own, for Prometheus to scrape.

    The serving thread calls :meth:`step` once per step and :meth:`update` once per finished or skipped cycle;
    both only keep references. ``prometheus_client`` must be installed (the controller checks it at start:
    ``pip install "eplb[metrics]"``).

    Args:
        port: TCP port of the HTTP endpoint (all interfaces); 0 picks a free one (:attr:`port` says which).
    """

    def __init__(self, port: int):
        import prometheus_client

        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self._steps: collections.deque = collections.deque()  # step seconds not yet in the histogram's buckets
        self._buckets = [0] * (len(STEP_BUCKETS) + 1)
        self._step_sum = 0.0
        self._cycles: collections.deque = collections.deque(maxlen=2)  # the last two cycles, by reference
        self._totals = {"applied": 0, "recorded": 0, "skipped": 0}
        self._late_steps = self._bytes = 0
        #: name -> [description, count]: events outside the cycles (always served, 0 until they happen)
        self._events: dict[str, list] = {"disabled": ["Times EPLB turned itself off (its own threads failed)", 0]}
        self.registry.register(self)
        self.server, self._thread = prometheus_client.start_http_server(port, registry=self.registry)
        self.port = self.server.server_port

    def step(self, seconds: float) -> None:
        """Serving thread: one step's duration (seconds between two ``before_forward`` calls)."""
        self._steps.append(seconds)

    def update(self, m: CycleMetrics, record_mode: bool = False) -> None:
        """Serving thread: cycle ``m`` ended (applied, written in record mode, or skipped)."""
        outcome = "skipped" if m.skipped else "recorded" if record_mode else "applied"
        self._totals[outcome] += 1
        self._late_steps += m.late_steps
        self._bytes += m.bytes_received
        self._cycles.append(m)

    def count(self, name: str, description: str) -> None:
        """Serving thread: one more ``eplb_<name>_total`` (an event outside the cycles)."""
        self._events.setdefault(name, [description, 0])[1] += 1

    def close(self) -> None:
        """Stop serving metrics."""
        self.server.shutdown()
        self.server.server_close()

    def collect(self):
        """Prometheus scrape (the HTTP server's thread): the metric families of docs/runtime.md."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        while self._steps:
            seconds = self._steps.popleft()
            self._buckets[bisect.bisect_left(STEP_BUCKETS, seconds)] += 1
            self._step_sum += seconds
        cumulative = np.cumsum(self._buckets).tolist()
        yield HistogramMetricFamily(
            "eplb_step_seconds", "Seconds between two steps on rank 0, as the runtime sees them",
            buckets=[(str(b), n) for b, n in zip(STEP_BUCKETS, cumulative)] + [("+Inf", cumulative[-1])],
            sum_value=self._step_sum)
        cycles = CounterMetricFamily("eplb_cycles", "Cycles ended, by outcome", labels=["outcome"])
        for outcome, count in dict(self._totals).items():
            cycles.add_metric([outcome], count)
        yield cycles
        yield CounterMetricFamily("eplb_late_steps", "Steps in which serving waited for an agreement a step late",
                                  value=self._late_steps)
        yield CounterMetricFamily("eplb_received_bytes", "Expert weight bytes rank 0 received", value=self._bytes)
        for name, (text, count) in list(self._events.items()):
            yield CounterMetricFamily(f"eplb_{name}", text, value=count)
        recent = list(self._cycles)  # one C call: atomic against the serving thread's append
        if not recent:
            return
        last = recent[-1]
        before, after = last.predicted_par
        gauges = {
            "eplb_window_par": ("Measured mean PAR over layers of the last cycle's window, placement in force",
                                float(np.mean(last.window_par))),
            "eplb_par_before": ("Predicted mean PAR of the last plan on its window, before it", before),
            "eplb_par_after": ("Predicted mean PAR of the last plan on its window, after it", after),
            "eplb_moved_slots": ("Slots the last cycle moved", last.moved_slots),
            "eplb_planner_seconds": ("Seconds the last plan took in the planner", last.planner_s),
            "eplb_transfer_seconds": ("Seconds rank 0 spent on the last cycle's transfers", last.transfer_s),
        }
        measured = next((m for m in reversed(recent) if m.next_step_s == m.next_step_s), None)
        if measured is not None:
            gauges["eplb_gain_cycle"] = ("The cycle the step gains are of (the last whose next window ended)",
                                         measured.cycle)
            gauges["eplb_predicted_step_gain"] = ("Share of the step time the cycle's plan predicted to save "
                                                  "(upper bound)", measured.predicted_gain)
            gauges["eplb_measured_step_gain"] = ("Share of the median step time saved, next window over the "
                                                 "planned one", measured.measured_gain)
        for name, (text, value) in gauges.items():
            yield GaugeMetricFamily(name, text, value=float(value))
        if last.rank_load is not None:
            load = GaugeMetricFamily("eplb_rank_load", "Routings (token x expert) each rank served in the last "
                                     "cycle's window, all MoE layers", labels=["rank"])
            for rank, value in enumerate(np.asarray(last.rank_load).tolist()):
                load.add_metric([str(rank)], value)
            yield load


def count_event(exporter: PrometheusExporter | None, name: str, description: str) -> None:
    """One more ``eplb_<name>_total`` (an event outside the cycles, e.g. ``disabled``: EPLB turned itself off), when
    metrics are exported."""
    if exporter is not None:
        exporter.count(name, description)
