"""Turning user input (lists, numpy arrays, torch tensors, numbers, flags) into checked values with clear errors."""

from __future__ import annotations

import operator

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


def to_int(value, field: str, error: type[EplbError] = EplbError, minimum: int | None = None) -> int:
    """``value`` as a Python int (numpy integers accepted; floats, strings and booleans refused), at least ``minimum``."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise error(f"{field} must be an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise error(f"{field} must be >= {minimum}, got {number}")
    return number


def to_bool(value, field: str, error: type[EplbError] = EplbError) -> bool:
    """``value`` as a bool; only ``True`` / ``False`` (numpy's too) are accepted, not ``"false"`` or ``1``."""
    if not isinstance(value, (bool, np.bool_)):
        raise error(f"{field} must be true or false, got {value!r}")
    return bool(value)


def like_input(result: np.ndarray, original):
    """``result`` as a torch tensor on ``original``'s device when ``original`` is a tensor, else unchanged."""
    if hasattr(original, "detach") and hasattr(original, "device"):
        import torch

        return torch.from_numpy(np.ascontiguousarray(result)).to(original.device)
    return result
