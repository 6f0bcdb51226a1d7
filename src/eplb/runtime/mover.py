"""Weight mover: moves the rows of a plan's parts on EPLB's side channel, following recipes the planner process built.

Protocol, driven by the controller:

1. :meth:`ExpertMover.post` (serving thread, before the forward of step ``s``): records an event on the serving
   stream and hands the parts' :class:`~eplb.runtime.recipes.MoveRecipe` s to the side thread; nothing else. On the
   side thread, after that event: the rows this rank sends are sent from the live tensors in place (the forward only
   reads them too), the received rows land in a staging arena (never in live tensors: the forward still computes
   with the old experts), the experts that stay on this rank but change slot are staged too (nothing writes the
   layer's live rows before its switch), and the index tensors and switch tables are uploaded. The side thread only
   posts, waits and copies: the recipes come ready-made.
2. :meth:`ExpertMover.status` (serving thread): whether the rows landed here (``Future.done()``, no wait). The
   controller agrees with the other ranks that they landed everywhere before anyone commits.
3. :meth:`ExpertMover.commit` (serving thread, before the forward of the agreed step): the serving stream waits on
   the side stream's event, then the staged rows are written into the live tensors in place (addresses do not
   change): one gather and one ``index_copy_`` per tensor, device ops only.

Rows move as their bytes: every tensor is viewed as ``[K, row_bytes / w]`` of the widest integer type (``w`` = 8,
4, 2 or 1 bytes) that divides a row and the tensor's address (a view, not a copy; the widest, because a row copy
costs per element), so any dtype moves bitwise (float8, bf16, packed int4, block scales) whatever ops the device has
for it. A tensor that cannot be viewed as bytes is refused at construction.

Staging holds, on the device, the rows this rank receives and the rows that change slot locally in one step, and,
for the ``gloo`` backend on an accelerator, the rows it sends and receives in a pinned host arena; rows are sent from
the live tensors in place. Never a copy of a whole layer: the schedule keeps each step within ``bytes_per_step`` on
every rank (:mod:`eplb.cycle.staging` counts what this module stages), and :attr:`ExpertMover.staging_bytes` reports the
arenas (device plus host), which are sized exactly to the rows.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from eplb.errors import EplbError, EplbFailure
from eplb.runtime.agreement import Status
from eplb.runtime.recipes import MoveRecipe, move_recipe
from eplb.runtime.transport import Message, SideChannel, StagingArena, side_event, upload

__all__ = ["ExpertMover", "PendingMove", "Staged", "StagedPart", "raw_rows", "check_tensors"]

log = logging.getLogger(__name__)


@dataclass
class StagedPart:
    """One part staged on this rank (device tensors prepared on the side thread).

    Attributes:
        layer: the part's layer.
        staging: per tensor of the layer, its raw rows (:func:`raw_rows`): received rows, then local ones.
        dst: int64 ``[f]`` local slots the switch writes; ``row``: the staging row of each (None: staging row ``i``
            goes to ``dst[i]``, each once, so the staging is written as it is).
        switch: the part's :class:`~eplb.runtime.in_force.SwitchTables` (None when posted without them).
    """

    layer: int
    staging: list
    dst: torch.Tensor
    row: torch.Tensor | None
    switch: object = None


@dataclass
class Staged:
    """What the side thread did for one post: the parts, the side stream's event, whether the exchange completed
    here (``error`` says why not), its seconds and the bytes received."""

    parts: list = field(default_factory=list)
    event: object = None
    error: str | None = None
    seconds: float = 0.0
    bytes_received: int = 0


@dataclass
class PendingMove:
    """Parts posted and not yet committed."""

    layers: list[int]
    future: Future | None = None
    #: ``time.monotonic()`` of the post (for the transfer deadline)
    posted_at: float = 0.0
    bytes_received: int = 0
    post_s: float = 0.0
    #: seconds :meth:`ExpertMover.commit` waited (0 unless called before the rows landed; the controller never does)
    wait_s: float = 0.0
    copy_s: float = 0.0
    #: the side thread had not finished when the commit came
    late: bool = False
    #: seconds the side thread spent on these parts (posting, waiting, copying)
    side_s: float = 0.0


def raw_rows(tensor: torch.Tensor, layer: int, index: int, slots_per_rank: int) -> torch.Tensor:
    """``tensor`` ``[K, ...]`` viewed as ``[K, row_bytes / w]`` of the widest integer type of ``w`` bytes (8, 4, 2
    or 1) that divides a row and the tensor's address (no copy).

    Raises:
        EplbError: it is not ``[K, ...]``, not contiguous, or cannot be viewed as bytes (quantized, sparse, a
            conjugate or negative view).
    """
    where = f"layer {layer}, tensor {index}"
    if tensor.dim() == 0 or tensor.shape[0] != slots_per_rank:
        raise EplbError(f"{where}: expected shape [{slots_per_rank}, ...] (local slots first), got "
                        f"{tuple(tensor.shape)}")
    if not tensor.is_contiguous():
        raise EplbError(f"{where} is not contiguous; expert slots must be rows of a contiguous tensor so they can be "
                        "sent and overwritten in place")
    if tensor.is_quantized or tensor.layout != torch.strided or tensor.is_conj() or tensor.is_neg():
        raise EplbError(f"{where} ({tensor.dtype}, {tensor.layout}) cannot be viewed as bytes; expected a dense "
                        "tensor (weights, scales and packed formats are moved as their bytes)")
    try:
        rows = tensor.view(torch.uint8).view(slots_per_rank, -1)
    except RuntimeError as exc:
        raise EplbError(f"{where} ({tensor.dtype}) cannot be viewed as bytes: {exc}") from None
    for dtype in _RAW:
        width = torch.empty(0, dtype=dtype).element_size()
        if rows.shape[1] % width == 0 and rows.data_ptr() % width == 0:
            return rows.view(dtype)
    return rows


#: the integer types rows are moved as, widest first
_RAW = (torch.int64, torch.int32, torch.int16)


def check_tensors(layer_tensors, num_layers: int, slots_per_rank: int, device) -> np.ndarray:
    """int64 ``[L]``: the bytes of one expert of each layer over its tensors, once every tensor checked movable
    (:func:`raw_rows`) and on ``device``.

    Raises:
        EplbError: not one list of tensors per layer, a layer without tensors, a tensor that cannot be moved, or one
            on another device.
    """
    if layer_tensors is None or len(layer_tensors) != num_layers:
        raise EplbError(f"dynamic mode needs layer_tensors for all {num_layers} MoE layers")
    out = np.zeros(num_layers, dtype=np.int64)
    for layer, tensors in enumerate(layer_tensors):
        if not len(tensors):
            raise EplbError(f"layer {layer} has no expert tensors to move")
        for index, tensor in enumerate(tensors):
            if tensor.device != torch.device(device):
                raise EplbError(f"layer {layer}, tensor {index} is on {tensor.device}; expected the controller's "
                                f"device {device}")
            rows = raw_rows(tensor, layer, index, slots_per_rank)
            out[layer] += rows.shape[1] * rows.element_size()
    return out


class ExpertMover:
    """Moves the expert tensors of one rank.

    Args:
        layer_tensors: ``layer_tensors[l]`` is the list of live tensors of MoE layer ``l``, each ``[K, ...]``, any
            dtype, all on one device.
        rank: this rank's index in the EP group (its group rank).
        slots_per_rank: K.
        group: the EP process group (None: the default group); only its members are used: transfers run on the
            side channel's groups, never on this one.
        channel: the :class:`SideChannel` (default: a Gloo one created here; collective over ``group``).

    Raises:
        EplbError: a layer without tensors, or a tensor that cannot be moved (see :func:`raw_rows`).
    """

    def __init__(self, layer_tensors, rank: int, slots_per_rank: int, group=None, channel: SideChannel | None = None):
        self.layer_tensors = [list(ts) for ts in layer_tensors]
        self._rows = []  # per layer, per tensor: the live rows as raw integers
        for layer, tensors in enumerate(self.layer_tensors):
            if not tensors:
                raise EplbError(f"layer {layer} has no expert tensors to move")
            self._rows.append([raw_rows(t, layer, i, slots_per_rank) for i, t in enumerate(tensors)])
        devices = {t.device for ts in self.layer_tensors for t in ts}
        if len(devices) > 1:
            raise EplbError(f"the expert tensors are on several devices ({sorted(map(str, devices))}); expected one")
        self.rank, self.slots_per_rank = rank, slots_per_rank
        device = self.layer_tensors[0][0].device
        self.channel = channel if channel is not None else SideChannel(group, "gloo", device)
        self._staging = StagingArena(device)

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one expert of ``layer`` summed over its tensors."""
        return sum(rows.shape[1] * rows.element_size() for rows in self._rows[layer])

    @property
    def staging_bytes(self) -> int:
        """Staging memory this rank holds for transfers: device arena plus the backend's host arena (bytes)."""
        return self._staging.nbytes + self.channel.backend.staging_bytes

    def post(self, parts, switches=None, to_device=None) -> PendingMove:
        """Hand ``parts`` (:class:`MoveRecipe` s or :class:`~eplb.cycle.transfers.LayerTransfer` s, distinct layers) to
        the side thread, with their :class:`~eplb.runtime.recipes.SwitchRows`, which ``to_device`` uploads there.
        Non-blocking."""
        start = time.perf_counter()
        recipes = [p if isinstance(p, MoveRecipe) else move_recipe(p, self.rank) for p in parts]
        switches = list(switches) if switches is not None else [None] * len(recipes)
        pending = PendingMove(layers=[r.layer for r in recipes], posted_at=time.monotonic())
        channel = self.channel  # the job keeps it: after a failure the mover moves on to the survivors' channel
        pending.future = channel.submit(self._move, recipes, switches, to_device, channel.record_event(), channel)
        pending.post_s = time.perf_counter() - start
        return pending

    def status(self, pending: PendingMove) -> Status:
        """Serving thread, no wait: :attr:`Status.READY` once the rows landed here, :attr:`Status.FAILED` when the
        exchange failed, else :attr:`Status.PENDING`. Raises what the side thread raised otherwise (a bug, or a dead
        side thread)."""
        if not pending.future.done():
            return Status.PENDING
        return Status.READY if pending.future.result().error is None else Status.FAILED

    def abandon(self, channel: SideChannel | None = None) -> None:
        """Forget parts that were posted and will never be committed: later posts use ``channel`` (after a failure,
        the survivors') and fresh staging, since receives in flight may still land in the old one."""
        if channel is not None:
            self.channel = channel
        self._staging = StagingArena(self._staging.device)

    def commit(self, pending: PendingMove) -> Staged:
        """Write ``pending``'s staged rows into the live tensors, in place (device ops on the serving stream);
        returns the :class:`Staged` parts (their switch tables). Waits only when called before the rows landed.

        Raises:
            EplbError: the exchange failed here (nothing was written).
        """
        start = time.perf_counter()
        pending.late = not pending.future.done()
        staged = pending.future.result()
        waited = time.perf_counter()
        pending.wait_s, pending.side_s, pending.bytes_received = waited - start, staged.seconds, staged.bytes_received
        if staged.error is not None:
            raise EplbFailure(f"transfers of layers {pending.layers} failed: {staged.error}; nothing was switched")
        self.channel.hand_over(staged.event, [t for part in staged.parts
                                              for t in (*part.staging, part.dst, part.row) if t is not None])
        for part in staged.parts:
            for rows, stage in zip(self._rows[part.layer], part.staging):
                rows.index_copy_(0, part.dst, stage if part.row is None else stage.index_select(0, part.row))
        pending.copy_s = time.perf_counter() - waited
        return staged

    # -- side thread ----------------------------------------------------------------------------------------------
    def _move(self, recipes: list[MoveRecipe], switches: list, to_device, posted, channel: SideChannel) -> Staged:
        start = time.perf_counter()
        if posted is not None:
            channel.stream.wait_event(posted)  # after the serving stream's earlier writes (the last switch)
        device, k = self._staging.device, self.slots_per_rank
        arena = self._staging.views([((r.staged, rows.shape[1]), rows.dtype) for r in recipes
                                     for rows in self._rows[r.layer]])
        staged, sends, recvs, cursor, base = Staged(), [], [], 0, 0
        for recipe, switch in zip(recipes, switches):
            live = self._rows[recipe.layer]
            staging = arena[cursor:cursor + len(live)]
            cursor += len(live)
            offset = 0
            for src, j, count in recipe.recvs.tolist():
                recvs += [Message(src, base + i * k + j, stage[offset:offset + count]) for i, stage in enumerate(staging)]
                offset += count
            for dst, j, first, count in recipe.sends.tolist():
                sends += [Message(dst, base + i * k + j, rows[first:first + count]) for i, rows in enumerate(live)]
            base += len(live) * k
            if recipe.local_src.size:  # the live rows of this layer do not change before its switch
                local = upload(recipe.local_src, device)
                for rows, stage in zip(live, staging):
                    torch.index_select(rows, 0, local, out=stage[offset:])
            staged.parts.append(StagedPart(recipe.layer, staging, upload(recipe.fill_dst, device),
                                           None if recipe.in_order else upload(recipe.fill_row, device),
                                           None if switch is None else to_device(switch)))
            staged.bytes_received += recipe.received * self.expert_bytes(recipe.layer)
        try:
            channel.backend.exchange(sends, recvs, channel.stream)
        except Exception as exc:  # noqa: BLE001 - agreed with the other ranks: the parts are abandoned everywhere
            log.warning("eplb: transfers of layers %s failed on this rank: %s", [r.layer for r in recipes], exc)
            staged.error = f"{type(exc).__name__}: {exc}"
        staged.event = side_event(channel.stream)
        staged.seconds = time.perf_counter() - start
        return staged
