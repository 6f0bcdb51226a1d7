"""Expert-load traces as ``.npz``: key ``counts``, ``[T, L, E]`` (per step) or ``[L, E]`` (one window).

Other keys are ignored on reading. ``../shared/data/sglang_dsv3_ep_statistics.npz`` reads as ``[12, 58, 256]``; its
axis 0 is a serving workload, not time, so per-step figures on it are per-workload figures.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from eplb.errors import FormatError
from eplb.formats._common import atomic_path

__all__ = ["read_load", "write_load", "read_arrays", "write_arrays"]

KEY = "counts"


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` archive that holds ``counts`` (the trace files of :mod:`eplb.sim.traces` too).

    Raises:
        FormatError: unreadable file, not an archive, or no ``counts`` key.
    """
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{path}: not a readable .npz file: {exc}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise FormatError(f"{path}: a single array, not an .npz archive with key {KEY!r}")
    with data:
        if KEY not in data.files:
            raise FormatError(f"{path}: missing key {KEY!r} (found {', '.join(data.files) or 'none'})")
        try:
            return {name: data[name] for name in data.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise FormatError(f"{path}: not a readable .npz file: {exc}") from None


def write_arrays(path: Path, **arrays) -> None:
    """Write ``arrays`` (``counts`` among them) as a compressed ``.npz``, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def read_load(path: Path) -> np.ndarray:
    """``counts`` as stored (validated by the caller).

    Raises:
        FormatError: unreadable file or no ``counts`` key.
    """
    return read_arrays(path)[KEY]


def write_load(load: np.ndarray, path: Path) -> None:
    """Write ``load`` as ``counts`` in a compressed ``.npz``, atomically."""
    write_arrays(path, **{KEY: load})
