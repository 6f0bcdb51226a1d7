"""What a moved expert costs and what a busier rank costs, in step time: the price a policy weighs moves with.

A plan pays when the step time it saves over its life exceeds the step time its transfers cost. Both come from the
step-time model of :mod:`eplb.sim.cost`: a layer costs ``token_us`` per routing its busiest rank serves, and moving
one expert costs ``move_us`` on the rank that receives it. A layer's moves land on several ranks that receive in
parallel and the cost model charges the step the busiest receiver's time, so a layer that moves ``m`` slots spread
over its ``W`` ranks costs about ``m / W x move_us``.

Where the figures come from:

- the simulator: :meth:`eplb.sim.cost.CostModel.move_price` (expert bytes over the transfer bandwidth, the model's
  ``token_us``), with the plan's life = the re-plan interval;
- the runtime: :func:`measured_price`, from the transfer time per expert and the step time it measured, agreed by
  every rank before the plan is requested (every rank plans on the same figures);
- the user: the ``auto`` options ``expert_bytes`` / ``bandwidth_gbs`` / ``move_ms``, ``token_us`` and
  ``life_steps``, which override what the caller hands on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from eplb.errors import EplbError

__all__ = ["MovePrice", "measured_price", "price_of", "DEFAULT_PRICE", "DEFAULT_BANDWIDTH_GBS", "DEFAULT_TOKEN_US",
           "DEEPSEEK_V3_EXPERT_BYTES"]

#: the step-time model's defaults (:class:`eplb.sim.cost.CostModel`): DeepSeek-V3 decode on Hopper-class GPUs
DEFAULT_BANDWIDTH_GBS = 50.0
DEFAULT_TOKEN_US = 0.2
#: 3 x 7168 x 2048 FP8 weights + 128 x 128-block FP32 scales
DEEPSEEK_V3_EXPERT_BYTES = 3 * 7168 * 2048 + 3 * 56 * 16 * 4


@dataclass(frozen=True)
class MovePrice:
    """The figures a plan's moves are priced with.

    Attributes:
        move_us: microseconds to move one expert's weights to one rank.
        token_us: microseconds per routing (token x expert) on a layer's busiest rank.
        life_steps: steps the plan is expected to stay in force (the re-plan interval); None: the window's length.
    """

    move_us: float
    token_us: float
    life_steps: float | None = None

    def __post_init__(self):
        for name in ("move_us", "token_us"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value) \
                    or value < 0:
                raise EplbError(f"move price {name} must be a finite number >= 0, got {value!r}")
        if self.token_us == 0:
            raise EplbError("move price token_us must be > 0, got 0")
        if self.life_steps is not None and not (isinstance(self.life_steps, (int, float, np.number))
                                                and math.isfinite(self.life_steps) and self.life_steps > 0):
            raise EplbError(f"move price life_steps must be a number > 0 or None, got {self.life_steps!r}")

    def slot_cost(self, num_ranks: int, tokens_per_step: np.ndarray, life_steps: float) -> np.ndarray:
        """float64 ``[L]``: one moved slot's cost in a layer's busiest-rank routings per step, summed over the
        steps its ``tokens_per_step`` are counted on: ``move_us / num_ranks`` of transfer time against
        ``token_us x life_steps`` saved per routing taken off the busiest rank in every step of the plan's life.

        ``tokens_per_step`` float64 ``[L]`` is, per layer, how many step-routings one routing less on the busiest
        rank in every step is worth in the caller's objective (for a per-step objective: its number of steps)."""
        return (self.move_us / num_ranks) * np.asarray(tokens_per_step, dtype=np.float64) \
            / (self.token_us * life_steps)


def price_of(expert_bytes, bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS, token_us: float = DEFAULT_TOKEN_US,
             life_steps: float | None = None) -> MovePrice:
    """The price of the step-time model: a moved expert costs ``expert_bytes / bandwidth`` (an int ``[L]`` of
    expert bytes: their mean; 0 bytes: DeepSeek-V3's)."""
    size = float(np.mean(expert_bytes)) if np.size(expert_bytes) else 0.0
    size = size if size > 0 else float(DEEPSEEK_V3_EXPERT_BYTES)
    return MovePrice(move_us=size / (bandwidth_gbs * 1e3), token_us=token_us, life_steps=life_steps)


#: a 44 MB FP8 DeepSeek-V3 expert at 50 GB/s, 0.2 us per routing: the price when nothing else is known
DEFAULT_PRICE = price_of(DEEPSEEK_V3_EXPERT_BYTES)


def measured_price(move_s_per_expert: float, step_s: float, window: np.ndarray, phy2log: np.ndarray,
                   num_ranks: int, life_steps: float) -> MovePrice | None:
    """The price from what the runtime measured: seconds per received expert, and the median step time.

    The step time is attributed to the routings of each layer's busiest rank under the placement in force (even
    split over replicas, from the window's per-step mean load ``[L, E]`` or ``[T, L, E]``): ``token_us`` is the
    step time over those routings, an upper bound that counts attention and the fixed per-layer costs as token
    work (so moves look cheaper than they are rather than dearer). None when a figure is missing (no transfer or
    no step measured yet).
    """
    if not (move_s_per_expert > 0 and step_s > 0):
        return None
    window = np.asarray(window, dtype=np.float64)
    steps = window.shape[0] if window.ndim == 3 else 1
    load = (window.sum(axis=0) if window.ndim == 3 else window) / steps
    phy2log = np.asarray(phy2log, dtype=np.int64)
    num_layers = phy2log.shape[0]
    rows = np.arange(num_layers)[:, None]
    counts = np.zeros(load.shape)
    np.add.at(counts, (np.broadcast_to(rows, phy2log.shape), phy2log), 1)
    share = load[rows, phy2log] / np.maximum(counts[rows, phy2log], 1)
    peak = share.reshape(num_layers, num_ranks, -1).sum(axis=2).max(axis=1).sum()
    if peak <= 0:
        return None
    return MovePrice(move_us=move_s_per_expert * 1e6, token_us=step_s * 1e6 / peak, life_steps=life_steps)
