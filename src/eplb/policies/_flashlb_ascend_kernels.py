"""FlashLB's tree search as vllm-ascend's policy file runs it (``flashlb`` with ``rules="vllm-ascend"``), with its
arithmetic, so that the same episodes give the same deployment.

:func:`flash_tree`: the episodes' statistics (mean, unbiased variance, covariance) as numpy computes them; experts
sorted by risk weight ``mean + z * std`` (descending, numpy's default sort) are cut into groups of ``ceil(E / depth)``.
For each group but the last, the greedy min-max allotment of the extra replicas left over this group and the later
ones guesses this group's share; shares are then tried in the order ``guess, guess - 1, guess + 1, guess - 2, ...``
up to ``width`` away (within ``0..left``), each candidate being the fixed groups, this group's share allotted
greedily inside it and the rest greedily over the later groups, deployed by :func:`lpt` and scored by :func:`score`;
a share replaces the best one only if it scores strictly lower. The last group searched fixes the counts: the result
is its best candidate, not the best of all candidates scored. The greedy allotment gives each extra replica to the
largest ``weight / replicas``, ties to the expert earlier in weight order.

:func:`lpt` and :func:`score` keep the reference's precision: rank loads and variances stored in float32, per-episode
scores in float32, numba's sort of the experts by load per replica.

The LPT's scan over ranks stops early, with the result of a scan of all. A rank's own score is ``mu + z * sqrt(var)``;
adding a replica of ``e`` (std ``s``) to a rank whose experts all correlate with ``e`` at ``rho >= 0`` or more raises
it by at least ``mean_e / c_e + z * rho * s`` (the rank's sum covaries with the replica at ``rho`` x their stds or
more, and ``sqrt(v + 2 rho sqrt(v) s + s**2) - sqrt(v) >= rho * s``; with ``rho = -1``, by Cauchy-Schwarz, always).
Experts are cut into clusters of neighbours in weight order; ranks whose experts share a cluster are kept in that
cluster's list, the others in a list of their own, each by own score, and each list is read from its lowest score
until no rank left in it can win (its cluster's correlation bound). Empty ranks score alike: the lowest stands for
all. When every rank with a free slot holds the expert, an expert is moved to make room (:func:`_make_room`) and the
lists are rebuilt.

Differences that remain (docs/peers.md): no expert gets more than ``W`` replicas (the reference has no cap, and its
deployment then breaks: the shares that would need it are not tried), and when every rank with a free slot holds the
expert, one expert is moved to make room (the reference has no way out). Neither happens while the experts' loads
leave every expert at most ``W`` replicas, as in every case checked against the reference.
"""

from __future__ import annotations

import heapq
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

# Relative slack of the scan's stopping bound: the bound holds for exact variances, the stored ones are float32.
_MARGIN = 1e-5


@njit(cache=True, fastmath=True, nogil=True)
def _allotment(mean, var, z, extra, max_count):
    """Which expert (position in the given arrays) gets each of ``extra`` extra replicas: one by one to the largest
    ``(mean + z * std) / replicas`` (ties: the lower position), at most ``max_count`` replicas each while any has
    fewer. Returns int64 ``[extra]`` positions."""
    size = mean.shape[0]
    count = np.ones(size, dtype=np.int32)
    value = (mean + z * np.sqrt(var)) / count
    order = np.empty(extra, dtype=np.int64)
    heap = [(-value[i], i) for i in range(size) if max_count > 1]
    heapq.heapify(heap)
    capped = False
    for j in range(extra):
        if not heap and not capped:  # every expert at the cap: lift it (an LPT deployment then repeats experts)
            capped = True
            heap = [(-value[i], i) for i in range(size)]
            heapq.heapify(heap)
        i = heapq.heappop(heap)[1]
        order[j] = i
        count[i] += 1
        value[i] = (mean[i] + z * np.sqrt(var[i])) / count[i]
        if capped or count[i] < max_count:
            heapq.heappush(heap, (-value[i], i))
    return order


@njit(cache=True)
def _holds(members, size, expert):
    for j in range(size):
        if members[j] == expert:
            return True
    return False


@njit(cache=True, fastmath=True, nogil=True)
def lpt(mean, var, cov, count, z, cluster, floor, members):
    """Deploy ``count[e]`` replicas of every expert onto ``members`` (int64 ``[W, K]``, written): experts by
    ``mean / count`` descending, each replica to the rank with a free slot not holding the expert whose
    ``mu + z * sqrt(var)`` after adding it is lowest (ties: the lowest rank), where a replica adds ``mean_e / c_e``
    to ``mu`` and ``var_e / c_e**2 + 2 * cov(e, e') / (c_e * c_e')`` for each ``e'`` on the rank to ``var``; ``mu``
    and ``var`` are stored in float32. The result is that of scanning every rank.

    Ranks are looked at so that the scan stops early (a scan of all is O(W) per replica): see the module docstring.
    ``cluster[e]`` is each expert's cluster, ``floor[e, g]`` bounds ``e``'s correlation with cluster ``g`` and
    ``floor[e, G]`` with any expert (:func:`correlation_floors`).
    """
    num_ranks, slots = members.shape
    groups = floor.shape[1]  # G clusters, and the list of ranks mixing clusters
    order = np.argsort(-(mean / count))
    dev_mu = np.zeros(num_ranks, dtype=np.float32)
    dev_var = np.zeros(num_ranks, dtype=np.float32)
    key = np.zeros(num_ranks)  # each rank's own score, from its stored mu and var
    std = np.zeros(num_ranks)  # the square root of each rank's stored var
    size = np.zeros(num_ranks, dtype=np.int64)
    stamp = np.full(num_ranks, -1)  # the last expert placed on a rank: an expert's replicas are placed in a row
    group = np.full(num_ranks, -1)  # each loaded rank's list
    lists = np.empty((groups, num_ranks), dtype=np.int64)  # by key descending, ties by rank descending
    list_key = np.empty((groups, num_ranks))  # the keys of the lists' ranks, read in order
    length = np.zeros(groups, dtype=np.int64)
    where = np.zeros(num_ranks, dtype=np.int64)
    lowest_empty = 0
    for e in order:
        c_e = count[e]
        add_mean = mean[e] / c_e
        add_var = var[e] / c_e ** 2
        spread = np.sqrt(var[e]) / c_e
        row = cov[e]
        for _ in range(c_e):
            best, best_risk, best_mu, best_var = -1, 1e30, 0.0, 0.0
            stop = 1e30
            while lowest_empty < num_ranks and size[lowest_empty] > 0:
                lowest_empty += 1
            if lowest_empty < num_ranks:
                best, best_mu, best_var = lowest_empty, add_mean, np.float64(dev_var[lowest_empty]) + add_var
                best_risk = best_mu + z * np.sqrt(best_var)
                stop = best_risk + _MARGIN * abs(best_risk)
            for g in range(groups):
                least = add_mean + z * floor[e, g] * spread
                cross = 2.0 * floor[e, g] * spread  # the covariance term is at least this times the rank's std
                for pos in range(length[g] - 1, -1, -1):
                    if list_key[g, pos] + least > stop:
                        break
                    d = lists[g, pos]
                    if stamp[d] == e:
                        continue
                    mu = dev_mu[d] + add_mean
                    room = stop - mu
                    # cheap screen without the covariances: the variance is at least this
                    if room < 0.0 or z * z * (dev_var[d] + add_var + cross * std[d]) > room * room:
                        continue
                    new_var = dev_var[d] + add_var
                    for j in range(size[d]):
                        new_var += 2 * row[members[d, j]] / c_e / count[members[d, j]]
                    risk = mu + z * np.sqrt(new_var)
                    if risk < best_risk or (risk == best_risk and d < best):
                        best, best_risk, best_mu, best_var = d, risk, mu, new_var
                        stop = best_risk + _MARGIN * abs(best_risk)
            if best < 0:
                best, best_mu, best_var = _make_room(e, mean, var, cov, count, members, size, dev_mu, dev_var)
                lowest_empty = 0
                _rebuild(best, cluster, members, size, dev_mu, dev_var, z, std, key, group, lists, list_key, length,
                         where)
            elif group[best] >= 0:
                _remove(lists, list_key, length, where, group[best], where[best])
            members[best, size[best]] = e
            size[best] += 1
            stamp[best] = e
            dev_mu[best] = best_mu
            dev_var[best] = best_var
            std[best] = np.sqrt(max(np.float64(dev_var[best]), 0.0))
            key[best] = dev_mu[best] + z * std[best]
            group[best] = cluster[e] if group[best] == -1 or group[best] == cluster[e] else groups - 1
            if size[best] < slots:
                _insert(lists, list_key, length, where, group[best], best, key[best])


@njit(cache=True)
def _rebuild(best, cluster, members, size, dev_mu, dev_var, z, std, key, group, lists, list_key, length, where):
    """Every rank's score and list after :func:`_make_room` moved an expert; ``best``, which takes the expert being
    placed next, is left out of the lists."""
    num_ranks, slots = members.shape
    mixed = lists.shape[0] - 1
    length[:] = 0
    for d in range(num_ranks):
        std[d] = np.sqrt(max(np.float64(dev_var[d]), 0.0))
        key[d] = dev_mu[d] + z * std[d]
        group[d] = -1
        for j in range(size[d]):
            g = cluster[members[d, j]]
            group[d] = g if group[d] == -1 or group[d] == g else mixed
        if 0 < size[d] < slots and d != best:
            _insert(lists, list_key, length, where, group[d], d, key[d])


@njit(cache=True)
def _insert(lists, list_key, length, where, g, rank, key):
    """Put ``rank`` (own score ``key``) into list ``g`` (key descending, ties by rank descending), keeping ``where``
    up to date."""
    pos = length[g]
    while pos > 0 and (list_key[g, pos - 1] < key or (list_key[g, pos - 1] == key and lists[g, pos - 1] < rank)):
        lists[g, pos], list_key[g, pos] = lists[g, pos - 1], list_key[g, pos - 1]
        where[lists[g, pos]] = pos
        pos -= 1
    lists[g, pos], list_key[g, pos] = rank, key
    where[rank] = pos
    length[g] += 1


@njit(cache=True)
def _remove(lists, list_key, length, where, g, pos):
    length[g] -= 1
    for i in range(pos, length[g]):
        lists[g, i], list_key[g, i] = lists[g, i + 1], list_key[g, i + 1]
        where[lists[g, i]] = i


@njit(cache=True)
def _make_room(e, mean, var, cov, count, members, size, dev_mu, dev_var):
    """Every rank with a free slot holds ``e``: move the expert of a full rank without ``e`` that gives the lowest
    ``mu`` peak of the two ranks to the first rank with a free slot; returns that full rank and ``e``'s ``mu``,
    ``var`` on it. Such an expert exists since the full rank holds ``K`` distinct experts and the free rank fewer."""
    num_ranks, slots = members.shape
    free = 0
    while size[free] == slots:
        free += 1
    best_rank, best_slot, best_peak = -1, -1, 1e300
    for d in range(num_ranks):
        if d == free or _holds(members[d], size[d], e):
            continue
        for j in range(size[d]):
            moved = members[d, j]
            if _holds(members[free], size[free], moved):
                continue
            load = mean[moved] / count[moved]
            peak = max(dev_mu[free] + load, dev_mu[d] - load + mean[e] / count[e])
            if peak < best_peak:
                best_rank, best_slot, best_peak = d, j, peak
    moved = members[best_rank, best_slot]
    members[free, size[free]] = moved
    size[free] += 1
    size[best_rank] -= 1
    members[best_rank, best_slot] = members[best_rank, size[best_rank]]
    for d in (free, best_rank):
        mu, v = 0.0, 0.0
        for j in range(size[d]):
            m = members[d, j]
            mu += mean[m] / count[m]
            v += var[m] / count[m] ** 2
            for i in range(j):
                v += 2 * cov[m, members[d, i]] / count[m] / count[members[d, i]]
        dev_mu[d], dev_var[d] = mu, v
    v = dev_var[best_rank] + var[e] / count[e] ** 2
    for j in range(size[best_rank]):
        v += 2 * cov[e, members[best_rank, j]] / count[e] / count[members[best_rank, j]]
    return best_rank, dev_mu[best_rank] + mean[e] / count[e], v


@njit(cache=True, fastmath=True, nogil=True)
def score(episodes, count, members):
    """Mean over episodes of ``(max rank load * W + 0.01) / (total + 0.01)``, each episode's value a float32.

    Args:
        episodes: float64 ``[S, E]``; count: int32 ``[E]`` replicas (tokens split evenly); members: int64 ``[W, K]``.
    """
    num_episodes = episodes.shape[0]
    num_ranks, slots = members.shape
    values = np.empty(num_episodes, dtype=np.float32)
    for t in range(num_episodes):
        peak = 0.0
        total = 0.0
        for d in range(num_ranks):
            load = 0.0
            for k in range(slots):
                e = members[d, k]
                load += episodes[t, e] / count[e]
            total += load
            peak = max(peak, load)
        values[t] = (peak * num_ranks + 1e-2) / (total + 1e-2)
    return np.mean(values)


def statistics(episodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, unbiased variance and covariance of every expert's series ``[S, E]``, as numpy gives them (0 for a
    single episode)."""
    num_episodes, num_experts = episodes.shape
    mean = np.mean(episodes, axis=0)
    if num_episodes < 2:
        return mean, np.zeros(num_experts), np.zeros((num_experts, num_experts))
    centered = episodes - mean
    return mean, np.sum(centered**2, axis=0) / (num_episodes - 1), (centered.T @ centered) / (num_episodes - 1)


def correlation_floors(var: np.ndarray, cov: np.ndarray, by_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What bounds :func:`lpt`'s scan: experts cut into clusters of neighbours in weight order (``cluster`` int64
    ``[E]``, ``G`` clusters of about 32), and float64 ``[E, G + 1]``: a lower bound of each expert's correlation with
    the other experts of each cluster, then with any other expert; -1 where some is negative. Experts without
    variance are left out (they covary with nothing); the bounds sit slightly below the true minima, for rounding."""
    num_experts = var.shape[0]
    groups = max(1, min(num_experts // 32, 64))
    starts = np.linspace(0, num_experts, groups + 1).astype(np.int64)[:-1]
    cluster = np.empty(num_experts, dtype=np.int64)
    cluster[by_weight] = np.searchsorted(starts, np.arange(num_experts), side="right") - 1
    return cluster, _floors(var, cov, cluster, groups)


@njit(cache=True, nogil=True)
def _floors(var, cov, cluster, groups):
    num_experts = var.shape[0]
    inverse = np.zeros(num_experts)  # 1 / std, 0 for an expert without variance (it covaries with nothing)
    for e in range(num_experts):
        if var[e] > 0.0:
            inverse[e] = 1.0 / np.sqrt(var[e])
    lowest = np.full((num_experts, groups + 1), np.inf)
    for e in range(num_experts):
        if inverse[e] == 0.0:
            continue
        for m in range(num_experts):
            if m == e or inverse[m] == 0.0:
                continue
            value = cov[e, m] * inverse[e] * inverse[m]
            g = cluster[m]
            if value < lowest[e, g]:
                lowest[e, g] = value
        for g in range(groups):
            lowest[e, groups] = min(lowest[e, groups], lowest[e, g])
    out = np.empty_like(lowest)
    for e in range(num_experts):
        for g in range(groups + 1):
            v = lowest[e, g]
            out[e, g] = min(v, 1.0) - 1e-6 if v >= 0 else -1.0
    return out


def flash_tree(episodes: np.ndarray, num_ranks: int, slots: int, z: float, depth: int, width: int
               ) -> tuple[np.ndarray, np.float32]:
    """vllm-ascend's FlashTree on one layer's episodes ``[S, E]`` (see the module docstring): the deployment it
    settles on, int64 ``[W, K]``, and its score."""
    num_experts = episodes.shape[1]
    mean, var, cov = statistics(episodes)
    cov = np.ascontiguousarray(cov)
    by_weight = np.argsort(-(mean + z * np.sqrt(var)))
    cluster, floor = correlation_floors(var, cov, by_weight)
    left = num_ranks * slots - num_experts
    count = np.ones(num_experts, dtype=np.int32)
    members = np.empty((num_ranks, slots), dtype=np.int64)

    seen = {}  # a group's guess is often the previous group's choice: the same counts give the same deployment

    def candidate(counts):
        known = seen.get(counts.tobytes())
        if known is None:
            lpt(mean, var, cov, counts, z, cluster, floor, members)
            known = seen[counts.tobytes()] = score(episodes, counts, members), members.copy()
        return known

    if depth <= 1:
        count += np.bincount(_allotment(mean, var, z, left, num_ranks), minlength=num_experts).astype(np.int32)
        return candidate(count)[::-1]
    size = math.ceil(num_experts / depth)
    best = None
    for node in range(depth - 1):
        group, rest = by_weight[node * size:(node + 1) * size], by_weight[(node + 1) * size:]
        both = by_weight[node * size:]
        guess = int((_allotment(mean[both], var[both], z, left, num_ranks) < group.size).sum())
        group_order = group[_allotment(mean[group], var[group], z, left if group.size else 0, num_ranks)]
        rest_order = rest[_allotment(mean[rest], var[rest], z, left if rest.size else 0, num_ranks)]
        # shares that would give an expert more replicas than ranks (or leave slots empty) are not tried: the
        # reference's deployment breaks on them; if none in reach is left, the nearest possible one is
        low, high = max(0, left - rest.size * (num_ranks - 1)), min(left, group.size * (num_ranks - 1))
        reach = min(max(guess, left - guess), width)
        shares = [guess if step == 0 else guess - (step + 1) // 2 if step % 2 else guess + step // 2
                  for step in range(2 * reach + 1)]  # guess, guess - 1, guess + 1, guess - 2, ...
        shares = [share for share in shares if low <= share <= high] or [min(max(guess, low), high)]
        best = None
        for share in shares:
            trial = count.copy()
            trial[both] = 1
            np.add.at(trial, group_order[:share], 1)
            np.add.at(trial, rest_order[:left - share], 1)
            value, deployment = candidate(trial)
            if best is None or value < best[0]:
                best = (value, deployment, share, trial)
        count = best[3]
        count[rest] = 1
        left -= best[2]
        if left == 0:
            break
    return best[1], best[0]


def plan_layers(episodes: np.ndarray, selected: np.ndarray, num_ranks: int, slots: int, z: float, depth: int,
                width: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`flash_tree` for every selected layer of ``episodes`` ``[L, S, E]``: ``phy2log`` int64 ``[L, W * K]``
    (rows of unselected layers are -1) and the scores float64 ``[L]`` (NaN where unselected). Layers are planned on
    one thread per CPU (the kernels release the interpreter); each layer's result does not depend on the others."""
    num_layers = episodes.shape[0]
    phy2log = np.full((num_layers, num_ranks * slots), -1, dtype=np.int64)
    scores = np.full(num_layers, np.nan)
    layers = np.flatnonzero(selected).tolist()

    def plan(layer):
        return flash_tree(np.ascontiguousarray(episodes[layer]), num_ranks, slots, z, depth, width)

    workers = min(len(layers), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(plan, layers))
    else:
        results = [plan(layer) for layer in layers]
    for layer, (deployment, score_) in zip(layers, results):
        phy2log[layer] = deployment.ravel()
        scores[layer] = score_
    return phy2log, scores
