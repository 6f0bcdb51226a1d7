"""Replica choice (``dispatch``): which replica of an expert each token goes to, and so how much load each rank serves.

One module for the simulator and the runtime. The numpy functions here are the reference: :func:`route` gives the
slot of every token exactly as the runtime's router (:class:`eplb.runtime.router.ReplicaRouter`, their torch twin,
tested equal) does, :func:`rank_choice` and :func:`replica_slots` build the router's tables, :func:`balanced_split` is
the split its ``balanced`` rule uses, and :func:`dispatch_share` / :func:`balanced_rank_load` give the rank loads the
simulator scores.

Rules (those of vllm-ascend, xLLM, SGLang and DeepSeek's LPLB). Tokens of an expert are assumed to come evenly
from every source rank (each rank serves its own share of the batch), which makes the static rules a fixed share
matrix per placement:

- ``even``: an expert with ``c`` replicas sends ``1/c`` of its tokens to each (the metrics' convention).
- ``rank``: source rank ``r`` sends all its tokens of expert ``e`` to replica ``r % c`` (replicas in ascending
  slot order; with ``tp_size > 1`` the vllm-ascend rotation ``(r % tp + r // tp + e) % c``).
- ``token``: a per-token rotation (replica ``(row + rank + e) % c``, row = token index mod 1024); over a batch
  every replica gets the same share, so in expectation it equals ``even``.
- ``local``: a replica on the source rank, else one on the source rank's node (rotated by rank), else the ``rank``
  rule.
- ``balanced``: per batch, the whole tokens of each replicated expert are split over its replica ranks so that the
  busiest rank is nearly as light as possible: :func:`balanced_replica_load`, :data:`BALANCED_PASSES` (12)
  water-filling passes over sets of experts that share no rank (a Gauss-Seidel sweep), from the even split. On
  the real DeepSeek-V3 loads the busiest rank ends on average 0.3-1.4% and at most 4-6% above the exact min-max
  optimum (``python benchmarks/dispatch.py``). The router runs the same integer passes with torch on the device.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from eplb._lazy import renamed_names
from eplb.errors import EplbError
from eplb.metrics import rank_share
from eplb.placement import Placement

__all__ = [
    "DISPATCH_RULES",
    "STATIC_RULES",
    "RUNTIME_RULES",
    "TOKEN_TABLE_ROWS",
    "check_dispatch",
    "rank_choice",
    "replica_slots",
    "balanced_split",
    "route",
    "dispatch_share",
    "replica_ranks",
    "balanced_rank_load",
    "balanced_replica_load",
    "optimal_peak",
    "balanced_sets",
    "balanced_schedule",
    "BALANCED_PASSES",
]

DISPATCH_RULES = ("even", "rank", "token", "local", "balanced")
STATIC_RULES = ("even", "rank", "token", "local")
#: the rules a router can run (``even`` is the simulator's expectation of ``token``, not a rule a router follows)
RUNTIME_RULES = ("rank", "token", "local", "balanced")
#: rows of the per-token rotation (vllm-ascend's table size)
TOKEN_TABLE_ROWS = 1024
#: water-filling passes of the ``balanced`` split, in the router and the simulator alike
BALANCED_PASSES = 12


def check_dispatch(rule, allowed=DISPATCH_RULES, name: str = "dispatch") -> str:
    """``rule`` when it is one of ``allowed``, else an :class:`~eplb.errors.EplbError` naming ``name``."""
    if rule not in allowed:
        raise EplbError(f"{name} must be one of {', '.join(allowed)}, got {rule!r}")
    return rule


def rank_choice(placement, rank: int, rule: str = "rank", tp_size: int = 1, layers=None) -> np.ndarray:
    """int64 ``[len(layers), E]``: the slot ``rank`` sends each expert's tokens to under ``rank`` or ``local``.

    ``placement`` is a :class:`~eplb.placement.Placement` or its :class:`~eplb.placement.Failover` (-1 for an expert
    with no surviving replica); ``layers`` the layer indices (None: all).
    """
    layers = np.arange(placement.num_layers) if layers is None else np.asarray(layers, dtype=np.int64)
    rank_rule = placement.log2phy_for_rank(rank, tp_size)[layers]
    if rule != "local":
        return rank_rule
    topology = placement.topology
    log2phy = placement.log2phy[layers]  # [l, E, M]
    valid = log2phy >= 0
    slot_rank = np.where(valid, topology.rank_of_slot[np.maximum(log2phy, 0)], -1)
    on_rank = valid & (slot_rank == rank)
    on_node = valid & (topology.node_of_rank[np.maximum(slot_rank, 0)] == topology.node_of_rank[rank])
    # replicas are in ascending slot order, so the first one on this rank is its lowest local slot
    first_local = np.take_along_axis(log2phy, np.argmax(on_rank, axis=2)[..., None], axis=2)[..., 0]
    node_count = on_node.sum(axis=2)
    pick = rank % np.maximum(node_count, 1)  # the pick-th replica on this node
    node_index = np.argmax(np.cumsum(on_node, axis=2) > pick[..., None], axis=2)
    node_choice = np.take_along_axis(log2phy, node_index[..., None], axis=2)[..., 0]
    return np.where(on_rank.any(axis=2), first_local, np.where(node_count > 0, node_choice, rank_rule))


def replica_slots(placement, layers, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ranks, slots)`` int64 ``[len(layers), E, width]``: :func:`replica_ranks` of ``layers`` padded to ``width``
    with -1, and the lowest slot of the expert on each of those ranks (0 where padded): the tables of the
    ``balanced`` rule."""
    layers = np.asarray(layers, dtype=np.int64)
    ranks_all = _distinct_ranks(placement.log2phy[layers], placement.rank_of_slot)
    ranks = np.full((layers.size, placement.num_experts, width), -1, dtype=np.int64)
    ranks[:, :, :ranks_all.shape[2]] = ranks_all
    log2phy = placement.log2phy[layers]  # ascending slots, so the first match on a rank is its lowest slot
    slot_rank = np.where(log2phy >= 0, placement.rank_of_slot[np.maximum(log2phy, 0)], -2)
    match = slot_rank[:, :, None, :] == ranks[:, :, :, None]  # [l, E, width, M]
    slots = np.take_along_axis(log2phy, np.argmax(match, axis=3), axis=2)
    return ranks, np.where(ranks >= 0, slots, 0)


def balanced_split(expert_load, replica_rank: np.ndarray, num_ranks: int) -> np.ndarray:
    """int64 ``[E, M]``: whole tokens each distinct replica rank of each expert (ordered as ``replica_rank``
    ``[E, M]``, -1 padded) receives in one step of one layer, for the group's per-expert tokens ``expert_load``
    ``[E]``: :func:`balanced_replica_load` with :data:`BALANCED_PASSES` passes (bit-identical on every rank)."""
    return balanced_replica_load(np.asarray(expert_load)[None], np.asarray(replica_rank)[None], num_ranks)[0][0]


def route(placement, layer: int, rank: int, expert_ids, rule: str, tp_size: int = 1, group_counts=None
          ) -> np.ndarray:
    """int64, shaped like ``expert_ids`` ``[N, k]``: the slot each of ``rank``'s tokens goes to in ``layer`` (-1
    for an expert with no surviving replica when ``placement`` is a :class:`~eplb.placement.Failover`).

    The reference of the runtime's router: ``rank`` / ``local`` use :func:`rank_choice`; ``token`` sends token
    ``i`` to replica ``(i mod 1024 + rank + e) % count_e``; ``balanced`` needs ``group_counts`` int ``[W, E]`` (every
    rank's tokens per expert this step): the split of :func:`balanced_split`, where ``rank``'s tokens of expert ``e``
    take the group-wide positions after those of ranks ``0..rank-1`` and fill the replicas in order.
    """
    check_dispatch(rule, RUNTIME_RULES)
    ids = np.asarray(expert_ids, dtype=np.int64)
    if rule in ("rank", "local"):
        return rank_choice(placement, rank, rule, tp_size, [layer])[0][ids]
    log2phy = placement.log2phy[layer]
    if rule == "token":
        count = np.maximum(placement.replica_count[layer], 1)
        row = np.arange(ids.shape[0]) % TOKEN_TABLE_ROWS
        choice = (row.reshape(-1, *([1] * (ids.ndim - 1))) + rank + ids) % count[ids]
        return log2phy[ids, choice]
    if group_counts is None:
        raise EplbError("balanced dispatch needs group_counts [W, E]: this step's tokens per expert of every rank")
    counts = np.asarray(group_counts, dtype=np.int64)
    ranks, slots = replica_slots(placement, [layer], log2phy.shape[1])
    split = balanced_split(counts.sum(axis=0), ranks[0], placement.topology.num_ranks)
    bounds = np.cumsum(split, axis=1)
    flat = ids.reshape(-1)
    occurrence = np.zeros(flat.size, dtype=np.int64)
    seen: dict[int, int] = {}
    for i, expert in enumerate(flat.tolist()):
        occurrence[i] = seen.get(expert, 0)
        seen[expert] = occurrence[i] + 1
    position = counts[:rank].sum(axis=0)[flat] + occurrence
    replica = np.minimum((position[:, None] >= bounds[flat]).sum(axis=1), bounds.shape[1] - 1)
    return slots[0][flat, replica].reshape(ids.shape)


def dispatch_share(placement: Placement, rule: str = "even", tp_size: int = 1) -> np.ndarray:
    """float64 ``[L, E, W]``: the share of expert ``e``'s tokens that rank ``w`` serves under a static rule.

    Each ``[l, e, :]`` sums to 1.

    Raises:
        EplbError: unknown rule (``balanced`` depends on each batch: use :func:`balanced_rank_load`).
    """
    if rule not in STATIC_RULES:
        raise EplbError(f"dispatch rule {rule!r} has no fixed share; expected one of {', '.join(STATIC_RULES)}")
    if rule in ("even", "token"):
        return rank_share(placement)
    num_ranks = placement.topology.num_ranks
    share = np.zeros((placement.num_layers, placement.num_experts, num_ranks))
    for rank in range(num_ranks):
        _add_rank(share, placement.rank_of_slot[rank_choice(placement, rank, rule, tp_size)], 1.0 / num_ranks)
    return share


def _add_rank(share: np.ndarray, target_rank: np.ndarray, amount: float) -> None:
    """``share[l, e, target_rank[l, e]] += amount`` for every layer and expert."""
    num_layers, num_experts, _ = share.shape
    share[np.arange(num_layers)[:, None], np.arange(num_experts)[None, :], target_rank] += amount


def replica_ranks(placement: Placement) -> np.ndarray:
    """int64 ``[L, E, M]``: the distinct ranks holding each expert, ascending, padded with -1.

    Two replicas of one expert on the same rank count once (they serve the same rank).
    """
    return _distinct_ranks(placement.log2phy, placement.rank_of_slot)


def _distinct_ranks(log2phy: np.ndarray, rank_of_slot: np.ndarray) -> np.ndarray:
    """:func:`replica_ranks` of the map ``log2phy`` ``[l, E, M]`` (some layers' rows)."""
    ranks = np.where(log2phy >= 0, rank_of_slot[np.maximum(log2phy, 0)], np.iinfo(np.int64).max)
    ranks = np.sort(ranks, axis=2)
    repeat = np.zeros(ranks.shape, dtype=bool)
    repeat[..., 1:] = ranks[..., 1:] == ranks[..., :-1]
    ranks = np.sort(np.where(repeat, np.iinfo(np.int64).max, ranks), axis=2)
    width = max(1, int((ranks != np.iinfo(np.int64).max).sum(axis=2).max()))
    ranks = ranks[..., :width]
    return np.where(ranks == np.iinfo(np.int64).max, -1, ranks)


def balanced_replica_load(expert_load, replica_rank, num_ranks: int, table=None, passes: int = BALANCED_PASSES,
                          schedule=None):
    """Split each row's expert tokens over the experts' replica ranks so that the busiest rank is nearly as light as
    possible, by a fixed number of water-filling passes on whole tokens.

    Experts with one replica rank are fixed. Each replicated expert starts from the even split (``t // c`` tokens
    per rank, one more on the first ``t % c``). Pass ``i`` then takes the set ``i % C`` of
    :func:`balanced_schedule` (experts that share no rank) and pours each expert of it back over its ranks by
    water-filling: its lowest ranks are raised to a common whole-token level, and the tokens left over go one each
    to the lowest of them. Within a set this is exact block coordinate descent on the sum of squared rank loads
    (whose minimum is also the min-max split on this transportation polytope), so the passes are a Gauss-Seidel
    sweep, not damped Jacobi (which needs several times the passes). On per-step loads drawn from the real
    DeepSeek-V3 workloads (a ``default`` plan, EP32 and EP64, ~64 tokens per expert per step), 12 passes leave the
    busiest rank on average 0.3-0.5% and at most 4-6% above the exact optimum (:func:`optimal_peak`), against 10-11%
    / 37-49% for the even split and 0.03-0.05% / 0.2-0.3% for 200 passes (``python benchmarks/dispatch.py``); on
    ``auto`` plans made for balanced dispatch, which replicate more experts, 1.2-1.4% on average. All
    integer arithmetic with stable sorts: deterministic, and bit-identical to the router's torch twin on any
    device.

    Args:
        expert_load: int ``[B, E]``: tokens of each logical expert in each row (a step of one layer); floats must
            be whole numbers.
        replica_rank: int ``[V, E, M]``: distinct ranks holding each expert, -1 padded (:func:`replica_ranks`);
            ``V`` placements (e.g. one per layer).
        num_ranks: W.
        table: int ``[B]``: which of the ``V`` placements each row uses; None when ``V == 1`` or ``V == B``.
        passes: water-filling passes (0 keeps the even split); the runtime runs :data:`BALANCED_PASSES`.
        schedule: :func:`balanced_schedule` of ``replica_rank`` with ``passes`` when already built (a router's
            table); None builds it.

    Returns:
        ``(replica_load int64 [B, E, M], rank_load int64 [B, W])``: tokens each replica rank (ordered as
        ``replica_rank``) and each rank receives.
    """
    expert_load, replica_rank, table = _check(expert_load, replica_rank, num_ranks, table)
    schedule = _schedule(replica_rank, num_ranks, _passes(passes), schedule)
    replica_load = np.zeros((expert_load.shape[0], *replica_rank.shape[1:]), dtype=np.int64)
    rank_load = _water_fill(expert_load, replica_rank, table, schedule, num_ranks, replica_load, True)
    return replica_load, rank_load


def balanced_sets(replica_rank) -> list[np.ndarray]:
    """The sets of replicated experts (two or more ranks in ``replica_rank`` int ``[E, M]``) that one pass of the
    balanced split water-fills at once, each ascending: no two experts of a set share a rank.

    Greedy colouring in expert order; each colour is then widened by the experts of the following colours (in
    cycle order) that share no rank with it, so every pass updates as many experts as it can.
    """
    replica_rank = np.asarray(replica_rank)
    replicated = np.flatnonzero((replica_rank >= 0).sum(axis=1) > 1)
    # plain Python sets: a few dozen experts of a few ranks each, where numpy's per-call cost would dominate
    ranks_of = {int(e): set(replica_rank[e][replica_rank[e] >= 0].tolist()) for e in replicated}
    colours: list[list[int]] = []
    used: list[set] = []
    for expert, ranks in ranks_of.items():
        colour = next((c for c in range(len(colours)) if used[c].isdisjoint(ranks)), len(colours))
        if colour == len(colours):
            colours.append([])
            used.append(set())
        colours[colour].append(expert)
        used[colour] |= ranks
    sets = []
    for colour, members in enumerate(colours):
        taken = set(used[colour])
        members = list(members)
        for other in colours[colour + 1:] + colours[:colour]:
            for expert in other:
                if taken.isdisjoint(ranks_of[expert]):
                    members.append(expert)
                    taken |= ranks_of[expert]
        sets.append(np.array(sorted(members), dtype=np.int64))
    return sets


def balanced_schedule(replica_rank, num_ranks: int, passes: int = BALANCED_PASSES, width: int | None = None
                      ) -> np.ndarray:
    """int64 ``[V, passes, K]``: the experts each pass of the balanced split water-fills, for each of the ``V``
    placements of ``replica_rank`` int ``[V, E, M]``: pass ``i`` takes set ``i % C`` of :func:`balanced_sets`,
    padded with ``E`` (a stand-in expert with no tokens and no rank). ``width`` K: default the largest set (at least
    1); a set never holds more than ``num_ranks // 2`` experts. With more sets than passes (none on DeepSeek-V3
    plans: 3-5 sets), the experts only in the sets left out keep the even split."""
    replica_rank = np.asarray(replica_rank)
    num_layers, num_experts = replica_rank.shape[:2]
    sets = [balanced_sets(replica_rank[v]) for v in range(num_layers)]
    largest = max([1] + [s.size for layer in sets for s in layer])
    width = largest if width is None else width
    if largest > width:
        raise EplbError(f"width must be >= {largest} (the largest set of the balanced split), got {width}")
    schedule = np.full((num_layers, passes, width), num_experts, dtype=np.int64)
    for v, layer in enumerate(sets):
        for i in range(passes if layer else 0):
            members = layer[i % len(layer)]
            schedule[v, i, :members.size] = members
    return schedule


@njit(cache=True)
def _water_fill(expert_load, replica_rank, table, schedule, num_ranks, replica_out, keep_replicas):
    """The passes of :func:`balanced_replica_load` on every row (a compiled loop: the experts of a pass share no
    rank, so taking them one after the other is the same as taking them at once, as the router does); fills
    ``replica_out`` ``[B, E, M]`` when ``keep_replicas`` (else uses its row 0 as scratch) and returns the rank loads
    ``[B, W]``."""
    num_rows, num_experts = expert_load.shape
    width = replica_rank.shape[2]
    rank_load = np.zeros((num_rows, num_ranks), dtype=np.int64)
    heights = np.empty(width, dtype=np.int64)
    columns = np.empty(width, dtype=np.int64)
    fill = np.empty(width, dtype=np.int64)
    for row in range(num_rows):
        version = table[row]
        ranks = replica_rank[version]
        share = replica_out[row] if keep_replicas else replica_out[0]
        load = rank_load[row]
        for expert in range(num_experts):  # the even split: t // c each, one more on the first t % c
            count = 0
            while count < width and ranks[expert, count] >= 0:
                count += 1
            tokens = expert_load[row, expert]
            for j in range(width):
                share[expert, j] = 0
                if j < count:
                    share[expert, j] = tokens // count + (1 if j < tokens % count else 0)
                    load[ranks[expert, j]] += share[expert, j]
        for experts in schedule[version]:
            for expert in experts:
                if expert == num_experts:  # the stand-in that pads a set
                    continue
                count = 0
                while count < width and ranks[expert, count] >= 0:
                    count += 1
                tokens = expert_load[row, expert]
                for j in range(count):  # the ranks' loads without this expert, sorted (stable insertion sort)
                    height = load[ranks[expert, j]] - share[expert, j]
                    k = j
                    while k > 0 and heights[k - 1] > height:
                        heights[k] = heights[k - 1]
                        columns[k] = columns[k - 1]
                        k -= 1
                    heights[k] = height
                    columns[k] = j
                # the water level: filling the k lowest ranks gives (tokens + their heights) // k; the least is it
                level = np.iinfo(np.int64).max
                prefix = 0
                for k in range(count):
                    prefix += heights[k]
                    level = min(level, (tokens + prefix) // (k + 1))
                left = tokens
                for k in range(count):
                    fill[k] = max(level - heights[k], 0)
                    left -= fill[k]
                for k in range(count):  # the leftover tokens, one each to the lowest ranks
                    new = fill[k] + (1 if k < left else 0)
                    j = columns[k]
                    load[ranks[expert, j]] += new - share[expert, j]
                    share[expert, j] = new
    return rank_load


def optimal_peak(expert_load, replica_rank, num_ranks: int) -> float:
    """The least possible busiest-rank load of one row, solved exactly as a linear program (HiGHS).

    The reference :func:`balanced_replica_load` is checked against; too slow for every step.

    Args:
        expert_load: float ``[E]`` tokens of each expert.
        replica_rank: int ``[E, M]`` distinct ranks holding each expert, -1 padded.
        num_ranks: W.
    """
    from scipy.optimize import linprog

    pairs = [(e, r) for e in range(replica_rank.shape[0]) for r in replica_rank[e] if r >= 0]
    # variables: tokens of each (expert, rank) pair, then the peak; minimise the peak
    a_ub = np.zeros((num_ranks, len(pairs) + 1))
    a_eq = np.zeros((replica_rank.shape[0], len(pairs) + 1))
    a_ub[:, -1] = -1
    for i, (e, r) in enumerate(pairs):
        a_eq[e, i] = a_ub[r, i] = 1
    cost = np.zeros(len(pairs) + 1)
    cost[-1] = 1
    return float(linprog(cost, A_ub=a_ub, b_ub=np.zeros(num_ranks), A_eq=a_eq, b_eq=expert_load).fun)


def balanced_rank_load(expert_load, replica_rank, num_ranks: int, table=None, passes: int = BALANCED_PASSES,
                       schedule=None) -> np.ndarray:
    """float64 ``[B, W]``: the rank loads of :func:`balanced_replica_load` (what the simulator scores), without
    building the per-replica array."""
    expert_load, replica_rank, table = _check(expert_load, replica_rank, num_ranks, table)
    schedule = _schedule(replica_rank, num_ranks, _passes(passes), schedule)
    scratch = np.zeros((1, *replica_rank.shape[1:]), dtype=np.int64)
    return _water_fill(expert_load, replica_rank, table, schedule, num_ranks, scratch, False).astype(np.float64)


def _passes(passes: int) -> int:
    if isinstance(passes, bool) or not isinstance(passes, (int, np.integer)) or passes < 0:
        raise EplbError(f"passes must be an integer >= 0, got {passes!r}")
    return int(passes)


def _schedule(replica_rank, num_ranks: int, passes: int, schedule) -> np.ndarray:
    if schedule is None:
        return balanced_schedule(replica_rank, num_ranks, passes)
    schedule = np.asarray(schedule, dtype=np.int64)
    if schedule.ndim != 3 or schedule.shape[:2] != (replica_rank.shape[0], passes):
        raise EplbError(f"schedule must be [placements={replica_rank.shape[0]}, passes={passes}, experts per pass], "
                        f"got shape {schedule.shape}")
    return schedule


def _check(expert_load, replica_rank, num_ranks, table):
    expert_load = np.asarray(expert_load)
    if expert_load.dtype.kind not in "biuf":
        raise EplbError(f"expert_load must hold whole tokens, got dtype {expert_load.dtype}")
    whole = np.rint(expert_load).astype(np.int64)
    if (whole != expert_load).any() or (whole < 0).any():
        raise EplbError("expert_load must hold whole tokens >= 0 (the balanced split moves whole tokens)")
    expert_load = whole
    replica_rank = np.asarray(replica_rank)
    if expert_load.ndim != 2:
        raise EplbError(f"expert_load must be [rows, experts], got shape {expert_load.shape}")
    if replica_rank.ndim != 3 or replica_rank.shape[1] != expert_load.shape[1]:
        raise EplbError(f"replica_rank must be [placements, experts={expert_load.shape[1]}, replicas], got shape "
                        f"{replica_rank.shape}")
    if replica_rank.size and (replica_rank.max() >= num_ranks or (replica_rank[..., 0] < 0).any()):
        raise EplbError(f"replica_rank must hold ranks in [0, {num_ranks}) with at least one replica per expert")
    if table is None:
        if replica_rank.shape[0] not in (1, expert_load.shape[0]):
            raise EplbError(f"table is needed: {replica_rank.shape[0]} placements for {expert_load.shape[0]} rows")
        table = np.zeros(expert_load.shape[0], dtype=np.int64) if replica_rank.shape[0] == 1 else \
            np.arange(expert_load.shape[0])
    table = np.asarray(table, dtype=np.int64)
    if table.shape != expert_load.shape[:1] or (table.size and not 0 <= table.min() <= table.max()
                                                 < replica_rank.shape[0]):
        raise EplbError(f"table must be [{expert_load.shape[0]}] indices into {replica_rank.shape[0]} placements")
    return expert_load, replica_rank.astype(np.int64, copy=False), table


# old spellings, for one release: "mode" is EPLB's mode (off, dynamic, record, static), not a dispatch rule
__getattr__ = renamed_names(__name__, {"DISPATCH_MODES": "DISPATCH_RULES", "STATIC_MODES": "STATIC_RULES",
                                       "RUNTIME_MODES": "RUNTIME_RULES"})
