"""``eplb tune``: pick the policy, window, interval and redundancy for the user's own load and engine.

It simulates every candidate of the grid on the trace (:mod:`eplb.sim.sweep`), in local worker processes
(:func:`eplb.sim.runs.simulate_runs`) or as Ray tasks (:mod:`eplb.sim.ray_runs`), ranks them by estimated step
time, and prints the best row's settings for the chosen engine, ready to paste (:mod:`eplb.integrations.configs`).
Each finished run's row is appended to ``OUT/tune-rows.jsonl`` as it finishes, so Ctrl-C keeps them and
``--resume`` runs only the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from eplb.commands.common import HelpFormatter, add_cluster_arguments

logger = logging.getLogger(__name__)

_SLOTS = 9  # DeepSeek-V3 on 32 ranks: 256 experts + 32 redundant slots
_POLICIES = {"eplb": "auto,default,swift,flashlb", "vllm": "auto,default,swift,flashlb",
             "vllm-ascend": "default,swift,flashlb", "sglang": "auto,default,swift,flashlb",
             "trtllm": "auto,default,swift,flashlb"}


def register(subparsers) -> None:
    from eplb.dispatch import DISPATCH_RULES
    from eplb.sim.cost import MODEL_EXPERT_BYTES
    from eplb.sim.sweep import ENGINES

    parser = subparsers.add_parser(
        "tune", help="find the policy, window, interval and redundancy that serve your load best on your engine",
        description="Simulate every combination of policies x windows x intervals x redundant slots on a recorded "
                    "load (or a built-in trace), the way the chosen engine runs them, score each by estimated step "
                    "time with moves priced, and print a ranked table (step PAR, step time, weights moved per hour, "
                    "distance to the clairvoyant floor), a Pareto plot and tune.json in --out, and the best row's "
                    "settings for the engine, ready to paste. Windows and intervals are steps; for vllm-ascend an "
                    "interval is its algorithm_execution_interval, for vllm its step_interval.",
        formatter_class=HelpFormatter)
    trace = parser.add_argument_group("trace")
    trace.add_argument("--trace", default="builtin:default", metavar="FILE|builtin:NAME",
                       help="a per-step load to replay (any format simulate reads) or a built-in scenario")
    trace.add_argument("--workloads", metavar="FILE.npz", help="draw the built-in scenario from these workloads")
    trace.add_argument("--steps", type=int, metavar="T", help="steps to use (default: the whole trace)")
    trace.add_argument("--seed", type=int, default=0, help="seed of a generated trace")
    add_cluster_arguments(parser, _SLOTS)
    grid = parser.add_argument_group("what may vary")
    grid.add_argument("--engine", default="eplb", choices=ENGINES,
                      help="whose balancer runs the settings: eplb's runtime, vLLM's EPLB with an eplb policy, "
                           "vllm-ascend's, SGLang's, or a TensorRT-LLM static map")
    grid.add_argument("--policies", metavar="A,B,...", help="policies to try (default: those the engine can run)")
    grid.add_argument("--windows", metavar="H,H,...", help="planning windows in steps (default: 1/20, 1/10 and 1/5 "
                                                          "of the trace)")
    grid.add_argument("--intervals", metavar="I,I,...",
                      help="intervals in steps (default: each window's own length; vllm-ascend: 10,50)")
    grid.add_argument("--redundant-range", metavar="R,R,...",
                      help="redundant slots to try (default: one slot per rank less, as given, one more)")
    grid.add_argument("--no-adaptive", action="store_true", help="leave out eplb's adaptive cadence")
    pace = parser.add_argument_group("cycle and cost model (as in simulate)")
    pace.add_argument("--planner-steps", type=int, default=10, metavar="A",
                      help="steps from a window's end until its plan can be applied (the planner's lateness)")
    pace.add_argument("--dispatch", default="even", choices=DISPATCH_RULES, help="replica choice")
    pace.add_argument("--model", default="deepseek-v3", choices=sorted(MODEL_EXPERT_BYTES), help="expert size preset")
    pace.add_argument("--expert-bytes", type=float, metavar="BYTES", help="size of one expert (overrides --model)")
    pace.add_argument("--token-us", type=float, default=0.2, help="time per routed token on a rank, us")
    pace.add_argument("--bandwidth", type=float, default=50.0, metavar="GB/S", help="transfer bandwidth per rank")
    pace.add_argument("--overlap", type=float, default=0.5, help="share of a step that hides transfers")
    run_group = parser.add_argument_group("where it runs")
    run_group.add_argument("--jobs", type=int, metavar="N", help="local worker processes (default: the cores)")
    run_group.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                           help="run each simulation as a task on the Ray cluster at ADDRESS (host:port); alone, "
                                'start a local Ray instance (pip install "eplb[ray]")')
    run_group.add_argument("--resume", action="store_true",
                           help="keep the rows of an interrupted sweep in --out and run only the rest")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default="eplb-tune", metavar="DIR",
                        help="folder for tune.json, pareto.png, tune-rows.jsonl and the engine's map file")
    output.add_argument("--top", type=int, default=20, metavar="N", help="rows shown in the table")
    output.add_argument("--json", action="store_true", help="print tune.json's content and nothing else")
    parser.set_defaults(func=run)


def _numbers(flag: str, text: str | None, minimum: int) -> list[int] | None:
    from eplb.errors import EplbError

    if text is None:
        return None
    values = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            if not item.lstrip("-").isdigit() or int(item) < minimum:
                raise EplbError(f"{flag} {text!r}: {item!r} is not an integer >= {minimum}")
            values.append(int(item))
    if not values:
        raise EplbError(f"{flag} {text!r} is an empty grid: give at least one value, or leave the flag out")
    return sorted(set(values))


def _check_flags(args) -> None:
    from eplb.commands.common import at_least, within
    from eplb.errors import EplbError

    for flag, value, minimum in (("--steps", args.steps, 1), ("--seed", args.seed, 0), ("--jobs", args.jobs, 1),
                                 ("--planner-steps", args.planner_steps, 0), ("--top", args.top, 1),
                                 ("--token-us", args.token_us, 0), ("--expert-bytes", args.expert_bytes, 0)):
        at_least(flag, value, minimum)
    if not args.bandwidth > 0:
        raise EplbError(f"--bandwidth must be > 0, got {args.bandwidth:g}")
    within("--overlap", args.overlap, 0.0, 1.0)
    if args.policies is not None and not [n for n in args.policies.split(",") if n.strip()]:
        raise EplbError(f"--policies {args.policies!r} is an empty grid: name policies such as auto,default")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EplbError(f"--out {out}: is a file; the report is a folder")


def _policies(args) -> list[str]:
    from eplb import available_policies, get_policy

    text = args.policies or _POLICIES[args.engine]
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if args.policies is None:
        return [n for n in names if n in available_policies()]
    for name in names:
        get_policy(name)  # unknown: a PolicyError with a suggestion
    return names


def _grid(args, trace, topology):
    """(candidates, windows, intervals) of the flags for this trace and cluster; every error names its flag."""
    from eplb.errors import EplbError
    from eplb.sim.sweep import candidates_for, default_windows, redundant_range

    windows = _numbers("--windows", args.windows, 1) or default_windows(trace.num_steps)
    default_intervals = [max(10, args.planner_steps), 50] if args.engine == "vllm-ascend" else None
    intervals = _numbers("--intervals", args.intervals, 1) or default_intervals
    if max(windows) >= trace.num_steps:
        raise EplbError(f"--windows {max(windows)} is not shorter than the trace ({trace.num_steps} steps): no plan "
                        "would be scored; give shorter windows or a longer trace")
    base = topology.num_physical - trace.num_experts
    redundancies = _numbers("--redundant-range", args.redundant_range, 0) or \
        redundant_range(trace.num_experts, topology.num_ranks, base)
    for redundant in redundancies:
        slots = trace.num_experts + redundant
        if slots % topology.num_ranks:
            raise EplbError(f"--redundant-range {redundant}: {trace.num_experts} experts + {redundant} = {slots} "
                            f"slots do not split evenly over --ranks {topology.num_ranks}")
    candidates = candidates_for(args.engine, _policies(args), windows, intervals, redundancies,
                                adaptive=not args.no_adaptive)
    if not candidates:
        raise EplbError(f"the grid is empty for --engine {args.engine}: every window is longer than every interval "
                        "(this engine plans on at most the last interval); give --intervals >= --windows")
    return candidates, windows, intervals


def _fingerprint(trace, args, topology, warmup: int) -> str:
    """What the rows depend on besides their candidate: a row of another trace or cost model is never resumed."""
    digest = hashlib.blake2b(trace.counts.tobytes(), digest_size=12)
    settings = [args.engine, topology.num_ranks, topology.num_nodes, topology.num_groups, args.planner_steps,
                args.dispatch, args.model, args.expert_bytes, args.token_us, args.bandwidth, args.overlap, warmup]
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()


def _memory(args, trace, runs: int, jobs: int) -> None:
    """Print the memory estimate up front, and refuse a sweep that cannot fit (as ``simulate`` does)."""
    from eplb.commands.common import _gib, available_memory, check_memory
    from eplb.commands.simulate import _estimate_bytes

    needed = _estimate_bytes(trace.num_steps, trace.num_layers, trace.num_experts, args.ranks, min(runs, jobs), jobs)
    what = (f"tuning on {trace.num_steps:,} steps x {trace.num_layers} layers x {trace.num_experts:,} experts, "
            f"{runs} runs on {jobs} {'Ray task slot(s)' if args.ray is not None else 'worker(s)'}")
    if not args.json:
        print(f"eplb tune: {what}: about {_gib(needed)} of memory here ({_gib(available_memory())} available)",
              file=sys.stderr)
    check_memory(needed, what, "lower --steps (or --jobs)")


class _Bar:
    """Runs done, elapsed and time left on stderr: a bar on a terminal, else a line every tenth."""

    def __init__(self, total: int, quiet: bool):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        from eplb.commands.common import stderr_console

        console = stderr_console()
        self.lines = not quiet and not console.is_terminal
        self.total, self.done, self.started, self.shown = total, 0, time.monotonic(), 0
        self.progress = Progress(TextColumn("tune"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("left"), TimeRemainingColumn(), console=console, transient=True,
                                 disable=quiet or self.lines)
        self.task = self.progress.add_task("runs", total=total)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def advance(self) -> None:
        self.done += 1
        self.progress.update(self.task, completed=self.done)
        if self.lines and (10 * self.done // self.total > self.shown or self.done == self.total):
            self.shown = 10 * self.done // self.total
            elapsed = time.monotonic() - self.started
            left = elapsed / self.done * (self.total - self.done)
            print(f"eplb tune: {self.done}/{self.total} runs, {elapsed:.0f} s elapsed, about {left:.0f} s left",
                  file=sys.stderr, flush=True)


def _simulate_all(args, trace, base, specs, warmup: int, out: Path, fingerprint: str, rows: dict) -> None:
    """Run ``specs``, adding each row to ``rows`` and to the rows file as it finishes."""
    from eplb.report.tune import append_row
    from eplb.sim.runs import simulate_runs
    from eplb.sim.sweep import reducer

    def done(index: int, row: dict) -> None:
        rows[row["key"]] = row
        append_row(out, fingerprint, row)
        bar.advance()

    with _Bar(len(specs), args.json) as bar:
        if args.ray is not None:
            from eplb.sim.ray_runs import ray_runs

            ray_runs(trace, base, specs, args.ray or None, reducer(warmup), done)
        else:
            simulate_runs(trace, base, specs, args.jobs or os.cpu_count() or 1, reduce=reducer(warmup), done=done)


def run(args) -> int:
    from eplb.commands import common
    from eplb.commands.simulate import _drawn_shape
    from eplb.cycle import CycleConfig
    from eplb.sim.cost import CostModel, expert_bytes_of
    from eplb.sim.simulator import SimConfig
    from eplb.sim.sweep import sweep_specs
    from eplb.sim.traces import load_trace

    _check_flags(args)
    args.interval, args.fail_rank, args.fail_node = 1, [], []  # what _drawn_shape reads of simulate's flags
    shape = _drawn_shape(args)
    if shape is not None:  # a cluster that cannot hold the experts fails before the trace is drawn
        common.topology(args, shape[2], default_slots=_SLOTS)
    trace = load_trace(args.trace, args.steps, args.seed, args.workloads)
    topology = common.topology(args, trace.num_experts, default_slots=_SLOTS)
    candidates, windows, _ = _grid(args, trace, topology)
    expert_bytes = args.expert_bytes if args.expert_bytes is not None else float(expert_bytes_of(args.model))
    base = SimConfig(topology, CycleConfig(cycle_steps=min(windows), planner_steps=args.planner_steps),
                     dispatch=args.dispatch, expert_bytes=expert_bytes,
                     cost=CostModel(token_us=args.token_us, bandwidth_gbs=args.bandwidth, overlap=args.overlap))
    plan = sweep_specs(args.engine, candidates, base, trace.num_steps, trace.num_layers, trace.num_experts)
    jobs = args.jobs or os.cpu_count() or 1
    if args.ray is not None:  # before anything is printed or written: an address that does not answer is one line
        from eplb.sim.ray_runs import connect

        jobs = int(connect(args.ray or None).cluster_resources().get("CPU", jobs))
    _memory(args, trace, len(plan.specs), jobs)
    out = Path(args.out)
    fingerprint = _fingerprint(trace, args, topology, plan.warmup)
    rows = _start_folder(out, args.resume, fingerprint)
    todo = [spec for spec in plan.specs if spec.name not in rows]
    try:
        _simulate_all(args, trace, base, todo, plan.warmup, out, fingerprint, rows)
    except KeyboardInterrupt:
        print(f"eplb tune: interrupted: {len(rows)} of {len(plan.specs)} rows kept in {out}/tune-rows.jsonl; "
              "run the same command with --resume to finish", file=sys.stderr)
        raise
    return _finish(args, trace, topology, plan, rows, out)


def _start_folder(out: Path, resume: bool, fingerprint: str) -> dict:
    """Create --out; the rows kept from an interrupted sweep with ``resume``, else none (the rows file restarts)."""
    from eplb.errors import EplbError
    from eplb.report.tune import ROWS_FILE, read_rows

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EplbError(f"--out {out}: cannot create the folder: {exc.strerror or exc}") from None
    if resume:
        return read_rows(out, fingerprint)
    (out / ROWS_FILE).unlink(missing_ok=True)
    return {}


def _finish(args, trace, topology, plan, rows: dict, out: Path) -> int:
    """Rank the rows, write tune.json, the Pareto plot and the engine's map, print the table and the settings."""
    from rich.console import Console

    from eplb.report.tune import plot_pareto, tune_table, write_tune_json
    from eplb.sim.sweep import pareto, rank_rows

    ranked = rank_rows(rows, plan)
    front = pareto(ranked)
    best = ranked[0]
    config = _engine_settings(args, trace, topology, best, out)
    references = {f"R{redundant}": {kind: rows.get(name) for kind, name in names.items()}
                  for redundant, names in plan.references.items()}
    report = {"trace": {"name": trace.name, "steps": trace.num_steps, "layers": trace.num_layers,
                        "experts": trace.num_experts, "source": trace.source},
              "cluster": {"num_ranks": topology.num_ranks, "num_nodes": topology.num_nodes,
                          "num_groups": topology.num_groups},
              "engine": args.engine, "warmup_steps": plan.warmup, "scored_steps": trace.num_steps - plan.warmup,
              "best": best["key"], "settings": config.settings, "paste": config.text, "notes": config.notes,
              "pareto": front, "rows": ranked, "references": references}
    write_tune_json(report, out / "tune.json")
    plot_pareto(ranked, front, out / "pareto.png",
                f"{trace.name}: step time against weights moved ({args.engine}, {len(ranked)} candidates)")
    if args.json:
        print(json.dumps(report))
        return 0
    console = Console(highlight=False)
    if not console.is_terminal:  # a file or a pipe: wide enough for the table, not rich's 80 columns
        console = Console(highlight=False, width=150)
    console.print(tune_table(ranked, front, args.top))
    console.print(f"\nbest: {best['key']}: step PAR {best['step_par']:.3f}, {best['step_ms']:.3f} ms per step "
                  f"({best['speedup_vs_static']:.3f}x no balancing), {best['over_floor']:.3f}x the floor's PAR\n"
                  f"{args.engine} settings (checked by eplb's reader of that format):", markup=False)
    console.print(config.text, markup=False, soft_wrap=True)
    for note in config.notes:
        console.print(f"note: {note}", markup=False)
    console.print(f"written to {out}/: tune.json, pareto.png, tune-rows.jsonl", markup=False)
    return 0


def _engine_settings(args, trace, topology, best: dict, out: Path):
    """The best row's settings for the engine; for an engine that loads a map at start, the map is written by
    ``eplb plan`` on the steps the row planned it on (saved as ``plan-load.npz``)."""
    import contextlib
    import io
    import shlex

    from eplb.cli import build_parser
    from eplb.formats import write_load
    from eplb.integrations.configs import MAP_FILES, engine_config

    if args.engine not in MAP_FILES:
        return engine_config(args.engine, best)
    name, format = MAP_FILES[args.engine]
    load_path, map_path = out / "plan-load.npz", out / name
    write_load(trace.counts[:best["window"]], load_path, "npz")
    words = ["eplb", "plan", str(load_path), "--ranks", str(topology.num_ranks), "--redundant",
             str(best["redundant"]), "--nodes", str(topology.num_nodes), "--groups", str(topology.num_groups),
             "--policy", best["policy"], "-o", str(map_path), "--format", format]
    plan_args = build_parser().parse_args([*words[1:], "--json"])
    with contextlib.redirect_stdout(io.StringIO()):
        plan_args.func(plan_args)
    return engine_config(args.engine, best, map_path, " ".join(shlex.quote(w) for w in words), topology.num_ranks)
