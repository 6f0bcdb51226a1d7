"""Numba kernels of SwiftBalancer's second pass (:func:`plan_layers`): copy placement, fill of leftover redundant
slots, swap rounds and acceptance, after the first pass (:mod:`eplb.policies._swift_prepare_kernels`) and the
replica allotment. Tables, transfers and pinning as described there.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from eplb.policies._swift_prepare_kernels import STRICT_MARGIN, _max_rank_load, _may_receive, _membership, _receive

__all__ = ["plan_layers"]


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
