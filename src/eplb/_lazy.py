"""Names a package loads on first use (PEP 562), so that importing it costs only the standard library: vLLM imports
eplb's plug-in in every process."""

from __future__ import annotations

import importlib
import warnings


def lazy_getattr(package: str, names: dict[str, str], submodules: bool = False):
    """A module ``__getattr__`` for ``package`` that imports ``names[name]`` (a module) and returns its ``name``; with
    ``submodules``, any other name is tried as a submodule (``eplb.metrics`` used before anyone imported it)."""

    def __getattr__(name: str):
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        if submodules:
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def moved_module(old: str, new: str, renamed: dict[str, str] | None = None):
    """A module ``__getattr__`` for ``old``, a module that became ``new``: each name is ``new``'s (``renamed``: old
    name -> new name), with a ``DeprecationWarning`` naming the new path (old paths keep working for one release)."""
    renamed = renamed or {}

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        target = renamed.get(name, name)
        warnings.warn(f"{old} moved to {new}: import {target} from {new} ({old} goes in the next release)",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), target)

    return __getattr__


def renamed_names(module: str, renamed: dict[str, str]):
    """A module ``__getattr__`` for ``module`` whose names ``renamed`` (old -> new) still answer to their old
    spelling, with a ``DeprecationWarning``, for one release."""

    def __getattr__(name: str):
        if name not in renamed:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.{name} is now {renamed[name]} ({name} goes in the next release)",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), renamed[name])

    return __getattr__
