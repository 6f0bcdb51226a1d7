"""The ``eplb`` command: one sub-command per module in :mod:`eplb.commands`.

Each command module defines ``register(subparsers)`` (adds its parser, sets ``func``) and is imported here; heavy
imports happen inside each command's ``run`` so that ``eplb --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from eplb._extras import EXTRAS, missing
from eplb.commands.common import check_extras
from eplb.errors import EplbException

# Order is the order shown by --help.
COMMANDS = ("simulate", "tune", "plan", "eval", "validate", "convert", "demo", "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eplb",
        description="Expert-parallel load balancing for MoE serving: plan expert placements from recorded expert "
                    "load, evaluate their balance (PAR = busiest rank / mean rank), convert expert maps between "
                    "vLLM, vllm-ascend, SGLang and TensorRT-LLM, and simulate dynamic rebalancing over time.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"eplb.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"eplb.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        check_extras(args)
        return int(args.func(args) or 0)
    except EplbException as exc:  # bad input, or a failure (a demo rank that died): one line
        print(f"eplb {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"eplb {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"eplb {args.command}: error: out of memory; make the run smaller (fewer steps, ranks or slots)",
              file=sys.stderr)
        return 1
    except OSError as exc:  # a file the checks did not foresee (disk full, a file removed meanwhile)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"eplb {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: one line for the user, the traceback with -vv
        if isinstance(exc, ModuleNotFoundError) and exc.name in EXTRAS:  # an optional part the checks did not foresee
            print(f"eplb {args.command}: error: {missing('this command', exc.name)}", file=sys.stderr)
            return 1
        logging.getLogger("eplb").debug("internal error", exc_info=True)
        print(f"eplb {args.command}: internal error: {type(exc).__name__}: {exc}; please report it (eplb -vv "
              f"{args.command} ... shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
