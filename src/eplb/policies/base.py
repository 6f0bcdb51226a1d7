"""What every policy shares: the :class:`Plan` it returns and the :class:`Policy` base class.

A policy only implements :meth:`Policy.place` on validated numpy arrays; the base class checks the input, accepts
torch tensors and ``phy2log`` arrays for ``current``, and computes the plan's predicted PAR and moves the same way
for every policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eplb.errors import PolicyError
from eplb.load import as_load, window_sum
from eplb.metrics import par, rank_loads
from eplb.placement import Placement
from eplb.topology import Topology

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
    """

    placement: Placement
    reference: Placement
    changed: np.ndarray
    par_before: np.ndarray
    par_after: np.ndarray
    moved_slots: np.ndarray

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
    allows_shared_rank: bool = True

    def rebalance(self, load, topology: Topology, current=None) -> Plan:
        """Plan a placement for ``load``.

        Args:
            load: ``[L, E]`` window load or ``[T, L, E]`` per-step load (numpy, list or torch).
            topology: the cluster to place on.
            current: placement in force (:class:`Placement` or ``phy2log`` ``[L, P]``), or None for a fresh layout.

        Returns:
            A :class:`Plan`.
        """
        load = as_load(load)
        num_layers, num_experts = load.shape[-2:]
        topology.check_experts(num_experts)
        current = as_placement(current, num_experts, topology, num_layers)
        phy2log = np.asarray(self.place(load, topology, current), dtype=np.int64)
        new = Placement(phy2log.reshape(num_layers, topology.num_physical), num_experts, topology)
        reference = current if current is not None else Placement.initial(num_experts, topology, num_layers)
        window = window_sum(load)
        moved = reference.moves_to(new).sum(axis=1).astype(np.int64)
        return Plan(
            placement=new,
            reference=reference,
            changed=moved > 0,
            par_before=par(rank_loads(reference, window)),
            par_after=par(rank_loads(new, window)),
            moved_slots=moved,
        )

    def place(self, load: np.ndarray, topology: Topology, current: Placement | None) -> np.ndarray:
        """Return ``phy2log`` int64 ``[L, P]`` for a validated ``load`` (``[L, E]`` or ``[T, L, E]``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
