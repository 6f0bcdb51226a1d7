"""The device check: the runtime's step path run to its end on one device, with a verdict in one JSON object.

Two (or more) ranks serve on the same device (Gloo groups; NCCL cannot put two ranks on one device), each through
the controller's hooks around a stand-in forward, in every dispatch rule, for a fixed number of rebalancing cycles:
window ends, planner polls and checks, moves and switches, on DeepSeek-V3's tables (58 layers, 256 experts,
2 x 160 slots). It reports, per step kind and dispatch rule, every blocking call the serving thread made inside
EPLB's hooks (and, on CUDA, every call torch's sync debug mode flags); whether the router equals the numpy
reference (``balanced``: the split of the group's tokens); whether every expert's bytes match the placement at the
end; on CUDA whether routing and recording captured in a CUDA graph count exactly the real tokens; the forward time
during transfers against idle steps; the transfer rate and the staging memory.

``benchmarks/gpu_check.py`` prints the result as JSON, ``eplb doctor`` as a table; both call :func:`run_check`. On
CPU the same code runs (CI runs it), skipping only what needs CUDA: the sync debug mode, graphs and events.

    from eplb.device_check import CheckSettings, resolve_device, run_check
    result = run_check(CheckSettings.for_device(resolve_device("cuda")))
    result["ok"], result["failures"]
"""

from eplb._lazy import renamed_names
from eplb.device_check.check import run_check
from eplb.device_check.report import table
from eplb.device_check.settings import DISPATCH_RULES, CheckSettings, DeviceCheckError, resolve_device

__all__ = ["run_check", "table", "CheckSettings", "DeviceCheckError", "resolve_device", "DISPATCH_RULES"]

# old spelling, for one release (a dispatch rule is not EPLB's mode)
__getattr__ = renamed_names(__name__, {"DISPATCH_MODES": "DISPATCH_RULES"})
