"""Fault-injecting planner worker loop for tests/runtime/test_runtime_dist.py.

A module of its own, free of torch and pytest, so the spawned worker process starts as fast as the real one.
"""

from __future__ import annotations

import os
import time

import dataclasses

from eplb.runtime.planner import READY, finish, plan_request, warm_up


def faulty_worker(requests, results, warmup, marker: str):
    """The real worker loop, except for a request that finds the file ``marker``: it is removed and the request
    fails as the file says: ``hang`` (sleeps), ``crash`` (exits) or ``invalid`` (answers an invalid plan)."""
    if warmup is not None:
        warm_up(*warmup)
    results.put(READY)
    while True:
        request = requests.get()
        if request is None:
            return
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
