"""Deprecated: moved to :mod:`eplb.policies.shared.resilience`;
this path keeps working, with a ``DeprecationWarning``, for one release."""

from eplb._lazy import moved_module

__getattr__ = moved_module("eplb.policies.resilience", "eplb.policies.shared.resilience")
