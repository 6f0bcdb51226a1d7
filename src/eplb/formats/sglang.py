"""SGLang: the ``--init-expert-location`` file and the expert-distribution recorder's dump.

Both are a JSON object (``.json``) or a dict saved with ``torch.save`` (``.pt``), holding one of:

- ``physical_to_logical_map``: ``[L][P]`` logical expert of each physical slot (an expert map). SGLang puts slot
  ``p`` on rank ``p // (P / W)`` but does not store ``W`` (it is the server's EP size): pass ``num_ranks``.
- ``logical_count``: ``[L][E]`` or ``[T][L][E]`` tokens per logical expert (an expert load); the recorder's stat dump
  (``.pt`` with ``logical_count`` and other keys, which are ignored) reads the same way.

Written files hold just that key: ``.pt`` (tensors, needs torch) when the path ends in ``.pt`` / ``.pth``, else JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from eplb._arrays import to_int_array, to_numpy
from eplb.errors import FormatError
from eplb.formats._common import RawMap, atomic_path, import_torch, load_json, to_plain, torch_load
from eplb.placement import Placement

__all__ = ["kind", "parse_map", "write_map", "read_load", "write_load"]

MAP_KEY = "physical_to_logical_map"
LOAD_KEY = "logical_count"


def _is_torch(path: Path) -> bool:
    return path.suffix.lower() in (".pt", ".pth")


def _read(path: Path) -> dict:
    data = to_plain(torch_load(path)) if _is_torch(path) else load_json(path)
    if not isinstance(data, dict):
        raise FormatError(f"{path}: holds a {type(data).__name__}, expected an object with key {MAP_KEY!r} "
                          f"(expert map) or {LOAD_KEY!r} (expert load)")
    return data


def kind(path: Path) -> str:
    """``"map"`` for a ``physical_to_logical_map`` file, ``"load"`` for a ``logical_count`` file."""
    data = _read(Path(path))
    return "map" if MAP_KEY in data else "load" if LOAD_KEY in data else _missing(path, data, MAP_KEY)


def _missing(path: Path, data: dict, key: str):
    keys = ", ".join(repr(k) for k in list(data)[:8]) or "none"
    raise FormatError(f"{path}: missing key {key!r} (found {keys})")


def parse_map(path: Path) -> RawMap:
    """Read ``physical_to_logical_map`` ``[L, P]``; the number of ranks is not in the file.

    Raises:
        FormatError: not JSON / not a torch file, missing key, ragged or non-integer rows.
    """
    data = _read(path)
    if MAP_KEY not in data:
        if LOAD_KEY in data:
            raise FormatError(f"{path}: holds an expert load ({LOAD_KEY!r}), not an expert map "
                              f"({MAP_KEY!r}); use it as LOAD")
        _missing(path, data, MAP_KEY)
    value = data[MAP_KEY]
    if isinstance(value, list) and value and all(isinstance(row, list) for row in value):
        width = len(value[0])
        ragged = [f"layer {l}: {len(row)} slots, but layer 0 has {width}; {MAP_KEY} rows must all have the same "
                  "length" for l, row in enumerate(value) if len(row) != width]
        if ragged:
            good = [l for l, row in enumerate(value) if len(row) == width]
            rows = to_int_array([value[l] for l in good], f"{path}: {MAP_KEY}", FormatError)
            return RawMap(rows.reshape(len(good), width), layer_ids=np.array(good), problems=ragged)
    phy2log = to_int_array(value, f"{path}: {MAP_KEY}", FormatError)
    if phy2log.ndim != 2:
        raise FormatError(f"{path}: {MAP_KEY} must be [layers, slots], got shape {phy2log.shape}")
    return RawMap(phy2log)


def write_map(placement: Placement, path: Path) -> None:
    """Write ``{"physical_to_logical_map": [L, P]}`` as ``.pt`` or JSON (by suffix), atomically."""
    _write(path, MAP_KEY, placement.phy2log)


def read_load(path: Path) -> np.ndarray:
    """``logical_count`` as an array ``[L, E]`` or ``[T, L, E]`` (validated by the caller).

    Raises:
        FormatError: unreadable file, missing key, ragged rows.
    """
    data = _read(path)
    if LOAD_KEY not in data:
        if MAP_KEY in data:
            raise FormatError(f"{path}: holds an expert map ({MAP_KEY!r}), not an expert load ({LOAD_KEY!r})")
        _missing(path, data, LOAD_KEY)
    return to_numpy(data[LOAD_KEY], f"{path}: {LOAD_KEY}", FormatError)


def write_load(load: np.ndarray, path: Path) -> None:
    """Write ``{"logical_count": load}`` as ``.pt`` or JSON (by suffix), atomically."""
    _write(path, LOAD_KEY, load)


def _write(path: Path, key: str, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        if _is_torch(path):
            torch = import_torch(path)
            torch.save({key: torch.from_numpy(np.array(array))}, tmp)
        else:
            tmp.write_text(json.dumps({key: np.asarray(array).tolist()}) + "\n")
