"""When a rebalancing cycle closes its window, which steps the window holds, and the life its plan is priced for.

The :class:`~eplb.cycle.Cycle` asks its :class:`Cadence` in every collect step whether the window is due, and at
the submit which step the window starts at. Two cadences:

- **Fixed**: a window every ``cycle_steps`` steps. The window is the steps since the previous submit, or with
  ``window_steps`` the last ``window_steps`` steps (vLLM's ``window_size`` shorter than its ``step_interval``, or a
  sliding window longer than the interval).
- **Adaptive** (:class:`AdaptiveCadence`, vllm-ascend's "adaptive scaling"): plan sooner when the load drifted from
  the window the placement in force was planned on, wait longer while it is stable. Each plan reports the PAR of
  the placement in force on the new window (``par_before``); the plan before predicted it (``par_after`` of the
  layers it applied, ``par_before`` of the others, on its own window). When the observed mean PAR exceeds the
  predicted one by more than ``tolerance`` (relative), the load drifted: the next window comes ``min_steps`` later
  and holds only steps after the drift. Otherwise the interval doubles, up to ``max_steps``, and the window slides
  back up to ``window_steps`` steps, so a stable load is planned on a long window. A plan is still made at every
  submit; whether it moves anything is the policy's call (``auto`` prices its moves against the plan's life).

Drift is read from the plans, which every rank computes alike (their checksums are agreed before anything moves),
so every rank picks the same next window without another collective, and the simulator picks the runtime's windows.
The first plan after the start or a drift is not tested: what it is compared with was planned on other load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from eplb.errors import EplbError

__all__ = ["AdaptiveCadence", "Cadence"]


@dataclass(frozen=True)
class AdaptiveCadence:
    """The adaptive cadence's bounds (see the module docstring).

    Attributes:
        min_steps: steps from a drift to the next window's end: the shortest interval between two plans.
        max_steps: the longest interval while the load is stable.
        window_steps: the longest window a plan is made on (it slides back this far, never past the last drift).
        tolerance: relative rise of the mean PAR of the placement in force over its prediction that counts as
            drift.
    """

    min_steps: int
    max_steps: int
    window_steps: int
    tolerance: float = 0.05

    def __post_init__(self):
        for name in ("min_steps", "max_steps", "window_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise EplbError(f"adaptive cadence {name} must be an integer >= 1, got {value!r}")
        if self.max_steps < self.min_steps:
            raise EplbError(f"adaptive cadence max_steps={self.max_steps} must be >= min_steps={self.min_steps}")
        if self.window_steps < self.min_steps:
            raise EplbError(f"adaptive cadence window_steps={self.window_steps} must be >= "
                            f"min_steps={self.min_steps}")
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float, np.number)) \
                or not 0 <= self.tolerance < float("inf"):
            raise EplbError(f"adaptive cadence tolerance must be a number >= 0, got {self.tolerance!r}")

    @classmethod
    def around(cls, steps: int, tolerance: float = 0.05) -> "AdaptiveCadence":
        """Bounds around a fixed cadence of ``steps``: intervals from ``steps / 2`` to ``4 x steps``, windows up to
        ``4 x steps``."""
        low = max(1, int(steps) // 2)
        return cls(min_steps=low, max_steps=4 * int(steps), window_steps=4 * int(steps), tolerance=tolerance)


class Cadence:
    """The collect side of one :class:`~eplb.cycle.Cycle`.

    Args:
        config: the cycle's :class:`~eplb.cycle.CycleConfig` (``cycle_steps``, ``window_steps``, ``adaptive``).
    """

    def __init__(self, config):
        self.config = config
        adaptive = config.adaptive
        #: steps from one submit to the next
        self.interval = (config.cycle_steps if adaptive is None
                         else min(max(config.cycle_steps, adaptive.min_steps), adaptive.max_steps))
        #: the earliest step a window may hold (the start, a restart, the last drift)
        self.origin = 0
        #: the life of the plan of the window just submitted, in steps (the price of its moves)
        self.life = config.cycle_steps
        #: (submit step, observed / predicted PAR - 1 or None when untested, interval after) per observed plan
        self.history: list[tuple[int, float | None, int]] = []
        self._predicted: float | None = None  # mean PAR the placement in force was planned to have
        self._submit = 0  # step of the last submit

    def restart(self, step: int) -> None:
        """A window starts at ``step`` (the first step seen, or after :meth:`~eplb.cycle.Cycle.restart`): no window
        reaches back before it, and the next plan is not tested for drift."""
        self.origin = int(step)
        self._predicted = None

    def due(self, step: int, last_submit: int) -> bool:
        """Whether the window closes in ``step`` (``last_submit``: the previous submit, or the start)."""
        return step - last_submit >= self.interval

    def window_start(self, step: int, last_submit: int) -> int:
        """The first step of the window submitted in ``step``; sets :attr:`life`."""
        adaptive = self.config.adaptive
        longest = adaptive.window_steps if adaptive is not None else self.config.window_steps
        start = last_submit if longest is None else max(self.origin, step - longest)
        self.life = max(self.interval, step - start)
        self._submit = int(step)
        return start

    @property
    def planning_config(self):
        """The cycle config the plan of the window just submitted is made with: the plan's life (the price of its
        moves, :func:`eplb.cycle.planning.plan_cycle`) is the longer of the interval and the window."""
        if self.life == self.config.cycle_steps:
            return self.config
        return dataclasses.replace(self.config, cycle_steps=int(self.life))

    def observe(self, plan, layers) -> None:
        """The plan of the last submitted window came back, applying ``layers``: adapt the interval and where the
        next window may start (adaptive cadence only)."""
        adaptive = self.config.adaptive
        if adaptive is None:
            return
        observed = float(np.mean(plan.par_before))
        drift = None if self._predicted is None else observed / self._predicted - 1.0
        if drift is not None and drift > adaptive.tolerance:
            self.interval = adaptive.min_steps
            self.origin = self._submit  # the steps before the drift no longer describe the load
        else:
            self.interval = min(2 * self.interval, adaptive.max_steps)
        predicted = np.array(plan.par_before, dtype=np.float64)
        applied = list(layers)
        predicted[applied] = np.asarray(plan.par_after, dtype=np.float64)[applied]
        # after a drift, the placement about to apply was planned on load from before it: test the plan after next
        self._predicted = None if drift is not None and drift > adaptive.tolerance else float(predicted.mean())
        self.history.append((self._submit, drift, self.interval))
