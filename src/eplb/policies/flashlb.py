"""FlashLB (vllm-ascend policy type 3): placements judged over time, not only on the window sum.

Per layer: the window is cut into episodes (+1 to every per-step count, so no expert is ever idle); each expert's
mean, unbiased variance and covariances across episodes give a risk weight ``mean + z * std``. The FlashTree search
tries replica allotments around the greedy min-max one, deploys each with a covariance-aware LPT (two replicas of one
expert never share a rank) and keeps the allotment with the best per-episode score (mean over episodes of the
episode's PAR).

Differences from the reference, on purpose:

- The current placement is scored on the same episodes as the candidate (the reference scores it on raw steps, which
  biases the comparison towards changing), and a layer is only changed when that predicted gain is positive.
- Cherry-picking compares each layer's average-to-peak with its value when the layer was last applied: the policy's
  state (:meth:`FlashLB.next_state`), which the planning function (:func:`eplb.planning.plan_cycle`) carries from
  one cycle to the next in the simulator and in the runtime alike; a single call can pass it as the
  ``last_balance`` option. A layer never applied is always a candidate (and still needs a positive gain). Without
  the state, a plan made on a fresh window of the same traffic almost always scores a little better on that
  window's noise, so nearly every layer is re-planned and most slots move each cycle.
- Changed layers keep as many experts in place as possible: new ranks are matched to old ones (Hungarian) and
  experts a rank keeps stay in their slot (:func:`eplb.policies.retention.match_ranks`).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from eplb._arrays import to_numpy
from eplb.errors import PolicyError
from eplb.load import episodes
from eplb.placement import Placement
from eplb.policies import _flashlb_kernels as kernels
from eplb.policies.base import Policy
from eplb.policies.retention import match_ranks
from eplb.topology import Topology

__all__ = ["FlashLB", "POLICY", "episode_load"]

log = logging.getLogger(__name__)

# Score differences below this fraction of the current score are rounding, not a gain.
_GAIN_TOLERANCE = 1e-9
# Below this many ranks the reference re-plans more eagerly.
_SMALL_GROUP = 32


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
    """FlashLB: covariance-aware replica allotment and deployment, re-planning only the layers that gain.

    Args:
        num_episodes: episodes the window is cut into (``[T, L, E]`` loads; a ``[L, E]`` load is one episode).
        z: weight of the standard deviation in the risk weight and the LPT rank score (0.6745: 75th percentile).
        depth: groups of experts the FlashTree search fixes one after another.
        width: the search tries each group's share of the extra replicas within ``+-width`` of the greedy guess.
        replan_ratio: with ``last_balance``, re-plan a layer whose average-to-peak fell below this fraction of its
            value at the last plan. Default 0.9, or 0.95 for fewer than 32 ranks.
        replan_floor: with ``last_balance``, re-plan a layer whose average-to-peak is below this. Default 0.85, or
            0.9 for fewer than 32 ranks.
        last_balance: float ``[L]`` in (0, 1], each layer's average-to-peak when it was last planned: ``1 /`` the
            mean over the episodes of their PAR (FlashLB's score), as :meth:`next_state` keeps it. When None (the
            default) every layer is a candidate.

    A layer changes only when the new placement scores strictly better than ``current`` on the same episodes.
    ``slots_per_rank`` must not exceed the number of experts, since no rank holds an expert twice.
    """

    name = "flashlb"
    allow_shared_rank = False
    wants_steps = True

    def __init__(self, num_episodes: int = 64, z: float = 0.6745, depth: int = 4, width: int = 8,
                 replan_ratio: float | None = None, replan_floor: float | None = None, last_balance=None):
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
            if balance.ndim != 1 or not np.all((balance > 0) & (balance <= 1)):
                raise PolicyError(f"flashlb option last_balance must be a 1-D array of values in (0, 1], got "
                                  f"shape {balance.shape} with values in [{balance.min(initial=np.nan)}, "
                                  f"{balance.max(initial=np.nan)}]")
            self.last_balance = balance

    def place(self, load: np.ndarray, topology: Topology, current: Placement | None, window: np.ndarray,
              state=None) -> np.ndarray:
        num_layers, num_experts = load.shape[-2:]
        num_ranks, slots = topology.num_ranks, topology.slots_per_rank
        if slots > num_experts:
            raise PolicyError(f"flashlb never puts an expert twice on a rank, so slots_per_rank ({slots}) must be "
                              f"<= the number of experts ({num_experts})")
        xt, total = _episode_arrays(load, self.num_episodes)
        old_score = None
        if current is not None:
            old_rows = np.array(current.phy2log, dtype=np.int64, order="C")
            old_score = kernels.score_layers(xt, total, old_rows, num_ranks)
        selected = self._candidates(old_score, num_ranks, num_layers, self.last_balance if state is None else state)
        new, new_score = kernels.plan_layers(xt, total, selected, num_ranks, slots, self.z, self.depth,
                                             self.width)
        if current is None:
            return new
        gain = np.where(selected, old_score - new_score, 0.0)
        apply = gain > _GAIN_TOLERANCE * old_score
        log.debug("flashlb: %d layers re-planned, %d with a positive gain", selected.sum(), apply.sum())
        out = current.phy2log.copy()
        if apply.any():
            out[apply] = match_ranks(new[apply], out[apply], num_ranks, across_nodes=True)
        return out

    def _candidates(self, old_score, num_ranks: int, num_layers: int, last) -> np.ndarray:
        """bool ``[L]``: the layers worth re-planning (cherry-picking): each layer's average-to-peak now
        (``1 / old_score``, the mean over the episodes of their PAR) against ``last``, its value when the layer was
        last applied (NaN: never applied)."""
        if old_score is None or last is None:
            return np.ones(num_layers, dtype=bool)
        last = np.asarray(last, dtype=np.float64)
        if last.shape != (num_layers,):
            raise PolicyError(f"flashlb option last_balance has {last.shape[0]} layers, the load has {num_layers}")
        small = num_ranks < _SMALL_GROUP
        ratio = self.replan_ratio if self.replan_ratio is not None else (0.95 if small else 0.9)
        floor = self.replan_floor if self.replan_floor is not None else (0.9 if small else 0.85)
        balance = 1.0 / old_score
        return np.isnan(last) | (balance < floor) | (balance < ratio * last)

    def next_state(self, state, plan, layers, load):
        """float64 ``[L]``: each layer's average-to-peak over the episodes of the window it was last applied on
        (``1 /`` its score), NaN for a layer never applied: what cherry-picking compares against."""
        if state is None:
            state = np.full(plan.par_after.shape, np.nan) if self.last_balance is None else self.last_balance
        balance = np.array(state, dtype=np.float64)
        layers = list(layers)
        if layers:
            xt, total = _episode_arrays(np.asarray(load)[..., layers, :], self.num_episodes)
            rows = np.array(plan.placement.phy2log[layers], dtype=np.int64, order="C")
            balance[layers] = 1.0 / kernels.score_layers(xt, total, rows, plan.placement.topology.num_ranks)
        return balance

    def __repr__(self) -> str:
        return (f"FlashLB(num_episodes={self.num_episodes}, z={self.z}, depth={self.depth}, width={self.width}, "
                f"replan_ratio={self.replan_ratio}, replan_floor={self.replan_floor}, "
                f"last_balance={'None' if self.last_balance is None else 'given'})")


POLICY = FlashLB
