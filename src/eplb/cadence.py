"""Deprecated: moved to :mod:`eplb.cycle.cadence`;
this path keeps working, with a ``DeprecationWarning``, for one release."""

from eplb._lazy import moved_module

__getattr__ = moved_module("eplb.cadence", "eplb.cycle.cadence")
