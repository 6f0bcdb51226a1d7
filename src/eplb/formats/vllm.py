"""vLLM: the ``phy2log`` table (``physical_to_logical_map``) as ``.npy`` or ``.pt``.

The file holds one integer array ``[L, P]``: the logical expert in each physical slot of each MoE layer; slot ``p``
lives on rank ``p // (P / W)``. ``W`` (the EP size) is not in the file: pass ``num_ranks``. A ``.pt`` file holds a
bare tensor (``torch.save(phy2log, path)``) and needs torch; ``.npy`` needs only numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eplb._arrays import to_int_array
from eplb.errors import FormatError
from eplb.formats._common import RawMap, atomic_path, import_torch, numpy_load, torch_load
from eplb.placement import Placement

__all__ = ["parse_map", "write_map"]


def _is_torch(path: Path) -> bool:
    return path.suffix.lower() in (".pt", ".pth")


def parse_map(path: Path) -> RawMap:
    """Read ``phy2log`` ``[L, P]``; the number of ranks is not in the file.

    Raises:
        FormatError: unreadable file, not an integer 2-D array.
    """
    if _is_torch(path):
        data = torch_load(path)
    else:
        data = numpy_load(path, archive=False)
    if not hasattr(data, "shape"):
        raise FormatError(f"{path}: holds a {type(data).__name__}, expected a phy2log array [layers, slots]")
    phy2log = to_int_array(data, f"{path}: phy2log", FormatError)
    if phy2log.ndim != 2:
        raise FormatError(f"{path}: phy2log must be [layers, slots], got shape {tuple(phy2log.shape)}")
    return RawMap(phy2log)


def write_map(placement: Placement, path: Path) -> None:
    """Write ``placement.phy2log`` (int64 ``[L, P]``) as ``.pt`` (by suffix) or ``.npy``, atomically."""
    with atomic_path(path) as tmp:
        if _is_torch(path):
            torch = import_torch(path)
            torch.save(torch.from_numpy(np.array(placement.phy2log)), tmp)
        else:
            with open(tmp, "wb") as f:
                np.save(f, placement.phy2log)
