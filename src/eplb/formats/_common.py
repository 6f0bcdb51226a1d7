"""Helpers shared by the format modules: JSON, numpy and torch loading with clear errors, and the parsed form of a map
file. Files are written with :func:`eplb._files.atomic_path` (re-exported here for the format modules)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eplb._files import atomic_path
from eplb.errors import FormatError

__all__ = ["RawMap", "atomic_path", "load_json", "numpy_load", "read_bytes", "import_torch", "torch_load", "to_plain"]


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
        shared_ids: ids that look like vllm-ascend's mix placement's shared experts (in the last slot of every
            device, above every other id), or ``None``. Only the caller's expert count tells such a map from a valid
            one whose highest expert is replicated last on every device.
    """

    phy2log: np.ndarray | None
    layer_ids: np.ndarray | None = None
    num_ranks: int | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    allow_shared_rank: bool = True
    shared_ids: list[int] | None = None


def read_bytes(path: Path, size: int = -1) -> bytes:
    """The first ``size`` bytes of ``path`` (all with -1), or a :class:`FormatError` saying why not."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a folder, expected a file") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from None


def load_json(path):
    """The parsed JSON of ``path`` (UTF-8, UTF-16 or UTF-32, with or without a byte-order mark, as JSON allows);
    :class:`FormatError` naming the file, line and column when it is not JSON."""
    path = Path(path)
    data = read_bytes(path)
    if not data.strip():
        raise FormatError(f"{path}: the file is empty, expected a JSON object")
    if data.startswith(b"\xef\xbb\xbf"):  # json.loads rejects a UTF-8 byte-order mark that editors on Windows add
        data = data[3:]
    try:
        return json.loads(data)
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not JSON text: byte {exc.start} is not valid {exc.encoding.upper()}; "
                          "save it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except RecursionError:
        raise FormatError(f"{path}: not valid JSON: nested too deeply") from None


_NPY_MAGIC, _ZIP_MAGIC = b"\x93NUMPY", b"PK"  # a zip (.npz) starts with PK, even an empty one


def numpy_load(path, archive: bool):
    """What ``np.load`` reads from ``path``: an ``NpzFile`` (``archive``, a ``.npz``) or an array (a ``.npy``).

    Never unpickles; :class:`FormatError` saying what the file is instead (empty, another kind, Python objects).
    """
    import zipfile

    path = Path(path)
    kind, magic = (".npz archive (numpy.savez)", _ZIP_MAGIC) if archive else (".npy array (numpy.save)", _NPY_MAGIC)
    head = read_bytes(path, len(magic))
    if not head:
        raise FormatError(f"{path}: the file is empty, expected a {kind}")
    if head != magic:
        raise FormatError(f"{path}: not a {kind}: it does not start like one")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise FormatError(f"{path}: holds Python objects rather than numbers; eplb reads only numeric arrays "
                              "(it never unpickles)") from None
        raise FormatError(f"{path}: not a readable {kind}: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{path}: not a readable {kind} (truncated or damaged): {exc}") from None


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
    path = Path(path)
    if not read_bytes(path, 1):
        raise FormatError(f"{path}: the file is empty, expected a torch .pt file")
    torch = import_torch(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (pickle, zip, runtime) for a file that is not its own
        if "weights_only" in str(exc):
            raise FormatError(f"{path}: holds Python objects other than tensors, lists and dicts; eplb reads .pt "
                              "files without running code, so save plain tensors (torch.save(tensor or dict))") \
                from None
        raise FormatError(f"{path}: not a readable torch .pt file (one written by torch.save)") from None


def to_plain(value):
    """``value`` with torch tensors turned into numpy arrays (dicts and lists walked), for format-neutral parsing."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value
