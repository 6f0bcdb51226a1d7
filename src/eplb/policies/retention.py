"""Deprecated: moved to :mod:`eplb.policies.shared.retention`;
this path keeps working, with a ``DeprecationWarning``, for one release."""

from eplb._lazy import moved_module

__getattr__ = moved_module("eplb.policies.retention", "eplb.policies.shared.retention")
