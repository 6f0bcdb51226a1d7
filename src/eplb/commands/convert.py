"""``eplb convert``: translate an expert map (or an expert load) between the engines' file formats."""

from __future__ import annotations

from pathlib import Path

from eplb.commands.common import LOAD_FORMAT_BY_SUFFIX, MAP_FORMAT_BY_SUFFIX, HelpFormatter, format_from_suffix
from eplb.formats import FORMATS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="translate an expert map between engines",
        description="Translate an expert map between vllm-ascend JSON (ascend), SGLang --init-expert-location "
                    "(sglang, .json or .pt), vLLM phy2log (vllm, .npy or .pt) and TensorRT-LLM load-balancer YAML "
                    "(trtllm). Expert loads convert too: SGLang logical_count (sglang), TensorRT-LLM statistics "
                    "folder (trtllm) and .npz traces (npz). The map is checked before it is written.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("input", metavar="IN", help="file to read")
    parser.add_argument("output", metavar="OUT", help="file to write (replaced atomically)")
    parser.add_argument("--to", choices=FORMATS,
                        help="format of OUT (default: from its suffix: maps .json ascend, .npy/.pt vllm, .yaml "
                             "trtllm; loads .npz npz, .json/.pt sglang, a folder trtllm)")
    parser.add_argument("--from", dest="source_format", choices=FORMATS,
                        help="format of IN (default: detected from the content)")
    parser.add_argument("--experts", type=int, metavar="E", help="logical experts per layer (default: largest id + 1)")
    parser.add_argument("--ranks", type=int, metavar="W",
                        help="ranks (EP size); needed when IN is an SGLang, vLLM or TensorRT-LLM map")
    parser.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from eplb import formats
    from eplb.commands.common import at_least, check_output
    from eplb.errors import FormatError

    console = Console(highlight=False, soft_wrap=True)
    at_least("--experts", args.experts)
    at_least("--ranks", args.ranks)
    kind = formats.detect_kind(args.input, args.source_format)
    allowed = formats.MAP_FORMATS if kind == "map" else formats.LOAD_FORMATS
    to = args.to or _format_of_output(args.output, kind, allowed)
    if to not in allowed:
        raise FormatError(f"{args.input} holds an expert {kind}; it converts to {', '.join(allowed)}, not {to}")
    if not (kind == "load" and to == "trtllm"):  # a statistics folder is checked by its writer
        check_output(args.output, "OUT")
    if kind == "map":
        placement = formats.read_map(args.input, args.source_format, args.experts, args.ranks)
        formats.write_map(placement, args.output, to)
        t = placement.topology
        console.print(f"wrote {args.output} ({to}): {placement.num_layers} layers, {placement.num_experts} "
                      f"experts, {t.num_ranks} ranks x {t.slots_per_rank} slots", markup=False)
    else:
        load = formats.read_load(args.input, args.source_format)
        formats.write_load(load, args.output, to)
        console.print(f"wrote {args.output} ({to}): expert load of shape {list(load.shape)}", markup=False)
    return 0


def _format_of_output(path: str, kind: str, allowed) -> str:
    if kind == "load" and (Path(path).is_dir() or not Path(path).suffix):
        return "trtllm"  # statistics are a folder
    table = MAP_FORMAT_BY_SUFFIX if kind == "map" else LOAD_FORMAT_BY_SUFFIX
    return format_from_suffix(path, "OUT", table, "--to", allowed)
