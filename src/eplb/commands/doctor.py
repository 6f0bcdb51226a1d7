"""``eplb doctor``: check that the runtime can serve on this machine's device, and print what it found.

Runs :mod:`eplb.device_check` (the code ``benchmarks/gpu_check.py`` runs): two ranks on one device serve
DeepSeek-V3's tables through the controller's hooks in every dispatch rule, for three rebalancing cycles each, and
the result is a table (``--json``: the whole result as one JSON object). Exit 1 on any failure.
"""

from __future__ import annotations

import json

from eplb.commands.common import HelpFormatter


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check the runtime on this machine's device: no host sync, correct routing and moves, transfer speed",
        description="Serve a DeepSeek-V3-sized model (58 layers, 256 experts, 2 ranks x 160 slots) with two ranks on "
                    "one device through the runtime's hooks, in every dispatch rule (rank, token, local, balanced), "
                    "for three rebalancing cycles each, and report: whether the serving thread ever blocked inside "
                    "EPLB's hooks, per step kind (ordinary, poll, check, submit, move, switch) and dispatch rule "
                    "(on CUDA with torch's sync debug mode too); whether routing equals the numpy reference (balanced: "
                    "the split of the group's tokens); whether every expert's weights match the placement at the end; "
                    "on CUDA whether routing and recording captured in a CUDA graph count exactly the real tokens; the "
                    "forward time while a transfer is in flight against idle steps; the transfer rate (GB/s, a lower "
                    "bound) and the staging memory. On CPU the CUDA-only checks are skipped, and said so. Takes about "
                    "a minute on CPU, up to a few minutes on a GPU. Exit 1 on any failure.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--device", metavar="DEVICE",
                        help="cuda, cuda:N or cpu (default: cuda when torch sees a CUDA device, else cpu)")
    parser.add_argument("--ranks", type=int, default=2, metavar="W", help="ranks (processes), all on the one device")
    parser.add_argument("--json", action="store_true", help="print the whole result as one JSON object")
    parser.set_defaults(func=run)


def run(args) -> int:
    from eplb.device_check import CheckSettings, resolve_device, run_check, table

    settings = CheckSettings.for_device(resolve_device(args.device), ranks=args.ranks)  # bad input: nothing starts
    result = run_check(settings)
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0 if result["ok"] else 1
