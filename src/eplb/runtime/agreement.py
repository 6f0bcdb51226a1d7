"""How the ranks agree, on EPLB's CPU side groups: one small all-reduce each time, never on the serving stream.

Every agreement is the minimum over the ranks of a :class:`Status` (and, for a plan, its checksum): each rank acts on
the lowest status any rank reported, so all of them act alike in the same step.
"""

from __future__ import annotations

import enum

import torch
import torch.distributed as dist

from eplb.errors import EplbError

__all__ = ["Status", "PeerError", "collective", "all_reduce", "agree"]


class Status(enum.IntEnum):
    """A rank's part in an agreement; every rank acts on the lowest one reported."""

    #: EPLB's own threads failed on this rank: every rank turns EPLB off, serving goes on with the placement in force
    OFF = -3
    #: the planner failed or the cycle waits for its interval, or a transfer failed: the cycle is skipped
    FAILED = -2
    #: a transfer has not landed by its deadline: it is abandoned and the cycle skipped
    LATE = -1
    #: not yet: ask again at the next agreement
    PENDING = 0
    #: the plan is ready here, or the transfer landed here
    READY = 1


class PeerError(EplbError, RuntimeError):
    """A collective on EPLB's side groups failed: a peer died, or did not answer within the group's timeout. A
    RuntimeError, like a failed collective, so an engine's handler of rank failures catches it."""


def collective(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, a ``torch.distributed`` call; its failure raised as :class:`PeerError`."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        raise PeerError(f"{getattr(fn, '__name__', fn)} on EPLB's side group failed: {exc}") from exc


def all_reduce(tensor: torch.Tensor, op, group=None, device="cpu") -> torch.Tensor:
    """``tensor`` reduced with ``op`` over ``group`` (itself when not distributed or alone), back on the host.

    Raises:
        PeerError: the collective failed.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tensor
    tensor = tensor.to(device)
    collective(dist.all_reduce, tensor, op=op, group=group)
    return tensor.cpu()


def agree(status: Status, checksum: int = 0, group=None) -> tuple[Status, bool]:
    """Every rank's ``status`` and ``checksum``, agreed in one all-reduce: ``(lowest status, whether every rank
    holds the same checksum)``.

    Raises:
        PeerError: the all-reduce failed.
    """
    agreed = all_reduce(torch.tensor([int(status), checksum, -checksum], dtype=torch.int64), dist.ReduceOp.MIN,
                        group)
    return Status(int(agreed[0])), int(agreed[1]) == -int(agreed[2])
