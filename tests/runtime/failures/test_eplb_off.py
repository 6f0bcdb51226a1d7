"""No silent death: when EPLB's own threads fail, every rank turns EPLB off in the same step, with one error log, and
serving goes on with the placement in force.

Two real Gloo ranks serve a small model; on rank 1 only, (a) the side thread's work raises in the middle of a move
(the move job of the second cycle's first part), (b) the side thread itself dies (a broken job kills its loop) while
a window is collected. Both ranks turn EPLB off in the same step, no part switches after that, and they serve 100 more
steps with the same placement and router tables. In one process: a thread whose set-up raises fails every job it was
given, and the planner's reply thread dying fails the request instead of leaving it pending forever.
"""

from __future__ import annotations

import logging
import time
import traceback

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from eplb import Placement, Topology  # noqa: E402
from gloo_ranks import exit_with, run_ranks  # noqa: E402

WORLD, EXPERTS, LAYERS = 2, 8, 4
TOPOLOGY = Topology(WORLD, 6)
pytestmark = pytest.mark.usefixtures("compiled_auto")  # the runtime's default policy, compiled once


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _ids(step: int, rank: int) -> torch.Tensor:
    rng = np.random.default_rng([step, rank])
    p = np.random.default_rng(step // 40).dirichlet(np.full(EXPERTS, 0.3))  # the skew moves every 40 steps
    return torch.as_tensor(rng.choice(EXPERTS, size=(32, 2), p=p))


def _agreed(flag: bool, group) -> bool:
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t[0])


def _scenario(rank: int, fault: str, group) -> dict:
    from eplb.runtime import EplbConfig, EplbController

    config = EplbConfig.from_dict({"mode": "dynamic", "window_steps": 20, "planner_check_steps": 2,
                                   "policy": "default", "planner_deadline_s": 60.0})
    placement = Placement.initial(EXPERTS, TOPOLOGY, LAYERS)
    tensors = [[torch.zeros(TOPOLOGY.slots_per_rank, 4)] for _ in range(LAYERS)]
    ctl = EplbController(config, LAYERS, EXPERTS, TOPOLOGY, rank, layer_tensors=tensors, placement=placement)
    errors = _Errors()
    logging.getLogger("eplb").addHandler(errors)
    armed, off_step, placement_at_off, tables_at_off, after = False, None, None, None, 0
    try:
        for _ in range(3000):
            applied = sum(1 for m in ctl.metrics if m.applied_layers)
            if rank == 1 and not armed and applied >= 1 and ctl.cycle.phase.value == "collect":
                armed = True
                if fault == "move":  # the next move job raises on the side thread
                    def broken(*args, **kwargs):
                        raise RuntimeError("injected: the move job failed")
                    ctl.mover._move = broken
                else:  # a job the side thread's loop cannot unpack: the thread dies
                    ctl.channel._side._jobs.append(("not a job",))
            ctl.before_forward()
            for layer in range(LAYERS):
                ctl.route(layer, _ids(ctl.step, rank))
            ctl.after_forward()
            if ctl.disabled and off_step is None:
                off_step = ctl.step - 1
                placement_at_off = ctl.placement.phy2log.copy()
                tables_at_off = ctl.router.tables.clone()
            after += int(off_step is not None)
            time.sleep(0.002)
            if _agreed(after > 100, group):
                break
        return {"off_step": off_step, "disabled": ctl.disabled, "errors": errors.messages,
                "placement_kept": bool(np.array_equal(ctl.placement.phy2log, placement_at_off)),
                "tables_kept": bool(torch.equal(ctl.router.tables, tables_at_off)), "after": after,
                "applied": [m.applied_layers for m in ctl.metrics], "skipped": [m.skipped for m in ctl.metrics]}
    finally:
        logging.getLogger("eplb").removeHandler(errors)
        ctl.close()


def _rank_main(rank: int, tmp: str) -> None:
    group = dist.new_group(list(range(WORLD)))  # the test's own agreement, beside the serving group
    out = {}
    for fault in ("move", "thread"):
        try:
            out[fault] = _scenario(rank, fault, group)
        except Exception:  # noqa: BLE001 - reported by the parent
            out[fault] = {"error": traceback.format_exc()}
    exit_with(tmp, rank, out)  # a side thread of rank 0 may still wait in a gather with rank 1's dead one


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_ranks(_rank_main, WORLD, str(tmp_path_factory.mktemp("eplb_off")), timeout_s=400)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("fault, cause", [("move", "injected: the move job failed"), ("thread", "side thread died")])
def test_every_rank_turns_eplb_off_together_and_serves_on(runs, fault, cause):
    results = [r[fault] for r in runs]
    for rank, res in enumerate(results):
        assert "error" not in res, res["error"]
        assert res["off_step"] is not None and res["after"] > 100, (rank, res)
        off = [m for m in res["errors"] if "turned itself off" in m]
        assert len(off) == 1, (rank, res["errors"])  # one error log
        assert res["placement_kept"] and res["tables_kept"], rank
    assert results[0]["off_step"] == results[1]["off_step"]  # agreed: the same step on every rank
    assert cause in results[1]["disabled"] and "another rank" in results[0]["disabled"]
    assert results[0]["applied"] == results[1]["applied"]  # no part switched on one rank only


def test_a_thread_whose_set_up_raises_fails_every_job_it_was_given():
    from eplb.runtime.worker import SideThreadDied, SideWorker

    started = __import__("threading").Event()

    def setup():
        started.wait(5)
        raise RuntimeError("no device")

    worker = SideWorker("test", setup)
    queued = worker.submit(lambda: 1)
    started.set()
    with pytest.raises(SideThreadDied, match="no device"):
        queued.result(timeout=5)
    with pytest.raises(SideThreadDied, match="no device"):
        worker.submit(lambda: 2).result(timeout=0)  # nothing waits for a thread that is gone
    assert isinstance(worker.died.cause, RuntimeError)


def garbled_worker(requests, results, warmup=None):
    """A planner worker whose reply its reader cannot read (a bare integer)."""
    from eplb.runtime.planner import READY

    results.put(READY)
    while (request := requests.get()) is not None:
        results.put(request.cycle * 0 + 5)


def test_a_dead_reply_thread_fails_the_request_and_marks_the_planner_broken():
    from eplb.runtime.planner import PlannerWorker, PlanRequest

    topology = Topology(2, 3)
    worker = PlannerWorker(deadline_s=60, target=garbled_worker)
    try:
        worker.start()
        worker.submit(PlanRequest(0, np.ones((1, 5)), Placement.initial(5, topology, 1).phy2log, topology,
                                  "default", {}))
        worker.wait(60)
        state, reason = worker.poll()
        assert state == "failed" and "reply thread died" in reason and worker.broken == reason
    finally:
        worker.close()
