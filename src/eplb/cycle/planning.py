"""The one planning function: what a cycle moves, computed the same way by the simulator and the runtime.

:func:`plan_cycle` takes a window of expert load, the placement in force and the cycle's options, runs the policy and
returns a :class:`CyclePlan`: the placement after the cycle, which layers change and in which order, each layer's
transfers (:mod:`eplb.cycle.transfers`), the bytes they carry and the move schedule (which layers in which step), all as
integers, plus the :class:`PlanState` the next cycle starts from. :func:`eplb.sim.simulate` calls it in-process; the
runtime calls it in its planner worker (:mod:`eplb.runtime.planner`) and every rank checks
:attr:`CyclePlan.checksum`, which covers the placement, the transfers and the schedule, before anything moves. So a
cycle the simulator scores is the cycle the runtime runs.

Which layers a plan applies: layers the policy changed, whose predicted PAR before is at least ``min_par``, whose
predicted gain ``par_before - par_after`` exceeds ``min_gain``, and (with ``similarity_threshold``) whose load drifted
since the layer was last applied (cosine similarity of max-normalised window loads below the threshold, as xLLM
does). ``max_layers`` keeps the largest gains (cherry-picking). They are applied largest gain first (ties: lower layer
first), ``layers_per_step`` per step (``layers_per_step=0``: all in one step), or within ``bytes_per_step``.

``bytes_per_step`` bounds the staging memory of every rank in every step (:mod:`eplb.cycle.staging` counts what a rank
stages: received experts and experts changing slot locally on the device, and with ``host_staging`` sent and received
experts in pinned host memory, each arena within half the budget). A layer whose move does not fit is split into
parts (:func:`eplb.cycle.staging.split_layer`), each a valid placement of the layer, applied in consecutive steps; parts
of different layers share a step while every rank's staging fits. The schedule names a layer once per part: its k-th
appearance applies its k-th part (``CyclePlan.parts[i]`` is the i-th appearance). A group of changes that must go
together (a swap of single-replica experts) and does not fit even alone is left out: the layer stops at its last
part, and :attr:`CyclePlan.left_out` names the slots.

State across cycles (:class:`PlanState`): a policy may keep state from one cycle to the next (FlashLB compares each
layer's balance with the one it last planned for), and the similarity rule needs each layer's load when last
applied; ``auto`` its unspent move budget. The caller keeps the state of the last plan that came back (one that
applies nothing too, so an unspent budget keeps growing) and hands it to the next call; the runtime keeps it in the
serving process, so a planner restart loses nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import warnings
from dataclasses import dataclass, field

import numpy as np

from eplb._lazy import renamed_names
from eplb.cycle.pricing import price_of
from eplb.cycle.staging import budget_experts, split_layer, staged_experts
from eplb.cycle.transfers import LayerTransfer, layer_transfer
from eplb.placement import Placement

__all__ = ["PlanState", "CyclePlan", "plan_cycle", "planning_window", "cycle_policy", "schedule_parts",
           "check_cycle_plan", "placement_checksum"]

_CHECKSUM_MASK = (1 << 62) - 1


@dataclass(frozen=True)
class PlanState:
    """What one cycle hands to the next.

    Attributes:
        policy: the policy's own state (see :meth:`eplb.policies.base.Policy.next_state`), None for stateless ones.
        applied_load: float64 ``[L, E]`` window load each layer was last applied on (NaN rows: never applied); None
            when no similarity threshold is used.
    """

    policy: object = None
    applied_load: np.ndarray | None = None


@dataclass(frozen=True)
class CyclePlan:
    """One cycle's plan, as every rank applies it.

    Attributes:
        phy2log: int64 ``[L, P]`` placement once every scheduled layer is applied (other layers as before).
        changed: bool ``[L]`` layers the policy changed (applied or not).
        par_before, par_after: float64 ``[L]`` PAR the policy predicts on the window, before / after.
        moved_slots: int64 ``[L]`` slots whose expert changes, per layer the policy changed.
        layers: layers applied, in order (of their first part).
        parts: one :class:`~eplb.cycle.transfers.LayerTransfer` per part, in the order the schedule applies them; a
            part's ``old_row`` / ``new_row`` are its layer's rows before / after it (one part per layer unless
            ``bytes_per_step`` split it).
        layer_bytes: int64 ``[L]`` bytes each applied layer moves over the network (its parts' transfers x expert
            bytes).
        schedule: the parts grouped by step, named by layer: ``schedule[i]`` is applied in the i-th apply step; a
            layer's k-th appearance is its k-th part.
        state: the :class:`PlanState` to hand to the next cycle once this plan starts applying.
        left_out: int64 ``[n, 2]`` ``(layer, slot)`` changes of the policy's placement not applied because they do
            not fit ``bytes_per_step`` even alone (``phy2log`` keeps their old expert; ``moved_slots`` and
            ``par_after`` stay the policy's figures for its whole placement).
        staged_bytes: int64 ``[S, W]`` staging bytes each rank holds in each apply step (:mod:`eplb.cycle.staging`).
    """

    phy2log: np.ndarray
    changed: np.ndarray
    par_before: np.ndarray
    par_after: np.ndarray
    moved_slots: np.ndarray
    layers: tuple[int, ...]
    parts: tuple[LayerTransfer, ...]
    layer_bytes: np.ndarray
    schedule: tuple[tuple[int, ...], ...]
    state: PlanState = field(default_factory=PlanState)
    left_out: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    staged_bytes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))

    @property
    def transfers(self) -> tuple[LayerTransfer, ...]:
        """Deprecated spelling of :attr:`parts`."""
        warnings.warn("CyclePlan.transfers is now CyclePlan.parts (transfers goes in the next release)",
                      DeprecationWarning, stacklevel=2)
        return self.parts

    @property
    def skipped_layers(self) -> list[int]:
        """Layers the policy changed that the cycle does not apply (no gain, similarity, max_layers, ...)."""
        return sorted(set(np.flatnonzero(self.changed).tolist()) - set(self.layers))

    @functools.cached_property
    def checksum(self) -> int:
        """62-bit checksum of the placement, the parts (transfers and rows) and the schedule: equal on ranks that
        apply the same (computed once; the runtime computes it on a reader thread, off the serving thread)."""
        digest = hashlib.blake2b(digest_size=8)
        digest.update(np.ascontiguousarray(self.phy2log, dtype=np.int64).tobytes())
        for transfer in self.parts:
            digest.update(np.int64(transfer.layer).tobytes())
            digest.update(np.ascontiguousarray(transfer.moves, dtype=np.int64).tobytes())
            digest.update(np.ascontiguousarray(transfer.new_row, dtype=np.int64).tobytes())
        for step in self.schedule:
            digest.update(np.asarray([-1, *step], dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(self.layer_bytes, dtype=np.int64).tobytes())
        return int.from_bytes(digest.digest(), "little") & _CHECKSUM_MASK


def placement_checksum(phy2log: np.ndarray) -> int:
    """A 62-bit checksum of a placement (int64 ``[L, P]``), equal on every rank for the same placement."""
    data = np.ascontiguousarray(phy2log, dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & _CHECKSUM_MASK


def cycle_policy(name, options: dict | None = None, dispatch: str = "even"):
    """The registered policy ``name`` with ``options``; one that can plan for the per-batch balanced split (it takes
    a ``dispatch`` option) is told so when the cycle's ``dispatch`` is ``balanced``, unless ``options`` says
    otherwise."""
    from eplb.policies import get_policy, policy_options

    options = dict(options or {})
    if dispatch == "balanced" and "dispatch" not in options and "dispatch" in policy_options(name):
        options["dispatch"] = "balanced"
    return get_policy(name, **options)


def planning_window(policy, rows: np.ndarray) -> np.ndarray:
    """What ``policy`` plans on from the window's per-step rows ``[T, L, E]``: the rows themselves when it
    declares ``wants_steps``, else their sum ``[L, E]`` (float64). A ``[L, E]`` window is returned as is."""
    rows = np.asarray(rows)
    if rows.ndim == 2 or getattr(policy, "wants_steps", False):
        return rows
    return rows.sum(axis=0, dtype=np.float64)


def plan_cycle(policy, window, current: Placement, cycle, expert_bytes=0, live_ranks=None, resilience=None,
               state: PlanState | None = None, from_checkpoint: bool = False, price=None) -> CyclePlan:
    """Plan one cycle.

    Args:
        policy: a :class:`~eplb.policies.base.Policy` (see :func:`cycle_policy`).
        window: ``[T, L, E]`` per-step load or ``[L, E]`` sum; reduced by :func:`planning_window`.
        current: the placement in force.
        cycle: the :class:`~eplb.cycle.CycleConfig` (thresholds and pace).
        expert_bytes: bytes of one expert's weights, an integer or int ``[L]`` per layer.
        live_ranks: bool ``[W]`` ranks still serving (None: all).
        resilience: the policies' resilience option, or None.
        state: what the previous cycle handed on (None: the first cycle).
        from_checkpoint: an expert no live rank holds is read from a checkpoint (a transfer from rank -1) instead of
            raising; the simulator's model of lost experts that wait for a re-plan.
        price: the :class:`~eplb.cycle.pricing.MovePrice` a policy that prices its moves weighs them with (the
            simulator: its cost model; the runtime: the figures it measured; None: the cost model's defaults for
            ``expert_bytes``); its ``life_steps`` defaults to the cycle's ``cycle_steps``.

    Returns:
        A :class:`CyclePlan`.

    Raises:
        PolicyError: the policy cannot plan (e.g. too few live slots).
    """
    state = state or PlanState()
    window = planning_window(policy, window)
    live = None if live_ranks is None else np.asarray(live_ranks, dtype=bool)
    priced = {"price": _with_life(price, cycle, expert_bytes)} if getattr(policy, "prices_moves", False) else {}
    plan = policy.rebalance(window, current.topology, current=current,
                            live_ranks=None if live is None or live.all() else live, resilience=resilience,
                            state=state.policy, **priced)
    num_layers = current.num_layers
    summed = window if window.ndim == 2 else window.sum(axis=0, dtype=np.float64)
    before, after = plan.par_before.astype(np.float64), plan.par_after.astype(np.float64)
    moved = plan.moved_slots.astype(np.int64)
    gain = before - after
    selected = plan.changed & (moved > 0) & (before >= cycle.min_par) & (gain > cycle.min_gain)
    applied_load = state.applied_load
    if cycle.similarity_threshold is not None:
        if applied_load is None:
            applied_load = np.full(summed.shape, np.nan)
        never = np.isnan(applied_load[:, 0])
        similarity = _cosine_similarity(summed, np.where(never[:, None], 0.0, applied_load))
        selected &= never | (similarity < cycle.similarity_threshold)
    order = [int(layer) for layer in np.lexsort((np.arange(num_layers), -gain)) if selected[layer]]
    if cycle.max_layers is not None:
        order = order[: cycle.max_layers]
    per_layer_bytes = np.broadcast_to(np.asarray(expert_bytes, dtype=np.int64), (num_layers,))
    transfers, left_out = [], []
    for layer in order:
        old, new = current.phy2log[layer], plan.placement.phy2log[layer]
        if cycle.bytes_per_step is None:
            transfers.append(layer_transfer(layer, old, new, current.topology, live, from_checkpoint))
            continue
        capacity = budget_experts(cycle.bytes_per_step, per_layer_bytes[layer], cycle.host_staging)
        parts, slots = split_layer(layer, old, new, current.topology, capacity, cycle.host_staging, live,
                                   from_checkpoint)
        transfers += parts
        left_out += [(layer, slot) for slot in slots.tolist()]
    order = list(dict.fromkeys(t.layer for t in transfers))  # a layer none of whose changes fits drops out
    layer_bytes = np.zeros(num_layers, dtype=np.int64)
    phy2log = np.array(current.phy2log, dtype=np.int64)
    for transfer in transfers:
        layer_bytes[transfer.layer] += transfer.num_moves * per_layer_bytes[transfer.layer]
        phy2log[transfer.layer] = transfer.new_row
    schedule, staged_bytes = schedule_parts(transfers, per_layer_bytes, cycle)
    if order and cycle.similarity_threshold is not None:
        applied_load = applied_load.copy()
        applied_load[order] = summed[order]
    next_state = PlanState(policy=policy.next_state(state.policy, plan, order, window),
                           applied_load=applied_load if cycle.similarity_threshold is not None else None)
    return CyclePlan(phy2log=phy2log, changed=np.asarray(plan.changed, dtype=bool), par_before=before,
                     par_after=after, moved_slots=moved, layers=tuple(order), parts=tuple(transfers),
                     layer_bytes=layer_bytes, schedule=schedule, state=next_state,
                     left_out=np.asarray(left_out, dtype=np.int64).reshape(-1, 2), staged_bytes=staged_bytes)


def _with_life(price, cycle, expert_bytes):
    """``price`` (None: the step-time model's defaults for ``expert_bytes``) with the plan's life set to the
    re-plan interval where the caller left it open."""
    price = price_of(expert_bytes) if price is None else price
    if price.life_steps is not None:
        return price
    return dataclasses.replace(price, life_steps=float(cycle.cycle_steps))


def schedule_parts(parts, expert_bytes: np.ndarray, cycle) -> tuple[tuple[tuple[int, ...], ...], np.ndarray]:
    """``parts`` (:class:`~eplb.cycle.transfers.LayerTransfer` s, in order) grouped into apply steps, and the staging
    bytes of each rank in each step (int64 ``[S, W]``). All in one step (``layers_per_step=0``), ``layers_per_step`` per
    step, or, with ``bytes_per_step``, as many as keep every rank's staging arenas within the budget (each within
    half with ``host_staging``); two parts of one layer never share a step. Steps are named by layer."""
    num_ranks = parts[0].num_ranks if parts else 0
    host = cycle.host_staging
    costs = [staged_experts(part, host) * int(expert_bytes[part.layer]) for part in parts]
    steps, staged = [], []
    if cycle.bytes_per_step is not None:
        limit = np.array([[cycle.bytes_per_step / 2 if host else cycle.bytes_per_step],
                          [cycle.bytes_per_step / 2 if host else np.inf]])
        for part, cost in zip(parts, costs):
            if not steps or part.layer in steps[-1] or (staged[-1] + cost > limit).any():
                steps.append([])
                staged.append(np.zeros((2, num_ranks), dtype=np.int64))
            steps[-1].append(part.layer)
            staged[-1] += cost
    else:
        size = cycle.layers_per_step or max(len(parts), 1)
        for index in range(0, len(parts), size):
            steps.append([part.layer for part in parts[index:index + size]])
            staged.append(sum(costs[index:index + size]))
    staged_bytes = np.zeros((len(staged), num_ranks), dtype=np.int64)
    for index, cost in enumerate(staged):
        staged_bytes[index] = cost.sum(axis=0)
    return tuple(tuple(step) for step in steps), staged_bytes


def check_cycle_plan(plan: CyclePlan, current: np.ndarray, num_experts: int, topology) -> str | None:
    """What is wrong with a plan that came from another process, or None: a placement that is not valid for the
    model, or layers, transfers and schedule that do not lead from ``current`` to it."""
    from eplb.placement import find_problems

    phy2log = np.asarray(plan.phy2log)
    if phy2log.shape != current.shape:
        return f"phy2log has shape {phy2log.shape}, expected {current.shape}"
    problems = find_problems(phy2log, num_experts, topology)
    if problems:
        return "; ".join(problems[:3])
    changed = np.flatnonzero((phy2log != current).any(axis=1)).tolist()
    if sorted(plan.layers) != changed:
        return f"the plan applies layers {sorted(plan.layers)}, its placement changes layers {changed}"
    parts = [t.layer for t in plan.parts]
    if list(dict.fromkeys(parts)) != list(plan.layers):
        return f"transfers cover layers {parts}, the plan applies {list(plan.layers)}"
    if [layer for step in plan.schedule for layer in step] != parts:
        return f"the schedule {plan.schedule} does not apply the parts of layers {parts} in order"
    if any(len(set(step)) != len(step) for step in plan.schedule):
        return f"the schedule {plan.schedule} applies two parts of one layer in one step"
    rows = {layer: current[layer] for layer in plan.layers}
    for t in plan.parts:
        if (t.moves[:, 0] < 0).any():
            return f"layer {t.layer} reads experts from a checkpoint, which the runtime's transfers cannot do"
        if not np.array_equal(t.old_row, rows[t.layer]):
            return f"a part of layer {t.layer} does not start from the placement the previous one leads to"
        problems = find_problems(t.new_row[None], num_experts, topology)
        if problems:
            return f"a part of layer {t.layer}: {problems[0]}"
        rows[t.layer] = t.new_row
    for layer, row in rows.items():
        if not np.array_equal(row, phy2log[layer]):
            return f"the transfers of layer {layer} do not lead from the current placement to the plan"
    return None


def _cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 ``[L]``: cosine similarity of the max-normalised rows of two ``[L, E]`` loads (1 for empty rows)."""
    a = a / np.maximum(a.max(axis=1, keepdims=True), 1e-300)
    b = b / np.maximum(b.max(axis=1, keepdims=True), 1e-300)
    norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    return np.where(norm > 0, dot / np.where(norm > 0, norm, 1.0), 1.0)


# old spellings, for one release: plan_checksum checksums a placement, not a plan (that is CyclePlan.checksum)
__getattr__ = renamed_names(__name__, {"plan_checksum": "placement_checksum"})
