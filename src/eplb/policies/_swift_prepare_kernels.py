"""Numba kernels of the SwiftBalancer policy (:mod:`eplb.policies.swift`), one layer after another.

Two passes, with the replica allotment (:func:`eplb.policies.shared.packing.replicate_counts`) in between because in
intra-node mode it depends on where the first pass put each expert's home copy:

- :func:`prepare_layers` (here): home copies (scan order), repair of ranks holding an expert twice, the per-layer
  threshold and the spreading of redundant slots over the ranks.
- :func:`~eplb.policies._swift_plan_kernels.plan_layers`: copy placement, fill of leftover redundant slots, swap
  rounds, acceptance.

Per layer and rank, tables are ``[W, K]`` (logical expert of each local slot). A "transfer" is an expert arriving on
a rank that did not hold it in the old placement; its source is the expert's scan-order home rank in the old
placement (``source``), and at most one transfer per (source, destination) rank pair is allowed per cycle
(``pair_used``). ``moved`` marks experts transferred or swapped this cycle, for the swap rounds' pinning rule.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: relative margin for "strictly lower max rank load", so that float rounding never passes for a gain
STRICT_MARGIN = 1e-9


@njit(cache=True)
def _replica_counts(table, num_experts):
    count = np.zeros(num_experts, np.int64)
    for r in range(table.shape[0]):
        for k in range(table.shape[1]):
            count[table[r, k]] += 1
    return count


@njit(cache=True)
def _max_rank_load(table, load):
    """Largest rank load of ``table`` with every expert's tokens split evenly over its replicas."""
    count = _replica_counts(table, load.shape[0])
    peak = 0.0
    for r in range(table.shape[0]):
        total = 0.0
        for k in range(table.shape[1]):
            e = table[r, k]
            total += load[e] / count[e]
        peak = max(peak, total)
    return peak


@njit(cache=True)
def _membership(table, on_rank):
    on_rank[:] = False
    for r in range(table.shape[0]):
        for k in range(table.shape[1]):
            on_rank[r, table[r, k]] = True


@njit(cache=True)
def _assign_homes(table, home, home_rank, home_slot):
    """Scan slot 0 of every rank, then slot 1, ...: the first occurrence of an expert is its home copy."""
    num_ranks, slots = table.shape
    home_rank[:] = -1
    for k in range(slots):
        for r in range(num_ranks):
            e = table[r, k]
            if home_rank[e] < 0:
                home_rank[e] = r
                home_slot[e] = k
                home[r, k] = True


@njit(cache=True)
def _may_receive(e, d, old_on, source, pair_used, group_of_rank):
    """Whether rank ``d`` may get expert ``e``: no transfer at all, or the first one from ``e``'s source rank, which
    must be in ``d``'s group."""
    return old_on[d, e] or (group_of_rank[source[e]] == group_of_rank[d] and not pair_used[source[e], d])


@njit(cache=True)
def _receive(e, d, old_on, source, pair_used, moved):
    if not old_on[d, e]:
        pair_used[source[e], d] = True
        moved[e] = True


@njit(cache=True)
def _repair(table, load, count, on_rank, old_on, source, pair_used, moved, group_of_rank):
    """Give every slot that repeats an expert already on its rank another expert: the one with the largest load per
    replica that the rank lacks, of the rank's group and within the pair limit if possible.

    Only impossible when a rank already holds every expert (``K > E``); then the slot is left as it is.
    """
    num_ranks, slots = table.shape
    num_experts = load.shape[0]
    for r in range(num_ranks):
        for k in range(1, slots):
            e = table[r, k]
            repeated = False
            for k2 in range(k):
                if table[r, k2] == e:
                    repeated = True
            if not repeated:
                continue
            best = -1
            for strict in (True, False):
                for x in range(num_experts):
                    if on_rank[r, x]:
                        continue
                    if strict and not _may_receive(x, r, old_on, source, pair_used, group_of_rank):
                        continue
                    if best < 0 or load[x] * count[best] > load[best] * count[x]:
                        best = x
                if best >= 0:
                    break
            if best < 0:
                continue
            table[r, k] = best
            count[e] -= 1
            count[best] += 1
            on_rank[r, best] = True
            _receive(best, r, old_on, source, pair_used, moved)


@njit(cache=True)
def _role_path(table, home, home_rank, home_slot, red, start, lo, hi, edge_start, edge_rank, edge_slot, queue,
               parent, parent_slot):
    """Breadth-first search from rank ``start`` for a chain of role swaps that ends at a rank with at least two
    redundant slots more. An edge ``u -> v`` is an expert homed on ``u`` with a redundant copy on ``v``: making that
    copy the home gives ``u`` one redundant slot and takes one from ``v``, and moves no weights. Applies the chain
    and returns True when found."""
    slots = table.shape[1]
    # edges grouped by source rank (counting sort), from the redundant slots of the group
    edge_start[:] = 0
    for v in range(lo, hi):
        for k in range(slots):
            if not home[v, k]:
                u = home_rank[table[v, k]]
                if lo <= u < hi and u != v:
                    edge_start[u + 1] += 1
    if edge_start[start + 1] == 0:
        return False
    for u in range(lo, hi):
        edge_start[u + 1] += edge_start[u]
    fill = edge_start.copy()
    for v in range(lo, hi):
        for k in range(slots):
            if not home[v, k]:
                u = home_rank[table[v, k]]
                if lo <= u < hi and u != v:
                    edge_rank[fill[u]] = v
                    edge_slot[fill[u]] = k
                    fill[u] += 1
    parent[:] = -2
    parent[start] = -1
    head, tail = 0, 1
    queue[0] = start
    target = -1
    while head < tail and target < 0:
        u = queue[head]
        head += 1
        for i in range(edge_start[u], edge_start[u + 1]):
            v = edge_rank[i]
            if parent[v] != -2:
                continue
            parent[v] = u
            parent_slot[v] = edge_slot[i]
            if red[v] >= red[start] + 2:
                target = v
                break
            queue[tail] = v
            tail += 1
    if target < 0:
        return False
    red[start] += 1
    red[target] -= 1
    v = target
    while parent[v] >= 0:
        u = parent[v]
        k = parent_slot[v]
        e = table[v, k]
        home[u, home_slot[e]] = False
        home[v, k] = True
        home_rank[e] = v
        home_slot[e] = k
        v = u
    return True


@njit(cache=True)
def _relocate(table, home, home_rank, home_slot, red, start, lo, hi, load, count, on_rank, old_on, source,
              pair_used, moved, group_of_rank, cold_first, tried):
    """Give rank ``start`` a redundant slot by moving one of its home experts (the coldest that can go) into a
    redundant slot of a rank with at least two redundant slots more (those with the most first). The overwritten
    copy is the donor's copy with the least load per replica; the vacated slot keeps its weights as a redundant
    copy, so this costs exactly one transfer. Returns False when no expert can go anywhere."""
    slots = table.shape[1]
    for i in range(slots):  # insertion sort of the rank's slots by load: K is small, and ties keep slot order
        k = i
        while k > 0 and load[table[start, cold_first[k - 1]]] > load[table[start, i]]:
            cold_first[k] = cold_first[k - 1]
            k -= 1
        cold_first[k] = i
    tried[:] = False
    while True:
        donor = -1
        for b in range(lo, hi):
            if not tried[b] and red[b] >= red[start] + 2 and (donor < 0 or red[b] > red[donor]):
                donor = b
        if donor < 0:
            return False
        tried[donor] = True
        victim = -1
        for k in range(slots):
            if not home[donor, k]:
                y, v = table[donor, k], table[donor, victim]
                if victim < 0 or load[y] * count[v] < load[v] * count[y]:
                    victim = k
        for i in range(slots):
            ka = cold_first[i]
            e = table[start, ka]
            if (not home[start, ka] or on_rank[donor, e]
                    or not _may_receive(e, donor, old_on, source, pair_used, group_of_rank)):
                continue
            y = table[donor, victim]
            table[donor, victim] = e
            count[y] -= 1
            count[e] += 1
            on_rank[donor, y] = False
            on_rank[donor, e] = True
            home[start, ka] = False
            home[donor, victim] = True
            home_rank[e] = donor
            home_slot[e] = victim
            _receive(e, donor, old_on, source, pair_used, moved)
            red[start] += 1
            red[donor] -= 1
            return True


@njit(cache=True)
def _spread(table, home, home_rank, home_slot, lo, hi, load, count, on_rank, old_on, source, pair_used, moved,
            group_of_rank):
    """Even out the redundant slots over ranks ``lo..hi-1``: afterwards each holds the floor or the ceiling of their
    mean, unless no role swap or relocation can get there. Role swaps (free) are tried before relocations."""
    num_ranks, slots = table.shape
    red = np.zeros(num_ranks, np.int64)
    for r in range(lo, hi):
        for k in range(slots):
            if not home[r, k]:
                red[r] += 1
    edge_start = np.zeros(num_ranks + 1, np.int64)
    edge_rank = np.empty(num_ranks * slots, np.int64)
    edge_slot = np.empty(num_ranks * slots, np.int64)
    queue = np.empty(num_ranks, np.int64)
    parent = np.empty(num_ranks, np.int64)
    parent_slot = np.empty(num_ranks, np.int64)
    cold_first = np.empty(slots, np.int64)
    tried = np.empty(num_ranks, np.bool_)
    while True:
        low, high = lo, lo
        for r in range(lo, hi):
            if red[r] < red[low]:
                low = r
            if red[r] > red[high]:
                high = r
        if red[high] - red[low] < 2:
            return
        if not _role_path(table, home, home_rank, home_slot, red, low, lo, hi, edge_start, edge_rank, edge_slot,
                          queue, parent, parent_slot):
            if not _relocate(table, home, home_rank, home_slot, red, low, lo, hi, load, count, on_rank, old_on,
                             source, pair_used, moved, group_of_rank, cold_first, tried):
                return


@njit(cache=True)
def prepare_layers(old, load, group_of_rank, group_start, threshold, spread):
    """First pass over layers.

    Args:
        old: int64 ``[L, W, K]``, the placement in force.
        load: float64 ``[L, E]``, window load.
        group_of_rank: int64 ``[W]``, the group (node in intra-node mode, else 0) of each rank.
        group_start: int64 ``[G + 1]``, first rank of each group; groups are contiguous.
        threshold: layers whose PAR is below it are left alone (after any repair).
        spread: even out the redundant slots in the active layers.

    Returns:
        ``repaired`` int64 ``[L, W, K]`` (``old`` with repeats repaired: what a layer keeps when planning does not
        improve it), ``base`` int64 ``[L, W, K]`` (repaired and spread: what planning starts from), ``home`` bool
        ``[L, W, K]`` (home-copy slots of ``base``), ``home_rank`` int64 ``[L, E]``, ``source`` int64 ``[L, E]``
        (scan-order home rank in ``old``), ``pair_used`` bool ``[L, W, W]`` and ``moved`` bool ``[L, E]`` (transfers
        so far), ``active`` bool ``[L]``.
    """
    num_layers, num_ranks, slots = old.shape
    num_experts = load.shape[1]
    base = old.copy()
    repaired = np.empty_like(old)
    home = np.zeros((num_layers, num_ranks, slots), np.bool_)
    home_rank = np.empty((num_layers, num_experts), np.int64)
    source = np.empty((num_layers, num_experts), np.int64)
    pair_used = np.zeros((num_layers, num_ranks, num_ranks), np.bool_)
    moved = np.zeros((num_layers, num_experts), np.bool_)
    active = np.zeros(num_layers, np.bool_)
    home_slot = np.empty(num_experts, np.int64)
    on_rank = np.zeros((num_ranks, num_experts), np.bool_)
    old_on = np.zeros((num_ranks, num_experts), np.bool_)
    for layer in range(num_layers):
        table, h = base[layer], load[layer]
        _membership(old[layer], old_on)
        _membership(table, on_rank)
        _assign_homes(table, home[layer], home_rank[layer], home_slot)
        source[layer] = home_rank[layer]
        count = _replica_counts(table, num_experts)
        _repair(table, h, count, on_rank, old_on, source[layer], pair_used[layer], moved[layer], group_of_rank)
        repaired[layer] = table
        mean = h.sum() / num_ranks
        active[layer] = mean > 0 and _max_rank_load(table, h) >= threshold * mean
        if not (active[layer] and spread):
            continue
        for g in range(group_start.shape[0] - 1):
            _spread(table, home[layer], home_rank[layer], home_slot, group_start[g], group_start[g + 1], h, count,
                    on_rank, old_on, source[layer], pair_used[layer], moved[layer], group_of_rank)
    return repaired, base, home, home_rank, source, pair_used, moved, active


