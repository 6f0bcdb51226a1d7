"""Keeping experts where they already are: cheaper transitions for any new placement with the same load balance.

Two passes, both leaving every rank's load unchanged:

- :func:`preserve_slots` reorders slots inside each rank (vLLM's ``preserve_intragpu_slots``): an expert the rank
  already holds keeps its old local slot, so it is not copied at all.
- :func:`match_ranks` relabels whole ranks first (ranks are interchangeable), choosing the relabelling that keeps
  the most experts in place (an exact sparse assignment), then applies :func:`preserve_slots`.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from eplb.errors import PolicyError

__all__ = ["preserve_slots", "match_ranks", "rank_overlap"]

# Up to this many ranks (or nodes) a layer's relabelling is a dense assignment: cheap there, and the equal optima it
# picks are the ones eplb always picked; beyond, a sparse one (a dense [W, W] per layer is too slow at 1,024 ranks).
_DENSE_UNITS = 256


def _check(new_phy2log, old_phy2log, num_ranks: int) -> tuple[np.ndarray, np.ndarray]:
    new = np.asarray(new_phy2log, dtype=np.int64)
    old = np.asarray(old_phy2log, dtype=np.int64)
    if new.ndim != 2 or new.shape != old.shape:
        raise PolicyError(f"new and old phy2log must both be [layers, slots] of one shape, got {new.shape} and "
                          f"{old.shape}")
    if num_ranks < 1 or new.shape[1] % num_ranks:
        raise PolicyError(f"{new.shape[1]} slots cannot be split over num_ranks={num_ranks}")
    return new, old


def _occurrence(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For flat ``keys``: how many equal keys come before each one, and the keys sorted."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    position = np.arange(keys.size)
    starts = np.ones(keys.size, dtype=bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    first = np.maximum.accumulate(np.where(starts, position, 0))  # where each run of equal keys begins
    occurrence = np.empty_like(keys)
    occurrence[order] = position - first
    return occurrence, sorted_keys


def _count_in(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return np.searchsorted(sorted_keys, keys, side="right") - np.searchsorted(sorted_keys, keys, side="left")


def preserve_slots(new_phy2log, old_phy2log, num_ranks: int) -> np.ndarray:
    """Reorder the slots of every rank of ``new_phy2log`` so that experts the rank already held stay in their slot.

    Within each rank, old slot ``k`` keeps its expert ``e`` when the new rank still holds a copy of ``e`` not kept
    elsewhere (the j-th old copy of ``e`` is kept when the new rank holds more than j copies); the remaining new
    experts fill the other slots in their new order. The multiset of experts on every rank is that of
    ``new_phy2log``, so rank loads do not change.

    Args:
        new_phy2log: int ``[L, P]``, the planned placement.
        old_phy2log: int ``[L, P]``, the placement in force.
        num_ranks: W; slot ``p`` lives on rank ``p // (P / W)``.

    Returns:
        int64 ``[L, P]``.
    """
    new, old = _check(new_phy2log, old_phy2log, num_ranks)
    num_layers, num_slots = new.shape
    span = int(max(new.max(initial=0), old.max(initial=0))) + 1
    row = np.arange(num_layers * num_slots, dtype=np.int64) // (num_slots // num_ranks)  # (layer, rank) of a slot
    new_keys = row * span + new.ravel()
    old_keys = row * span + old.ravel()
    new_occurrence, new_sorted = _occurrence(new_keys)
    old_occurrence, old_sorted = _occurrence(old_keys)
    kept = old_occurrence < _count_in(new_sorted, old_keys)  # old slots whose expert stays
    taken = new_occurrence < _count_in(old_sorted, new_keys)  # new entries served by a kept old slot
    # Rows are contiguous in the flat arrays and each row frees as many slots as it has entries left to place,
    # so filling free slots with leftover entries in flat order fills every rank with its own entries, in order.
    out = np.where(kept, old.ravel(), -1)
    out[~kept] = new.ravel()[~taken]
    return out.reshape(num_layers, num_slots)


def rank_overlap(new_phy2log, old_phy2log, num_ranks: int) -> np.ndarray:
    """int64 ``[L, W, W]``: ``[l, i, j]`` = experts (with multiplicity) that new rank ``i`` and old rank ``j`` share,
    i.e. the slots kept in place if new rank ``i`` became rank ``j``. Dense: for inspection and tests; the matching
    itself works on the non-zero entries only (:func:`_overlap_edges`)."""
    new, old = _check(new_phy2log, old_phy2log, num_ranks)
    num_layers = new.shape[0]
    out = np.zeros((num_layers, num_ranks, num_ranks), dtype=np.int64)
    everyone = np.ones(num_ranks, dtype=np.bool_)
    new_units, old_units = _unit_tables(new, old, num_ranks)
    for layer in range(num_layers):
        rows, cols, shared = _overlap_edges(new_units[layer], old_units[layer], everyone, num_ranks, 0)
        out[layer, rows, cols] = shared
    return out


def _unit_tables(new: np.ndarray, old: np.ndarray, num_units: int) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's experts sorted: int64 ``[L, U, S]`` of ``new`` and ``old`` ``[L, P]``."""
    shape = (new.shape[0], num_units, new.shape[1] // num_units)
    return np.sort(new.reshape(shape), axis=2), np.sort(old.reshape(shape), axis=2)


@njit(cache=True)
def _overlap_edges(new_units, old_units, free, block, stay):
    """The non-zero entries of one layer's score ``overlap * stay + (i == j)`` between the ``free`` new units ``i``
    and the ``free`` old units ``j`` of the same block of ``block`` units (``stay=0``: the bare overlap, every
    block). Overlap counts shared experts with multiplicity; each expert's old holders are looked up, so the cost is
    O(slots x replicas), not O(U^2). Returns ``rows, cols, weights`` (int64, rows ascending, then cols)."""
    num_units, size = new_units.shape
    num_experts = max(new_units.max(), old_units.max()) + 1
    # old holders of each expert with the copies each holds (CSR over experts); units sorted, so runs are copies
    start = np.zeros(num_experts + 1, dtype=np.int64)
    for j in range(num_units):
        for k in range(size):
            if k == 0 or old_units[j, k] != old_units[j, k - 1]:
                start[old_units[j, k] + 1] += 1
    for e in range(num_experts):
        start[e + 1] += start[e]
    holder = np.empty(start[num_experts], dtype=np.int64)
    copies = np.zeros(start[num_experts], dtype=np.int64)
    fill = start[:-1].copy()
    for j in range(num_units):
        for k in range(size):
            e = old_units[j, k]
            if k == 0 or e != old_units[j, k - 1]:
                holder[fill[e]] = j
                fill[e] += 1
            copies[fill[e] - 1] += 1
    shared = np.zeros(num_units, dtype=np.int64)
    touched = np.empty(num_units, dtype=np.int64)
    rows, cols, weights = [], [], []
    for i in range(num_units):
        if not free[i]:
            continue
        low = (i // block) * block if block > 0 else 0
        high = low + block if block > 0 else num_units
        count = 0
        k = 0
        while k < size:
            e = new_units[i, k]
            mine = 1
            while k + mine < size and new_units[i, k + mine] == e:
                mine += 1
            k += mine
            for h in range(start[e], start[e + 1]):
                j = holder[h]
                if not free[j] or j < low or j >= high:
                    continue
                if shared[j] == 0:
                    touched[count] = j
                    count += 1
                shared[j] += min(mine, copies[h])
        if stay > 0 and shared[i] == 0:
            touched[count] = i
            count += 1
        touched[:count].sort()
        for t in range(count):
            j = touched[t]
            rows.append(i)
            cols.append(j)
            weights.append(shared[j] * max(stay, 1) + (1 if stay > 0 and i == j else 0))
            shared[j] = 0
    return np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64), np.array(weights, dtype=np.int64)


def match_ranks(new_phy2log, old_phy2log, num_ranks: int, num_nodes: int = 1, across_nodes: bool = False
                ) -> np.ndarray:
    """Relabel the ranks of ``new_phy2log`` to keep as many experts in place as possible, then
    :func:`preserve_slots`.

    Ranks are interchangeable for balance, so any permutation of the new per-rank rows gives the same rank loads.
    The permutation maximising the experts kept (ties: the most ranks left unmoved) is found exactly per layer
    (:func:`unit_permutation`). Relabelling a rank to another node moves its experts to that node, which breaks
    node-level placements (DeepSeek's hierarchical mode), so unless ``across_nodes`` whole nodes are matched first
    (by the experts they share) and ranks are then only permuted within their node.

    Args:
        new_phy2log: int ``[L, P]``, the planned placement.
        old_phy2log: int ``[L, P]``, the placement in force.
        num_ranks: W.
        num_nodes: N, dividing W; rank ``r`` is on node ``r // (W / N)``.
        across_nodes: permute ranks freely across nodes.

    Returns:
        int64 ``[L, P]``.
    """
    new, old = _check(new_phy2log, old_phy2log, num_ranks)
    if num_nodes < 1 or num_ranks % num_nodes:
        raise PolicyError(f"num_ranks={num_ranks} is not divisible by num_nodes={num_nodes}")
    if across_nodes or num_nodes == 1:
        relabelled = _permute_blocks(new, old, num_ranks, num_ranks)
    else:
        # whole nodes are interchangeable too: match nodes first, then the ranks inside each node
        relabelled = _permute_blocks(new, old, num_nodes, num_nodes)
        relabelled = _permute_blocks(relabelled, old, num_ranks, num_ranks // num_nodes)
    return preserve_slots(relabelled, old, num_ranks)


def _permute_blocks(new: np.ndarray, old: np.ndarray, num_units: int, block: int) -> np.ndarray:
    """``new`` with the units of every row permuted by :func:`unit_permutation`."""
    num_layers, num_slots = new.shape
    table = new.reshape(num_layers, num_units, num_slots // num_units)
    source = unit_permutation(new, old, num_units, block)
    return np.take_along_axis(table, source[:, :, None], axis=1).reshape(num_layers, num_slots)


def unit_permutation(new: np.ndarray, old: np.ndarray, num_units: int, block: int,
                     dense_up_to: int = _DENSE_UNITS) -> np.ndarray:
    """int64 ``[L, U]``: which unit of ``new`` goes to each position, per layer: the ``num_units`` equal parts of a
    row are permuted within consecutive blocks of ``block`` parts, maximising the experts each part shares with the
    same part of ``old`` (ties: the most parts left unmoved).

    The score of new unit ``i`` at position ``j`` is ``overlap * (block + 1) + (i == j)``, maximised exactly. Up to
    ``dense_up_to`` units it is a dense assignment (``scipy.optimize.linear_sum_assignment``). Beyond, a unit
    whose experts equal those of the old unit at its position stays there (exchanging it back into place never
    lowers the score). The rest is a sparse problem, since a unit shares experts with few old units: letting every
    unit also stay unmatched (score 0) makes it a maximum-weight matching on the non-zero scores, solved exactly
    (``scipy.sparse.csgraph.min_weight_full_bipartite_matching``). Units left unmatched take the positions left
    over in their block in ascending order; none of those pairs could score, or the matching would have taken it."""
    num_layers, num_slots = new.shape
    new_units, old_units = _unit_tables(new, old, num_units)
    source = np.broadcast_to(np.arange(num_units, dtype=np.int64), (num_layers, num_units)).copy()
    if num_units <= dense_up_to:  # few units: the dense assignment, whose choice among equal optima it keeps
        everyone = np.ones(num_units, dtype=np.bool_)
        for layer in range(num_layers):
            rows, cols, score = _overlap_edges(new_units[layer], old_units[layer], everyone, block, block + 1)
            dense = np.zeros((num_units, num_units), dtype=np.int64)
            dense[rows, cols] = score
            for start in range(0, num_units, block):
                part = dense[start:start + block, start:start + block]
                new_unit, old_unit = linear_sum_assignment(part, maximize=True)
                source[layer, start + old_unit] = start + new_unit
        return source
    same = (new_units == old_units).all(axis=2)
    cap = (num_slots // num_units) * (block + 1) + 1  # above every score: every cost is positive
    for layer in np.flatnonzero(~same.all(axis=1)):
        free = ~same[layer]
        rows, cols, score = _overlap_edges(new_units[layer], old_units[layer], free, block, block + 1)
        units = np.flatnonzero(free)
        indptr, indices, data = _with_unmatched(rows, cols, cap - score, cap, free)
        size = units.size
        _, position = min_weight_full_bipartite_matching(csr_matrix((data, indices, indptr), shape=(size, 2 * size)))
        matched = position < size
        taken = np.zeros(size, dtype=bool)
        taken[position[matched]] = True
        for start in range(0, num_units, block):  # the unmatched, in order, onto the positions left in the block
            in_block = (units >= start) & (units < start + block)
            position[in_block & ~matched] = np.flatnonzero(in_block & ~taken)
        source[layer, units[position]] = units
    return source


@njit(cache=True)
def _with_unmatched(rows, cols, cost, cap, free):
    """The sparse cost matrix of one layer's matching in CSR form ``(indptr, indices, data)``: a row per free unit
    (in order) with its edges to the free units (renumbered in order), then its own "unmatched" column at ``cap``."""
    local = np.cumsum(free) - 1
    size = local[-1] + 1 if free.shape[0] else 0
    indptr = np.zeros(size + 1, dtype=np.int64)
    indices = np.empty(rows.shape[0] + size, dtype=np.int64)
    data = np.empty(rows.shape[0] + size, dtype=np.float64)
    k = 0
    i = 0
    for row in range(size):
        while i < rows.shape[0] and local[rows[i]] == row:
            indices[k], data[k] = local[cols[i]], cost[i]
            k += 1
            i += 1
        indices[k], data[k] = size + row, cap
        k += 1
        indptr[row + 1] = k
    return indptr, indices, data
