"""Single-process tests of the runtime's reaction to a rank failure: transfers over live ranks, the cycle restart,
the recorder's gather over the survivors, the resilience setting, and EplbController.fail_ranks (mode off, no
process group: the collectives are then local). The multi-process behaviour is in test_engine_rank_failure.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb import EplbError, Placement, Topology
from eplb.cycle import Cycle, CycleConfig, CycleError, Phase
from eplb.policies.shared.resilience import Resilience
from eplb.cycle.planning import CyclePlan
from eplb.cycle.transfers import layer_transfer

from conftest import reached

torch = pytest.importorskip("torch")

from eplb.runtime import EplbConfig, EplbController  # noqa: E402
from eplb.runtime.config import ConfigError  # noqa: E402
from eplb.runtime.recorder import LoadRecorder, gather_slot_counts  # noqa: E402


# -- transfers ------------------------------------------------------------------------------------------------------
@pytest.mark.reaches(60, failed_rank_holds_a_needed_expert=15)
@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31), st.integers(2, 5), st.integers(2, 4))
def test_transfers_never_involve_a_failed_rank(seed, num_ranks, slots):
    """Random old and new layers after one rank failed, every expert with a copy on a live rank (the controller
    reloads one that has none before it plans transfers); the failed rank's row stays. Checked against a plain loop:
    every live rank receives exactly the experts it gains, each once, from a live rank that holds it."""
    rng = np.random.default_rng(seed)
    topology = Topology(num_ranks, slots)
    live = np.ones(num_ranks, dtype=bool)
    live[rng.integers(num_ranks)] = False
    live_slots = np.flatnonzero(live[topology.rank_of_slot])
    num_experts = int(rng.integers(1, live_slots.size + 1))
    old = rng.integers(0, num_experts, topology.num_physical)
    old[rng.permutation(live_slots)[:num_experts]] = np.arange(num_experts)  # a live copy of every expert
    new = old.copy()
    new[live_slots] = rng.integers(0, num_experts, live_slots.size)
    t = layer_transfer(0, old, new, topology, live)

    old_rows, new_rows = old.reshape(num_ranks, slots), new.reshape(num_ranks, slots)
    needed = {(dst, e) for dst in range(num_ranks) for e in set(new_rows[dst].tolist()) - set(old_rows[dst].tolist())}
    reached()
    assert sorted(map(tuple, t.moves[:, 2:].tolist())) == sorted(needed)
    for src, src_slot, dst, expert in t.moves.tolist():
        assert live[src] and live[dst] and src != dst
        assert old_rows[src, src_slot] == expert
    failed_row = set(old_rows[~live].ravel().tolist())
    if any(e in failed_row for _, e in needed):  # the failed rank holds an expert some rank needs: it must not send
        reached("failed_rank_holds_a_needed_expert")


def test_transfer_errors_after_a_failure():
    topology = Topology(2, 2)
    old = np.array([0, 1, 2, 0])
    live = np.array([True, False])
    with pytest.raises(EplbError, match="failed rank 1"):
        layer_transfer(3, old, np.array([0, 1, 2, 1]), topology, live)
    with pytest.raises(EplbError, match="layer 3: rank 0 needs expert 2, which no live rank holds"):
        layer_transfer(3, old, np.array([0, 2, 2, 0]), topology, live)


# -- cycle ----------------------------------------------------------------------------------------------------------
def test_cycle_restart_gives_up_the_move_and_resyncs_the_step():
    cycle = Cycle(CycleConfig(cycle_steps=4, planner_steps=1), num_layers=3)
    for step in range(5):
        cycle.on_step(step)

    plan = CyclePlan(phy2log=np.zeros((3, 2)), changed=np.ones(3, dtype=bool), par_before=np.full(3, 2.0),
                     par_after=np.array([1.0, 1.1, 1.2]), moved_slots=np.ones(3, dtype=np.int64), layers=(0, 1, 2),
                     parts=(), layer_bytes=np.zeros(3, dtype=np.int64), schedule=((0,), (1,), (2,)))
    cycle.plan_ready(4, plan)
    assert cycle.on_step(5).apply_layers == (0,)
    assert cycle.phase is Phase.APPLY
    cycle.restart(8, "ranks [2] failed")  # another survivor got as far as step 7
    record = cycle.records[-1]
    assert record.skipped == "ranks [2] failed" and record.apply_end == 7
    assert cycle.phase is Phase.COLLECT and cycle.pending_layers == ()
    assert not any(cycle.on_step(step).submit for step in range(8, 12))
    assert cycle.on_step(12).submit and cycle.records[-1].window_start == 8
    with pytest.raises(CycleError, match="after the last step 12"):
        cycle.restart(12, "again")


# -- recorder -------------------------------------------------------------------------------------------------------
def test_recorder_gathers_kernel_counts_into_the_live_ranks_rows():
    recorder = LoadRecorder(num_layers=1, num_experts=4, num_ranks=3, slots_per_rank=2, rank=1, source="counts")
    recorder.begin_step()
    recorder.record_counts(0, torch.tensor([5, 7]))
    recorder.live = np.array([False, True, False])  # this rank is the only survivor: a group of one
    gathered = gather_slot_counts(recorder.window, 3, live=recorder.live)
    assert gathered.shape == (1, 3, 2)
    assert gathered[0].tolist() == [[0, 0], [5, 7], [0, 0]]


# -- config ---------------------------------------------------------------------------------------------------------
def test_resilience_setting():
    assert EplbConfig.from_dict({"resilience": True}).resilience == Resilience()
    assert EplbConfig.from_dict({"resilience": False}).resilience is None
    cfg = EplbConfig.from_dict({"resilience": {"spread_nodes": "false", "min_replicas": 2, "hot_experts": 4}})
    assert cfg.resilience == Resilience(spread_nodes=False, min_replicas=2, hot_experts=4)
    for bad, message in [(3, "true/false or a dict"), ({"min_replica": 2}, "unknown key 'min_replica'"),
                         ({"min_replicas": 0}, "min_replicas must be an integer >= 1")]:
        with pytest.raises(ConfigError, match=message):
            EplbConfig.from_dict({"resilience": bad})


# -- controller -----------------------------------------------------------------------------------------------------
NUM_LAYERS, NUM_EXPERTS = 2, 8
TOPOLOGY = Topology(4, 3)  # vLLM's initial layout: experts 0-7 then copies of 0-3 in slot order (rank 3: 1, 2, 3)


def _weights(layer: int, expert: int):
    return [torch.full((2,), float(100 * layer + expert)), torch.full((3,), float(-expert))]


def _controller(rank: int, loader=_weights):
    placement = Placement.initial(NUM_EXPERTS, TOPOLOGY, NUM_LAYERS)
    tensors = []
    for layer in range(NUM_LAYERS):
        k = TOPOLOGY.slots_per_rank
        experts = placement.phy2log[layer, rank * k:(rank + 1) * k].tolist()
        rows = [_weights(layer, e) for e in experts]
        tensors.append([torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])])
    ctl = EplbController(EplbConfig.from_dict({"mode": "off"}), NUM_LAYERS, NUM_EXPERTS, TOPOLOGY, rank,
                         layer_tensors=tensors, expert_loader=loader)
    return ctl, tensors


def _slot_experts(tensors, layer):
    return [int(v) % 100 for v in tensors[layer][0][:, 0].tolist()]


@pytest.mark.parametrize("rank", [0, 3])
def test_fail_ranks_reloads_lost_experts_and_routes_around_the_failed_rank(rank):
    ctl, tensors = _controller(rank)
    ctl.step = 17
    report = ctl.fail_ranks([2])
    # rank 2 held the only replicas of experts 6 and 7
    assert report.lost.tolist() == [[l, e] for l in range(NUM_LAYERS) for e in (6, 7)]
    assert report.failed_ranks == [2] and report.step == 17
    placement = ctl.placement
    live_slots = ~ctl.failed[TOPOLOGY.rank_of_slot]
    for layer in range(NUM_LAYERS):
        assert set(placement.phy2log[layer, live_slots].tolist()) == set(range(NUM_EXPERTS))
        k = TOPOLOGY.slots_per_rank
        assert _slot_experts(tensors, layer) == placement.phy2log[layer, rank * k:(rank + 1) * k].tolist()
    if rank == 3:  # the spare copies live on rank 3: it reloads the lost experts over two of them
        assert sorted(report.reloaded[:, 2].tolist()) == [6, 6, 7, 7]
    else:
        assert report.reloaded.size == 0
    table = ctl.router.log2phy.numpy()
    assert not np.isin(table, np.flatnonzero(~live_slots)).any()  # no route names a slot of rank 2
    assert (ctl.router.replica_count.numpy() >= 1).all()


def test_fail_ranks_refuses_bad_calls_without_changing_anything():
    ctl, tensors = _controller(3, loader=None)
    before = ctl.placement.phy2log.copy()
    with pytest.raises(EplbError, match="rank 3 is in the failed ranks"):
        ctl.fail_ranks([3])
    with pytest.raises(EplbError, match="out of range"):
        ctl.fail_ranks([4])
    with pytest.raises(EplbError, match="cannot place 8 experts on 1 live ranks"):
        ctl.fail_ranks([0, 1, 2])
    assert not ctl.failed.any() and np.array_equal(ctl.placement.phy2log, before)
    with pytest.raises(EplbError, match=r"4 experts lost their last replica \(\(layer, expert\): \[\[0, 6\]"):
        ctl.fail_ranks([2])
    assert not ctl.failed.any() and np.array_equal(ctl.placement.phy2log, before)
    assert _slot_experts(tensors, 0) == [1, 2, 3]
