"""eplb's optional parts and the extra that installs each: a missing one is one line naming what to install.

``pip install "eplb[torch]"`` for the runtime and ``eplb demo``, ``"eplb[plot]"`` for plots, ``"eplb[metrics]"`` for
the runtime's Prometheus metrics (pyproject.toml's ``[project.optional-dependencies]``).
"""

from __future__ import annotations

import importlib

from eplb.errors import EplbError, MissingExtra

__all__ = ["EXTRAS", "MissingExtra", "install_hint", "require"]

#: importable module -> the extra of eplb that installs it
EXTRAS = {"torch": "torch", "matplotlib": "plot", "prometheus_client": "metrics"}

def install_hint(module: str) -> str:
    """``pip install "eplb[EXTRA]"`` for the extra that installs ``module``."""
    return f'pip install "eplb[{EXTRAS[module]}]"'


def missing(what: str, module: str) -> str:
    """The one line for ``what`` needing ``module``, which is not installed."""
    return f"{what} needs {module}, which is not installed: {install_hint(module)}"


def require(module: str, what: str, error: type[EplbError] = MissingExtra) -> None:
    """Import ``module`` (one of :data:`EXTRAS`), or raise ``error`` saying that ``what`` needs it and how to install
    it."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module and not (exc.name or "").startswith(module + "."):
            raise  # the package is there and something it needs is not: its own error says more
        raise error(missing(what, module)) from None
