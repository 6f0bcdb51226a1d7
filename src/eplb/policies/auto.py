"""``auto``: per-step balance close to FlashLB's at a fraction of its weight moves.

Method (docs/auto.md):

1. Forecast. The window ``[T, L, E]`` is cut into ``S`` episodes (consecutive blocks of steps, summed); episode
   ``s`` gets the weight ``0.5 ** (age / half_life)`` (age in steps), so recent traffic counts more under drift
   while the spread across episodes still shows which experts are volatile. A window sum ``[L, E]`` is one episode.
2. Objective. Per layer, the weighted sum over episodes of the busiest rank's load (even split over replicas): the
   token-weighted per-step PAR the simulator scores, on episode sums instead of single noisy steps.
3. Local search from the placement in force (:mod:`eplb.policies._auto_kernels`): swaps of two slots and
   reassignments of a spare replica (which change replica counts), aimed at the busiest ranks, each accepted only
   when the step time its exact gain on the objective saves over the plan's life exceeds the step time its
   transfers cost (:mod:`eplb.cycle.pricing`: the cost model ``eplb simulate`` scores with, or the runtime's measured
   figures), within ``move_budget``; ``min_gain`` (PAR per moved slot) overrides the price. Experts stay where they
   are unless moving them pays, so no rank relabelling is needed afterwards.
4. Fresh start. A greedy placement (replica counts by load per replica, heaviest replica to the lightest rank) is
   also built. Its ranks are matched to the current ones (:func:`eplb.policies.shared.retention.match_ranks`) and the
   local search continues from it where it beats the local-search result by more than the cost of moving half the slots,
   or, whatever it moves (within ``move_budget``), where the placement in force scores more than ``reset`` above
   it (e.g. the initial layout): one slot at a time, the search does not leave such a poor basin, and every later
   plan would inherit it.

No expert is placed twice on a rank. Deterministic: no randomness, stable orders, ties to lower ids.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from eplb.cycle.pricing import DEFAULT_PRICE, MovePrice
from eplb.errors import PolicyError
from eplb.load import episodes
from eplb.placement import Placement
from eplb.policies import _auto_kernels as kernels
from eplb.policies.base import Policy
from eplb.policies.shared.packing import greedy_tables, spread_duplicates
from eplb.policies.shared.retention import match_ranks
from eplb.topology import Topology

__all__ = ["Auto", "POLICY", "forecast"]

log = logging.getLogger(__name__)

# charge of a replicated expert's replicas in the objective, per dispatch rule (see _auto_kernels)
_LIQUID = {"even": 1.0, "balanced": 0.8}


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
        min_gain: override of the price: predicted PAR improvement (on the weighted episodes) each moved slot must
            bring; 0 accepts every improving move. None (default): moves are priced in step time.
        expert_bytes, bandwidth_gbs: bytes of one expert's weights and the transfer bandwidth per receiving rank
            (GB/s); a moved expert costs their quotient. Either one given: the other defaults to DeepSeek-V3's
            44 MB / 50 GB/s. None: the figure the caller hands on (:func:`eplb.cycle.planning.plan_cycle`), else that.
        move_ms: measured milliseconds to move one expert to a rank (overrides ``expert_bytes`` / ``bandwidth_gbs``).
        token_us: microseconds per routing on a layer's busiest rank (the step-time model's per-token cost).
        life_steps: steps a plan stays in force (the re-plan interval); None: what the caller hands on, else the
            window's length.
        move_budget: this fraction of each layer's slots may move per plan (None: no limit); budget a plan does not
            spend carries over to later plans (up to one layer's slots), so a small budget still leaves a poor
            layout over a few cycles. With the price it traces the balance-vs-moves curve.
        max_moves: at most this many accepted swaps/reassignments per layer (None: 4 x slots).
        dispatch: the replica choice the placement is made for: ``even`` (each replica serves the same share)
            or ``balanced`` (per-batch min-max split, :mod:`eplb.dispatch`): replicated experts then count as
            movable load, so the search flattens the load of single-replica experts and spreads replicas.
        reset: a layer whose placement in force scores more than this fraction above the fresh greedy placement
            on the window is re-planned from the fresh start, moves not counted against ``min_gain`` (None: never).
    """

    name = "auto"
    wants_steps = True
    allow_shared_rank = False

    prices_moves = True

    def __init__(self, num_episodes: int = 32, half_life: float | None = 300.0, min_gain: float | None = None,
                 move_budget: float | None = None, max_moves: int | None = None, dispatch: str = "even",
                 reset: float | None = 0.3, expert_bytes: float | None = None, bandwidth_gbs: float | None = None,
                 move_ms: float | None = None, token_us: float | None = None, life_steps: float | None = None):
        if isinstance(num_episodes, bool) or not isinstance(num_episodes, (int, np.integer)) or num_episodes < 1:
            raise PolicyError(f"auto option num_episodes must be an integer >= 1, got {num_episodes!r}")
        self.num_episodes = int(num_episodes)
        self.half_life = _number("half_life", half_life, allow_none=True, positive=True)
        self.min_gain = _number("min_gain", min_gain, allow_none=True)
        self.expert_bytes = _number("expert_bytes", expert_bytes, allow_none=True, positive=True)
        self.bandwidth_gbs = _number("bandwidth_gbs", bandwidth_gbs, allow_none=True, positive=True)
        self.move_ms = _number("move_ms", move_ms, allow_none=True)
        self.token_us = _number("token_us", token_us, allow_none=True, positive=True)
        self.life_steps = _number("life_steps", life_steps, allow_none=True, positive=True)
        self.move_budget = _number("move_budget", move_budget, allow_none=True)
        if self.move_budget is not None and self.move_budget > 1:
            raise PolicyError(f"auto option move_budget must be a fraction in [0, 1], got {move_budget!r}")
        if max_moves is not None and (isinstance(max_moves, bool) or not isinstance(max_moves, (int, np.integer))
                                      or max_moves < 0):
            raise PolicyError(f"auto option max_moves must be None or an integer >= 0, got {max_moves!r}")
        self.max_moves = None if max_moves is None else int(max_moves)
        if not isinstance(dispatch, str) or dispatch not in _LIQUID:
            raise PolicyError(f"auto option dispatch must be one of {', '.join(_LIQUID)}, got {dispatch!r}")
        self.dispatch = dispatch
        self.reset = _number("reset", reset, allow_none=True)

    def price(self, handed: MovePrice | None = None) -> MovePrice:
        """The price moves are weighed with: the options where set, else what the caller ``handed`` on, else
        DeepSeek-V3's (:data:`eplb.cycle.pricing.DEFAULT_PRICE`)."""
        base = handed or DEFAULT_PRICE
        move_us = base.move_us
        if self.move_ms is not None:
            move_us = self.move_ms * 1e3
        elif self.expert_bytes is not None or self.bandwidth_gbs is not None:
            expert_bytes = DEFAULT_PRICE.move_us * 50e3 if self.expert_bytes is None else self.expert_bytes
            move_us = expert_bytes / ((50.0 if self.bandwidth_gbs is None else self.bandwidth_gbs) * 1e3)
        return MovePrice(move_us=move_us, token_us=base.token_us if self.token_us is None else self.token_us,
                         life_steps=base.life_steps if self.life_steps is None else self.life_steps)

    def budgets(self, num_layers: int, num_slots: int, state=None) -> np.ndarray:
        """int64 ``[L]``: slots each layer may move in this plan: the per-plan budget plus what earlier plans left
        unspent (``state``, see :meth:`next_state`), or every slot without ``move_budget``."""
        if self.move_budget is None:
            return np.full(num_layers, num_slots, dtype=np.int64)
        carried = np.zeros(num_layers) if state is None else np.asarray(state, dtype=np.float64)
        return np.minimum(np.floor(self.move_budget * num_slots + carried), num_slots).astype(np.int64)

    def next_state(self, state, plan, layers, load):
        """Unspent move budget per layer ``[L]`` (float64) once ``layers`` of ``plan`` are applied, at most one
        layer's slots; None without ``move_budget``."""
        if self.move_budget is None:
            return None
        num_layers, num_slots = plan.placement.phy2log.shape
        carried = np.zeros(num_layers) if state is None else np.asarray(state, dtype=np.float64)
        spent = np.zeros(num_layers)
        spent[list(layers)] = plan.moved_slots[list(layers)]
        return np.clip(carried + self.move_budget * num_slots - spent, 0.0, num_slots)

    def place(self, load: np.ndarray, topology: Topology, current: Placement | None, window: np.ndarray,
              state=None, price: MovePrice | None = None) -> np.ndarray:
        num_layers, num_experts = load.shape[-2:]
        num_ranks, slots = topology.num_ranks, topology.slots_per_rank
        num_slots = topology.num_physical
        if slots > num_experts:
            raise PolicyError(f"auto never puts an expert twice on a rank, so slots_per_rank ({slots}) must be <= "
                              f"the number of experts ({num_experts})")
        x, weight = forecast(load, self.num_episodes, self.half_life)
        liquid = _LIQUID[self.dispatch]
        mean_x = np.einsum("lse,s->le", x, weight / weight.sum())
        fresh = greedy_tables(mean_x, num_ranks, slots).reshape(num_layers, num_slots)
        fresh = spread_duplicates(fresh, mean_x[np.arange(num_layers)[:, None], fresh], num_ranks)
        move_cost = self._move_cost(load, x, weight, num_ranks, price)
        budget = self.budgets(num_layers, num_slots, state)
        max_steps = 4 * num_slots if self.max_moves is None else self.max_moves
        if current is None:
            out = fresh.copy()
            # moves away from the greedy start must pay too: a gain threshold that keeps the search short
            self._search(x, weight, out, out.copy(), num_ranks, move_cost, np.full(num_layers, num_slots),
                         max_steps, liquid, ~_has_duplicates(out, num_ranks))
            return out
        base = np.ascontiguousarray(current.phy2log)
        out = base.copy()
        fresh_score = _objectives(x, weight, fresh, num_ranks, num_experts, liquid)
        # a placement far worse than a fresh one (e.g. the initial layout) is a poor basin that moves paying one
        # by one do not leave: such layers are re-planned from the fresh start whatever it moves
        usable = ~_has_duplicates(fresh, num_ranks)
        reset = np.zeros(num_layers, dtype=bool) if self.reset is None else usable & (
            _objectives(x, weight, base, num_ranks, num_experts, liquid) > (1 + self.reset) * fresh_score)
        # ranks of the fresh start matched to the current ones, only in the layers that may start from it
        start, matched = base.copy(), np.zeros(num_layers, dtype=bool)

        def match(layers):
            todo = layers & ~matched
            if todo.any():
                start[todo] = match_ranks(fresh[todo], base[todo], num_ranks, across_nodes=True)
                matched[todo] = True

        match(reset)
        reset &= (start != base).sum(axis=1) <= budget
        # local search needs distinct experts per rank: elsewhere only the fresh start below applies
        clean = ~_has_duplicates(base, num_ranks)
        score = self._search(x, weight, out, base, num_ranks, move_cost, budget, max_steps, liquid, clean & ~reset)
        restart = usable & (reset | (fresh_score + 0.5 * num_slots * move_cost < score))
        if restart.any():
            match(restart)
            restart &= (start != base).sum(axis=1) <= budget
            restarted = self._search(x, weight, start, base, num_ranks, move_cost, budget, max_steps, liquid,
                                     restart)
            # the restart wins where its objective plus the cost of its moves is lower, and always on a reset
            kept = score + move_cost * (out != base).sum(axis=1)
            better = restart & (reset | (restarted + move_cost * (start != base).sum(axis=1)
                                         < np.where(clean, kept, np.inf)))
            out[better] = start[better]
        log.debug("auto: %d layers changed, %d restarted", int((out != base).any(axis=1).sum()), int(restart.sum()))
        return out

    def _move_cost(self, load, x, weight, num_ranks, price) -> np.ndarray:
        """float64 ``[L]``: one moved slot's cost in objective units (weighted episode sums of the busiest rank's
        load). With ``min_gain``: that many PAR points on the weighted mean rank load. Else priced: a routing less
        on the busiest rank in every step lowers the objective by the weighted number of steps the episodes hold,
        and saves ``token_us`` per step of the plan's life; a moved slot costs ``move_us / W``."""
        if self.min_gain is not None:
            return self.min_gain * np.einsum("lse,s->l", x, weight) / num_ranks
        price = self.price(price)
        steps = load.shape[0] if load.ndim == 3 else None
        life = price.life_steps or steps or 1.0
        # per-step objective weight: each episode holds steps // S steps (a window sum: one episode of `life`)
        per_episode = life if steps is None else steps // x.shape[1]
        weighted_steps = np.full(x.shape[0], float(weight.sum() * per_episode))
        return price.slot_cost(num_ranks, weighted_steps, life)

    @staticmethod
    def _search(x, weight, rows, original, num_ranks, move_cost, budget, max_steps, liquid, active=None):
        """Local search on every ``active`` layer; ``rows`` ``[L, P]`` are improved in place. Returns the
        objectives ``[L]`` (inf where inactive)."""
        num_layers = rows.shape[0]
        active = np.ones(num_layers, dtype=bool) if active is None else active
        tables = rows.reshape(num_layers, num_ranks, -1)
        # a writable copy: numba compiles a kernel once per array type, and read-only arrays are another type
        original = np.array(original, dtype=np.int64)
        return kernels.search_layers(x, weight, tables, original.reshape(num_layers, num_ranks, -1),
                                     np.ascontiguousarray(move_cost, dtype=np.float64),
                                     np.ascontiguousarray(budget, dtype=np.int64), int(max_steps),
                                     float(liquid), active)

    def __repr__(self) -> str:
        return (f"Auto(num_episodes={self.num_episodes}, half_life={self.half_life}, min_gain={self.min_gain}, "
                f"move_budget={self.move_budget}, max_moves={self.max_moves}, dispatch={self.dispatch!r}, "
                f"reset={self.reset}, expert_bytes={self.expert_bytes}, bandwidth_gbs={self.bandwidth_gbs}, "
                f"move_ms={self.move_ms}, token_us={self.token_us}, life_steps={self.life_steps})")


def _objectives(x, weight, rows, num_ranks, num_experts, liquid) -> np.ndarray:
    """float64 ``[L]``: the episode objective of every layer of ``rows`` ``[L, P]``."""
    out = np.empty(rows.shape[0])
    rows = np.array(rows, dtype=np.int64)  # writable, as in every call (one compiled kernel type)
    for layer, row in enumerate(rows):
        counts = np.bincount(row, minlength=num_experts).astype(np.int64)
        out[layer] = kernels.objective(x[layer], weight, row.reshape(num_ranks, -1), counts, liquid)
    return out


def _has_duplicates(rows: np.ndarray, num_ranks: int) -> np.ndarray:
    """bool ``[L]``: layers of ``rows`` ``[L, P]`` in which some rank holds an expert twice."""
    table = np.sort(rows.reshape(rows.shape[0], num_ranks, -1), axis=2)
    return (table[..., 1:] == table[..., :-1]).any(axis=(1, 2))


def _number(name: str, value, allow_none: bool = False, positive: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        expected = "a finite number > 0" if positive else "a finite number >= 0"
        raise PolicyError(f"auto option {name} must be {expected}{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


POLICY = Auto
