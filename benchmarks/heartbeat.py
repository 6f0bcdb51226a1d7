"""How long EPLB's heartbeat takes to declare a failed rank, on real processes (Gloo, CPU, one host).

For each ``interval/timeout`` setting and each way of failing (``SIGKILL``: the process is gone; ``SIGSTOP``: it
hangs, alive, sockets open), ``--ranks`` processes serve a loop of small all-reduces on the default group, each
waited through the heartbeat (:meth:`eplb.runtime.heartbeat.Heartbeat.wait`); after ``--warmup-s`` (the beating
processes start meanwhile) the last rank fails. Per survivor: ``detect_s``, from the failure (the dying rank's
``time.time()`` just before the signal) to the heartbeat adopting the failure event; ``woken_s``, to the serving thread leaving its blocked collective (it raises
:class:`~eplb.runtime.heartbeat.RankFailure`, or, after a SIGKILL, Gloo's own error, whichever comes first). The
survivors then build their group with :func:`~eplb.runtime.heartbeat.survivors_group` and run one all-reduce on it
(``rebuild_s``). Figures are min / median / max over survivors and ``--repeats`` runs.

Prints one JSON object::

    python benchmarks/heartbeat.py [--ranks 4] [--repeats 2] [--settings 0.1/1,0.5/2.5,1/5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

import numpy as np
import torch
import torch.distributed as dist

from eplb.engine.launch import launch, last_words
from eplb.runtime.heartbeat import Heartbeat, survivors_group


def _rank(rank: int, world: int, emit, interval_s: float, timeout_s: float, how: str, warmup_s: float) -> dict:
    heartbeat = Heartbeat(list(range(world)), interval_s, timeout_s)
    heartbeat.start()
    tensor = torch.ones(16)
    start = time.monotonic()
    try:
        while True:
            if rank == world - 1 and time.monotonic() - start > warmup_s:
                last_words(time.time())
                os.kill(os.getpid(), getattr(signal, how))
            try:
                heartbeat.wait(dist.all_reduce(tensor, async_op=True))
            except RuntimeError:  # RankFailure, or Gloo's error once a killed peer's socket closed
                woken = time.time()
                break
            time.sleep(0.001)
        failed = heartbeat.wait_for_failure(timeout_s + 2 * interval_s)
        begin = time.perf_counter()
        group = survivors_group(list(range(world)), failed)
        dist.all_reduce(torch.ones(1), group=group)
        rebuild = time.perf_counter() - begin
        heartbeat.acknowledge(failed)
        return {"detected_at": heartbeat.events[0].detected_at, "woken_at": woken, "rebuild_s": rebuild,
                "failed": failed}
    finally:
        heartbeat.close()


def _stats(values) -> dict:
    return {"min": round(float(np.min(values)), 3), "median": round(float(np.median(values)), 3),
            "max": round(float(np.max(values)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", default="0.1/1,0.5/2.5,1/5", help="interval_s/timeout_s pairs")
    parser.add_argument("--warmup-s", type=float, default=5.0,
                        help="serving time before the last rank fails (the beating processes start meanwhile)")
    args = parser.parse_args()
    out = {"ranks": args.ranks, "repeats": args.repeats, "cases": []}
    for setting in args.settings.split(","):
        interval_s, timeout_s = (float(x) for x in setting.split("/"))
        for how in ("SIGKILL", "SIGSTOP"):
            detect, woken, rebuild = [], [], []
            for _ in range(args.repeats):
                died = []
                results = launch(_rank, args.ranks, (interval_s, timeout_s, how, args.warmup_s),
                                 timeout_s=120 + 3 * timeout_s, on_event=lambda rank, t: died.append(t),
                                 collective_timeout_s=120, rank_failures=True)
                for result in results[:-1]:
                    assert result["failed"] == [args.ranks - 1], result
                    detect.append(result["detected_at"] - died[0])
                    woken.append(result["woken_at"] - died[0])
                    rebuild.append(result["rebuild_s"])
            out["cases"].append({"interval_s": interval_s, "timeout_s": timeout_s, "failure": how,
                                 "detect_s": _stats(detect), "woken_s": _stats(woken),
                                 "rebuild_s": _stats(rebuild)})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
