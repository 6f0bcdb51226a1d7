"""The dynamics a generated trace is drawn with (:func:`eplb.sim.traces.generate_trace`), one function each:
prefill/decode phases, drift between workload mixes, live requests with their own expert preference, and the
routing of a step's tokens to ``top_k`` distinct experts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from eplb.sim.regimes import cap_popularity, normalise_popularity

if TYPE_CHECKING:
    from eplb.sim.traces import TraceSpec

__all__ = ["phases", "drift", "requests", "live_requests", "add_requests", "route"]


def phases(spec: TraceSpec, rng: np.random.Generator) -> np.ndarray:
    """bool ``[T]``: prefill steps, in runs alternating with decode runs (geometric lengths)."""
    prefill = np.zeros(spec.steps, dtype=bool)
    if spec.prefill_run <= 0:
        return prefill
    step, phase = 0, False
    while step < spec.steps:
        mean = spec.prefill_run if phase else spec.decode_run
        length = int(rng.geometric(1.0 / max(mean, 1.0)))
        prefill[step:step + length] = phase
        step += length
        phase = not phase
    return prefill


def drift(steps: int, num_regimes: int, spec: TraceSpec, rng: np.random.Generator) -> np.ndarray:
    """float64 ``[T, R]``: regime mix of every step; rows sum to 1."""
    def draw() -> np.ndarray:
        return rng.dirichlet(np.full(num_regimes, spec.concentration)) if num_regimes > 1 else np.ones(1)

    current = draw()
    if spec.segment is None:
        return np.broadcast_to(current, (steps, num_regimes)).copy()
    weights = np.empty((steps, num_regimes))
    step = 0
    while step < steps:
        length = int(rng.integers(spec.segment[0], spec.segment[1] + 1))
        target = draw()
        ramp = int(round(spec.blend * length))
        alpha = np.zeros(length)
        if ramp:
            alpha[length - ramp:] = 0.5 - 0.5 * np.cos(np.pi * np.arange(1, ramp + 1) / ramp)
        block = (1 - alpha)[:, None] * current + alpha[:, None] * target
        weights[step:step + length] = block[: steps - step]
        step += length
        current = target
    return weights


def requests(spec: TraceSpec, rng: np.random.Generator) -> np.ndarray:
    """float64 ``[n, 3]``: (birth step, death step, share) of every request, in birth order."""
    if spec.requests <= 0 or spec.request_share <= 0:
        return np.zeros((0, 3))
    births = rng.poisson(spec.requests / spec.request_steps, spec.steps)
    # requests already alive at step 0, so the trace does not start calm
    birth = np.concatenate([np.zeros(rng.poisson(spec.requests), dtype=np.int64),
                            np.repeat(np.arange(spec.steps), births)])
    life = rng.geometric(1.0 / spec.request_steps, birth.size)
    share = rng.gamma(2.0, spec.request_share / spec.requests / 2.0, birth.size)
    return np.stack([birth, birth + life, share], axis=1).astype(np.float64)


def live_requests(requests: np.ndarray, steps: int) -> np.ndarray:
    """int64 ``[T]``: requests alive in each step (born at or before it, not yet dead)."""
    births = np.bincount(np.minimum(requests[:, 0].astype(np.int64), steps), minlength=steps + 1)[:steps]
    deaths = np.bincount(np.minimum(requests[:, 1].astype(np.int64), steps), minlength=steps + 1)[:steps]
    return np.cumsum(births - deaths)


def add_requests(popularity, start, requests, preferences, mean_profile, prefill, spec, seed, top_k):
    """Mix the live requests' preferences into ``popularity`` ``[c, L, E]`` (steps ``start ..``)."""
    if requests.shape[0] == 0:
        return popularity
    stop = start + popularity.shape[0]
    live = np.flatnonzero((requests[:, 0] < stop) & (requests[:, 1] > start))
    for key in [key for key in preferences if requests[key[0], 1] <= start]:
        del preferences[key]
    if live.size == 0:
        return popularity
    t = np.arange(start, stop)[:, None]
    share = np.where((requests[live, 0] <= t) & (t < requests[live, 1]), requests[live, 2], 0.0)  # [c, n]
    total = share.sum(axis=1, keepdims=True)
    share *= np.minimum(1.0, _MAX_REQUEST_SHARE / np.maximum(total, 1e-300))
    popularity *= (1.0 - share.sum(axis=1))[:, None, None]
    for phase in (False, True):
        rows = np.flatnonzero(prefill == phase)
        if rows.size == 0:
            continue
        stack = np.stack([_preference(preferences, (int(index), phase), mean_profile[phase], spec, seed, top_k)
                          for index in live])
        mixed = np.tensordot(share[rows], stack, axes=1)
        if rows.size == popularity.shape[0]:
            popularity += mixed
        else:
            popularity[rows] += mixed
    return popularity


def _preference(cache, key, mean_profile, spec, seed, top_k) -> np.ndarray:
    """float64 ``[L, E]``: request ``key = (index, phase)``'s own popularity, seeded by the key alone so that it does
    not depend on how the trace is cut into chunks."""
    if key not in cache:
        z = np.random.default_rng([seed, 0xB0257, *key]).standard_normal(mean_profile.shape)
        cache[key] = cap_popularity(normalise_popularity(mean_profile * np.exp(spec.request_sigma * z), top_k))
    return cache[key]


_MAX_REQUEST_SHARE = 0.9


def route(popularity: np.ndarray, tokens: np.ndarray, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """int32 ``[c, L, E]`` routings of ``tokens[c]`` tokens, ``top_k`` distinct experts each (see
    :func:`generate_trace` for the approximation)."""
    from eplb.sim._sampling import multinomial_rows

    popularity = cap_popularity(popularity)
    pvals = popularity / popularity.sum(axis=-1, keepdims=True)
    totals = np.repeat(tokens * top_k, popularity.shape[1])
    counts = multinomial_rows(totals, pvals.reshape(totals.size, -1), int(rng.integers(2**31))).reshape(pvals.shape)
    limit = tokens[:, None, None]
    while True:
        over = counts > limit
        if not over.any():
            break
        excess = np.where(over, counts - limit, 0).sum(axis=-1)  # [c, L]
        counts = np.minimum(counts, limit)
        step, layer = np.nonzero(excess)
        for s, l in zip(step, layer):  # rare: only toy sizes (few experts per token slot) get here
            room = (limit[s, 0, 0] - counts[s, l]).astype(np.float64) * pvals[s, l]
            counts[s, l] += rng.multinomial(excess[s, l], room / room.sum())
    return counts.astype(np.int32)
