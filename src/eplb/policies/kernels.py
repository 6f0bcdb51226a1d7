"""Deprecated: moved to :mod:`eplb.policies.shared.packing`;
this path keeps working, with a ``DeprecationWarning``, for one release."""

from eplb._lazy import moved_module

__getattr__ = moved_module("eplb.policies.kernels", "eplb.policies.shared.packing")
