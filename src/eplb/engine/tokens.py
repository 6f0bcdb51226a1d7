"""The demo's workload: token ids per rank and step, and the expert popularity the gate is calibrated to.

Token ids follow a Zipf law over the vocabulary (text repeats a few tokens often); which experts they reach is set by
the gate's calibrated bias (:class:`eplb.engine.model.MoEModel`), whose target is a DeepSeek-V3-like popularity.
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.errors import EplbError

__all__ = ["SkewedTokens", "expert_popularity"]


def expert_popularity(num_layers: int, num_experts: int, top_k: int, seed: int = 0, trace=None) -> np.ndarray:
    """float64 ``[L, E]`` expected routings per token of each expert (rows sum to ``top_k``).

    Args:
        trace: optional expert load ``[T, L, E]`` or ``[L, E]`` (e.g. a recorded trace) whose mean popularity is
            used instead of :func:`eplb.sim.traces.parametric_profile` (DeepSeek-V3-calibrated, from ``seed``).
    """
    if trace is None:
        from eplb.sim.traces import parametric_profile

        return parametric_profile(num_layers, num_experts, seed, top_k=top_k)
    load = np.asarray(trace, dtype=np.float64)
    load = load.sum(axis=0) if load.ndim == 3 else load
    if load.shape != (num_layers, num_experts):
        raise EplbError(f"trace load has shape {load.shape[-2:]} per step, the model has L={num_layers} layers x "
                        f"E={num_experts} experts")
    if (load < 0).any() or (load.sum(axis=1) <= 0).any():
        raise EplbError("trace load must be non-negative with tokens in every layer")
    # no expert may expect more than one routing per token; a tiny floor keeps every expert reachable
    share = np.maximum(load / load.sum(axis=1, keepdims=True), 1e-4)
    return top_k * share / share.sum(axis=1, keepdims=True)


class SkewedTokens:
    """Token ids of each rank's batch in each step, reproducible from ``(seed, step, rank)``.

    Args:
        vocab: ids are in ``[0, vocab)``.
        tokens_per_rank: N, tokens each rank serves per step.
        seed: workload seed.
        zipf: exponent of the token-frequency law.
    """

    def __init__(self, vocab: int, tokens_per_rank: int, seed: int = 0, zipf: float = 0.8):
        if tokens_per_rank < 1:
            raise EplbError(f"tokens_per_rank must be >= 1, got {tokens_per_rank}")
        self.vocab, self.tokens_per_rank, self.seed = vocab, tokens_per_rank, seed
        weights = 1.0 / np.arange(1, vocab + 1) ** zipf
        # a fixed shuffle, so frequent ids are spread over the embedding table
        self._ids = np.random.default_rng([seed, 17]).permutation(vocab)
        self._p = weights / weights.sum()

    def batch(self, step: int, rank: int) -> torch.Tensor:
        """int64 ``[N]`` token ids of ``rank`` in ``step``."""
        rng = np.random.default_rng([self.seed, step, rank])
        return torch.as_tensor(self._ids[rng.choice(self.vocab, size=self.tokens_per_rank, p=self._p)])
