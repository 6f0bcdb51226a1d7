"""``eplb demo``: a real expert-parallel MoE engine on this machine, balanced by the runtime while it serves.

Spawns ``--ranks`` processes joined in a Gloo group over loopback; each serves a DeepSeek-V3-like skewed workload
through :mod:`eplb.engine` with the runtime's controller (dynamic, record or static mode). Prints per cycle the
measured PAR of the window before and after, moved slots, transfer time and tokens per second; then the busiest
rank's rows per step and the step time before and after the first cycle (medians), and checks that a fixed batch
gives the same outputs as the same model without balancing (exit code 1 when it does not, and in record mode when
no map was written).

Before any process starts, the demo checks that the machine can run it: the ranks' estimated memory against the
available memory, and the ranks against the usable cores (:func:`check_machine_fits`). No rank outlives the demo,
whichever process is killed (see :mod:`eplb.engine.launch`).

``--fail-rank R`` makes rank R's process exit in the middle of the first weight move: the others fail over
(:meth:`eplb.runtime.EplbController.fail_ranks`), reload the experts that only lived there and serve on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from eplb.commands.common import HelpFormatter, at_least, check_memory, check_output
from eplb.errors import EplbError

_MODES = ("dynamic", "record", "static")
_WARMUP_STEPS = 3  # first steps pay for lazy initialisation; left out of the medians
_DEFAULT_RECORD_PATH = "eplb-demo-map.json"
_RANK_FIXED_BYTES = 550 * 2**20  # a rank and its planner worker on the default model (see rank_memory_bytes)
_RANKS_PER_CORE = 4
_MIN_RANK_CAP = 8


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="serve a small MoE model with expert parallelism over real processes and balance it live",
        description="Spawn RANKS processes (Gloo over loopback) that serve a small MoE model with expert parallelism "
                    "(gate -> replica router -> all_to_all -> experts -> all_to_all) on a DeepSeek-V3-like skewed "
                    "workload, driven by the eplb runtime. Per cycle: measured PAR (busiest rank / mean rank) of "
                    "the window before and after, moved slots, transfer time, tokens per second. At the end: the "
                    "busiest rank's rows per step and the step time before and after the first cycle (medians), "
                    "and whether a fixed batch gives the same outputs as the model without balancing. Timings "
                    "are wall clock on this machine; on a shared CPU they are noisy. A run whose ranks would not "
                    f"fit the available memory (about {_RANK_FIXED_BYTES // 2**20} MiB per rank with the default "
                    f"model) or the cores ({_RANKS_PER_CORE} ranks per core) is refused before it starts.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--ranks", type=int, default=4, metavar="W", help="ranks (processes) of the EP group")
    parser.add_argument("--policy", default="auto", metavar="NAME", help="placement policy (name or vllm-ascend id)")
    parser.add_argument("--steps", type=int, default=200, metavar="N", help="steps to serve")
    parser.add_argument("--mode", choices=_MODES, default="dynamic",
                        help="dynamic: plan and move experts; record: plan and write the map to --map every cycle, "
                             "move nothing; static: load --map at start")
    parser.add_argument("--map", metavar="FILE",
                        help=f"expert map (vllm-ascend JSON): read in static mode (and dynamic, as the start), "
                             f"written in record mode (default there: {_DEFAULT_RECORD_PATH})")
    parser.add_argument("--window", type=int, default=40, metavar="H", help="steps per heat window (one cycle each)")
    model = parser.add_argument_group("model and workload")
    model.add_argument("--experts", type=int, default=16, metavar="E", help="routed experts per layer")
    model.add_argument("--slots-per-rank", type=int, metavar="K",
                       help="expert slots per rank (default: E / W + 1, one redundant slot per rank)")
    model.add_argument("--layers", type=int, default=4, metavar="L", help="MoE layers")
    model.add_argument("--top-k", type=int, default=4, metavar="k", help="experts per token")
    model.add_argument("--groups", type=int, default=4, metavar="G",
                       help="expert groups of DeepSeek-style grouped top-k (1: plain top-k)")
    model.add_argument("--topk-groups", type=int, default=2, metavar="g", help="groups each token may pick from")
    model.add_argument("--tokens", type=int, default=128, metavar="N", help="tokens per rank per step")
    model.add_argument("--dispatch", "--router", dest="dispatch", default="rank", metavar="RULE",
                       help="replica choice of the router: rank, token or local (--router: the old spelling)")
    model.add_argument("--seed", type=int, default=0, help="weights and workload seed")
    model.add_argument("--trace", metavar="LOAD",
                       help="recorded expert load [T, L, E] or [L, E] (.npz counts, SGLang logical_count, TensorRT-LLM "
                            "statistics) whose popularity the gate follows, instead of the built-in DeepSeek-V3-like "
                            "profile; its L and E must match --layers and --experts")
    parser.add_argument("--fail-rank", type=int, action="append", default=[], metavar="R",
                        help="this rank's process exits in the middle of the first weight move (repeat it for a "
                             "node); the others fail over, reload the experts only it held and serve on")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: Gloo; cuda: rank r on GPU r mod GPUs, NCCL with a GPU per rank, else Gloo "
                             "(ranks share GPUs)")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="S",
                        help="give up (and stop every rank) after this many seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON summary at the end, nothing else")
    parser.set_defaults(func=run)


def _settings(args):
    """Validate the arguments before any process starts; returns (ServeSettings, record_path)."""
    from eplb.engine.model import ModelConfig
    from eplb.engine.serve import Faults, ServeSettings
    from eplb.runtime import EplbConfig
    from eplb.runtime.startup import prepare
    from eplb.topology import Topology

    for name in ("ranks", "steps", "window", "experts", "layers", "top_k", "tokens", "groups", "topk_groups",
                 "slots_per_rank"):
        at_least(f"--{name.replace('_', '-')}", getattr(args, name))
    if not args.timeout > 0:
        raise EplbError(f"--timeout must be > 0 seconds, got {args.timeout}")
    slots = args.slots_per_rank or math.ceil(args.experts / args.ranks) + 1
    if slots * args.ranks < args.experts:
        raise EplbError(f"--slots-per-rank {slots} x --ranks {args.ranks} = {slots * args.ranks} slots cannot hold "
                        f"{args.experts} experts")
    model = ModelConfig(num_layers=args.layers, num_experts=args.experts, top_k=args.top_k,
                        num_groups=args.groups, topk_groups=args.topk_groups, seed=args.seed)
    check_machine_fits(args.ranks, rank_memory_bytes(model, slots, args.tokens))
    eplb = {"mode": args.mode, "window_steps": args.window, "planner_check_steps": 4, "policy": args.policy,
            "dispatch": args.dispatch}
    record_path = None
    if args.mode == "record":
        record_path = str(Path(args.map or _DEFAULT_RECORD_PATH).resolve())
        check_output(record_path, "--map")
        eplb["record_path"] = record_path
    elif args.map is not None:
        eplb["map_path"] = args.map
    elif args.mode == "static":
        raise EplbError("--mode static needs --map FILE (e.g. one written by --mode record)")
    # a bad map or record folder is an error before any rank starts
    prepare(EplbConfig.from_dict(eplb), args.layers, args.experts, Topology(args.ranks, slots))
    faults = Faults()
    if args.fail_rank:
        failed = sorted(set(args.fail_rank))
        if failed[0] < 0 or failed[-1] >= args.ranks:
            raise EplbError(f"--fail-rank {failed[0] if failed[0] < 0 else failed[-1]}: ranks are 0..{args.ranks - 1}")
        if args.mode == "static":
            raise EplbError("--fail-rank strikes during the first cycle: use --mode dynamic or record")
        live_slots = (args.ranks - len(failed)) * slots
        if live_slots < args.experts:
            raise EplbError(f"--fail-rank {','.join(map(str, failed))} leaves {live_slots} slots for {args.experts} "
                            "experts: the survivors could not hold every expert")
        faults = Faults(kill_ranks=(tuple(failed), 0))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise EplbError("--device cuda: torch sees no CUDA device; use --device cpu")
    trace = None
    if args.trace is not None:
        from eplb.engine.tokens import expert_popularity
        from eplb.formats import read_load

        load = read_load(args.trace)
        trace = load.sum(axis=0) if load.ndim == 3 else load
        expert_popularity(args.layers, args.experts, args.top_k, trace=trace)  # shape errors before any rank starts
    settings = ServeSettings(model=model, slots_per_rank=slots, tokens_per_rank=args.tokens, steps=args.steps,
                             eplb=eplb, trace=trace, device=args.device, faults=faults)
    return settings, record_path


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def rank_memory_bytes(model, slots_per_rank: int, tokens_per_rank: int) -> int:
    """Estimated resident memory of one rank of the demo: the process itself, its planner worker, and the model.

    The fixed part is measured on the default model (4 ranks, Linux, torch 2 on CPU): a rank holds about 320 MB
    resident and its planner worker grows to about 200 MB. On top come, in float32, the whole model (every rank keeps
    the unbalanced reference to check outputs against), its own slots twice (serving and receiving a move) and the
    activations of a step.
    """
    expert = 3 * model.hidden * model.ffn  # gate, up and down projections
    whole_model = model.num_layers * (model.num_experts + 1) * expert + model.vocab * model.hidden
    own_slots = 2 * model.num_layers * slots_per_rank * expert
    activations = 8 * tokens_per_rank * model.top_k * max(model.hidden, model.ffn)
    return _RANK_FIXED_BYTES + 4 * (whole_model + own_slots + activations)


def check_machine_fits(ranks: int, per_rank_bytes: int) -> None:
    """Refuse a demo this machine cannot run: more memory than is available, or more ranks than
    :data:`_RANKS_PER_CORE` per usable core (at least :data:`_MIN_RANK_CAP`): with more, the ranks' collectives
    time out while they wait for a core."""
    cores = usable_cores()
    cap = max(_MIN_RANK_CAP, _RANKS_PER_CORE * cores)
    if ranks > cap:
        raise EplbError(f"--ranks {ranks} is too many for {cores} usable CPU core(s): the demo runs one process per "
                        f"rank and allows at most {cap} here ({_RANKS_PER_CORE} per core, {_MIN_RANK_CAP} at least); "
                        f"lower --ranks")
    check_memory(ranks * per_rank_bytes + _RANK_FIXED_BYTES,  # the ranks and this process
                 f"--ranks {ranks} ({ranks} ranks x {per_rank_bytes / 2**20:,.0f} MiB each, plus this process)",
                 "lower --ranks (or --experts, --layers, --tokens)")


class _Collector:
    """Gathers the ranks' events in the parent: per step the slowest rank's time and the busiest rank's rows."""

    def __init__(self, world: int, num_layers: int, tokens_per_rank: int):
        self.world, self.num_layers, self.tokens_per_rank = world, num_layers, tokens_per_rank
        self.steps: dict[int, dict[int, tuple]] = {}
        self.cycles: dict[int, dict[int, dict]] = {}
        self.ready = 0
        self.checking = False
        self.failed: set[int] = set()
        self.failovers: dict[int, dict] = {}  # rank -> its failover figures

    def on_event(self, rank: int, payload) -> None:
        kind = payload[0]
        if kind == "step":
            _, step, seconds, rows, switched, expert_cpu_s = payload
            self.steps.setdefault(step, {})[rank] = (seconds, rows, switched, expert_cpu_s)
        elif kind == "cycle":
            self.cycles.setdefault(payload[1]["cycle"], {})[rank] = payload[1]
        elif kind == "ready":
            self.ready += 1
        elif kind == "checking":
            self.checking = True
        elif kind == "failover":
            self.failed |= set(payload[1]["failed_ranks"])
            self.failovers[rank] = payload[1]

    @property
    def live(self) -> int:
        return self.world - len(self.failed)

    def complete_steps(self) -> list[int]:
        return sorted(s for s, ranks in self.steps.items() if len(ranks) >= self.live)

    def step_figures(self, step: int) -> tuple[float, float, float, bool, float]:
        """(seconds of the slowest rank, busiest rank's rows averaged over layers, PAR of rows, switched, expert CPU
        seconds of the busiest rank)."""
        import numpy as np

        ranks = self.steps[step]
        seconds = max(v[0] for v in ranks.values())
        rows = np.array([ranks[r][1] for r in sorted(ranks)], dtype=np.float64)  # [ranks serving, L]
        busiest = float(rows.max(axis=0).mean())
        mean = rows.mean(axis=0)
        step_par = float(np.mean(rows.max(axis=0) / np.where(mean > 0, mean, 1.0)))
        return seconds, busiest, step_par, any(v[2] for v in ranks.values()), max(v[3] for v in ranks.values())

    def tokens(self, step: int) -> int:
        """Tokens served in ``step`` (by the ranks that were serving)."""
        return self.tokens_per_rank * len(self.steps[step])

    def cycle(self, index: int) -> dict | None:
        """Rank 0's figures of a finished cycle, with the slowest rank's transfer time; None until all reported."""
        ranks = self.cycles.get(index, {})
        if len(ranks) < self.live:
            return None
        out = dict(ranks[min(ranks)])
        out["transfer_s"] = max(r["transfer_s"] for r in ranks.values())
        return out


def _median(values) -> float | None:
    import numpy as np

    return float(np.median(values)) if len(values) else None


def _summary(collector: _Collector, results: list, settings, args, elapsed: float) -> dict:
    steps = [s for s in collector.complete_steps() if s >= _WARMUP_STEPS]
    figures = {s: collector.step_figures(s) for s in steps}
    results = [r for r in results if r is not None]  # a rank that failed returns nothing
    cycles = [c for c in results[0]["cycles"]]
    for c in cycles:
        c["transfer_s"] = max(r["cycles"][c["cycle"]]["transfer_s"] for r in results)
    applied = [c for c in cycles if c["applied_layers"]]
    first = applied[0] if applied else None
    before, after = steps, []
    if first is not None:
        nxt = [c["submit_step"] for c in cycles if c["submit_step"] > first["submit_step"]]
        window_end = nxt[0] if nxt else steps[-1] + 1 if steps else first["submit_step"]
        switched = [s for s in steps if first["submit_step"] <= s < window_end and figures[s][3]]
        first_done = switched[-1] if switched else first["submit_step"]
        before = [s for s in steps if s < first["submit_step"]]
        after = [s for s in steps if s > first_done]
    tokens = collector.tokens

    def medians(selection):
        return {"busiest_rank_rows": _median([figures[s][1] for s in selection]),
                "step_par": _median([figures[s][2] for s in selection]),
                "step_time_ms": None if not selection else 1000 * _median([figures[s][0] for s in selection]),
                "busiest_expert_cpu_ms": None if not selection else 1000 * _median([figures[s][4] for s in selection]),
                "tokens_per_s": _median([tokens(s) / figures[s][0] for s in selection]), "steps": len(selection)}

    for c in cycles:
        end = next((d["submit_step"] for d in cycles if d["submit_step"] > c["submit_step"]), None)
        window = [s for s in steps if c["submit_step"] - args.window <= s < c["submit_step"]]
        moving = [s for s in steps if c["submit_step"] <= s < (end or math.inf) and figures[s][3]]
        later = [s for s in steps if (moving[-1] if moving else c["submit_step"]) < s < (end or math.inf)]
        c["tokens_per_s_before"] = _median([tokens(s) / figures[s][0] for s in window])
        c["tokens_per_s_after"] = _median([tokens(s) / figures[s][0] for s in later])
    out = {"ranks": args.ranks, "policy": args.policy, "mode": args.mode, "experts": args.experts,
           "slots_per_rank": settings.slots_per_rank, "layers": args.layers, "top_k": args.top_k,
           "tokens_per_rank": args.tokens, "steps": len(collector.complete_steps()), "window": args.window,
           "cycles": [{"cycle": c["cycle"], "submit_step": c["submit_step"], "par_before": c["window_par"],
                       "par_after": c["next_window_par"], "predicted_par_after": c["predicted_par_after"],
                       "moved_slots": c["moved_slots"], "transfer_s": c["transfer_s"], "planner_s": c["planner_s"],
                       "tokens_per_s_before": c["tokens_per_s_before"],
                       "tokens_per_s_after": c["tokens_per_s_after"], "skipped": c["skipped"]} for c in cycles],
           "before": medians(before), "after": medians(after) if first is not None else None,
           "outputs_equal": all(r["outputs_equal"] for r in results),
           "bitwise_equal": all(r["bitwise_equal"] for r in results),
           "max_rel_diff": max(r["max_rel_diff"] for r in results), "elapsed_s": elapsed}
    if collector.failovers:
        first = results[0]["failovers"][0]
        out["failover"] = {"failed_ranks": first["failed_ranks"], "step": first["step"],
                           "lost_experts": len(first["lost"]),
                           "reloaded_slots": sum(len(r["failovers"][0]["reloaded"]) for r in results),
                           "seconds": max(r["failovers"][0]["seconds"] for r in results),
                           "live_ranks": len(results)}
    if first is not None and out["before"]["busiest_rank_rows"] and out["after"]["busiest_rank_rows"]:
        out["busiest_rank_drop"] = 1 - out["after"]["busiest_rank_rows"] / out["before"]["busiest_rank_rows"]
    return out


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _cycle_line(c: dict) -> str:
    if c.get("skipped") and not c["applied_layers"]:
        return (f"cycle {c['cycle']} (step {c['submit_step']}): skipped: {c['skipped'].splitlines()[0]}; "
                f"PAR {_fmt(c['window_par'], '.3f')} -> {_fmt(c['next_window_par'], '.3f')}")
    return (f"cycle {c['cycle']} (step {c['submit_step']}): PAR {_fmt(c['window_par'], '.3f')} -> "
            f"{_fmt(c['next_window_par'], '.3f')} (predicted {_fmt(c['predicted_par_after'], '.3f')}), "
            f"{c['moved_slots']} slots moved in layers {c['applied_layers']}, transfers "
            f"{1000 * c['transfer_s']:.1f} ms")


def run(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from eplb.engine.launch import launch
    from eplb.engine.serve import serve_rank, serving_backend

    settings, record_path = _settings(args)
    backend = serving_backend(args.device, args.ranks)
    log_level = logging.getLogger().getEffectiveLevel()  # the ranks log like the parent (-v, -vv)
    collector = _Collector(args.ranks, args.layers, args.tokens)
    console = Console(stderr=True, highlight=False)
    if args.mode in ("dynamic", "record"):
        # compiled once here, cached for the ranks' planners: on a fresh install they would each compile at once,
        # and the first cycle would wait for that instead of planning
        from eplb.runtime.planner import warm_up

        with console.status("loading the policy's compiled kernels (compiling them on a fresh install)"):
            warm_up(args.policy, {}, args.dispatch)
    start = time.perf_counter()
    if args.json:
        results = launch(serve_rank, args.ranks, (settings,), timeout_s=args.timeout, on_event=collector.on_event,
                         backend=backend, log_level=log_level, rank_failures=bool(args.fail_rank))
    else:
        shown = set()
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=True)
        task = progress.add_task(f"starting {args.ranks} ranks (Gloo over loopback)", total=args.steps)

        def on_event(rank, payload):
            collector.on_event(rank, payload)
            kind = payload[0]
            if kind == "cycle":
                figures = collector.cycle(payload[1]["cycle"])
                if figures is not None and figures["cycle"] not in shown:
                    shown.add(figures["cycle"])
                    progress.console.print(_cycle_line(figures))
            elif kind == "step" and rank == 0:
                done = collector.complete_steps()
                text = f"serving, {args.mode} mode"
                if done:
                    seconds, busiest, step_par, _, _ = collector.step_figures(done[-1])
                    text += (f": busiest rank {busiest:.0f} rows/layer, step PAR {step_par:.2f}, "
                             f"{collector.tokens(done[-1]) / seconds:,.0f} tok/s")
                progress.update(task, completed=payload[1] + 1, description=text)
            elif kind == "checking":
                progress.update(task, description="checking outputs against the model without balancing")
            elif kind == "failover" and len(collector.failovers) == 1:
                f = payload[1]
                progress.console.print(f"[red]ranks {f['failed_ranks']} failed[/] at step {f['step']}: failed over; "
                                       f"{len(f['lost'])} experts had no surviving replica and were reloaded; "
                                       f"serving goes on over {args.ranks - len(f['failed_ranks'])} ranks")

        with progress:
            results = launch(serve_rank, args.ranks, (settings,), timeout_s=args.timeout, on_event=on_event,
                             backend=backend, log_level=log_level, rank_failures=bool(args.fail_rank))
    summary = _summary(collector, results, settings, args, time.perf_counter() - start)
    if record_path is not None:
        summary["map_written"] = record_path if Path(record_path).is_file() else None
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(Console(highlight=False), summary)
    if record_path is not None and summary["map_written"] is None:
        return 1  # asked for a map and got none (the summary says so)
    return 0 if summary["outputs_equal"] else 1


def _print_summary(console, s: dict) -> None:
    from rich.table import Table

    console.print(f"[bold]eplb demo[/]: {s['ranks']} ranks x {s['slots_per_rank']} slots, {s['experts']} experts x "
                  f"{s['layers']} layers, top-{s['top_k']}, {s['tokens_per_rank']} tokens per rank per step, "
                  f"policy {s['policy']}, {s['mode']} mode, {s['steps']} steps in {s['elapsed_s']:.0f} s")
    if s["cycles"]:
        table = Table(title="cycles (PAR measured on the heat window before and after; transfer: slowest rank)")
        moved = "planned moves" if s["mode"] == "record" else "moved slots"
        for name in ("cycle", "step", "PAR before", "PAR after", moved, "transfer ms", "tok/s before",
                     "tok/s after", "note"):
            table.add_column(name, justify="left" if name == "note" else "right")
        for c in s["cycles"]:
            table.add_row(str(c["cycle"]), str(c["submit_step"]), _fmt(c["par_before"], ".3f"),
                          _fmt(c["par_after"], ".3f"), str(c["moved_slots"]), _fmt(1000 * c["transfer_s"], ".1f"),
                          _fmt(c["tokens_per_s_before"], ",.0f"), _fmt(c["tokens_per_s_after"], ",.0f"),
                          (c["skipped"] or "").splitlines()[0] if c["skipped"] else "")
        console.print(table)
    b, a = s["before"], s["after"]
    if a is None:
        console.print(f"medians over {b['steps']} steps: busiest rank {_fmt(b['busiest_rank_rows'], '.0f')} "
                      f"rows/layer per step (step PAR {_fmt(b['step_par'], '.3f')}), step "
                      f"{_fmt(b['step_time_ms'], '.1f')} ms, {_fmt(b['tokens_per_s'], ',.0f')} tokens/s")
    else:
        console.print(f"busiest rank per step (token x expert rows per layer, medians): "
                      f"{_fmt(b['busiest_rank_rows'], '.0f')} before the first cycle -> "
                      f"{_fmt(a['busiest_rank_rows'], '.0f')} after ({_fmt(s.get('busiest_rank_drop'), '.0%')} less); "
                      f"step PAR {_fmt(b['step_par'], '.3f')} -> {_fmt(a['step_par'], '.3f')}")
        console.print(f"step time (median, slowest rank, wall clock on a shared CPU): "
                      f"{_fmt(b['step_time_ms'], '.1f')} ms over {b['steps']} steps -> "
                      f"{_fmt(a['step_time_ms'], '.1f')} ms over {a['steps']} steps; tokens/s "
                      f"{_fmt(b['tokens_per_s'], ',.0f')} -> {_fmt(a['tokens_per_s'], ',.0f')}")
        console.print(f"busiest rank's expert FFN time per step (median CPU time, unaffected by other processes "
                      f"on the CPU): {_fmt(b['busiest_expert_cpu_ms'], '.2f')} ms -> "
                      f"{_fmt(a['busiest_expert_cpu_ms'], '.2f')} ms")
    if "failover" in s:
        f = s["failover"]
        console.print(f"failover: ranks {f['failed_ranks']} lost at step {f['step']}; {f['lost_experts']} "
                      f"experts had no surviving replica, {f['reloaded_slots']} slots reloaded from the checkpoint; "
                      f"longest fail_ranks call {1000 * f['seconds']:.1f} ms; served on over {f['live_ranks']} ranks")
    if "map_written" in s:
        if s["map_written"] is None:
            console.print("[red]record mode: no map was written[/] (no plan arrived in time, or see the log above)")
        else:
            console.print(f"record mode: the last cycle's map is in {s['map_written']} "
                          f"(serve with it: eplb demo --mode static --map {s['map_written']})")
    if s["bitwise_equal"]:
        console.print("outputs for a fixed batch: [green]bitwise equal[/] to the same model without balancing")
    elif s["outputs_equal"]:
        console.print(f"outputs for a fixed batch: [green]equal within 1e-6[/] to the same model without balancing "
                      f"(max relative difference {s['max_rel_diff']:.2e})")
    else:
        console.print(f"outputs for a fixed batch: [red]DIFFER[/] from the same model without balancing (max "
                      f"relative difference {s['max_rel_diff']:.2e})")
