"""CPython's iteration order of a set of small non-negative integers, emulated in numba.

vllm-ascend's SwiftBalancer keeps each rank's experts in a Python set and visits them in the set's order, so its
choices among equal swaps depend on that order: :mod:`eplb.policies._swift_ascend_kernels` replays it. A set is an
open-addressing table (``keys``, ``state``: 0 empty, 1 active, 2 deleted) with ``meta = (mask, fill, used)``, probed
and grown as CPython 3.11's ``setobject.c`` does (an integer hashes to itself); ``tests/policies/test_policy_swift.py`` checks
the order against the interpreter.
"""

from __future__ import annotations

from numba import njit

__all__ = ["set_add", "set_remove", "set_items"]

# CPython's set: linear probes before a perturbed jump, the perturbation shift, and growth (setobject.c).
_LINEAR_PROBES = 9
_PERTURB_SHIFT = 5


@njit(cache=True)
def _set_slot(keys, state, mask, key):
    """Where ``key`` is (state 1), or where adding it puts it: the last deleted entry seen before the first empty
    one, else that empty one (CPython 3.11's probe order)."""
    i = key & mask
    perturb = key
    free = -1
    while True:
        probes = _LINEAR_PROBES if i + _LINEAR_PROBES <= mask else 0
        j = i
        for _ in range(probes + 1):
            if state[j] == 0:
                return j if free < 0 else free
            if state[j] == 1 and keys[j] == key:
                return j
            if state[j] == 2:
                free = j
            j += 1
        perturb >>= _PERTURB_SHIFT
        i = (i * 5 + 1 + perturb) & mask


@njit(cache=True)
def _set_insert_clean(keys, state, mask, key):
    i = key & mask
    perturb = key
    while True:
        probes = _LINEAR_PROBES if i + _LINEAR_PROBES <= mask else 0
        j = i
        for _ in range(probes + 1):
            if state[j] == 0:
                keys[j] = key
                state[j] = 1
                return
            j += 1
        perturb >>= _PERTURB_SHIFT
        i = (i * 5 + 1 + perturb) & mask


@njit(cache=True)
def set_add(keys, state, meta, key):
    """Add ``key`` (>= 0) to the set in ``keys`` / ``state`` (0 empty, 1 active, 2 deleted); ``meta`` holds
    ``(mask, fill, used)``."""
    mask = meta[0]
    j = _set_slot(keys, state, mask, key)
    if state[j] == 1:
        return
    was_empty = state[j] == 0
    keys[j] = key
    state[j] = 1
    meta[2] += 1
    if not was_empty:
        return
    meta[1] += 1
    if meta[1] * 5 < mask * 3:
        return
    size = 8
    while size <= meta[2] * 4:
        size <<= 1
    old_keys = keys[: mask + 1].copy()
    old_state = state[: mask + 1].copy()
    state[:size] = 0
    for k in range(mask + 1):
        if old_state[k] == 1:
            _set_insert_clean(keys, state, size - 1, old_keys[k])
    meta[0] = size - 1
    meta[1] = meta[2]


@njit(cache=True)
def set_remove(keys, state, meta, key):
    j = _set_slot(keys, state, meta[0], key)
    state[j] = 2
    meta[2] -= 1


@njit(cache=True)
def set_items(keys, state, meta, out):
    """The set's keys in CPython's iteration order into ``out``; returns how many."""
    count = 0
    for j in range(meta[0] + 1):
        if state[j] == 1:
            out[count] = keys[j]
            count += 1
    return count
