"""Scoring a simulated run: which placement row each layer uses in each step (:class:`Timeline`) and the rank loads,
PAR, peaks and window sums of every step under the dispatch rule (:func:`score`)."""

from __future__ import annotations

import numpy as np
from numba import njit

from eplb.dispatch import balanced_rank_load, dispatch_share, replica_ranks
from eplb.placement import Placement
from eplb.topology import Topology

__all__ = ["Timeline", "score"]

_BALANCED_ROWS = 8192  # rows per call of the balanced split, to bound its temporary arrays


class Timeline:
    """Which placement row each layer uses in each step: versions of rows, and the version in force per step."""

    def __init__(self, initial: np.ndarray, num_steps: int):
        num_layers = initial.shape[0]
        self.current = np.array(initial, dtype=np.int64)
        self.rows: list[list[np.ndarray]] = [[initial[layer].copy()] for layer in range(num_layers)]
        self.changes: list[list[int]] = [[0] for _ in range(num_layers)]  # first step of each version
        self.num_steps = num_steps

    def apply(self, effective: int, layers, new_rows: np.ndarray) -> None:
        for layer, row in zip(layers, new_rows):
            self.current[layer] = row
            if effective >= self.num_steps:
                continue
            if self.changes[layer][-1] == effective:
                self.rows[layer][-1] = row.copy()
            else:
                self.rows[layer].append(row.copy())
                self.changes[layer].append(effective)

    def versions(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows int64 ``[V, P]``, version of each step int64 ``[T]``) of one layer."""
        starts = np.asarray(self.changes[layer])
        version = np.zeros(self.num_steps, dtype=np.int64)
        version[starts[1:]] = 1
        return np.stack(self.rows[layer]), np.cumsum(version)


def score(trace, topology: Topology, config, timeline: Timeline, warmup: int, report,
           failed: np.ndarray | None = None) -> dict:
    """Rank loads of every step under the timeline's placements, reduced to PAR, peaks and window sums.

    ``failed`` bool ``[T, W]`` (None: no failure): in steps with failed ranks, the failover routing replaces the
    dispatch rule (:func:`_score_failover`).
    """
    num_steps, num_layers, num_experts = trace.counts.shape
    num_ranks = topology.num_ranks
    interval = config.cycle.cycle_steps
    window_starts = np.arange(0, num_steps, interval)
    out = {
        "step_par": np.empty((num_steps, num_layers)),
        "tokens": np.empty((num_steps, num_layers)),
        "peak": np.empty((num_steps, num_layers)),
        "window_par": np.empty((window_starts.size, num_layers)),
        "window_tokens": np.empty((window_starts.size, num_layers)),
        "rank_load": np.empty((num_layers, num_ranks)),
        "waiting": np.zeros((num_steps, num_layers)),
        "unavailable": np.zeros((num_steps, num_layers), dtype=np.int64),
        "unavailable_replicated": np.zeros((num_steps, num_layers), dtype=np.int64),
    }
    live_count = np.full(num_steps, float(num_ranks))
    window_live = np.full(window_starts.size, float(num_ranks))
    if failed is not None:
        live_count = (~failed).sum(axis=1).astype(np.float64)
        window_live = np.logical_or.reduceat(~failed, window_starts, axis=0).sum(axis=1).astype(np.float64)
    for layer in range(num_layers):
        rows, version = timeline.versions(layer)
        placement = Placement.from_valid(rows, num_experts, topology)
        load = trace.counts[:, layer, :].astype(np.float64)
        if config.dispatch == "balanced":  # the router's split, in whole tokens
            table = replica_ranks(placement)
            loads = np.concatenate([
                balanced_rank_load(trace.counts[start:start + _BALANCED_ROWS, layer], table, num_ranks,
                                   version[start:start + _BALANCED_ROWS], config.balanced_passes)
                for start in range(0, num_steps, _BALANCED_ROWS)])
        elif config.dispatch == "even":  # the share of every rank straight from the row: no dense [V, E, W]
            loads = np.zeros((num_steps, num_ranks))
            bounds = np.flatnonzero(np.diff(version)) + 1
            counts = placement.replica_count
            for start, stop in zip(np.r_[0, bounds], np.r_[bounds, num_steps]):
                _even_loads(load[start:stop], rows[version[start]], counts[version[start]], num_ranks,
                            loads[start:stop])
        else:
            share = dispatch_share(placement, config.dispatch, config.tp_size)  # [V, E, W]
            loads = np.zeros((num_steps, num_ranks))
            bounds = np.flatnonzero(np.diff(version)) + 1
            for start, stop in zip(np.r_[0, bounds], np.r_[bounds, num_steps]):
                _add_shared(loads[start:stop], load[start:stop], share[version[start]])
        if failed is not None:
            _score_failover(loads, load, rows, version, failed, num_experts, topology, out["waiting"][:, layer],
                            out["unavailable"][:, layer], out["unavailable_replicated"][:, layer])
        peak = loads.max(axis=1)
        total = loads.sum(axis=1)
        out["peak"][:, layer] = peak
        out["tokens"][:, layer] = total
        out["step_par"][:, layer] = _ratio(peak, total / live_count)
        windows = np.add.reduceat(loads, window_starts, axis=0)
        out["window_tokens"][:, layer] = windows.sum(axis=1)
        window_mean = windows.mean(axis=1) if failed is None else windows.sum(axis=1) / window_live
        out["window_par"][:, layer] = _ratio(windows.max(axis=1), window_mean)
        out["rank_load"][layer] = loads[warmup:].sum(axis=0)
        report(0.5 + 0.5 * (layer + 1) / num_layers)
    return out


def _score_failover(loads, load, rows, version, failed, num_experts, topology, waiting, unavailable,
                    unavailable_replicated) -> None:
    """Overwrite, in place, the rank loads ``[T, W]`` of one layer in the steps with failed ranks by the failover
    routing (even split over the surviving replicas), and fill that layer's ``waiting`` tokens ``[T]``,
    ``unavailable`` expert counts ``[T]`` and, in the steps where ranks fail, ``unavailable_replicated`` ``[T]``: the
    experts that become unavailable although they had two or more replicas on the ranks serving the step before.

    ``load`` float ``[T, E]``; ``rows`` int ``[V, P]`` and ``version`` int ``[T]`` from :meth:`Timeline.versions`.
    """
    num_steps = load.shape[0]
    _, live_id = np.unique(failed, axis=0, return_inverse=True)
    live_id = live_id.reshape(-1)
    change = np.flatnonzero((np.diff(version) != 0) | (np.diff(live_id) != 0)) + 1
    for start, stop in zip(np.r_[0, change], np.r_[change, num_steps]):
        if not failed[start].any():
            continue
        placement = Placement.from_valid(rows[version[start]], num_experts, topology)
        failover = placement.without_ranks(failed[start])
        share = failover.rank_share()[0]  # [E, W]
        loads[start:stop] = 0.0
        if share.any():
            _add_shared(loads[start:stop], load[start:stop], share)
        lost = failover.lost_mask[0]
        waiting[start:stop] = load[start:stop][:, lost].sum(axis=1)
        unavailable[start:stop] = int(lost.sum())
        before = placement.without_ranks(failed[start - 1] if start > 0 else np.zeros_like(failed[start]))
        unavailable_replicated[start] = int((lost & (before.replica_count[0] >= 2)).sum())


def _add_shared(out: np.ndarray, load: np.ndarray, share: np.ndarray) -> None:
    """``out += load @ share`` for a sparse ``share`` ``[E, W]`` (a few ranks per expert), without BLAS: a dense
    matmul is no faster at these sizes and multi-threaded BLAS stalls on a busy machine."""
    rank, expert = np.nonzero(share.T)  # ordered by rank, then expert
    present, first = np.unique(rank, return_index=True)
    contribution = load[:, expert] * share[expert, rank]
    out[:, present] += np.add.reduceat(contribution, first, axis=1)


@njit(cache=True)
def _even_loads(load, row, counts, num_ranks, out):
    """``out`` ``[T, W]`` = the rank loads of ``load`` ``[T, E]`` under an even split over the replicas of ``row``
    ``[P]`` (``counts`` ``[E]`` its replica counts): what :func:`_add_shared` gives with the even share, to the last
    bit (each rank's distinct experts ascending, a repeated one's shares added, summed as numpy's reduction does),
    in O(T x P) instead of a dense [E, W] share."""
    slots = row.shape[0] // num_ranks
    experts = np.empty((num_ranks, slots), dtype=np.int64)
    share = np.empty((num_ranks, slots))
    size = np.zeros(num_ranks, dtype=np.int64)
    for r in range(num_ranks):
        for k in range(slots):
            e = row[r * slots + k]
            value = 1.0 / counts[e]
            i = size[r]
            while i > 0 and experts[r, i - 1] > e:
                i -= 1
            if i > 0 and experts[r, i - 1] == e:
                share[r, i - 1] += value
                continue
            for j in range(size[r], i, -1):
                experts[r, j], share[r, j] = experts[r, j - 1], share[r, j - 1]
            experts[r, i], share[r, i] = e, value
            size[r] += 1
    terms = np.empty(slots)
    for t in range(load.shape[0]):  # a step's loads stay in cache while every rank reads them
        for r in range(num_ranks):
            if size[r] <= 8:  # numpy sums fewer than 8 terms in order
                total = 0.0
                for i in range(1, size[r]):
                    total += load[t, experts[r, i]] * share[r, i]
                out[t, r] = load[t, experts[r, 0]] * share[r, 0] + total
                continue
            for i in range(size[r]):
                terms[i] = load[t, experts[r, i]] * share[r, i]
            out[t, r] = terms[0] + _pairwise_sum(terms[1:size[r]])


@njit(cache=True)
def _pairwise_sum(values):
    """numpy's pairwise summation (what ``np.add.reduce`` does with float64), so sums match it to the bit."""
    n = values.shape[0]
    if n < 8:
        total = 0.0
        for i in range(n):
            total += values[i]
        return total
    if n <= 128:
        part = values[:8].copy()
        i = 8
        while i < n - n % 8:
            for j in range(8):
                part[j] += values[i + j]
            i += 8
        total = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]))
        while i < n:
            total += values[i]
            i += 1
        return total
    half = n // 2
    half -= half % 8
    return _pairwise_sum(values[:half]) + _pairwise_sum(values[half:])


def _ratio(peak: np.ndarray, mean: np.ndarray) -> np.ndarray:
    return np.where(mean > 0, peak / np.where(mean > 0, mean, 1.0), 1.0)
