"""What the check's ranks serve: expert tensors whose bytes name their expert, and load profiles that change every
cycle, so that every cycle's plan moves layers."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["PROFILES", "expert_tensors", "weights_match", "Workload"]

#: load profiles served in turn, one per cycle (``len(ctl.metrics) % PROFILES``, the same on every rank)
PROFILES = 3


def _tensor_bytes(settings, index: int) -> int:
    """Bytes of an expert's ``index``-th tensor: the weights, then scales (a multiple of 8: any dtype divides it)."""
    return settings.expert_bytes if index == 0 else max(8, settings.expert_bytes // 256 // 8 * 8)


def _pattern(ids: torch.Tensor, nbytes: int) -> torch.Tensor:
    """uint8 ``[K, nbytes]``: each row the two bytes of its id, repeated (ids < 2**15: no NaN in 16-bit floats)."""
    pair = torch.stack([ids & 0xFF, ids >> 8], dim=1).to(torch.uint8)
    return pair.repeat(1, nbytes // 2)


def _local_ids(settings, phy2log: np.ndarray, rank: int, device) -> torch.Tensor:
    """int64 ``[L, K]``: ``layer * E + expert`` of this rank's slots."""
    k = settings.slots_per_rank
    local = phy2log[:, rank * k:(rank + 1) * k] + np.arange(settings.layers)[:, None] * settings.experts
    return torch.from_numpy(np.ascontiguousarray(local)).to(device)


def expert_tensors(settings, phy2log: np.ndarray, rank: int, device) -> list[list[torch.Tensor]]:
    """The live expert tensors of this rank, one list per layer (``settings.expert_dtypes``), each slot's bytes
    naming the expert ``phy2log`` puts there."""
    ids = _local_ids(settings, phy2log, rank, device)
    out = []
    for layer in range(settings.layers):
        out.append([_pattern(ids[layer], _tensor_bytes(settings, i)).view(getattr(torch, dtype))
                    for i, dtype in enumerate(settings.expert_dtypes)])
    return out


def weights_match(settings, tensors, phy2log: np.ndarray, rank: int) -> bool:
    """Whether every slot holds, byte for byte, the expert ``phy2log`` says it holds."""
    ids = _local_ids(settings, phy2log, rank, tensors[0][0].device)
    for layer, layer_tensors in enumerate(tensors):
        pair = _pattern(ids[layer], 2)  # [K, 2]
        for t in layer_tensors:
            rows = t.view(torch.uint8).reshape(t.shape[0], -1, 2)
            if not bool((rows == pair[:, None, :]).all()):
                return False
    return True


class Workload:
    """Each profile's expert ids per layer (``[tokens, top_k]`` on the device) and, for ``balanced`` dispatch, every
    rank's tokens per expert (``[W, E]`` per layer, all-gathered once on ``side``, as an engine gathers them)."""

    def __init__(self, settings, rank: int, device, side, balanced: bool):
        layers, experts = settings.layers, settings.experts
        self.ids, self.counts = [], []
        for profile in range(PROFILES):
            popularity = np.random.default_rng([settings.seed, profile]).dirichlet(np.full(experts, 0.2), size=layers)
            rng = np.random.default_rng([settings.seed, profile, rank])
            ids = [torch.from_numpy(rng.choice(experts, size=(settings.tokens, settings.top_k), p=popularity[layer]))
                   for layer in range(layers)]
            self.ids.append([x.to(device) for x in ids])
            if balanced:
                own = torch.stack([torch.bincount(x.reshape(-1), minlength=experts) for x in ids])  # [L, E]
                gathered = [torch.empty_like(own) for _ in range(settings.ranks)]
                dist.all_gather(gathered, own, group=side)
                self.counts.append(list(torch.stack(gathered, dim=1).to(device)))  # [W, E] per layer
            else:
                self.counts.append([None] * layers)
