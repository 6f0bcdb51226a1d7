"""``eplb plan``: plan an expert map from a recorded expert load with any policy and write it in an engine format."""

from __future__ import annotations

from eplb.commands.common import GROUPS_HELP, NODES_HELP, HelpFormatter
from eplb.formats import LOAD_FORMATS, MAP_FORMATS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="plan an expert map from an expert load (any policy), print PAR before/after and moved slots",
        description="Plan where each expert's replicas go so that every rank carries the same load. The load is "
                    "[layers, experts] (one window) or [steps, layers, experts]; PAR (busiest rank / mean rank, "
                    "1.0 is perfect) is predicted on the load summed over steps. Without --current the plan is "
                    "compared with vLLM's initial layout (experts in order, redundant slots last).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("load", metavar="LOAD",
                        help="expert load: .npz (counts), SGLang logical_count (.json/.pt), TensorRT-LLM statistics "
                             "folder")
    parser.add_argument("--load-format", choices=LOAD_FORMATS, help="format of LOAD (default: detected)")
    parser.add_argument("--select", "--workload", metavar="INDEX|sum",
                        help="for a load with a leading axis [N, layers, experts]: plan on entry INDEX only, or on "
                             "the sum over the axis (default: use it as steps of one window)")
    parser.add_argument("--ranks", type=int, required=True, metavar="W", help="ranks (EP size)")
    slots = parser.add_mutually_exclusive_group(required=True)
    slots.add_argument("--slots-per-rank", type=int, metavar="K", help="expert slots per rank")
    slots.add_argument("--redundant", type=int, metavar="R",
                       help="redundant slots in total; (experts + R) must be divisible by the ranks")
    parser.add_argument("--nodes", type=int, default=1, metavar="N", help=NODES_HELP)
    parser.add_argument("--groups", type=int, default=1, metavar="G", help=GROUPS_HELP)
    parser.add_argument("--policy", default="auto",
                        help="policy name or vllm-ascend id: auto, random (0), default (1, DeepSeek's EPLB), "
                             "swift (2), flashlb (3) (default: auto: FlashLB's balance at a fraction of its moves, "
                             "see docs/auto.md)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="policy option, repeatable (e.g. --option mode=global); values are read as JSON "
                             "when they parse, else as text")
    parser.add_argument("--current", metavar="MAP", help="expert map in force; the plan keeps experts in place "
                                                         "where the policy can and counts moves against it")
    parser.add_argument("--current-format", choices=MAP_FORMATS, help="format of MAP (default: detected)")
    parser.add_argument("-o", "--output", metavar="OUT",
                        help="expert map file to write, replaced atomically (default: write nothing; with --json "
                             "the map is printed as phy2log)")
    parser.add_argument("--format", choices=MAP_FORMATS,
                        help="format of OUT (default: from its suffix: .json ascend, .npy/.pt vllm, .yaml trtllm); "
                             "for ascend, a policy that can is asked to never put an expert twice on one rank")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(func=run)


def parse_options(pairs: list[str]) -> dict:
    """``["k=v", ...]`` as a dict; each value parsed as JSON when possible (``3``, ``true``, ``0.5``), else text."""
    import json

    from eplb.errors import PolicyError

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PolicyError(f"--option must be KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def select_load(load, select: str | None, name: str):
    """``load`` with its leading axis picked (``INDEX``) or summed (``sum``); unchanged when ``select`` is None."""
    from eplb.errors import LoadError

    if select is None:
        return load
    if load.ndim != 3:
        raise LoadError(f"--select needs a load with a leading axis [N, layers, experts]; {name} has shape "
                        f"{list(load.shape)}")
    if select == "sum":
        return load.sum(axis=0)
    try:
        index = int(select)
    except ValueError:
        raise LoadError(f"--select must be an index or 'sum', got {select!r}") from None
    if not -load.shape[0] <= index < load.shape[0]:
        raise LoadError(f"--select {index} is out of range: {name} has {load.shape[0]} entries on its leading axis")
    return load[index]


def _output_format(args) -> str | None:
    from eplb.commands.common import MAP_FORMAT_BY_SUFFIX, format_from_suffix

    if args.format or not args.output:
        return args.format
    return format_from_suffix(args.output, "-o", MAP_FORMAT_BY_SUFFIX, "--format", MAP_FORMATS)


def _current_map(args, num_experts: int, topology):
    """The ``--current`` map, checked against the load and the cluster with messages that name both."""
    from eplb import formats
    from eplb.errors import EplbError

    current = formats.read_map(args.current, args.current_format, None, args.ranks, topology.num_nodes,
                               topology.num_groups)
    if current.num_experts != num_experts:
        raise EplbError(f"--current {args.current} places {current.num_experts} experts per layer but LOAD "
                        f"{args.load} has {num_experts}; the map and the load must be of the same model")
    if current.topology.num_physical != topology.num_physical:
        t = current.topology
        raise EplbError(f"--current {args.current} has {t.num_ranks} ranks x {t.slots_per_rank} slots = "
                        f"{t.num_physical} slots, but --ranks {topology.num_ranks} x {topology.slots_per_rank} "
                        f"slots = {topology.num_physical}; plan for the cluster the map is in force on")
    return current


def _estimate_bytes(num_layers: int, num_experts: int, num_physical: int) -> int:
    """Memory a policy needs, roughly: a dozen int64 / float64 arrays of [L, P] and [L, E] (tables, scores)."""
    return 8 * 12 * num_layers * (num_physical + num_experts)


def run(args) -> int:
    import json
    import time

    from rich.console import Console

    from eplb import formats, get_policy
    from eplb.commands import common
    from eplb.load import window_sum
    from eplb.metrics import summarize_par
    from eplb.report import summary_table

    if args.output:
        common.check_output(args.output, "-o")
    out_format = _output_format(args)
    if out_format == "ascend":  # vllm-ascend maps cannot hold an expert twice on a rank
        from eplb.integrations.vllm_ascend import ascend_policy

        policy = ascend_policy(args.policy, **parse_options(args.option))
    else:
        policy = get_policy(args.policy, **parse_options(args.option))
    load = select_load(formats.read_load(args.load, args.load_format), args.select, args.load)
    num_experts = load.shape[-1]
    topology = common.topology(args, num_experts)
    common.check_memory(_estimate_bytes(load.shape[-2], num_experts, topology.num_physical),
                        f"planning {load.shape[-2]} layers x {topology.num_physical:,} slots",
                        "lower --ranks or --slots-per-rank (or --redundant), or plan fewer layers")
    current = _current_map(args, num_experts, topology) if args.current else None
    start = time.perf_counter()
    with common.spinner(f"planning with {args.policy} (the first run compiles its kernels)", quiet=args.json):
        plan = policy.rebalance(load, topology, current)
    elapsed_ms = 1000 * (time.perf_counter() - start)
    if args.output:
        formats.write_map(plan.placement, args.output, out_format)

    tokens = window_sum(load).sum(axis=1)
    before, after = summarize_par(plan.par_before, tokens), summarize_par(plan.par_after, tokens)
    reference = "current map" if current is not None else "vLLM initial layout"
    result = {
        "policy": repr(policy),
        "output": None if args.output is None else str(args.output),
        "format": out_format,
        "num_layers": plan.placement.num_layers,
        "num_experts": num_experts,
        "num_ranks": topology.num_ranks,
        "slots_per_rank": topology.slots_per_rank,
        "num_nodes": topology.num_nodes,
        "num_groups": topology.num_groups,
        "reference": reference,
        "par_before_mean": before["par_mean"],
        "par_before_max": before["par_max"],
        "par_after_mean": after["par_mean"],
        "par_after_max": after["par_max"],
        "layers_changed": int(plan.changed.sum()),
        "moved_slots": plan.total_moved_slots,
        "planning_ms": elapsed_ms,
    }
    if args.json:
        if args.output is None:
            result["phy2log"] = plan.placement.phy2log.tolist()
        print(json.dumps(result))
        return 0
    console = Console(highlight=False)
    console.print(f"{policy!r} on {topology.describe()}, {plan.placement.num_layers} layers x {num_experts} experts",
                  markup=False)
    console.print(summary_table({
        f"mean PAR before ({reference})": f"{before['par_mean']:.4f}",
        "mean PAR after": f"{after['par_mean']:.4f}",
        "max PAR before / after": f"{before['par_max']:.4f} / {after['par_max']:.4f}",
        "layers changed": f"{result['layers_changed']} of {plan.placement.num_layers}",
        "moved slots": f"{plan.total_moved_slots} of {plan.placement.phy2log.size}",
        "planning time": f"{elapsed_ms:.1f} ms",
    }, title="plan"))
    if args.output:
        console.print(f"{out_format} expert map written to {args.output}", markup=False)
    else:
        console.print("no map written (give -o FILE to write it)")
    return 0
