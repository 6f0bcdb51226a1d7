"""Run the device check: spawn the ranks on one device, collect what they report, return one verdict.

Whatever happens to the ranks (one raises, dies, or hangs), :func:`run_check` returns a result: the launch has a
timeout (:func:`eplb.engine.launch.launch` kills every rank still running), each rank emits each dispatch rule's
figures and any error as soon as it has them, and a rank still running shortly before the timeout writes the stacks
of all its threads to a file the result then carries.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

from eplb.device_check.report import summarise
from eplb.device_check.settings import CheckSettings

__all__ = ["run_check"]

_STACKS_LEAD_S = 5.0

class _Progress:
    """The ranks' events, in arrival order: finished modes, errors, and where each rank was last seen."""

    def __init__(self):
        self.modes: dict = {}  # (rank, dispatch) -> figures
        self.errors: dict = {}  # rank -> traceback
        self.last_step: dict = {}  # rank -> (dispatch, step, kinds)

    def on_event(self, rank: int, payload) -> None:
        kind = payload[0]
        if kind == "mode":
            self.modes[(rank, payload[2])] = payload[3]
        elif kind == "error":
            self.errors.setdefault(rank, payload[2])
        elif kind == "step":
            self.last_step[rank] = payload[1:]


def run_check(settings: CheckSettings) -> dict:
    """Run the check as ``settings`` say and return its result (see :func:`eplb.device_check.report.summarise`);
    never raises for what happens in the ranks."""
    from eplb.device_check.rank import check_rank
    from eplb.engine.launch import launch

    started = time.monotonic()
    progress = _Progress()
    results, error, stacks = [None] * settings.ranks, None, {}
    with tempfile.TemporaryDirectory(prefix="eplb-check-") as folder:
        try:
            # a rank still running shortly before the launch gives up writes its stacks (a wall-clock time: the ranks
            # start later than this, by seconds on a loaded machine)
            stacks_at = time.time() + settings.launch_timeout_s - min(_STACKS_LEAD_S, settings.margin_s / 2)
            results = launch(check_rank, settings.ranks, (settings, folder, stacks_at),
                             timeout_s=settings.launch_timeout_s, on_event=progress.on_event, log_level=logging.ERROR)
        except Exception as exc:  # noqa: BLE001 - a rank raised, died or hung: the result says which and why
            error = f"{type(exc).__name__}: {exc}"
        for rank in range(settings.ranks):
            path = os.path.join(folder, f"rank{rank}.stacks")
            if os.path.exists(path) and os.path.getsize(path):
                with open(path) as f:
                    stacks[rank] = f.read()
    return summarise(settings, results, progress, error, stacks, time.monotonic() - started)

