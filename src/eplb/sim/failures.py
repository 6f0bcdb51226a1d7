"""Rank and node failures in a simulation: what fails when, and the figures of each failure."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eplb.cycle import CycleRecord
from eplb.errors import EplbError
from eplb.metrics import summarize_par
from eplb.topology import Topology

__all__ = ["Failure", "failed_ranks", "failure_events"]


@dataclass(frozen=True)
class Failure:
    """A rank (``kind="rank"``) or a whole node (``kind="node"``) that stops serving at ``step`` and, when ``back`` is
    given, serves again from step ``back``."""

    kind: str
    index: int
    step: int
    back: int | None = None

    def __post_init__(self):
        if self.kind not in ("rank", "node"):
            raise EplbError(f"failure kind must be 'rank' or 'node', got {self.kind!r}")
        if self.index < 0 or self.step < 0:
            raise EplbError(f"failure of {self.kind} {self.index} at step {self.step}: rank/node and step must be >= 0")
        if self.back is not None and self.back <= self.step:
            raise EplbError(f"failure of {self.kind} {self.index} at step {self.step}: it must come back after it "
                            f"fails, got back at step {self.back}")

    @classmethod
    def parse(cls, kind: str, text: str) -> "Failure":
        """From ``INDEX@STEP`` or ``INDEX@STEP:BACK`` (the CLI's ``--fail-rank`` / ``--fail-node``)."""
        try:
            index, _, when = text.partition("@")
            step, _, back = when.partition(":")
            return cls(kind, int(index), int(step), int(back) if back else None)
        except ValueError:
            raise EplbError(f"--fail-{kind} must be {kind.upper()}@STEP or {kind.upper()}@STEP:BACK (integers), "
                            f"got {text!r}") from None

    def ranks(self, topology: Topology) -> np.ndarray:
        """int64: the ranks that fail."""
        limit = topology.num_ranks if self.kind == "rank" else topology.num_nodes
        if self.index >= limit:
            raise EplbError(f"failure of {self.kind} {self.index}: the cluster has {limit} {self.kind}s "
                            f"({topology.describe()})")
        if self.kind == "rank":
            return np.array([self.index], dtype=np.int64)
        return np.flatnonzero(topology.node_of_rank == self.index)

    def describe(self) -> str:
        back = f", back at step {self.back}" if self.back is not None else ""
        return f"{self.kind} {self.index} fails at step {self.step}{back}"

    def spec(self) -> str:
        """The CLI form: ``rank R@STEP[:BACK]`` or ``node N@STEP[:BACK]``."""
        back = f":{self.back}" if self.back is not None else ""
        return f"{self.kind} {self.index}@{self.step}{back}"


def failed_ranks(failures, topology: Topology, num_steps: int) -> np.ndarray:
    """bool ``[T, W]``: ranks that do not serve in each step."""
    failed = np.zeros((num_steps, topology.num_ranks), dtype=bool)
    for failure in failures:
        stop = num_steps if failure.back is None else min(failure.back, num_steps)
        failed[failure.step:stop, failure.ranks(topology)] = True
    return failed


def failure_events(config, result: dict, failed: np.ndarray, cycles: list[CycleRecord],
                    cycle_live: list[np.ndarray]) -> list[dict]:
    """Per injected failure, over the steps from it to the next change of the live ranks (``until``):

    - ``lost_experts``: expert-layer pairs with no live replica in the failure step (served by nobody);
      ``lost_replicated_experts``: those of them that had two or more replicas on the ranks serving just before
      (what the resilience option prevents for one failure);
    - ``steps_with_unavailable_experts``, ``tokens_waiting``: over those steps;
    - ``par_before``: token-weighted mean step PAR over the ``H`` steps before the failure;
    - ``par_after_failover``: the same from the failure until the first re-plan over the new live ranks is fully
      applied (or ``until``); ``replan_step``: the first step on that re-plan (None: none completed);
      ``par_after_replan``: from ``replan_step`` to ``until``.
    """
    num_steps = failed.shape[0]
    changes = sorted({f.step for f in config.failures} | {f.back for f in config.failures if f.back is not None})
    events = []

    def mean_par(start, stop):
        if stop <= start:
            return None
        steps = result["step_par"][start:stop]
        tokens = result["tokens"][start:stop]
        return float(summarize_par(steps, tokens)["par_mean"]) if tokens.sum() > 0 else None

    for failure in config.failures:
        start = failure.step
        if start >= num_steps:
            events.append({"failure": failure.describe(), "step": start, "in_trace": False})
            continue
        until = min([c for c in changes if c > start] + [num_steps])
        replan = None
        for record, live in zip(cycles, cycle_live):
            in_force = record.in_force_step
            if (record.window_end >= start and in_force is not None and in_force < until
                    and np.array_equal(live, ~failed[start])):
                replan = in_force
                break
        unavailable = result["unavailable"][start:until].sum(axis=1)
        events.append({
            "failure": failure.describe(),
            "spec": failure.spec(),
            "step": start,
            "until": until,
            "failed_ranks": np.flatnonzero(failed[start]).tolist(),
            "lost_experts": int(result["unavailable"][start].sum()),
            "lost_replicated_experts": int(result["unavailable_replicated"][start].sum()),
            "steps_with_unavailable_experts": int((unavailable > 0).sum()),
            "tokens_waiting": float(result["waiting"][start:until].sum()),
            "par_before": mean_par(max(0, start - config.cycle.cycle_steps), start),
            "par_after_failover": mean_par(start, replan if replan is not None else until),
            "replan_step": replan,
            "par_after_replan": mean_par(replan, until) if replan is not None else None,
        })
    return events
