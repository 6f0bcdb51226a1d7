"""Balance metrics: per-rank load of a placement, PAR (max / mean), vLLM balancedness, moves.

Tokens of an expert with ``c`` replicas are split evenly, ``load / c`` per replica. Everything is vectorised over
layers (and steps); a ``[5000, 58, 256]`` load against a 58 x 320 placement evaluates in a fraction of a second.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from eplb._arrays import to_numpy
from eplb.errors import LoadError, PlacementError
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
    _check_placement(placement)
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
    _check_placement(placement)
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
    loads = _rank_load_array(loads, "loads")
    mean = loads.mean(axis=-1)
    peak = loads.max(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, peak / np.where(mean > 0, mean, 1.0), 1.0)


def balancedness(loads: np.ndarray) -> float:
    """vLLM's balancedness of per-rank loads ``[L, W]`` (or ``[T, L, W]``, all rows pooled):
    ``sum over layers of mean rank load / sum over layers of max rank load`` (0 when nothing was served)."""
    loads = _rank_load_array(loads, "loads")
    loads = loads.reshape(-1, loads.shape[-1])
    peak = loads.max(axis=-1).sum()
    return float(loads.mean(axis=-1).sum() / peak) if peak > 0 else 0.0


def step_par(placement: Placement, load) -> tuple[np.ndarray, np.ndarray]:
    """PAR of every step and layer and the tokens behind it.

    Args:
        load: ``[T, L, E]`` (a ``[L, E]`` load is one step).

    Returns:
        ``(par [T, L], tokens [T, L])`` float64.
    """
    _check_placement(placement)
    load = as_load(load, placement.num_experts, placement.num_layers)
    if load.ndim == 2:
        load = load[None]
    loads = rank_loads(placement, load)
    return par(loads), loads.sum(axis=-1)


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` where each value counts ``weights`` times (inverted CDF); NaN when
    there is no value or no weight."""
    values, weights = _same_shape(values, "values", weights, "weights")
    if isinstance(q, (bool, np.bool_)) or not isinstance(q, (int, float, np.number)) or not 0 <= q <= 1:
        raise LoadError(f"q must be a number in [0, 1], got {q!r}")
    if (weights < 0).any():
        raise LoadError(f"weights must be >= 0, got {weights[weights < 0][0]}")
    values, weights = values.ravel(), weights.ravel()
    if values.size == 0 or weights.sum() <= 0:
        return float("nan")
    order = np.argsort(values, kind="stable")
    cdf = np.cumsum(weights[order])
    index = int(np.searchsorted(cdf, q * cdf[-1], side="left"))
    return float(values[order][min(index, values.size - 1)])


def summarize_par(par_values: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
    """Token-weighted summary of PAR values (any shape, ``tokens`` the same shape).

    Returns:
        ``par_mean`` (token-weighted mean), ``par_p99`` (token-weighted 99th percentile), ``par_max``; NaN when
        there is no value.
    """
    par_values, tokens = _same_shape(par_values, "par_values", tokens, "tokens")
    if par_values.size == 0:
        return {"par_mean": float("nan"), "par_p99": float("nan"), "par_max": float("nan")}
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
    return _check_placement(old, "old").moves_to(new).sum(axis=1).astype(np.int64)


def _check_placement(placement, field: str = "placement") -> Placement:
    if not isinstance(placement, Placement):
        raise PlacementError(f"{field} must be an eplb.Placement, got {type(placement).__name__} {placement!r:.60}")
    return placement


def _rank_load_array(loads, field: str) -> np.ndarray:
    """``loads`` ``[..., W]`` as float64, checked: numbers, at least one rank, finite, >= 0."""
    arr = to_numpy(loads, field, LoadError)
    if arr.dtype.kind not in "iuf":
        raise LoadError(f"{field} must hold numbers, got dtype {arr.dtype}")
    if arr.ndim == 0 or arr.shape[-1] == 0:
        raise LoadError(f"{field} must be per-rank loads [..., ranks] with at least one rank, got shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all() or (arr < 0).any():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr) | (arr < 0))[0])
        raise LoadError(f"{field} holds {arr[bad]} at index {bad}; rank loads must be finite and >= 0")
    return arr


def _same_shape(a, a_field: str, b, b_field: str) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for value, field in ((a, a_field), (b, b_field)):
        arr = to_numpy(value, field, LoadError)
        if arr.dtype.kind not in "iuf":
            raise LoadError(f"{field} must hold numbers, got dtype {arr.dtype}")
        arrays.append(arr.astype(np.float64, copy=False))
    if arrays[0].shape != arrays[1].shape:
        raise LoadError(f"{a_field} and {b_field} must have the same shape, got {arrays[0].shape} and "
                        f"{arrays[1].shape}")
    return arrays[0], arrays[1]
