"""Staging memory of expert moves: what a layer's move stages on each rank, and how a layer whose move does not fit
a per-rank budget is split into parts (numpy only, no torch; the planner worker imports it).

What a rank stages when a part of a layer is applied (the runtime's :class:`~eplb.runtime.mover.ExpertMover`), in
whole experts of that layer:

- device arena: every expert it receives (once, however many of its slots take it) and every expert that stays on
  the rank but changes slot (copied through staging so that no live slot is overwritten before it was read);
- host arena, with ``host_staging`` (the ``gloo`` backend on an accelerator): every expert it sends and every expert
  it receives, in pinned host memory. Sent rows are read from the live tensors in place; no other copy is made.

Both arenas keep their size from one step to the next, so with ``host_staging`` each is bounded by half the budget:
the memory EPLB holds for staging on a rank is then at most the budget, in every step. Without it, the device
arena alone is bounded by the whole budget.

A part is a valid placement of its layer: every expert keeps at least one replica (on the live ranks) after it.
:func:`split_layer` builds parts greedily, in slot order: a slot whose leaving expert has another replica is changed
alone; slots whose leaving experts have no other replica form cycles (a swap: ``A -> B`` here, ``B -> A`` there)
that only go together, in one part. A change, or a cycle, that does not fit the budget even in a part of its own is
left out of the cycle (the layer stops at the last valid intermediate placement, and the slots are reported).
"""

from __future__ import annotations

import numpy as np

from eplb.cycle.transfers import LayerTransfer, layer_transfer
from eplb.topology import Topology

__all__ = ["staged_experts", "budget_experts", "split_layer"]


def staged_experts(transfer: LayerTransfer, host_staging: bool = False) -> np.ndarray:
    """int64 ``[2, W]``: experts each rank stages for ``transfer``: row 0 the device arena (received + changing slot
    locally), row 1 the host arena (sent + received; zeros without ``host_staging``)."""
    old, new = transfer.rank_rows()
    num_ranks = transfer.num_ranks
    rows = transfer.moves
    received = np.bincount(rows[:, 2], minlength=num_ranks)
    on_rank = (new[:, :, None] == old[:, None, :]).any(axis=2)  # the new expert of the slot is already on the rank
    local = ((old != new) & on_rank).sum(axis=1)
    out = np.zeros((2, num_ranks), dtype=np.int64)
    out[0] = received + local
    if host_staging:
        out[1] = np.bincount(rows[rows[:, 0] >= 0, 0], minlength=num_ranks) + received
    return out


def budget_experts(budget: float, expert_bytes: int, host_staging: bool) -> int:
    """Experts of ``expert_bytes`` each arena may stage on a rank in one step under ``budget`` bytes."""
    share = budget / 2 if host_staging else budget
    return int(share // max(int(expert_bytes), 1))


def split_layer(layer: int, old_phy2log: np.ndarray, new_phy2log: np.ndarray, topology: Topology, capacity: int,
                host_staging: bool = False, live: np.ndarray | None = None,
                from_checkpoint: bool = False) -> tuple[list[LayerTransfer], np.ndarray]:
    """The parts that turn ``old_phy2log`` ``[P]`` towards ``new_phy2log`` ``[P]`` with at most ``capacity`` experts
    in each arena of each rank per part (see the module docstring).

    Returns:
        ``(parts, left_out)``: one :class:`LayerTransfer` per part, in order (each part's ``old_row`` is the previous
        part's ``new_row``); int64 ``[n]`` the slots whose change does not fit the budget and is not applied.
    """
    slots = topology.slots_per_rank
    target = np.asarray(new_phy2log, dtype=np.int64).reshape(-1).copy()
    start = np.asarray(old_phy2log, dtype=np.int64).reshape(-1).copy()
    live_slot = np.ones(target.size, dtype=bool) if live is None else np.repeat(np.asarray(live, dtype=bool), slots)
    num_experts = int(max(start.max(), target.max())) + 1
    count = np.bincount(start[live_slot], minlength=num_experts)  # replicas on live ranks after the changes so far
    if capacity < 1:  # not even one expert fits: nothing moves
        return [], np.flatnonzero(start != target).astype(np.int64)
    parts, left_out = [], set()
    while (start != target).sum() > len(left_out):
        part = _Part(start, live_slot, capacity, host_staging, topology)
        while True:
            added = False
            for slot in np.flatnonzero(part.row != target).tolist():  # changes whose leaving expert stays elsewhere
                if count[part.row[slot]] >= 2 and slot not in left_out and part.fits([slot], target):
                    count[part.row[slot]] -= 1
                    count[target[slot]] += 1
                    part.add([slot], target)
                    added = True
            if added:
                continue
            group = _next_group(part.row, target, count, left_out)
            if group is None:
                break
            if part.fits(group, target):
                for slot in group:
                    count[part.row[slot]] -= 1
                    count[target[slot]] += 1
                part.add(group, target)
            elif part.empty:
                left_out.update(group)
            else:
                break
        if part.empty:
            continue
        transfer = part.transfer(layer, topology, live, from_checkpoint, count, left_out)
        if transfer is not None:
            parts.append(transfer)
            start = part.row
    return parts, np.asarray(sorted(left_out), dtype=np.int64)


class _Part:
    """The part being built: its row, and what each rank stages for it so far (senders estimated)."""

    def __init__(self, start, live_slot, capacity, host_staging, topology):
        slots = topology.slots_per_rank
        self.start, self.row, self.live_slot = start, start.copy(), live_slot
        self.capacity, self.host_staging, self.slots = capacity, host_staging, slots
        self.before = [set(start[r * slots:(r + 1) * slots].tolist()) for r in range(topology.num_ranks)]
        self.received = [set() for _ in range(topology.num_ranks)]
        self.staged = np.zeros((2, topology.num_ranks), dtype=np.int64)
        self.sent = np.zeros(topology.num_ranks, dtype=np.int64)
        self.node = topology.node_of_rank
        self.groups: list[list[int]] = []

    @property
    def empty(self) -> bool:
        return not self.groups

    def _cost(self, group, target) -> np.ndarray:
        cost = np.zeros_like(self.staged)
        arriving = set()
        for slot in group:
            rank, expert = slot // self.slots, int(target[slot])
            if expert in self.before[rank]:
                cost[0, rank] += 1
            elif expert not in self.received[rank] and (rank, expert) not in arriving:
                arriving.add((rank, expert))
                cost[:, rank] += (1, int(self.host_staging))
                sender = self._sender(expert, rank) if self.host_staging else None
                if sender is not None:
                    cost[1, sender] += 1
        return cost

    def _sender(self, expert, rank) -> int | None:
        """The rank ``expert`` is likely sent to ``rank`` by (:func:`~eplb.cycle.transfers.layer_transfer`'s rule, in
        the order changes join the part rather than its own); None when no live rank holds it (a checkpoint)."""
        holders = (np.flatnonzero((self.start == expert) & self.live_slot) // self.slots).tolist()
        row = self.row.reshape(-1, self.slots)
        return min(holders, key=lambda h: (self.node[h] != self.node[rank], self.sent[h], expert in row[h], h),
                   default=None)

    def fits(self, group, target) -> bool:
        return bool((self.staged + self._cost(group, target) <= self.capacity).all())

    def add(self, group, target) -> None:
        self.staged += self._cost(group, target)
        for slot in group:
            rank, expert = slot // self.slots, int(target[slot])
            if expert not in self.before[rank] and expert not in self.received[rank]:
                self.received[rank].add(expert)
                sender = self._sender(expert, rank) if self.host_staging else None
                if sender is not None:
                    self.sent[sender] += 1
            self.row[slot] = expert
        self.groups.append(list(group))

    def transfer(self, layer, topology, live, from_checkpoint, count, left_out) -> LayerTransfer | None:
        """The part's exact transfers. The senders were an estimate: while some rank's host arena would exceed the
        capacity, the last group goes back to a later part (a group that does not fit alone is left out; None)."""
        while True:
            transfer = layer_transfer(layer, self.start, self.row, topology, live, from_checkpoint)
            if not (staged_experts(transfer, self.host_staging) > self.capacity).any():
                return transfer
            last = self.groups.pop()
            for slot in last:
                count[self.row[slot]] -= 1
                count[self.start[slot]] += 1
                self.row[slot] = self.start[slot]
            if not self.groups:
                left_out.update(last)
                return None


def _next_group(row: np.ndarray, target: np.ndarray, count: np.ndarray, left_out: set) -> list[int] | None:
    """Changes that only go together, from the lowest slot whose leaving expert has no other replica: follow where
    each leaving expert arrives until a slot repeats (a cycle: the group is the cycle) or a slot whose leaving
    expert has another replica (a chain). None when every change left is free or left out. A change whose leaving
    expert arrives nowhere any more (its arrival was left out) is left out too."""
    while True:
        pending = [s for s in np.flatnonzero(row != target).tolist() if s not in left_out]
        arrival = {}
        for slot in pending:
            arrival.setdefault(int(target[slot]), slot)
        blocked = [s for s in pending if count[row[s]] < 2]
        if not blocked:
            return None
        path, seen, slot = [], {}, blocked[0]
        while slot is not None and slot not in seen:
            seen[slot] = len(path)
            path.append(slot)
            if count[row[slot]] >= 2:  # the chain ends at a change that loses nothing
                return path
            slot = arrival.get(int(row[slot]))
        if slot is None:
            left_out.add(path[-1])  # its expert would lose its last replica
            continue
        return path[seen[slot]:]
