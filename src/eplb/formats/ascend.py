"""vllm-ascend expert-map JSON (the file behind ``expert_map_path`` / ``expert_map_record_path``).

Layout::

    {"moe_layer_count": L,
     "layer_list": [{"layer_id": l, "device_count": W,
                     "device_list": [{"device_id": r, "device_expert": [e0, e1, ...]}, ...]}, ...]}

``device_expert`` lists the logical expert in each local slot of device (rank) ``r``; physical slot ``p = r * K + k``.
Every device holds the same number of slots ``K``; devices are ordered by ``device_id``, layers as listed. vllm-ascend
forbids one device holding an expert twice, so that is an error here (a warning in the other formats).
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


def _layer_rows(index: int, layer, problems: list[str]) -> list[list[int]] | None:
    """The device_expert lists of one layer ordered by device_id, or None (with problems added) when unusable."""
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
    rows: dict[int, list[int]] = {}
    ok = True
    for position, device in enumerate(devices):
        if not isinstance(device, dict) or not isinstance(device.get("device_expert"), list):
            problems.append(f"layer {index}, device {position}: missing key 'device_expert' (a list of expert ids)")
            ok = False
            continue
        device_id = device.get("device_id", position)
        if not _is_int(device_id) or not 0 <= device_id < len(devices) or device_id in rows:
            problems.append(f"layer {index}, device {position}: device_id {device_id!r} is not a new id in "
                            f"[0, {len(devices)})")
            ok = False
            continue
        experts = device["device_expert"]
        bad = [e for e in experts if not _is_int(e) or abs(e) > 2**62]
        if bad:
            problems.append(f"layer {index}, device {device_id}: device_expert holds {bad[0]!r}, expected integer "
                            "expert ids")
            ok = False
            continue
        rows[device_id] = experts
    return [rows[d] for d in range(len(devices))] if ok else None


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
    tables = [_layer_rows(i, layer, problems) for i, layer in enumerate(layers)]
    usable = [(i, t) for i, t in enumerate(tables) if t is not None]
    if not usable:
        return RawMap(None, problems=problems or ["layer_list is empty"], allow_shared_rank=False)
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
    return RawMap(phy2log, layer_ids=np.array([i for i, _ in good]), num_ranks=num_devices, problems=problems,
                  allow_shared_rank=False)


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
