"""Expert-load recorder: per-slot token counts accumulated on the device, gathered into logical load once a window.

Recording never synchronises with the host: every call is a handful of device ops on tensors allocated once.

Two sources of counts, per MoE layer and step:

- :meth:`LoadRecorder.record_ids`: the physical top-k slot ids this rank's tokens were routed to (any shape, values in
  ``[0, P)``); counted over all ``P`` slots of the group. An id of -1 (an expert with no live replica after a rank
  failure) is not counted: it lands in a spare column of the buffers, never read, so no index is out of range (on
  CUDA an out-of-range index is a device-side assert that kills the process).
- :meth:`LoadRecorder.record_counts`: the per-local-slot counts an MoE kernel already returns (``[K]``), either plain
  or cumulative over the slots (``cumulative=True``: entry ``k`` is the tokens of slots ``0..k``, the ``group_list``
  form of grouped-matmul kernels); counted over this rank's ``K`` slots.

Layouts (vllm-ascend ``heat_layout``): the local window buffer is ``[L, S]`` (``S = P`` for ids, ``K`` for kernel
counts) and the optional per-step ring is ``[L, T, S]``; all-gathered over ``W`` ranks they become ``[W, L, S]``, read
as ``[L, W, S]``, and ``[W, L, T, S]``, read as ``[T, L, W, S]``.

Recording is capture-safe (a CUDA graph of the forward records correctly on every replay): what a record call reads
is on the device. Under ``torch.use_deterministic_algorithms(True)`` the counts are taken without atomics (a stable
sort and a cumulative sum), the same integers as the default ``index_add_``.

When a layer switches placement inside a window, :meth:`LoadRecorder.fold_layer` first converts that layer's slot
counts into logical counts with the placement that was in force while they were taken, so load is never attributed to
the expert that moved into a slot afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from eplb.errors import EplbError
from eplb.runtime.agreement import collective
from eplb.runtime.transport import wait_for

__all__ = ["LoadRecorder", "STAGES", "WindowSnapshot", "gather_slot_counts", "gather_slot_count_steps"]

# torch >= 2.13 renamed all_gather_into_tensor (the old name warns); both take the concatenated [W * n, ...] output
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

log = logging.getLogger(__name__)

STAGES = ("all", "prefill", "decode")


@dataclass
class WindowSnapshot:
    """A window's buffers taken at its end (:meth:`LoadRecorder.snapshot`), read later by
    :meth:`LoadRecorder.logical_load` on any thread."""

    window: torch.Tensor
    folded: torch.Tensor
    ring: torch.Tensor | None
    ring_folded: torch.Tensor | None
    steps: int

    def to_host(self, stream=None) -> "WindowSnapshot":
        """The snapshot in host memory: pinned, non-blocking copies on ``stream``, then this thread waits for them
        (EPLB's side thread calls it, never the serving thread)."""
        if self.window.device.type == "cpu":
            return self

        def move(t):
            return None if t is None else t.to("cpu", non_blocking=True)

        host = WindowSnapshot(move(self.window), move(self.folded), move(self.ring), move(self.ring_folded),
                              self.steps)
        wait_for(stream)
        return host


class LoadRecorder:
    """Per-slot token counts of ``L`` MoE layers on one rank.

    Args:
        num_layers: L.
        num_experts: E, logical experts per layer.
        num_ranks: W, ranks of the EP group.
        slots_per_rank: K.
        rank: this rank's index in the EP group.
        source: ``"ids"`` (physical top-k ids, counted over all ``P`` slots) or ``"counts"`` (kernel per-slot counts
            of this rank's ``K`` slots).
        ring_steps: T > 0 keeps one row per step for the last ``T`` steps (per-step policies); 0 keeps only the sum.
        stage: record ``"all"`` steps, only ``"prefill"`` or only ``"decode"`` steps.
        device: where the counters live (the device of the MoE layers).
    """

    def __init__(self, num_layers: int, num_experts: int, num_ranks: int, slots_per_rank: int, rank: int,
                 source: str = "ids", ring_steps: int = 0, stage: str = "all", device="cpu"):
        if source not in ("ids", "counts"):
            raise EplbError(f"recorder source must be 'ids' or 'counts', got {source!r}")
        if stage not in STAGES:
            raise EplbError(f"recording stage must be one of {', '.join(STAGES)}, got {stage!r}")
        if ring_steps < 0:
            raise EplbError(f"ring_steps must be >= 0, got {ring_steps}")
        self.num_layers, self.num_experts = num_layers, num_experts
        self.num_ranks, self.slots_per_rank, self.rank = num_ranks, slots_per_rank, rank
        self.source, self.ring_steps, self.stage = source, ring_steps, stage
        self.device = torch.device(device)
        width = num_ranks * slots_per_rank if source == "ids" else slots_per_rank
        self.width = width
        kw = dict(dtype=torch.int64, device=self.device)
        # every buffer has a spare last column, where ids of -1 are counted (``ids % (S + 1)``) and never read
        self._window_full = torch.zeros(num_layers, width + 1, **kw)
        #: int64 [L, S]: counts of the current window, per slot, since the last fold of each layer
        self.window = self._window_full[:, :width]
        #: int64 [L, E]: counts already converted to logical experts (layers that switched placement mid-window)
        self.folded = torch.zeros(num_layers, num_experts, **kw)
        # one step's count per slot fits 32 bits, which halves the ring (a 1,000-step ring is the largest table EPLB
        # keeps: 58 x 1,000 x (320 + 256) x 4 bytes = 134 MB at DeepSeek-V3 size)
        ring_kw = dict(dtype=torch.int32, device=self.device)
        self._ring_full = torch.zeros(num_layers, ring_steps, width + 1, **ring_kw) if ring_steps else None
        #: int32 [L, T, S]: one row per step (ring), when ring_steps > 0
        self.ring = self._ring_full[:, :, :width] if ring_steps else None
        self.ring_folded = torch.zeros(num_layers, ring_steps, num_experts, **ring_kw) if ring_steps else None
        # What a record call reads is on the device, set by begin_step outside the forward, so a forward captured in a
        # CUDA graph records correctly on replay: the gate (1: this step counts, 0: its stage is not recorded) and
        # the flat offset of the current ring row.
        self._gate = torch.full((1,), int(stage == "all"), **kw)
        self._ring_row = torch.zeros(1, **kw)
        self._ring_offset = torch.zeros(1, **kw)
        self._columns = torch.arange(width + 2, **kw)  # 0..S+1: the sorted count's bounds (deterministic mode)
        self._window_rows = list(self._window_full.unbind(0))  # per-layer views [S + 1], bound once
        self._ring_rows = [row.view(-1) for row in self._ring_full.unbind(0)] if ring_steps else None  # [T(S + 1)]
        self._row = 0  # ring row of the current step
        self._steps = 0  # steps recorded in the window (host counter, identical on all ranks)
        self._active = stage == "all"

    # -- per step -----------------------------------------------------------------------------------------------
    def begin_step(self, is_prefill: bool = False) -> None:
        """Start a step. ``is_prefill`` must be the same on every rank (decide it from the global batch, e.g. "any
        DP rank has a prefill request"), so that all ranks keep or drop the same steps."""
        active = self.stage == "all" or (self.stage == "prefill") == bool(is_prefill)
        if active != self._active:
            self._gate.fill_(int(active))
            self._active = active
        if active and self.ring is not None:
            self._row = self._steps % self.ring_steps
            self._ring_row.fill_(self._row)
            self._ring_offset.fill_(self._row * (self.width + 1))
            self.ring[:, self._row].zero_()
            self.ring_folded[:, self._row].zero_()
        if active:
            self._steps += 1

    @property
    def steps(self) -> int:
        """Steps recorded since the last :meth:`reset`."""
        return self._steps

    def record_ids(self, layer: int, physical_ids: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Count the physical slot ids ``[N, ...]`` (values in ``[0, P)``) routed in ``layer`` this step.

        ``valid``: optional bool ``[N]`` on the device, False for padded tokens (a batch padded to a CUDA graph's
        size), which are then not counted. Device ops only, nothing read on the host: safe inside a captured
        graph."""
        if self.source != "ids":
            raise EplbError("this recorder counts kernel per-slot counts; use record_counts()")
        ids = physical_ids.reshape(-1).remainder(self.width + 1)  # -1 -> the spare column S
        if valid is None:
            weight = self._gate.expand(ids.numel())
        else:
            per_token = ids.numel() // max(valid.numel(), 1)
            weight = (valid.reshape(-1, 1).to(torch.int64) * self._gate).expand(-1, per_token).reshape(-1)
        if torch.are_deterministic_algorithms_enabled():
            self._record_sorted(layer, ids, weight)
            return
        self._window_rows[layer].index_add_(0, ids, weight)
        if self.ring is not None:
            self._ring_rows[layer].index_add_(0, ids + self._ring_offset, weight.to(torch.int32))

    def _record_sorted(self, layer: int, ids: torch.Tensor, weight: torch.Tensor) -> None:
        """:meth:`record_ids` without atomics: a stable sort of the ids, a cumulative sum of their weights, and each
        column's count the difference of the sums at its bounds (fixed shapes, no host read)."""
        order = torch.argsort(ids, stable=True)
        total = torch.cat([weight.new_zeros(1), torch.cumsum(weight[order], 0)])  # integers: deterministic
        bounds = torch.searchsorted(ids[order], self._columns)  # [S + 2]: first position of each column
        counts = total[bounds[1:]] - total[bounds[:-1]]  # [S + 1]
        self._window_rows[layer].add_(counts)
        if self.ring is not None:
            index = self._columns[:-1] + self._ring_offset  # this step's ring row, each column once
            row = self._ring_rows[layer]
            row.index_put_((index,), row[index] + counts.to(torch.int32))

    def record_counts(self, layer: int, slot_counts: torch.Tensor, cumulative: bool = False) -> None:
        """Add the kernel's per-local-slot counts ``[K]`` of ``layer`` for this step; ``cumulative`` counts are
        prefix sums over the slots (``[2, 7]`` means 2 and 5 tokens). Device ops only (graph-safe)."""
        if self.source != "counts":
            raise EplbError("this recorder counts physical ids; use record_ids()")
        counts = slot_counts.to(torch.int64)
        if cumulative:
            counts = torch.diff(counts, prepend=counts.new_zeros(1))
        counts = counts * self._gate
        self.window[layer].add_(counts)
        if self.ring is not None:
            self.ring[layer].index_add_(0, self._ring_row, counts[None].to(torch.int32))

    # -- placement changes --------------------------------------------------------------------------------------
    def fold_layer(self, layer: int, slot_to_expert: torch.Tensor) -> None:
        """Convert ``layer``'s slot counts to logical counts with the placement that was in force while they were
        taken, and clear them. Call it right before the layer switches placement.

        Args:
            slot_to_expert: int64 ``[S]`` on the recorder's device: the old ``phy2log`` row ``[P]`` (``ids``) or this
                rank's old local row ``[K]`` (``counts``).
        """
        self.folded[layer].index_add_(0, slot_to_expert, self.window[layer])
        self.window[layer].zero_()
        if self.ring is not None:
            self.ring_folded[layer].index_add_(1, slot_to_expert, self.ring[layer])
            self.ring[layer].zero_()

    def reset(self) -> None:
        """Start a new window (whole buffers, spare column included: one contiguous fill each)."""
        self._window_full.zero_()
        self.folded.zero_()
        if self.ring is not None:
            self._ring_full.zero_()
            self.ring_folded.zero_()
        self._steps = 0

    def snapshot(self) -> WindowSnapshot:
        """Copies of the window's buffers (device ops, no host sync: whole buffers, one contiguous copy each), and a
        new window starts."""
        width = self.width
        ring = None if self.ring is None else self._ring_full.clone()[:, :, :width]
        snap = WindowSnapshot(self._window_full.clone()[:, :width], self.folded.clone(), ring,
                              None if ring is None else self.ring_folded.clone(), self._steps)
        self.reset()
        return snap

    # -- gathering ----------------------------------------------------------------------------------------------
    def logical_load(self, phy2log: np.ndarray, group=None, snapshot: WindowSnapshot | None = None,
                     live: np.ndarray | None = None) -> np.ndarray:
        """The window's logical load, summed over the EP group. Collective: all ranks call it and get the same array.

        Args:
            phy2log: int64 ``[L, P]``, the placement in force now (layers switched inside the window were folded).
            group: the group to sum over (its tensors' device must suit its backend).
            snapshot: a :meth:`snapshot` to read instead of the live buffers (the gather then runs on the
                snapshot's device, e.g. the host for EPLB's Gloo side group).
            live: bool ``[W]``, the members of ``group`` after a failure (None: every rank); the failed ranks' rows
                of kernel counts are zero.

        Returns:
            int64 ``[L, E]``, or int32 ``[T', L, E]`` with the ring's rows oldest first when the recorder keeps a
            ring (``T' = min(T, steps)``).
        """
        snap = snapshot or WindowSnapshot(self.window, self.folded, self.ring, self.ring_folded, self._steps)
        device = snap.window.device
        table = torch.as_tensor(np.array(phy2log, dtype=np.int64), device=device)  # [L, P]
        if snap.ring is None:
            slots = self._global_slots(snap.window[:, None], group, live)[:, 0]  # [L, P]
            logical = _dist_sum(snap.folded, group)
            logical.scatter_add_(1, table, slots)
            return logical.cpu().numpy()
        slots = self._global_slots(snap.ring, group, live)  # [L, T, P]
        logical = _dist_sum(snap.ring_folded, group)  # [L, T, E]
        logical.scatter_add_(2, table[:, None, :].expand_as(slots), slots)
        rows = min(self.ring_steps, snap.steps)
        order = (np.arange(snap.steps - rows, snap.steps) % self.ring_steps) if rows else np.arange(0)
        return logical.permute(1, 0, 2)[torch.as_tensor(order, device=device)].cpu().numpy()

    def _global_slots(self, local: torch.Tensor, group, live) -> torch.Tensor:
        """``[L, T, S]`` local buffers -> ``[L, T, P]`` counts of the whole group."""
        if self.source == "ids":
            return _dist_sum(local, group)
        gathered = _gather(local, self.num_ranks, group, live)  # [W, L, T, K]
        num_layers, steps = local.shape[:2]
        return gathered.permute(1, 2, 0, 3).reshape(num_layers, steps, -1)


def gather_slot_counts(local: torch.Tensor, num_ranks: int, group=None, live: np.ndarray | None = None) -> torch.Tensor:
    """``[L, W, ...]``: the layer-major buffers ``[L, ...]`` of all ``W`` ranks (vllm-ascend's gathered layout).
    ``live``: bool ``[W]``, the members of ``group`` after a failure (failed ranks' rows are zero)."""
    return _gather(local, num_ranks, group, live).transpose(0, 1)


def gather_slot_count_steps(local: torch.Tensor, num_ranks: int, group=None, live: np.ndarray | None = None) -> torch.Tensor:
    """``[T, L, W, S]``: the per-step buffers ``[L, T, S]`` of all ``W`` ranks (vllm-ascend's multi-stage layout)."""
    return _gather(local, num_ranks, group, live).permute(2, 1, 0, 3)


def _gather(local: torch.Tensor, num_ranks: int, group, live: np.ndarray | None = None) -> torch.Tensor:
    """``[W, *local.shape]``: ``local`` of every rank (a copy of ``local`` alone when not distributed); with ``live``
    the group holds the live ranks only, in rank order, and the failed ranks' entries are zero."""
    members = num_ranks if live is None else int(np.count_nonzero(live))
    if not dist.is_initialized() or members == 1:
        gathered = local[None].clone()
    else:
        gathered = torch.empty((members * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
        collective(_ALL_GATHER, gathered, local.contiguous(), group=group)
        gathered = gathered.view(members, *local.shape)
    if live is None:
        return gathered
    out = torch.zeros((num_ranks, *local.shape), dtype=local.dtype, device=local.device)
    out[torch.as_tensor(np.flatnonzero(live), device=local.device)] = gathered
    return out


def _dist_sum(local: torch.Tensor, group) -> torch.Tensor:
    out = local.clone()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        collective(dist.all_reduce, out, group=group)
    return out
