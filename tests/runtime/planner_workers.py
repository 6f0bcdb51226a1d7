"""Planner worker loops for the runtime's tests: the real loop with a fault injected, a gate, or a record of its
requests.

A module of its own, free of torch and pytest, so the spawned worker process starts as fast as the real one.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from eplb.runtime.planner import READY, finish, plan_request, run_request, warm_up


def _serve(requests, results, warmup, answer) -> None:
    """The real worker's loop: warm up, say ready, then ``answer(request)`` each request until ``None``."""
    if warmup is not None:
        warm_up(*warmup)
    results.put(READY)
    while True:
        request = requests.get()
        if request is None:
            return
        answer(request)


def faulty_worker(requests, results, warmup, marker: str):
    """The real worker loop, except for a request that finds the file ``marker``: it is removed and the request
    fails as the file says: ``hang`` (sleeps), ``crash`` (exits) or ``invalid`` (answers an invalid plan)."""

    def answer(request):
        fault = None
        if os.path.exists(marker):
            with open(marker) as f:
                fault = f.read().strip()
            os.remove(marker)
        if fault == "hang":
            time.sleep(3600)
        if fault == "crash":
            os._exit(3)
        result = plan_request(request)
        if fault == "invalid":
            bad = result.plan.phy2log.copy()
            bad[0, :] = 0  # every slot of layer 0 holds expert 0: the other experts vanish
            result = dataclasses.replace(result, plan=dataclasses.replace(result.plan, phy2log=bad))
        results.put(finish(request, result))

    _serve(requests, results, warmup, answer)


def gated_worker(requests, results, warmup, gate: str, loads: str):
    """The real worker loop, except that each request's load is saved as ``loads/cycle{N}.npy`` (what the planner was
    asked to plan on) and, when ``gate`` names a file, no reply leaves before that file exists (a planner exactly as
    late as the test wants)."""

    def answer(request):
        np.save(os.path.join(loads, f"cycle{request.cycle}.npy"), request.load)
        while gate and not os.path.exists(gate):
            time.sleep(0.005)
        results.put(run_request(request))

    _serve(requests, results, warmup, answer)
