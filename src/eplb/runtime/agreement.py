"""How the ranks agree, on EPLB's CPU side group: one small all-reduce each time, never on the serving stream."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce", "agree_on_plan"]


def all_reduce(tensor: torch.Tensor, op, group=None, device="cpu") -> torch.Tensor:
    """``tensor`` reduced with ``op`` over ``group`` (itself when not distributed or alone), back on the host."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tensor
    tensor = tensor.to(device)
    dist.all_reduce(tensor, op=op, group=group)
    return tensor.cpu()


def agree_on_plan(flag: int, checksum: int, group=None, device="cpu") -> tuple[int, bool]:
    """Every rank's planner state ``flag`` (1 ready, 0 pending, -1 failed) and plan ``checksum``, agreed in one
    all-reduce: ``(lowest flag, whether every ready rank holds the same plan)``."""
    agreed = all_reduce(torch.tensor([flag, checksum, -checksum], dtype=torch.int64), dist.ReduceOp.MIN, group,
                        device)
    return int(agreed[0]), int(agreed[1]) == -int(agreed[2])
