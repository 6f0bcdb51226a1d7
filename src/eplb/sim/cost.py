"""Step-time cost model of the MoE layers, and expert sizes of known models.

Model (all times in microseconds):

- A rank's time in one MoE layer is ``layer_fixed_us + token_us * tokens``, where ``tokens`` counts the routings
  it serves (one token on one expert). The fixed part is what a rank pays however few tokens it gets (reading its
  experts' weights, kernel launches, the dispatch / combine latency); the per-token part is the expert GEMMs.
- A layer finishes when its busiest rank does (the combine waits for everyone), so the layer costs
  ``layer_fixed_us + token_us * max over ranks of tokens``, and a step's MoE time is the sum over its layers.
  Perfect balance (PAR = 1) replaces the max by the mean.
- Moving expert weights costs ``bytes / bandwidth`` on the receiving rank that receives the most in that step;
  transfers run beside compute and hide behind up to ``overlap`` x the step's MoE time; the rest adds to the step
  (the contention a transfer causes; counted in the step it is posted in).
- Serving never waits for a transfer: a transfer spans as many forwards as its time needs
  (:meth:`CostModel.transfer_forwards`, from each step's MoE time at perfect balance), and its layers switch one step
  after the forward it lands in (:mod:`eplb.cycle`'s apply rule).

Defaults are DeepSeek-V3 decode on Hopper-class GPUs: each expert is three 7168 x 2048 FP8 matrices (44 MB), read
at ~3 TB/s in ~15 us; 5 slots per rank plus dispatch / combine latency give ~80 us per layer; a routed token costs
~88 MFLOP, ~0.2 us at the throughput a grouped GEMM reaches; weights move at 50 GB/s per rank (400 Gb/s RDMA) and
half of a step's compute time can hide a transfer. They are estimates: the relative figures (speed-up versus no
balancing, share of the perfect-balance speed) are what the simulator reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eplb.cycle.pricing import DEEPSEEK_V3_EXPERT_BYTES, DEFAULT_BANDWIDTH_GBS, DEFAULT_TOKEN_US, MovePrice, price_of
from eplb.errors import EplbError

__all__ = ["CostModel", "MODEL_EXPERT_BYTES", "expert_bytes_of"]

#: bytes of one routed expert's weights (with quantisation scales) per model preset
MODEL_EXPERT_BYTES = {
    # 3 x 7168 x 2048 FP8 weights + 128 x 128-block FP32 scales
    "deepseek-v3": DEEPSEEK_V3_EXPERT_BYTES,
    # 3 x 4096 x 1536 BF16 weights (Qwen3-235B-A22B)
    "qwen3-235b-a22b": 3 * 4096 * 1536 * 2,
}


def expert_bytes_of(model: str) -> int:
    """Bytes of one expert of a model preset (see :data:`MODEL_EXPERT_BYTES`).

    Raises:
        EplbError: unknown preset.
    """
    if model not in MODEL_EXPERT_BYTES:
        raise EplbError(f"unknown model preset {model!r}; expected one of {', '.join(MODEL_EXPERT_BYTES)} "
                        "(or give the expert size in bytes)")
    return MODEL_EXPERT_BYTES[model]


@dataclass(frozen=True)
class CostModel:
    """The step-time model (see the module docstring).

    Attributes:
        layer_fixed_us: a rank's fixed time per MoE layer.
        token_us: time per routing (token x expert) a rank serves.
        bandwidth_gbs: expert-weight transfer bandwidth per receiving rank, GB/s.
        overlap: share of a step's MoE time that transfers can hide behind (0 = fully exposed).
    """

    layer_fixed_us: float = 80.0
    token_us: float = DEFAULT_TOKEN_US
    bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS
    overlap: float = 0.5

    def __post_init__(self):
        for name in ("layer_fixed_us", "token_us", "overlap"):
            if not getattr(self, name) >= 0:
                raise EplbError(f"cost model {name} must be >= 0, got {getattr(self, name)!r}")
        if not self.bandwidth_gbs > 0:
            raise EplbError(f"cost model bandwidth_gbs must be > 0, got {self.bandwidth_gbs!r}")

    def move_price(self, expert_bytes, life_steps: float | None = None) -> MovePrice:
        """What a moved expert of ``expert_bytes`` and a routing on a busiest rank cost in this model
        (:mod:`eplb.cycle.pricing`): the price ``auto`` weighs its moves with in the simulator."""
        return price_of(expert_bytes, self.bandwidth_gbs, self.token_us, life_steps)

    def moe_us(self, peak_tokens) -> np.ndarray:
        """float64 ``[T]``: MoE time of each step from the busiest rank's routings ``[T, L]`` in each layer."""
        peak_tokens = np.asarray(peak_tokens, dtype=np.float64)
        return (self.layer_fixed_us + self.token_us * peak_tokens).sum(axis=-1)

    def transfer_us(self, received_bytes) -> np.ndarray:
        """float64 ``[T]``: transfer time of each step from the busiest receiving rank's bytes ``[T]``."""
        return np.asarray(received_bytes, dtype=np.float64) / (self.bandwidth_gbs * 1e3)

    def transfer_forwards(self, received_bytes: float, step_us) -> int:
        """Forwards a transfer of ``received_bytes`` (to its busiest receiving rank) spans: the smallest ``n >= 1``
        whose first ``n`` steps' MoE times (``step_us``, float ``[n']`` from the step it is posted in on) cover its
        time at ``bandwidth_gbs``; ``n' + 1`` when they never do."""
        covered = np.cumsum(np.asarray(step_us, dtype=np.float64))
        return int(np.searchsorted(covered, float(self.transfer_us(received_bytes)), side="left")) + 1

    def exposed_us(self, transfer_us, moe_us) -> np.ndarray:
        """float64 ``[T]``: the part of each step's transfer time that compute does not hide."""
        return np.clip(np.asarray(transfer_us) - self.overlap * np.asarray(moe_us), 0.0, None)
