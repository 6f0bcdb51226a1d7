"""Routing and recording stay capture-safe whatever the ids: an id of -1 (an expert with no live replica after a rank
failure) is dropped from the counts without an out-of-range index, and the deterministic path (no atomics, for
``torch.use_deterministic_algorithms(True)``) counts the same integers as ``index_add_``."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from eplb import Placement, Topology  # noqa: E402
from eplb.runtime.recorder import LoadRecorder  # noqa: E402
from eplb.runtime.router import ReplicaRouter  # noqa: E402

TOPOLOGY = Topology(4, 3)
LAYERS, EXPERTS = 2, 8


def _record(deterministic: bool, steps: list, ring_steps: int) -> LoadRecorder:
    recorder = LoadRecorder(LAYERS, EXPERTS, TOPOLOGY.num_ranks, TOPOLOGY.slots_per_rank, 1, ring_steps=ring_steps)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        for ids, valid in steps:
            recorder.begin_step()
            for layer in range(LAYERS):
                recorder.record_ids(layer, ids[layer], valid)
    finally:
        torch.use_deterministic_algorithms(previous)
    return recorder


def _steps(seed: int, count: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = [torch.as_tensor(rng.integers(-1, TOPOLOGY.num_physical, (9, 2))) for _ in range(LAYERS)]
        valid = torch.as_tensor(rng.random(9) < 0.8)
        out.append((ids, valid))
    return out


def _expected(steps: list) -> np.ndarray:
    """int64 [steps, L, P]: the counts of the valid tokens' non-negative ids."""
    out = np.zeros((len(steps), LAYERS, TOPOLOGY.num_physical), dtype=np.int64)
    for step, (ids, valid) in enumerate(steps):
        for layer in range(LAYERS):
            kept = ids[layer].numpy()[valid.numpy()].ravel()
            out[step, layer] = np.bincount(kept[kept >= 0], minlength=TOPOLOGY.num_physical)
    return out


@pytest.mark.parametrize("deterministic", [False, True])
def test_ids_of_minus_one_are_dropped_from_window_and_ring(deterministic):
    steps = _steps(0, 6)
    recorder = _record(deterministic, steps, ring_steps=4)
    expected = _expected(steps)
    np.testing.assert_array_equal(recorder.window.numpy(), expected.sum(axis=0))
    ring = recorder.ring.numpy().transpose(1, 0, 2)  # [T, L, P], row t holds steps t and t + 4
    np.testing.assert_array_equal(ring[[0, 1]], expected[[4, 5]])
    np.testing.assert_array_equal(ring[[2, 3]], expected[[2, 3]])


def test_the_deterministic_path_counts_what_index_add_counts():
    steps = _steps(1, 5)
    plain, sorted_ = _record(False, steps, 3), _record(True, steps, 3)
    assert torch.equal(plain.window, sorted_.window) and torch.equal(plain.ring, sorted_.ring)
    placement = Placement.initial(EXPERTS, TOPOLOGY, LAYERS)
    np.testing.assert_array_equal(plain.logical_load(placement.phy2log), sorted_.logical_load(placement.phy2log))


@pytest.mark.parametrize("dispatch", ["rank", "token", "local", "balanced"])
def test_a_lost_expert_routes_to_minus_one_and_is_not_counted(dispatch):
    placement = Placement.initial(EXPERTS, TOPOLOGY, LAYERS)  # one replica each: rank 2's experts are lost with it
    router = ReplicaRouter(placement, 0, dispatch)
    router.set_failed_ranks(placement, [2])
    lost = placement.without_ranks([2]).lost[:, 1]
    ids = torch.arange(EXPERTS).repeat(3, 1)
    counts = torch.bincount(ids.reshape(-1), minlength=EXPERTS).repeat(TOPOLOGY.num_ranks, 1)
    slots = router.route(0, ids, counts if dispatch == "balanced" else None)
    assert (slots[:, np.unique(lost)] == -1).all() and (slots >= 0).sum() == 3 * (EXPERTS - len(np.unique(lost)))
    recorder = LoadRecorder(LAYERS, EXPERTS, TOPOLOGY.num_ranks, TOPOLOGY.slots_per_rank, 0)
    recorder.begin_step()
    recorder.record_ids(0, slots)
    assert int(recorder.window.sum()) == int((slots >= 0).sum())
