"""The online runtime for a PyTorch MoE engine: recorder, router, planner worker, mover, controller, config.

Start at :mod:`eplb.runtime.controller` (its docstring shows where an engine calls it). Names are imported lazily so
that the torch-free parts (:mod:`~eplb.cycle.transfers`, :mod:`~eplb.runtime.planner`, :mod:`~eplb.runtime.config`)
can be used, e.g. by the planner worker process, without importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EplbConfig": "eplb.runtime.config",
    "ConfigError": "eplb.runtime.config",
    "EplbController": "eplb.runtime.controller",
    "LoadRecorder": "eplb.runtime.recorder",
    "ReplicaRouter": "eplb.runtime.router",
    "ExpertMover": "eplb.runtime.mover",
    "PlannerWorker": "eplb.runtime.planner",
    "LayerTransfer": "eplb.cycle.transfers",
    "transfer_plan": "eplb.cycle.transfers",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        try:
            module = importlib.import_module(_EXPORTS[name])
        except ModuleNotFoundError as exc:
            from eplb._extras import EXTRAS, MissingExtra, missing

            if exc.name not in EXTRAS:
                raise
            raise MissingExtra(missing(f"eplb.runtime.{name}", exc.name)) from None
        return getattr(module, name)
    raise AttributeError(f"module 'eplb.runtime' has no attribute {name!r}")
