"""Compiled local search of the ``auto`` policy (:mod:`eplb.policies.auto`).

One layer is a table ``[W, K]`` of experts (slot ``k`` of rank ``w``; no expert twice on a rank) scored on episode
loads ``x`` ``[S, E]`` with episode weights ``w`` ``[S]``: the objective is ``sum_s w_s * max_r load[s, r]``, where
each replica of an expert with ``c`` replicas is charged ``x[s, e] * share(c)``: ``1 / c`` under an even split
(``liquid = 1``). Under per-batch balanced dispatch a replicated expert's tokens go wherever there is room, so its
replicas are charged less (``liquid / c`` with ``liquid < 1``) and a single-replica expert, which cannot move,
fully. Two moves:

- swap: two slots on different ranks exchange experts (2 slots move, replica counts unchanged);
- reassign: one slot of an expert with >= 2 replicas takes another expert (1 slot moves, one replica changes hands).

Every change is linear in the two experts' loads: affected rank ``r`` gains ``alpha_r * x[s, a] + beta_r * x[s, b]``,
so a candidate is scored exactly over all episodes from the per-episode busiest rank loads (the busiest rank outside
the affected ones) without rebuilding the loads. Candidates are screened first, in O(1) each, on the mean over the
episodes in which the hot rank is the busiest (they must lower it there without lifting an affected rank above
it); the best screened ones are scored exactly and the one with the largest gain net of its move cost is applied,
until nothing pays. Layers are independent and run in parallel (:func:`search_layers`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# candidates scored exactly per hot rank, after screening on the mean load
_EXACT = 48
# hot ranks tried per step before the search stops
_HOT_RANKS = 4
# the most candidates scored exactly in a step, counting those tied with the _EXACT-th best
_SCORED = 256
# busiest ranks kept per episode: a move rarely touches them all, so its gain needs no scan of the others
_TOP = 8


@njit(cache=True)
def share(count, liquid):
    """Fraction of an expert's load one of its ``count`` replicas is charged with (see the module docstring)."""
    return 1.0 if count == 1 else liquid / count


@njit(cache=True)
def rank_loads(x, table, counts, liquid):
    """float64 ``[S, W]``: load charged to every rank in every episode."""
    num_episodes = x.shape[0]
    num_ranks, slots = table.shape
    out = np.zeros((num_episodes, num_ranks))
    for s in range(num_episodes):  # episode by episode: x[s] stays in cache
        for r in range(num_ranks):
            for k in range(slots):
                e = table[r, k]
                out[s, r] += x[s, e] * share(counts[e], liquid)
    return out


@njit(cache=True)
def objective(x, weight, table, counts, liquid):
    """``sum_s weight[s] * max_r load[s, r]``."""
    loads = rank_loads(x, table, counts, liquid)
    total = 0.0
    for s in range(x.shape[0]):
        total += weight[s] * loads[s].max()
    return total


@njit(cache=True)
def _top(loads, top, arg):
    """The ``_TOP`` busiest ranks of every episode, busiest first (ties: the lower rank first): what
    :func:`_gain` reads the busiest unaffected rank from without a scan."""
    num_episodes, num_ranks = loads.shape
    width = top.shape[1]
    for s in range(num_episodes):
        for k in range(width):
            top[s, k] = -np.inf
            arg[s, k] = -1
        for r in range(num_ranks):
            v = loads[s, r]
            if v <= top[s, width - 1]:
                continue
            k = width - 1
            while k > 0 and v > top[s, k - 1]:
                top[s, k], arg[s, k] = top[s, k - 1], arg[s, k - 1]
                k -= 1
            top[s, k], arg[s, k] = v, r


@njit(cache=True)
def _in(values, n, value):
    for i in range(n):
        if values[i] == value:
            return True
    return False


@njit(cache=True)
def _gain(x, weight, loads, top, arg, a, b, aff, alpha, beta, n):
    """Decrease of the objective when affected ranks ``aff[:n]`` gain ``alpha * x[:, a] + beta * x[:, b]``."""
    gain = 0.0
    for s in range(x.shape[0]):
        rest = -np.inf
        found = False
        for k in range(top.shape[1]):
            if arg[s, k] >= 0 and not _in(aff, n, arg[s, k]):
                rest = top[s, k]
                found = True
                break
        if not found:  # the busiest ranks are all affected: scan the others
            for r in range(loads.shape[1]):
                if not _in(aff, n, r) and loads[s, r] > rest:
                    rest = loads[s, r]
        peak = rest
        xa = x[s, a]
        xb = x[s, b] if b >= 0 else 0.0
        for i in range(n):
            v = loads[s, aff[i]] + alpha[i] * xa + beta[i] * xb
            if v > peak:
                peak = v
        gain += weight[s] * (top[s, 0] - peak)
    return gain


@njit(cache=True)
def _reassign_terms(holders, counts, a_old, a_new, rank, aff, alpha, beta, liquid):
    """Affected ranks of "slot on ``rank``: ``a_old`` -> ``a_new``" and their coefficients on x[a_old], x[a_new]."""
    n = 0
    c_old, c_new = counts[a_old], counts[a_new]
    for i in range(c_old):
        r = holders[a_old, i]
        aff[n] = r
        alpha[n] = -share(c_old, liquid) if r == rank else share(c_old - 1, liquid) - share(c_old, liquid)
        beta[n] = share(c_new + 1, liquid) if r == rank else 0.0
        n += 1
    for i in range(c_new):
        aff[n] = holders[a_new, i]
        alpha[n] = 0.0
        beta[n] = share(c_new + 1, liquid) - share(c_new, liquid)
        n += 1
    return n


@njit(cache=True)
def local_search(x, weight, table, original, counts, move_cost, budget, max_steps, liquid):
    """Improve ``table`` ``[W, K]`` in place (and ``counts`` ``[E]``) on the episode objective.

    Each step looks at the busiest ranks in turn (by the weight of the episodes they are the busiest in): screens
    every swap and reassignment that would lower that rank's mean load there (:func:`_candidates`), scores the
    most promising exactly on every episode (:func:`_best_candidate`) and applies the best one whose gain beats its
    move cost; the search stops when no busy rank has such a move.

    Args:
        x: float64 ``[S, E]`` episode loads; weight: float64 ``[S]``.
        table: int64 ``[W, K]``, the starting placement (no expert twice on a rank).
        original: int64 ``[W, K]``, the placement in force: moved slots are counted against it.
        counts: int64 ``[E]`` replica counts of ``table``.
        move_cost: objective units a moved slot must gain.
        budget: at most this many slots differ from ``original`` at the end (a move back frees budget).
        max_steps: at most this many applied moves.
        liquid: charge of a replicated expert's replicas (1: even split; below 1: balanced dispatch).

    Returns:
        (objective, moved slots vs ``original``, search steps taken).
    """
    num_episodes, num_experts = x.shape
    num_ranks, slots = table.shape
    holders, has = _index(table, num_experts)
    moved = 0
    for r in range(num_ranks):
        for k in range(slots):
            if table[r, k] != original[r, k]:
                moved += 1
    loads = rank_loads(x, table, counts, liquid)
    top = np.empty((num_episodes, _TOP))
    arg = np.empty((num_episodes, _TOP), dtype=np.int64)
    _top(loads, top, arg)
    mean_load = np.zeros(num_ranks)
    mean_x = np.zeros(num_experts)
    hot = np.zeros(num_ranks)
    aff = np.empty(2 * num_ranks + 2, dtype=np.int64)
    alpha = np.empty(2 * num_ranks + 2)
    beta = np.empty(2 * num_ranks + 2)
    cap = 2 * slots * slots * num_ranks + slots * num_experts + 8
    # candidate moves: kind (0 swap, 1 reassign), r1, k1, r2, k2 (swap: slot on r2; reassign: the new expert)
    cand = np.empty((cap, 5), dtype=np.int64)
    cand_score = np.empty(cap)
    up_first = np.empty(num_experts)
    up_second = np.empty(num_experts)
    up_rank = np.empty(num_experts, dtype=np.int64)
    grow_peak = np.empty(slots)
    steps = 0
    while steps < max_steps:
        steps += 1
        hot[:] = 0.0
        for s in range(num_episodes):
            hot[arg[s, 0]] += weight[s]
        order = np.argsort(-hot, kind="mergesort")
        applied = False
        for attempt in range(min(_HOT_RANKS, num_ranks)):
            hot_rank = order[attempt]
            if hot[hot_rank] <= 0:
                break
            level = _busiest_means(x, weight, loads, arg, hot_rank, mean_load, mean_x)
            _screening_terms(table, holders, counts, mean_load, mean_x, hot_rank, liquid, up_first, up_second,
                             up_rank, grow_peak)
            m = _candidates(table, has, counts, mean_load, mean_x, hot_rank, level, liquid, up_first, up_second,
                            up_rank, grow_peak, cand, cand_score)
            if m == 0:
                continue
            best, best_moved = _best_candidate(x, weight, loads, top, arg, table, original, holders, counts, cand,
                                               cand_score, m, moved, budget, move_cost, liquid, aff, alpha, beta)
            if best < 0:
                continue
            kind, r1, k1, r2, k2 = cand[best]
            if kind == 0:
                _apply_swap(x, loads, table, has, holders, counts, r1, k1, r2, k2, liquid)
            else:
                _apply_reassign(x, loads, table, has, holders, counts, r1, k1, k2, liquid, aff, alpha, beta)
            moved += best_moved
            _top(loads, top, arg)
            applied = True
            break
        if not applied:
            break
    total = 0.0
    for s in range(num_episodes):
        total += weight[s] * top[s, 0]
    return total, moved, steps


@njit(cache=True)
def _busiest_means(x, weight, loads, arg, hot_rank, mean_load, mean_x):
    """Fill ``mean_load`` ``[W]`` and ``mean_x`` ``[E]`` with the weighted means over the episodes in which
    ``hot_rank`` is the busiest rank (what the screening works on); returns ``hot_rank``'s mean load there."""
    num_episodes, num_experts = x.shape
    num_ranks = loads.shape[1]
    total_weight = 0.0
    mean_load[:] = 0.0
    mean_x[:] = 0.0
    for s in range(num_episodes):
        if arg[s, 0] == hot_rank:
            total_weight += weight[s]
            for r in range(num_ranks):
                mean_load[r] += weight[s] * loads[s, r]
            for e in range(num_experts):
                mean_x[e] += weight[s] * x[s, e]
    mean_load /= total_weight
    mean_x /= total_weight
    return mean_load[hot_rank]


@njit(cache=True)
def _screening_terms(table, holders, counts, mean_load, mean_x, hot_rank, liquid, up_first, up_second, up_rank,
                     grow_peak):
    """The terms the screening of :func:`_candidates` needs: an expert losing a replica lifts its other holders
    (``up_first`` / ``up_second``: the busiest two after the lift, ``up_rank`` the busiest one's rank, so the holder
    giving up the slot can be left out); one of the hot rank's experts gaining a replica lowers its holders
    (``grow_peak[k]``: their busiest after the drop, for the expert in the hot rank's slot ``k``)."""
    num_experts = mean_x.shape[0]
    slots = table.shape[1]
    for e in range(num_experts):
        up_first[e], up_second[e], up_rank[e] = -np.inf, -np.inf, -1
        if counts[e] < 2:
            continue
        lift = mean_x[e] * (share(counts[e] - 1, liquid) - share(counts[e], liquid))
        for i in range(counts[e]):
            v = mean_load[holders[e, i]] + lift
            if v > up_first[e]:
                up_second[e] = up_first[e]
                up_first[e], up_rank[e] = v, holders[e, i]
            elif v > up_second[e]:
                up_second[e] = v
    for k1 in range(slots):
        a = table[hot_rank, k1]
        grow_peak[k1] = -np.inf
        drop = mean_x[a] * (share(counts[a] + 1, liquid) - share(counts[a], liquid))
        for i in range(counts[a]):
            grow_peak[k1] = max(grow_peak[k1], mean_load[holders[a, i]] + drop)


@njit(cache=True)
def _candidates(table, has, counts, mean_load, mean_x, hot_rank, level, liquid, up_first, up_second, up_rank,
                grow_peak, cand, cand_score):
    """Screen every move that lowers the hot rank below ``level`` on the means: a swap of one of its experts with
    another rank's, one more replica of one of its experts in a slot whose expert has replicas to spare, or one of
    its spare replicas taking another expert. Fills ``cand`` ``[m, 5]`` and ``cand_score`` ``[m]`` (how far below
    ``level`` the screened peak is); returns ``m``."""
    num_experts = mean_x.shape[0]
    num_ranks, slots = table.shape
    m = 0
    for k1 in range(slots):
        a = table[hot_rank, k1]
        for r2 in range(num_ranks):
            if r2 == hot_rank:
                continue
            if not has[r2, a]:
                # swap a (hot rank) with b (rank r2)
                for k2 in range(slots):
                    b = table[r2, k2]
                    if has[hot_rank, b]:
                        continue
                    d = mean_x[b] * share(counts[b], liquid) - mean_x[a] * share(counts[a], liquid)
                    peak = max(level + d, mean_load[r2] - d)
                    if peak < level:
                        cand[m, 0], cand[m, 1], cand[m, 2], cand[m, 3], cand[m, 4] = 0, hot_rank, k1, r2, k2
                        cand_score[m] = level - peak
                        m += 1
                # one more replica of a, in a slot of r2 whose expert has replicas to spare
                for k2 in range(slots):
                    old = table[r2, k2]
                    if counts[old] < 2 or old == a:
                        continue
                    peak = max(grow_peak[k1], up_first[old] if up_rank[old] != r2 else up_second[old],
                               mean_load[r2] - mean_x[old] * share(counts[old], liquid)
                               + mean_x[a] * share(counts[a] + 1, liquid))
                    if peak < level:
                        cand[m, 0], cand[m, 1], cand[m, 2], cand[m, 3], cand[m, 4] = 1, r2, k2, -1, a
                        cand_score[m] = level - peak
                        m += 1
        # a replica of the hot rank that can be spared takes another expert
        if counts[a] >= 2:
            for b in range(num_experts):
                if has[hot_rank, b]:
                    continue
                # b's other holders only get lighter
                peak = max(up_first[a] if up_rank[a] != hot_rank else up_second[a],
                           level - mean_x[a] * share(counts[a], liquid)
                           + mean_x[b] * share(counts[b] + 1, liquid))
                if peak < level:
                    cand[m, 0], cand[m, 1], cand[m, 2], cand[m, 3], cand[m, 4] = 1, hot_rank, k1, -1, b
                    cand_score[m] = level - peak
                    m += 1
    return m


@njit(cache=True)
def _best_candidate(x, weight, loads, top, arg, table, original, holders, counts, cand, cand_score, m, moved,
                    budget, move_cost, liquid, aff, alpha, beta):
    """Score the ``_EXACT`` best-screened candidates exactly on every episode; returns ``(index, slots it moves)``
    of the one with the largest gain net of its move cost within the move ``budget`` (index -1: none gains)."""
    cut = -np.inf if m <= _EXACT else np.partition(-cand_score[:m], _EXACT - 1)[_EXACT - 1]
    # candidates tied at the cut fill the places left, in order, up to _SCORED in all: at a thousand ranks thousands
    # of cold experts can tie, and scoring them all costs tens of milliseconds a step
    ties = _SCORED
    for c in range(m):
        if -cand_score[c] < cut:
            ties -= 1
    best, best_net, best_moved = -1, 0.0, 0
    for c in range(m):
        if -cand_score[c] > cut:
            continue
        if -cand_score[c] == cut:
            if ties <= 0:
                continue
            ties -= 1
        r1, k1 = cand[c, 1], cand[c, 2]
        if cand[c, 0] == 0:
            r2, k2 = cand[c, 3], cand[c, 4]
            a, b = table[r1, k1], table[r2, k2]
            aff[0], aff[1] = r1, r2
            alpha[0], beta[0] = -share(counts[a], liquid), share(counts[b], liquid)
            alpha[1], beta[1] = share(counts[a], liquid), -share(counts[b], liquid)
            n = 2
            delta = (int(b != original[r1, k1]) - int(a != original[r1, k1])
                     + int(a != original[r2, k2]) - int(b != original[r2, k2]))
        else:
            a, b = table[r1, k1], cand[c, 4]
            n = _reassign_terms(holders, counts, a, b, r1, aff, alpha, beta, liquid)
            delta = int(b != original[r1, k1]) - int(a != original[r1, k1])
        if moved + delta > budget:
            continue
        net = _gain(x, weight, loads, top, arg, a, b, aff, alpha, beta, n) - move_cost * delta
        if net > best_net:
            best, best_net, best_moved = c, net, delta
    return best, best_moved


@njit(cache=True)
def _index(table, num_experts):
    """``holders`` int64 ``[E, W]`` (the ranks holding each expert, first ``counts[e]`` valid) and ``has`` bool
    ``[W, E]``."""
    num_ranks, slots = table.shape
    holders = np.empty((num_experts, num_ranks), dtype=np.int64)  # only the first counts[e] of a row are read
    has = np.zeros((num_ranks, num_experts), dtype=np.bool_)
    filled = np.zeros(num_experts, dtype=np.int64)
    for r in range(num_ranks):
        for k in range(slots):
            e = table[r, k]
            holders[e, filled[e]] = r
            filled[e] += 1
            has[r, e] = True
    return holders, has


@njit(cache=True)
def _apply_swap(x, loads, table, has, holders, counts, r1, k1, r2, k2, liquid):
    a, b = table[r1, k1], table[r2, k2]
    for s in range(x.shape[0]):
        d = x[s, b] * share(counts[b], liquid) - x[s, a] * share(counts[a], liquid)
        loads[s, r1] += d
        loads[s, r2] -= d
    table[r1, k1], table[r2, k2] = b, a
    has[r1, a], has[r1, b], has[r2, b], has[r2, a] = False, True, False, True
    for i in range(counts[a]):
        if holders[a, i] == r1:
            holders[a, i] = r2
    for i in range(counts[b]):
        if holders[b, i] == r2:
            holders[b, i] = r1


@njit(cache=True)
def _apply_reassign(x, loads, table, has, holders, counts, r1, k1, b, liquid, aff, alpha, beta):
    a = table[r1, k1]
    n = _reassign_terms(holders, counts, a, b, r1, aff, alpha, beta, liquid)
    for i in range(n):
        for s in range(x.shape[0]):
            loads[s, aff[i]] += alpha[i] * x[s, a] + beta[i] * x[s, b]
    table[r1, k1] = b
    has[r1, a], has[r1, b] = False, True
    for i in range(counts[a]):
        if holders[a, i] == r1:
            holders[a, i] = holders[a, counts[a] - 1]
    counts[a] -= 1
    holders[b, counts[b]] = r1
    counts[b] += 1


@njit(cache=True, parallel=True)
def search_layers(x, weight, tables, originals, move_cost, budget, max_steps, liquid, active):
    """:func:`local_search` on every ``active`` layer (in parallel): ``x`` ``[L, S, E]``, ``tables`` and
    ``originals`` ``[L, W, K]``, ``move_cost`` and ``budget`` ``[L]``. Improves ``tables`` in place; returns the objectives
    ``[L]`` (inf for inactive layers)."""
    num_layers, _, num_experts = x.shape
    out = np.full(num_layers, np.inf)
    for layer in prange(num_layers):
        if not active[layer]:
            continue
        counts = np.zeros(num_experts, dtype=np.int64)
        for e in tables[layer].ravel():
            counts[e] += 1
        value, _, _ = local_search(x[layer], weight, tables[layer], originals[layer], counts, move_cost[layer],
                                   budget[layer], max_steps, liquid)
        out[layer] = value
    return out
