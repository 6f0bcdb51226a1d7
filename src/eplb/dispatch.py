"""Replica choice (``dispatch``): which replica of an expert each token goes to, and so how much load each rank serves.

One module for the simulator and the runtime. The numpy functions here are the reference: :func:`route` gives the
slot of every token exactly as the runtime's router (:class:`eplb.runtime.router.ReplicaRouter`, their torch twin,
tested equal) does, :func:`rank_choice` and :func:`replica_slots` build the router's tables, :func:`balanced_split` is
the split its ``balanced`` mode uses, and :func:`dispatch_share` / :func:`balanced_rank_load` give the rank loads the
simulator scores.

Modes (the rules of vllm-ascend, xLLM, SGLang and DeepSeek's LPLB). Tokens of an expert are assumed to come evenly from every source rank (each rank
serves its own share of the batch), which makes the static modes a fixed share matrix per placement:

- ``even``: an expert with ``c`` replicas sends ``1/c`` of its tokens to each (the metrics' convention).
- ``rank``: source rank ``r`` sends all its tokens of expert ``e`` to replica ``r % c`` (replicas in ascending
  slot order; with ``tp_size > 1`` the vllm-ascend rotation ``(r % tp + r // tp + e) % c``).
- ``token``: a per-token rotation (replica ``(row + rank + e) % c``, row = token index mod 1024); over a batch
  every replica gets the same share, so in expectation it equals ``even``.
- ``local``: a replica on the source rank, else one on the source rank's node (rotated by rank), else the ``rank``
  rule.
- ``balanced``: per batch, the tokens of each replicated expert are split over its replicas so that the busiest
  rank is as light as possible: :func:`balanced_rank_load` (water-filling passes until converged: the exact
  min-max split). A compiled loop per row: ~0.05 ms for a DeepSeek-V3 layer (256 experts, 64 ranks x 5 slots) on
  one CPU core (``python benchmarks/auto.py --dispatch-only``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from eplb.errors import EplbError
from eplb.metrics import rank_share
from eplb.placement import Placement

__all__ = [
    "DISPATCH_MODES",
    "STATIC_MODES",
    "RUNTIME_MODES",
    "TOKEN_TABLE_ROWS",
    "check_dispatch",
    "rank_choice",
    "replica_slots",
    "balanced_split",
    "route",
    "dispatch_share",
    "replica_ranks",
    "balanced_rank_load",
    "balanced_replica_load",
    "optimal_peak",
    "round_split",
]

DISPATCH_MODES = ("even", "rank", "token", "local", "balanced")
STATIC_MODES = ("even", "rank", "token", "local")
#: the modes a router can run (``even`` is the simulator's expectation of ``token``, not a rule a router follows)
RUNTIME_MODES = ("rank", "token", "local", "balanced")
#: rows of the per-token rotation (vllm-ascend's table size)
TOKEN_TABLE_ROWS = 1024


def check_dispatch(mode, allowed=DISPATCH_MODES, name: str = "dispatch") -> str:
    """``mode`` when it is one of ``allowed``, else an :class:`~eplb.errors.EplbError` naming ``name``."""
    if mode not in allowed:
        raise EplbError(f"{name} must be one of {', '.join(allowed)}, got {mode!r}")
    return mode


def rank_choice(placement, rank: int, mode: str = "rank", tp_size: int = 1, layers=None) -> np.ndarray:
    """int64 ``[len(layers), E]``: the slot ``rank`` sends each expert's tokens to under ``rank`` or ``local``.

    ``placement`` is a :class:`~eplb.placement.Placement` or its :class:`~eplb.placement.Failover` (-1 for an expert
    with no surviving replica); ``layers`` the layer indices (None: all).
    """
    layers = np.arange(placement.num_layers) if layers is None else np.asarray(layers, dtype=np.int64)
    rank_rule = placement.log2phy_for_rank(rank, tp_size)[layers]
    if mode != "local":
        return rank_rule
    topology = placement.topology
    log2phy = placement.log2phy[layers]  # [l, E, M]
    valid = log2phy >= 0
    slot_rank = np.where(valid, topology.rank_of_slot[np.maximum(log2phy, 0)], -1)
    on_rank = valid & (slot_rank == rank)
    on_node = valid & (topology.node_of_rank[np.maximum(slot_rank, 0)] == topology.node_of_rank[rank])
    # replicas are in ascending slot order, so the first one on this rank is its lowest local slot
    first_local = np.take_along_axis(log2phy, np.argmax(on_rank, axis=2)[..., None], axis=2)[..., 0]
    node_count = on_node.sum(axis=2)
    pick = rank % np.maximum(node_count, 1)  # the pick-th replica on this node
    node_index = np.argmax(np.cumsum(on_node, axis=2) > pick[..., None], axis=2)
    node_choice = np.take_along_axis(log2phy, node_index[..., None], axis=2)[..., 0]
    return np.where(on_rank.any(axis=2), first_local, np.where(node_count > 0, node_choice, rank_rule))


def replica_slots(placement, layers, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ranks, slots)`` int64 ``[len(layers), E, width]``: :func:`replica_ranks` of ``layers`` padded to ``width``
    with -1, and the lowest slot of the expert on each of those ranks (0 where padded): the tables of the
    ``balanced`` mode."""
    layers = np.asarray(layers, dtype=np.int64)
    ranks_all = replica_ranks(placement)[layers]
    ranks = np.full((layers.size, placement.num_experts, width), -1, dtype=np.int64)
    ranks[:, :, :ranks_all.shape[2]] = ranks_all
    log2phy = placement.log2phy[layers]  # ascending slots, so the first match on a rank is its lowest slot
    slot_rank = np.where(log2phy >= 0, placement.rank_of_slot[np.maximum(log2phy, 0)], -2)
    match = slot_rank[:, :, None, :] == ranks[:, :, :, None]  # [l, E, width, M]
    slots = np.take_along_axis(log2phy, np.argmax(match, axis=3), axis=2)
    return ranks, np.where(ranks >= 0, slots, 0)


def balanced_split(expert_load, replica_rank: np.ndarray, num_ranks: int) -> np.ndarray:
    """int64 ``[E, M]``: whole tokens each distinct replica rank of each expert (ordered as ``replica_rank``
    ``[E, M]``, -1 padded) receives in one step of one layer, for the group's per-expert tokens ``expert_load``
    ``[E]``: :func:`balanced_replica_load` rounded by :func:`round_split` (bit-identical on every rank)."""
    total = np.asarray(expert_load, dtype=np.int64)
    width = max(1, int((replica_rank >= 0).sum(axis=1).max()))
    replica_load, _ = balanced_replica_load(total[None], replica_rank[None, :, :width], num_ranks)
    split = np.zeros(replica_rank.shape, dtype=np.int64)
    split[:, :width] = round_split(replica_load[0], total)
    return split


def route(placement, layer: int, rank: int, expert_ids, mode: str, tp_size: int = 1, group_counts=None
          ) -> np.ndarray:
    """int64, shaped like ``expert_ids`` ``[N, k]``: the slot each of ``rank``'s tokens goes to in ``layer`` (-1
    for an expert with no surviving replica when ``placement`` is a :class:`~eplb.placement.Failover`).

    The reference of the runtime's router: ``rank`` / ``local`` use :func:`rank_choice`; ``token`` sends token
    ``i`` to replica ``(i mod 1024 + rank + e) % count_e``; ``balanced`` needs ``group_counts`` int ``[W, E]`` (every
    rank's tokens per expert this step): the split of :func:`balanced_split`, where ``rank``'s tokens of expert ``e``
    take the group-wide positions after those of ranks ``0..rank-1`` and fill the replicas in order.
    """
    check_dispatch(mode, RUNTIME_MODES)
    ids = np.asarray(expert_ids, dtype=np.int64)
    if mode in ("rank", "local"):
        return rank_choice(placement, rank, mode, tp_size, [layer])[0][ids]
    log2phy = placement.log2phy[layer]
    if mode == "token":
        count = np.maximum(placement.replica_count[layer], 1)
        row = np.arange(ids.shape[0]) % TOKEN_TABLE_ROWS
        choice = (row.reshape(-1, *([1] * (ids.ndim - 1))) + rank + ids) % count[ids]
        return log2phy[ids, choice]
    if group_counts is None:
        raise EplbError("balanced dispatch needs group_counts [W, E]: this step's tokens per expert of every rank")
    counts = np.asarray(group_counts, dtype=np.int64)
    ranks, slots = replica_slots(placement, [layer], log2phy.shape[1])
    split = balanced_split(counts.sum(axis=0), ranks[0], placement.topology.num_ranks)
    bounds = np.cumsum(split, axis=1)
    flat = ids.reshape(-1)
    occurrence = np.zeros(flat.size, dtype=np.int64)
    seen: dict[int, int] = {}
    for i, expert in enumerate(flat.tolist()):
        occurrence[i] = seen.get(expert, 0)
        seen[expert] = occurrence[i] + 1
    position = counts[:rank].sum(axis=0)[flat] + occurrence
    replica = np.minimum((position[:, None] >= bounds[flat]).sum(axis=1), bounds.shape[1] - 1)
    return slots[0][flat, replica].reshape(ids.shape)


def dispatch_share(placement: Placement, mode: str = "even", tp_size: int = 1) -> np.ndarray:
    """float64 ``[L, E, W]``: the share of expert ``e``'s tokens that rank ``w`` serves under a static mode.

    Each ``[l, e, :]`` sums to 1.

    Raises:
        EplbError: unknown mode (``balanced`` depends on each batch: use :func:`balanced_rank_load`).
    """
    if mode not in STATIC_MODES:
        raise EplbError(f"dispatch mode {mode!r} has no fixed share; expected one of {', '.join(STATIC_MODES)}")
    if mode in ("even", "token"):
        return rank_share(placement)
    num_ranks = placement.topology.num_ranks
    share = np.zeros((placement.num_layers, placement.num_experts, num_ranks))
    for rank in range(num_ranks):
        _add_rank(share, placement.rank_of_slot[rank_choice(placement, rank, mode, tp_size)], 1.0 / num_ranks)
    return share


def _add_rank(share: np.ndarray, target_rank: np.ndarray, amount: float) -> None:
    """``share[l, e, target_rank[l, e]] += amount`` for every layer and expert."""
    num_layers, num_experts, _ = share.shape
    share[np.arange(num_layers)[:, None], np.arange(num_experts)[None, :], target_rank] += amount


def replica_ranks(placement: Placement) -> np.ndarray:
    """int64 ``[L, E, M]``: the distinct ranks holding each expert, ascending, padded with -1.

    Two replicas of one expert on the same rank count once (they serve the same rank).
    """
    log2phy = placement.log2phy
    ranks = np.where(log2phy >= 0, placement.rank_of_slot[np.maximum(log2phy, 0)], np.iinfo(np.int64).max)
    ranks = np.sort(ranks, axis=2)
    repeat = np.zeros(ranks.shape, dtype=bool)
    repeat[..., 1:] = ranks[..., 1:] == ranks[..., :-1]
    ranks = np.sort(np.where(repeat, np.iinfo(np.int64).max, ranks), axis=2)
    width = max(1, int((ranks != np.iinfo(np.int64).max).sum(axis=2).max()))
    ranks = ranks[..., :width]
    return np.where(ranks == np.iinfo(np.int64).max, -1, ranks)


def balanced_replica_load(expert_load, replica_rank, num_ranks: int, table=None, passes: int = 200):
    """Split each row's expert load over the experts' replicas so that the busiest rank is as light as possible.

    Experts with one replica are fixed. The replicated ones start from an even split over their ranks; then each of
    them, heaviest first, is taken out and poured back by water-filling (its lowest ranks are raised to a common
    level). One such pass minimises the sum of squared rank loads over that expert's split with the others held, so
    repeating passes converges to the split of least squared rank loads, which on this transportation polytope is
    also the most balanced one (it minimises the busiest rank, then the next, ...): the exact min-max split, not a
    heuristic. Passes stop when no rank load changes by more than 1e-5 of the mean rank load (a few tens of passes
    on DeepSeek-V3 loads; at most ``passes``). Deterministic (stable orders, ties split evenly). Each pass
    only lowers or keeps the busiest rank, so the result is never worse than the even split.

    Args:
        expert_load: float or int ``[B, E]``: tokens of each logical expert in each row (a step of one layer).
        replica_rank: int ``[V, E, M]``: distinct ranks holding each expert, -1 padded (:func:`replica_ranks`);
            ``V`` placements (e.g. one per layer).
        num_ranks: W.
        table: int ``[B]``: which of the ``V`` placements each row uses; None when ``V == 1`` or ``V == B``.
        passes: the most water-filling passes (0 keeps the even split).

    Returns:
        ``(replica_load float64 [B, E, M], rank_load float64 [B, W])``: tokens each replica (ordered as
        ``replica_rank``) and each rank receives.
    """
    expert_load, replica_rank, table = _check(expert_load, replica_rank, num_ranks, table)
    replica_load = np.zeros((expert_load.shape[0], *replica_rank.shape[1:]))
    rank_load = _balance(expert_load, replica_rank, table, num_ranks, _passes(passes), replica_load, True)
    return replica_load, rank_load


def optimal_peak(expert_load, replica_rank, num_ranks: int) -> float:
    """The least possible busiest-rank load of one row, solved exactly as a linear program (HiGHS).

    The reference :func:`balanced_replica_load` is checked against; too slow for every step.

    Args:
        expert_load: float ``[E]`` tokens of each expert.
        replica_rank: int ``[E, M]`` distinct ranks holding each expert, -1 padded.
        num_ranks: W.
    """
    from scipy.optimize import linprog

    pairs = [(e, r) for e in range(replica_rank.shape[0]) for r in replica_rank[e] if r >= 0]
    # variables: tokens of each (expert, rank) pair, then the peak; minimise the peak
    a_ub = np.zeros((num_ranks, len(pairs) + 1))
    a_eq = np.zeros((replica_rank.shape[0], len(pairs) + 1))
    a_ub[:, -1] = -1
    for i, (e, r) in enumerate(pairs):
        a_eq[e, i] = a_ub[r, i] = 1
    cost = np.zeros(len(pairs) + 1)
    cost[-1] = 1
    return float(linprog(cost, A_ub=a_ub, b_ub=np.zeros(num_ranks), A_eq=a_eq, b_eq=expert_load).fun)


def balanced_rank_load(expert_load, replica_rank, num_ranks: int, table=None, passes: int = 200) -> np.ndarray:
    """float64 ``[B, W]``: the rank loads of :func:`balanced_replica_load` (without building the per-replica
    array)."""
    expert_load, replica_rank, table = _check(expert_load, replica_rank, num_ranks, table)
    scratch = np.zeros((1, *replica_rank.shape[1:]))
    return _balance(expert_load, replica_rank, table, num_ranks, _passes(passes), scratch, False)


def _passes(passes: int) -> int:
    if isinstance(passes, bool) or not isinstance(passes, (int, np.integer)) or passes < 0:
        raise EplbError(f"passes must be an integer >= 0, got {passes!r}")
    return int(passes)


# Passes of the balanced split stop when rank loads move less than this fraction of the mean rank load.
_TOLERANCE = 1e-5


@njit(cache=True)
def _balance(expert_load, replica_rank, table, num_ranks, passes, replica_out, keep_replicas):
    """Water-filling of every row (see :func:`balanced_replica_load`); fills ``replica_out`` ``[B, E, M]`` when
    ``keep_replicas`` (else uses its row 0 as scratch) and returns the rank loads ``[B, W]``."""
    num_rows, num_experts = expert_load.shape
    width = replica_rank.shape[2]
    rank_load = np.zeros((num_rows, num_ranks))
    multi = np.empty(num_experts, dtype=np.int64)
    heights = np.empty(width)
    slot = np.empty(width, dtype=np.int64)
    for row in range(num_rows):
        ranks = replica_rank[table[row]]
        share = replica_out[row] if keep_replicas else replica_out[0]
        share[:] = 0.0
        load = rank_load[row]
        num_multi = 0
        for expert in range(num_experts):
            count = 0
            while count < width and ranks[expert, count] >= 0:
                count += 1
            tokens = expert_load[row, expert]
            for j in range(count):
                share[expert, j] = tokens / count
                load[ranks[expert, j]] += tokens / count
            if count > 1 and tokens > 0:
                multi[num_multi] = expert
                num_multi += 1
        if num_multi == 0 or passes == 0:
            continue
        # heaviest first, ties to the lower expert id
        weights = np.empty(num_multi)
        for i in range(num_multi):
            weights[i] = -expert_load[row, multi[i]]
        order = multi[:num_multi][np.argsort(weights, kind="mergesort")]
        tolerance = _TOLERANCE * max(load.sum() / num_ranks, 1e-300)
        for _ in range(passes):
            moved = 0.0
            for expert in order:
                count = 0
                while count < width and ranks[expert, count] >= 0:
                    count += 1
                tokens = expert_load[row, expert]
                for j in range(count):  # heights without this expert, sorted (insertion sort: count is small)
                    height = load[ranks[expert, j]] - share[expert, j]
                    k = j
                    while k > 0 and heights[k - 1] > height:
                        heights[k] = heights[k - 1]
                        slot[k] = slot[k - 1]
                        k -= 1
                    heights[k] = height
                    slot[k] = j
                level = heights[0] + tokens
                prefix = heights[0]
                for k in range(1, count):  # fill the k + 1 lowest bins while the level stays above the next
                    if heights[k] >= level:
                        break
                    prefix += heights[k]
                    level = (tokens + prefix) / (k + 1)
                for j in range(count):
                    rank = ranks[expert, j]
                    base = load[rank] - share[expert, j]
                    new = level - base if level > base else 0.0
                    moved = max(moved, abs(new - share[expert, j]))
                    load[rank] = base + new
                    share[expert, j] = new
            if moved <= tolerance:
                break
    return rank_load


def _check(expert_load, replica_rank, num_ranks, table):
    expert_load = np.asarray(expert_load, dtype=np.float64)
    replica_rank = np.asarray(replica_rank)
    if expert_load.ndim != 2:
        raise EplbError(f"expert_load must be [rows, experts], got shape {expert_load.shape}")
    if replica_rank.ndim != 3 or replica_rank.shape[1] != expert_load.shape[1]:
        raise EplbError(f"replica_rank must be [placements, experts={expert_load.shape[1]}, replicas], got shape "
                        f"{replica_rank.shape}")
    if replica_rank.size and (replica_rank.max() >= num_ranks or (replica_rank[..., 0] < 0).any()):
        raise EplbError(f"replica_rank must hold ranks in [0, {num_ranks}) with at least one replica per expert")
    if table is None:
        if replica_rank.shape[0] not in (1, expert_load.shape[0]):
            raise EplbError(f"table is needed: {replica_rank.shape[0]} placements for {expert_load.shape[0]} rows")
        table = np.zeros(expert_load.shape[0], dtype=np.int64) if replica_rank.shape[0] == 1 else \
            np.arange(expert_load.shape[0])
    table = np.asarray(table, dtype=np.int64)
    if table.shape != expert_load.shape[:1] or (table.size and not 0 <= table.min() <= table.max()
                                                 < replica_rank.shape[0]):
        raise EplbError(f"table must be [{expert_load.shape[0]}] indices into {replica_rank.shape[0]} placements")
    return expert_load, replica_rank.astype(np.int64, copy=False), table


def round_split(replica_load, expert_load) -> np.ndarray:
    """int64 ``[..., M]``: ``replica_load`` ``[..., M]`` rounded to whole tokens that sum to ``expert_load`` ``[...]``
    (integers), by largest remainder (ties to the lower replica)."""
    replica_load = np.asarray(replica_load, dtype=np.float64)
    expert_load = np.asarray(expert_load, dtype=np.int64)
    base = np.floor(replica_load).astype(np.int64)
    short = expert_load - base.sum(axis=-1)
    remainder = replica_load - base
    order = np.argsort(-remainder, axis=-1, kind="stable")
    rank = np.argsort(order, axis=-1, kind="stable")
    return base + (rank < short[..., None])
