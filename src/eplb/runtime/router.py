"""Replica router: maps the logical expert ids a gate picked to the physical slots their tokens go to.

The torch twin of :func:`eplb.dispatch.route` (the numpy reference the simulator is built on; tested equal): the
tables come from :mod:`eplb.dispatch`, and only the per-token work runs here, on the device.

Dispatch modes (vectorised torch ops, deterministic; no host sync in :meth:`ReplicaRouter.route` except in
``balanced``):

- ``rank``: rank ``r`` sends every token of expert ``e`` to replica ``r % count_e`` (replicas in slot order);
  with ``tp_size > 1`` to replica ``(r % tp_size + r // tp_size + e) % count_e`` (vllm-ascend's rule).
- ``token``: token ``i`` uses row ``i mod 1024`` of a rotation: replica ``(i mod 1024 + r + e) % count_e``
  (vllm-ascend's per-token table, computed instead of stored).
- ``local``: a replica on this rank if there is one, else one on this node (rotated by rank), else the ``rank`` rule.
- ``balanced``: this step's tokens per expert over the whole group are split over the ranks holding the expert so
  that the busiest rank gets as few tokens as possible (:func:`eplb.dispatch.balanced_split`); rank ``r``'s
  tokens of expert ``e`` take the global positions after those of ranks ``0..r-1`` and fill the replicas in order.
  Needs every rank's counts ``[W, E]`` (e.g. an all-gather of each rank's ``bincount``, one small collective per
  layer), so every rank computes the same split. The split runs on the host (the core's numpy code), so
  this mode costs one host sync per layer and, on CPU, about 10 ms per layer for DeepSeek-V3 EP32 (its
  water-filling loops over the replicated experts; see ``benchmarks/runtime.py``).

Tables live on the device and are rewritten in place by :meth:`ReplicaRouter.update_layer`, so their addresses never
change (CUDA graphs captured once keep working after a layer switches).

Failover: :meth:`ReplicaRouter.set_failed_ranks` rewrites every table, in place, from
:meth:`eplb.placement.Placement.without_ranks` in the step the failure is known, and every later table update keeps
the failed ranks out, so no route names a slot of a failed rank. Tokens of an expert with no surviving replica route
to slot -1: the engine holds them until the expert's weights are loaded again (a re-plan over the live ranks).
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.dispatch import RUNTIME_MODES, TOKEN_TABLE_ROWS, balanced_split, check_dispatch, rank_choice, replica_slots
from eplb.errors import EplbError
from eplb.placement import Failover, Placement

__all__ = ["ReplicaRouter", "ROUTER_MODES", "TOKEN_TABLE_ROWS"]

#: the dispatch modes a router runs (:data:`eplb.dispatch.RUNTIME_MODES`; the old name)
ROUTER_MODES = RUNTIME_MODES


class ReplicaRouter:
    """Logical expert ids -> physical slot ids for one rank, for every MoE layer.

    Args:
        placement: the placement in force at start.
        rank: this rank in the EP group.
        dispatch: one of :data:`eplb.dispatch.RUNTIME_MODES` (``mode`` is the old name of this argument).
        tp_size: tensor-parallel size for the ``rank`` rule (vllm-ascend); 1 otherwise.
        device: device of the tables (that of the MoE layers).
        max_replicas: the most replicas any expert may ever get (sizes the fixed tables); default ``P - E + 1``.
    """

    def __init__(self, placement: Placement, rank: int, dispatch: str = "rank", tp_size: int = 1, device="cpu",
                 max_replicas: int | None = None, mode: str | None = None):
        dispatch = check_dispatch(mode if mode is not None else dispatch, RUNTIME_MODES)
        if not 0 <= rank < placement.topology.num_ranks:
            raise EplbError(f"rank must be in [0, {placement.topology.num_ranks}), got {rank}")
        if tp_size < 1:
            raise EplbError(f"tp_size must be >= 1, got {tp_size}")
        self.dispatch, self.rank, self.tp_size = dispatch, rank, tp_size
        self.num_layers, self.num_experts = placement.num_layers, placement.num_experts
        self.topology = placement.topology
        self.max_replicas = max_replicas or placement.num_physical - placement.num_experts + 1
        self.device = torch.device(device)
        kw = dict(dtype=torch.int64, device=self.device)
        #: int64 [L, E, M]: physical slots of each expert (ascending, -1 padded)
        self.log2phy = torch.full((self.num_layers, self.num_experts, self.max_replicas), -1, **kw)
        #: int64 [L, E]: replicas of each expert
        self.replica_count = torch.ones(self.num_layers, self.num_experts, **kw)
        #: int64 [L, E]: the slot this rank sends each expert to (``rank`` and ``local`` modes)
        self.rank_table = torch.zeros(self.num_layers, self.num_experts, **kw)
        # int64 [L, E, M] on the host: distinct ranks holding each expert, ascending, -1 padded (``balanced`` mode)
        self._replica_rank_host = np.full((self.num_layers, self.num_experts, self.max_replicas), -1, dtype=np.int64)
        #: int64 [L, E, M]: the lowest slot of each expert on each of those ranks (``balanced`` mode)
        self.replica_slot = torch.zeros(self.num_layers, self.num_experts, self.max_replicas, **kw)
        #: int64 [P]: rank of every physical slot
        self.rank_of_slot = torch.as_tensor(np.array(self.topology.rank_of_slot), **kw)
        #: bool [W]: failed ranks whose slots no route may name (all False while every rank serves)
        self.failed = np.zeros(self.topology.num_ranks, dtype=bool)
        self.update_layers(np.arange(self.num_layers), placement)
        self._rank_rows = list(self.rank_table.unbind(0))  # per-layer views, bound once (cheaper per call)

    def update_layers(self, layers, placement: Placement) -> None:
        """Rewrite the tables of ``layers`` (indices) from ``placement`` (all ``L`` layers, or exactly
        ``len(layers)`` layers in that order), in place."""
        layers = np.asarray(layers, dtype=np.int64).reshape(-1)
        if layers.size == 0:
            return
        if placement.num_experts != self.num_experts or placement.num_layers not in (self.num_layers, layers.size):
            raise EplbError(f"placement has {placement.num_layers} layers x {placement.num_experts} experts, the "
                            f"router was built for {self.num_layers} x {self.num_experts}")
        rows = layers if placement.num_layers == self.num_layers else np.arange(layers.size)
        if self.failed.any():
            placement = placement.without_ranks(self.failed)
        width = placement.log2phy.shape[2]
        if width > self.max_replicas:
            raise EplbError(f"an expert has {width} replicas, the router tables hold at most {self.max_replicas}")
        index = torch.as_tensor(layers, device=self.device)
        padded = np.full((layers.size, self.num_experts, self.max_replicas), -1, dtype=np.int64)
        padded[:, :, :width] = placement.log2phy[rows]
        self.log2phy.index_copy_(0, index, torch.as_tensor(padded, device=self.device))
        self.replica_count.index_copy_(0, index, torch.as_tensor(placement.replica_count[rows], device=self.device))
        choice = rank_choice(placement, self.rank, "local" if self.dispatch == "local" else "rank", self.tp_size, rows)
        self.rank_table.index_copy_(0, index, torch.as_tensor(choice, device=self.device))
        if self.dispatch == "balanced":
            ranks, slots = replica_slots(placement, rows, self.max_replicas)
            self._replica_rank_host[layers] = ranks
            self.replica_slot.index_copy_(0, index, torch.as_tensor(slots, device=self.device))
        if isinstance(placement, Failover):
            self._park_lost(layers, placement.lost_mask[rows])

    def set_failed_ranks(self, placement: Placement, ranks) -> Failover:
        """Fail over now: route around ``ranks`` (ids or bool mask ``[W]``; empty: every rank serves again).

        Rewrites every layer's tables in place from ``placement.without_ranks(ranks)``; no weight moves. Later
        :meth:`update_layers` calls keep routing around the failed ranks until this is called again.

        Args:
            placement: the placement in force (all ``L`` layers).
            ranks: the failed ranks.

        Returns:
            The :class:`~eplb.placement.Failover`; its ``lost`` experts route to -1 until a re-plan places them.
        """
        failover = placement.without_ranks(ranks)
        self.failed = np.array(failover.failed)
        self.update_layers(np.arange(self.num_layers), placement)
        return failover

    def _park_lost(self, layers: np.ndarray, lost: np.ndarray) -> None:
        """Route the lost experts ``lost`` bool ``[len(layers), E]`` of ``layers`` to slot -1 in every mode."""
        if not lost.any():
            return
        layer, expert = np.nonzero(lost)
        layer = layers[layer]
        l_idx, e_idx = torch.as_tensor(layer, device=self.device), torch.as_tensor(expert, device=self.device)
        self.replica_count[l_idx, e_idx] = 1  # the token rotation then picks replica 0, which is -1
        self.rank_table[l_idx, e_idx] = -1
        if self.dispatch == "balanced":
            # the split needs a rank per expert: the first live rank stands in, and its slot is -1
            self._replica_rank_host[layer, expert, 0] = int(np.flatnonzero(~self.failed)[0])
            self.replica_slot[l_idx, e_idx] = -1

    def update_layer(self, layer: int, phy2log_row) -> None:
        """Rewrite the tables of one layer, in place, from its new ``phy2log`` row (int ``[P]``)."""
        self.update_layers([layer], Placement(np.asarray(phy2log_row)[None], self.num_experts, self.topology))

    def route(self, layer: int, expert_ids: torch.Tensor, group_counts: torch.Tensor | None = None) -> torch.Tensor:
        """Physical slot ids for ``expert_ids``.

        Args:
            layer: MoE layer index.
            expert_ids: int ``[N, k]`` logical experts picked for this rank's ``N`` tokens (any int dtype).
            group_counts: ``balanced`` mode only: int ``[W, E]`` tokens each rank routes to each expert this step
                (identical on every rank).

        Returns:
            int64 ``[N, k]`` physical slot ids in ``[0, P)``; -1 for an expert with no surviving replica after
            :meth:`set_failed_ranks`.
        """
        ids = expert_ids.to(torch.int64)
        if self.dispatch in ("rank", "local"):
            return torch.take(self._rank_rows[layer], ids)
        if self.dispatch == "token":
            row = torch.arange(ids.shape[0], device=ids.device) % TOKEN_TABLE_ROWS
            choice = (row.view(-1, *([1] * (ids.dim() - 1))) + self.rank + ids) % self.replica_count[layer][ids]
            return self.log2phy[layer][ids, choice]
        if group_counts is None:
            raise EplbError("balanced routing needs group_counts [W, E]: this step's tokens per expert of every rank")
        return self._route_balanced(layer, ids, group_counts)

    # -- balanced ------------------------------------------------------------------------------------------------
    def replica_split(self, layer: int, expert_load) -> np.ndarray:
        """int64 ``[E, M]``: :func:`eplb.dispatch.balanced_split` of the group's per-expert tokens ``expert_load``
        ``[E]`` this step, on the host (bit-identical on every rank)."""
        total = expert_load.cpu() if isinstance(expert_load, torch.Tensor) else expert_load
        return balanced_split(np.asarray(total, dtype=np.int64), self._replica_rank_host[layer],
                              self.topology.num_ranks)

    def _route_balanced(self, layer: int, ids: torch.Tensor, group_counts: torch.Tensor) -> torch.Tensor:
        if tuple(group_counts.shape) != (self.topology.num_ranks, self.num_experts):
            raise EplbError(f"balanced routing needs group_counts [W={self.topology.num_ranks}, "
                            f"E={self.num_experts}] (tokens per expert of every rank), got {tuple(group_counts.shape)}")
        counts = group_counts.to(device=ids.device, dtype=torch.int64)
        split = torch.as_tensor(self.replica_split(layer, counts.sum(0)), device=ids.device)  # [E, M]; host sync
        bounds = split.cumsum(1)  # tokens of replicas 0..j
        flat = ids.reshape(-1)
        # this rank's tokens of expert e take global positions offset[e], offset[e] + 1, ... (ranks in order)
        offset = counts[:self.rank].sum(0)
        order = torch.sort(flat, stable=True).indices
        sorted_ids = flat[order]
        first = torch.searchsorted(sorted_ids, sorted_ids, right=False)
        occurrence = torch.empty_like(flat)
        occurrence[order] = torch.arange(flat.numel(), device=flat.device) - first
        position = offset[flat] + occurrence
        replica = (position[:, None] >= bounds[flat]).sum(1).clamp_(max=bounds.shape[1] - 1)
        return self.replica_slot[layer][flat, replica].reshape(ids.shape)
