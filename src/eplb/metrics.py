"""Balance metrics: per-rank load of a placement, PAR (max / mean), vLLM balancedness, moves.

Tokens of an expert with ``c`` replicas are split evenly, ``load / c`` per replica. Everything is vectorised over
layers (and steps); a ``[5000, 58, 256]`` load against a 58 x 320 placement evaluates in a fraction of a second.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from eplb.load import as_load
from eplb.placement import Placement

__all__ = [
    "rank_share",
    "rank_loads",
    "par",
    "balancedness",
    "step_par",
    "weighted_quantile",
    "summarize_par",
    "moved_slots",
]


def rank_share(placement: Placement) -> np.ndarray:
    """float64 ``[L, E, W]``: the share of expert ``e``'s tokens that rank ``w`` serves under an even split."""
    num_layers, num_ranks = placement.num_layers, placement.topology.num_ranks
    num_experts = placement.num_experts
    share = np.zeros((num_layers, num_experts, num_ranks))
    per_slot = 1.0 / np.take_along_axis(placement.replica_count, placement.phy2log, axis=1)  # [L, P]
    layer_idx = np.broadcast_to(np.arange(num_layers)[:, None], placement.phy2log.shape)
    rank_idx = np.broadcast_to(placement.rank_of_slot[None, :], placement.phy2log.shape)
    np.add.at(share, (layer_idx, placement.phy2log, rank_idx), per_slot)
    return share


def rank_loads(placement: Placement, load, share: np.ndarray | None = None) -> np.ndarray:
    """Tokens each rank serves.

    Args:
        placement: ``L`` layers, ``W`` ranks.
        load: ``[L, E]`` or ``[T, L, E]``.
        share: :func:`rank_share` of ``placement`` when the caller already has it (used for ``[L, E]`` loads).

    Returns:
        float64 ``[L, W]`` or ``[T, L, W]``.
    """
    load = as_load(load, placement.num_experts, placement.num_layers)
    if load.ndim == 2 and share is not None:
        return np.matmul(load.astype(np.float64)[:, None, :], share)[:, 0, :]
    if load.ndim == 2:
        # each slot's share of its expert's load, summed per rank: O(L*P), where the dense share is O(L*E*W)
        slot_load = np.take_along_axis(load.astype(np.float64), placement.phy2log, axis=1) \
            / np.take_along_axis(placement.replica_count, placement.phy2log, axis=1)
        return slot_load.reshape(placement.num_layers, placement.topology.num_ranks, -1).sum(axis=2)
    # Per step, add each slot's share of its expert's load to its rank (O(T*L*P)) instead of a dense [E, W] product
    # (O(T*L*E*W)): each expert sits on a handful of ranks, so this is ~E*W/P times less work.
    slot_weight = 1.0 / np.take_along_axis(placement.replica_count, placement.phy2log, axis=1)
    return _per_step_rank_loads(load, placement.phy2log, slot_weight, placement.topology.slots_per_rank,
                                placement.topology.num_ranks)


@njit(cache=True)
def _per_step_rank_loads(load, phy2log, slot_weight, slots_per_rank, num_ranks):
    steps, num_layers = load.shape[0], load.shape[1]
    out = np.zeros((steps, num_layers, num_ranks))
    for t in range(steps):
        for layer in range(num_layers):
            for p in range(phy2log.shape[1]):
                out[t, layer, p // slots_per_rank] += load[t, layer, phy2log[layer, p]] * slot_weight[layer, p]
    return out


def par(loads: np.ndarray) -> np.ndarray:
    """Peak-to-average ratio over the last axis (ranks): ``max / mean``; 1.0 where nothing was served.

    Args:
        loads: ``[..., W]`` per-rank loads.

    Returns:
        float64 ``[...]``, each >= 1.
    """
    loads = np.asarray(loads, dtype=np.float64)
    mean = loads.mean(axis=-1)
    peak = loads.max(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, peak / np.where(mean > 0, mean, 1.0), 1.0)


def balancedness(loads: np.ndarray) -> float:
    """vLLM's balancedness of per-rank loads ``[L, W]`` (or ``[T, L, W]``, all rows pooled):
    ``sum over layers of mean rank load / sum over layers of max rank load`` (0 when nothing was served)."""
    loads = np.asarray(loads, dtype=np.float64).reshape(-1, np.shape(loads)[-1])
    peak = loads.max(axis=-1).sum()
    return float(loads.mean(axis=-1).sum() / peak) if peak > 0 else 0.0


def step_par(placement: Placement, load) -> tuple[np.ndarray, np.ndarray]:
    """PAR of every step and layer and the tokens behind it.

    Args:
        load: ``[T, L, E]`` (a ``[L, E]`` load is one step).

    Returns:
        ``(par [T, L], tokens [T, L])`` float64.
    """
    load = as_load(load, placement.num_experts, placement.num_layers)
    if load.ndim == 2:
        load = load[None]
    loads = rank_loads(placement, load)
    return par(loads), loads.sum(axis=-1)


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` where each value counts ``weights`` times (inverted CDF)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    weights = np.asarray(weights, dtype=np.float64).ravel()
    if values.size == 0 or weights.sum() <= 0:
        return float("nan")
    order = np.argsort(values, kind="stable")
    cdf = np.cumsum(weights[order])
    index = int(np.searchsorted(cdf, q * cdf[-1], side="left"))
    return float(values[order][min(index, values.size - 1)])


def summarize_par(par_values: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
    """Token-weighted summary of PAR values (any shape, ``tokens`` the same shape).

    Returns:
        ``par_mean`` (token-weighted mean), ``par_p99`` (token-weighted 99th percentile), ``par_max``.
    """
    par_values = np.asarray(par_values, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.float64)
    total = tokens.sum()
    mean = float((par_values * tokens).sum() / total) if total > 0 else float(par_values.mean())
    weights = tokens if total > 0 else np.ones_like(par_values)
    return {
        "par_mean": mean,
        "par_p99": weighted_quantile(par_values, weights, 0.99),
        "par_max": float(par_values.max()),
    }


def moved_slots(old: Placement, new: Placement) -> np.ndarray:
    """int64 ``[L]``: slots per layer whose logical expert changes from ``old`` to ``new``."""
    return old.moves_to(new).sum(axis=1).astype(np.int64)
