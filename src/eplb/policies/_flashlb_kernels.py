"""Compiled loops of the FlashLB policy: replica allotment, covariance-aware LPT, per-episode score, FlashTree search.

Everything here works on one layer at a time, on arrays prepared by :mod:`eplb.policies.flashlb`:

- ``xt`` float64 ``[E, S]``: episode loads per expert (expert-major, so one expert's series is contiguous),
- ``mean`` / ``var`` float64 ``[E]`` and ``cov`` float64 ``[E, E]``: their statistics across episodes,
- a deployment ``members`` int64 ``[W, K]``: the logical expert in each local slot of each rank (row-major, so
  ``members.ravel()`` is the layer's ``phy2log``).

A deployment made here never puts two replicas of one expert on a rank, so an expert has at most ``W`` replicas.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from eplb.policies.shared.packing import allot_replicas

# Keeps the per-episode ratio finite for an episode without load (part of the score's definition).
_SCORE_EPS = 0.01


@njit(cache=True)
def sort_by_load(experts, load):
    """Insertion-sort ``experts`` in place by ``load`` descending, ties by lowest id (a stable sort's order).

    Linear on a nearly sorted input, which is what :func:`lpt` gets from one candidate to the next."""
    for i in range(1, experts.shape[0]):
        item = experts[i]
        value = load[item]
        j = i - 1
        while j >= 0 and (load[experts[j]] < value or (load[experts[j]] == value and experts[j] > item)):
            experts[j + 1] = experts[j]
            j -= 1
        experts[j + 1] = item


@njit(cache=True)
def _sort_ranks(ranks, dev_mean):
    """Insertion-sort ``ranks`` in place by ``dev_mean`` ascending, ties by lowest rank."""
    for i in range(1, ranks.shape[0]):
        item = ranks[i]
        value = dev_mean[item]
        j = i - 1
        while j >= 0 and (dev_mean[ranks[j]] > value or (dev_mean[ranks[j]] == value and ranks[j] > item)):
            ranks[j + 1] = ranks[j]
            j -= 1
        ranks[j + 1] = item


@njit(cache=True)
def _first_loaded(open_ranks, start, stop, dev_mean):
    """The first position in ``open_ranks[start:stop]`` (sorted by ``dev_mean`` ascending) whose rank has a load."""
    while start < stop:
        middle = (start + stop) // 2
        if dev_mean[open_ranks[middle]] > 0.0:
            stop = middle
        else:
            start = middle + 1
    return start


@njit(cache=True)
def lpt(mean, var, cov, count, z, experts, members, dev_size, dev_mean, dev_var, dev_cov, stamp):
    """Covariance-aware LPT: deploy ``count[e]`` replicas of every expert onto the ranks, filling ``members``.

    Experts go by ``mean / count`` descending (ties: lowest id); each replica goes to the rank with a free slot that
    does not hold the expert yet and has the lowest ``mu + z * sqrt(var)`` after adding it, where a replica adds
    ``mean_e / c_e`` to ``mu`` and ``var_e / c_e**2 + 2 * sum_{e' on rank} cov(e, e') / (c_e * c_e')`` to ``var``
    (ties: lowest rank). If every rank with a free slot already holds the expert, an expert of another rank is moved
    into a free slot to make room, which always exists because ``count[e] <= W``.

    Args:
        mean, var: float64 ``[E]``; cov: float64 ``[E, E]``; count: int64 ``[E]`` summing to ``W * K``, each in
            ``[1, W]``; z: weight of the standard deviation (>= 0).
        experts: int64 ``[E]``, a permutation of the experts, reordered by replica load (cheap when it already is
            nearly: the FlashTree candidates differ in a few counts).
        members: int64 ``[W, K]``, written.
        dev_size, stamp: int64 ``[W]``; dev_mean, dev_var: float64 ``[W]``; dev_cov: float64 ``[W, E]``: scratch.
    """
    num_ranks, slots = members.shape
    num_experts = mean.shape[0]
    inv_count = 1.0 / count
    sort_by_load(experts, mean * inv_count)
    dev_size[:] = 0
    dev_mean[:] = 0.0
    dev_var[:] = 0.0
    # dev_cov[d, e] = sum over the experts e' on rank d of cov(e, e') / c_e': one row update per replica placed
    # instead of a sum over the rank's experts for every rank looked at.
    dev_cov[:] = 0.0
    stamp[:] = -1  # stamp[d] == e: rank d holds a replica of e (replicas of one expert are placed one after another)
    # Ranks with a free slot by mu ascending (ties: lowest rank). The std term only adds to mu, so a scan in this order
    # stops at the first rank whose mu alone exceeds the best score, with the result of a full scan.
    open_ranks = np.arange(num_ranks)
    num_open = num_ranks
    for e in experts:
        inv_c = inv_count[e]
        add_mean = mean[e] * inv_c
        add_var = var[e] * inv_c * inv_c
        for _ in range(count[e]):
            best = -1
            best_pos = -1
            best_score = np.inf
            pos = 0
            while pos < num_open:
                d = open_ranks[pos]
                if stamp[d] == e:
                    pos += 1
                    continue
                score = dev_mean[d] + add_mean
                if score > best_score:
                    break
                new_var = dev_var[d] + add_var + 2.0 * inv_c * dev_cov[d, e]
                if new_var > 0.0:
                    score += z * np.sqrt(new_var)
                if score < best_score or (score == best_score and d < best):
                    best_score = score
                    best = d
                    best_pos = pos
                # ranks without load (empty, or only experts that never got a token) lead the order and score alike
                # for an expert they do not hold: the first stands for the rest, passed in O(log W)
                pos = _first_loaded(open_ranks, pos + 1, num_open, dev_mean) if dev_mean[d] == 0.0 else pos + 1
            if best < 0:
                best, freed = _make_room(e, add_mean, mean, inv_count, members, dev_size, dev_mean, stamp)
                for d in (best, freed):
                    dev_mean[d] = 0.0
                    dev_cov[d] = 0.0
                    for j in range(dev_size[d]):
                        dev_mean[d] += mean[members[d, j]] * inv_count[members[d, j]]
                        dev_cov[d] += cov[members[d, j]] * inv_count[members[d, j]]
                    dev_var[d] = 0.0
                    for j in range(dev_size[d]):
                        dev_var[d] += dev_cov[d, members[d, j]] * inv_count[members[d, j]]
                num_open = 0
                for d in range(num_ranks):
                    if dev_size[d] < slots:
                        open_ranks[num_open] = d
                        num_open += 1
                _sort_ranks(open_ranks[:num_open], dev_mean)
                for pos in range(num_open):
                    if open_ranks[pos] == best:
                        best_pos = pos
            members[best, dev_size[best]] = e
            dev_size[best] += 1
            dev_mean[best] += add_mean
            dev_var[best] += add_var + 2.0 * inv_c * dev_cov[best, e]
            stamp[best] = e
            if dev_size[best] == slots:  # a full rank is never looked at again
                num_open -= 1
                for pos in range(best_pos, num_open):
                    open_ranks[pos] = open_ranks[pos + 1]
                continue
            value = dev_mean[best]
            while best_pos + 1 < num_open:  # mu only grew: move the rank towards the end
                nxt = open_ranks[best_pos + 1]
                if dev_mean[nxt] > value or (dev_mean[nxt] == value and nxt > best):
                    break
                open_ranks[best_pos] = nxt
                best_pos += 1
            open_ranks[best_pos] = best
            if var[e] > 0.0:  # a constant series has no covariance with anything
                row = dev_cov[best]
                cov_row = cov[e]
                for other in range(num_experts):
                    row[other] += cov_row[other] * inv_c


@njit(cache=True)
def _make_room(e, add_mean, mean, inv_count, members, dev_size, dev_mean, stamp):
    """Free a slot for expert ``e`` on a rank that does not hold it, when every rank with a free slot holds it.

    Moves one expert from a full rank without ``e`` to the first rank with a free slot; such an expert exists because
    the full rank holds ``K`` distinct experts and the free rank fewer than ``K``. Of all such moves, takes the one with
    the lowest resulting peak of ``mu`` over the two ranks.

    Returns:
        ``(rank that now has room for e, rank that received the moved expert)``.
    """
    num_ranks = members.shape[0]
    free = 0
    while dev_size[free] == members.shape[1]:
        free += 1
    best_rank = -1
    best_slot = -1
    best_peak = np.inf
    for d in range(num_ranks):
        if stamp[d] == e or d == free:
            continue
        for j in range(dev_size[d]):
            moved = members[d, j]
            there = False
            for i in range(dev_size[free]):
                if members[free, i] == moved:
                    there = True
            if there:
                continue
            load = mean[moved] * inv_count[moved]
            peak = max(dev_mean[free] + load, dev_mean[d] - load + add_mean)
            if peak < best_peak:
                best_peak = peak
                best_rank = d
                best_slot = j
    moved = members[best_rank, best_slot]
    members[free, dev_size[free]] = moved
    dev_size[free] += 1
    dev_size[best_rank] -= 1
    members[best_rank, best_slot] = members[best_rank, dev_size[best_rank]]
    return best_rank, free


@njit(cache=True)
def episode_score(xt, total, members, inv_count, acc, peak):
    """Mean over episodes ``t`` of ``(max_d load[t, d] * W + 0.01) / (sum_d load[t, d] + 0.01)``, lower is better.

    Args:
        xt: float64 ``[E, S]`` episode loads; total: float64 ``[S]``, all tokens of each episode.
        members: int64 ``[W, K]`` deployment; inv_count: float64 ``[E]``, 1 / replicas (tokens split evenly).
        acc, peak: float64 ``[S]`` scratch.
    """
    num_ranks, slots = members.shape
    episodes = xt.shape[1]
    peak[:] = 0.0
    for d in range(num_ranks):
        acc[:] = 0.0
        for j in range(slots):
            e = members[d, j]
            share = inv_count[e]
            for t in range(episodes):
                acc[t] += xt[e, t] * share
        for t in range(episodes):
            if acc[t] > peak[t]:
                peak[t] = acc[t]
    score = 0.0
    for t in range(episodes):
        score += (peak[t] * num_ranks + _SCORE_EPS) / (total[t] + _SCORE_EPS)
    return score / episodes


@njit(cache=True)
def flash_tree(xt, total, mean, var, cov, z, depth, width, best_members):
    """FlashTree search of one layer: replica counts by groups of experts, each candidate deployed by :func:`lpt` and
    judged by :func:`episode_score`; the best deployment is written to ``best_members`` (int64 ``[W, K]``).

    Experts sorted by ``mean + z * std`` descending are cut into ``depth`` groups (sizes as ``numpy.array_split``).
    For each group but the last, the greedy allotment of the remaining extra replicas over this group and the later
    ones gives a guess of this group's share; the shares within ``width`` of the guess are tried (this group's share
    spread greedily inside it, the rest greedily over the later groups), and the best fixes this group's counts.

    Returns:
        The best score.
    """
    num_ranks, slots = best_members.shape
    num_experts = mean.shape[0]
    episodes = xt.shape[1]
    weight = mean + z * np.sqrt(var)
    by_weight = np.arange(num_experts)
    sort_by_load(by_weight, weight)
    group_of = np.empty(num_experts, dtype=np.int64)
    base, larger = divmod(num_experts, depth)
    start = 0
    for g in range(depth):
        size = base + (1 if g < larger else 0)
        for i in range(start, start + size):
            group_of[by_weight[i]] = g
        start += size

    count = np.ones(num_experts, dtype=np.int64)
    best_count = np.zeros(num_experts, dtype=np.int64)
    experts = by_weight.copy()  # nearly in LPT order already
    members = np.empty((num_ranks, slots), dtype=np.int64)
    dev_size = np.empty(num_ranks, dtype=np.int64)
    stamp = np.empty(num_ranks, dtype=np.int64)
    dev_mean = np.empty(num_ranks)
    dev_var = np.empty(num_ranks)
    dev_cov = np.empty((num_ranks, num_experts))
    acc = np.empty(episodes)
    peak = np.empty(episodes)
    best_score = np.inf
    remaining = num_ranks * slots - num_experts
    spare = num_ranks - 1  # extra replicas one expert can take
    for g in range(depth - 1):
        in_group = group_of == g
        in_rest = group_of > g
        group_size = in_group.sum()
        if group_size == 0:
            continue
        guess_order = allot_replicas(weight, group_of >= g, remaining, num_ranks)
        guess = 0
        for e in guess_order:
            if in_group[e]:
                guess += 1
        low = max(0, guess - width, remaining - in_rest.sum() * spare)
        high = min(remaining, guess + width, group_size * spare)
        group_order = allot_replicas(weight, in_group, high, num_ranks)
        rest_order = allot_replicas(weight, in_rest, remaining - low, num_ranks)
        group_best = np.inf
        group_share = guess
        for i in range(high - low + 2):
            # the guess first, so that it wins ties
            share = guess if i == 0 else low + i - 1
            if i > 0 and share == guess:
                continue
            for e in range(num_experts):
                if group_of[e] >= g:
                    count[e] = 1
            for j in range(share):
                count[group_order[j]] += 1
            for j in range(remaining - share):
                count[rest_order[j]] += 1
            if np.array_equal(count, best_count):  # a group's guess repeats the previous group's choice
                score = best_score
            else:
                lpt(mean, var, cov, count, z, experts, members, dev_size, dev_mean, dev_var, dev_cov, stamp)
                score = episode_score(xt, total, members, 1.0 / count, acc, peak)
            if score < group_best:
                group_best = score
                group_share = share
            if score < best_score:
                best_score = score
                best_members[:] = members
                best_count[:] = count
        for e in range(num_experts):
            if in_group[e]:
                count[e] = 1
        for j in range(group_share):
            count[group_order[j]] += 1
        remaining -= group_share
    if best_score == np.inf:  # depth 1: the plain greedy allotment
        for e in allot_replicas(weight, group_of >= 0, remaining, num_ranks):
            count[e] += 1
        lpt(mean, var, cov, count, z, experts, best_members, dev_size, dev_mean, dev_var, dev_cov, stamp)
        best_score = episode_score(xt, total, best_members, 1.0 / count, acc, peak)
    return best_score


@njit(cache=True, fastmath={"reassoc", "contract"})
def episode_statistics(xt, mean, var, cov):
    """Mean, unbiased variance and covariance of every expert's episode load (0 for a single episode).

    Args:
        xt: float64 ``[E, S]``.
        mean, var: float64 ``[E]``, written; cov: float64 ``[E, E]``, written.
    """
    num_experts, episodes = xt.shape
    centered = np.empty((num_experts, episodes))
    for e in range(num_experts):
        mean[e] = xt[e].sum() / episodes
        centered[e] = xt[e] - mean[e]
    if episodes < 2:
        var[:] = 0.0
        cov[:] = 0.0
        return
    for a in range(num_experts):
        for b in range(a, num_experts):
            value = 0.0
            for t in range(episodes):
                value += centered[a, t] * centered[b, t]
            value /= episodes - 1
            cov[a, b] = value
            cov[b, a] = value
        var[a] = cov[a, a]


@njit(cache=True)
def plan_layers(xt, total, selected, num_ranks, slots, z, depth, width):
    """:func:`flash_tree` for every selected layer, on the statistics of its episodes.

    Args:
        xt: float64 ``[L, E, S]`` episode loads; total: float64 ``[L, S]``, their sum over experts; selected: bool
            ``[L]``; the rest as in :func:`flash_tree`.

    Returns:
        ``phy2log`` int64 ``[L, W * K]`` (rows of unselected layers are -1) and the score float64 ``[L]`` (NaN for
        unselected layers).
    """
    num_layers, num_experts, _ = xt.shape
    phy2log = np.full((num_layers, num_ranks * slots), -1, dtype=np.int64)
    scores = np.full(num_layers, np.nan)
    mean = np.empty(num_experts)
    var = np.empty(num_experts)
    cov = np.empty((num_experts, num_experts))
    members = np.empty((num_ranks, slots), dtype=np.int64)
    for layer in range(num_layers):
        if not selected[layer]:
            continue
        episode_statistics(xt[layer], mean, var, cov)
        scores[layer] = flash_tree(xt[layer], total[layer], mean, var, cov, z, depth, width, members)
        phy2log[layer] = members.ravel()
    return phy2log, scores


@njit(cache=True)
def score_layers(xt, total, phy2log, num_ranks):
    """:func:`episode_score` of a given placement, every layer: ``phy2log`` int64 ``[L, P]`` -> float64 ``[L]``."""
    num_layers, num_experts, episodes = xt.shape
    slots = phy2log.shape[1] // num_ranks
    scores = np.empty(num_layers)
    acc = np.empty(episodes)
    peak = np.empty(episodes)
    for layer in range(num_layers):
        count = np.zeros(num_experts)
        for p in range(phy2log.shape[1]):
            count[phy2log[layer, p]] += 1.0
        members = phy2log[layer].reshape(num_ranks, slots)
        scores[layer] = episode_score(xt[layer], total[layer], members, 1.0 / count, acc, peak)
    return scores
