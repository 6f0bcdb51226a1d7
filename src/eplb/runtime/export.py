"""What each cycle did, for the log and for Prometheus: :class:`CycleMetrics` and their export."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CycleMetrics", "PrometheusExporter", "log_cycle", "count_event"]

log = logging.getLogger("eplb.runtime.controller")


@dataclass
class CycleMetrics:
    """Figures of one cycle (also logged, and exported to Prometheus when enabled).

    Attributes:
        cycle: cycle number (0-based).
        submit_step: step at which the window was handed to the planner.
        window_par: float64 ``[L]`` measured PAR of the window, with the placement in force.
        par_before, par_after: float64 ``[L]`` PAR the plan predicts on the window (None when no plan came).
        applied_layers: layers switched to the new placement, in order (a layer switched in parts, to fit
            ``bytes_per_step``, once per part).
        skipped_layers: layers the plan changed but the cycle did not apply (no gain, similarity, ...).
        moved_slots, bytes_moved: over the applied layers (bytes received by this rank in ``bytes_received``).
        planner_s: seconds the policy took in the worker.
        transfer_s: seconds this rank spent posting and waiting for transfers.
        switch_s: seconds of host work switching layers besides the transfers (in-place copies, table updates).
        staging_bytes: staging memory this rank held for the cycle's transfers (device and pinned host arenas).
        late_steps: steps of the cycle in which the serving thread waited for EPLB's side thread (a transfer or an
            agreement not finished one step after it started); 0 when serving never waited.
        skipped: why the whole cycle was skipped, or None.
        next_window_par: float64 ``[L]`` measured PAR of the following window (filled one cycle later).
    """

    cycle: int
    submit_step: int
    window_par: np.ndarray
    par_before: np.ndarray | None = None
    par_after: np.ndarray | None = None
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


def log_cycle(current: CycleMetrics, record_mode: bool, planned_layers: int) -> None:
    """Log the end of a cycle (record mode: the plan of ``planned_layers`` layers was written, nothing moved)."""
    if record_mode:
        log.info("eplb cycle %d (record mode): plan for %d layers written, predicted mean PAR %.3f -> %.3f, "
                 "nothing moved", current.cycle, planned_layers, float(np.mean(current.par_before)),
                 float(np.mean(current.par_after)))
        return
    applied = list(dict.fromkeys(current.applied_layers))
    log.info("eplb cycle %d: %d layers switched (%s), %d slots moved, %d bytes received here, predicted mean "
             "PAR %.3f -> %.3f, planner %.3f s, transfers %.3f s and switching %.3f s on this rank", current.cycle,
             len(applied), applied, current.moved_slots, current.bytes_received,
             float(np.mean(current.par_before[applied])), float(np.mean(current.par_after[applied])),
             current.planner_s, current.transfer_s, current.switch_s)


class PrometheusExporter:
    """Cycle metrics as Prometheus gauges on ``port`` (rank 0), when prometheus_client is installed."""

    def __init__(self, port: int):
        try:
            import prometheus_client as prom
        except ImportError:
            log.warning("prometheus_port is set but prometheus_client is not installed; metrics go to the log only")
            self.gauges = None
            return
        prom.start_http_server(port)
        names = {
            "par_before": "predicted mean PAR before the last plan",
            "par_after": "predicted mean PAR after the last plan",
            "window_par": "measured mean PAR of the last window",
            "moved_slots": "slots moved by the last cycle",
            "planner_seconds": "seconds the last plan took",
            "transfer_seconds": "seconds rank 0 spent on the last cycle's transfers",
            "skipped_cycles": "cycles skipped since start",
        }
        self.gauges = {k: prom.Gauge(f"eplb_{k}", v) for k, v in names.items()}
        self.skipped = 0

    def update(self, m: CycleMetrics) -> None:
        if self.gauges is None:
            return
        g = self.gauges
        g["window_par"].set(float(np.mean(m.window_par)))
        if m.par_before is not None:
            g["par_before"].set(float(np.mean(m.par_before)))
            g["par_after"].set(float(np.mean(m.par_after)))
            g["planner_seconds"].set(m.planner_s)
        g["moved_slots"].set(m.moved_slots)
        g["transfer_seconds"].set(m.transfer_s)
        if m.skipped:
            self.skipped += 1
        g["skipped_cycles"].set(self.skipped)


def count_event(exporter: PrometheusExporter | None, name: str, description: str) -> None:
    """Add one to the Prometheus counter ``eplb_<name>_total`` (an event outside the cycles, e.g. ``disabled``: EPLB
    turned itself off), when metrics are exported."""
    if exporter is None or exporter.gauges is None:
        return
    import prometheus_client as prom

    counters = exporter.__dict__.setdefault("counters", {})
    if name not in counters:
        counters[name] = prom.Counter(f"eplb_{name}", description)
    counters[name].inc()
