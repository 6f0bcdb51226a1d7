"""Weight mover: executes a layer's :class:`~eplb.transfers.LayerTransfer` on EPLB's side channel.

Protocol, driven by the controller:

1. :meth:`ExpertMover.post` (serving thread, before the forward of step ``s``): records an event on the serving
   stream and hands the layer(s) to the :class:`~eplb.runtime.transport.SideChannel`; nothing else. On the side
   thread, after that event: the rows to send are packed from the live tensors (the forward only reads them too), the
   backend sends and receives them (receives land in a staging arena, never in live tensors, so the forward still
   computes with the old experts), the index tensors of the switch are uploaded, and one all-reduce on the side group
   tells every rank that every rank's transfers completed.
2. :meth:`ExpertMover.ready` (serving thread): whether that happened (``Future.done()``, no wait).
3. :meth:`ExpertMover.commit` (serving thread, before the forward of step ``s + 1``): the serving stream waits on the
   side stream's event, copies the experts that stay on this rank but change slot, then writes the staged experts into
   the live tensors in place (addresses do not change). Device ops only; it waits on the host only when the side
   thread has not finished (counted in :attr:`PendingMove.late`).

Staging holds, on the device, the rows this rank receives and the rows that change slot locally in one step, and,
for the ``gloo`` backend on an accelerator, the rows it sends and receives in a pinned host arena; rows are sent from
the live tensors in place. Never a copy of a whole layer: the schedule keeps each step within ``bytes_per_step`` on
every rank (:mod:`eplb.staging` counts what this module stages), and :attr:`ExpertMover.staging_bytes` reports the
arenas (device plus host), which are sized exactly to the rows.

Works for any list of per-expert tensors of a layer (weights, scales, biases; any dtype, quantised ones included):
every tensor of a layer is ``[K, ...]`` with the rank's ``K`` local slots first, and all move together.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from eplb.errors import EplbError
from eplb.runtime.transport import Message, SideChannel, StagingArena, hand_over, side_event, upload
from eplb.transfers import LayerTransfer

__all__ = ["ExpertMover", "PendingMove"]


@dataclass
class PendingMove:
    """Transfers posted for some layers and not yet committed."""

    layers: list[int]
    future: Future | None = None
    bytes_received: int = 0
    post_s: float = 0.0
    #: seconds the serving thread waited in :meth:`ExpertMover.commit` (0 unless the side thread was late)
    wait_s: float = 0.0
    copy_s: float = 0.0
    #: the side thread had not finished when the commit came
    late: bool = False
    #: seconds the side thread spent on these transfers (packing, sending, receiving, agreeing)
    side_s: float = 0.0


@dataclass
class _Fill:
    """What the switch of one layer writes on this rank (device tensors prepared on the side thread)."""

    layer: int
    staging: list  # per tensor: [rows, ...] received then local rows
    dst: torch.Tensor
    row: torch.Tensor
    local_rows: torch.Tensor | None = None
    local_src: torch.Tensor | None = None


@dataclass
class _Moved:
    fills: list = field(default_factory=list)
    event: object = None
    ok: bool = True
    seconds: float = 0.0
    bytes_received: int = 0


class ExpertMover:
    """Moves the expert tensors of one rank.

    Args:
        layer_tensors: ``layer_tensors[l]`` is the list of live tensors of MoE layer ``l``, each ``[K, ...]``.
        rank: this rank's index in the EP group (its group rank).
        slots_per_rank: K.
        group: the EP process group (None: the default group); only its members are used: transfers run on the
            side channel's groups, never on this one.
        channel: the :class:`SideChannel` (default: a Gloo one created here; collective over ``group``).
    """

    def __init__(self, layer_tensors, rank: int, slots_per_rank: int, group=None, channel: SideChannel | None = None):
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
        self.rank, self.slots_per_rank = rank, slots_per_rank
        device = self.layer_tensors[0][0].device
        self.channel = channel if channel is not None else SideChannel(group, "gloo", device)
        self._staging = StagingArena(device)

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one expert of ``layer`` summed over its tensors."""
        return sum(t[0].numel() * t.element_size() for t in self.layer_tensors[layer])

    @property
    def staging_bytes(self) -> int:
        """Staging memory this rank holds for transfers: device arena plus the backend's host arena (bytes)."""
        return self._staging.nbytes + self.channel.backend.staging_bytes

    def post(self, transfers: list[LayerTransfer]) -> PendingMove:
        """Hand the transfers of ``transfers`` (one per layer, distinct layers) to the side thread. Non-blocking."""
        start = time.perf_counter()
        pending = PendingMove(layers=[t.layer for t in transfers])
        channel = self.channel  # the job keeps it: after a failure the mover moves on to the survivors' channel
        pending.future = channel.submit(self._move, transfers, channel.record_event(), channel)
        pending.post_s = time.perf_counter() - start
        return pending

    def ready(self, pending: PendingMove) -> bool:
        """Whether ``pending``'s transfers completed on every rank (no wait)."""
        return pending.future.done()

    def abandon(self, channel: SideChannel | None = None) -> None:
        """Forget transfers that were posted and will never be committed (a peer failed): later posts use
        ``channel`` (the survivors') and fresh staging, since receives in flight may still land in the old one."""
        if channel is not None:
            self.channel = channel
        self._staging = StagingArena(self._staging.device)

    def commit(self, pending: PendingMove) -> None:
        """Write ``pending``'s new experts into the live tensors, in place (device ops on the serving stream).

        Raises:
            EplbError: another rank's transfers failed (nothing was written; every rank raises alike).
        """
        start = time.perf_counter()
        pending.late = not pending.future.done()
        moved = pending.future.result()  # a wait only when late
        waited = time.perf_counter()
        pending.wait_s, pending.side_s, pending.bytes_received = waited - start, moved.seconds, moved.bytes_received
        if not moved.ok:
            raise EplbError(f"transfers of layers {pending.layers} failed on some rank; nothing was switched")
        hand_over(moved.event, [t for fill in moved.fills for t in (*fill.staging, fill.dst, fill.row, fill.local_rows,
                                                                     fill.local_src) if t is not None])
        for fill in moved.fills:
            tensors = self.layer_tensors[fill.layer]
            if fill.local_rows is not None:
                # experts that stay on this rank but change slot go through staging too, so that overwriting a live
                # slot never destroys a value another slot still has to copy
                for live, stage in zip(tensors, fill.staging):
                    stage.index_copy_(0, fill.local_rows, live.index_select(0, fill.local_src))
            for live, stage in zip(tensors, fill.staging):
                live.index_copy_(0, fill.dst, stage.index_select(0, fill.row))
        pending.copy_s = time.perf_counter() - waited

    # -- side thread ----------------------------------------------------------------------------------------------
    def _move(self, transfers: list[LayerTransfer], posted, channel: SideChannel) -> _Moved:
        start = time.perf_counter()
        stream = channel.stream
        if posted is not None:
            stream.wait_event(posted)  # after the serving stream's earlier writes (the last switch)
        device = self.layer_tensors[0][0].device
        moved, sends, recvs, specs, plans, tags = _Moved(), [], [], [], [], [0]
        for transfer in transfers:  # the first tag of each layer's messages: one per tensor and run from a peer
            tags.append(tags[-1] + len(self.layer_tensors[transfer.layer]) * self.slots_per_rank)
        for position, transfer in enumerate(transfers):
            tensors = self.layer_tensors[transfer.layer]
            rows = transfer.transfers
            mine = rows[rows[:, 2] == self.rank]  # this rank's receives, in transfer-list order
            by_src = np.argsort(mine[:, 0], kind="stable")  # staged grouped by source rank
            stage_row = np.empty(len(mine), dtype=np.int64)
            stage_row[by_src] = np.arange(len(mine))
            dst_slot, from_recv, source = transfer.rank_fills(self.rank)
            local = np.flatnonzero(~from_recv)
            height = len(mine) + local.size
            for t in tensors:
                specs.append(((height, *t.shape[1:]), t.dtype))
            plans.append((position, transfer, mine, by_src, stage_row, dst_slot, from_recv, source, local))
        arena = self._staging.views(specs)
        cursor = 0
        for position, transfer, mine, by_src, stage_row, dst_slot, from_recv, source, local in plans:
            tensors = self.layer_tensors[transfer.layer]
            staging = arena[cursor:cursor + len(tensors)]
            cursor += len(tensors)
            # rows are sent from the live tensors in place, one message per tensor and run of consecutive source
            # slots (a contiguous block; the j-th run between two ranks tagged j), so a sender stages nothing on the
            # device; both sides split the rows between them, in transfer order, into the same runs
            offset = 0
            for src in np.flatnonzero(np.bincount(mine[:, 0], minlength=1)).tolist():
                for j, (_, count) in enumerate(_runs(mine[mine[:, 0] == src, 1])):
                    for i in range(len(tensors)):
                        recvs.append(Message(src, tags[position] + i * self.slots_per_rank + j,
                                             staging[i][offset:offset + count]))
                    offset += count
            outgoing = transfer.transfers[transfer.transfers[:, 0] == self.rank]
            for dst in np.flatnonzero(np.bincount(outgoing[:, 2], minlength=1)).tolist():
                for j, (first, count) in enumerate(_runs(outgoing[outgoing[:, 2] == dst, 1])):
                    for i, live in enumerate(tensors):
                        sends.append(Message(dst, tags[position] + i * self.slots_per_rank + j,
                                             live[first:first + count]))
            if dst_slot.size == 0:
                continue
            row = source.copy()
            row[from_recv] = stage_row[source[from_recv]]  # receive index -> its staging row
            fill = _Fill(transfer.layer, staging, upload(dst_slot, device), None)
            if local.size:
                local_rows = np.arange(len(mine), len(mine) + local.size)
                fill.local_src = upload(source[local], device)
                fill.local_rows = upload(local_rows, device)
                row[local] = local_rows
            fill.row = upload(row, device)
            moved.fills.append(fill)
        try:
            channel.backend.exchange(sends, recvs, stream)
        except Exception:  # noqa: BLE001 - this rank's failure is agreed below, then raised by every rank's commit
            moved.ok = False
        moved.event = side_event(stream)
        # one small all-reduce: a layer switches only when every rank's transfers completed
        moved.ok = bool(channel.all_reduce(torch.tensor([int(moved.ok)]), _MIN).item())
        moved.bytes_received = sum(int((t.transfers[:, 2] == self.rank).sum()) * self.expert_bytes(t.layer)
                                   for t in transfers)
        moved.seconds = time.perf_counter() - start
        return moved


_MIN = torch.distributed.ReduceOp.MIN


def _runs(slots: np.ndarray) -> list[tuple[int, int]]:
    """``(first slot, count)`` of each run of consecutive slots in ``slots`` (in its order)."""
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    return [(int(run[0]), len(run)) for run in np.split(slots, breaks) if len(run)]
