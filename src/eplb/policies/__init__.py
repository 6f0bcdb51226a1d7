"""Placement policies behind one small dispatch: ``get_policy(name_or_id, **options)``.

One module per policy; each defines ``POLICY``, the class. Modules are imported on first use so that asking for
one policy never compiles another's kernels, and importing this registry (names, ids: :func:`policy_name`) loads no
policy code at all (vLLM's plug-in relies on it).
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING

from eplb._lazy import lazy_getattr
from eplb.errors import PolicyError, did_you_mean

if TYPE_CHECKING:
    from eplb.policies.base import Plan, Policy

__all__ = ["get_policy", "available_policies", "policy_options", "policy_name", "policy_id", "Plan", "Policy", "POLICY_IDS",
           "POLICY_NAMES"]

_MODULES = {
    "random": "eplb.policies.random_policy",
    "default": "eplb.policies.default",
    "swift": "eplb.policies.swift",
    "flashlb": "eplb.policies.flashlb",
    "auto": "eplb.policies.auto",
}

#: every registered policy name (whether its module imports here or not: see :func:`available_policies`)
POLICY_NAMES = tuple(_MODULES)

#: vllm-ascend ``eplb_policy_type`` ids
POLICY_IDS = {0: "random", 1: "default", 2: "swift", 3: "flashlb"}


# the base classes load numpy, numba and the metrics; the registry itself needs none of them
__getattr__ = lazy_getattr(__name__, {"Plan": "eplb.policies.base", "Policy": "eplb.policies.base"})


def _policy_class(name: str) -> type[Policy]:
    return importlib.import_module(_MODULES[name]).POLICY


def available_policies() -> list[str]:
    """Names of the policies this installation provides."""
    names = []
    for name in _MODULES:
        try:
            _policy_class(name)
        except ModuleNotFoundError as exc:
            if exc.name != _MODULES[name]:  # the module exists but something it needs is missing
                raise
            continue
        names.append(name)
    return names


def policy_options(name: str) -> list[str]:
    """Names of the options (keyword arguments) the registered policy ``name`` takes.

    Raises:
        PolicyError: unknown name (with a suggestion).
    """
    return [p for p in inspect.signature(_policy_class(_registered(name)).__init__).parameters if p != "self"]


def _registered(name: str, names=None) -> str:
    names = available_policies() if names is None else names
    if name not in names:
        raise PolicyError(f"unknown policy {name!r}: expected one of {', '.join(names)}{did_you_mean(name, names)}")
    return name


def policy_id(value) -> int | None:
    """The vllm-ascend policy id ``value`` spells (an int, or a string of digits), or None when it spells no id."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def policy_name(name_or_id: str | int) -> str:
    """The registered name a name or vllm-ascend policy id (``1`` or ``"1"``) stands for; imports no policy.

    Raises:
        PolicyError: unknown name or id (with a suggestion).
    """
    index = policy_id(name_or_id)
    if index in POLICY_IDS:
        return POLICY_IDS[index]
    if index is not None and not isinstance(name_or_id, str):  # a string of digits may still be a name
        raise PolicyError(f"policy id must be one of {sorted(POLICY_IDS)}, got {name_or_id}")
    return _registered(str(name_or_id), POLICY_NAMES)


def get_policy(name_or_id: str | int, **options) -> Policy:
    """A policy instance by registry name (``"default"``) or vllm-ascend policy id (``1``).

    Raises:
        PolicyError: unknown name or id, or an option the policy does not take (with a suggestion).
    """
    name = policy_name(name_or_id)
    cls = _policy_class(_registered(name))
    accepted = policy_options(name)
    for key in options:
        if key not in accepted:
            raise PolicyError(f"policy {name!r} has no option {key!r} (options: {', '.join(accepted) or 'none'})"
                              f"{did_you_mean(key, accepted)}")
    return cls(**options)
