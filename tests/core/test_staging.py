"""Bounded staging memory: layers split into parts that fit ``bytes_per_step`` on every rank (eplb.cycle.staging,
eplb.cycle.planning.plan_cycle)."""

import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb import Placement, Topology
from eplb.cycle import CycleConfig
from eplb.placement import find_problems
from eplb.cycle.planning import check_cycle_plan, plan_cycle
from eplb.policies.base import Plan, Policy
from eplb.cycle.staging import split_layer, staged_experts


class Target(Policy):
    """A policy that moves every layer to the given rows."""

    def __init__(self, rows):
        self.rows = np.asarray(rows, dtype=np.int64)

    def rebalance(self, load, topology, current=None, live_ranks=None, resilience=None, state=None):
        changed = (self.rows != current.phy2log).any(axis=1)
        num_layers = self.rows.shape[0]
        return Plan(placement=Placement(self.rows, current.num_experts, topology), reference=current,
                    changed=changed, par_before=np.full(num_layers, 2.0), par_after=np.ones(num_layers),
                    moved_slots=(self.rows != current.phy2log).sum(axis=1))


@st.composite
def moves(draw):
    ranks, slots = draw(st.integers(2, 5)), draw(st.integers(1, 5))
    physical = ranks * slots
    experts = draw(st.integers(max(1, physical // 2), physical))
    layers = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))

    def row():
        return rng.permutation(np.concatenate([rng.permutation(experts), rng.integers(0, experts, physical - experts)]))

    old = np.stack([row() for _ in range(layers)])
    new = np.stack([row() for _ in range(layers)])
    expert_bytes = draw(st.integers(1, 1000))
    host = draw(st.booleans())
    budget = expert_bytes * (2 if host else 1) * draw(st.integers(1, 2 * slots + 1)) + draw(st.integers(0, 999))
    return Topology(ranks, slots), experts, old, new, expert_bytes, budget, host


@settings(max_examples=150, deadline=None)
@given(moves())
def test_parts_are_valid_fit_the_budget_and_reach_the_plan(case):
    topology, experts, old, new, expert_bytes, budget, host = case
    current = Placement(old, experts, topology)
    cycle = CycleConfig(cycle_steps=1, bytes_per_step=budget, host_staging=host)
    plan = plan_cycle(Target(new), np.ones((old.shape[0], experts)), current, cycle, expert_bytes)
    assert check_cycle_plan(plan, old, experts, topology) is None
    rows = {layer: old[layer].copy() for layer in range(old.shape[0])}
    part = 0
    for step, layers in enumerate(plan.schedule):
        device, pinned = np.zeros(topology.num_ranks), np.zeros(topology.num_ranks)
        for layer in layers:
            transfer = plan.parts[part]
            part += 1
            assert transfer.layer == layer and np.array_equal(transfer.old_row.reshape(-1), rows[layer])
            rows[layer] = transfer.new_row.reshape(-1)
            assert not find_problems(rows[layer][None], experts, topology)  # a valid intermediate placement
            staged = staged_experts(transfer, host) * expert_bytes
            device, pinned = device + staged[0], pinned + staged[1]
        # the most staging memory any rank holds in this step (both arenas) is within the budget
        assert (device + pinned).max() <= budget and (plan.staged_bytes[step] == device + pinned).all()
        if host:
            assert device.max() <= budget / 2 and pinned.max() <= budget / 2
    assert part == len(plan.parts)
    for layer, row in rows.items():
        np.testing.assert_array_equal(row, plan.phy2log[layer])
        left_out = plan.left_out[plan.left_out[:, 0] == layer, 1]
        np.testing.assert_array_equal(np.flatnonzero(row != new[layer]), left_out)
    if plan.left_out.size == 0:
        np.testing.assert_array_equal(plan.phy2log, new)  # nothing left out: the policy's target


def test_a_swap_goes_in_one_part_and_one_that_does_not_fit_is_left_out():
    topology = Topology(2, 2)
    old, new = np.array([0, 1, 2, 3]), np.array([2, 1, 0, 3])  # experts 0 and 2 swap ranks, one replica each
    parts, left_out = split_layer(0, old, new, topology, capacity=1)
    assert len(parts) == 1 and left_out.size == 0  # each rank receives one expert
    parts, left_out = split_layer(0, old, new, topology, capacity=1, host_staging=True)
    assert parts == [] and left_out.tolist() == [0, 2]  # each rank would send one and receive one in pinned memory
    old, new = np.array([0, 1, 2, 3]), np.array([1, 0, 2, 3])  # a swap within rank 0: two local copies
    parts, left_out = split_layer(0, old, new, topology, capacity=1)
    assert parts == [] and left_out.tolist() == [0, 1]


def test_a_layer_over_the_budget_goes_in_parts_over_consecutive_steps():
    topology = Topology(2, 4)
    old = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    new = np.array([[0, 1, 4, 5, 2, 3, 6, 7]])  # two swaps across the ranks
    plan = plan_cycle(Target(new), np.ones((1, 8)), Placement(old, 8, Topology(2, 4)),
                      CycleConfig(cycle_steps=1, bytes_per_step=10), expert_bytes=10)
    assert plan.schedule == ((0,), (0,)) and len(plan.parts) == 2
    assert plan.staged_bytes.tolist() == [[10, 10], [10, 10]]
    np.testing.assert_array_equal(plan.phy2log, new)
    assert plan_cycle(Target(new), np.ones((1, 8)), Placement(old, 8, topology),
                      CycleConfig(cycle_steps=1, bytes_per_step=20), expert_bytes=10).schedule == ((0,),)


def test_a_plan_whose_parts_do_not_chain_is_refused():
    topology = Topology(2, 4)
    old = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    new = np.array([[0, 1, 4, 5, 2, 3, 6, 7]])
    plan = plan_cycle(Target(new), np.ones((1, 8)), Placement(old, 8, topology),
                      CycleConfig(cycle_steps=1, bytes_per_step=10), expert_bytes=10)
    swapped = dataclasses.replace(plan, parts=plan.parts[::-1])
    assert "does not start from" in check_cycle_plan(swapped, old, 8, topology)
    together = dataclasses.replace(plan, schedule=((0, 0),))
    assert "two parts of one layer in one step" in check_cycle_plan(together, old, 8, topology)
    assert swapped.checksum != plan.checksum
