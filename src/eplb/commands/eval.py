"""``eplb eval``: how balanced an expert map is under an expert load (PAR per layer, balancedness, heatmap)."""

from __future__ import annotations

from eplb.commands.common import HelpFormatter
from eplb.formats import LOAD_FORMATS, MAP_FORMATS

# The built-in example: DeepSeek-V3 (58 MoE layers, 256 experts, 8 groups) under vLLM's default placement on
# 32 ranks x 9 slots (32 redundant slots), 4 nodes, scored on a DeepSeek-V3-like load of this many tokens.
_EXAMPLE_TOKENS = 100_000


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="PAR per layer (worst first), balancedness, rank x layer heatmap",
        description="Score an expert map against an expert load. Each expert's tokens are split evenly over its "
                    "replicas; a layer's PAR is its busiest rank's load over the mean rank load (1.0 is perfect). "
                    "With a per-step load [steps, layers, experts], PAR is taken per step and layer and averaged "
                    "weighted by tokens. Balancedness is vLLM's: sum of mean rank loads / sum of max rank loads.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("map", metavar="MAP", nargs="?", help="expert map file")
    parser.add_argument("load", metavar="LOAD", nargs="?",
                        help="expert load: .npz (counts), SGLang logical_count (.json/.pt), TensorRT-LLM statistics "
                             "folder")
    parser.add_argument("--example", action="store_true",
                        help="no files: vLLM's default placement for DeepSeek-V3 on 32 ranks x 9 slots (4 nodes), "
                             "scored on a built-in DeepSeek-V3-like load")
    parser.add_argument("--format", choices=MAP_FORMATS, help="format of MAP (default: detected)")
    parser.add_argument("--load-format", choices=LOAD_FORMATS, help="format of LOAD (default: detected)")
    parser.add_argument("--experts", type=int, metavar="E", help="logical experts per layer (default: from the map)")
    parser.add_argument("--ranks", type=int, metavar="W",
                        help="ranks (EP size); needed for SGLang, vLLM and TensorRT-LLM maps")
    parser.add_argument("--top", type=int, default=10, metavar="N", help="layers shown in the table (0: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--plot", metavar="FILE.png", help="write a rank x layer heatmap of load")
    parser.set_defaults(func=run)


def _example():
    from eplb.placement import Placement
    from eplb.sim.traces import parametric_profile
    from eplb.topology import Topology

    topology = Topology(num_ranks=32, slots_per_rank=9, num_nodes=4, num_groups=8)
    placement = Placement.initial(num_experts=256, topology=topology, num_layers=58, layout="vllm")
    load = parametric_profile(58, 256, seed=0) * _EXAMPLE_TOKENS
    return placement, load, "vLLM's default placement (example)", \
        f"a DeepSeek-V3-like load of {_EXAMPLE_TOKENS:,} tokens (example)"


def _inputs(args):
    from eplb import formats
    from eplb.errors import EplbError, LoadError

    if args.example:
        if args.map or args.load:
            raise EplbError("--example takes no MAP or LOAD")
        return _example()
    if not (args.map and args.load):
        raise EplbError("eval needs MAP and LOAD (or --example)")
    load = formats.read_load(args.load, args.load_format)
    placement = formats.read_map(args.map, args.format, args.experts, args.ranks)
    if load.shape[-2] != placement.num_layers:
        raise LoadError(f"{args.load} has {load.shape[-2]} layers (shape {list(load.shape)}) but {args.map} has "
                        f"{placement.num_layers}; map and load must cover the same MoE layers")
    if load.shape[-1] != placement.num_experts:
        raise LoadError(f"{args.load} has {load.shape[-1]} experts per layer (shape {list(load.shape)}) but "
                        f"{args.map} has {placement.num_experts}; pass --experts if the map leaves its last experts out")
    return placement, load, str(args.map), str(args.load)


def evaluate(placement, load) -> dict:
    """Balance figures of ``placement`` under ``load`` (``[L, E]`` or ``[T, L, E]``).

    Returns:
        ``par_mean`` / ``par_p99`` / ``par_max`` (per step and layer, token-weighted), ``balancedness``,
        ``par_per_layer`` float ``[L]`` (token-weighted over steps), ``busiest_rank`` int ``[L]`` and
        ``rank_loads`` float ``[L, W]`` (summed over steps), ``load_per_layer`` float ``[L]``.
    """
    import numpy as np

    from eplb import metrics

    step_loads = metrics.rank_loads(placement, load[None] if load.ndim == 2 else load)  # [T, L, W]
    par, tokens = metrics.par(step_loads), step_loads.sum(axis=-1)  # metrics.step_par, sharing step_loads
    layer_tokens = tokens.sum(axis=0)
    weighted = (par * tokens).sum(axis=0)
    par_per_layer = np.divide(weighted, layer_tokens, out=par.mean(axis=0), where=layer_tokens > 0)
    rank_loads = step_loads.sum(axis=0)
    summary = metrics.summarize_par(par, tokens)
    return {
        **summary,
        "balancedness": metrics.balancedness(step_loads),  # vLLM pools the per-step rows
        "par_per_layer": par_per_layer,
        "busiest_rank": rank_loads.argmax(axis=1),
        "rank_loads": rank_loads,
        "load_per_layer": layer_tokens,
    }


def run(args) -> int:
    import json

    from rich.console import Console

    from eplb.report import par_table, summary_table

    from eplb.commands.common import at_least, check_output

    at_least("--top", args.top, 0)
    at_least("--experts", args.experts)
    at_least("--ranks", args.ranks)
    if args.plot:
        from eplb.report.heatmap import check_png

        check_png(args.plot, "--plot")
        check_output(args.plot, "--plot")
    placement, load, map_name, load_name = _inputs(args)
    result = evaluate(placement, load)
    t = placement.topology
    steps = load.shape[0] if load.ndim == 3 else 1
    if args.plot:
        from eplb.report.heatmap import plot_rank_heatmap

        plot_rank_heatmap(result["rank_loads"], args.plot,
                          title=f"{map_name} under {load_name}, load summed over {steps} step(s)", flag="--plot")
    if args.json:
        out = {
            "map": map_name,
            "load": load_name,
            "num_layers": placement.num_layers,
            "num_experts": placement.num_experts,
            "num_ranks": t.num_ranks,
            "slots_per_rank": t.slots_per_rank,
            "num_steps": steps,
            "total_load": float(result["load_per_layer"].sum()),
            "par_mean": result["par_mean"],
            "par_p99": result["par_p99"],
            "par_max": result["par_max"],
            "balancedness": result["balancedness"],
            "par_per_layer": [round(float(v), 6) for v in result["par_per_layer"]],
        }
        if args.plot:
            out["plot"] = args.plot
        print(json.dumps(out))
        return 0
    console = Console(highlight=False)
    console.print(f"map  {map_name}: {placement.num_layers} layers, {placement.num_experts} experts, "
                  f"{t.num_ranks} ranks x {t.slots_per_rank} slots", markup=False)
    console.print(f"load {load_name}: {steps} step(s), total {result['load_per_layer'].sum():,.0f}", markup=False)
    console.print(par_table(result["par_per_layer"], result["busiest_rank"], result["load_per_layer"],
                            top=args.top or None))
    per_step = " (per step and layer, token-weighted)" if steps > 1 else " (token-weighted over layers)"
    console.print(summary_table({
        f"mean PAR{per_step}": f"{result['par_mean']:.3f}",
        "p99 PAR": f"{result['par_p99']:.3f}",
        "max PAR": f"{result['par_max']:.3f}",
        "balancedness (vLLM)": f"{result['balancedness']:.3f}",
    }))
    if args.plot:
        console.print(f"heatmap written to {args.plot}", markup=False)
    return 0
