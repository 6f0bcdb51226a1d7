"""Replica choice: which replica of an expert each token goes to, and so how much load each rank serves.

Modes (ALGORITHMS.md section 7). Tokens of an expert are assumed to come evenly from every source rank (each rank
serves its own share of the batch), which makes the static modes a fixed share matrix per placement:

- ``even``: an expert with ``c`` replicas sends ``1/c`` of its tokens to each (the metrics' convention).
- ``rank``: source rank ``r`` sends all its tokens of expert ``e`` to replica ``r % c`` (replicas in ascending
  slot order; with ``tp_size > 1`` the vllm-ascend rotation ``(r % tp + r // tp + e) % c``).
- ``token``: a per-token rotation (replica ``(row + rank + e) % c``, row = token index mod 1024); over a batch
  every replica gets the same share, so in expectation it equals ``even``.
- ``local``: a replica on the source rank, else one on the source rank's node (rotated by rank), else replica
  ``r % c``.
- ``balanced``: per batch, the tokens of each replicated expert are split over its replicas so that the busiest
  rank is as light as possible: :func:`balanced_rank_load` (water-filling).

The water-filling is plain array code (sort, cumsum, gather, scatter), deterministic and vectorised over a batch of
independent rows, so the runtime router can run the same computation with torch ops.
"""

from __future__ import annotations

import numpy as np

from eplb.errors import EplbError
from eplb.metrics import rank_share
from eplb.placement import Placement

__all__ = [
    "DISPATCH_MODES",
    "STATIC_MODES",
    "dispatch_share",
    "replica_ranks",
    "balanced_rank_load",
    "balanced_replica_load",
    "round_split",
]

DISPATCH_MODES = ("even", "rank", "token", "local", "balanced")
STATIC_MODES = ("even", "rank", "token", "local")


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
    rank_of_slot = placement.rank_of_slot
    if mode == "rank":
        for rank in range(num_ranks):
            slot = placement.log2phy_for_rank(rank, tp_size)
            _add_rank(share, rank_of_slot[slot], 1.0 / num_ranks)
        return share
    replica_rank = np.where(placement.log2phy >= 0, rank_of_slot[np.maximum(placement.log2phy, 0)], -1)  # [L,E,M]
    node_of_rank = placement.topology.node_of_rank
    replica_node = np.where(replica_rank >= 0, node_of_rank[np.maximum(replica_rank, 0)], -1)
    count = placement.replica_count
    for rank in range(num_ranks):
        on_rank = replica_rank == rank
        on_node = replica_node == node_of_rank[rank]
        node_count = on_node.sum(axis=2)
        # the (rank % node_count)-th replica on this node, counted in slot order
        node_pick = on_node & (np.cumsum(on_node, axis=2) - 1 == (rank % np.maximum(node_count, 1))[..., None])
        any_pick = np.arange(replica_rank.shape[2]) == (rank % count)[..., None]
        pick = np.where(on_rank.any(axis=2)[..., None], on_rank & (np.cumsum(on_rank, axis=2) == 1),
                        np.where((node_count > 0)[..., None], node_pick, any_pick))
        _add_rank(share, np.where(pick, replica_rank, -1).max(axis=2), 1.0 / num_ranks)
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


def balanced_replica_load(expert_load, replica_rank, num_ranks: int, table=None, sweeps: int = 3):
    """Split each row's expert load over the experts' replicas so that the busiest rank is as light as possible.

    Experts with one replica are fixed. The replicated ones start from an even split over their ranks; then
    ``sweeps`` times each of them, heaviest first, is taken out and poured back by water-filling (its lowest ranks
    are raised to a common level), which can only lower or keep the busiest rank, so the result is never worse
    than that even split. Deterministic (stable sorts, ties to lower expert ids). On DeepSeek-V3-like loads three
    sweeps close about 90% of the gap between the even split and the exact LP optimum.

    Args:
        expert_load: float or int ``[B, E]``: tokens of each logical expert in each row (a step of one layer).
        replica_rank: int ``[V, E, M]``: distinct ranks holding each expert, -1 padded (:func:`replica_ranks`);
            ``V`` placements (e.g. one per layer).
        num_ranks: W.
        table: int ``[B]``: which of the ``V`` placements each row uses; None when ``V == 1`` or ``V == B``.
        sweeps: refinement passes (0 = even split).

    Returns:
        ``(replica_load float64 [B, E, M], rank_load float64 [B, W])``: tokens each replica (ordered as
        ``replica_rank``) and each rank receives.
    """
    expert_load, replica_rank, table = _check(expert_load, replica_rank, num_ranks, table)
    order, targets, valid, shares, rank_load = _balance(expert_load, replica_rank, num_ranks, table, sweeps)
    num_rows = expert_load.shape[0]
    replica_load = np.zeros((num_rows, *replica_rank.shape[1:]))
    single = (replica_rank[table] >= 0).sum(axis=2) == 1
    replica_load[:, :, 0] = np.where(single, expert_load, 0.0)
    rows = np.arange(num_rows)
    for j in range(order.shape[1]):
        multi = ~single[rows, order[:, j]]
        replica_load[rows[multi], order[multi, j]] = shares[j][multi]
    return replica_load, rank_load


def balanced_rank_load(expert_load, replica_rank, num_ranks: int, table=None, sweeps: int = 3) -> np.ndarray:
    """float64 ``[B, W]``: the rank loads of :func:`balanced_replica_load` (without building the per-replica
    array)."""
    expert_load, replica_rank, table = _check(expert_load, replica_rank, num_ranks, table)
    return _balance(expert_load, replica_rank, num_ranks, table, sweeps)[4]


def _balance(expert_load, replica_rank, num_ranks, table, sweeps):
    """The water-filling of :func:`balanced_replica_load`, on the replicated experts only.

    Returns ``order`` int ``[B, n]`` (replicated experts of each row, heaviest first; padded with single-replica
    ones), ``targets`` int ``[n, B, M]`` (their ranks; padding -> an extra sink column ``W``), ``valid`` bool
    ``[n, B, M]``, ``shares`` float ``[n, B, M]`` (tokens per replica) and ``rank_load`` float ``[B, W]``.
    """
    num_rows = expert_load.shape[0]
    rows = np.arange(num_rows)
    replicas = (replica_rank >= 0).sum(axis=2)  # [V, E]
    single = replicas[table] == 1  # [B, E]
    rank_load = np.zeros((num_rows, num_ranks + 1))  # column W is a sink for padded replicas, never read
    # fixed part: single-replica experts on their only rank
    flat = (rows[:, None] * (num_ranks + 1) + replica_rank[table, :, 0]).ravel()
    rank_load += np.bincount(flat, weights=np.where(single, expert_load, 0.0).ravel(),
                             minlength=num_rows * (num_ranks + 1)).reshape(rank_load.shape)
    num_multi = int((~single).sum(axis=1).max(initial=0))
    order = np.argsort(np.where(single, np.inf, -expert_load), axis=1, kind="stable")[:, :num_multi]
    active = ~np.take_along_axis(single, order, axis=1)  # [B, n]
    tokens = np.where(active, np.take_along_axis(expert_load, order, axis=1), 0.0).T  # [n, B]
    targets = np.ascontiguousarray(replica_rank[table[:, None], order].transpose(1, 0, 2))  # [n, B, M]
    valid = (targets >= 0) & active.T[:, :, None]
    targets = np.where(valid, targets, num_ranks)
    shares = np.where(valid, (tokens / np.maximum(valid.sum(axis=2), 1))[:, :, None], 0.0)  # even split
    for j in range(num_multi):
        rank_load[rows[:, None], targets[j]] += shares[j]
    for _ in range(sweeps):
        for j in range(num_multi):
            rank_load[rows[:, None], targets[j]] -= shares[j]
            shares[j] = _water_fill(rank_load[rows[:, None], targets[j]], valid[j], tokens[j])
            rank_load[rows[:, None], targets[j]] += shares[j]
    return order, targets, valid, shares, rank_load[:, :num_ranks]


def _water_fill(level: np.ndarray, valid: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """float64 ``[B, M]``: pour ``tokens[b]`` into bins at heights ``level[b]`` (only ``valid`` ones), lowest
    first, so the filled bins end at one common height."""
    height = np.where(valid, level, np.inf)
    ordered = np.sort(height, axis=1)
    filled = np.arange(1, height.shape[1] + 1)
    prefix = np.cumsum(np.where(np.isfinite(ordered), ordered, 0.0), axis=1)
    candidate = (tokens[:, None] + prefix) / filled  # the common height when the k lowest bins are filled
    reach = np.isfinite(ordered) & (ordered <= candidate)  # true for k = 1..k*, then false (heights ascend)
    k = np.maximum(reach.sum(axis=1), 1)
    top = np.take_along_axis(candidate, (k - 1)[:, None], axis=1)
    return np.where(valid, np.clip(top - level, 0.0, None), 0.0)


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
