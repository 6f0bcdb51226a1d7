"""Replica router: maps the logical expert ids a gate picked to the physical slots their tokens go to.

The torch twin of :func:`eplb.dispatch.route` (the numpy reference the simulator is built on; tested equal): the
tables come from :mod:`eplb.dispatch`, and only the per-token work runs here, on the device.

Dispatch rules (vectorised torch ops, deterministic; no host sync in :meth:`ReplicaRouter.route`):

- ``rank``: rank ``r`` sends every token of expert ``e`` to replica ``r % count_e`` (replicas in slot order);
  with ``tp_size > 1`` to replica ``(r % tp_size + r // tp_size + e) % count_e`` (vllm-ascend's rule).
- ``token``: token ``i`` uses row ``i mod 1024`` of a rotation: replica ``(i mod 1024 + r + e) % count_e``
  (vllm-ascend's per-token table, computed instead of stored).
- ``local``: a replica on this rank if there is one, else one on this node (rotated by rank), else the ``rank`` rule.
- ``balanced``: this step's tokens per expert over the whole group are split over the ranks holding the expert so
  that the busiest rank gets nearly as few tokens as possible; rank ``r``'s tokens of expert ``e`` take the global
  positions after those of ranks ``0..r-1`` and fill the replicas in order. Needs every rank's counts ``[W, E]``
  (e.g. an all-gather of each rank's ``bincount``, one small collective per layer), so every rank computes the
  same split. The split is the torch twin of :func:`eplb.dispatch.balanced_replica_load`, on the device: the even
  split, then :data:`~eplb.dispatch.BALANCED_PASSES` (12) water-filling passes, each over a set of replicated
  experts that share no rank (fixed shapes, integer tokens, stable sorts: no host sync, bit-identical to the numpy
  reference and on every rank). On the real DeepSeek-V3 loads its busiest rank is on average 0.3-1.4% and at most
  4-6% above the exact optimum; each pass is ~18 small kernels (``benchmarks/dispatch.py``; docs/runtime.md). Its
  tables (ranks of each expert, the experts of each pass) are built with the others when a layer's placement
  changes.

Tables live on the device, every table of a layer in one row of :attr:`ReplicaRouter.tables` (built on the host by
:func:`eplb.runtime.tables.router_rows`, for a switch by the planner process), and are rewritten in place by
:meth:`ReplicaRouter.apply`, one device copy per layer, so their addresses never change (CUDA graphs captured once
keep working after a layer switches).

Failover: :meth:`ReplicaRouter.set_failed_ranks` rewrites every table, in place, from
:meth:`eplb.placement.Placement.without_ranks` in the step the failure is known, and every later table update keeps
the failed ranks out (the mask is kept here once; a controller reads it through
:attr:`PlacementInForce.failed <eplb.runtime.in_force.PlacementInForce.failed>`), so no route names a slot of a failed
rank. Tokens of an expert with no surviving replica route to slot -1: the engine holds them until the expert's weights
are loaded again (a re-plan over the live ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from eplb.dispatch import RUNTIME_RULES, TOKEN_TABLE_ROWS, check_dispatch
from eplb.errors import EplbError
from eplb.placement import Failover, Placement
from eplb.runtime.tables import TableLayout, TableSpec, router_rows
from eplb.runtime.transport import upload

__all__ = ["ReplicaRouter", "RouterTables", "ROUTER_MODES", "TOKEN_TABLE_ROWS"]

#: the dispatch rules a router runs (:data:`eplb.dispatch.RUNTIME_RULES`; the old name)
ROUTER_MODES = RUNTIME_RULES
# ``balanced``: the load of the split's spare bin W, which padded replica columns point to: above any real rank load
# (so water never reaches it), small enough that a row of them sums without overflow
_SPARE_LOAD = 1 << 40


@dataclass(frozen=True)
class RouterTables:
    """Table rows of some layers on the router's device, ready to be written in place (:meth:`ReplicaRouter.apply`).

    Attributes:
        layers: int64 ``[n]`` the layers, on the host.
        index: the same on the device.
        rows: int64 ``[n, X]`` their rows (:class:`~eplb.runtime.tables.TableLayout`).
    """

    layers: np.ndarray
    index: torch.Tensor
    rows: torch.Tensor


class ReplicaRouter:
    """Logical expert ids -> physical slot ids for one rank, for every MoE layer.

    Args:
        placement: the placement in force at start.
        rank: this rank in the EP group.
        dispatch: one of :data:`eplb.dispatch.RUNTIME_RULES` (``mode`` is the old name of this argument).
        tp_size: tensor-parallel size for the ``rank`` rule (vllm-ascend); 1 otherwise.
        device: device of the tables (that of the MoE layers).
        max_replicas: the most replicas any expert may ever get (sizes the fixed tables); default ``P - E + 1``.
    """

    def __init__(self, placement: Placement, rank: int, dispatch: str = "rank", tp_size: int = 1, device="cpu",
                 max_replicas: int | None = None, mode: str | None = None):
        dispatch = check_dispatch(mode if mode is not None else dispatch, RUNTIME_RULES)
        if not 0 <= rank < placement.topology.num_ranks:
            raise EplbError(f"rank must be in [0, {placement.topology.num_ranks}), got {rank}")
        if tp_size < 1:
            raise EplbError(f"tp_size must be >= 1, got {tp_size}")
        self.dispatch, self.rank, self.tp_size = dispatch, rank, tp_size
        self.num_layers, self.num_experts = placement.num_layers, placement.num_experts
        self.topology = placement.topology
        self.max_replicas = max_replicas or placement.num_physical - placement.num_experts + 1
        self.device = torch.device(device)
        #: what the tables depend on besides the placement (the planner process builds switches' tables from it)
        self.spec = TableSpec(rank, dispatch, tp_size, self.max_replicas)
        self.layout = TableLayout(self.spec, self.num_experts, self.topology.num_ranks)
        kw = dict(dtype=torch.int64, device=self.device)
        #: int64 [L, X]: every table of each layer in one row, so a layer's switch is one device copy; the tables
        #: below are views of it
        self.tables = torch.zeros(self.num_layers, self.layout.width, **kw)
        #: int64 [L, E, M]: physical slots of each expert (ascending, -1 padded)
        self.log2phy = self.layout.view(self.tables, "log2phy")
        #: int64 [L, E]: replicas of each expert
        self.replica_count = self.layout.view(self.tables, "replica_count")
        #: int64 [L, E]: the slot this rank sends each expert to (``rank`` and ``local`` modes)
        self.rank_table = self.layout.view(self.tables, "rank_table")
        num_ranks = self.topology.num_ranks
        balanced = dispatch == "balanced"
        self.split_width = self.layout.split_width
        #: int64 [L, E + 1, M]: distinct ranks holding each expert, ascending, padded with W (a spare bin of the
        #: split); row E is the stand-in expert that pads the schedule (``balanced`` mode, else None)
        self.split_rank = self.layout.view(self.tables, "split_rank") if balanced else None
        #: int64 [L, BALANCED_PASSES, K]: the experts each pass of the split water-fills, padded with E
        #: (:func:`eplb.dispatch.balanced_schedule`; ``balanced`` mode, else None)
        self.split_schedule = self.layout.view(self.tables, "split_schedule") if balanced else None
        #: int64 [L, E, M]: the lowest slot of each expert on each of those ranks (``balanced`` mode, else None)
        self.replica_slot = self.layout.view(self.tables, "replica_slot") if balanced else None
        self._split_column = torch.arange(self.split_width, **kw)
        self._split_divisor = self._split_column + 1  # ranks filled when the water covers columns 0..j
        # the split's starting rank loads: 0 for every rank, the spare bin's load last (cloned in each route: a
        # Python scalar written into a device tensor would be a blocking copy, and a CUDA graph cannot capture it)
        self._spare_loads = torch.zeros(num_ranks + 1, **kw)
        self._spare_loads[num_ranks:].fill_(_SPARE_LOAD)
        #: bool [W]: the failed ranks every table routes around (:meth:`set_failed_ranks`; a controller reads it as
        #: :attr:`PlacementInForce.failed <eplb.runtime.in_force.PlacementInForce.failed>`)
        self.failed = np.zeros(num_ranks, dtype=bool)
        self.update_layers(np.arange(self.num_layers), placement)
        self._rank_rows = list(self.rank_table.unbind(0))  # per-layer views, bound once (cheaper per call)

    def update_layers(self, layers, placement: Placement) -> None:
        """Rewrite the tables of ``layers`` (indices) from ``placement`` (all ``L`` layers, or exactly
        ``len(layers)`` layers in that order), routing around the :attr:`failed` ranks, in place."""
        self.apply(self.build_tables(layers, placement))

    def build_tables(self, layers, placement: Placement) -> RouterTables:
        """The tables of ``layers`` from ``placement`` (as :meth:`update_layers` takes them), built on the host and
        uploaded to the device; :meth:`apply` then writes them with device copies only."""
        layers = np.asarray(layers, dtype=np.int64).reshape(-1)
        if placement.num_experts != self.num_experts or placement.num_layers not in (self.num_layers, layers.size):
            raise EplbError(f"placement has {placement.num_layers} layers x {placement.num_experts} experts, the "
                            f"router was built for {self.num_layers} x {self.num_experts}")
        rows = layers if placement.num_layers == self.num_layers else np.arange(layers.size)
        return self.device_tables(layers, router_rows(placement, rows, self.spec, self.failed))

    def device_tables(self, layers, rows: np.ndarray) -> RouterTables:
        """:class:`RouterTables` of ``layers`` from their host rows ``[n, X]`` (one upload each)."""
        layers = np.asarray(layers, dtype=np.int64).reshape(-1)
        return RouterTables(layers, upload(layers, self.device), upload(rows, self.device))

    def apply(self, tables: RouterTables) -> None:
        """Write ``tables`` in place (device copies only: one per layer)."""
        if tables.layers.size == 1:
            self.tables[int(tables.layers[0])].copy_(tables.rows[0])
        elif tables.layers.size:
            self.tables.index_copy_(0, tables.index, tables.rows)

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

    def update_layer(self, layer: int, phy2log_row) -> None:
        """Rewrite the tables of one layer, in place, from its new ``phy2log`` row (int ``[P]``)."""
        self.apply(self.layer_tables(layer, phy2log_row))

    def layer_tables(self, layer: int, phy2log_row) -> RouterTables:
        """:meth:`build_tables` of one layer from its new ``phy2log`` row (int ``[P]``)."""
        return self.build_tables([layer], Placement(np.asarray(phy2log_row)[None], self.num_experts, self.topology))

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
    def replica_split(self, layer: int, expert_load: torch.Tensor) -> torch.Tensor:
        """int64 ``[E, M]`` on the device: whole tokens each distinct replica rank of each expert receives for the
        group's per-expert tokens ``expert_load`` int64 ``[E]`` (on the device) this step; the torch twin of
        :func:`eplb.dispatch.balanced_replica_load` (see that function for the passes), equal to it bit for bit."""
        num_ranks, column = self.topology.num_ranks, self._split_column
        bins = self.split_rank[layer]  # [E + 1, M]; W pads
        tokens = torch.cat([expert_load, expert_load.new_zeros(1)])  # the stand-in expert E has none
        valid = bins < num_ranks
        count = valid.sum(1).clamp_(min=1)
        share = torch.where(valid, (tokens // count)[:, None] + (column < (tokens % count)[:, None]), 0)
        rank_load = self._spare_loads.clone()
        rank_load.scatter_add_(0, bins.reshape(-1), share.reshape(-1))  # integer adds: any order gives the same sum
        schedule = self.split_schedule[layer]  # [passes, K]
        # the ranks and tokens of every pass's experts in two gathers; each pass then reads its row
        pass_bins, pass_tokens = bins[schedule], tokens[schedule]
        for experts, ranks, pour in zip(schedule.unbind(0), pass_bins.unbind(0), pass_tokens.unbind(0)):
            old = share[experts]
            low, order = torch.sort(rank_load[ranks] - old, dim=1, stable=True)
            level = torch.div(low.cumsum(1).add_(pour[:, None]), self._split_divisor, rounding_mode="floor").amin(1)
            fill = (level[:, None] - low).clamp_(min=0)
            fill += column < (pour - fill.sum(1))[:, None]
            new = torch.empty_like(fill).scatter_(1, order, fill)
            # the experts of a pass share no rank: only the spare bin W repeats, and it gets 0
            rank_load.scatter_add_(0, ranks.reshape(-1), (new - old).reshape(-1))
            share.index_copy_(0, experts, new)  # the stand-in row repeats, always with zeros
        return share[:-1]

    def _route_balanced(self, layer: int, ids: torch.Tensor, group_counts: torch.Tensor) -> torch.Tensor:
        if tuple(group_counts.shape) != (self.topology.num_ranks, self.num_experts):
            raise EplbError(f"balanced routing needs group_counts [W={self.topology.num_ranks}, "
                            f"E={self.num_experts}] (tokens per expert of every rank), got {tuple(group_counts.shape)}")
        counts = group_counts.to(device=ids.device, dtype=torch.int64)
        bounds = self.replica_split(layer, counts.sum(0)).cumsum(1)  # tokens of replicas 0..j
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
