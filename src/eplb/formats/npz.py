"""Expert-load traces as ``.npz``: key ``counts``, ``[T, L, E]`` (per step) or ``[L, E]`` (one window).

Other keys are ignored on reading. ``../shared/data/sglang_dsv3_ep_statistics.npz`` reads as ``[12, 58, 256]``; its
axis 0 is a serving workload, not time, so per-step figures on it are per-workload figures.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from eplb.errors import FormatError
from eplb.formats._common import atomic_path, numpy_load

__all__ = ["read_load", "write_load"]

KEY = "counts"


def read_load(path: Path) -> np.ndarray:
    """``counts`` as stored (validated by the caller).

    Raises:
        FormatError: unreadable file or no ``counts`` key.
    """
    with numpy_load(path, archive=True) as data:
        if KEY not in data.files:
            raise FormatError(f"{path}: missing key {KEY!r} (found {', '.join(data.files) or 'none'}); an expert "
                              f"load .npz holds {KEY!r} [steps, layers, experts] or [layers, experts]")
        try:
            return data[KEY]
        except ValueError as exc:
            raise FormatError(f"{path}: {KEY!r} " + ("holds Python objects rather than numbers" if "pickle" in str(exc)
                                                     else f"is not readable: {exc}")) from None
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise FormatError(f"{path}: {KEY!r} is not readable (truncated or damaged): {exc}") from None


def write_load(load: np.ndarray, path: Path) -> None:
    """Write ``load`` as ``counts`` in a compressed ``.npz``, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{KEY: load})
