"""Numba kernels of SwiftBalancer as vllm-ascend's policy file runs it (``swift`` with ``rules="vllm-ascend"``).

Each step is what vllm-ascend's ``SwiftBalanceEplb`` does, with its arithmetic (loads per rank in float32, the
replica allotment in float64) and its orders, so that the same table and load give the same new table:

1. A layer whose PAR (tokens split evenly over the replicas in force) is below ``threshold`` is left alone.
2. Scanning slot 0 of every rank, then slot 1, ...: the first occurrence of an expert is its home copy; the other
   slots are redundant slots, listed per rank in slot order.
3. The redundant slots are allotted one by one to the expert with the largest weight (ties: the later in CPython's
   iteration of the set of the group's experts: the highest id when the group holds every expert),
   at most ``W - 1`` extra replicas each; an allotment multiplies the expert's weight by ``(c + 1) / (c + 2)``, ``c``
   its extra replicas so far counting this one, so that ``c`` extras leave ``2 h / (c + 2)`` (not ``h / (c + 1)``).
4. Home copies stay. The copies, heaviest weight first (ties: lowest id), go to the least-loaded rank (ties: lowest
   rank) that has a redundant slot left, does not hold the expert and has not yet received a copy from the expert's
   home rank; each takes the rank's last redundant slot left. A copy no rank may take is dropped.
5. A rank with redundant slots left fills each, in slot order, with the expert of the largest load per replica that
   it lacks (ties: highest id); then the weights and rank loads are recomputed as load / replicas (otherwise the
   weights of step 3 stay in use).
6. Up to ``rounds`` swaps: with ranks ordered by load (stable), from the coolest partner up, the first partner that
   exchanged nothing with the hottest rank yet whose best exchange lowers the hottest rank by at least ``gain`` is
   swapped with it. The best exchange is the pair (``a`` on the hot rank, ``b`` on the partner; neither rank holding
   the other's expert, neither received by its rank this cycle) with the lowest larger load after it, visited in
   the order CPython iterates a set of the rank's experts (the reference keeps each rank's experts in a set).
7. The layer takes the new table only if its largest rank load after step 6, over ``reference_mean`` (the mean rank
   load of layer 0, as in the reference), is below its PAR of step 1. Experts a rank keeps stay in their slot; the
   others fill the freed slots in set order.

Differences that remain (docs/peers.md): a rank already holding an expert twice is repaired first (the reference
fails on such a table), and a layer in which a redundant slot stays empty keeps its table.
"""

from __future__ import annotations

import heapq

import numpy as np
from numba import njit

from eplb.policies._pyset import set_add, set_items, set_remove

@njit(cache=True)
def _rank_loads(table, weight, lo, hi):
    out = np.zeros(hi - lo, dtype=np.float32)
    for r in range(lo, hi):
        for k in range(table.shape[1]):
            out[r - lo] += weight[table[r, k]]
    return out


@njit(cache=True)
def _set_order(experts, num_experts):
    """int64 ``[E]``: each expert's position when CPython iterates a set built by adding ``experts`` in turn (-1:
    not in it); ascending ids when the set holds every expert, not so for a node's subset."""
    capacity = 8
    while capacity <= 8 * experts.shape[0]:
        capacity <<= 1
    keys = np.zeros(capacity, dtype=np.int64)
    state = np.zeros(capacity, dtype=np.int8)
    meta = np.array([7, 0, 0], dtype=np.int64)
    for e in experts:
        set_add(keys, state, meta, e)
    items = np.empty(experts.shape[0], dtype=np.int64)
    position = np.full(num_experts, -1, dtype=np.int64)
    for i in range(set_items(keys, state, meta, items)):
        position[items[i]] = i
    return position


@njit(cache=True)
def _allot(load, scanned, red_count, lo, hi, num_experts):
    """Steps 3: extra replicas per expert and the copies in placing order (heaviest weight first, ties lowest id),
    with each expert's final weight (float32). ``scanned``: the group's experts in scan order; weight ties go to the
    later one in the reference's set of them."""
    position = _set_order(scanned, num_experts)
    extra = np.zeros(num_experts, dtype=np.int64)
    weight = load.copy()
    heap = [(-weight[e], -position[e], e) for e in scanned]
    heapq.heapify(heap)
    for _ in range(red_count[lo:hi].sum()):
        while heap and extra[heap[0][2]] + 1 >= hi - lo:  # at the cap for good
            heapq.heappop(heap)
        if not heap:
            break
        e = heapq.heappop(heap)[2]
        current = extra[e] + 1
        weight[e] = weight[e] * (current + 1) / (current + 2)
        extra[e] += 1
        heapq.heappush(heap, (-weight[e], -position[e], e))
    final = np.zeros(num_experts, dtype=np.float32)
    for e in scanned:
        final[e] = weight[e]
    copies = np.empty(extra.sum(), dtype=np.int64)
    count = 0
    for e in range(num_experts):
        for _ in range(extra[e]):
            copies[count] = e
            count += 1
    order = np.argsort(-final[copies].astype(np.float64), kind="mergesort")
    return copies[order], final


@njit(cache=True)
def _fill_left(table, load, present, home, red_pos, red_count, on_rank, num_com, received, lo, hi):
    """Step 5 on the ranks of ``lo..hi`` with redundant slots left; returns the recomputed weights (float32)."""
    num_experts = load.shape[0]
    replicas = np.zeros(num_experts, dtype=np.int64)
    for r in range(lo, hi):
        for k in range(table.shape[1]):
            if table[r, k] >= 0:
                replicas[table[r, k]] += 1
    weight = np.full(num_experts, -1.0, dtype=np.float32)
    for e in range(num_experts):
        if present[e]:
            weight[e] = load[e] / replicas[e]
    for r in range(lo, hi):
        for i in range(red_count[r]):
            # heaviest first, ties to the highest id: a stable ascending sort read backwards
            order = np.argsort(weight, kind="mergesort")[::-1]
            for e in order:
                if on_rank[r - lo, e] or weight[e] == np.float32(-1.0):
                    continue
                table[r, red_pos[r, i]] = e
                on_rank[r - lo, e] = True
                received[r - lo, e] = True
                num_com[home[e] - lo, r - lo] = True
                weight[e] = np.float32(np.float64(weight[e]) * (replicas[e] / (replicas[e] + 1)))
                replicas[e] += 1
                break
    return weight


@njit(cache=True)
def _below(value, value_is32, bound, bound_is32):
    """``value < bound`` as the reference's Python compares them: in float32 when either is a float32 (a Python
    float meeting a numpy float32 is converted to it)."""
    if value_is32 or bound_is32:
        return np.float32(value) < np.float32(bound)
    return value < bound


@njit(cache=True)
def _best_exchange(hot, partner, keys, state, meta, on_rank, received, weight, hot_load, partner_load, items_hot,
                   items_partner):
    """Step 6's best pair for ``hot`` and ``partner``: ``(a, b, larger load after, whether that is a float32)``,
    ``a = -1`` if none. The load after on the hot rank is a Python float in the reference, the partner's a float32
    (its load is one), and which of the two a comparison sees decides its precision."""
    best_a, best_b, best, best_is32 = -1, -1, hot_load, False
    count_hot = set_items(keys[hot], state[hot], meta[hot], items_hot)
    count_partner = set_items(keys[partner], state[partner], meta[partner], items_partner)
    for i in range(count_hot):
        a = items_hot[i]
        if on_rank[partner, a] or received[hot, a]:
            continue
        wa = np.float64(weight[a])
        for j in range(count_partner):
            b = items_partner[j]
            if on_rank[hot, b] or received[partner, b]:
                continue
            wb = np.float64(weight[b])
            after_hot = hot_load - wa + wb
            after_partner = np.float64(np.float32(np.float32(partner_load - np.float32(wb)) + np.float32(wa)))
            # max(after_hot, after_partner): the second only if it compares greater, in float32
            if np.float32(after_partner) > np.float32(after_hot):
                larger, larger_is32 = after_partner, True
            else:
                larger, larger_is32 = after_hot, False
            if _below(larger, larger_is32, best, best_is32):
                best, best_is32, best_a, best_b = larger, larger_is32, a, b
    return best_a, best_b, best, best_is32


@njit(cache=True)
def _swap_rounds(rows, loads, weight, on_rank, received, num_com, rounds, gain):
    """Step 6 on one group's rows ``[n, K]`` (rewritten in set order); returns the hottest load the reference
    reports (read at the start of its last round)."""
    num_ranks, slots = rows.shape
    capacity = 8
    while capacity <= 8 * slots:
        capacity <<= 1
    keys = np.zeros((num_ranks, capacity), dtype=np.int64)
    state = np.zeros((num_ranks, capacity), dtype=np.int8)
    meta = np.zeros((num_ranks, 3), dtype=np.int64)
    meta[:, 0] = 7
    for r in range(num_ranks):
        for k in range(slots):
            set_add(keys[r], state[r], meta[r], rows[r, k])
    items_hot = np.empty(slots, dtype=np.int64)
    items_partner = np.empty(slots, dtype=np.int64)
    hot_load = 0.0
    exchange = True
    order = np.argsort(loads, kind="mergesort")  # by load, ties by rank: kept so as ranks' loads change
    place = np.empty(num_ranks, dtype=np.int64)
    place[order] = np.arange(num_ranks)
    for _ in range(rounds):
        hot = order[-1]
        hot_load = np.float64(loads[hot])
        if not exchange:
            break
        exchange = False
        for i in range(num_ranks - 1):
            partner = order[i]
            if num_com[partner, hot] or num_com[hot, partner]:
                continue
            a, b, best, best_is32 = _best_exchange(hot, partner, keys, state, meta, on_rank, received, weight,
                                                   hot_load, loads[partner], items_hot, items_partner)
            if a < 0:
                continue
            if best_is32:  # the hot load meets a float32: the difference and its comparison are float32
                if np.float32(np.float32(hot_load) - np.float32(best)) < np.float32(gain):
                    continue
            elif hot_load - best < gain:
                continue
            set_remove(keys[hot], state[hot], meta[hot], a)
            set_remove(keys[partner], state[partner], meta[partner], b)
            set_add(keys[hot], state[hot], meta[hot], b)
            set_add(keys[partner], state[partner], meta[partner], a)
            on_rank[hot, a], on_rank[partner, b] = False, False
            on_rank[hot, b], on_rank[partner, a] = True, True
            loads[hot] += weight[b] - weight[a]
            loads[partner] += weight[a] - weight[b]
            _resort(order, place, loads, hot)
            _resort(order, place, loads, partner)
            received[hot, b], received[partner, a] = True, True
            num_com[partner, hot] = True
            num_com[hot, partner] = True
            exchange = True
            break
    for r in range(num_ranks):
        set_items(keys[r], state[r], meta[r], rows[r])
    return hot_load


@njit(cache=True)
def _resort(order, place, loads, rank):
    """Move ``rank``, whose load changed, to its place in ``order`` (load ascending, ties by rank): the order a
    stable sort of the loads gives."""
    i = place[rank]
    while i + 1 < order.shape[0] and (loads[order[i + 1]] < loads[rank]
                                      or (loads[order[i + 1]] == loads[rank] and order[i + 1] < rank)):
        order[i] = order[i + 1]
        place[order[i]] = i
        i += 1
    while i > 0 and (loads[order[i - 1]] > loads[rank] or (loads[order[i - 1]] == loads[rank] and order[i - 1] > rank)):
        order[i] = order[i - 1]
        place[order[i]] = i
        i -= 1
    order[i] = rank
    place[rank] = i


@njit(cache=True)
def _plan_group(table, load, lo, hi, rounds, gain):
    """Steps 2-6 on ranks ``lo..hi-1`` of one layer's ``table`` ``[W, K]``: their new rows (a -1 where a redundant
    slot stays empty) and the hottest load the reference reports."""
    slots = table.shape[1]
    num_experts = load.shape[0]
    num_ranks = hi - lo
    present = np.zeros(num_experts, dtype=np.bool_)
    home = np.zeros(num_experts, dtype=np.int64)
    red_pos = np.empty((table.shape[0], slots), dtype=np.int64)
    red_count = np.zeros(table.shape[0], dtype=np.int64)
    scanned = np.empty(num_ranks * slots, dtype=np.int64)
    num_scanned = 0
    for k in range(slots):
        for r in range(lo, hi):
            e = table[r, k]
            if present[e]:
                red_pos[r, red_count[r]] = k
                red_count[r] += 1
            else:
                present[e] = True
                home[e] = r
                scanned[num_scanned] = e
                num_scanned += 1
    copies, weight = _allot(load, scanned[:num_scanned], red_count, lo, hi, num_experts)
    rows = table.copy()
    on_rank = np.zeros((num_ranks, num_experts), dtype=np.bool_)
    for r in range(lo, hi):
        for i in range(red_count[r]):
            rows[r, red_pos[r, i]] = -1
        for k in range(slots):
            if rows[r, k] >= 0:
                on_rank[r - lo, rows[r, k]] = True
    loads = np.zeros(num_ranks, dtype=np.float32)
    for r in range(lo, hi):
        for k in range(slots):
            if rows[r, k] >= 0:
                loads[r - lo] += weight[rows[r, k]]
    num_com = np.zeros((num_ranks, num_ranks), dtype=np.bool_)  # a pair that exchanged an expert
    received = np.zeros((num_ranks, num_experts), dtype=np.bool_)
    left = red_count.copy()
    # step 4: ranks with a redundant slot left by load (float32) then rank, the least loaded first
    heap = [(loads[r], r) for r in range(num_ranks) if left[lo + r] > 0]
    heapq.heapify(heap)
    passed = [(loads[0], 0) for _ in range(0)]
    for e in copies:
        source = home[e] - lo
        target = -1
        while heap:
            entry = heapq.heappop(heap)
            if not on_rank[entry[1], e] and not num_com[source, entry[1]]:
                target = entry[1]
                break
            passed.append(entry)
        for entry in passed:
            heapq.heappush(heap, entry)
        passed.clear()
        if target < 0:
            continue
        left[lo + target] -= 1
        rows[lo + target, red_pos[lo + target, left[lo + target]]] = e
        loads[target] += weight[e]
        num_com[source, target] = True
        received[target, e] = True
        on_rank[target, e] = True
        if left[lo + target] > 0:
            heapq.heappush(heap, (loads[target], target))
    if left[lo:hi].sum() > 0:  # step 5
        weight = _fill_left(rows, load, present, home, red_pos, left, on_rank, num_com, received, lo, hi)
        loads = np.zeros(num_ranks, dtype=np.float32)
        for r in range(lo, hi):
            for k in range(slots):
                if rows[r, k] >= 0:
                    loads[r - lo] += weight[rows[r, k]]
        for r in range(lo, hi):
            for k in range(slots):
                if rows[r, k] < 0:
                    return rows[lo:hi], -1.0
    group_rows = rows[lo:hi].copy()
    hottest = _swap_rounds(group_rows, loads, weight, on_rank, received, num_com, rounds, gain)
    return group_rows, hottest


@njit(cache=True)
def _keep_in_place(old_row, new_row, out):
    """Experts ``old_row`` holds keep their slot; the rest of ``new_row`` fills the other slots in its order."""
    slots = old_row.shape[0]
    taken = np.zeros(slots, dtype=np.bool_)
    rest = np.empty(slots, dtype=np.int64)
    count = 0
    for i in range(slots):
        placed = False
        for j in range(slots):
            if not taken[j] and old_row[j] == new_row[i]:
                out[j] = new_row[i]
                taken[j] = True
                placed = True
                break
        if not placed:
            rest[count] = new_row[i]
            count += 1
    count = 0
    for j in range(slots):
        if not taken[j]:
            out[j] = rest[count]
            count += 1


@njit(cache=True)
def _repeats(table):
    for r in range(table.shape[0]):
        for k in range(1, table.shape[1]):
            for j in range(k):
                if table[r, j] == table[r, k]:
                    return True
    return False


@njit(cache=True)
def plan_layers(old, load, group_start, threshold, rounds, gain, reference_mean):
    """SwiftBalancer as vllm-ascend runs it, every layer.

    Args:
        old: int64 ``[L, W, K]``, the table in force (no rank holding an expert twice).
        load: float64 ``[L, E]``, the window's load.
        group_start: int64 ``[G + 1]``, the groups planned apart (nodes in intra-node mode, else one group).
        threshold: layers whose PAR is below it stay.
        rounds: the most swaps per group.
        gain: a swap must lower the hottest rank by at least this many tokens.
        reference_mean: the mean rank load the acceptance divides by (the reference's: layer 0's).

    Returns:
        int64 ``[L, W, K]``.
    """
    num_layers, num_ranks, slots = old.shape
    num_experts = load.shape[1]
    out = old.copy()
    for layer in range(num_layers):
        table, h = old[layer], load[layer]
        if _repeats(table):  # the reference's sets would drop a slot: only possible when K > E
            continue
        count = np.zeros(num_experts)
        for r in range(num_ranks):
            for k in range(slots):
                count[table[r, k]] += 1.0
        peak = 0.0
        total = 0.0
        for r in range(num_ranks):
            rank_load = 0.0
            for k in range(slots):
                rank_load += h[table[r, k]] / count[table[r, k]]
            total += rank_load
            peak = max(peak, rank_load)
        mean = total / num_ranks
        par = 1.0 if abs(mean) < 1e-9 else peak / mean
        if par < threshold or reference_mean <= 0:
            continue
        new = np.empty_like(table)
        hottest = 0.0
        complete = True
        for g in range(group_start.shape[0] - 1):
            lo, hi = group_start[g], group_start[g + 1]
            rows, group_hottest = _plan_group(table, h, lo, hi, rounds, gain)
            if group_hottest < 0:
                complete = False
                break
            new[lo:hi] = rows
            hottest = max(hottest, group_hottest)
        if complete and hottest / reference_mean < par:
            for r in range(num_ranks):
                _keep_in_place(table[r], new[r], out[layer, r])
    return out
