"""The shape of an expert-parallel cluster: ranks, nodes, slots per rank and expert groups."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from eplb._arrays import to_int
from eplb.errors import TopologyError

__all__ = ["Topology", "check_topology"]


def _positive_int(name: str, value) -> int:
    return to_int(value, name, TopologyError, minimum=1)


def check_topology(value, field: str = "topology") -> "Topology":
    """``value`` when it is a :class:`Topology`, else :class:`TopologyError` naming ``field``."""
    if not isinstance(value, Topology):
        raise TopologyError(f"{field} must be an eplb.Topology (e.g. Topology(num_ranks=32, slots_per_rank=9)), "
                            f"got {type(value).__name__} {value!r:.60}")
    return value


@dataclass(frozen=True)
class Topology:
    """An expert-parallel group of ``num_ranks`` ranks with ``slots_per_rank`` expert slots each.

    Physical slot ``p`` (``0 <= p < num_physical``) lives on rank ``p // slots_per_rank``; rank ``r`` lives on node
    ``r // ranks_per_node``. ``num_groups`` is the number of expert groups used by group-limited routing (DeepSeek-V3
    has 8); it must divide the number of logical experts, which is checked when the topology meets a load.

    Args:
        num_ranks: W, ranks (devices) in the EP group.
        slots_per_rank: K, expert slots per rank.
        num_nodes: N, nodes; must divide ``num_ranks``.
        num_groups: G, expert groups.
    """

    num_ranks: int
    slots_per_rank: int
    num_nodes: int = 1
    num_groups: int = 1

    def __post_init__(self):
        for name in ("num_ranks", "slots_per_rank", "num_nodes", "num_groups"):
            object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
        if self.num_ranks % self.num_nodes:
            raise TopologyError(
                f"num_ranks={self.num_ranks} is not divisible by num_nodes={self.num_nodes}; "
                "every node must hold the same number of ranks"
            )

    @classmethod
    def from_redundant(cls, num_ranks: int, num_experts: int, num_redundant: int, num_nodes: int = 1,
                       num_groups: int = 1) -> "Topology":
        """The topology holding ``num_experts + num_redundant`` slots spread evenly over ``num_ranks`` ranks.

        Raises:
            TopologyError: when ``(num_experts + num_redundant) % num_ranks != 0`` (vllm-ascend's rule).
        """
        num_ranks = _positive_int("num_ranks", num_ranks)
        num_experts = _positive_int("num_experts", num_experts)
        num_redundant = to_int(num_redundant, "num_redundant", TopologyError, minimum=0)
        total = num_experts + num_redundant
        if total % num_ranks:
            raise TopologyError(
                f"(num_experts + num_redundant) % num_ranks must be 0: ({num_experts} + {num_redundant}) % "
                f"{num_ranks} = {total % num_ranks}"
            )
        return cls(num_ranks, total // num_ranks, num_nodes, num_groups)

    @property
    def num_physical(self) -> int:
        """P = W * K, physical expert slots in the whole group."""
        return self.num_ranks * self.slots_per_rank

    @property
    def ranks_per_node(self) -> int:
        return self.num_ranks // self.num_nodes

    @cached_property
    def rank_of_slot(self) -> np.ndarray:
        """int64 ``[P]``: the rank that holds each physical slot."""
        out = np.repeat(np.arange(self.num_ranks, dtype=np.int64), self.slots_per_rank)
        out.flags.writeable = False
        return out

    @cached_property
    def node_of_rank(self) -> np.ndarray:
        """int64 ``[W]``: the node of each rank."""
        out = np.arange(self.num_ranks, dtype=np.int64) // self.ranks_per_node
        out.flags.writeable = False
        return out

    def check_experts(self, num_experts: int) -> None:
        """Raise :class:`TopologyError` unless ``num_experts`` experts fit this topology.

        Requires ``num_experts <= num_physical`` (every expert needs a slot) and ``num_experts % num_groups == 0``.
        """
        num_experts = _positive_int("num_experts", num_experts)
        if num_experts > self.num_physical:
            raise TopologyError(
                f"{num_experts} logical experts do not fit in {self.num_physical} physical slots "
                f"({self.num_ranks} ranks x {self.slots_per_rank} slots); need num_physical >= num_experts"
            )
        if num_experts % self.num_groups:
            raise TopologyError(
                f"num_experts={num_experts} is not divisible by num_groups={self.num_groups}"
            )

    def describe(self) -> str:
        return (f"{self.num_ranks} ranks x {self.slots_per_rank} slots = {self.num_physical} slots, "
                f"{self.num_nodes} node(s), {self.num_groups} group(s)")
