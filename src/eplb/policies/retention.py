"""Keeping experts where they already are: cheaper transitions for any new placement with the same load balance.

Two passes, both leaving every rank's load unchanged:

- :func:`preserve_slots` reorders slots inside each rank (vLLM's ``preserve_intragpu_slots``): an expert the rank
  already holds keeps its old local slot, so it is not copied at all.
- :func:`match_ranks` relabels whole ranks first (ranks are interchangeable), choosing the relabelling that keeps
  the most experts in place (Hungarian assignment), then applies :func:`preserve_slots`.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from scipy.optimize import linear_sum_assignment

from eplb.errors import PolicyError

__all__ = ["preserve_slots", "match_ranks", "rank_overlap"]


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


def rank_overlap(new_phy2log, old_phy2log, num_ranks: int, num_experts: int | None = None) -> np.ndarray:
    """int64 ``[L, W, W]``: ``[l, i, j]`` = experts (with multiplicity) that new rank ``i`` and old rank ``j`` share,
    i.e. the slots kept in place if new rank ``i`` became rank ``j``."""
    new, old = _check(new_phy2log, old_phy2log, num_ranks)
    if num_experts is None:
        num_experts = int(max(new.max(initial=0), old.max(initial=0))) + 1
    return np.stack([_layer_overlap(new[layer], old[layer], num_ranks, num_experts)
                     for layer in range(new.shape[0])]) if new.shape[0] else np.zeros((0, num_ranks, num_ranks),
                                                                                         dtype=np.int64)


@njit(cache=True)
def _layer_overlap(new, old, num_ranks, num_experts):
    """:func:`rank_overlap` of one layer, from each expert's old holders: O(P x replicas), not O(P x W)."""
    slots = new.shape[0] // num_ranks
    # old holders of each expert, with the copies each holds: CSR over experts
    start = np.zeros(num_experts + 1, dtype=np.int64)
    for e in old:
        start[e + 1] += 1
    for e in range(num_experts):
        start[e + 1] += start[e]
    holder = np.empty(old.shape[0], dtype=np.int64)
    fill = start[:-1].copy()
    for p in range(old.shape[0]):
        holder[fill[old[p]]] = p // slots
        fill[old[p]] += 1
    out = np.zeros((num_ranks, num_ranks), dtype=np.int64)
    for rank in range(num_ranks):
        for k in range(slots):
            e = new[rank * slots + k]
            copy = 0  # earlier copies of e on this new rank: this one is kept where the old rank held more
            for j in range(k):
                if new[rank * slots + j] == e:
                    copy += 1
            # holders are in slot order, so an old rank's copies are consecutive
            i = start[e]
            while i < start[e + 1]:
                r = holder[i]
                held = 0
                while i < start[e + 1] and holder[i] == r:
                    held += 1
                    i += 1
                if held > copy:
                    out[rank, r] += 1
    return out


def match_ranks(new_phy2log, old_phy2log, num_ranks: int, num_nodes: int = 1, across_nodes: bool = False
                ) -> np.ndarray:
    """Relabel the ranks of ``new_phy2log`` to keep as many experts in place as possible, then
    :func:`preserve_slots`.

    Ranks are interchangeable for balance, so any permutation of the new per-rank rows gives the same rank loads.
    The permutation maximising the experts kept (ties: the most ranks left unmoved) is found per layer with the
    Hungarian method. Relabelling a rank to another node moves its experts to that node, which breaks node-level
    placements (DeepSeek's hierarchical mode), so unless ``across_nodes`` whole nodes are matched first (by the
    experts they share) and ranks are then only permuted within their node.

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
    """Permute the ``num_units`` equal parts of every row of ``new`` within consecutive blocks of ``block`` parts,
    maximising the experts each part shares with the same part of ``old`` (ties: the most parts left unmoved)."""
    num_layers, num_slots = new.shape
    num_experts = int(max(new.max(initial=0), old.max(initial=0))) + 1
    table = new.reshape(num_layers, num_units, num_slots // num_units)
    out = np.empty_like(table)
    stay = np.eye(num_units, dtype=np.int64)
    for layer in range(num_layers):  # one [W, W] at a time: a dense [L, W, W] is gigabytes at 1,024 ranks
        # Among maximal assignments prefer fixed points: overlap counts (block + 1) times, staying put counts once.
        score = _layer_overlap(new[layer], old[layer], num_units, num_experts) * (block + 1) + stay
        for start in range(0, num_units, block):
            new_unit, old_unit = linear_sum_assignment(score[start:start + block, start:start + block], maximize=True)
            out[layer, start + old_unit] = table[layer, start + new_unit]
    return out.reshape(num_layers, num_slots)
