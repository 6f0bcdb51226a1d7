"""Building blocks shared by the policies: replica allotment, balanced packing, spreading of shared-rank copies.

A "row" is one independent problem: a layer, or a (layer, node) pair; every kernel takes all rows at once and runs
the greedy loops of each row in numba. Arithmetic is done in the dtype of ``weight`` (DeepSeek's reference works in
float32, and ties depend on it).
"""

from __future__ import annotations

import heapq

import numpy as np
from numba import njit

from eplb.errors import PolicyError

__all__ = ["replicate_counts", "replicate", "balanced_packing", "descending_order", "spread_duplicates"]


def _slots_per_row(num_rows: int, num_items: int, num_slots) -> np.ndarray:
    slots = np.broadcast_to(np.asarray(num_slots, dtype=np.int64), (num_rows,))
    if slots.size and slots.min() < num_items:
        raise PolicyError(f"num_slots must be >= the number of items ({num_items}) in every row, got "
                          f"{int(slots.min())}")
    return slots


def _float_weight(weight) -> np.ndarray:
    weight = np.asarray(weight)
    return weight if weight.dtype.kind == "f" else weight.astype(np.float64)


def replicate(weight: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give ``num_slots`` replicas to ``n`` items: one each, then each further one to the item with the largest
    ``weight / replicas`` (ties: lowest index). DeepSeek's ``replicate_experts``.

    Args:
        weight: float ``[X, n]``; the arithmetic runs in its dtype (integers: float64).
        num_slots: S >= n, the same for every row.

    Returns:
        ``slot_item`` int64 ``[X, S]`` (slots ``0..n-1`` hold items ``0..n-1``, then the extra replicas in creation
        order), ``replica_rank`` int64 ``[X, S]`` (0 for the first replica of an item, 1 for the second, ...),
        ``counts`` int64 ``[X, n]``.
    """
    weight = _float_weight(weight)
    slots = _slots_per_row(weight.shape[0], weight.shape[1], num_slots)
    return _replicate(weight, slots, int(num_slots))


def replicate_counts(weight: np.ndarray, num_slots) -> np.ndarray:
    """Replica count of each item when ``num_slots`` replicas go greedily to the largest ``weight / replicas``.

    Args:
        weight: float ``[X, n]``; the arithmetic runs in its dtype (integers: float64).
        num_slots: int, or int ``[X]`` (one total per row), each >= n.

    Returns:
        int64 ``[X, n]``, each >= 1, rows summing to ``num_slots``. Ties go to the lowest index.
    """
    weight = _float_weight(weight)
    slots = _slots_per_row(weight.shape[0], weight.shape[1], num_slots)
    return _replicate(weight, slots, int(slots.max(initial=weight.shape[1])))[2]


@njit(cache=True)
def _replicate(weight, slots_per_row, width):
    num_rows, num_items = weight.shape
    slot_item = np.full((num_rows, width), -1, dtype=np.int64)
    replica_rank = np.zeros((num_rows, width), dtype=np.int64)
    counts = np.ones((num_rows, num_items), dtype=np.int64)
    per_replica = np.empty(num_items, dtype=weight.dtype)
    for row in range(num_rows):
        for item in range(num_items):
            slot_item[row, item] = item
            per_replica[item] = weight[row, item]
        # items by largest weight / replicas, ties to the lowest index: O(log n) per replica
        heap = [(-per_replica[item], item) for item in range(num_items)]
        heapq.heapify(heap)
        for slot in range(num_items, slots_per_row[row]):
            best = heapq.heappop(heap)[1]
            slot_item[row, slot] = best
            replica_rank[row, slot] = counts[row, best]
            counts[row, best] += 1
            # rounded to the weight's dtype, as the reference divides in float32
            per_replica[best] = weight[row, best] / counts[row, best]
            heapq.heappush(heap, (-per_replica[best], best))
    return slot_item, replica_rank, counts


@njit(cache=True)
def allot_replicas(weight, eligible, extra, max_count):
    """Which expert gets each of ``extra`` extra replicas, handing them out one by one to the eligible expert with the
    largest ``weight / replicas`` (ties: lowest expert id); eligible experts start with one replica and stop at
    ``max_count`` (when every one is there, the cap is lifted: duplicates on a rank become unavoidable). A prefix of
    the result is the allotment of fewer extras. The replica allotment of ``auto`` and ``flashlb``.

    Args:
        weight: float64 ``[E]``.
        eligible: bool ``[E]``, the experts taking part.
        extra: number of extra replicas.
        max_count: the most replicas one expert may get.

    Returns:
        int64 ``[extra]`` expert ids.
    """
    num_experts = weight.shape[0]
    count = np.ones(num_experts, dtype=np.int64)
    order = np.empty(extra, dtype=np.int64)
    # eligible experts under the cap by largest weight / replicas, ties to the lowest id: O(log E) per replica
    heap = [(-weight[e], e) for e in range(num_experts) if eligible[e] and max_count > 1]
    heapq.heapify(heap)
    capped = False
    for i in range(extra):
        if not heap and not capped:  # every eligible expert is at the cap: lift it
            capped = True
            heap = [(-(weight[e] / count[e]), e) for e in range(num_experts) if eligible[e]]
            heapq.heapify(heap)
        best = heapq.heappop(heap)[1]
        order[i] = best
        count[best] += 1
        if capped or count[best] < max_count:
            heapq.heappush(heap, (-(weight[best] / count[best]), best))
    return order


def descending_order(weight: np.ndarray) -> np.ndarray:
    """int64 ``[X, n]``: item indices of each row by weight, heaviest first; equal weights keep index order."""
    return np.argsort(-np.asarray(weight), axis=1, kind="stable")


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``n`` weighted items into ``num_packs`` packs of ``n / num_packs`` items each (DeepSeek's greedy):
    heaviest item first, each into the lightest pack that is not full (ties: lowest pack index).

    When every pack holds one item, item ``i`` goes to pack ``i`` (the reference does not sort then).

    Args:
        weight: float ``[X, n]`` with ``n % num_packs == 0``; pack weights accumulate in its dtype (integers:
            float64).
        num_packs: m.

    Returns:
        ``pack`` int64 ``[X, n]`` (the pack of each item) and ``rank_in_pack`` int64 ``[X, n]`` (its position in
        the pack, in packing order).
    """
    weight = _float_weight(weight)
    num_rows, num_items = weight.shape
    if num_items % num_packs:
        raise PolicyError(f"{num_items} items cannot fill {num_packs} packs evenly")
    per_pack = num_items // num_packs
    if per_pack == 1:
        return (np.broadcast_to(np.arange(num_items, dtype=np.int64), weight.shape).copy(),
                np.zeros(weight.shape, dtype=np.int64))
    return _pack_greedy(weight, descending_order(weight), num_packs, per_pack)


@njit(cache=True)
def _pack_greedy(weight, order, num_packs, per_pack):
    num_rows, num_items = weight.shape
    pack = np.empty((num_rows, num_items), dtype=np.int64)
    rank_in_pack = np.empty((num_rows, num_items), dtype=np.int64)
    pack_weight = np.zeros(num_packs, dtype=weight.dtype)
    pack_items = np.zeros(num_packs, dtype=np.int64)
    for row in range(num_rows):
        pack_weight[:] = 0
        pack_items[:] = 0
        # packs that are not full by (weight, index): the lightest on top, ties to the lowest index
        heap = [(pack_weight[p], p) for p in range(num_packs)]
        for position in range(num_items):
            item = order[row, position]
            target = heapq.heappop(heap)[1]
            pack[row, item] = target
            rank_in_pack[row, item] = pack_items[target]
            pack_weight[target] += weight[row, item]
            pack_items[target] += 1
            if pack_items[target] < per_pack:
                heapq.heappush(heap, (pack_weight[target], target))
    return pack, rank_in_pack


def spread_duplicates(phy2log: np.ndarray, slot_load: np.ndarray, num_ranks: int, ranks_per_block: int | None = None
                      ) -> np.ndarray:
    """Move second copies of an expert off a rank by swapping slots, so no rank holds an expert twice.

    Each extra copy of expert ``e`` on rank ``r`` is swapped with the slot of another rank ``r2`` (in the same block
    of ``ranks_per_block`` ranks, e.g. a node) that does not hold ``e`` and whose expert ``r`` does not hold; of
    those, the swap giving the smallest ``max(load r, load r2)`` afterwards wins (ties: lowest rank, then slot).
    Replica counts do not change. A copy with no legal partner (an expert with more replicas than the block has
    ranks) stays.

    Args:
        phy2log: int ``[L, P]``.
        slot_load: float ``[L, P]``, the load each slot carries (its expert's load / replica count).
        num_ranks: W.
        ranks_per_block: swaps stay within blocks of this many consecutive ranks (default: all ranks).

    Returns:
        int64 ``[L, P]``, a new array.
    """
    num_layers, num_slots = phy2log.shape
    table = np.array(phy2log, dtype=np.int64).reshape(num_layers, num_ranks, num_slots // num_ranks)
    loads = np.array(slot_load, dtype=np.float64).reshape(table.shape)
    _spread(table, loads, ranks_per_block or num_ranks)
    return table.reshape(num_layers, num_slots)


@njit(cache=True)
def _holds(row, expert):
    for value in row:
        if value == expert:
            return True
    return False


@njit(cache=True)
def _spread(table, loads, block):
    num_layers, num_ranks, slots = table.shape
    for layer in range(num_layers):
        rank_load = loads[layer].sum(axis=1)
        for rank in range(num_ranks):
            for slot in range(1, slots):
                expert = table[layer, rank, slot]
                if not _holds(table[layer, rank, :slot], expert):
                    continue
                best_rank, best_slot, best_cost = -1, -1, np.inf
                start = (rank // block) * block
                for other in range(start, start + block):
                    if other == rank or _holds(table[layer, other], expert):
                        continue
                    for other_slot in range(slots):
                        if _holds(table[layer, rank], table[layer, other, other_slot]):
                            continue
                        delta = loads[layer, other, other_slot] - loads[layer, rank, slot]
                        cost = max(rank_load[rank] + delta, rank_load[other] - delta)
                        if cost < best_cost:
                            best_rank, best_slot, best_cost = other, other_slot, cost
                if best_rank < 0:
                    continue
                delta = loads[layer, best_rank, best_slot] - loads[layer, rank, slot]
                rank_load[rank] += delta
                rank_load[best_rank] -= delta
                table[layer, rank, slot], table[layer, best_rank, best_slot] = table[layer, best_rank, best_slot], expert
                loads[layer, rank, slot], loads[layer, best_rank, best_slot] = (loads[layer, best_rank, best_slot],
                                                                                  loads[layer, rank, slot])


@njit(cache=True)
def greedy_tables(mean_x, num_ranks, slots):
    """int64 ``[L, W, K]``: a fresh placement per layer from ``mean_x`` ``[L, E]``.

    Replicas go one by one to the expert with the largest load per replica (at most one per rank, ties to the lower
    id: :func:`allot_replicas`); then replicas, heaviest per-replica load first, fill the lightest rank with a free slot that does not hold
    the expert yet (ties to the lower rank). When no such rank is left the lightest rank with a free slot takes it
    (a duplicate that :func:`spread_duplicates` then swaps away). ``auto``'s fresh start.
    """
    num_layers, num_experts = mean_x.shape
    out = np.empty((num_layers, num_ranks, slots), dtype=np.int64)
    everyone = np.ones(num_experts, dtype=np.bool_)
    for layer in range(num_layers):
        counts = np.ones(num_experts, dtype=np.int64)
        for e in allot_replicas(mean_x[layer], everyone, num_ranks * slots - num_experts, num_ranks):
            counts[e] += 1
        items = np.empty(num_ranks * slots, dtype=np.int64)
        per_replica = np.empty(num_ranks * slots)
        i = 0
        for e in range(num_experts):
            for _ in range(counts[e]):
                items[i] = e
                per_replica[i] = mean_x[layer, e] / counts[e]
                i += 1
        order = np.argsort(-per_replica, kind="mergesort")
        rank_load = np.zeros(num_ranks)
        used = np.zeros(num_ranks, dtype=np.int64)
        has = np.zeros((num_ranks, num_experts), dtype=np.bool_)
        # ranks with a free slot by (load, id): the lightest is on top, ties to the lower id, as a linear scan
        free = [(0.0, r) for r in range(num_ranks)]
        skipped = [(0.0, 0) for _ in range(0)]
        for j in order:
            e = items[j]
            target = -1
            while free:
                entry = heapq.heappop(free)
                if not has[entry[1], e]:
                    target = entry[1]
                    break
                skipped.append(entry)
            first = 0
            if target < 0:  # every free rank holds e: the lightest takes it
                target = skipped[0][1]
                first = 1
            for i in range(first, len(skipped)):
                heapq.heappush(free, skipped[i])
            skipped.clear()
            out[layer, target, used[target]] = e
            used[target] += 1
            has[target, e] = True
            rank_load[target] += per_replica[j]
            if used[target] < slots:
                heapq.heappush(free, (rank_load[target], target))
    return out
