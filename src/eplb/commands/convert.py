"""``eplb convert``: translate an expert map (or an expert load) between the engines' file formats."""

from __future__ import annotations

import argparse

from eplb.formats import FORMATS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="translate an expert map between engines",
        description="Translate an expert map between vllm-ascend JSON (ascend), SGLang --init-expert-location "
                    "(sglang, .json or .pt), vLLM phy2log (vllm, .npy or .pt) and TensorRT-LLM load-balancer YAML "
                    "(trtllm). Expert loads convert too: SGLang logical_count (sglang), TensorRT-LLM statistics "
                    "folder (trtllm) and .npz traces (npz). The map is checked before it is written.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("input", metavar="IN", help="file to read")
    parser.add_argument("output", metavar="OUT", help="file to write (replaced atomically)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="format of OUT")
    parser.add_argument("--from", dest="source_format", choices=FORMATS,
                        help="format of IN (default: detected from the content)")
    parser.add_argument("--experts", type=int, metavar="E", help="logical experts per layer (default: largest id + 1)")
    parser.add_argument("--ranks", type=int, metavar="W",
                        help="ranks (EP size); needed when IN is an SGLang, vLLM or TensorRT-LLM map")
    parser.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from eplb import formats
    from eplb.errors import FormatError

    console = Console(highlight=False, soft_wrap=True)
    kind = formats.detect_kind(args.input, args.source_format)
    allowed = formats.MAP_FORMATS if kind == "map" else formats.LOAD_FORMATS
    if args.to not in allowed:
        raise FormatError(f"{args.input} holds an expert {kind}; it converts to {', '.join(allowed)}, not {args.to}")
    if kind == "map":
        placement = formats.read_map(args.input, args.source_format, args.experts, args.ranks)
        formats.write_map(placement, args.output, args.to)
        t = placement.topology
        console.print(f"wrote {args.output} ({args.to}): {placement.num_layers} layers, {placement.num_experts} "
                      f"experts, {t.num_ranks} ranks x {t.slots_per_rank} slots")
    else:
        load = formats.read_load(args.input, args.source_format)
        formats.write_load(load, args.output, args.to)
        console.print(f"wrote {args.output} ({args.to}): expert load of shape {list(load.shape)}")
    return 0
