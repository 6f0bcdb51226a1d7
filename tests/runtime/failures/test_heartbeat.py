"""EPLB's heartbeat on real processes (Gloo) and a real TCPStore.

Engine runs: 3 ranks serve the small MoE model with dynamic EPLB and the heartbeat on (0.1 s / 1 s). Rank 2 fails at
the start of the step after cycle 0's first layer switched: SIGKILL in one run (its sockets close, the next
collective raises at once), SIGSTOP in the other (alive and silent: no collective ever raises; the serving thread is
woken by the heartbeat). The survivors must take the failed set from the heartbeat (one rank publishes it, the other
adopts it), after the failure and before the groups' own timeout, fail over, and serve on with outputs equal to the
unbalanced model's. The launcher kills the stopped rank once it is declared failed (fencing). How long detection
takes is measured by ``benchmarks/heartbeat.py``, not here: a loaded 2-core runner delays any thread.

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
#: the groups' own timeout, far beyond the heartbeat's: a hung rank must be found by the heartbeat
COLLECTIVE_TIMEOUT_S = 60
#: how long a test waits for something that should happen within a second (a loaded runner can be slow)
PATIENCE_S = 60
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

    results = launch(serve_rank, WORLD, (settings,), timeout_s=150, on_event=on_event,
                     collective_timeout_s=COLLECTIVE_TIMEOUT_S, rank_failures=True)
    return results, dying[2]


@pytest.fixture(scope="module")
def killed():
    return _serve("SIGKILL")


@pytest.fixture(scope="module")
def stopped():
    return _serve("SIGSTOP")


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("run", ["killed", "stopped"])
def test_survivors_agree_through_the_heartbeat_and_fail_over_once(run, request):
    results, died_at = request.getfixturevalue(run)
    assert results[2] is None
    survivors = results[:2]
    for result in survivors:
        (event,) = result["heartbeat_events"]
        assert event["ranks"] == [2]
        assert [f["failed_ranks"] for f in result["failovers"]] == [[2]]
        # declared after it failed, and by the heartbeat: before a collective with the hung rank could time out
        assert died_at < event["detected_at"] < died_at + COLLECTIVE_TIMEOUT_S, (died_at, event)
    # one survivor published the event (compare_set lets only one in), the other adopted that same event
    events = [r["heartbeat_events"][0] for r in survivors]
    assert sorted(e["proposed_here"] for e in events) == [False, True]
    assert events[0]["index"] == events[1]["index"]
    assert len({(f["step"], f["resume"]) for r in survivors for f in r["failovers"]}) == 1


@pytest.mark.dist
@pytest.mark.slow
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
#: beats here are 20 per timeout: a live rank is declared failed only if both its beating thread and process are
#: held off the CPU for two seconds
STORE_INTERVAL_S, STORE_TIMEOUT_S = 0.1, 2.0


def _host_store(port_out):
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    port_out.put(store.port)
    time.sleep(600)


def _until(predicate, timeout_s: float = PATIENCE_S) -> None:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, "timed out"
        time.sleep(0.01)


@pytest.mark.dist
@pytest.mark.slow
def test_a_dead_store_is_a_logged_error_not_a_failure_or_a_hang(caplog):
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    host = ctx.Process(target=_host_store, args=(ports,), daemon=True)
    host.start()
    try:
        store = dist.TCPStore("127.0.0.1", ports.get(timeout=PATIENCE_S), is_master=False, wait_for_workers=False)
        # two ranks of one group in this process: rank 1 beats for rank 1, rank 0 watches it
        watcher = Heartbeat([0, 1], STORE_INTERVAL_S, STORE_TIMEOUT_S, store=store, rank=0)
        peer = Heartbeat([0, 1], STORE_INTERVAL_S, STORE_TIMEOUT_S, store=store, rank=1)
        watcher.start()  # its first beat went through the store
        peer.start()
        assert watcher.store_error is None
        with caplog.at_level(logging.ERROR, logger="eplb.runtime.heartbeat"):
            host.kill()
            host.join(PATIENCE_S)
            _until(lambda: watcher.store_error is not None)
            time.sleep(2 * STORE_TIMEOUT_S)  # a watcher that took the silence for a failure would declare it now
        assert any("the store does not answer" in r.getMessage() for r in caplog.records)
        assert watcher.failed_peers() == [] and watcher.events == []
        start = time.monotonic()
        watcher.close()
        peer.close()
        assert time.monotonic() - start < PATIENCE_S  # closing does not hang on the dead store
    finally:
        if host.is_alive():
            host.kill()


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)


def test_a_silent_rank_is_declared_once_and_every_watcher_adopts_the_same_event(store):
    # ranks 0-2 beat, rank 3 never does (as if it died at start); groups ranks are EP ids: global ranks 10-13
    members = [10, 11, 12, 13]
    watchers = [Heartbeat(members, STORE_INTERVAL_S, STORE_TIMEOUT_S, store=store, rank=r) for r in members[:3]]
    seen = []
    begin = time.monotonic()
    for w in watchers:
        w.add_callback(seen.append)
        w.start()
    try:
        _until(lambda: all(w.failed_peers() == [3] for w in watchers))
        assert all(w.events[0].detected_at for w in watchers)
        # no earlier than the timeout after the watchers began (every watcher's clock starts in its start())
        assert time.monotonic() - begin >= STORE_TIMEOUT_S
        assert all(w.events[0].index == watchers[0].events[0].index for w in watchers)
        assert sum(w.events[0].proposed_here for w in watchers) == 1
        assert seen == [[3], [3], [3]]
        assert all(w.unhandled() == [3] for w in watchers)
        watchers[0].acknowledge([3])
        assert watchers[0].unhandled() == [] and watchers[0].failed_peers() == [3]
        assert [10, 11, 12, 13] == members  # untouched
    finally:
        for w in watchers:
            w.close()


def _beat_until_killed(port: int, ready) -> None:
    store = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False)
    Heartbeat([0, 1, 2], STORE_INTERVAL_S, STORE_TIMEOUT_S, store=store, rank=2).start()
    ready.set()
    time.sleep(600)


@pytest.mark.dist
@pytest.mark.slow
def test_a_rank_that_closes_is_not_failed_and_one_killed_after_it_is(store):
    """Rank 1 closes; then rank 2's process is killed. The first and only event names rank 2: rank 1, silent since
    before rank 2 died, would have been declared first (or with it) had its goodbye been taken for a beat."""
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    dying = ctx.Process(target=_beat_until_killed, args=(store.port, ready), daemon=True)
    dying.start()
    watcher = peer = None
    try:
        assert ready.wait(PATIENCE_S)
        watcher = Heartbeat([0, 1, 2], STORE_INTERVAL_S, STORE_TIMEOUT_S, store=store, rank=0)
        peer = Heartbeat([0, 1, 2], STORE_INTERVAL_S, STORE_TIMEOUT_S, store=store, rank=1)
        watcher.start()
        peer.start()
        peer.close()
        time.sleep(3 * STORE_INTERVAL_S)  # rank 1's silence starts well before rank 2's
        dying.kill()
        dying.join(PATIENCE_S)
        _until(lambda: watcher.failed_peers())
        assert [e.ranks for e in watcher.events] == [[2]] and watcher.failed_peers() == [2]
    finally:
        if watcher is not None:
            watcher.close()
        if dying.is_alive():
            dying.kill()


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
    _until(lambda: running.running())
    failure = RankFailure([2])
    channel.abort(failure)
    for future in (running, queued, channel.submit(lambda: "after")):
        assert future.done()  # failed by abort() itself, before it returned: no thread needed to run
        with pytest.raises(RankFailure, match=r"ranks \[2\] stopped beating"):
            future.result()
    crashes = []
    hook, threading.excepthook = threading.excepthook, crashes.append
    try:
        stuck.set()  # the blocked job ends later: its result is dropped and the side thread ends, quietly
        side.join(timeout=PATIENCE_S)
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
