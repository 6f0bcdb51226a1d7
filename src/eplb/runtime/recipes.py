"""What one rank does for each part of a plan, worked out by the planner process (numpy only, no torch).

For every part (:class:`~eplb.cycle.transfers.LayerTransfer`) of an accepted plan a rank needs two things: how to move
its rows (:class:`MoveRecipe`: what to send to whom, what to receive from whom, where each row lands in staging and
where each staged row goes at the switch) and what the switch writes besides the weights (:class:`SwitchRows`: the
recorder's fold row and the router's table row). Building them is Python and numpy work, so the planner worker
builds them next to the plan (:func:`rank_recipes`), and EPLB's side thread, which shares the interpreter with the
serving thread, only posts the messages, waits and copies.

Message tags: the rows of one tensor of one part that go from one rank to another are sent as runs of consecutive
source slots; the ``j``-th run between two ranks is tagged ``base + i * K + j`` for the part's ``i``-th tensor, where
``base`` counts the tensors of the parts posted before it in the same step (so both sides agree without a
handshake: they split the rows between them, in transfer order, into the same runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eplb.cycle.transfers import LayerTransfer
from eplb.placement import Placement
from eplb.runtime.tables import TableLayout, TableSpec, router_rows

__all__ = ["MoveRecipe", "SwitchRows", "move_recipe", "switch_rows", "rank_recipes"]


@dataclass(frozen=True)
class MoveRecipe:
    """How one rank moves the rows of one part.

    Attributes:
        layer: the part's layer.
        recvs: int64 ``[r, 3]`` ``(source rank, run j, rows)`` in staging order: run after run, from row 0.
        sends: int64 ``[s, 4]`` ``(destination rank, run j, first slot, rows)``: rows sent from the live tensors.
        local_src: int64 ``[m]`` old local slots whose experts stay on this rank but change slot: staged after the
            received rows (so overwriting a live slot never destroys a value another slot still has to copy).
        fill_dst: int64 ``[f]`` the local slots the switch writes, in the order of their staging rows.
        fill_row: int64 ``[f]`` the staging row each of them is written from (ascending).
    """

    layer: int
    recvs: np.ndarray
    sends: np.ndarray
    local_src: np.ndarray
    fill_dst: np.ndarray
    fill_row: np.ndarray

    @property
    def received(self) -> int:
        """Rows received over the network."""
        return int(self.recvs[:, 2].sum())

    @property
    def staged(self) -> int:
        """Staging rows: the received ones, then the local ones."""
        return self.received + int(self.local_src.size)

    @property
    def in_order(self) -> bool:
        """Staging row ``i`` goes to ``fill_dst[i]``, each once: the switch writes the staging as it is."""
        return self.fill_row.size == self.staged and bool((self.fill_row == np.arange(self.staged)).all())


@dataclass(frozen=True)
class SwitchRows:
    """What one rank's switch of one part writes besides the weights, on the host.

    Attributes:
        layer: the part's layer.
        new_row: int64 ``[P]`` the layer's placement after the part.
        fold: int64 ``[S]`` the placement the recorder's counts of the layer were taken under: the old row ``[P]``
            (the recorder counts ids) or this rank's part of it ``[K]`` (it counts a kernel's per-slot counts).
        router: the router's table row of the layer after the part, cropped
            (:meth:`~eplb.runtime.tables.TableLayout.crop`: a few kB instead of the row's hundreds).
    """

    layer: int
    new_row: np.ndarray
    fold: np.ndarray
    router: tuple


def _runs(slots: np.ndarray) -> list[tuple[int, int]]:
    """``(first slot, count)`` of each run of consecutive slots in ``slots`` (in its order)."""
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    return [(int(run[0]), len(run)) for run in np.split(slots, breaks) if len(run)]


def move_recipe(transfer: LayerTransfer, rank: int) -> MoveRecipe:
    """The :class:`MoveRecipe` of ``rank`` for ``transfer``."""
    rows = transfer.moves
    mine = rows[rows[:, 2] == rank]  # this rank's receives, in transfer-list order
    by_src = np.argsort(mine[:, 0], kind="stable")  # staged grouped by source rank
    stage_row = np.empty(len(mine), dtype=np.int64)
    stage_row[by_src] = np.arange(len(mine))
    recvs = [(src, j, count) for src in np.unique(mine[:, 0]).tolist()
             for j, (_, count) in enumerate(_runs(mine[mine[:, 0] == src, 1]))]
    outgoing = rows[rows[:, 0] == rank]
    sends = [(dst, j, first, count) for dst in np.unique(outgoing[:, 2]).tolist()
             for j, (first, count) in enumerate(_runs(outgoing[outgoing[:, 2] == dst, 1]))]
    dst_slot, from_recv, source = transfer.rank_fills(rank)
    local = np.flatnonzero(~from_recv)
    fill_row = source.copy()
    fill_row[from_recv] = stage_row[source[from_recv]]  # receive index -> its staging row
    fill_row[local] = len(mine) + np.arange(local.size)
    order = np.argsort(fill_row, kind="stable")  # staging order: usually one row per slot, written as it is
    return MoveRecipe(layer=transfer.layer, recvs=np.asarray(recvs, dtype=np.int64).reshape(-1, 3),
                      sends=np.asarray(sends, dtype=np.int64).reshape(-1, 4), local_src=source[local],
                      fill_dst=dst_slot[order], fill_row=fill_row[order])


def switch_rows(parts, spec: TableSpec, num_experts: int, topology, failed: np.ndarray | None = None
                ) -> list[SwitchRows]:
    """The :class:`SwitchRows` of every part of ``parts`` (a plan's transfers, in order), the router rows built in
    one vectorised pass per round of parts (a layer's ``k``-th parts in round ``k``; one round unless the plan split
    layers to fit ``bytes_per_step``)."""
    rounds: list[list[int]] = []
    seen: dict[int, int] = {}
    for index, part in enumerate(parts):
        k = seen[part.layer] = seen.get(part.layer, -1) + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(index)
    out: list[SwitchRows | None] = [None] * len(parts)
    k = topology.slots_per_rank
    layout = TableLayout(spec, num_experts, topology.num_ranks)
    for indices in rounds:
        new = np.stack([parts[i].new_row for i in indices])
        router = router_rows(Placement.from_valid(new, num_experts, topology), np.arange(len(indices)), spec, failed)
        for row, i in enumerate(indices):
            old = parts[i].old_row
            fold = old if spec.recorder_source == "ids" else old[spec.rank * k:(spec.rank + 1) * k]
            out[i] = SwitchRows(parts[i].layer, new[row], np.ascontiguousarray(fold),
                                layout.crop(router[row:row + 1]))
    return out


def rank_recipes(parts, spec: TableSpec, num_experts: int, topology, failed: np.ndarray | None = None
                 ) -> tuple[tuple[MoveRecipe, ...], tuple[SwitchRows, ...]]:
    """``(move recipes, switch rows)`` of ``spec.rank`` for every part of ``parts``, in order."""
    moves = tuple(move_recipe(part, spec.rank) for part in parts)
    return moves, tuple(switch_rows(parts, spec, num_experts, topology, failed))
