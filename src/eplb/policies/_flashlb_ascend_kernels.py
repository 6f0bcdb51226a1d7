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

Differences that remain (docs/peers.md): no expert gets more than ``W`` replicas (the reference has no cap, and its
deployment then breaks: the shares that would need it are not tried), and when every rank with a free slot holds the
expert, one expert is moved to make room (the reference has no way out). Neither happens while the experts' loads
leave every expert at most ``W`` replicas, as in every case checked against the reference.
"""

from __future__ import annotations

import heapq
import math

import numpy as np
from numba import njit

# Relative slack of the scan's stopping bound: the bound holds for exact variances, the stored ones are float32.
_MARGIN = 1e-5


@njit(cache=True, fastmath=True)
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


@njit(cache=True, fastmath=True)
def lpt(mean, var, cov, count, z, floor, members):
    """Deploy ``count[e]`` replicas of every expert onto ``members`` (int64 ``[W, K]``, written): experts by
    ``mean / count`` descending, each replica to the rank with a free slot not holding the expert whose
    ``mu + z * sqrt(var)`` after adding it is lowest (ties: the lowest rank), where a replica adds ``mean_e / c_e``
    to ``mu`` and ``var_e / c_e**2 + 2 * cov(e, e') / (c_e * c_e')`` for each ``e'`` on the rank to ``var``; ``mu``
    and ``var`` are stored in float32. The result is that of scanning every rank.

    The scan visits the ranks with a free slot by their own score ``mu + z * sqrt(var)`` and stops where no rank
    left can win: when ``corr(e, e') >= floor[e]`` for every other expert (``floor[e] = -1`` when some is negative),
    a replica of ``e`` (std ``s``) added to a rank raises its score by at least ``mean_e / c_e + z * floor[e] * s``:
    the covariance of the rank's sum with the replica is at least ``floor[e]`` times the product of their stds, and
    ``sqrt(v + 2 rho sqrt(v) s + s**2) - sqrt(v) >= rho * s``. Empty ranks score alike, so the lowest stands for all.
    When every rank with a free slot holds the expert, an expert is moved to make room (:func:`_make_room`).
    """
    num_ranks, slots = members.shape
    order = np.argsort(-(mean / count))
    dev_mu = np.zeros(num_ranks, dtype=np.float32)
    dev_var = np.zeros(num_ranks, dtype=np.float32)
    key = np.zeros(num_ranks)  # each rank's own score, from its stored mu and var
    size = np.zeros(num_ranks, dtype=np.int64)
    ranks = np.arange(num_ranks)  # ranks with a free slot by key ascending, ties by rank
    num_open = num_ranks
    for e in order:
        add_mean = mean[e] / count[e]
        least = add_mean + z * floor[e] * (np.sqrt(var[e]) / count[e])
        for _ in range(count[e]):
            best, best_pos, best_risk, best_mu, best_var = -1, -1, 1e30, 0.0, 0.0
            pos = 0
            while pos < num_open:
                d = ranks[pos]
                if key[d] + least > best_risk + _MARGIN * abs(best_risk):
                    break
                mu = dev_mu[d] + add_mean
                if mu <= best_risk and not _holds(members[d], size[d], e):
                    new_var = dev_var[d] + var[e] / count[e] ** 2
                    for j in range(size[d]):
                        new_var += 2 * cov[e, members[d, j]] / count[e] / count[members[d, j]]
                    risk = mu + z * np.sqrt(new_var)
                    if risk < best_risk or (risk == best_risk and d < best):
                        best, best_pos, best_risk, best_mu, best_var = d, pos, risk, mu, new_var
                # empty ranks lead the order and score alike: the first stands for the rest, passed in O(log W)
                pos = _first_loaded(ranks, pos + 1, num_open, size) if size[d] == 0 else pos + 1
            if best < 0:
                best, best_mu, best_var = _make_room(e, mean, var, cov, count, members, size, dev_mu, dev_var)
                for d in range(num_ranks):
                    key[d] = dev_mu[d] + z * np.sqrt(max(np.float64(dev_var[d]), 0.0))
                num_open = 0
                for d in range(num_ranks):
                    if size[d] < slots:
                        ranks[num_open] = d
                        num_open += 1
                _sort_open(ranks[:num_open], key)
                for pos in range(num_open):
                    if ranks[pos] == best:
                        best_pos = pos
            members[best, size[best]] = e
            size[best] += 1
            dev_mu[best] = best_mu
            dev_var[best] = best_var
            key[best] = dev_mu[best] + z * np.sqrt(max(np.float64(dev_var[best]), 0.0))
            if size[best] == slots:  # a full rank leaves the scan
                num_open -= 1
                for pos in range(best_pos, num_open):
                    ranks[pos] = ranks[pos + 1]
                continue
            _reposition(ranks, num_open, best_pos, key)


@njit(cache=True)
def _reposition(ranks, num_open, pos, key):
    """Move ``ranks[pos]``, whose key changed, to its place in the order (key ascending, ties by rank)."""
    rank = ranks[pos]
    while pos + 1 < num_open and (key[ranks[pos + 1]] < key[rank]
                                  or (key[ranks[pos + 1]] == key[rank] and ranks[pos + 1] < rank)):
        ranks[pos] = ranks[pos + 1]
        pos += 1
    while pos > 0 and (key[ranks[pos - 1]] > key[rank] or (key[ranks[pos - 1]] == key[rank] and ranks[pos - 1] > rank)):
        ranks[pos] = ranks[pos - 1]
        pos -= 1
    ranks[pos] = rank


@njit(cache=True)
def _first_loaded(ranks, start, stop, size):
    """The first position in ``ranks[start:stop]`` (empty ranks first) whose rank holds an expert."""
    while start < stop:
        middle = (start + stop) // 2
        if size[ranks[middle]] > 0:
            stop = middle
        else:
            start = middle + 1
    return start


@njit(cache=True)
def _sort_open(ranks, key):
    """Insertion-sort ``ranks`` by ``key`` ascending, ties by rank."""
    for i in range(1, ranks.shape[0]):
        item = ranks[i]
        j = i - 1
        while j >= 0 and (key[ranks[j]] > key[item] or (key[ranks[j]] == key[item] and ranks[j] > item)):
            ranks[j + 1] = ranks[j]
            j -= 1
        ranks[j + 1] = item


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


@njit(cache=True, fastmath=True)
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


def correlation_floor(var: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """float64 ``[E]``: a lower bound of every expert's correlation with any other (experts without variance left
    out, as they covary with nothing), or -1 where one is negative: what bounds :func:`lpt`'s scan. Slightly below
    the true minimum, for rounding."""
    std = np.sqrt(np.maximum(var, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = cov / np.outer(std, std)
    corr[~np.isfinite(corr)] = np.inf
    np.fill_diagonal(corr, np.inf)
    lowest = corr.min(axis=1, initial=np.inf)
    return np.where(lowest >= 0, np.minimum(lowest, 1.0) - 1e-6, -1.0)


def flash_tree(episodes: np.ndarray, num_ranks: int, slots: int, z: float, depth: int, width: int
               ) -> tuple[np.ndarray, np.float32]:
    """vllm-ascend's FlashTree on one layer's episodes ``[S, E]`` (see the module docstring): the deployment it
    settles on, int64 ``[W, K]``, and its score."""
    num_experts = episodes.shape[1]
    mean, var, cov = statistics(episodes)
    cov = np.ascontiguousarray(cov)
    floor = correlation_floor(var, cov)
    by_weight = np.argsort(-(mean + z * np.sqrt(var)))
    left = num_ranks * slots - num_experts
    count = np.ones(num_experts, dtype=np.int32)
    members = np.empty((num_ranks, slots), dtype=np.int64)

    def candidate(counts):
        lpt(mean, var, cov, counts, z, floor, members)
        return score(episodes, counts, members), members.copy()

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
    (rows of unselected layers are -1) and the scores float64 ``[L]`` (NaN where unselected)."""
    num_layers = episodes.shape[0]
    phy2log = np.full((num_layers, num_ranks * slots), -1, dtype=np.int64)
    scores = np.full(num_layers, np.nan)
    for layer in np.flatnonzero(selected):
        deployment, scores[layer] = flash_tree(np.ascontiguousarray(episodes[layer]), num_ranks, slots, z, depth,
                                               width)
        phy2log[layer] = deployment.ravel()
    return phy2log, scores
