"""Expert-load arrays: validation and the window statistics policies plan on.

A load is tokens routed to each logical expert, either aggregated over a window ``[L, E]`` or per step
``[T, L, E]``. Counts are integers in practice; floats (decayed or averaged loads) are accepted.
"""

from __future__ import annotations

import numpy as np

from eplb._arrays import to_numpy
from eplb.errors import LoadError

__all__ = ["as_load", "window_sum", "episodes", "quiet_layers"]


def as_load(load, num_experts: int | None = None, num_layers: int | None = None, field: str = "load") -> np.ndarray:
    """Validate an expert load and return it as a numpy array (no copy when already numpy).

    Args:
        load: ``[L, E]`` or ``[T, L, E]`` numbers (numpy, list or torch).
        num_experts: expected E, if known.
        num_layers: expected L, if known.
        field: the name used in error messages (e.g. a file name).

    Raises:
        LoadError: wrong number of dimensions, shape mismatch, non-numeric, negative, NaN or infinite values.
    """
    arr = to_numpy(load, field, LoadError)
    if arr.dtype.kind not in "iuf":
        raise LoadError(f"{field} must hold numbers, got dtype {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise LoadError(f"{field} must be [layers, experts] or [steps, layers, experts], got shape {arr.shape}")
    if 0 in arr.shape[-2:]:
        axes = ("steps", "layers", "experts")[3 - arr.ndim:]
        raise LoadError(f"{field} is empty: shape {list(arr.shape)} ({', '.join(axes)}); it needs at least one layer "
                        f"and one expert")
    if num_experts is not None and arr.shape[-1] != num_experts:
        raise LoadError(f"{field} has {arr.shape[-1]} experts per layer, expected {num_experts}")
    if num_layers is not None and arr.shape[-2] != num_layers:
        raise LoadError(f"{field} has {arr.shape[-2]} layers, expected {num_layers}")
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            idx = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise LoadError(f"{field} holds {arr[idx]} at index {idx}; loads must be finite")
    if arr.dtype.kind != "u" and arr.size and arr.min() < 0:
        idx = tuple(int(i) for i in np.argwhere(arr < 0)[0])
        raise LoadError(f"{field} holds negative load {arr[idx]} at index {idx} "
                        f"({_describe_index(arr.ndim, idx)}); loads must be >= 0")
    return arr


def _describe_index(ndim: int, idx: tuple[int, ...]) -> str:
    names = ("step", "layer", "expert")[3 - ndim:]
    return ", ".join(f"{n} {i}" for n, i in zip(names, idx))


def window_sum(load: np.ndarray) -> np.ndarray:
    """float64 ``[L, E]``: a per-step load ``[T, L, E]`` summed over steps; ``[L, E]`` is returned as float64."""
    load = np.asarray(load)
    if load.ndim == 3:
        return load.sum(axis=0, dtype=np.float64)
    return load.astype(np.float64, copy=False)


def quiet_layers(window: np.ndarray, num_ranks: int) -> np.ndarray:
    """bool ``[L]``: layers of a window load ``[L, E]`` that carry too little load to plan on.

    A layer is quiet when it carries no load at all, or when its load is token counts (whole numbers) and it holds
    fewer tokens than there are ranks: some rank then serves nothing whatever the placement, so no placement can
    balance the layer and moving weights cannot pay off. A load in other units (fractions, a decayed average) is
    quiet only when it is zero, since its token count is unknown. Every policy keeps the placement in force for quiet
    layers (:meth:`eplb.policies.Policy.rebalance`).
    """
    window = np.asarray(window, dtype=np.float64)
    total = window.sum(axis=-1)
    counts = (window == np.floor(window)).all(axis=-1)
    return (total <= 0) | (counts & (total < num_ranks))


def episodes(load: np.ndarray, num_episodes: int) -> np.ndarray:
    """float64 ``[S, L, E]``: the last steps of ``[T, L, E]`` cut into ``S = min(num_episodes, T)`` consecutive blocks
    of equal length, each summed. Leading steps that do not fill a block are dropped (they are the oldest)."""
    load = np.asarray(load)
    if load.ndim != 3:
        raise LoadError(f"episodes need a per-step load [steps, layers, experts], got shape {load.shape}")
    steps = load.shape[0]
    count = max(1, min(num_episodes, steps))
    length = steps // count
    tail = load[steps - count * length:]
    return tail.reshape(count, length, *load.shape[1:]).sum(axis=1, dtype=np.float64)
