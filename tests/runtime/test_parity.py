"""Simulator = runtime: one per-step trace replayed through ``eplb.sim.simulate`` and through the real
``EplbController`` (Gloo ranks in real processes, the planner in its worker process, the recorder fed the trace's
counts through the router) gives the same cycle records: each cycle's window, plan checksum (placement, transfers,
schedule), layers moved in each step, moved slots, bytes and skipped cycles, and the same final placement.

Two ranks run every registered policy, ``auto`` with its per-step window (episodes) and also with balanced dispatch,
``flashlb`` with its state carried from cycle to cycle (one rank restarts its planner between cycles: the state lives
in the serving process); four ranks run ``auto``; ``auto`` also runs on both with a ``bytes_per_step`` of two experts,
which splits layers into parts applied in consecutive apply steps. The runtime hands each window to the planner on
EPLB's side thread and polls the reply in the step after submission (draining the side thread and
:meth:`PlannerWorker.wait` make that step deterministic); the ranks' agreement on it, started in that check step, is
read in the next one, so the plan applies from the third step after submission, as the simulator's with
``planner_steps=3``. Parts land within the forward they are posted in and switch two steps later, in both.

Transfers that take several steps: ``default`` also runs on two ranks with a cost model whose bandwidth makes a part's
transfer span one to several forwards (:meth:`~eplb.sim.cost.CostModel.transfer_forwards`); the runtime's ranks hold
their side thread until the step the same model says the transfer lands in, so the switches are deferred alike: every
record's switch steps and deferred steps are compared.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from eplb import Topology  # noqa: E402
from eplb.cycle import CycleConfig  # noqa: E402
from eplb.cycle.planning import cycle_policy  # noqa: E402
from eplb.policies import available_policies  # noqa: E402
from eplb.sim.cost import CostModel  # noqa: E402
from eplb.sim.simulator import SimConfig, simulate  # noqa: E402
from eplb.sim.traces import Trace  # noqa: E402
from gloo_ranks import run_ranks  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS, LAYERS, EXPERTS, SLOTS, INTERVAL, TOKENS = 1200, 8, 64, 80, 200, 192
EXPERT_BYTES = 16  # one float32 [4] tensor per slot
BUDGET = 2 * EXPERT_BYTES  # bytes_per_step of the split runs: two experts staged per rank and step, layers in parts
SLOW = 1e-4  # GB/s: a part's transfer (~300 bytes here) spans three or four ~0.8 ms forwards of the model
#: (policy, dispatch, bytes_per_step, bandwidth of slow transfers or None) per world size
RUNS = {2: [(name, "rank", None, None) for name in available_policies()]
        + [("auto", "balanced", None, None), ("auto", "rank", BUDGET, None), ("default", "rank", None, SLOW)],
        4: [("auto", "rank", None, None), ("auto", "rank", BUDGET, None)]}  # the default policy on 4 ranks too
WORLDS = (2, 4)  # ranks x 40 and x 20 slots
COMPARED = ("window_start", "window_end", "apply_start", "apply_end", "layers", "schedule", "switch_steps",
            "deferred_steps", "moved_slots", "bytes_moved", "par_before", "par_after", "skipped", "checksum")


def comparable(record: dict) -> dict:
    """The compared fields of a cycle record (NaN, the PAR of a cycle that applied nothing, as None)."""
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in record.items() if k in COMPARED}


def parity_counts() -> np.ndarray:
    """int64 ``[T, L, E]``: popularity drifting between two skewed profiles per layer, Poisson tokens per step."""
    rng = np.random.default_rng(16)
    first, second = rng.dirichlet(np.full(EXPERTS, 0.3), size=(2, LAYERS))
    mix = 0.5 + 0.5 * np.sin(np.arange(STEPS) / 170.0)
    popularity = mix[:, None, None] * first + (1 - mix)[:, None, None] * second
    return rng.poisson(popularity * TOKENS).astype(np.int64)


def rank_ids(counts_row: np.ndarray, rank: int, world: int) -> np.ndarray:
    """The logical ids of ``rank``'s tokens of one step and layer (every ``world``-th token of the step)."""
    return np.repeat(np.arange(EXPERTS), counts_row)[rank::world]


def _serve(rank: int, world: int, policy: str, dispatch: str, budget: int | None, slow: float | None,
           tokens: list) -> dict:
    import threading

    from eplb.runtime import EplbConfig, EplbController
    from eplb.sim.cost import CostModel

    topology = Topology(world, SLOTS // world)
    config = EplbConfig.from_dict({"mode": "dynamic", "window_steps": INTERVAL, "planner_check_steps": 1,
                                   "policy": policy, "dispatch": dispatch, "planner_deadline_s": 300.0,
                                   "measured_price": False,  # the simulator's model prices the moves, not timings
                                   "bytes_per_step": budget})
    tensors = [[torch.zeros(topology.slots_per_rank, 4)] for _ in range(LAYERS)]
    ctl = EplbController(config, LAYERS, EXPERTS, topology, rank, layer_tensors=tensors)
    ring = ctl.recorder.ring_steps
    cost = CostModel(bandwidth_gbs=slow) if slow else None
    nominal = cost.moe_us(parity_counts().sum(axis=-1, dtype=np.float64) / world) if slow else None
    held = []  # (step, gate): the side thread waits on gate until that step (a transfer still on its way)
    try:
        for step in range(STEPS):
            for _, gate in [h for h in held if h[0] == step]:
                gate.set()
            held = [h for h in held if h[0] > step]
            if not held:
                ctl.channel.drain()  # the window of the previous step is gathered and handed to the planner
                if ctl.planner.busy:  # submitted in the previous step: its reply is polled in this one
                    ctl.planner.wait(300.0)
            gate = threading.Event()
            if slow:  # a transfer posted in this step runs after the gate: it lands when the cost model says
                ctl.channel.submit(gate.wait)
            ctl.before_forward()
            if slow and "move" in ctl.step_kinds:
                parts = [ctl.parts[part] for part in ctl.pending.parts]
                received = np.bincount(np.concatenate([part.moves[:, 2] for part in parts]),
                                       minlength=world).max() * float(EXPERT_BYTES)
                held.append((step + cost.transfer_forwards(received, nominal[step:]), gate))
            else:
                gate.set()
            for layer in range(LAYERS):
                ids, group = tokens[step][layer]
                ctl.route(layer, ids, group)
            ctl.after_forward()
            if rank == world - 1 and policy == "flashlb" and ctl.cycle.records and step == ctl.cycle.records[0].apply_end:
                ctl.planner.restart()  # the next cycle plans from the state the serving process kept
        return {"records": [dataclasses.asdict(r) for r in ctl.cycle.records], "final": ctl.placement.phy2log,
                "ring": ring, "restarts": ctl.planner.restarts}
    finally:
        ctl.close()


def _tokens(counts: np.ndarray, rank: int, world: int) -> list:
    """Per step and layer: ``rank``'s ids ``[n, 1]`` and every rank's tokens per expert ``[W, E]``."""
    out = []
    for step_counts in counts:
        row = []
        for layer_counts in step_counts:
            ids = [rank_ids(layer_counts, r, world) for r in range(world)]
            group = np.stack([np.bincount(i, minlength=EXPERTS) for i in ids])
            row.append((torch.as_tensor(ids[rank]).reshape(-1, 1), torch.as_tensor(group)))
        out.append(row)
    return out


def _rank_main(rank: int, tmp: str, world: int) -> dict:
    tokens = _tokens(parity_counts(), rank, world)
    return {(policy, dispatch, budget, slow): _serve(rank, world, policy, dispatch, budget, slow, tokens)
            for policy, dispatch, budget, slow in RUNS[world]}


@pytest.fixture(scope="module")
def simulated():
    trace = Trace.from_counts(parity_counts())
    out = {}
    for world in WORLDS:
        topology = Topology(world, SLOTS // world)
        for policy, dispatch, budget, slow in RUNS[world]:
            config = SimConfig(topology, CycleConfig(cycle_steps=INTERVAL, planner_steps=3, bytes_per_step=budget),
                               dispatch=dispatch, expert_bytes=EXPERT_BYTES,
                               cost=CostModel(bandwidth_gbs=slow) if slow else CostModel())
            result = simulate(trace, cycle_policy(policy, dispatch=dispatch), config)
            out[world, policy, dispatch, budget, slow] = result
    return out


@pytest.mark.parametrize("world", WORLDS)
def test_simulator_and_runtime_give_the_same_cycles(world, simulated, tmp_path):
    ranks = run_ranks(_rank_main, world, str(tmp_path), args=(world,), timeout_s=900)
    for out in ranks:
        assert "error" not in out, out.get("error")
    moved_somewhere = split_somewhere = deferred_somewhere = False
    for policy, dispatch, budget, slow in RUNS[world]:
        sim = simulated[world, policy, dispatch, budget, slow]
        expected = [comparable(dataclasses.asdict(r)) for r in sim.cycles]
        for rank, out in enumerate(ranks):
            run = out[policy, dispatch, budget, slow]
            got = [comparable(r) for r in run["records"]]
            assert got == expected, (policy, dispatch, rank)
            np.testing.assert_array_equal(run["final"], sim.final.phy2log)
            wants_steps = cycle_policy(policy).wants_steps
            assert run["ring"] == (INTERVAL if wants_steps else 0), policy  # per-step rows only when the policy asks
        moved_somewhere |= any(r.layers for r in sim.cycles)
        if budget is not None:  # some layer went in several parts
            split_somewhere |= any(sum(len(step) for step in r.schedule) > len(r.layers) for r in sim.cycles)
        if slow:  # transfers took several forwards, as many as each one's bytes need
            waits = [b - a for r in sim.cycles for a, b in zip([r.apply_start] + r.switch_steps, r.switch_steps)]
            deferred_somewhere |= min(waits) > 3 and len(set(waits)) > 1
        elif sim.cycles:
            assert all(r.deferred_steps == 0 for r in sim.cycles)  # every transfer landed within its forward
        if policy == "flashlb" and world > 1:
            assert ranks[-1][policy, dispatch, budget, slow]["restarts"] == 1
    assert moved_somewhere and split_somewhere and deferred_somewhere == (world == 2)
