"""``auto``: per-step balance close to FlashLB's at a fraction of its weight moves.

Method (docs/auto.md):

1. Forecast. The window ``[T, L, E]`` is cut into ``S`` episodes (consecutive blocks of steps, summed); episode
   ``s`` gets the weight ``0.5 ** (age / half_life)`` (age in steps), so recent traffic counts more under drift
   while the spread across episodes still shows which experts are volatile. A window sum ``[L, E]`` is one episode.
2. Objective. Per layer, the weighted sum over episodes of the busiest rank's load (even split over replicas): the
   token-weighted per-step PAR the simulator scores, on episode sums instead of single noisy steps.
3. Local search from the placement in force (:mod:`eplb.policies._auto_kernels`): swaps of two slots and
   reassignments of a spare replica (which change replica counts), aimed at the busiest ranks, each accepted only
   when its exact gain on the objective exceeds ``min_gain`` (in PAR units) per moved slot, within ``move_budget``.
   Experts stay where they are unless moving them pays, so no rank relabelling is needed afterwards.
4. Fresh start. A greedy placement (replica counts by load per replica, heaviest replica to the lightest rank) is
   also built; where it beats the local-search result by more than the cost of moving half the slots (e.g. the
   first plan after the initial layout), its ranks are matched to the current ones
   (:func:`eplb.policies.retention.match_ranks`) and the local search continues from it.

No expert is placed twice on a rank. Deterministic: no randomness, stable orders, ties to lower ids.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from eplb.errors import PolicyError
from eplb.load import episodes
from eplb.placement import Placement
from eplb.policies import _auto_kernels as kernels
from eplb.policies.base import Policy
from eplb.policies.kernels import spread_duplicates
from eplb.policies.retention import match_ranks
from eplb.topology import Topology

__all__ = ["Auto", "POLICY", "forecast"]

log = logging.getLogger(__name__)


def forecast(load: np.ndarray, num_episodes: int, half_life: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Episode loads and their recency weights.

    Args:
        load: ``[L, E]`` window sum or ``[T, L, E]`` per-step load.
        num_episodes: S (at most T).
        half_life: steps after which an episode's weight halves; None weighs every episode the same.

    Returns:
        ``x`` float64 ``[L, S, E]`` and ``weight`` float64 ``[S]`` (the newest episode weighs 1).
    """
    if load.ndim == 2:
        return load.astype(np.float64)[:, None, :], np.ones(1)
    x = np.ascontiguousarray(episodes(load, num_episodes).transpose(1, 0, 2))
    count = x.shape[1]
    length = load.shape[0] // count
    age = (count - 1 - np.arange(count)) * length
    weight = np.ones(count) if half_life is None else 0.5 ** (age / half_life)
    return x, weight


class Auto(Policy):
    """Local search on a recency-weighted per-episode objective, paying for every moved slot.

    Args:
        num_episodes: episodes the window is cut into (each about ``T / S`` steps).
        half_life: steps after which an episode's weight halves (None: all episodes alike).
        min_gain: predicted PAR improvement (on the weighted episodes) each moved slot must bring; larger values
            move less. 0 accepts every improving move.
        move_budget: at most this fraction of each layer's slots moves per plan (None: no limit); with
            ``min_gain`` it traces the balance-vs-moves curve.
        max_moves: at most this many accepted swaps/reassignments per layer (None: 4 x slots).
    """

    name = "auto"
    allows_shared_rank = False

    def __init__(self, num_episodes: int = 32, half_life: float | None = 300.0, min_gain: float = 2e-4,
                 move_budget: float | None = None, max_moves: int | None = None):
        if isinstance(num_episodes, bool) or not isinstance(num_episodes, (int, np.integer)) or num_episodes < 1:
            raise PolicyError(f"auto option num_episodes must be an integer >= 1, got {num_episodes!r}")
        self.num_episodes = int(num_episodes)
        self.half_life = _number("half_life", half_life, allow_none=True, positive=True)
        self.min_gain = _number("min_gain", min_gain)
        self.move_budget = _number("move_budget", move_budget, allow_none=True)
        if self.move_budget is not None and self.move_budget > 1:
            raise PolicyError(f"auto option move_budget must be a fraction in [0, 1], got {move_budget!r}")
        if max_moves is not None and (isinstance(max_moves, bool) or not isinstance(max_moves, (int, np.integer))
                                      or max_moves < 0):
            raise PolicyError(f"auto option max_moves must be None or an integer >= 0, got {max_moves!r}")
        self.max_moves = None if max_moves is None else int(max_moves)

    def place(self, load: np.ndarray, topology: Topology, current: Placement | None) -> np.ndarray:
        num_layers, num_experts = load.shape[-2:]
        num_ranks, slots = topology.num_ranks, topology.slots_per_rank
        num_slots = topology.num_physical
        if slots > num_experts:
            raise PolicyError(f"auto never puts an expert twice on a rank, so slots_per_rank ({slots}) must be <= "
                              f"the number of experts ({num_experts})")
        x, weight = forecast(load, self.num_episodes, self.half_life)
        mean_x = np.einsum("lse,s->le", x, weight / weight.sum())
        fresh = kernels.greedy_tables(mean_x, num_ranks, slots).reshape(num_layers, num_slots)
        fresh = spread_duplicates(fresh, mean_x[np.arange(num_layers)[:, None], fresh], num_ranks)
        # objective units of one moved slot: min_gain PAR points on the weighted mean rank load
        scale = np.einsum("lse,s->l", x, weight) / num_ranks
        move_cost = self.min_gain * scale
        budget = num_slots if self.move_budget is None else int(math.floor(self.move_budget * num_slots))
        max_steps = 4 * num_slots if self.max_moves is None else self.max_moves
        if current is None:
            out = fresh.copy()
            for layer in range(num_layers):
                if not _has_duplicates(out[layer], num_ranks):
                    self._search(x[layer], weight, out[layer], out[layer].copy(), num_ranks, 0.0, num_slots,
                                 max_steps)
            return out
        base = current.phy2log
        out = base.copy()
        score = np.full(num_layers, np.inf)
        for layer in range(num_layers):
            if _has_duplicates(base[layer], num_ranks):
                continue  # local search needs distinct experts per rank: only the fresh start below applies
            score[layer] = self._search(x[layer], weight, out[layer], base[layer], num_ranks, move_cost[layer],
                                        budget, max_steps)
        fresh_score = np.array([_objective(x[layer], weight, fresh[layer], num_ranks, num_experts)
                                for layer in range(num_layers)])
        restart = fresh_score + 0.5 * num_slots * move_cost < score
        if restart.any() and budget > 0:
            matched = match_ranks(fresh[restart], base[restart], num_ranks, across_nodes=True)
            for layer, start in zip(np.flatnonzero(restart), matched):
                table = start.copy()
                if _has_duplicates(table, num_ranks):
                    continue
                moved_start = int((table != base[layer]).sum())
                if moved_start > budget:
                    continue
                restarted = self._search(x[layer], weight, table, base[layer], num_ranks, move_cost[layer],
                                         budget, max_steps)
                moved = int((table != base[layer]).sum())
                if restarted + move_cost[layer] * moved < score[layer] + move_cost[layer] * \
                        int((out[layer] != base[layer]).sum()):
                    out[layer] = table
        log.debug("auto: %d layers changed, %d restarted", int((out != base).any(axis=1).sum()),
                  int(restart.sum()))
        return out

    @staticmethod
    def _search(x, weight, row, original, num_ranks, move_cost, budget, max_steps) -> float:
        """Local search on one layer; ``row`` ``[P]`` is improved in place. Returns the objective."""
        table = row.reshape(num_ranks, -1)
        counts = np.bincount(row, minlength=x.shape[1]).astype(np.int64)
        value, _, steps = kernels.local_search(x, weight, table, original.reshape(num_ranks, -1), counts,
                                        float(move_cost), int(budget), int(max_steps))
        log.debug("auto: %d search steps", steps)
        return float(value)

    def __repr__(self) -> str:
        return (f"Auto(num_episodes={self.num_episodes}, half_life={self.half_life}, min_gain={self.min_gain}, "
                f"move_budget={self.move_budget}, max_moves={self.max_moves})")


def _objective(x, weight, row, num_ranks, num_experts) -> float:
    counts = np.bincount(row, minlength=num_experts).astype(np.int64)
    return float(kernels.objective(x, weight, row.reshape(num_ranks, -1), counts))


def _has_duplicates(row: np.ndarray, num_ranks: int) -> bool:
    table = np.sort(row.reshape(num_ranks, -1), axis=1)
    return bool((table[:, 1:] == table[:, :-1]).any())


def _number(name: str, value, allow_none: bool = False, positive: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        expected = "a finite number > 0" if positive else "a finite number >= 0"
        raise PolicyError(f"auto option {name} must be {expected}{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


POLICY = Auto
