"""Expert-load traces ``[T, L, E]``: per-step tokens routed to each logical expert.

Popularity profiles
    A profile is float64 ``[L, E]``: the expected number of routings each expert receives per token, so each layer's
    row sums to ``top_k`` (8 for DeepSeek-V3). :func:`parametric_profile` builds one with no data file, calibrated
    to the real DeepSeek-V3 loads in ``sglang_dsv3_ep_statistics.npz``: the hottest expert of a layer gets about
    6.5x the mean (5.6-8.1x averaged over layers per workload, 2.8-11x for single layers), layers differ, and the
    sorted popularity follows a log-normal curve (log-std about 0.75).
"""

from __future__ import annotations

import numpy as np

from eplb.errors import LoadError

__all__ = ["TOP_K", "parametric_profile"]

#: DeepSeek-V3 routes every token to 8 distinct experts.
TOP_K = 8

# Calibration to the 12 real DeepSeek-V3 workloads (sglang_dsv3_ep_statistics.npz): hottest / mean per layer has a
# mean of 6.5 over layers and a log-std of 0.3 across layers; deeper layers are a little more skewed.
_HOTTEST_MEAN = 6.5
_HOTTEST_LOG_STD = 0.3
_HOTTEST_DEPTH_TREND = 0.25
_HOTTEST_RANGE = (2.5, 12.0)


def _hottest_targets(num_layers: int, rng: np.random.Generator) -> np.ndarray:
    """float64 ``[L]``: the hottest expert's load over the layer mean, per layer."""
    depth = np.linspace(-0.5, 0.5, num_layers)
    log_ratio = _HOTTEST_LOG_STD * rng.standard_normal(num_layers) + _HOTTEST_DEPTH_TREND * depth
    ratio = np.exp(log_ratio)
    ratio *= _HOTTEST_MEAN / ratio.mean()  # keep the layer average on target even for a handful of layers
    return np.clip(ratio, *_HOTTEST_RANGE)


def _log_popularity_scale(z: np.ndarray, hottest: np.ndarray) -> np.ndarray:
    """float64 ``[L]``: sigma per layer so that ``exp(sigma * z)`` has max / mean equal to ``hottest``.

    max / mean of ``exp(sigma * z)`` grows monotonically with sigma, so a vectorised bisection finds it.
    """
    lo = np.zeros(z.shape[0])
    hi = np.full(z.shape[0], 6.0)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        w = np.exp(mid[:, None] * (z - z.max(axis=1, keepdims=True)))
        too_flat = 1.0 / w.mean(axis=1) < hottest
        lo = np.where(too_flat, mid, lo)
        hi = np.where(too_flat, hi, mid)
    return 0.5 * (lo + hi)


def _normalise(weights: np.ndarray, top_k: int) -> np.ndarray:
    return weights * (top_k / weights.sum(axis=-1, keepdims=True))


def parametric_profile(num_layers: int = 58, num_experts: int = 256, seed: int = 0, top_k: int = TOP_K) -> np.ndarray:
    """A DeepSeek-V3-like expert popularity, no data file needed.

    Per layer, expert popularity is log-normal (independent draws per layer, as in the real data where adjacent
    layers barely correlate), scaled so that the hottest expert gets a per-layer target of about 6.5x the mean
    (log-std 0.3 across layers, clipped to 2.5-12x, and to ``0.95 * E / top_k`` so that no expert expects more
    than one routing per token).

    Args:
        num_layers: L, MoE layers.
        num_experts: E, routed experts per layer (at least 2).
        seed: the same seed gives the same profile.
        top_k: experts per token; each row sums to it.

    Returns:
        float64 ``[L, E]``: expected routings per token of each expert; rows sum to ``top_k``.
    """
    if num_layers < 1 or num_experts < 2 or not 1 <= top_k <= num_experts:
        raise LoadError(f"parametric_profile needs num_layers >= 1, num_experts >= 2 and 1 <= top_k <= num_experts, "
                        f"got num_layers={num_layers}, num_experts={num_experts}, top_k={top_k}")
    rng = np.random.default_rng([seed, 0x7E1B])
    z = rng.standard_normal((num_layers, num_experts))
    return _profile_from_normals(z, _hottest_targets(num_layers, rng), top_k)


def _profile_from_normals(z: np.ndarray, hottest: np.ndarray, top_k: int) -> np.ndarray:
    # A token routes to an expert at most once, so no expert may expect more than one routing per token:
    # hottest * top_k / E <= 1. This only binds for toy sizes (a few experts).
    ceiling = max(1.0, 0.95 * z.shape[1] / top_k)
    sigma = _log_popularity_scale(z, np.minimum(hottest, ceiling))
    weights = np.exp(sigma[:, None] * (z - z.max(axis=1, keepdims=True)))
    return _normalise(weights, top_k)
