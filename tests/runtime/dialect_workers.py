"""Planner worker loop for tests/runtime/test_dialect_runs.py: the real one, plus a gate and a record of its requests.

A module of its own, free of torch and pytest, so the spawned worker process starts as fast as the real one.
"""

from __future__ import annotations

import os
import time

import numpy as np

from eplb.runtime.planner import READY, run_request, warm_up


def gated_worker(requests, results, warmup, gate: str, loads: str):
    """The real worker loop, except that each request's load is saved as ``loads/cycle{N}.npy`` (what the planner was
    asked to plan on) and, when ``gate`` names a file, no reply leaves before that file exists (a planner exactly as
    late as the test wants)."""
    if warmup is not None:
        warm_up(*warmup)
    results.put(READY)
    while True:
        request = requests.get()
        if request is None:
            return
        np.save(os.path.join(loads, f"cycle{request.cycle}.npy"), request.load)
        while gate and not os.path.exists(gate):
            time.sleep(0.005)
        results.put(run_request(request))
