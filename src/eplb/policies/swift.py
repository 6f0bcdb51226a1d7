"""``swift`` (vllm-ascend policy type 2): SwiftBalancer — good balance with few, cheap transfers.

Two rule sets (option ``rules``):

- ``"vllm-ascend"`` (the default) does what vllm-ascend's ``SwiftBalanceEplb`` does, step for step, with its
  arithmetic and orders (:mod:`eplb.policies._swift_ascend_kernels`): home copies by scan order, the redundant slots
  re-allotted with the reference's replica weights (``2 h / (c + 2)`` after ``c`` extra copies), copies placed on
  the least-loaded rank with a redundant slot within one transfer per rank pair, leftover slots filled, up to 100
  pairwise swaps, and the layer taken when its peak drops. Only the redundant slots of the table in force can take
  copies (from vLLM's initial layout, scan order makes a few ranks' slots redundant). What still differs from the
  reference, and why: docs/peers.md.
- ``"eplb"`` is our version, better on purpose; the rest of this docstring describes it.

Per layer (``[T, L, E]`` loads are summed over the window first):

1. **Home copies.** Scanning slot 0 of every rank, then slot 1, ..., the first occurrence of an expert is its home
   copy; every other slot is a redundant slot. Home copies stay; only redundant slots are re-assigned.
   A rank holding an expert twice (invalid for vllm-ascend) is repaired first, in every layer, whatever its balance:
   the repeat gets the expert with the largest load per replica that the rank lacks.
2. **Threshold.** A layer whose PAR is below ``threshold`` (after any repair) is left as it is.
3. **Spreading** (``spread=True``; not in the reference). Redundant slots can only receive copies, so a rank without
   one can never be relieved: from vLLM's initial layout (all redundant slots on the last ranks) only a few ranks
   can take copies. Before planning, the redundant slots are evened out until
   every rank has the floor or the ceiling of their mean (per node in intra-node mode). First for free, by role
   swaps: an expert homed on rank ``u`` with a redundant copy on rank ``v`` may as well be homed on ``v``, which
   hands ``u`` a redundant slot (chains of such swaps are found by breadth-first search). Only where no chain
   exists, a rank short of redundant slots sends its coldest home expert into a redundant slot of the rank with the
   most of them, overwriting that rank's copy with the least load per replica; the sender's slot keeps its weights
   as a redundant copy. Each such relocation is one transfer and counts as a moved slot. Cold experts are chosen so
   that the receiving ranks do not heat up. A layer whose plan is rejected (step 7) keeps no relocation either.
4. **Replicas.** The ``R = P - E`` redundant slots go greedily to the expert with the largest load per replica
   (per-copy load after ``c`` extra copies is ``h / (c + 1)``; the reference's ``(c + 1) / (c + 2)`` shrink is a
   bug). In intra-node mode each node shares out its own redundant slots among the experts homed on it.
5. **Copies**, heaviest first, each onto the least-loaded rank (of the home's node in intra-node mode) that has a
   free redundant slot, does not hold the expert and may receive it (see transfers below). Redundant slots left
   over take the heaviest expert per replica their rank lacks.
6. **Swap rounds** (up to ``swap_rounds``): from the hottest rank, partners are tried from the coolest up; the first
   partner whose best swap (minimising the larger of the two loads) lowers the hot rank by at least ``swap_gain`` x
   the mean rank load, without the partner ending above that, is taken. An expert moved this cycle is not moved
   again (``pin="expert"``, the reference's rule: no replica of an expert that received a copy, was relocated or
   swapped is swapped). ``pin="replica"`` only pins the replicas that moved and the experts already swapped, so the
   home copy of an expert that just got a copy elsewhere may still leave a hot rank: far better balance for a few
   more moved slots (DeepSeek-V3, 32 x 9: PAR 1.01 instead of 1.14, 84 instead of 68 moved slots per layer).
7. **Acceptance.** The layer changes only if its max rank load strictly drops (the reference compares with layer
   0's mean rank load, whatever the layer); experts that stay on a rank keep their slot
   (:func:`eplb.policies.shared.retention.preserve_slots`).

Transfers: an expert arriving on a rank that did not hold it before. Its source is defined as the expert's
scan-order home rank in the placement in force, and every (source rank, destination rank) pair carries at most one
transfer per cycle — including the repair and spreading transfers, except where a repair has no other way out.

No rank ends up holding an expert twice, except when a rank has more slots than there are experts (``K > E``),
where a repeat cannot be avoided; then a rank repeats an expert only when it already holds all ``E``.
In intra-node mode every transfer stays inside a node (source and destination share it), except where repairing
a repeated expert (or ``K > E``) leaves no other choice.
"""

from __future__ import annotations

import logging

import numpy as np

from eplb._arrays import to_bool
from eplb.errors import PolicyError
from eplb.placement import Placement
from eplb.policies._swift_ascend_kernels import plan_layers as ascend_plan_layers
from eplb.policies._swift_plan_kernels import plan_layers
from eplb.policies._swift_prepare_kernels import prepare_layers
from eplb.policies.base import Policy
from eplb.policies.shared.packing import replicate_counts
from eplb.policies.shared.retention import preserve_slots
from eplb.topology import Topology

__all__ = ["SwiftPolicy", "POLICY"]

logger = logging.getLogger(__name__)

#: values of the ``pin`` option
PINS = ("expert", "replica")
#: values of the ``rules`` option: what vllm-ascend's code does, or our version
RULES = ("vllm-ascend", "eplb")


def _number(name: str, value, kind: type):
    """``value`` as ``kind`` (float or int), or a :class:`PolicyError` naming the option."""
    try:
        number = kind(value)
        exact = kind is float or float(value) == number
    except (TypeError, ValueError):
        raise PolicyError(f"{name} must be a number, got {value!r}") from None
    if not exact:
        raise PolicyError(f"{name} must be an integer, got {value!r}")
    return number


class SwiftPolicy(Policy):
    """SwiftBalancer (vllm-ascend id 2); see the module docstring.

    Without ``current``, it plans from vLLM's initial layout (``rules="vllm-ascend"``, vllm-ascend's table when no
    map is given) or from the ``spread`` layout (``rules="eplb"``) (:meth:`Placement.initial`).

    Args:
        rules: ``"vllm-ascend"`` (what vllm-ascend's policy file does) or ``"eplb"`` (our version: redundant slots
            spread over the ranks, exact replica weights, the options below).
        threshold: leave layers whose PAR is below this alone (1.01 in the reference; 1.0 plans every layer).
        intra_node: run the planning per node, so that no copy crosses a node boundary.
        swap_rounds: at most this many swaps per layer (per node in intra-node mode).
        swap_gain: a swap must lower the hottest rank by at least this fraction of the mean rank load.
        spread: ``rules="eplb"`` only: even out redundant slots over ranks before planning (default True).
        pin: ``rules="eplb"`` only: what the swap rounds leave alone: ``expert`` (every replica of an expert moved
            this cycle; the default) or ``replica`` (replicas that moved this cycle and experts swapped this cycle).
    """

    name = "swift"
    allow_shared_rank = False

    def __init__(self, rules: str = "vllm-ascend", threshold: float = 1.01, intra_node: bool = False,
                 swap_rounds: int = 100, swap_gain: float = 0.01, spread: bool | None = None, pin: str | None = None):
        threshold, swap_gain = _number("threshold", threshold, float), _number("swap_gain", swap_gain, float)
        swap_rounds = _number("swap_rounds", swap_rounds, int)
        if rules not in RULES:
            raise PolicyError(f"rules must be one of {', '.join(RULES)}, got {rules!r}")
        if not np.isfinite(threshold):
            raise PolicyError(f"threshold must be a finite PAR (e.g. 1.01), got {threshold!r}")
        if swap_rounds < 0:
            raise PolicyError(f"swap_rounds must be >= 0, got {swap_rounds}")
        if not 0 < swap_gain < np.inf:
            raise PolicyError(f"swap_gain must be > 0 (a fraction of the mean rank load), got {swap_gain!r}")
        if rules == "vllm-ascend" and (spread is not None or pin is not None):
            given = ", ".join(f"{k}={v!r}" for k, v in (("spread", spread), ("pin", pin)) if v is not None)
            raise PolicyError(f"{given} is an option of rules='eplb'; vllm-ascend's rules neither spread nor choose "
                              f"what the swaps pin")
        pin = "expert" if pin is None else pin
        if pin not in PINS:
            raise PolicyError(f"pin must be one of {', '.join(PINS)}, got {pin!r}")
        self.rules = rules
        self.threshold = threshold
        self.intra_node = to_bool(intra_node, "intra_node", PolicyError)
        self.spread = to_bool(True if spread is None else spread, "spread", PolicyError) and rules == "eplb"
        self.swap_rounds = swap_rounds
        self.swap_gain = swap_gain
        self.pin = pin

    def place(self, load: np.ndarray, topology: Topology, current: Placement | None, window: np.ndarray
              ) -> np.ndarray:
        num_layers, num_experts = load.shape[-2:]
        # fresh writable copies: numba compiles read-only arrays as a separate signature
        window = np.array(window, dtype=np.float64)
        if current is None:
            layout = "vllm" if self.rules == "vllm-ascend" else "spread"
            current = Placement.initial(num_experts, topology, num_layers, layout=layout)
        old = np.array(current.rank_table, dtype=np.int64, order="C")
        num_ranks = topology.num_ranks
        if self.intra_node:
            group_of_rank = np.array(topology.node_of_rank, dtype=np.int64)
            group_start = np.arange(topology.num_nodes + 1, dtype=np.int64) * topology.ranks_per_node
        else:
            group_of_rank = np.zeros(num_ranks, dtype=np.int64)
            group_start = np.array([0, num_ranks], dtype=np.int64)
        if self.rules == "vllm-ascend":
            table = np.sort(old, axis=2)
            repeats = (table[..., 1:] == table[..., :-1]).any(axis=(1, 2))
            if repeats.any():  # vllm-ascend cannot hold such a table: repaired first, as our rules do
                old[repeats] = prepare_layers(old[repeats], window[repeats], group_of_rank, group_start, np.inf,
                                              False)[0]
            # the reference's gain threshold and acceptance use layer 0's mean rank load for every layer
            reference_mean = window[0].sum() / num_ranks
            new = ascend_plan_layers(old, window, group_start, self.threshold, self.swap_rounds,
                                     self.swap_gain * reference_mean, reference_mean)
            return new.reshape(num_layers, -1)
        repaired, base, home, home_rank, source, pair_used, moved, active = prepare_layers(
            old, window, group_of_rank, group_start, self.threshold, self.spread)
        counts = self._replica_counts(window, home_rank, group_of_rank, topology)
        new = plan_layers(old, repaired, base, home, home_rank, source, pair_used, moved, active, window, counts,
                          group_of_rank, group_start, self.swap_rounds, self.swap_gain, self.pin == "expert")
        logger.debug("swift: %d of %d layers above the threshold", int(active.sum()), num_layers)
        return preserve_slots(new.reshape(num_layers, -1), current.phy2log, num_ranks)

    def _replica_counts(self, window: np.ndarray, home_rank: np.ndarray, group_of_rank: np.ndarray,
                        topology: Topology) -> np.ndarray:
        """int64 ``[L, E]``: replicas per expert, home included; per node of the home in intra-node mode."""
        num_layers, num_experts = window.shape
        if not self.intra_node:
            return replicate_counts(window, topology.num_physical)
        num_nodes = topology.num_nodes
        home_node = group_of_rank[home_rank]  # [L, E]
        homed = home_node[:, None, :] == np.arange(num_nodes)[None, :, None]  # [L, N, E]
        node_slots = topology.ranks_per_node * topology.slots_per_rank
        # experts homed elsewhere weigh -1, so they get an extra replica only when the node has no expert of its own
        weight = np.where(homed, window[:, None, :], -1.0).reshape(num_layers * num_nodes, num_experts)
        extra = node_slots - homed.sum(axis=2).ravel()
        counts = replicate_counts(weight, num_experts + extra).reshape(num_layers, num_nodes, num_experts)
        return np.take_along_axis(counts, home_node[:, None, :], axis=1)[:, 0, :]

    def __repr__(self) -> str:
        if self.rules == "vllm-ascend":
            return (f"SwiftPolicy(rules='vllm-ascend', threshold={self.threshold}, intra_node={self.intra_node}, "
                    f"swap_rounds={self.swap_rounds}, swap_gain={self.swap_gain})")
        return (f"SwiftPolicy(rules='eplb', threshold={self.threshold}, intra_node={self.intra_node}, "
                f"spread={self.spread}, swap_rounds={self.swap_rounds}, swap_gain={self.swap_gain}, pin={self.pin!r})")


POLICY = SwiftPolicy
