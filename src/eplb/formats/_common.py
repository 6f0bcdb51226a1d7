"""Helpers shared by the format modules: atomic writes, JSON and torch loading, and the parsed form of a map file."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eplb.errors import FormatError

__all__ = ["RawMap", "atomic_path", "load_json", "import_torch", "torch_load", "to_plain"]


@dataclass
class RawMap:
    """A map file as read, before it is checked against ``--ranks`` / ``--experts``.

    Attributes:
        phy2log: int64 ``[L, P]`` of the well-formed layers, or ``None`` when no layer is.
        layer_ids: int ``[L]``, the layer number of each row of ``phy2log`` in the file (``None``: ``0..L-1``);
            rows are missing where a layer is broken (that is then in ``problems``).
        num_ranks: ranks (devices) the file itself states, or ``None`` when it does not say.
        problems: structural problems found while reading (each a readable line naming layer / device / value).
        warnings: things that are allowed but worth a look.
        allow_shared_rank: whether one rank may hold the same expert twice in this engine's format.
    """

    phy2log: np.ndarray | None
    layer_ids: np.ndarray | None = None
    num_ranks: int | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    allow_shared_rank: bool = True


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path`` (same suffix); on success it replaces ``path``, on error it is removed.

    Readers never see a half-written file.
    """
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise FormatError(f"{path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent or ".")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_json(path):
    """The parsed JSON of ``path``; :class:`FormatError` naming the file, line and column when it is not JSON."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None


def import_torch(path):
    """The ``torch`` module; :class:`FormatError` when it is not installed (``.pt`` files need it)."""
    try:
        import torch
    except ImportError:
        raise FormatError(f"{path}: .pt files need torch, which is not installed; "
                          "install it with pip install 'eplb[torch]' or use a .json / .npy / .npz file") from None
    return torch


def torch_load(path):
    """The object saved in the ``.pt`` file ``path`` (tensors on CPU; no arbitrary pickles)."""
    torch = import_torch(path)
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except Exception as exc:  # torch raises many types (pickle, zip, runtime) for a file that is not its own
        raise FormatError(f"{path}: not a readable torch .pt file: {exc}") from None


def to_plain(value):
    """``value`` with torch tensors turned into numpy arrays (dicts and lists walked), for format-neutral parsing."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value
