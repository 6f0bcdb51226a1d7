"""Expert-load traces as ``.npz``: key ``counts``, ``[T, L, E]`` (per step) or ``[L, E]`` (one window).

Other keys are ignored on reading. ``tests/data/sglang_dsv3_ep_statistics.npz`` reads as ``[12, 58, 256]``; its
axis 0 is a serving workload, not time, so per-step figures on it are per-workload figures.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from eplb.errors import FormatError
from eplb.formats._common import atomic_path, numpy_load

__all__ = ["read_load", "write_load", "read_arrays", "write_arrays"]

KEY = "counts"


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` archive that holds ``counts`` (the trace files of :mod:`eplb.sim.traces` too).

    Raises:
        FormatError: unreadable file, not an archive, or no ``counts`` key.
    """
    with numpy_load(path, archive=True) as data:
        if KEY not in data.files:
            raise FormatError(f"{path}: missing key {KEY!r} (found {', '.join(data.files) or 'none'}); an expert "
                              f"load .npz holds {KEY!r} [steps, layers, experts] or [layers, experts]")
        try:
            return {name: data[name] for name in data.files}
        except ValueError as exc:
            raise FormatError(f"{path}: an array " + ("holds Python objects rather than numbers" if "pickle" in str(exc)
                                                      else f"is not readable: {exc}")) from None
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise FormatError(f"{path}: an array is not readable (truncated or damaged): {exc}") from None


def write_arrays(path: Path, flag: str | None = None, **arrays) -> None:
    """Write ``arrays`` (``counts`` among them) as a compressed ``.npz``, atomically (``flag`` names the option in
    errors)."""
    with atomic_path(path, flag) as tmp:
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
