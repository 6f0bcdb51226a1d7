"""What every policy shares: the :class:`Plan` it returns and the :class:`Policy` base class.

A policy only implements :meth:`Policy.place` on validated numpy arrays; the base class checks the input, accepts
torch tensors and ``phy2log`` arrays for ``current``, and computes the plan's predicted PAR and moves the same way
for every policy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from eplb.errors import PolicyError
from eplb.load import as_load, quiet_layers, window_sum
from eplb.metrics import par, rank_loads
from eplb.placement import Placement, live_mask, shared_rank_experts
from eplb.policies.shared.resilience import Resilience, live_topology, make_resilient, reload_lost
from eplb.topology import Topology, check_topology

__all__ = ["Plan", "Policy", "as_placement"]


@dataclass(frozen=True)
class Plan:
    """The result of one planning cycle.

    Attributes:
        placement: the new placement, ``L`` layers; unchanged layers equal the reference placement.
        reference: the placement the plan was made against: ``current``, or vLLM's initial layout when there was none.
        changed: bool ``[L]``, layers whose placement differs from ``reference``.
        par_before: float64 ``[L]``, PAR of ``reference`` on the planning load (window sum, even split).
        par_after: float64 ``[L]``, PAR of ``placement`` on the same load.
        moved_slots: int64 ``[L]``, slots whose logical expert changes.
        live_ranks: bool ``[W]``, the ranks planned on (None: all). PARs are then over the live ranks, with the
            reference routed by failover (:meth:`Placement.without_ranks`); the failed ranks' slots keep the
            reference's experts, which no failover route reaches.
    """

    placement: Placement
    reference: Placement
    changed: np.ndarray
    par_before: np.ndarray
    par_after: np.ndarray
    moved_slots: np.ndarray
    live_ranks: np.ndarray | None = None

    @property
    def total_moved_slots(self) -> int:
        return int(self.moved_slots.sum())


def as_placement(current, num_experts: int, topology: Topology, num_layers: int) -> Placement | None:
    """``current`` (a :class:`Placement`, ``phy2log`` array/tensor or None) checked against the problem size."""
    if current is None:
        return None
    if not isinstance(current, Placement):
        current = Placement(current, num_experts, topology)
    if current.topology.num_physical != topology.num_physical or current.topology.num_ranks != topology.num_ranks:
        raise PolicyError(f"current placement is for {current.topology.describe()}, but the plan is for "
                          f"{topology.describe()}")
    if current.num_experts != num_experts or current.num_layers != num_layers:
        raise PolicyError(f"current placement has {current.num_layers} layers x {current.num_experts} experts, "
                          f"the load has {num_layers} layers x {num_experts} experts")
    if current.topology != topology:  # same slots, other nodes/groups: reinterpret on the requested topology
        current = Placement(current.phy2log, num_experts, topology)
    return current


class Policy:
    """Base class of placement policies.

    Subclasses set ``name`` and implement :meth:`place`. Options are keyword arguments of ``__init__``.
    Policies are deterministic: the same input gives the same output on every rank.
    """

    name: str = ""
    #: whether two replicas of one expert may share a rank in this policy's output
    allow_shared_rank: bool = True
    #: whether :meth:`place` reads the window's per-step rows ``[T, L, E]``; when False it reads only their sum, and
    #: callers that keep a window (the simulator, the runtime's recorder) hand it the sum
    wants_steps: bool = False
    #: whether :meth:`place` weighs its moves with a :class:`~eplb.cycle.pricing.MovePrice` (keyword ``price``)
    prices_moves: bool = False

    def rebalance(self, load, topology: Topology, current=None, live_ranks=None,
                  resilience: Resilience | None = None, state=None, price=None) -> Plan:
        """Plan a placement for ``load``.

        Args:
            load: ``[L, E]`` window load or ``[T, L, E]`` per-step load (numpy, list or torch).
            topology: the cluster to place on.
            current: placement in force (:class:`Placement` or ``phy2log`` ``[L, P]``), or None for a fresh layout.
            live_ranks: the ranks to place on (iterable of ids or bool mask ``[W]``); None: all. The policy plans
                on the live ranks' sub-topology (see :mod:`eplb.policies.shared.resilience`), so every policy honours
                it.
            resilience: spread replicas over ranks and nodes, and a minimum replica count for the hottest experts.
            state: what :meth:`next_state` returned after the previous cycle (None: none, or a stateless policy);
                handed to :meth:`place` as the keyword ``state`` when not None.
            price: the :class:`~eplb.cycle.pricing.MovePrice` of a move (cost model or measured figures), handed to
                :meth:`place` as the keyword ``price`` when the policy ``prices_moves`` and it is not None.

        Layers too quiet to plan on (no load, or fewer tokens than live ranks: :func:`eplb.load.quiet_layers`) keep
        the placement in force (``current``, or the initial layout), whatever the policy; only a policy that never
        puts an expert twice on one rank still repairs a quiet layer that does, and ``resilience`` still spreads a
        quiet layer's replicas apart (same experts, same replica counts).

        Returns:
            A :class:`Plan`.

        Raises:
            PolicyError: the live slots cannot hold every expert (the error names the experts left out).
        """
        load = as_load(load)
        num_layers, num_experts = load.shape[-2:]
        check_topology(topology).check_experts(num_experts)
        if resilience is not None and not isinstance(resilience, Resilience):
            raise PolicyError(f"resilience must be an eplb.policies.shared.resilience.Resilience or None, got "
                              f"{type(resilience).__name__} {resilience!r:.60}")
        current = as_placement(current, num_experts, topology, num_layers)
        live = None if live_ranks is None else live_mask(live_ranks, topology.num_ranks)
        if live is not None and live.all():
            live = None
        window = window_sum(load)
        reference = current if current is not None else Placement.initial(num_experts, topology, num_layers)
        quiet = quiet_layers(window, topology.num_ranks if live is None else int(live.sum()))
        extra = {} if state is None else {"state": state}
        if price is not None and self.prices_moves:
            extra["price"] = price
        if live is None:
            keep = self._keeps(quiet, reference.phy2log, topology)
            if keep.all():
                phy2log = reference.phy2log
            else:
                phy2log = np.asarray(self.place(load, topology, current, window, **extra), dtype=np.int64)
                phy2log = phy2log.reshape(num_layers, topology.num_physical)
                if resilience is not None:
                    phy2log = make_resilient(phy2log, window, topology, resilience)
                phy2log = np.where(keep[:, None], reference.phy2log, phy2log)
            phy2log = _spread_kept(phy2log, keep, window, topology, resilience)
            new = Placement(phy2log, num_experts, topology)
            par_before, par_after = par(rank_loads(reference, window)), par(rank_loads(new, window))
        else:
            new = self._place_live(load, window, topology, current, reference, live, resilience, quiet, extra)
            par_before = _live_par(reference, window, live, count_waiting=True)
            par_after = _live_par(new, window, live, count_waiting=False)
        moved = reference.moves_to(new).sum(axis=1).astype(np.int64)
        return Plan(
            placement=new,
            reference=reference,
            changed=moved > 0,
            par_before=par_before,
            par_after=par_after,
            moved_slots=moved,
            live_ranks=live,
        )

    def _place_live(self, load, window, topology, current, reference, live, resilience, quiet, extra
                    ) -> Placement:
        """Plan on the live ranks' sub-topology and embed the result; failed ranks keep ``reference``'s slots, and
        quiet layers only get their lost experts back."""
        num_layers, num_experts = window.shape
        start = reload_lost(reference.phy2log, window, topology, live)  # also checks the live slots suffice
        keep = self._keeps(quiet, start, topology)
        sub_topology = live_topology(topology, live)
        live_slots = live[topology.rank_of_slot]
        start[:, live_slots] = _spread_kept(start[:, live_slots], keep, window, sub_topology, resilience,
                                            topology.node_of_rank[live])
        if keep.all():
            return Placement(start, num_experts, topology)
        sub_current = None
        if current is not None:
            sub_current = Placement(start[:, live_slots], num_experts, sub_topology)
        sub = np.asarray(self.place(load, sub_topology, sub_current, window, **extra), dtype=np.int64)
        sub = sub.reshape(num_layers, sub_topology.num_physical)
        if resilience is not None:
            sub = make_resilient(sub, window, sub_topology, resilience, topology.node_of_rank[live])
        sub = Placement(sub, num_experts, sub_topology).phy2log  # the policy's output is checked on its own terms
        start[:, live_slots] = np.where(keep[:, None], start[:, live_slots], sub)
        return Placement(start, num_experts, topology)

    def _keeps(self, quiet: np.ndarray, phy2log: np.ndarray, topology: Topology) -> np.ndarray:
        """bool ``[L]``: the quiet layers that keep ``phy2log``, the placement in force. A policy that never puts an
        expert twice on one rank still repairs a quiet layer that does (vllm-ascend rejects such a layer)."""
        if self.allow_shared_rank or not quiet.any():
            return quiet
        return quiet & ~np.isin(np.arange(len(quiet)), shared_rank_experts(phy2log, topology)[:, 0])

    def place(self, load: np.ndarray, topology: Topology, current: Placement | None, window: np.ndarray
              ) -> np.ndarray:
        """Return ``phy2log`` int64 ``[L, P]`` for a validated ``load`` (``[L, E]`` or ``[T, L, E]``).

        ``window`` is float64 ``[L, E]``, ``load`` summed over steps, computed once by :meth:`rebalance`
        (read-only: copy it before writing)."""
        raise NotImplementedError

    def next_state(self, state, plan: Plan, layers, load):
        """The state to hand to the next cycle once ``plan``'s ``layers`` (a list of layer indices), planned on
        ``load`` (as given to :meth:`rebalance`), are applied. Stateless policies keep None; the state must be
        deterministic and picklable (it travels to the planner worker and back)."""
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _live_par(placement: Placement, window: np.ndarray, live: np.ndarray, count_waiting: bool) -> np.ndarray:
    """float64 ``[L]``: PAR over the live ranks of ``placement`` routed by failover.

    With ``count_waiting``, the tokens of experts with no live replica are added to the busiest rank: they wait for
    a reload, which delays the layer at least as much as serving them there would.
    """
    failover = placement.without_ranks(~live)
    loads = failover.rank_loads(window)[:, live]
    if count_waiting:
        waiting = failover.waiting(window)
        busiest = np.argmax(loads, axis=1)
        loads[np.arange(loads.shape[0]), busiest] += waiting
    return par(loads)


def _spread_kept(phy2log: np.ndarray, keep: np.ndarray, window: np.ndarray, topology: Topology, resilience,
                 node_of_rank: np.ndarray | None = None) -> np.ndarray:
    """``phy2log`` int64 ``[L, P]`` with the kept (quiet) layers' replicas spread apart when ``resilience`` is asked:
    a quiet layer keeps its experts and replica counts (its load is too thin to raise any), but the promise that one
    failed rank loses no replicated expert holds for every layer. A layer already spread is left as it is."""
    if resilience is None or not keep.any():
        return phy2log
    out = np.array(phy2log, dtype=np.int64, copy=True)
    spread_only = dataclasses.replace(resilience, min_replicas=1)
    out[keep] = make_resilient(out[keep], window[keep], topology, spread_only, node_of_rank)
    return out
