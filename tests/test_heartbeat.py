"""EPLB's heartbeat on real processes (Gloo) and a real TCPStore.

Engine runs: 3 ranks serve the small MoE model with dynamic EPLB and the heartbeat on (0.1 s / 1 s). Rank 2 fails at
the start of the step after cycle 0's first layer switched: SIGKILL in one run (its sockets close, the next
collective raises at once), SIGSTOP in the other (alive and silent: no collective ever raises; the serving thread is
woken by the heartbeat). The survivors must take the failed set from the heartbeat (one rank publishes it, the other
adopts it), within the timeout plus an interval of the failure, fail over, and serve on with outputs equal to the
unbalanced model's. The launcher kills the stopped rank once it is declared failed (fencing).

Store runs: the heartbeat itself, when the store's host dies (an error is logged, nobody is declared failed, closing
does not hang).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("compiled_auto")  # the runtime's default policy, compiled once

import torch.distributed as dist  # noqa: E402

from eplb.engine.launch import launch  # noqa: E402
from eplb.engine.model import ModelConfig  # noqa: E402
from eplb.engine.serve import Faults, ServeSettings, serve_rank  # noqa: E402
from eplb.runtime.heartbeat import Heartbeat  # noqa: E402

WORLD = 3
INTERVAL_S, TIMEOUT_S = 0.1, 1.0
#: scheduling slack on a loaded 2-core CI machine (3 ranks, their planner workers and Gloo threads)
SLACK_S = 0.5
MODEL = ModelConfig(num_layers=3, num_experts=8, top_k=2, hidden=32, ffn=64, num_groups=2, topk_groups=1)
EPLB = {"mode": "dynamic", "window_steps": 12, "planner_check_steps": 2, "planner_deadline_s": 20.0,
        "heartbeat_interval_s": INTERVAL_S, "heartbeat_timeout_s": TIMEOUT_S}


def _serve(how: str):
    dying = {}
    settings = ServeSettings(model=MODEL, slots_per_rank=4, tokens_per_rank=64, steps=600, stop_after_cycles=3,
                             faults=Faults(kill_ranks=((2,), 0), kill_signal=how), eplb=EPLB)

    def on_event(rank, payload):
        if payload[0] == "dying":
            dying[rank] = payload[1]

    # the groups' own timeout is far beyond the heartbeat's: a hung rank must be found by the heartbeat
    results = launch(serve_rank, WORLD, (settings,), timeout_s=150, on_event=on_event, collective_timeout_s=60,
                     rank_failures=True)
    return results, dying[2]


@pytest.fixture(scope="module")
def killed():
    return _serve("SIGKILL")


@pytest.fixture(scope="module")
def stopped():
    return _serve("SIGSTOP")


@pytest.mark.parametrize("run", ["killed", "stopped"])
def test_survivors_agree_through_the_heartbeat_and_fail_over_once(run, request):
    results, died_at = request.getfixturevalue(run)
    assert results[2] is None
    survivors = results[:2]
    for result in survivors:
        (event,) = result["heartbeat_events"]
        assert event["ranks"] == [2]
        assert [f["failed_ranks"] for f in result["failovers"]] == [[2]]
        delay = event["detected_at"] - died_at
        # its last beat was at most an interval before it failed, and the watcher reads every interval
        assert TIMEOUT_S - INTERVAL_S - 0.05 <= delay <= TIMEOUT_S + INTERVAL_S + SLACK_S, delay
    # one survivor published the event, the other adopted it
    assert sorted(r["heartbeat_events"][0]["proposed_here"] for r in survivors) in ([False, True], [True, True])
    assert len({(f["step"], f["resume"]) for r in survivors for f in r["failovers"]}) == 1


@pytest.mark.parametrize("run", ["killed", "stopped"])
def test_serving_goes_on_with_the_unbalanced_models_outputs(run, request):
    results, _ = request.getfixturevalue(run)
    for result in results[:2]:
        cycles = result["cycles"]
        assert cycles[0]["skipped"] == "ranks [2] failed"
        resumed = result["failovers"][0]["resume"]
        assert any(c["submit_step"] >= resumed and c["applied_layers"] for c in cycles), cycles
        assert result["outputs_equal"], result["max_rel_diff"]


# -- the store ------------------------------------------------------------------------------------------------------
def _host_store(port_out):
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    port_out.put(store.port)
    time.sleep(600)


def test_a_dead_store_is_a_logged_error_not_a_failure_or_a_hang(caplog):
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    host = ctx.Process(target=_host_store, args=(ports,), daemon=True)
    host.start()
    try:
        store = dist.TCPStore("127.0.0.1", ports.get(timeout=60), is_master=False, wait_for_workers=False)
        # two ranks of one group in this process: rank 1 beats for rank 1, rank 0 watches it
        watcher = Heartbeat([0, 1], 0.05, 0.5, store=store, rank=0)
        peer = Heartbeat([0, 1], 0.05, 0.5, store=store, rank=1)
        watcher.start()
        peer.start()
        time.sleep(0.3)
        assert watcher.store_error is None
        with caplog.at_level(logging.ERROR, logger="eplb.runtime.heartbeat"):
            host.kill()
            host.join(5)
            deadline = time.monotonic() + 5
            while watcher.store_error is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # two timeouts without the store: still nobody declared failed
        assert watcher.store_error is not None
        assert any("the store does not answer" in r.getMessage() for r in caplog.records)
        assert watcher.failed_peers() == [] and watcher.events == []
        start = time.monotonic()
        watcher.close()
        peer.close()
        assert time.monotonic() - start < 3 * 0.5 + 1
    finally:
        if host.is_alive():
            host.kill()


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)


def _until(predicate, timeout_s: float) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, "timed out"
        time.sleep(0.01)
    return time.monotonic() - start


def test_a_silent_rank_is_declared_once_and_every_watcher_adopts_the_same_event(store):
    # ranks 0-2 beat, rank 3 never does (as if it died at start); groups ranks are EP ids: global ranks 10-13
    members = [10, 11, 12, 13]
    watchers = [Heartbeat(members, 0.05, 0.4, store=store, rank=r) for r in members[:3]]
    seen = []
    begin = time.monotonic()
    for w in watchers:
        w.add_callback(seen.append)
        w.start()
    try:
        _until(lambda: all(w.failed_peers() == [3] for w in watchers), 5)
        assert all(w.events[0].detected_at for w in watchers)
        assert time.monotonic() - begin >= 0.4 - 0.05  # no earlier than the timeout after the first watcher began
        assert all(w.events[0].index == watchers[0].events[0].index for w in watchers)
        assert sum(w.events[0].proposed_here for w in watchers) >= 1
        assert seen == [[3], [3], [3]]
        assert all(w.unhandled() == [3] for w in watchers)
        watchers[0].acknowledge([3])
        assert watchers[0].unhandled() == [] and watchers[0].failed_peers() == [3]
        assert [10, 11, 12, 13] == members  # untouched
    finally:
        for w in watchers:
            w.close()


def test_a_rank_that_closes_is_not_failed(store):
    watcher = Heartbeat([0, 1], 0.05, 0.3, store=store, rank=0)
    peer = Heartbeat([0, 1], 0.05, 0.3, store=store, rank=1)
    watcher.start()
    peer.start()
    time.sleep(0.2)
    peer.close()
    time.sleep(1.0)
    try:
        assert watcher.failed_peers() == [] and watcher.events == []
    finally:
        watcher.close()


def test_bad_heartbeat_arguments(store):
    from eplb import EplbError

    with pytest.raises(EplbError, match="0 < interval_s < timeout_s, got interval_s=1, timeout_s=1"):
        Heartbeat([0, 1], 1, 1, store=store, rank=0)
    with pytest.raises(EplbError, match="global rank 5 is not in the heartbeat's group"):
        Heartbeat([0, 1], 0.1, 1, store=store, rank=5)


def test_an_aborted_side_channel_fails_its_jobs_at_once():
    import threading

    from eplb.runtime.heartbeat import RankFailure
    from eplb.runtime.transport import SideChannel

    before = set(threading.enumerate())
    channel = SideChannel()
    (side,) = [t for t in threading.enumerate() if t not in before and t.name == "eplb-side"]
    stuck = threading.Event()
    running = channel.submit(stuck.wait)  # a job blocked as on a dead peer
    queued = channel.submit(lambda: "never")
    _until(lambda: running.running(), 5)
    failure = RankFailure([2])
    channel.abort(failure)
    for future in (running, queued, channel.submit(lambda: "after")):
        with pytest.raises(RankFailure, match=r"ranks \[2\] stopped beating"):
            future.result(timeout=1)
    crashes = []
    hook, threading.excepthook = threading.excepthook, crashes.append
    try:
        stuck.set()  # the blocked job ends later: its result is dropped and the side thread ends, quietly
        side.join(timeout=5)
    finally:
        threading.excepthook = hook
    assert crashes == [] and not side.is_alive()


def test_no_heartbeat_without_a_process_group_or_the_key():
    from eplb import Topology
    from eplb.runtime import EplbConfig, EplbController

    ctl = EplbController(EplbConfig.from_dict({"heartbeat_interval_s": 0.1}), 1, 4, Topology(1, 4), rank=0)
    try:
        assert ctl.heartbeat is None and ctl.failed_peers() == []
    finally:
        ctl.close()
