"""Run a function on every rank of a real Gloo process group (spawned processes) and collect what each returned.

``fn(rank, tmp, *args)`` must be a module-level function (spawn pickles it by name) returning something picklable;
an exception in it comes back as ``{"error": traceback}``. Every collective has a 60 s timeout and the whole run
``timeout_s``, so a deadlock fails the test instead of blocking CI.
"""

from __future__ import annotations

import os
import pickle
import time
import traceback
from datetime import timedelta

import pytest


def run_ranks(fn, world: int, tmp: str, args: tuple = (), timeout_s: float = 300.0) -> list:
    """What ``fn`` returned on each of ``world`` ranks, by rank."""
    import torch.multiprocessing as tmp_mp

    ctx = tmp_mp.start_processes(_rank_main, args=(fn, world, tmp, args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} ranks did not finish within {timeout_s} s (deadlock?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    out = []
    for rank in range(world):
        with open(os.path.join(tmp, f"rank{rank}.pkl"), "rb") as f:
            out.append(pickle.load(f))
    return out


def _rank_main(rank: int, fn, world: int, tmp: str, args: tuple):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        result = fn(rank, tmp, *args)
    except Exception:  # noqa: BLE001 - reported by the test
        result = {"error": traceback.format_exc()}
    with open(os.path.join(tmp, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    dist.destroy_process_group()


def exit_with(tmp: str, rank: int, result) -> None:
    """In ``fn``: leave ``result`` where :func:`run_ranks` reads it and end the process without tearing the group
    down (a side thread may still wait in a collective with a peer that stopped)."""
    with open(os.path.join(tmp, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    os._exit(0)
