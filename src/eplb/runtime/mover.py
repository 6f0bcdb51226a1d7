"""Weight mover: executes a layer's :class:`~eplb.transfers.LayerTransfer` with point-to-point transfers.

Protocol, per step (driven by the controller):

1. :meth:`ExpertMover.post` before the forward: posts ``batch_isend_irecv`` for the layer(s). Sends read the live
   expert tensors (the forward only reads them too); receives land in staging buffers, never in live tensors, so the
   forward of this step still computes with the old experts.
2. the engine runs its forward.
3. :meth:`ExpertMover.commit` after the forward: waits for the transfers, copies the experts that stay on this rank
   but change slot into staging, then writes staging into the live tensors in place (addresses do not change).
   The caller then swaps the layer's maps (router, recorder) in the same step on every rank.

Works for any list of per-expert tensors of a layer (weights, scales, biases; any dtype, quantised ones included):
every tensor of a layer is ``[K, ...]`` with the rank's ``K`` local slots first, and all move together.

Ranks with nothing to send or receive in a layer post no operation. NCCL requires the first point-to-point batch
of a group to involve every rank; the controller always runs a collective on the group (the window's all-reduce)
before any transfer, which satisfies it. Messages carry distinct tags per (layer position, tensor), which Gloo
needs to match several messages between the same pair of ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from eplb.errors import EplbError
from eplb.transfers import LayerTransfer

__all__ = ["ExpertMover", "PendingMove"]


@dataclass
class PendingMove:
    """Transfers posted for some layers and not yet committed."""

    layers: list[int]
    works: list = field(default_factory=list)
    #: per posted layer: (transfer, staging tensors, dst slots, from_recv, source row, number of receives)
    fills: list = field(default_factory=list)
    #: packed send buffers, alive until the sends completed
    buffers: list = field(default_factory=list)
    bytes_received: int = 0
    post_s: float = 0.0
    wait_s: float = 0.0
    copy_s: float = 0.0


class ExpertMover:
    """Moves the expert tensors of one rank.

    Args:
        layer_tensors: ``layer_tensors[l]`` is the list of live tensors of MoE layer ``l``, each ``[K, ...]``.
        rank: this rank's index in the EP group (its group rank).
        slots_per_rank: K.
        group: the EP process group (None: the default group).
    """

    def __init__(self, layer_tensors, rank: int, slots_per_rank: int, group=None):
        self.layer_tensors = [list(ts) for ts in layer_tensors]
        for layer, tensors in enumerate(self.layer_tensors):
            if not tensors:
                raise EplbError(f"layer {layer} has no expert tensors to move")
            for i, t in enumerate(tensors):
                if t.dim() == 0 or t.shape[0] != slots_per_rank:
                    raise EplbError(f"layer {layer}, tensor {i}: expected shape [{slots_per_rank}, ...] (local slots "
                                    f"first), got {tuple(t.shape)}")
                if not t.is_contiguous():
                    raise EplbError(f"layer {layer}, tensor {i} is not contiguous; expert slots must be rows of a "
                                    "contiguous tensor so they can be sent and overwritten in place")
        self.rank, self.slots_per_rank, self.group = rank, slots_per_rank, group
        # P2P names peers by global rank; fixed now, so that it still holds when the group is replaced by the group
        # of the survivors after a failure (ranks keep their global ids)
        self._global_rank = None if group is None else [dist.get_global_rank(group, r)
                                                        for r in range(dist.get_world_size(group))]
        self._staging: dict[tuple, torch.Tensor] = {}

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one expert of ``layer`` summed over its tensors."""
        return sum(t[0].numel() * t.element_size() for t in self.layer_tensors[layer])

    def _staging_for(self, position: int, tensor: torch.Tensor, index: int) -> torch.Tensor:
        key = (position, index, tuple(tensor.shape), tensor.dtype, tensor.device)
        buf = self._staging.get(key)
        if buf is None:  # allocated once per (concurrent layer, tensor) and reused every cycle
            buf = self._staging[key] = torch.empty_like(tensor)
        return buf

    def _peer(self, rank: int) -> int:
        return rank if self._global_rank is None else self._global_rank[rank]

    def post(self, transfers: list[LayerTransfer]) -> PendingMove:
        """Post the sends and receives of ``transfers`` (one per layer, distinct layers). Non-blocking.

        All experts one rank sends another in a layer travel as one message per tensor (packed in slot order of the
        transfer list), so a layer costs at most ``W - 1`` messages per tensor and rank, however many experts move.
        """
        start = time.perf_counter()
        pending = PendingMove(layers=[t.layer for t in transfers])
        ops = []
        for position, transfer in enumerate(transfers):
            tensors = self.layer_tensors[transfer.layer]
            staging = [self._staging_for(position, t, i) for i, t in enumerate(tensors)]
            rows = transfer.transfers
            mine = rows[rows[:, 2] == self.rank]  # this rank's receives, in transfer-list order
            by_src = np.argsort(mine[:, 0], kind="stable")  # staged grouped by source rank
            stage_row = np.empty(len(mine), dtype=np.int64)
            stage_row[by_src] = np.arange(len(mine))
            counts = np.bincount(mine[:, 0], minlength=1)
            offset = 0
            for src in np.flatnonzero(counts).tolist():
                count = int(counts[src])
                for i in range(len(tensors)):
                    tag = position * len(tensors) + i  # unique per message between a pair of ranks in this post
                    ops.append(dist.P2POp(dist.irecv, staging[i][offset:offset + count], self._peer(src),
                                          self.group, tag))
                offset += count
            outgoing = rows[rows[:, 0] == self.rank]
            for dst in np.flatnonzero(np.bincount(outgoing[:, 2], minlength=1)).tolist():
                slots = torch.as_tensor(outgoing[outgoing[:, 2] == dst, 1], device=tensors[0].device)
                for i, live in enumerate(tensors):
                    packed = live.index_select(0, slots)  # kept alive in ``pending`` until the send completed
                    pending.buffers.append(packed)
                    ops.append(dist.P2POp(dist.isend, packed, self._peer(dst), self.group,
                                          position * len(tensors) + i))
            pending.bytes_received += len(mine) * self.expert_bytes(transfer.layer)
            dst_slot, from_recv, source = transfer.rank_fills(self.rank)
            source = source.copy()
            source[from_recv] = stage_row[source[from_recv]]  # receive index -> its staging row
            pending.fills.append((transfer, staging, dst_slot, from_recv, source, len(mine)))
        if ops:
            pending.works = dist.batch_isend_irecv(ops)
        pending.post_s = time.perf_counter() - start
        return pending

    def abandon(self) -> None:
        """Forget transfers that were posted and will never be waited for (a peer failed). Their receives may still
        land, so later posts get fresh staging buffers."""
        self._staging.clear()

    def commit(self, pending: PendingMove) -> None:
        """Wait for ``pending``'s transfers and write the new experts into the live tensors, in place.

        Sets ``pending.wait_s`` (waiting for the transfers) and ``pending.copy_s`` (the in-place copies)."""
        start = time.perf_counter()
        for work in pending.works:
            work.wait()
        pending.buffers.clear()
        waited = time.perf_counter()
        pending.wait_s = waited - start
        for transfer, staging, dst_slot, from_recv, source, received in pending.fills:
            if dst_slot.size == 0:
                continue
            tensors = self.layer_tensors[transfer.layer]
            device = tensors[0].device
            # experts that stay on this rank but change slot go through staging too, so that overwriting a live slot
            # never destroys a value another slot still has to copy
            local = (~from_recv).nonzero()[0]
            row = torch.as_tensor(source.copy(), device=device)
            if local.size:
                local_rows = torch.arange(received, received + local.size, device=device)
                local_src = torch.as_tensor(source[local], device=device)
                row[torch.as_tensor(local, device=device)] = local_rows
                for live, stage in zip(tensors, staging):
                    stage.index_copy_(0, local_rows, live.index_select(0, local_src))
            dst = torch.as_tensor(dst_slot, device=device)
            for live, stage in zip(tensors, staging):
                live.index_copy_(0, dst, stage.index_select(0, row))
        pending.copy_s = time.perf_counter() - waited
