"""``random`` (vllm-ascend id 0): a test policy that swaps a few replicas between ranks at random.

It ignores the load. Swapping two slots keeps every expert's replica count, so the result is always a valid
placement; the same seed gives the same swaps.
"""

from __future__ import annotations

import numpy as np

from eplb._arrays import to_bool, to_int
from eplb.errors import PolicyError
from eplb.placement import Placement
from eplb.policies.base import Policy
from eplb.topology import Topology

__all__ = ["RandomPolicy", "POLICY"]


class RandomPolicy(Policy):
    """Swap ``num_moves`` random pairs of slots on different ranks in every layer of ``current`` (or of vLLM's
    initial layout when there is none).

    Args:
        seed: seed of the random generator; the same seed and input give the same plan.
        num_moves: swaps per layer (each moves two slots, fewer when they hold the same expert).
        allow_shared_rank: ``False`` (vllm-ascend's rule) skips a swap that would put an expert on a rank that
            already holds it, so no rank ends up with an expert twice unless ``current`` had that.
    """

    name = "random"

    def __init__(self, seed: int = 0, num_moves: int = 1, allow_shared_rank: bool = True):
        self.seed = to_int(seed, "seed", PolicyError, minimum=0)
        self.num_moves = to_int(num_moves, "num_moves", PolicyError, minimum=0)
        self.allow_shared_rank = to_bool(allow_shared_rank, "allow_shared_rank", PolicyError)

    def place(self, load: np.ndarray, topology: Topology, current: Placement | None, window: np.ndarray
              ) -> np.ndarray:
        num_layers, num_experts = load.shape[-2:]
        if current is None:
            current = Placement.initial(num_experts, topology, num_layers)
        phy2log = current.phy2log.copy()
        if topology.num_ranks == 1:  # a swap inside one rank changes nothing that matters
            return phy2log
        rng = np.random.default_rng(self.seed)
        slots = topology.slots_per_rank
        layers = np.arange(num_layers)
        for _ in range(self.num_moves):
            first = rng.integers(0, topology.num_physical, size=num_layers)
            # the second slot is on another rank: shift the first one's rank by 1..W-1
            shift = rng.integers(1, topology.num_ranks, size=num_layers)
            second = ((first // slots + shift) % topology.num_ranks) * slots + rng.integers(0, slots, size=num_layers)
            swap = layers
            if not self.allow_shared_rank:
                swap = layers[~(_on_rank(phy2log, phy2log[layers, first], second // slots, slots)
                                | _on_rank(phy2log, phy2log[layers, second], first // slots, slots))]
                first, second = first[swap], second[swap]
            phy2log[swap, first], phy2log[swap, second] = phy2log[swap, second], phy2log[swap, first]
        return phy2log

    def __repr__(self) -> str:
        return (f"RandomPolicy(seed={self.seed}, num_moves={self.num_moves}, "
                f"allow_shared_rank={self.allow_shared_rank})")


def _on_rank(phy2log: np.ndarray, experts: np.ndarray, ranks: np.ndarray, slots: int) -> np.ndarray:
    """bool ``[L]``: whether rank ``ranks[l]`` of layer ``l`` holds ``experts[l]``."""
    rows = phy2log.reshape(phy2log.shape[0], -1, slots)[np.arange(phy2log.shape[0]), ranks]  # [L, K]
    return (rows == experts[:, None]).any(axis=1)


POLICY = RandomPolicy
