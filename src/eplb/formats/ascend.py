"""vllm-ascend expert-map JSON (the file behind ``expert_map_path`` / ``expert_map_record_path``).

Layout::

    {"moe_layer_count": L,
     "layer_list": [{"layer_id": l, "device_count": W,
                     "device_list": [{"device_id": r, "device_expert": [e0, e1, ...]}, ...]}, ...]}

``device_expert`` lists the logical expert in each local slot of a device (rank); physical slot ``p = r * K + k``.
Every device holds the same number of slots ``K``. As vllm-ascend does, layers and devices are read by their position
in ``layer_list`` and ``device_list``; ``layer_id`` and ``device_id`` are written (equal to the position) but not
relied on when reading (a ``device_id`` that differs from its position is reported as a warning). vllm-ascend forbids
one device holding an expert twice, so that is an error here (a warning in the other formats).

vllm-ascend's mix placement puts the shared experts in the map too, as ids ``E..E+S-1`` in the last slot of every
device; eplb does not balance shared experts, and such a map is reported as a problem naming mix placement.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from eplb.formats._common import RawMap, atomic_path, load_json
from eplb.errors import FormatError
from eplb.placement import Placement, shared_rank_experts

__all__ = ["parse_map", "write_map"]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_rows(index: int, layer, problems: list[str], warnings: list[str]) -> list[list[int]] | None:
    """The device_expert lists of one layer in device_list order, or None (with problems added) when unusable."""
    if not isinstance(layer, dict) or not isinstance(layer.get("device_list"), list):
        problems.append(f"layer {index}: missing key 'device_list' (a list of devices)")
        return None
    devices = layer["device_list"]
    if not devices:
        problems.append(f"layer {index}: device_list is empty")
        return None
    count = layer.get("device_count")
    if count is not None and count != len(devices):
        problems.append(f"layer {index}: device_count is {count!r} but device_list has {len(devices)} devices")
    rows: list[list[int]] = []
    for position, device in enumerate(devices):
        if not isinstance(device, dict) or not isinstance(device.get("device_expert"), list):
            problems.append(f"layer {index}, device {position}: missing key 'device_expert' (a list of expert ids)")
            continue
        device_id = device.get("device_id", position)
        if device_id != position:
            warnings.append(f"layer {index}, device {position}: device_id is {device_id!r}; devices are read by "
                            "their position in device_list (as vllm-ascend reads them)")
        experts = device["device_expert"]
        bad = [e for e in experts if not _is_int(e) or abs(e) > 2**62]
        if bad:
            problems.append(f"layer {index}, device {position}: device_expert holds {bad[0]!r}, expected integer "
                            "expert ids")
            continue
        rows.append(experts)
    return rows if len(rows) == len(devices) else None


def _mix_placement(phy2log: np.ndarray, num_devices: int) -> list[int] | None:
    """The ids that look like vllm-ascend's mix placement's shared experts: in every layer the last slot of every
    device holds an id above every other slot's; else None."""
    if num_devices < 2 or not phy2log.size:
        return None
    table = phy2log.reshape(phy2log.shape[0], num_devices, -1)
    if table.shape[2] < 2 or not np.all(table[:, :, -1].min(axis=1) > table[:, :, :-1].max(axis=(1, 2))):
        return None
    return np.unique(table[:, :, -1]).tolist()


def parse_map(path: Path) -> RawMap:
    """Read ``path`` as far as possible: :class:`RawMap` with ``phy2log`` ``[L, W*K]`` and ``num_ranks = W``.

    Raises:
        FormatError: not JSON, or no ``layer_list``.
    """
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("layer_list"), list):
        raise FormatError(f"{path}: missing key 'layer_list' (a list of layers); not a vllm-ascend expert map")
    layers = data["layer_list"]
    problems: list[str] = []
    count = data.get("moe_layer_count")
    if count is None:
        problems.append("missing key 'moe_layer_count'")
    elif count != len(layers):
        problems.append(f"moe_layer_count is {count!r} but layer_list has {len(layers)} layers")
    warnings: list[str] = []
    tables = [_layer_rows(i, layer, problems, warnings) for i, layer in enumerate(layers)]
    usable = [(i, t) for i, t in enumerate(tables) if t is not None]
    if not usable:
        return RawMap(None, problems=problems or ["layer_list is empty"], warnings=warnings, allow_shared_rank=False)
    first, table0 = usable[0]
    num_devices, num_slots = len(table0), len(table0[0])
    good = []
    for index, table in usable:
        if len(table) != num_devices:
            problems.append(f"layer {index}: {len(table)} devices, but layer {first} has {num_devices}")
            continue
        ragged = [f"layer {index}, device {device}: {len(row)} experts (slots), but layer {first}, device 0 "
                  f"has {num_slots}; every device must hold the same number of slots"
                  for device, row in enumerate(table) if len(row) != num_slots]
        problems += ragged
        if not ragged:
            good.append((index, [e for row in table for e in row]))
    phy2log = np.array([row for _, row in good], dtype=np.int64).reshape(len(good), num_devices * num_slots)
    shared = _mix_placement(phy2log, num_devices) if len(good) == len(layers) else None
    return RawMap(phy2log, layer_ids=np.array([i for i, _ in good]), num_ranks=num_devices, problems=problems,
                  warnings=warnings[:8] + ([f"... and {len(warnings) - 8} more device_id warnings"]
                                           if len(warnings) > 8 else []), allow_shared_rank=False, shared_ids=shared)


def write_map(placement: Placement, path: Path) -> None:
    """Write ``placement`` as vllm-ascend expert-map JSON, atomically.

    Raises:
        FormatError: a rank holds an expert twice (vllm-ascend cannot load that).
    """
    shared = shared_rank_experts(placement.phy2log, placement.topology)
    if len(shared):
        layer, rank, expert = shared[0]
        raise FormatError(f"{path}: vllm-ascend maps cannot hold an expert twice on one device, but layer {layer}, "
                          f"device {rank} holds expert {expert} more than once ({len(shared)} such cases)")
    table = placement.rank_table
    data = {
        "moe_layer_count": int(placement.num_layers),
        "layer_list": [
            {
                "layer_id": layer,
                "device_count": int(table.shape[1]),
                "device_list": [{"device_id": rank, "device_expert": table[layer, rank].tolist()}
                                for rank in range(table.shape[1])],
            }
            for layer in range(placement.num_layers)
        ],
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
