"""TensorRT-LLM: the MoE load-balancer YAML (an expert map) and the expert-statistics folder (an expert load).

Expert map, YAML (``MoeLoadBalancerConfig``)::

    num_slots: 288                      # P, slots in the whole EP group
    layer_updates_per_iter: 0
    initial_global_assignments:         # MoE layer -> logical expert of each global slot, P entries
      0: [0, 1, 2, ...]
      1: [...]

Global slot ``s`` lives on rank ``s // (num_slots / ep_size)``. TensorRT-LLM takes ``ep_size`` from the engine, not
from this file, so ranks come from ``num_ranks`` (``--ranks``); an ``ep_size`` key in the file is also honoured (the
two must agree). Written files carry no ``ep_size`` key (TensorRT-LLM rejects unknown keys) but the comment line
``# eplb: ep_size=W``, which eplb reads back, so a file eplb wrote needs no ``--ranks``.

Layers are the model's layer indices, as TensorRT-LLM keys both files (a MoE module's ``layer_idx``: DeepSeek-V3's MoE
layers are 3..60). Row ``l`` of an eplb array is layer ``l``: a layer with no statistics (a dense layer) reads as a
row of zeros, as SGLang's recorder writes it, and a layer missing from a map's keys reads as the initial layout
(``slot % E``), which TensorRT-LLM never asks for; written files use keys ``0..L-1``.

Expert statistics, a folder (what TensorRT-LLM's expert-statistic recorder dumps)::

    meta_info.json            {"num_experts": E, "num_experts_per_token": k}
    rank0.safetensors         key "{iter}_{layer}" -> [E] tokens that rank routed to each expert in that iteration
    rank1.safetensors         ...

The load is the sum over the rank files, read into ``[T, L, E]`` with iterations in ascending order and row ``l`` for
layer ``l``; every recorded layer must be present in every iteration. With a load balancer configured, TensorRT-LLM
counts per slot (``num_experts`` is then ``num_slots``): record without one. Written folders hold a single ``rank0.safetensors`` with the whole load (the
sum over ranks is all that is known) and ``meta_info.json`` with ``num_experts``; layers are keyed ``0..L-1`` and
iterations ``0..T-1`` (an ``[L, E]`` load is iteration 0).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import yaml

from eplb._files import new_file_mode
from eplb.errors import FormatError
from eplb.formats._common import RawMap, atomic_path, load_json, read_bytes
from eplb.placement import Placement

__all__ = ["parse_map", "write_map", "read_load", "write_load"]

_RANK_FILE = re.compile(r"rank(\d+)\.safetensors")
_KEY = re.compile(r"(\d+)_(\d+)")
_EP_SIZE_COMMENT = re.compile(rb"^# eplb: ep_size=(\d+)\s*$", re.MULTILINE)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_map(path: Path) -> RawMap:
    """Read ``initial_global_assignments`` into ``phy2log`` ``[L, num_slots]``; ``num_ranks`` from ``ep_size`` if set.

    Raises:
        FormatError: not YAML, not a mapping, no ``initial_global_assignments``.
    """
    try:
        text = read_bytes(Path(path))
        data = yaml.safe_load(text)  # bytes: YAML tells UTF-8 from UTF-16 itself
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise FormatError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise FormatError(f"{path}: not valid YAML: nested too deeply") from None
    if not isinstance(data, dict) or not isinstance(data.get("initial_global_assignments"), dict):
        raise FormatError(f"{path}: missing key 'initial_global_assignments' (layer -> list of experts per slot); "
                          "not a TensorRT-LLM load-balancer config")
    problems: list[str] = []
    assignments = data["initial_global_assignments"]
    num_slots = data.get("num_slots")
    if not _is_int(num_slots) or num_slots < 1:
        problems.append(f"num_slots is {num_slots!r}, expected a positive integer")
        num_slots = None
    ep_size = data.get("ep_size")
    if ep_size is None:  # a file eplb wrote says it in a comment, since TensorRT-LLM rejects unknown keys
        stated = _EP_SIZE_COMMENT.search(text)
        ep_size = int(stated.group(1)) if stated else None
    if ep_size is not None and (not _is_int(ep_size) or ep_size < 1):
        problems.append(f"ep_size is {ep_size!r}, expected a positive integer")
        ep_size = None
    layers = []
    for key, row in assignments.items():
        layer = int(key) if isinstance(key, str) and key.isdigit() else key
        if not _is_int(layer):
            problems.append(f"layer key {key!r} is not an integer layer index")
        elif not isinstance(row, list) or not all(_is_int(e) and abs(e) <= 2**62 for e in row):
            problems.append(f"layer {layer}: expected a list of integer expert ids, got {str(row)[:60]}")
        else:
            layers.append((layer, row))
    layers.sort()
    if not layers:
        return RawMap(None, num_ranks=ep_size, problems=problems or ["initial_global_assignments is empty"])
    width = num_slots or len(layers[0][1])
    problems += [f"layer {layer}: {len(row)} slots, but " +
                 (f"num_slots is {num_slots}" if num_slots else f"layer {layers[0][0]} has {width}")
                 for layer, row in layers if len(row) != width]
    good = [(layer, row) for layer, row in layers if len(row) == width]
    phy2log = np.array([row for _, row in good], dtype=np.int64).reshape(len(good), width)
    ids = np.array([layer for layer, _ in good])
    if problems or ids.min() < 0:
        return RawMap(phy2log, layer_ids=ids, num_ranks=ep_size, problems=problems)
    return _by_layer_id(phy2log, ids, ep_size)


def _by_layer_id(phy2log: np.ndarray, ids: np.ndarray, ep_size: int | None) -> RawMap:
    """Rows ``0..max(ids)``, row ``l`` for layer ``l``; a layer the file does not key gets the initial layout."""
    width = phy2log.shape[1]
    out = np.tile(np.arange(width, dtype=np.int64) % (int(phy2log.max(initial=-1)) + 1 or 1), (ids.max() + 1, 1))
    out[ids] = phy2log
    absent = np.setdiff1d(np.arange(ids.max() + 1), ids)
    warnings = [f"layers {', '.join(map(str, absent))} are not in initial_global_assignments (dense layers?): read "
                "as the initial layout; TensorRT-LLM never asks for them"] if absent.size else []
    return RawMap(out, num_ranks=ep_size, warnings=warnings)


def write_map(placement: Placement, path: Path) -> None:
    """Write ``placement`` as a TensorRT-LLM load-balancer YAML (keys ``0..L-1``: row ``l`` is layer ``l``), atomically."""
    t = placement.topology
    header = (f"# TensorRT-LLM MoE load balancer config written by eplb: {placement.num_layers} MoE layers, "
              f"{placement.num_experts} experts,\n# {t.num_ranks} ranks x {t.slots_per_rank} slots "
              f"(global slot s lives on rank s // {t.slots_per_rank}).\n# eplb: ep_size={t.num_ranks}\n")
    data = {
        "num_slots": int(placement.num_physical),
        "layer_updates_per_iter": 0,
        "initial_global_assignments": {layer: placement.phy2log[layer].tolist()
                                       for layer in range(placement.num_layers)},
    }
    body = yaml.safe_dump(data, default_flow_style=None, sort_keys=False, width=1 << 20)
    with atomic_path(path) as tmp:
        tmp.write_text(header + body)


def _rank_files(path: Path) -> list[Path]:
    files = [f for f in path.iterdir() if _RANK_FILE.fullmatch(f.name)]
    return sorted(files, key=lambda f: int(_RANK_FILE.fullmatch(f.name).group(1)))


def read_load(path: Path) -> np.ndarray:
    """The statistics folder ``path`` summed over ranks: ``[T, L, E]`` (int64, or float64 for float files).

    Raises:
        FormatError: not a folder, no ``meta_info.json`` or rank files, unreadable file, a key that is not
        ``"{iter}_{layer}"``, tensors of different lengths, a missing (iter, layer) pair.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_dir():
        raise FormatError(f"{path}: TensorRT-LLM statistics are a folder of rank*.safetensors and meta_info.json")
    if not (path / "meta_info.json").exists():
        raise FormatError(f"{path}: missing meta_info.json")
    meta = load_json(path / "meta_info.json")
    files = _rank_files(path)
    if not files:
        raise FormatError(f"{path}: no rank{{r}}.safetensors files")
    total: dict[tuple[int, int], np.ndarray] = {}
    num_experts = meta.get("num_experts") if isinstance(meta, dict) else None
    for file in files:
        try:
            tensors = load_file(file)
        except (SafetensorError, OSError, ValueError) as exc:
            raise FormatError(f"{file}: not a readable safetensors file: {exc}") from None
        for key, counts in tensors.items():
            match = _KEY.fullmatch(key)
            if not match:
                raise FormatError(f"{file}: key {key!r} is not '{{iter}}_{{layer}}'")
            if counts.ndim != 1 or (num_experts is not None and counts.shape[0] != num_experts):
                expected = f"[{num_experts}] (num_experts in meta_info.json)" if num_experts else "1-D [experts]"
                raise FormatError(f"{file}: key {key!r} has shape {list(counts.shape)}, expected {expected}")
            index = (int(match.group(1)), int(match.group(2)))
            total[index] = total[index] + counts if index in total else counts.copy()
    if not total:
        raise FormatError(f"{path}: the rank files hold no statistics")
    lengths = {c.shape[0] for c in total.values()}
    if len(lengths) > 1:
        raise FormatError(f"{path}: statistics have different numbers of experts: {sorted(lengths)}")
    iters = sorted({i for i, _ in total})
    layers = sorted({l for _, l in total})
    # row l is layer l (TensorRT-LLM's layer_idx, as its load-balancer config keys it); unrecorded layers stay 0
    out = np.zeros((len(iters), layers[-1] + 1, lengths.pop()), dtype=np.result_type(*total.values()))
    for t, it in enumerate(iters):
        for layer in layers:
            if (it, layer) not in total:
                raise FormatError(f"{path}: no statistics for iteration {it}, layer {layer} (key '{it}_{layer}'); "
                                  "every iteration must cover every recorded layer")
            out[t, layer] = total[(it, layer)]
    return out


def write_load(load: np.ndarray, path: Path) -> None:
    """Write ``load`` (``[L, E]`` or ``[T, L, E]``) as a statistics folder; the folder appears complete or not at all.

    Raises:
        FormatError: ``path`` exists and is not an empty folder.
    """
    from safetensors.numpy import save_file

    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise FormatError(f"{path}: already exists; TensorRT-LLM statistics are written to a new or empty folder")
    steps = load[None] if load.ndim == 2 else load
    dtype = np.float64 if steps.dtype.kind == "f" else np.int64
    tensors = {f"{t}_{l}": np.ascontiguousarray(steps[t, l], dtype=dtype)
               for t in range(steps.shape[0]) for l in range(steps.shape[1])}
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        os.chmod(tmp, new_file_mode(folder=True))  # mkdtemp makes it 0700
    except OSError as exc:
        raise FormatError(f"{path}: cannot create the statistics folder in {path.parent}: "
                          f"{exc.strerror or exc}") from None
    try:
        save_file(tensors, tmp / "rank0.safetensors")
        (tmp / "meta_info.json").write_text(json.dumps({"num_experts": int(steps.shape[2])}) + "\n")
        if path.exists():
            path.rmdir()
        tmp.rename(path)
    except OSError as exc:
        raise FormatError(f"{path}: cannot write the statistics folder: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
