"""How one value of the runtime's config is read: an integer, a number, a bool, one of some names, a file path.

Each reader takes the key it is read for (named in its error) and the value as given (a YAML / JSON value, a
string from the environment or an engine's flag) and returns it normalized, or raises :class:`ConfigError` naming
the key, the value and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path

from eplb.errors import ConfigError, did_you_mean

__all__ = ["read_int", "read_float", "read_bool", "read_choice", "read_path"]


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
#: vllm-ascend keys whose files must end in .json (vllm-ascend refuses others)
_JSON_KEYS = ("expert_map_path", "expert_map_record_path")


def read_int(key: str, value, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{key} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in {minimum}-{maximum}"
        raise ConfigError(f"{key} must be an integer {bound}, got {value}")
    return int(value)


def read_float(key: str, value, low: float, high: float | None = None, low_open: bool = True) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if isinstance(value, bool) or out != out or (out <= low if low_open else out < low) or (
            high is not None and out > high) or out == float("inf"):
        bound = f"in [{low}, {high}]" if high is not None else f"> {low}"
        raise ConfigError(f"{key} must be {bound}, got {value!r}")
    return out


def read_bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def read_choice(key: str, value, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}{did_you_mean(value, allowed)}")
    return value


def read_path(key: str, value) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ConfigError(f"{key} must be a file path, got {value!r}")
    path = str(Path(value))
    if key in _JSON_KEYS and not path.endswith(".json"):
        raise ConfigError(f"{key}={value!r} must end in .json (vllm-ascend reads and writes JSON expert maps)")
    return path
