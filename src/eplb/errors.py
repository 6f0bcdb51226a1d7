"""Errors raised by eplb.

Every error names the field (or file, layer, rank), the value found and what was expected, so that a user can fix
the input without reading a traceback. All of them derive from :class:`EplbError`, which is a ``ValueError``.
"""

from __future__ import annotations


class EplbError(ValueError):
    """Base class of every error eplb raises on bad input."""


class TopologyError(EplbError):
    """The cluster shape is inconsistent (ranks, nodes, slots, groups)."""


class PlacementError(EplbError):
    """A placement is not valid for its topology or number of experts."""


class LoadError(EplbError):
    """An expert-load array has the wrong shape, dtype or values."""


class FormatError(EplbError):
    """A file cannot be read or written in the requested engine format."""


class PolicyError(EplbError):
    """A policy was asked for something it cannot do (unknown name, bad option)."""
