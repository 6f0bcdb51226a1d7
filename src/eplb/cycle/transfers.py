"""Which rank receives which expert from whom when a layer changes placement (numpy only, no torch).

Rules, per layer, from the old and the new ``phy2log`` rows:

- a rank *needs* expert ``e`` when the new row puts ``e`` on it and the old row did not; it receives each needed
  expert exactly once, even when the new row places it in several of its slots (the extra copies are local copies);
- an expert already on a rank never crosses the network: if it changed slot, it is copied locally;
- the source of a needed expert is one of the ranks holding it in the old row, chosen greedily in
  (destination rank, expert) order by: same node first, then the holder that has sent the fewest experts so far
  in this layer, then a holder that drops the expert (its slot is being freed), then the lowest rank;
- after a failure (``live`` given), only live ranks send, and a failed rank's row may not change; an expert no live
  rank holds is an error, or, with ``from_checkpoint``, read from a checkpoint (source rank and slot -1).

This module is imported by the planner worker process, which must not pay for importing torch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from numba import njit

from eplb.errors import EplbError
from eplb.placement import Placement
from eplb.topology import Topology

__all__ = ["LayerTransfer", "layer_transfer", "transfer_plan"]


@dataclass(frozen=True)
class LayerTransfer:
    """A layer's transfer: the moves that take one layer (or one part of it, :mod:`eplb.cycle.staging`) from its old
    row to its new one. A *move* is one expert sent to one rank.

    Attributes:
        layer: MoE layer index.
        moves: int64 ``[n, 4]`` rows ``(src_rank, src_slot, dst_rank, expert)``; ``src_slot`` is the local slot on
            ``src_rank`` in the old placement (both -1: read from a checkpoint, see :func:`layer_transfer`). Sorted
            by ``(dst_rank, expert)``; ``(dst_rank, expert)`` is unique.
        old_row: int64 ``[P]`` old logical expert per physical slot.
        new_row: int64 ``[P]`` new logical expert per physical slot.
        slots_per_rank: K; slot ``p`` lives on rank ``p // K``.
    """

    layer: int
    moves: np.ndarray
    old_row: np.ndarray
    new_row: np.ndarray
    slots_per_rank: int

    @property
    def num_moves(self) -> int:
        return int(self.moves.shape[0])

    @property
    def num_ranks(self) -> int:
        return self.old_row.shape[0] // self.slots_per_rank

    def rank_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The old and the new row by rank: int64 ``[W, K]`` views of :attr:`old_row` and :attr:`new_row`."""
        shape = (self.num_ranks, self.slots_per_rank)
        return self.old_row.reshape(shape), self.new_row.reshape(shape)

    @property
    def transfers(self) -> np.ndarray:
        """Deprecated spelling of :attr:`moves`."""
        warnings.warn("LayerTransfer.transfers is now LayerTransfer.moves (transfers goes in the next release)",
                      DeprecationWarning, stacklevel=2)
        return self.moves

    @property
    def num_transfers(self) -> int:
        """Deprecated spelling of :attr:`num_moves`."""
        warnings.warn("LayerTransfer.num_transfers is now LayerTransfer.num_moves (num_transfers goes in the next "
                      "release)", DeprecationWarning, stacklevel=2)
        return self.num_moves

    def send_recv(self) -> tuple[dict[int, list[list[int]]], dict[int, list[list[int]]]]:
        """vllm-ascend's view: ``send[src] = [[dst, expert], ...]`` and ``recv[dst] = [[src, expert], ...]``."""
        send: dict[int, list[list[int]]] = {}
        recv: dict[int, list[list[int]]] = {}
        for src, _, dst, expert in self.moves.tolist():
            send.setdefault(src, []).append([dst, expert])
            recv.setdefault(dst, []).append([src, expert])
        return send, recv

    def rank_fills(self, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What ``rank`` writes into its live slots at commit.

        Returns:
            ``(dst_slot, from_recv, source)`` int64/bool/int64 ``[m]``, one entry per local slot whose expert
            changes: when ``from_recv`` the data comes from this rank's ``source``-th receive (index into its rows of
            :attr:`moves` with ``dst_rank == rank``), else from its own old local slot ``source``.
        """
        k = self.slots_per_rank
        old, new = self.old_row[rank * k:(rank + 1) * k], self.new_row[rank * k:(rank + 1) * k]
        received = self.moves[self.moves[:, 2] == rank, 3]  # ascending experts
        dst_slot = np.flatnonzero(old != new)
        expert = new[dst_slot]
        by_expert = np.argsort(old, kind="stable")  # so the first match is the lowest old slot
        sorted_old = old[by_expert]
        at = np.minimum(np.searchsorted(sorted_old, expert), len(old) - 1)
        from_recv = sorted_old[at] != expert
        source = np.where(from_recv, np.searchsorted(received, expert), by_expert[at])
        return dst_slot.astype(np.int64), from_recv, source.astype(np.int64)


def layer_transfer(layer: int, old_phy2log: np.ndarray, new_phy2log: np.ndarray, topology: Topology,
                   live: np.ndarray | None = None, from_checkpoint: bool = False) -> LayerTransfer:
    """The layer's transfer (its moves) that turns ``old_phy2log`` ``[P]`` into ``new_phy2log`` ``[P]`` (see the module
    rules).

    ``live``: bool ``[W]``, the ranks still serving (None: all). ``from_checkpoint``: an expert no live rank holds
    comes from a checkpoint (a row with source rank and slot -1) instead of raising.

    Raises:
        EplbError: a failed rank's experts change, or a needed expert has no live holder.
    """
    num_ranks, slots = topology.num_ranks, topology.slots_per_rank
    old = np.asarray(old_phy2log, dtype=np.int64).reshape(num_ranks, slots)
    new = np.asarray(new_phy2log, dtype=np.int64).reshape(num_ranks, slots)
    if live is not None:
        changed_dead = np.flatnonzero(~live & (old != new).any(axis=1))
        if changed_dead.size:
            raise EplbError(f"layer {layer}: the plan changes the experts of failed rank {int(changed_dead[0])}")
    alive = np.ones(num_ranks, dtype=np.bool_) if live is None else np.asarray(live, dtype=np.bool_)
    moves, missing = _moves(old, new, np.asarray(topology.node_of_rank, dtype=np.int64), alive,
                            bool(from_checkpoint))
    if missing[0] >= 0:
        raise EplbError(f"layer {layer}: rank {missing[0]} needs expert {missing[1]}, which no live rank holds "
                        "(load it from a checkpoint first)")
    return LayerTransfer(layer=layer, moves=moves, old_row=old.reshape(-1), new_row=new.reshape(-1),
                         slots_per_rank=slots)


@njit(cache=True)
def _moves(old, new, node, live, from_checkpoint):
    """The rows of :func:`layer_transfer` (compiled: a layer of a thousand ranks in well under a millisecond), and
    ``(rank, expert)`` of the first needed expert no live rank holds (``(-1, -1)`` when none)."""
    num_ranks, slots = old.shape
    num_experts = max(old.max(), new.max()) + 1
    # each live rank's first slot of each of its old experts, grouped by expert (ranks ascending): CSR over experts
    first = np.zeros((num_ranks * slots, 3), dtype=np.int64)  # expert, rank, slot
    seen = np.full(num_experts, -1, dtype=np.int64)
    size = 0
    for rank in range(num_ranks):
        for slot in range(slots):
            e = old[rank, slot]
            if live[rank] and seen[e] != rank:
                seen[e] = rank
                first[size, 0], first[size, 1], first[size, 2] = e, rank, slot
                size += 1
    first = first[np.argsort(first[:size, 0], kind="mergesort")]
    start = np.searchsorted(first[:, 0], np.arange(num_experts + 1))
    # which ranks hold each expert in the new rows, for "a holder that drops the expert"
    keeps = np.zeros((num_ranks, num_experts), dtype=np.bool_)
    for rank in range(num_ranks):
        for slot in range(slots):
            keeps[rank, new[rank, slot]] = True
    sent = np.zeros(num_ranks, dtype=np.int64)
    rows = np.empty((num_ranks * slots, 4), dtype=np.int64)
    needed = np.empty(slots, dtype=np.int64)
    count = 0
    for dst in range(num_ranks):
        for slot in range(slots):
            seen[old[dst, slot]] = -2 - dst  # dst's old experts
        size = 0  # the experts dst needs, distinct and ascending
        for slot in range(slots):
            e = new[dst, slot]
            if seen[e] == -2 - dst:
                continue
            i = size
            while i > 0 and needed[i - 1] > e:
                i -= 1
            if i > 0 and needed[i - 1] == e:
                continue
            needed[i + 1:size + 1] = needed[i:size].copy()
            needed[i] = e
            size += 1
        for i in range(size):
            e = needed[i]
            if start[e] == start[e + 1]:
                if not from_checkpoint:
                    return rows[:0], np.array([dst, e])
                rows[count, 0], rows[count, 1], rows[count, 2], rows[count, 3] = -1, -1, dst, e
                count += 1
                continue
            # same node first, then the fewest sent so far, then one that drops the expert, then the lowest rank
            best = start[e]
            for h in range(start[e] + 1, start[e + 1]):
                a, b = first[h, 1], first[best, 1]
                if (node[a] == node[dst], -sent[a], not keeps[a, e], -a) > (node[b] == node[dst], -sent[b],
                                                                              not keeps[b, e], -b):
                    best = h
            src = first[best, 1]
            sent[src] += 1
            rows[count, 0], rows[count, 1], rows[count, 2], rows[count, 3] = src, first[best, 2], dst, e
            count += 1
    return rows[:count].copy(), np.array([-1, -1])


def transfer_plan(old: Placement, new: Placement, live: np.ndarray | None = None) -> list[LayerTransfer]:
    """One :class:`LayerTransfer` for every layer whose placement differs; unchanged layers are left out.
    ``live``: bool ``[W]``, the ranks still serving (None: all)."""
    changed = np.flatnonzero(old.moves_to(new).any(axis=1))
    return [layer_transfer(int(l), old.phy2log[l], new.phy2log[l], old.topology, live) for l in changed]
