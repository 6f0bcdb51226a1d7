"""``eplb simulate``: replay expert load over time and compare rebalancing policies.

With no arguments it runs the built-in DeepSeek-V3-like scenario (no data file needed) with ``static`` (no
balancing) and every available policy, plus the clairvoyant floor (the better of clairvoyant ``auto`` and
``flashlb``), prints one table row per policy and writes report.json, plots and report.md (with each run's step PAR
over the floor's) to ``./eplb-report/``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from eplb.commands.common import HelpFormatter, add_cluster_arguments

logger = logging.getLogger(__name__)

_DEFAULT_TRACE = "builtin:default"
_MAIN_POLICIES = ("auto", "default", "swift", "flashlb")  # always compared; any other registered policy joins them
# the floor is the better of these, each planned on the steps it is scored on (every available one runs)
_DEFAULT_CLAIRVOYANT = ("auto", "flashlb")
_SLOTS = 9  # DeepSeek-V3 on 32 ranks: 256 experts + 32 redundant slots


def register(subparsers) -> None:
    from eplb.dispatch import DISPATCH_RULES
    from eplb.sim.cost import MODEL_EXPERT_BYTES
    from eplb.sim.traces import SCENARIOS

    scenarios = ", ".join(f"builtin:{name} ({what})" for name, (what, _) in SCENARIOS.items())
    parser = subparsers.add_parser(
        "simulate",
        help="replay expert load over time and compare rebalancing policies (the main job)",
        description="Replay per-step expert load through the same rebalancing cycle the runtime uses (a plan every "
                    "H steps on the last window, ready A steps later, applied one layer per step) and score every "
                    "step: PAR = busiest rank / mean rank, token-weighted mean and p99, window PAR, moved slots and "
                    "bytes, planner time, and an estimated MoE step time against no balancing. The clairvoyant runs "
                    "plan on the steps they are scored on; the best of them is the floor. The same seed gives the same figures (planner ms "
                    "is measured wall time). Built-in traces: " + scenarios + ".",
        formatter_class=HelpFormatter,
    )
    trace = parser.add_argument_group("trace")
    trace.add_argument("--trace", default=_DEFAULT_TRACE, metavar="FILE|builtin:NAME",
                       help="a built-in scenario; a recorded per-step load to replay (.npz counts [T, L, E], SGLang "
                            "logical_count, TensorRT-LLM statistics); or a per-workload statistics .npz such as "
                            "sglang_dsv3_ep_statistics.npz (builtin:default drawn from its real workloads)")
    trace.add_argument("--workloads", metavar="FILE.npz",
                       help="draw the built-in scenario from the real workloads of this statistics file")
    trace.add_argument("--steps", type=int, metavar="T", help="steps to simulate (default: the scenario's)")
    trace.add_argument("--seed", type=int, default=0, help="seed of the generated trace (same seed, same results)")
    trace.add_argument("--save-trace", metavar="FILE.npz", help="also write the trace that was simulated")
    cluster = add_cluster_arguments(parser, _SLOTS)
    cluster.add_argument("--layout", default="vllm", choices=("vllm", "ascend", "spread"),
                         help="initial placement (what static keeps)")
    policies = parser.add_argument_group("policies and cycle")
    policies.add_argument("--policies", metavar="A,B,...",
                          help="policies to run besides static (default: every available one)")
    policies.add_argument("--clairvoyant", metavar="A,B,...|none",
                          help=f"policies of the clairvoyant floor, each planning on the steps it is scored on; "
                               f"the floor is the one with the lowest step PAR (default: those of "
                               f"{', '.join(_DEFAULT_CLAIRVOYANT)} available)")
    policies.add_argument("--window", "--interval", dest="interval", type=int, default=100, metavar="H",
                          help="steps in each planning window (one cycle each)")
    policies.add_argument("--planner-steps", type=int, default=10, metavar="A",
                          help="steps from the end of a window until its plan can be applied")
    policies.add_argument("--layers-per-step", type=int, default=1, metavar="N",
                          help="layers applied per step (0: all at once)")
    policies.add_argument("--gb-per-step", type=float, metavar="GB",
                          help="instead, stage at most this many GB of weights per rank and step (layers that do not "
                               "fit are split into parts); at least one expert")
    policies.add_argument("--min-gain", type=float, default=0.0, metavar="X",
                          help="apply a layer only if its predicted PAR improves by more than this")
    policies.add_argument("--max-layers", type=int, metavar="N", help="apply at most N layers per cycle, best first")
    policies.add_argument("--similarity", type=float, metavar="S",
                          help="apply a layer only if its load's cosine similarity to its load when last applied is "
                               "below S (xLLM's eplb_update_threshold)")
    policies.add_argument("--dispatch", default="even", choices=DISPATCH_RULES,
                          help="replica choice: even split, per source rank, per token, local first, per-batch "
                               "balanced")
    _add_failure_and_cost_arguments(parser, MODEL_EXPERT_BYTES)
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="runs simulated at the same time in worker processes (default: one per CPU, at most one "
                             "per run); 1 runs them one after the other in this process")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default="eplb-report", metavar="DIR",
                        help="folder for report.json, report.md and the plots")
    output.add_argument("--no-files", action="store_true", help="write nothing to --out")
    output.add_argument("--json", action="store_true",
                        help="print one JSON object (policies, clairvoyant, settings) and nothing else")
    parser.set_defaults(func=run)


def _add_failure_and_cost_arguments(parser, model_expert_bytes) -> None:
    """The flags of the failures to simulate and of the step-time cost model."""
    faults = parser.add_argument_group("failures")
    faults.add_argument("--fail-rank", action="append", default=[], metavar="R@STEP[:BACK]",
                        help="rank R stops serving at STEP (and serves again from BACK); repeatable")
    faults.add_argument("--fail-node", action="append", default=[], metavar="N@STEP[:BACK]",
                        help="every rank of node N stops serving at STEP (and serves again from BACK); repeatable")
    faults.add_argument("--resilient", action="store_true",
                        help="resilience option: replicas of one expert on distinct ranks and on two nodes, so one "
                             "rank or node failure never takes the last replica of an expert that has two")
    faults.add_argument("--min-replicas", type=int, default=1, metavar="M",
                        help="with --resilient: at least M replicas for each of the --hot-experts hottest experts")
    faults.add_argument("--hot-experts", type=int, default=0, metavar="N",
                        help="with --resilient: how many of each layer's hottest experts --min-replicas applies to")
    cost = parser.add_argument_group("cost model")
    cost.add_argument("--model", default="deepseek-v3", choices=sorted(model_expert_bytes),
                      help="model preset for the size of an expert")
    cost.add_argument("--expert-bytes", type=float, metavar="BYTES", help="size of one expert (overrides --model)")
    cost.add_argument("--layer-fixed-us", type=float, default=80.0, help="a rank's fixed time per MoE layer, us")
    cost.add_argument("--token-us", type=float, default=0.2, help="time per routed token on a rank, us")
    cost.add_argument("--bandwidth", type=float, default=50.0, metavar="GB/S", help="transfer bandwidth per rank")
    cost.add_argument("--overlap", type=float, default=0.5,
                      help="share of a step's MoE time that weight transfers hide behind")


def _check_flags(args) -> None:
    """Every number flag in its range, named as typed, before anything is read or run."""
    from eplb.commands.common import at_least, within
    from eplb.errors import EplbError

    for flag, value, minimum in (("--steps", args.steps, 1), ("--window/--interval", args.interval, 1),
                                 ("--planner-steps", args.planner_steps, 0), ("--layers-per-step",
                                 args.layers_per_step, 0), ("--max-layers", args.max_layers, 1),
                                 ("--jobs", args.jobs, 1), ("--seed", args.seed, 0), ("--min-gain", args.min_gain, 0),
                                 ("--min-replicas", args.min_replicas, 1), ("--hot-experts", args.hot_experts, 0),
                                 ("--layer-fixed-us", args.layer_fixed_us, 0), ("--token-us", args.token_us, 0),
                                 ("--expert-bytes", args.expert_bytes, 0)):
        at_least(flag, value, minimum)
    for flag, value in (("--gb-per-step", args.gb_per_step), ("--bandwidth", args.bandwidth)):
        if value is not None and not value > 0:
            raise EplbError(f"{flag} must be > 0, got {value:g}")
    within("--overlap", args.overlap, 0.0, 1.0)
    within("--similarity", args.similarity, 0.0, 1.0)
    if args.policies is not None and not [n for n in args.policies.split(",") if n.strip()]:
        raise EplbError(f"--policies {args.policies!r} names no policy; give names such as auto,default (static "
                        "always runs) or leave the flag out to run every policy")


def _check_outputs(args) -> None:
    """Raise now, not after the runs, when --out or --save-trace cannot be written."""
    from eplb._files import check_writable
    from eplb.commands.common import check_output
    from eplb.errors import EplbError

    if args.save_trace:
        check_output(args.save_trace, "--save-trace")
    if args.no_files:
        return
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EplbError(f"--out {out}: is a file; the report is a folder (report.json, report.md, plots): give a "
                        "folder name or --no-files")
    check_writable(out, "--out", folder=True)


def _estimate_bytes(steps: int, layers: int, experts: int, ranks: int, runs: int, jobs: int) -> int:
    """Memory a simulation needs, roughly: the trace (int32) and the interpreter in this process and in each worker,
    per run a few float64 copies of one layer's load, its per-step series and the dispatch table [L, E, W]."""
    trace = 4 * steps * layers * experts
    per_run = 8 * (3 * steps * experts + layers * experts * ranks + 12 * steps * layers)
    workers = min(jobs, runs) if jobs > 1 else 0
    interpreter = 256 * 2**20  # Python, numpy, numba: per process
    return ((trace + interpreter) * (1 + workers) + per_run * max(1, min(jobs, runs))
            + 8 * 12 * steps * layers * runs)


def _check_memory(args, steps: int, layers: int, experts: int, runs: int) -> None:
    from eplb.commands.common import check_memory

    jobs = args.jobs or min(os.cpu_count() or 1, runs)
    check_memory(_estimate_bytes(steps, layers, experts, args.ranks, runs, jobs),
                 f"simulating {steps:,} steps x {layers} layers x {experts:,} experts, {runs} runs on {jobs} "
                 f"worker(s)", "lower --steps (or --jobs, --policies)")


def _drawn_shape(args) -> tuple[int, int, int] | None:
    """(steps, layers, experts) of a trace eplb draws (a built-in scenario, from --workloads, from a statistics or a
    window-load ``.npz``) before drawing it; None when that cannot be told cheaply (a recorded trace is read as is)."""
    from eplb.sim.traces import BUILTIN_PREFIX, MODEL_SIZES, SCENARIOS

    if args.trace.startswith(BUILTIN_PREFIX):
        key, source = args.trace.removeprefix(BUILTIN_PREFIX), args.workloads
    else:
        key, source = "default", args.trace
    if key not in SCENARIOS:
        return None
    steps = args.steps or SCENARIOS[key][1].steps
    if source is None:
        return steps, *MODEL_SIZES.get(key, (58, 256))  # the parametric workloads of the scenario's model
    shape = _counts_shape(source)
    if shape is None or (source == args.trace and len(shape) == 3 and not _has_workloads(source)):
        return None  # a per-step trace: replayed, not drawn
    return steps, shape[-2], shape[-1]


def _counts_shape(path) -> tuple[int, ...] | None:
    """The shape of ``counts`` in an ``.npz``, from its header (no data read); None when it is not such a file."""
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(path) as archive, archive.open("counts.npy") as f:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            return header(f)[0]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def _has_workloads(path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return "workloads.npy" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _policy_names(args) -> list[str]:
    """The policies to run besides static, in order; unknown names raise, unavailable defaults are skipped."""
    from eplb import available_policies, get_policy

    available = available_policies()
    if args.policies is None:
        for name in _MAIN_POLICIES:
            if name not in available:
                logger.warning("policy %r is not available in this installation: skipped", name)
        return [name for name in dict.fromkeys((*_MAIN_POLICIES, *available)) if name in available]
    names = []
    for name in (n.strip() for n in args.policies.split(",")):  # static always runs
        if not name or name == "static":
            continue
        get_policy(name)  # raises a PolicyError with a suggestion when unknown
        names.append(name)
    return list(dict.fromkeys(names))


def _clairvoyant_names(args) -> list[str]:
    from eplb import available_policies, get_policy

    if args.clairvoyant is not None:
        if args.clairvoyant == "none":
            return []
        names = [name.strip() for name in args.clairvoyant.split(",") if name.strip()]
        for name in names:
            get_policy(name)  # raises a PolicyError with a suggestion when unknown
        return list(dict.fromkeys(names))
    available = available_policies()
    names = [name for name in _DEFAULT_CLAIRVOYANT if name in available]
    if not names:
        logger.warning("no clairvoyant run: none of %s is available", ", ".join(_DEFAULT_CLAIRVOYANT))
    return names


def run(args) -> int:
    import json

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from eplb.policies.shared.resilience import Resilience
    from eplb.report.simulate import build_report, write_report
    from eplb.sim.cost import expert_bytes_of
    from eplb.sim.runs import RunSpec, simulate_runs
    from eplb.sim.simulator import Failure
    from eplb.sim.traces import load_trace

    from eplb.commands import common
    from eplb.errors import EplbError

    _check_flags(args)
    _check_outputs(args)
    failures = tuple([Failure.parse("rank", text) for text in args.fail_rank]
                     + [Failure.parse("node", text) for text in args.fail_node])
    resilience = Resilience(min_replicas=args.min_replicas, hot_experts=args.hot_experts) if args.resilient else None
    names = _policy_names(args)
    clairvoyant_names = _clairvoyant_names(args)
    num_runs = 1 + len(names) + len(clairvoyant_names)
    expert_bytes = args.expert_bytes if args.expert_bytes is not None else float(expert_bytes_of(args.model))
    if args.gb_per_step is not None and args.gb_per_step * 1e9 < expert_bytes:
        raise EplbError(f"--gb-per-step {args.gb_per_step:g} is smaller than one expert ({expert_bytes:g} bytes, "
                        f"--expert-bytes / --model); expected >= {expert_bytes / 1e9:g} so that a step can move one")
    shape = _drawn_shape(args)
    if shape is not None:  # a trace eplb draws: refuse before drawing it
        common.topology(args, shape[2], default_slots=_SLOTS)
        _check_memory(args, *shape, num_runs)
    console = common.stderr_console()
    quiet = args.json or not console.is_terminal
    progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                        TimeElapsedColumn(), TextColumn("{task.fields[note]}"), console=console, transient=True,
                        disable=quiet)
    with progress:
        task = progress.add_task(f"trace {args.trace}", total=None, note="")
        trace = load_trace(args.trace, args.steps, args.seed, args.workloads)
        progress.update(task, total=1, completed=1)
        topology = common.topology(args, trace.num_experts, default_slots=_SLOTS)
        _check_memory(args, trace.num_steps, trace.num_layers, trace.num_experts, num_runs)
        cycle, config = _sim_config(args, trace, topology, expert_bytes, failures, resilience)
        specs = [RunSpec(name, None if name == "static" else name) for name in ["static", *names]]
        specs += [RunSpec(f"clairvoyant:{name}", name, clairvoyant=True) for name in clairvoyant_names]
        # A run's bar stays at 0 while its policy's numba kernels compile (first use on this machine, up to ~30 s).
        tasks = [progress.add_task(spec.name if not spec.clairvoyant else f"clairvoyant ({spec.policy})", total=1.0,
                                   note="starting (the first run compiles kernels)" if spec.policy else "")
                 for spec in specs]

        def advance(index: int, fraction: float) -> None:
            progress.update(tasks[index], completed=fraction, note="")

        jobs = args.jobs or min(os.cpu_count() or 1, len(specs))
        results = simulate_runs(trace, config, specs, jobs, progress=advance)
    runs = {spec.name: result for spec, result in zip(specs, results) if not spec.clairvoyant}
    # the floor: the clairvoyant run with the lowest step PAR (ties: the first named)
    candidates = [result for spec, result in zip(specs, results) if spec.clairvoyant]
    clairvoyant = min(candidates, key=lambda run: run.summary()["step_par_mean"]) if candidates else None
    if args.save_trace:
        trace.save(args.save_trace, flag="--save-trace")
    meta = _meta(args, trace, topology, cycle, expert_bytes, failures, resilience, candidates)
    report = build_report(runs, runs["static"], clairvoyant, meta)
    files = {} if args.no_files else write_report(report, runs, runs["static"], clairvoyant, args.out)
    if args.json:
        print(json.dumps({key: report[key] for key in ("trace", "topology", "settings", "seed", "warmup_steps",
                                                         "policies", "clairvoyant", "clairvoyant_candidates")}))
        return 0
    _print_report(report, files, bool(failures))
    return 0


def _sim_config(args, trace, topology, expert_bytes: float, failures, resilience):
    """The cycle and the simulator's config the flags ask for, checked against the trace: a window must start after
    the warm-up, and every failed rank or node must exist."""
    from eplb.cycle import CycleConfig
    from eplb.errors import EplbError
    from eplb.sim.cost import CostModel
    from eplb.sim.simulator import SimConfig, failed_ranks, warmup_steps

    cycle = CycleConfig(
        cycle_steps=args.interval, planner_steps=args.planner_steps, layers_per_step=args.layers_per_step,
        bytes_per_step=args.gb_per_step * 1e9 if args.gb_per_step else None,
        min_gain=args.min_gain, max_layers=args.max_layers, similarity_threshold=args.similarity)
    warmup = warmup_steps(cycle, trace.num_layers, trace.num_steps)
    if -(-warmup // args.interval) * args.interval >= trace.num_steps:  # no window starts after the warm-up
        raise EplbError(f"the trace has {trace.num_steps} steps: no planning window of --window {args.interval} "
                        f"starts after the {warmup}-step warm-up, so nothing would be scored; simulate more "
                        f"steps (--steps, a longer trace) or give a smaller --window")
    config = SimConfig(topology, cycle, dispatch=args.dispatch, expert_bytes=expert_bytes, layout=args.layout,
                       cost=CostModel(args.layer_fixed_us, args.token_us, args.bandwidth, args.overlap),
                       failures=failures, resilience=resilience)
    try:  # a rank or node out of range fails before any run
        failed_ranks(failures, topology, trace.num_steps)
    except EplbError as exc:
        raise EplbError(f"--fail-rank / --fail-node: {exc}") from None
    return cycle, config


def _meta(args, trace, topology, cycle, expert_bytes: float, failures, resilience, candidates) -> dict:
    """What the report says about the run besides the figures: the trace, the topology, the settings, the seed and
    the clairvoyant candidates' step PAR."""
    from eplb.sim.simulator import warmup_steps
    from eplb.sim.traces import SCENARIOS

    key = trace.name.removeprefix("builtin:")
    return {
        "trace": {"name": trace.name, "steps": trace.num_steps, "layers": trace.num_layers,
                  "experts": trace.num_experts, "top_k": trace.top_k,
                  "description": SCENARIOS[key][0] if key in SCENARIOS else "recorded load",
                  "source": trace.source},
        "topology": {"num_ranks": topology.num_ranks, "slots_per_rank": topology.slots_per_rank,
                     "num_nodes": topology.num_nodes, "num_groups": topology.num_groups,
                     "description": topology.describe()},
        "settings": {"interval": args.interval, "planner_steps": args.planner_steps,
                     "layers_per_step": args.layers_per_step, "gb_per_step": args.gb_per_step,
                     "min_gain": args.min_gain, "max_layers": args.max_layers, "similarity": args.similarity,
                     "dispatch": args.dispatch,
                     "layout": args.layout, "expert_bytes": expert_bytes,
                     "pace": (f"within {args.gb_per_step:g} GB per step" if args.gb_per_step else
                              "all layers at once" if args.layers_per_step == 0 else
                              f"{args.layers_per_step} layer(s) per step"),
                     "cost": {"layer_fixed_us": args.layer_fixed_us, "token_us": args.token_us,
                              "bandwidth_gbs": args.bandwidth, "overlap": args.overlap},
                     "failures": [f.describe() for f in failures],
                     "resilience": None if resilience is None else
                     {"spread_nodes": resilience.spread_nodes, "min_replicas": resilience.min_replicas,
                      "hot_experts": resilience.hot_experts}},
        "seed": args.seed,
        "warmup_steps": warmup_steps(cycle, trace.num_layers, trace.num_steps),
        "clairvoyant_candidates": {run.name.split(":", 1)[-1]: run.summary()["step_par_mean"] for run in candidates},
    }


def _print_report(report: dict, files: dict, failures: bool) -> None:
    """The tables for a terminal, and where the report went."""
    from rich.console import Console

    from eplb.report.simulate import policy_table

    out = Console(highlight=False)
    out.print(policy_table(report))
    if failures:
        out.print(_failure_table(report))
    if files:
        out.print(f"report written to {files['report.md'].parent}/ ({', '.join(p.name for p in files.values())})")


def _failure_table(report: dict):
    """One row per policy and failure: lost experts (and those that had replicas on two ranks), steps with experts unavailable, tokens that waited, PAR before,
    after failover and after the re-plan."""
    from rich.table import Table

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    table = Table(title="failures (PAR over live ranks; waiting tokens need a reload)")
    for header in ("policy", "failure", "lost experts", "of them replicated", "steps unavail.", "tokens waiting", "PAR before",
                   "PAR failover", "re-plan at", "PAR re-planned"):
        table.add_column(header, justify="left" if header in ("policy", "failure") else "right", no_wrap=True)
    rows = [(name, figures) for name, figures in report["policies"].items()]
    if report.get("clairvoyant"):
        rows.append((f"clairvoyant:{report['clairvoyant']['policy']}", report["clairvoyant"]))
    for name, figures in rows:
        failures = figures.get("failures", {})
        for event in failures.get("events", []):
            if not event.get("until"):
                continue
            table.add_row(name, event["spec"], str(event["lost_experts"]), str(event["lost_replicated_experts"]),
                          str(event["steps_with_unavailable_experts"]), fmt(event["tokens_waiting"], ".3g"),
                          fmt(event["par_before"], ".3f"), fmt(event["par_after_failover"], ".3f"),
                          fmt(event["replan_step"], "d"), fmt(event["par_after_replan"], ".3f"))
        table.add_row(name, "whole run", "", "", str(failures.get("steps_with_unavailable_experts", 0)),
                      f"{failures.get('tokens_waiting', 0):.3g} ({100 * failures.get('tokens_waiting_share', 0):.2f}%)",
                      "", "", "", "", end_section=True)
    return table
