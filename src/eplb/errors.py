"""Every exception eplb raises, in one hierarchy.

- :class:`EplbError` (a ``ValueError``): bad input. The message names the field (or file, layer, rank), the value
  found and what was expected, so that a user can fix the input without reading a traceback. Nothing was changed.
- :class:`EplbFailure` (a ``RuntimeError``, not a ``ValueError``): something failed while running, whatever the
  input: a rank, a peer, one of EPLB's threads, a launched process. An engine's handler of failed collectives (which
  raise ``RuntimeError``) catches these too.

Both derive from :class:`EplbException`, so ``except EplbException`` catches whatever eplb raises.
"""

from __future__ import annotations

__all__ = ["EplbException", "EplbError", "TopologyError", "PlacementError", "LoadError", "FormatError", "PolicyError",
           "ConfigError", "CycleError", "DeviceCheckError", "MissingExtra", "EplbFailure", "PeerError",
           "SideThreadDied", "RankFailure", "LaunchError", "did_you_mean"]


class EplbException(Exception):
    """Base class of every exception eplb raises."""


# --- bad input -------------------------------------------------------------------------------------------------------


class EplbError(EplbException, ValueError):
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


class ConfigError(EplbError):
    """The runtime's configuration is invalid (:mod:`eplb.runtime.config`, :mod:`eplb.runtime.dialects`)."""


class CycleError(EplbError):
    """The cycle was configured or driven wrongly (bad option, steps out of order, plan of the wrong size)."""


class DeviceCheckError(EplbError):
    """The device check cannot run as asked (a device the runtime cannot use, bad sizes); nothing was started."""


class MissingExtra(EplbError, ImportError):
    """An optional part of eplb is asked for and the package it needs is not installed."""


# --- runtime failures ------------------------------------------------------------------------------------------------


class EplbFailure(EplbException, RuntimeError):
    """Base class of every failure eplb raises while running (not the caller's input)."""


class PeerError(EplbFailure):
    """A collective on EPLB's side groups failed: a peer died, or did not answer within the group's timeout."""


class SideThreadDied(EplbFailure):
    """An EPLB thread died; ``cause`` is what killed it."""

    def __init__(self, name: str, cause: BaseException):
        self.name, self.cause = name, cause
        super().__init__(f"EPLB's {name} thread died: {type(cause).__name__}: {cause}")

    def __reduce__(self):  # the arguments, not the message: it crosses process boundaries with a launched rank
        return type(self), (self.name, self.cause)


class RankFailure(EplbFailure):
    """Ranks of the group were declared failed by the heartbeat. ``ranks``: every failed rank of the group so far."""

    def __init__(self, ranks):
        self.ranks = sorted(int(r) for r in ranks)
        super().__init__(f"ranks {self.ranks} stopped beating (declared failed by EPLB's heartbeat)")

    def __reduce__(self):
        return type(self), (self.ranks,)


class LaunchError(EplbFailure):
    """A launched rank failed, died or did not finish in time."""


def did_you_mean(value, allowed, spell=repr) -> str:
    """``"; did you mean X?"``, X the closest of ``allowed`` to ``value`` as ``spell`` writes it, or ``""`` when none
    is close: the tail of an error about an unknown name."""
    import difflib  # only on the error path: importing eplb.errors stays free (vLLM's plug-in loads it)

    hint = difflib.get_close_matches(str(value), list(allowed), n=1)
    return f"; did you mean {spell(hint[0])}?" if hint else ""
