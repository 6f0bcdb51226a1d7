"""Popularity profiles and regimes: the expected expert popularity a trace is drawn from.

Popularity profiles
    A profile is float64 ``[L, E]``: the expected number of routings each expert receives per token, so each layer's
    row sums to ``top_k`` (8 for DeepSeek-V3). :func:`parametric_profile` builds one with no data file, calibrated
    to the real DeepSeek-V3 loads in ``sglang_dsv3_ep_statistics.npz``: the hottest expert of a layer gets about
    6.5x the mean (5.6-8.1x averaged over layers per workload, 2.8-11x for single layers), layers differ, and the
    sorted popularity follows a log-normal curve (log-std about 0.75).

Regimes
    The workloads a trace drifts between (:class:`Regimes`): the 12 real DeepSeek-V3 workloads of a
    workload-statistics file (:func:`real_regimes`), or related parametric ones (:func:`parametric_regimes`).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eplb.errors import FormatError, LoadError
from eplb.formats.npz import read_arrays
from eplb.load import as_load

__all__ = ["TOP_K", "Regimes", "parametric_profile", "parametric_regimes", "real_regimes", "is_workload_statistics",
           "normalise_popularity", "cap_popularity"]

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


def normalise_popularity(weights: np.ndarray, top_k: int) -> np.ndarray:
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
    return normalise_popularity(weights, top_k)


# -- regimes: the workloads a serving system drifts between -----------------------------------------------------------

@dataclass(frozen=True)
class Regimes:
    """Expert popularity of the workloads a trace drifts between.

    Attributes:
        profiles: float64 ``[R, L, E]``; each row sums to ``top_k`` (expected routings per token).
        names: R names (e.g. ``decode_in1000out1000``).
        prefill: bool ``[R]``, the regimes that describe prefill steps (the others describe decode steps).
        top_k: experts per token.
        source: where they come from, in words.
    """

    profiles: np.ndarray
    names: tuple[str, ...]
    prefill: np.ndarray
    top_k: int
    source: str = "parametric DeepSeek-V3-like workloads"

    @property
    def num_layers(self) -> int:
        return self.profiles.shape[1]

    @property
    def num_experts(self) -> int:
        return self.profiles.shape[2]

    def of_phase(self, prefill: bool) -> np.ndarray:
        """int64 indices of the regimes of one phase (all regimes when that phase has none)."""
        index = np.flatnonzero(self.prefill == prefill)
        return index if index.size else np.arange(len(self.names))


def parametric_regimes(num_layers: int = 58, num_experts: int = 256, seed: int = 0, num_regimes: int = 8,
                       top_k: int = TOP_K) -> Regimes:
    """``num_regimes`` related workloads built on :func:`parametric_profile` (same seed, same base), half of them
    prefill.

    Like the 12 real DeepSeek-V3 workloads (pairwise correlation of loads 0.56-0.99, higher within a phase), each
    regime's log-popularity is a mix of the shared base, a per-phase part and its own part.
    """
    if num_regimes < 1:
        raise LoadError(f"num_regimes must be >= 1, got {num_regimes}")
    base_rng = np.random.default_rng([seed, 0x7E1B])
    base = base_rng.standard_normal((num_layers, num_experts))  # the same normals as parametric_profile(seed)
    hottest = _hottest_targets(num_layers, base_rng)
    rng = np.random.default_rng([seed, 0x5E61])
    phase_part = rng.standard_normal((2, num_layers, num_experts))
    own = rng.standard_normal((num_regimes, num_layers, num_experts))
    prefill = np.arange(num_regimes) % 2 == 1
    # weights^2 sum to 1, so each regime's normals stay standard and keep the calibrated skew
    mixed = 0.8 * base + 0.45 * phase_part[prefill.astype(int)] + 0.4 * own
    mixed /= np.sqrt(0.8**2 + 0.45**2 + 0.4**2)
    profiles = np.stack([_profile_from_normals(z, hottest, top_k) for z in mixed])
    names = tuple(f"{'prefill' if p else 'decode'}_{i}" for i, p in enumerate(prefill))
    return Regimes(profiles, names, prefill, top_k)


def real_regimes(path) -> Regimes:
    """The per-workload expert popularity of a workload-statistics ``.npz`` such as
    ``sglang_dsv3_ep_statistics.npz``: ``counts`` ``[R, L, E]`` (axis 0 = workload), ``workloads`` (names; those
    starting with ``prefill`` are prefill regimes) and ``top_k``.

    Raises:
        FormatError: unreadable file, or not a workload-statistics file.
    """
    path = Path(path)
    data = read_arrays(path)
    if "workloads" not in data:
        raise FormatError(f"{path}: not a workload-statistics .npz (needs keys 'counts' [workloads, layers, "
                          f"experts] and 'workloads'; found {', '.join(data)})")
    counts = as_load(data["counts"], field=f"{path}:counts")
    names = tuple(str(n) for n in data["workloads"])
    top_k = int(data["top_k"]) if "top_k" in data else TOP_K
    if counts.ndim != 3 or len(names) != counts.shape[0]:
        raise FormatError(f"{path}: 'counts' must be [workloads, layers, experts] with one name per workload, got "
                          f"shape {counts.shape} and {len(names)} names")
    totals = counts.sum(axis=-1, keepdims=True, dtype=np.float64)
    if (totals <= 0).any():
        workload, layer = np.argwhere(totals[..., 0] <= 0)[0]
        raise FormatError(f"{path}: workload {names[workload]!r} has no load in layer {layer}")
    profiles = counts / totals * top_k
    profiles = np.stack([cap_popularity(p) for p in profiles])
    prefill = np.array([n.startswith("prefill") for n in names])
    return Regimes(profiles, names, prefill, top_k, f"{len(names)} real workloads of {path.name}")


def is_workload_statistics(path) -> bool:
    """Whether ``path`` is an ``.npz`` of per-workload loads (keys ``counts`` and ``workloads``), not a trace."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            return "counts" in data.files and "workloads" in data.files
    except (OSError, EOFError, ValueError, AttributeError, zipfile.BadZipFile):  # not an .npz: the reader says why
        return False


def cap_popularity(profile: np.ndarray) -> np.ndarray:
    """``profile`` ``[..., E]`` with no entry above 1 (a token routes to an expert at most once), the excess spread
    over the other experts in proportion to their popularity; row sums are kept."""
    profile = np.array(profile, dtype=np.float64)
    for _ in range(32):
        if not (profile > 1.0 + 1e-12).any():
            break
        excess = np.clip(profile - 1.0, 0.0, None).sum(axis=-1, keepdims=True)
        profile = np.minimum(profile, 1.0)
        room = np.where(profile < 1.0, profile, 0.0)
        profile += excess * room / np.maximum(room.sum(axis=-1, keepdims=True), 1e-300)
    return profile
