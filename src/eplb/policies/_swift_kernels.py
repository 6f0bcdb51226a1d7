"""Numba kernels of the SwiftBalancer policy (:mod:`eplb.policies.swift`), one layer after another.

Two passes, with the replica allotment (:func:`eplb.policies.shared.packing.replicate_counts`) in between because in
intra-node mode it depends on where the first pass put each expert's home copy:

- :func:`prepare_layers`: home copies (scan order), repair of ranks holding an expert twice, the per-layer threshold
  and the spreading of redundant slots over the ranks.
- :func:`plan_layers`: copy placement, fill of leftover redundant slots, swap rounds, acceptance.

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


@njit(cache=True)
def _place(table, e, d, base_table, on_rank, old_on, source, pair_used, moved):
    """Put expert ``e`` into a free (-1) slot of rank ``d``: the slot that held it before planning if free, else the
    first free one."""
    slot = -1
    for k in range(table.shape[1]):
        if table[d, k] < 0 and (slot < 0 or base_table[d, k] == e):
            slot = k
    table[d, slot] = e
    on_rank[d, e] = True
    _receive(e, d, old_on, source, pair_used, moved)


@njit(cache=True)
def _fill_choice(table, d, load, count, group_of_rank, base_table, on_rank, old_on, source, pair_used):
    """Expert for a leftover redundant slot of rank ``d``: the heaviest per replica that the rank lacks, of its
    group, within the pair limit; else what a free slot held before planning (no new transfer; always possible
    unless ``K > E``); else the heaviest the rank lacks at all; else a repeat (the rank holds every expert)."""
    num_experts, slots = load.shape[0], table.shape[1]
    free_slot, held_before = -1, -1
    for k in range(slots - 1, -1, -1):
        if table[d, k] < 0:
            free_slot = k
            if not on_rank[d, base_table[d, k]]:
                held_before = base_table[d, k]
    for level in range(3):
        if level == 1:
            if held_before >= 0:
                return held_before
            continue
        best = -1
        for x in range(num_experts):
            if on_rank[d, x]:
                continue
            if level == 0 and not _may_receive(x, d, old_on, source, pair_used, group_of_rank):
                continue
            if best < 0 or load[x] * count[best] > load[best] * count[x]:
                best = x
        if best >= 0:
            return best
    return base_table[d, free_slot]


@njit(cache=True)
def _pinned(table, old_table, r, k, moved, swapped, pin_experts):
    """Whether the swap rounds must leave the replica in slot ``(r, k)`` alone. With ``pin_experts``: when its expert
    was transferred or swapped this cycle. Otherwise: when this very replica moved (the slot's expert changed) or
    its expert was swapped this cycle."""
    e = table[r, k]
    return moved[e] if pin_experts else swapped[e] or e != old_table[r, k]


@njit(cache=True)
def _swap_rounds(table, old_table, lo, hi, load, count, rank_load, gain, rounds, on_rank, old_on, source,
                 pair_used, moved, group_of_rank, pin_experts):
    """Up to ``rounds`` swaps inside ranks ``lo..hi-1``: from the hottest rank, try partners from the coolest up and
    take the first partner whose best swap (the one minimising the pair's larger load) lowers the hot rank by at
    least ``gain`` without the partner ending above that. Pinned replicas (see :func:`_pinned`) stay."""
    slots = table.shape[1]
    swapped_expert = np.zeros(load.shape[0], np.bool_)
    for _ in range(rounds):
        hot = lo
        for r in range(lo, hi):
            if rank_load[r] > rank_load[hot]:
                hot = r
        partners = lo + np.argsort(rank_load[lo:hi], kind="mergesort")
        swapped = False
        for q in partners:
            if q == hot:
                continue
            # a swap shifts d = w(a) - w(b) from hot to q; it must satisfy gain <= d <= room
            room = rank_load[hot] - rank_load[q] - gain
            if room < gain:
                break  # partners only get hotter from here
            best, best_i, best_j = 0.0, -1, -1
            for i in range(slots):
                a = table[hot, i]
                wa = load[a] / count[a]
                if (wa < gain or _pinned(table, old_table, hot, i, moved, swapped_expert, pin_experts)
                        or on_rank[q, a] or not _may_receive(a, q, old_on, source, pair_used, group_of_rank)):
                    continue
                for j in range(slots):
                    b = table[q, j]
                    shift = wa - load[b] / count[b]
                    if (shift < gain or shift > room
                            or _pinned(table, old_table, q, j, moved, swapped_expert, pin_experts)
                            or on_rank[hot, b] or not _may_receive(b, hot, old_on, source, pair_used, group_of_rank)):
                        continue
                    peak = max(rank_load[hot] - shift, rank_load[q] + shift)
                    if best_i < 0 or peak < best:
                        best, best_i, best_j = peak, i, j
            if best_i < 0:
                continue
            a, b = table[hot, best_i], table[q, best_j]
            wa, wb = load[a] / count[a], load[b] / count[b]
            table[hot, best_i], table[q, best_j] = b, a
            on_rank[hot, a], on_rank[q, b] = False, False
            on_rank[hot, b], on_rank[q, a] = True, True
            rank_load[hot] += wb - wa
            rank_load[q] += wa - wb
            _receive(a, q, old_on, source, pair_used, moved)
            _receive(b, hot, old_on, source, pair_used, moved)
            moved[a], moved[b] = True, True
            swapped_expert[a], swapped_expert[b] = True, True
            swapped = True
            break
        if not swapped:
            return


@njit(cache=True)
def plan_layers(old, repaired, base, home, home_rank, source, pair_used, moved, active, load, counts,
                group_of_rank, group_start, rounds, min_gain, pin_experts):
    """Second pass: SwiftBalancer steps 4-7 on every active layer.

    Args:
        old, repaired, base, home, home_rank, source, pair_used, moved, active: as from :func:`prepare_layers`
            (``pair_used`` and ``moved`` are updated in place).
        load: float64 ``[L, E]``.
        counts: int64 ``[L, E]``, planned replicas per expert (home copy included).
        group_of_rank, group_start: the groups copies and swaps stay in.
        rounds: swap rounds per group.
        min_gain: a swap must lower the hot rank by this fraction of the mean rank load.
        pin_experts: the swaps leave every replica of an expert moved this cycle alone, not only the moved replica.

    Returns:
        int64 ``[L, W, K]``: the new table of every layer (``repaired`` where a layer is inactive or does not
        improve; the spreading alone is never kept).
    """
    num_layers, num_ranks, slots = old.shape
    num_experts = load.shape[1]
    out = repaired.copy()
    on_rank = np.zeros((num_ranks, num_experts), np.bool_)
    old_on = np.zeros((num_ranks, num_experts), np.bool_)
    for layer in range(num_layers):
        if not active[layer]:
            continue
        h, plan, src, pairs, done = load[layer], counts[layer], source[layer], pair_used[layer], moved[layer]
        _membership(old[layer], old_on)
        table = base[layer].copy()
        rank_load = np.zeros(num_ranks)
        free = np.zeros(num_ranks, np.int64)
        on_rank[:] = False
        for r in range(num_ranks):
            for k in range(slots):
                e = table[r, k]
                if home[layer, r, k]:
                    on_rank[r, e] = True
                    rank_load[r] += h[e] / plan[e]
                else:
                    table[r, k] = -1
                    free[r] += 1
        # step 4: copies heaviest first, each onto the least-loaded rank of its group that may take it
        count = np.ones(num_experts, np.int64)
        per_copy = h / plan
        for e in np.argsort(-per_copy, kind="mergesort"):
            g = group_of_rank[home_rank[layer, e]]
            for _ in range(plan[e] - 1):
                d = -1
                for r in range(group_start[g], group_start[g + 1]):
                    if (free[r] > 0 and not on_rank[r, e] and _may_receive(e, r, old_on, src, pairs, group_of_rank)
                            and (d < 0 or rank_load[r] < rank_load[d])):
                        d = r
                if d < 0:
                    break
                _place(table, e, d, base[layer], on_rank, old_on, src, pairs, done)
                free[d] -= 1
                rank_load[d] += per_copy[e]
                count[e] += 1
        # step 5: leftover redundant slots
        for d in range(num_ranks):
            for _ in range(free[d]):
                x = _fill_choice(table, d, h, count, group_of_rank, base[layer], on_rank, old_on, src, pairs)
                _place(table, x, d, base[layer], on_rank, old_on, src, pairs, done)
                count[x] += 1
        # step 6: swap rounds on the real replica counts
        for r in range(num_ranks):
            rank_load[r] = 0.0
            for k in range(slots):
                rank_load[r] += h[table[r, k]] / count[table[r, k]]
        gain = min_gain * h.sum() / num_ranks
        for g in range(group_start.shape[0] - 1):
            _swap_rounds(table, old[layer], group_start[g], group_start[g + 1], h, count, rank_load, gain, rounds,
                         on_rank, old_on, src, pairs, done, group_of_rank, pin_experts)
        # step 7: only a strict improvement replaces the layer
        if _max_rank_load(table, h) < _max_rank_load(repaired[layer], h) * (1.0 - STRICT_MARGIN):
            out[layer] = table
    return out
