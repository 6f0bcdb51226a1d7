"""The rebalancing cycle shared by the simulator (:mod:`eplb.sim`) and the runtime (:mod:`eplb.runtime`).

One step of the cycle per module, in the order a window goes through them:

- :mod:`~eplb.cycle.cadence`: which steps a window holds (fixed, or adaptive to drift);
- :mod:`~eplb.cycle.state_machine`: when to plan and apply (:class:`Cycle`, its phases and apply rule);
- :mod:`~eplb.cycle.planning`: the one planning function (:func:`~eplb.cycle.planning.plan_cycle`): the policy's
  new placement, the layers applied, their transfers, bytes and move schedule, the checksum ranks agree on;
- :mod:`~eplb.cycle.transfers`: a layer's transfer, from the placement in force to the new one (who sends which
  expert to whom);
- :mod:`~eplb.cycle.staging`: the staging memory a transfer takes, and the split of a layer into parts that fit;
- :mod:`~eplb.cycle.pricing`: what a move costs, the price a policy weighs its moves with.

Torch-free (numpy and numba only), so the planner process and the offline tool use it as the runtime does.
"""

from eplb.cycle.state_machine import EARLIEST_SWITCH, Action, Cycle, CycleConfig, CycleError, CycleRecord, Phase

__all__ = ["Phase", "CycleConfig", "Action", "CycleRecord", "Cycle", "CycleError", "EARLIEST_SWITCH"]
