"""Deprecated: moved to :mod:`eplb.runtime.in_force` (``LivePlacement`` is ``PlacementInForce``: "live" names the
ranks still serving); this path keeps working, with a ``DeprecationWarning``, for one release."""

from eplb._lazy import moved_module

__getattr__ = moved_module("eplb.runtime.live", "eplb.runtime.in_force", {"LivePlacement": "PlacementInForce"})
