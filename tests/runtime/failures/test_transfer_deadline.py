"""A transfer that does not land in time is abandoned on every rank, and a hung peer is noticed while waiting on a
collective whose future fired when it was queued (NCCL's kind).

There is no GPU here and the CPU build of torch has no NCCL: the abandonment runs the code path the ``nccl`` backend
runs (the deadline, the agreement that abandons everywhere, the call that would abort EPLB's NCCL communicator), on
two Gloo ranks whose side thread is held so one rank's transfer never starts. What only NCCL does (the abort ending a
hung ``batch_isend_irecv``, the eager initialisation) is unproven here; see docs/runtime.md.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from eplb import Placement, Topology  # noqa: E402
from gloo_ranks import run_ranks  # noqa: E402

WORLD, EXPERTS, LAYERS = 2, 8, 4
TOPOLOGY = Topology(WORLD, 6)
DEADLINE_S = 0.5
pytestmark = pytest.mark.usefixtures("compiled_auto")


def _ids(step: int, rank: int) -> torch.Tensor:
    rng = np.random.default_rng([step, rank])
    p = np.random.default_rng(step // 40).dirichlet(np.full(EXPERTS, 0.3))
    return torch.as_tensor(rng.choice(EXPERTS, size=(32, 2), p=p))


def _rank_main(rank: int, tmp: str) -> dict:
    from eplb.runtime import EplbConfig, EplbController

    group = dist.new_group(list(range(WORLD)))
    out = {}
    config = EplbConfig.from_dict({"mode": "dynamic", "window_steps": 20, "planner_check_steps": 2,
                                   "policy": "default", "transfer_deadline_s": DEADLINE_S})
    tensors = [[torch.zeros(TOPOLOGY.slots_per_rank, 4)] for _ in range(LAYERS)]
    ctl = EplbController(config, LAYERS, EXPERTS, TOPOLOGY, rank, layer_tensors=tensors,
                         placement=Placement.initial(EXPERTS, TOPOLOGY, LAYERS))
    hold, held_at, abandoned_at = threading.Event(), None, None
    try:
        for _ in range(4000):
            if (rank == 1 and held_at is None and ctl.parts and ctl.pending is None
                    and not ctl.cycle.records[-1].schedule):  # a plan was accepted: this step posts its first part
                held_at = ctl.step  # rank 1's side thread does not start it
                ctl.channel.submit(hold.wait)
            ctl.before_forward()
            for layer in range(LAYERS):
                ctl.route(layer, _ids(ctl.step, rank))
            ctl.after_forward()
            if abandoned_at is None and any("transfer_deadline_s" in (m.skipped or "") for m in ctl.metrics):
                abandoned_at = ctl.step - 1
                hold.set()  # rank 1's transfer runs late: its rows land in staging nobody switches from
            time.sleep(0.005)
            done = torch.tensor([int(sum(1 for m in ctl.metrics if m.applied_layers) >= 1 and abandoned_at is not None
                                     and ctl.cycle.phase.value == "collect")])
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=group)
            if done[0]:
                break
        out = {"abandoned_at": abandoned_at, "held_at": held_at, "phy2log": ctl.placement.phy2log.tolist(),
               "cycles": [(m.skipped, m.applied_layers) for m in ctl.metrics],
               "switches": [r.switch_steps for r in ctl.cycle.records], "disabled": ctl.disabled,
               "nccl_aborted": ctl.channel.abandon_nccl()}
    finally:
        hold.set()
        ctl.close()
    return out


@pytest.mark.dist
@pytest.mark.slow
def test_a_transfer_past_its_deadline_is_abandoned_on_every_rank_in_the_same_step(tmp_path):
    runs = run_ranks(_rank_main, WORLD, str(tmp_path), timeout_s=400)
    for run in runs:
        assert "error" not in run, run["error"]
    first, second = runs
    summary = [(r["held_at"], r["abandoned_at"], r["cycles"][:6], r["switches"][:6]) for r in runs]
    assert first["abandoned_at"] is not None and first["abandoned_at"] == second["abandoned_at"], summary
    assert first["phy2log"] == second["phy2log"] and first["cycles"] == second["cycles"]
    abandoned = [c for c in first["cycles"] if c[0] and "missed transfer_deadline_s" in c[0]]
    assert len(abandoned) == 1 and abandoned[0][1] == []  # the part posted while held never switched
    assert any(applied for _, applied in first["cycles"])  # a later cycle moved again
    assert first["disabled"] is None and not first["nccl_aborted"]  # Gloo: nothing to abort


class _QueuedWork:
    """What an NCCL collective's work looks like to the host: its future fired when it was queued on the stream;
    it completes when the device ran it (``finish``)."""

    def __init__(self):
        self._future = torch.futures.Future()
        self._future.set_result(None)
        self._done = threading.Event()

    def get_future(self):
        return self._future

    def is_completed(self) -> bool:
        return self._done.is_set()

    def finish(self) -> None:
        self._done.set()

    def wait(self) -> bool:
        return True


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)


def test_the_heartbeat_wakes_a_wait_on_a_queued_collective_when_a_peer_hangs(store):
    from eplb.runtime.heartbeat import Heartbeat, RankFailure

    watcher = Heartbeat([0, 1], 0.05, 0.4, store=store, rank=0)  # rank 1 never beats: it hangs from the start
    watcher.start()
    try:
        finished = _QueuedWork()
        threading.Timer(0.1, finished.finish).start()
        watcher.wait(finished)  # completes before the timeout: returns
        start = time.monotonic()
        with pytest.raises(RankFailure, match=r"ranks \[1\]"):
            watcher.wait(_QueuedWork())  # never completes: its fired future must not end the wait
        assert time.monotonic() - start < 0.4 + 3 * 0.05 + 2.0
    finally:
        watcher.close()
