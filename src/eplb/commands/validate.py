"""``eplb validate``: check an expert map (or an expert load) file and list every problem."""

from __future__ import annotations

from eplb.commands.common import HelpFormatter
from eplb.formats import FORMATS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check an expert map file; exit 1 listing every problem",
        description="Check an expert map: every logical expert has a replica in every layer, ids are in range, the "
                    "slots split evenly over the ranks, and (vllm-ascend) no device holds an expert twice. Prints a "
                    "one-line summary and exits 0, or prints every problem and exits 1. An expert-load file is "
                    "checked too (shape, no negative or NaN loads).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("map", metavar="MAP", help="expert map file (or expert load file / statistics folder)")
    parser.add_argument("--experts", type=int, metavar="E", help="logical experts per layer (default: largest id + 1)")
    parser.add_argument("--ranks", type=int, metavar="W",
                        help="ranks (EP size); needed for SGLang, vLLM and TensorRT-LLM maps")
    parser.add_argument("--format", choices=FORMATS, help="file format (default: detected from the content)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from rich.markup import escape

    from eplb import formats
    from eplb.commands.common import at_least

    at_least("--experts", args.experts)
    at_least("--ranks", args.ranks)
    console = Console(highlight=False, soft_wrap=True)
    kind = formats.detect_kind(args.map, args.format)
    if kind == "load":
        load = formats.read_load(args.map, args.format)
        steps = f"{load.shape[0]} steps x " if load.ndim == 3 else ""
        console.print(f"OK {escape(str(args.map))}: expert load, {steps}{load.shape[-2]} layers x "
                      f"{load.shape[-1]} experts, "
                      f"total {float(load.sum()):,.0f}")
        return 0
    problems, warnings = formats.map_problems(args.map, args.format, args.experts, args.ranks)
    for line in warnings:
        console.print(f"[yellow]warning[/yellow]: {escape(line)}")
    if problems:
        console.print(f"[red]INVALID[/red] {escape(str(args.map))}: {len(problems)} problem(s)")
        for line in problems:
            console.print(f"  - {escape(line)}")
        return 1
    placement = formats.read_map(args.map, args.format, args.experts, args.ranks)
    t = placement.topology
    count = placement.replica_count
    console.print(f"OK {escape(str(args.map))}: {placement.num_layers} layers, {placement.num_experts} experts, "
                  f"{t.num_ranks} "
                  f"ranks x {t.slots_per_rank} slots = {t.num_physical} slots; replicas per expert "
                  f"{count.min()}-{count.max()}" + (f"; {len(warnings)} warning(s)" if warnings else ""))
    return 0
