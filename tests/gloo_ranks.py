"""Run a test's ranks as real processes on one host (a Gloo group over loopback) and collect what each one wrote.

A rank's main is ``main(rank, port, tmp, *args)``: it initialises its process group on ``127.0.0.1:port`` and pickles
its results to ``tmp/rank{rank}.pkl`` (:func:`write_result`). A module of its own, free of pytest, so the spawned
ranks import it fast.
"""

from __future__ import annotations

import os
import pickle
import socket
import time


def free_port() -> int:
    """A TCP port free on the loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_result(tmp: str, rank: int, result) -> None:
    """Rank side: ``result`` pickled where :func:`run_ranks` reads it."""
    with open(os.path.join(tmp, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_ranks(main, world: int, tmp: str, timeout_s: float, args: tuple = ()) -> list:
    """Spawn ``world`` processes running ``main(rank, port, tmp, *args)``, wait for them (killing them all when they
    take longer than ``timeout_s``: a deadlock fails the test instead of hanging it), and return each rank's result.

    Raises:
        AssertionError: they did not finish in time.
    """
    import torch.multiprocessing as tmp_mp

    ctx = tmp_mp.start_processes(main, args=(free_port(), tmp, *args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError(f"the {world} ranks did not finish within {timeout_s:g} s")
    results = []
    for rank in range(world):
        with open(os.path.join(tmp, f"rank{rank}.pkl"), "rb") as f:
            results.append(pickle.load(f))
    return results
