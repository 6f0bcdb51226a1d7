"""FlashLB (vllm-ascend policy type 3): placements judged over time, not only on the window sum.

Per layer: the window is cut into episodes (+1 to every per-step count, so no expert is ever idle); each expert's
mean, unbiased variance and covariances across episodes give a risk weight ``mean + z * std``. The FlashTree search
tries replica allotments around the greedy min-max one, deploys each with a covariance-aware LPT (two replicas of one
expert never share a rank) and scores each by the mean over episodes of the episode's PAR. New ranks are matched to
old ones so that as many experts as possible stay (:func:`eplb.policies.shared.retention.match_ranks`).

Two rule sets (option ``rules``):

- ``"vllm-ascend"`` (the default) does what vllm-ascend's ``FlashLB`` does, with its state across cycles: a layer is
  re-planned when it was never improved, or its average-to-peak on the window's steps (``1 /`` the score on the raw
  steps, +1 each) fell below ``replan_ratio`` x its value recorded at its last improvement or below
  ``replan_floor``; every re-planned layer takes its new placement, better or not; the search settles on its last
  group's best candidate (:mod:`eplb.policies._flashlb_ascend_kernels`). The state (:meth:`FlashLB.next_state`)
  records, for a layer whose plan is in force after the cycle, the new placement's average-to-peak on the episodes
  when it exceeds the current one on the raw steps. Differences that remain: docs/peers.md.
- ``"eplb"`` is our version, better on purpose: the current placement is scored on the same episodes as the
  candidate (scoring it on raw steps biases the comparison towards changing), a layer changes only when that
  predicted gain is positive, the search keeps the best candidate it scored, and the state is each applied layer's
  average-to-peak on its episodes.

Either way the state travels through the planning function (:func:`eplb.cycle.planning.plan_cycle`) from one cycle to
the next, in the simulator and in the runtime alike; a single call can pass it as the ``last_balance`` option. A layer
never recorded is always re-planned.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from eplb._arrays import to_numpy
from eplb.errors import PolicyError
from eplb.load import episodes
from eplb.placement import Placement
from eplb.policies import _flashlb_ascend_kernels as ascend_kernels
from eplb.policies import _flashlb_kernels as kernels
from eplb.policies.base import Policy
from eplb.policies.shared.retention import match_ranks
from eplb.topology import Topology

__all__ = ["FlashLB", "POLICY", "episode_load"]

log = logging.getLogger(__name__)

# Score differences below this fraction of the current score are rounding, not a gain.
_GAIN_TOLERANCE = 1e-9
# Below this many ranks the reference re-plans more eagerly.
_SMALL_GROUP = 32
#: values of the ``rules`` option: what vllm-ascend's code does, or our version
RULES = ("vllm-ascend", "eplb")
#: vllm-ascend's z: the 75th percentile of the standard normal distribution
Z_75 = 0.6744897501960817


def episode_load(load: np.ndarray, num_episodes: int) -> np.ndarray:
    """float64 ``[L, S, E]``: the hotness FlashLB plans on.

    Every per-step count gets +1, then the last steps are cut into ``S = min(num_episodes, T)`` episodes and summed
    (:func:`eplb.load.episodes`). A window load ``[L, E]`` is a single episode.
    """
    if load.ndim == 2:
        return load.astype(np.float64)[:, None, :] + 1.0
    steps_per_episode = load.shape[0] // max(1, min(num_episodes, load.shape[0]))
    return episodes(load, num_episodes).transpose(1, 0, 2) + float(steps_per_episode)


def _episode_arrays(load: np.ndarray, num_episodes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(xt [L, E, S], total [L, S])`` of :func:`episode_load`, C-ordered and writable in every call: numba
    compiles each array layout and read-only flag separately."""
    x = episode_load(load, num_episodes)
    return np.ascontiguousarray(x.transpose(0, 2, 1)), np.ascontiguousarray(x.sum(axis=2))


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PolicyError(f"flashlb option {name} must be an integer >= 1, got {value!r}")
    return int(value)


def _fraction(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 < value <= 1:
        raise PolicyError(f"flashlb option {name} must be a number in (0, 1], got {value!r}")
    return float(value)


class FlashLB(Policy):
    """FlashLB: covariance-aware replica allotment and deployment, re-planning only the layers whose balance fell.

    Args:
        rules: ``"vllm-ascend"`` (what vllm-ascend's policy file does) or ``"eplb"`` (our version); see the module
            docstring.
        num_episodes: episodes the window is cut into (``[T, L, E]`` loads; a ``[L, E]`` load is one episode).
        z: weight of the standard deviation in the risk weight and the LPT rank score (the 75th percentile).
        depth: groups of experts the FlashTree search fixes one after another.
        width: the search tries each group's share of the extra replicas within ``+-width`` of the greedy guess.
        replan_ratio: re-plan a layer whose average-to-peak fell below this fraction of its recorded value.
            Default 0.9, or 0.95 for fewer than 32 ranks.
        replan_floor: re-plan a layer whose average-to-peak is below this. Default 0.85, or 0.9 for fewer than 32
            ranks.
        last_balance: float ``[L]`` in (0, 1], each layer's recorded average-to-peak, as :meth:`next_state` keeps it
            (NaN: none). When None (the default) and no state is handed in, every layer is re-planned.

    ``slots_per_rank`` must not exceed the number of experts, since no rank holds an expert twice.
    """

    name = "flashlb"
    allow_shared_rank = False
    wants_steps = True

    def __init__(self, rules: str = "vllm-ascend", num_episodes: int = 64, z: float = Z_75, depth: int = 4,
                 width: int = 8, replan_ratio: float | None = None, replan_floor: float | None = None,
                 last_balance=None):
        if rules not in RULES:
            raise PolicyError(f"flashlb option rules must be one of {', '.join(RULES)}, got {rules!r}")
        self.rules = rules
        self.num_episodes = _positive_int("num_episodes", num_episodes)
        if isinstance(z, bool) or not isinstance(z, (int, float, np.number)) or not math.isfinite(z) or z < 0:
            raise PolicyError(f"flashlb option z must be a finite number >= 0, got {z!r}")
        self.z = float(z)
        self.depth = _positive_int("depth", depth)
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 0:
            raise PolicyError(f"flashlb option width must be an integer >= 0, got {width!r}")
        self.width = int(width)
        self.replan_ratio = _fraction("replan_ratio", replan_ratio)
        self.replan_floor = _fraction("replan_floor", replan_floor)
        self.last_balance = None
        if last_balance is not None:
            balance = to_numpy(last_balance, "flashlb option last_balance", PolicyError)
            if balance.dtype.kind not in "iuf":
                raise PolicyError(f"flashlb option last_balance must hold numbers, got dtype {balance.dtype}")
            balance = balance.astype(np.float64)
            known = balance[~np.isnan(balance)]
            if balance.ndim != 1 or not np.all((known > 0) & (known <= 1)):
                raise PolicyError(f"flashlb option last_balance must be a 1-D array of values in (0, 1] or NaN, got "
                                  f"shape {balance.shape} with values in [{known.min(initial=np.nan)}, "
                                  f"{known.max(initial=np.nan)}]")
            self.last_balance = balance

    def place(self, load: np.ndarray, topology: Topology, current: Placement | None, window: np.ndarray,
              state=None) -> np.ndarray:
        num_layers, num_experts = load.shape[-2:]
        num_ranks, slots = topology.num_ranks, topology.slots_per_rank
        if slots > num_experts:
            raise PolicyError(f"flashlb never puts an expert twice on a rank, so slots_per_rank ({slots}) must be "
                              f"<= the number of experts ({num_experts})")
        last = self.last_balance if state is None else state
        balance = None if current is None else self._balance(load, current)
        selected = self._candidates(balance, num_ranks, num_layers, last)
        if self.rules == "vllm-ascend":
            new, _ = ascend_kernels.plan_layers(episode_load(load, self.num_episodes), selected, num_ranks, slots,
                                                self.z, self.depth, self.width)
            change = selected
        else:
            xt, total = _episode_arrays(load, self.num_episodes)
            new, new_score = kernels.plan_layers(xt, total, selected, num_ranks, slots, self.z, self.depth,
                                                 self.width)
            if current is not None:  # the same episodes on both sides: a strict gain, rounding aside
                with np.errstate(invalid="ignore"):
                    change = selected & (new_score < (1.0 / balance) * (1 - _GAIN_TOLERANCE))
        if current is None:
            return new
        log.debug("flashlb: %d layers re-planned, %d changed", selected.sum(), change.sum())
        out = current.phy2log.copy()
        if change.any():
            out[change] = match_ranks(new[change], out[change], num_ranks, across_nodes=True)
        return out

    def _balance(self, load: np.ndarray, placement: Placement) -> np.ndarray:
        """float64 ``[L]``: each layer's average-to-peak under ``placement`` (``1 /`` its score). vllm-ascend's
        rules: on the window's raw steps (+1 each), in float32 as the reference keeps it; ours: on the episodes the
        search scores its candidates on."""
        load = np.asarray(load)
        rows = np.array(placement.phy2log, dtype=np.int64, order="C")
        num_ranks = placement.topology.num_ranks
        if self.rules == "eplb":
            xt, total = _episode_arrays(load, self.num_episodes)
            return 1.0 / kernels.score_layers(xt, total, rows, num_ranks)
        steps = (load[None] if load.ndim == 2 else load).astype(np.float64) + 1.0
        counts = placement.replica_count
        return np.array([np.float32(1) / ascend_kernels.score(np.ascontiguousarray(steps[:, layer]), counts[layer],
                                                              rows[layer].reshape(num_ranks, -1))
                         for layer in range(rows.shape[0])], dtype=np.float64)

    def _candidates(self, balance, num_ranks: int, num_layers: int, last) -> np.ndarray:
        """bool ``[L]``: the layers to re-plan (cherry-picking): each layer's average-to-peak now against ``last``,
        its recorded value (NaN: none). vllm-ascend's rules compare in float32, as the reference does."""
        if balance is None or last is None:
            return np.ones(num_layers, dtype=bool)
        last = np.asarray(last, dtype=np.float64)
        if last.shape != (num_layers,):
            raise PolicyError(f"flashlb option last_balance has {last.shape[0]} layers, the load has {num_layers}")
        small = num_ranks < _SMALL_GROUP
        ratio = self.replan_ratio if self.replan_ratio is not None else (0.95 if small else 0.9)
        floor = self.replan_floor if self.replan_floor is not None else (0.9 if small else 0.85)
        if self.rules == "vllm-ascend":
            balance, last = balance.astype(np.float32), last.astype(np.float32)
            ratio, floor = np.float32(ratio), np.float32(floor)
        with np.errstate(invalid="ignore"):
            return np.isnan(last) | (balance < floor) | (balance < last * ratio)

    def next_state(self, state, plan, layers, load):
        """float64 ``[L]``: each layer's recorded average-to-peak (NaN: none), what cherry-picking compares against
        once ``layers`` of ``plan`` are applied. Ours: an applied layer's on the window's episodes. vllm-ascend's:
        a layer it re-planned whose plan is in force (applied, or equal to the placement in force) records its new
        average-to-peak on the episodes when that exceeds the old one on the raw steps (in float32)."""
        if state is None:
            state = np.full(plan.par_after.shape, np.nan) if self.last_balance is None else self.last_balance
        record = np.array(state, dtype=np.float64)
        load = np.asarray(load)
        num_ranks = plan.placement.topology.num_ranks
        layers = list(layers)
        if self.rules == "eplb":
            if layers:
                xt, total = _episode_arrays(load[..., layers, :], self.num_episodes)
                rows = np.array(plan.placement.phy2log[layers], dtype=np.int64, order="C")
                record[layers] = 1.0 / kernels.score_layers(xt, total, rows, num_ranks)
            return record
        before = self._balance(load, plan.reference)
        in_force = ~np.asarray(plan.changed, dtype=bool)
        in_force[layers] = True
        episodes = episode_load(load, self.num_episodes)
        counts = plan.placement.replica_count
        for layer in np.flatnonzero(self._candidates(before, num_ranks, len(record), record) & in_force):
            score = ascend_kernels.score(np.ascontiguousarray(episodes[layer]), counts[layer],
                                         plan.placement.phy2log[layer].reshape(num_ranks, -1))
            after = np.float32(1) / score
            if after - np.float32(before[layer]) > 0:
                record[layer] = after
        return record

    def __repr__(self) -> str:
        return (f"FlashLB(rules={self.rules!r}, num_episodes={self.num_episodes}, z={self.z}, depth={self.depth}, "
                f"width={self.width}, replan_ratio={self.replan_ratio}, replan_floor={self.replan_floor}, "
                f"last_balance={'None' if self.last_balance is None else 'given'})")


POLICY = FlashLB
