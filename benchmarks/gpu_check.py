"""The device check of the runtime's step path (:mod:`eplb.device_check`), run to its end: prints one JSON object.

Two ranks share one device (Gloo groups), each serving DeepSeek-V3's tables (58 layers, 256 experts, 2 x 160 slots;
on CUDA 2 MiB experts) through the controller's hooks in the ``rank``, ``token``, ``local`` and ``balanced`` dispatch
modes, for a fixed number of rebalancing cycles, each on a new load profile (so each moves layers) and each going
through window-end, poll, check, move and switch steps. The ranks stop together on an agreed step. Reported, per
dispatch rule (``modes``): every blocking call the serving thread made inside EPLB's hooks, by step kind (the sync
guard on any device, plus torch's sync debug mode on CUDA); no collective on the serving group; the router against
the numpy reference (``balanced``: the split of the group's tokens); every expert's bytes against the placement at
the end; the forward time while a transfer is in flight against idle steps (CUDA events on CUDA; target <= 1.05),
a lower bound of the transfer rate, the staging memory. On CUDA also ``graph_recording``: routing and recording of
every layer captured in a CUDA graph, replayed over prefill and decode steps of a padded batch.

Whatever happens in the ranks (an exception, a death, a hang until the launch's timeout, whose result then carries
the hung ranks' stacks), the output is one JSON object with ``ok`` and ``failures``; the exit code is 0 when ``ok``.
``--device cpu`` runs the same code and skips only what needs CUDA (CI runs it):

    python benchmarks/gpu_check.py                 # the current CUDA device
    python benchmarks/gpu_check.py --device cpu    # about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# this checkout's eplb, also in the spawned ranks (spawn hands sys.path on), installed or not
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # still one JSON object, as the docstring promises
        print(json.dumps({"ok": False, "failures": [message], "error": message}))
        sys.exit(1)


def fault(text: str):
    rank, _, how = text.partition(":")
    return int(rank), how or "raise"


def main() -> int:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--ranks", type=int, default=2, help="ranks, all on the one device")
    parser.add_argument("--budget", type=float, metavar="S",
                        help="seconds for the serving loops of all dispatch rules (default: 240 on CUDA, 400 on CPU)")
    parser.add_argument("--modes", default="rank,token,local,balanced", help="dispatch rules to serve, in order")
    parser.add_argument("--dtypes", help="dtypes of each expert's tensors, e.g. bfloat16,float8_e4m3fn "
                                         "(default: bfloat16,uint8)")
    parser.add_argument("--layers", type=int, default=58, help="MoE layers")
    parser.add_argument("--experts", type=int, default=256, help="experts per layer")
    parser.add_argument("--slots", type=int, default=320, help="expert slots over all ranks")
    parser.add_argument("--fault", type=fault, metavar="RANK:HOW",
                        help="tests: that rank fails on purpose (HOW: raise or exit in its first move step, hang)")
    args = parser.parse_args()

    from eplb.device_check import CheckSettings, resolve_device, run_check
    from eplb.errors import EplbError

    try:
        changes = dict(ranks=args.ranks, modes=tuple(args.modes.split(",")), layers=args.layers,
                       experts=args.experts, slots=args.slots, fault=args.fault)
        if args.budget is not None:
            changes["budget_s"] = args.budget
        if args.dtypes:
            changes["expert_dtypes"] = tuple(args.dtypes.split(","))
        settings = CheckSettings.for_device(resolve_device(args.device), **changes)
    except EplbError as exc:  # nothing was started
        parser.error(str(exc))
    try:
        result = run_check(settings)
    except Exception:  # noqa: BLE001 - a bug of the check itself: still one JSON object
        import traceback

        error = traceback.format_exc()
        result = {"ok": False, "failures": [error.strip().splitlines()[-1]], "error": error}
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
