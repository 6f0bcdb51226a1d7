"""Turning user input (lists, numpy arrays, torch tensors) into numpy arrays with clear errors."""

from __future__ import annotations

import numpy as np

from eplb.errors import EplbError


def to_numpy(value, field: str, error: type[EplbError] = EplbError) -> np.ndarray:
    """``value`` as a numpy array; torch tensors are detached and copied to host without importing torch."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise error(f"{field} is not a rectangular array: {exc}") from None
    if arr.dtype == object:
        raise error(f"{field} is not a rectangular array of numbers (ragged rows or non-numeric values)")
    return arr


def to_int_array(value, field: str, error: type[EplbError] = EplbError) -> np.ndarray:
    """``value`` as an int64 array; floats are accepted only when they hold whole numbers."""
    arr = to_numpy(value, field, error)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "b":
        raise error(f"{field} must hold integer expert ids, got booleans")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            bad = np.argwhere(~np.isfinite(arr) | (arr != np.round(arr)))[0]
            raise error(f"{field} must hold integers, got {arr[tuple(bad)].item()!r} at index "
                        f"{tuple(int(i) for i in bad)}")
        return arr.astype(np.int64)
    raise error(f"{field} must hold integers, got dtype {arr.dtype}")


def like_input(result: np.ndarray, original):
    """``result`` as a torch tensor on ``original``'s device when ``original`` is a tensor, else unchanged."""
    if hasattr(original, "detach") and hasattr(original, "device"):
        import torch

        return torch.from_numpy(np.ascontiguousarray(result)).to(original.device)
    return result
