"""The engines' file formats: read and write expert maps (:class:`~eplb.Placement`) and expert loads.

Formats, one module each:

=========  ==========================================================  ===============================================
name       expert map                                                  expert load
=========  ==========================================================  ===============================================
ascend     vllm-ascend expert-map JSON (``layer_list[].device_list[]``)
sglang     ``--init-expert-location`` JSON / ``.pt`` with               ``logical_count`` ``[L, E]`` / ``[T, L, E]`` in
           ``physical_to_logical_map`` ``[L, P]``                      JSON / ``.pt`` (also the recorder's stat dump)
vllm       ``phy2log`` ``[L, P]`` as ``.pt`` / ``.npy``
trtllm     YAML ``num_slots`` + ``initial_global_assignments``         folder of ``rank{r}.safetensors`` + ``meta_info.json``
npz                                                                    ``.npz`` with ``counts`` ``[T, L, E]`` / ``[L, E]``
=========  ==========================================================  ===============================================

The format is detected from the content where that is unambiguous (JSON keys, what a ``.pt`` holds, the suffix, a
statistics folder); otherwise pass ``format=``. Only the vllm-ascend JSON states the number of ranks (its devices),
and TensorRT-LLM YAML when it carries an ``ep_size`` key; for the others pass ``num_ranks``.

Every reader raises :class:`~eplb.FormatError` (or another :class:`~eplb.EplbError`) naming the file, layer, device
and value; :func:`map_problems` lists every problem of a map file instead of stopping at the first.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import numpy as np

from eplb.errors import EplbError, FormatError
from eplb.formats._common import RawMap, load_json, torch_load
from eplb.load import as_load
from eplb.placement import Placement, shared_rank_experts
from eplb.topology import Topology

__all__ = [
    "FORMATS",
    "MAP_FORMATS",
    "LOAD_FORMATS",
    "detect_format",
    "detect_kind",
    "read_map",
    "write_map",
    "map_problems",
    "read_load",
    "write_load",
]

logger = logging.getLogger(__name__)

FORMATS = ("ascend", "sglang", "vllm", "trtllm", "npz")
MAP_FORMATS = ("ascend", "sglang", "vllm", "trtllm")
LOAD_FORMATS = ("sglang", "trtllm", "npz")

_MAX_REPORTED = 20
_SGLANG_KEYS = ("physical_to_logical_map", "logical_count")
_ASCEND_KEYS = ("moe_layer_count", "layer_list")


def _module(name: str):
    return importlib.import_module(f"eplb.formats.{name}")


def _check_name(format: str, allowed: tuple[str, ...], what: str) -> str:
    if format not in allowed:
        raise FormatError(f"unknown {what} format {format!r}; expected one of {', '.join(allowed)}")
    return format


def detect_format(path) -> str:
    """The format of ``path``, told by its content: one of :data:`FORMATS`.

    - a folder holding ``meta_info.json`` or ``rank*.safetensors``: ``trtllm`` (statistics);
    - ``.npz``: ``npz``; ``.npy``: ``vllm``; ``.yaml`` / ``.yml``: ``trtllm``;
    - ``.json``: ``ascend`` with ``layer_list`` / ``moe_layer_count``, ``sglang`` with ``physical_to_logical_map`` /
      ``logical_count``;
    - ``.pt`` / ``.pth``: ``sglang`` for a dict with those keys, ``vllm`` for a bare tensor.

    Raises:
        FormatError: the file is missing or its format cannot be told (pass ``format=`` / ``--format``).
    """
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "meta_info.json").exists() or any(path.glob("rank*.safetensors")):
            return "trtllm"
        raise FormatError(f"{path}: a folder, but not TensorRT-LLM statistics (no meta_info.json or "
                          "rank*.safetensors in it)")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return "npz"
    if suffix == ".npy":
        return "vllm"
    if suffix in (".yaml", ".yml"):
        return "trtllm"
    if suffix == ".json":
        data = load_json(path)
        return _format_of_object(path, data, "JSON")
    if suffix in (".pt", ".pth"):
        data = torch_load(path)
        if hasattr(data, "shape"):
            return "vllm"
        return _format_of_object(path, data, ".pt")
    raise FormatError(f"{path}: cannot tell the format from the suffix {suffix or '(none)'!r}; "
                      f"pass --format (one of {', '.join(FORMATS)})")


def _format_of_object(path: Path, data, what: str) -> str:
    if isinstance(data, dict):
        if any(k in data for k in _ASCEND_KEYS):
            return "ascend"
        if any(k in data for k in _SGLANG_KEYS):
            return "sglang"
        keys = ", ".join(repr(k) for k in list(data)[:8]) or "none"
        raise FormatError(f"{path}: {what} object with keys {keys}: expected vllm-ascend ({', '.join(_ASCEND_KEYS)}) "
                          f"or SGLang ({', '.join(_SGLANG_KEYS)}) keys; pass --format if it is another format")
    raise FormatError(f"{path}: {what} holds a {type(data).__name__}, expected an object with vllm-ascend "
                      f"({', '.join(_ASCEND_KEYS)}) or SGLang ({', '.join(_SGLANG_KEYS)}) keys")


def detect_kind(path, format: str | None = None) -> str:
    """``"map"`` when ``path`` holds an expert map, ``"load"`` when it holds an expert load.

    SGLang files hold either (``physical_to_logical_map`` or ``logical_count``); TensorRT-LLM YAML is a map and a
    statistics folder a load; ``npz`` is always a load, ``ascend`` and ``vllm`` always a map.
    """
    format = _check_name(format or detect_format(path), FORMATS, "file")
    if format == "npz":
        return "load"
    if format == "trtllm":
        return "load" if Path(path).is_dir() else "map"
    if format == "sglang":
        return _module("sglang").kind(path)
    return "map"


def _positive(name: str, value):
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
        raise FormatError(f"{name} must be a positive integer, got {value!r}")
    return None if value is None else int(value)


def _parse(path, format: str | None) -> tuple[str, RawMap]:
    format = _check_name(format or detect_format(path), FORMATS, "file")
    if format not in MAP_FORMATS:
        raise FormatError(f"{path}: {format} files hold expert loads, not expert maps "
                          f"(expert-map formats: {', '.join(MAP_FORMATS)})")
    return format, _module(format).parse_map(Path(path))


def _cap(lines: list[str], what: str) -> list[str]:
    if len(lines) > _MAX_REPORTED:
        return lines[:_MAX_REPORTED] + [f"... and {len(lines) - _MAX_REPORTED} more {what}"]
    return lines


def _content_problems(raw: RawMap, num_experts: int, topology: Topology) -> tuple[list[str], list[str]]:
    """Ids out of range, experts without a replica, experts twice on one device, named by the file's layer ids."""
    phy2log = raw.phy2log
    layer_ids = raw.layer_ids if raw.layer_ids is not None else np.arange(phy2log.shape[0])
    slots = topology.slots_per_rank
    bad = np.argwhere((phy2log < 0) | (phy2log >= num_experts))
    problems = _cap([f"layer {layer_ids[l]}, device {p // slots}, slot {p % slots}: expert id {phy2log[l, p]} is "
                     f"out of range [0, {num_experts})" for l, p in bad], "out-of-range ids")
    inside = np.where((phy2log >= 0) & (phy2log < num_experts), phy2log, num_experts)
    present = np.zeros((phy2log.shape[0], num_experts + 1), dtype=bool)
    present[np.arange(phy2log.shape[0])[:, None], inside] = True
    problems += _cap([f"layer {layer_ids[l]}: expert {e} has no replica"
                      for l, e in np.argwhere(~present[:, :num_experts])], "experts without a replica")
    shared = _cap([f"layer {layer_ids[l]}, device {r}: expert {e} is placed more than once on the same device"
                   for l, r, e in shared_rank_experts(phy2log, topology)], "duplicates")
    return (problems, shared) if raw.allow_shared_rank else (problems + shared, [])


def _check(raw: RawMap, num_experts: int | None, num_ranks: int | None):
    """Problems, warnings, and the (experts, ranks) of the map once checked against the caller's numbers."""
    problems, warnings = list(raw.problems), list(raw.warnings)
    phy2log = raw.phy2log
    if phy2log is None:
        return problems, warnings, None, None
    num_layers, num_slots = phy2log.shape
    if num_layers == 0 and problems:  # no layer was well-formed: the problems say why
        return problems, warnings, None, None
    if num_slots == 0 or num_layers == 0:
        return problems + [f"the map is empty: {num_layers} layers x {num_slots} slots"], warnings, None, None
    ranks = raw.num_ranks
    if num_ranks is not None and ranks is not None and num_ranks != ranks:
        problems.append(f"the file has {ranks} devices (ranks) but --ranks says {num_ranks}")
    ranks = ranks or num_ranks
    if ranks is None:
        problems.append(f"the file does not say how many ranks share its {num_slots} slots; pass --ranks")
    elif num_slots % ranks:
        problems.append(f"{num_slots} slots per layer cannot be split evenly over {ranks} ranks "
                        f"({num_slots} % {ranks} = {num_slots % ranks})")
        ranks = None
    experts = num_experts if num_experts is not None else _infer_experts(phy2log)
    if raw.shared_ids:
        mix = (f"the last slot of every device holds ids {raw.shared_ids} (above every other id): vllm-ascend's mix "
               "placement (mix_placement=true) puts its shared experts there")
        if num_experts is not None and min(raw.shared_ids) >= num_experts:
            problems.append(f"{mix}, and they are not routed experts (--experts {num_experts}); eplb balances routed "
                            "experts only, so plan and serve with mix placement off")
        else:
            warnings.append(f"{mix}; if this is such a map, pass --experts with the routed experts' count (read as "
                            f"{experts} experts)")
    if experts < 1:
        return problems + ["the map holds no expert ids >= 0"], warnings, None, ranks
    if experts > num_slots:
        problems.append(f"{experts} experts do not fit in {num_slots} slots per layer; every expert needs a slot")
    if ranks is None or num_layers == 0:
        return problems, warnings, experts, ranks
    content, shared = _content_problems(raw, experts, Topology(ranks, num_slots // ranks))
    if content and num_experts is None:
        content.append(f"the number of experts was taken as {experts} (the most common count of distinct ids per "
                       "layer); pass --experts to set it")
    return problems + content, warnings + shared, experts, ranks


def _infer_experts(phy2log: np.ndarray) -> int:
    """E of a map file that does not state it: the most common number of distinct ids >= 0 per layer (ties: the
    larger). For a valid map that is the largest id + 1; one stray id does not shift it."""
    counts = [len(np.unique(row[row >= 0])) for row in phy2log]
    values, freq = np.unique(counts, return_counts=True)
    return int(values[freq == freq.max()].max())


def map_problems(path, format: str | None = None, num_experts: int | None = None,
                 num_ranks: int | None = None) -> tuple[list[str], list[str]]:
    """Every problem of the expert-map file ``path`` (for ``eplb validate``), reading as far as possible.

    Args:
        path: the map file.
        format: one of :data:`MAP_FORMATS`, or ``None`` to detect it.
        num_experts: E the map must hold (ids ``0..E-1``, each at least once); default: the largest id + 1.
        num_ranks: W the map must be spread over; required when the file does not state it.

    Returns:
        ``(problems, warnings)``: readable lines naming layer, device and value; ``problems`` empty means valid.
    """
    num_experts, num_ranks = _positive("num_experts", num_experts), _positive("num_ranks", num_ranks)
    try:
        _, raw = _parse(path, format)
    except EplbError as exc:
        return [str(exc)], []
    problems, warnings, _, _ = _check(raw, num_experts, num_ranks)
    return problems, warnings


def read_map(path, format: str | None = None, num_experts: int | None = None, num_ranks: int | None = None,
             num_nodes: int = 1, num_groups: int = 1) -> Placement:
    """Read an expert-map file into a :class:`~eplb.Placement`.

    Args:
        path: the map file (see the module docstring for the formats).
        format: one of :data:`MAP_FORMATS`, or ``None`` to detect it from the content.
        num_experts: E; default: the largest expert id + 1. When given, the map must hold exactly ids ``0..E-1``.
        num_ranks: W; required for formats that do not state it (SGLang, vLLM, TensorRT-LLM without ``ep_size``);
            when both are known they must agree.
        num_nodes, num_groups: copied into the placement's :class:`~eplb.Topology`.

    Raises:
        FormatError: the file cannot be read, or the map is invalid (the message lists the problems);
        shared ranks are an error for vllm-ascend maps and a logged warning for the others.
    """
    num_experts, num_ranks = _positive("num_experts", num_experts), _positive("num_ranks", num_ranks)
    format, raw = _parse(path, format)
    problems, warnings, experts, ranks = _check(raw, num_experts, num_ranks)
    if problems:
        raise FormatError(f"{path}: not a valid {format} expert map:\n  " + "\n  ".join(problems))
    for line in warnings:
        logger.warning("%s: %s", path, line)
    topology = Topology(ranks, raw.phy2log.shape[1] // ranks, num_nodes, num_groups)
    return Placement(raw.phy2log, experts, topology)


def write_map(placement: Placement, path, format: str) -> None:
    """Write ``placement`` to ``path`` in ``format`` (one of :data:`MAP_FORMATS`), atomically.

    Raises:
        FormatError: unknown format, or the placement does not fit the format (e.g. a vllm-ascend map whose rank
        holds an expert twice).
    """
    if not isinstance(placement, Placement):
        raise FormatError(f"write_map needs a Placement, got {type(placement).__name__}")
    _module(_check_name(format, MAP_FORMATS, "expert-map")).write_map(placement, Path(path))


def read_load(path, format: str | None = None) -> np.ndarray:
    """Read an expert load: ``[L, E]`` or ``[T, L, E]`` numbers, validated (finite, >= 0).

    Args:
        path: ``.npz`` (``counts``), SGLang JSON / ``.pt`` (``logical_count``), TensorRT-LLM statistics folder.
        format: one of :data:`LOAD_FORMATS`, or ``None`` to detect it.

    Raises:
        FormatError / LoadError: unreadable file, missing key, wrong shape, negative or NaN loads.
    """
    format = _check_name(format or detect_format(path), FORMATS, "file")
    if format not in LOAD_FORMATS:
        raise FormatError(f"{path}: a {format} expert map, not an expert load (expert-load files: .npz counts, "
                          "SGLang logical_count, TensorRT-LLM statistics folder)")
    load = as_load(_module(format).read_load(Path(path)), field=str(path))
    if 0 in load.shape:
        axes = ("steps", "layers", "experts")[3 - load.ndim:]
        raise FormatError(f"{path}: the expert load is empty: shape {list(load.shape)} ({', '.join(axes)}); it needs "
                          "at least one of each")
    return load


def write_load(load, path, format: str = "npz") -> None:
    """Write an expert load ``[L, E]`` or ``[T, L, E]`` to ``path`` in ``format`` (one of :data:`LOAD_FORMATS`),
    atomically. ``trtllm`` writes a statistics folder (see :mod:`eplb.formats.trtllm`)."""
    format = _check_name(format, LOAD_FORMATS, "expert-load")
    _module(format).write_load(as_load(load), Path(path))
