"""Expert-load traces ``[T, L, E]``: per-step tokens routed to each logical expert, drawn from the popularity
regimes of :mod:`eplb.sim.regimes` (whose names are importable from here too).

Traces
    :func:`generate_trace` samples ``[T, L, E]`` int32 counts with drift, bursty requests and prefill/decode phases
    (:class:`TraceSpec`); :data:`SCENARIOS` names the built-in mixes (:func:`builtin_trace`). A :class:`Trace`
    saves to and loads from ``.npz`` (``counts`` plus ``prefill``, ``top_k``, ``name``, ``source``), which
    :func:`eplb.formats.read_load` also reads; :func:`load_trace` resolves what ``eplb simulate --trace`` names,
    replaying a recorded per-step load in any supported format as it is.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from eplb.errors import LoadError, did_you_mean
from eplb.formats.npz import read_arrays, write_arrays
from eplb.load import as_load
from eplb.sim import trace_dynamics as dynamics
from eplb.sim.regimes import (TOP_K, Regimes, cap_popularity, is_workload_statistics, parametric_profile,
                              parametric_regimes, real_regimes)

__all__ = [
    "TOP_K",
    "Regimes",
    "Trace",
    "TraceSpec",
    "parametric_profile",
    "parametric_regimes",
    "real_regimes",
    "is_workload_statistics",
    "generate_trace",
    "SCENARIOS",
    "MODEL_SIZES",
    "builtin_trace",
    "load_trace",
]

logger = logging.getLogger(__name__)

def _is_per_step_npz(path: Path) -> bool:
    """Whether ``path`` is an ``.npz`` whose ``counts`` is 3-D (read from the array header, not the data)."""
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as archive, archive.open("counts.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            return len(read_header(f)[0]) == 3
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
        return False


# -- traces ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trace:
    """Per-step expert load.

    Attributes:
        counts: int32 ``[T, L, E]``: routings of each logical expert in each step (tokens x top_k per layer).
        prefill: bool ``[T]``: steps that are prefill (False for decode, or when unknown).
        top_k: experts per token.
        name: its name (``builtin:default``, a file name).
        source: what it was drawn from or recorded on, in words.
    """

    counts: np.ndarray = field(repr=False)
    prefill: np.ndarray = field(repr=False)
    top_k: int = TOP_K
    name: str = ""
    source: str = ""

    @property
    def num_steps(self) -> int:
        return self.counts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.counts.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[2]

    @classmethod
    def from_counts(cls, counts, name: str = "", top_k: int = TOP_K, prefill=None, source: str = "") -> "Trace":
        """A trace from a per-step load ``[T, L, E]`` of whole numbers (numpy, list or torch).

        Raises:
            LoadError: not ``[T, L, E]``, negative, fractional or too large for int32.
        """
        field = name or "trace"
        counts = as_load(counts, field=field)
        if counts.ndim != 3 or 0 in counts.shape:
            raise LoadError(f"{field} must be a per-step load [steps, layers, experts], got shape {counts.shape}")
        if counts.dtype.kind == "f" and not np.array_equal(counts, np.round(counts)):
            raise LoadError(f"{field} holds fractional counts; a trace counts routed tokens (whole numbers)")
        if counts.max() > np.iinfo(np.int32).max:
            raise LoadError(f"{field} holds {counts.max()}, more than int32 can count")
        prefill = np.zeros(counts.shape[0], dtype=bool) if prefill is None else np.asarray(prefill, dtype=bool)
        if prefill.shape != counts.shape[:1]:
            raise LoadError(f"{field}: prefill must be bool [{counts.shape[0]}], got shape {prefill.shape}")
        return cls(counts.astype(np.int32, copy=False), prefill, int(top_k), name, source)

    def save(self, path, flag: str | None = None) -> None:
        """Write ``counts`` (plus ``prefill``, ``top_k``, ``name``) as a compressed ``.npz``, atomically
        (:func:`eplb._files.atomic_path`; ``flag`` names the option in its errors).

        The file is also a plain load file: :func:`eplb.formats.read_load` reads its ``counts``.
        """
        write_arrays(Path(path), flag, counts=self.counts, prefill=self.prefill, top_k=np.int64(self.top_k),
                     name=np.str_(self.name), source=np.str_(self.source))

    @classmethod
    def load(cls, path) -> "Trace":
        """Read a trace written by :meth:`save`, or any ``.npz`` with ``counts`` ``[T, L, E]``.

        Raises:
            FormatError: unreadable file or missing ``counts``; LoadError: bad counts.
        """
        path = Path(path)
        data = read_arrays(path)
        prefill = data.get("prefill")
        top_k = int(data["top_k"]) if "top_k" in data else TOP_K
        name = str(data["name"]) if "name" in data else path.name
        source = str(data["source"]) if "source" in data else f"recorded load {path.name}"
        return cls.from_counts(data["counts"], name=name or path.name, top_k=top_k, prefill=prefill, source=source)


@dataclass(frozen=True)
class TraceSpec:
    """The time dynamics of a generated trace.

    Attributes:
        steps: T.
        decode_tokens: tokens per decode step (jittered by +-10% per step, as batch sizes vary).
        prefill_tokens: tokens per prefill step.
        prefill_run: mean length of a run of prefill steps; 0 means decode only.
        decode_run: mean length of a run of decode steps between prefill runs.
        segment: (shortest, longest) steps a regime mix lasts before drifting to the next one; None keeps one mix.
        blend: share of each segment spent blending smoothly (cosine) into the next mix.
        concentration: Dirichlet concentration of each regime mix (small: one regime dominates).
        requests: mean number of concurrent requests with their own expert preference (0: none).
        request_steps: mean lifetime of a request in steps.
        request_share: mean share of a step's tokens all live requests together route.
        request_sigma: log-std of a request's preference around the phase's mean popularity.
        tokens_per_request: continuous batching: when > 0, a decode step serves this many tokens per live request
            (at least one token), so the batch grows and shrinks with arrivals and departures, instead of
            ``decode_tokens``.
    """

    steps: int = 1000
    decode_tokens: int = 2048
    prefill_tokens: int = 16384
    prefill_run: float = 0.0
    decode_run: float = 40.0
    segment: tuple[int, int] | None = (200, 600)
    blend: float = 0.3
    concentration: float = 0.3
    requests: float = 0.0
    request_steps: float = 30.0
    request_share: float = 0.4
    request_sigma: float = 1.0
    tokens_per_request: int = 0

    def __post_init__(self):
        def need(ok: bool, name: str, expected: str):
            if not ok:
                raise LoadError(f"trace {name} must be {expected}, got {getattr(self, name)!r}")

        need(self.steps >= 1, "steps", ">= 1")
        need(self.decode_tokens >= 1 and self.prefill_tokens >= 1, "decode_tokens", ">= 1 (and prefill_tokens too)")
        need(self.prefill_run >= 0 and self.decode_run >= 1, "prefill_run", ">= 0 (and decode_run >= 1)")
        need(self.segment is None or 1 <= self.segment[0] <= self.segment[1], "segment",
             "None or (shortest, longest) with 1 <= shortest <= longest")
        need(0 <= self.blend <= 1, "blend", "within [0, 1]")
        need(self.concentration > 0, "concentration", "> 0")
        need(self.requests >= 0 and self.request_steps >= 1, "requests", ">= 0 (and request_steps >= 1)")
        need(0 <= self.request_share < 1, "request_share", "within [0, 1)")
        need(self.request_sigma >= 0, "request_sigma", ">= 0")
        need(self.tokens_per_request >= 0, "tokens_per_request", ">= 0")


def generate_trace(regimes: Regimes, spec: TraceSpec, seed: int = 0, name: str = "") -> Trace:
    """Sample a per-step trace from ``regimes`` with the dynamics of ``spec``.

    Model, per step ``t``:

    - phase: runs of decode steps (mean ``decode_run``) alternate with runs of prefill steps (mean ``prefill_run``);
      a step has ``decode_tokens`` (+-10%) or ``prefill_tokens`` tokens and uses its phase's regimes;
    - drift: the phase's popularity is a mix of its regimes whose weights move from one random mix to the next
      every ``segment`` steps, blending smoothly over the last ``blend`` share of each segment;
    - requests: live requests (born at random, living ``request_steps`` on average) route a share of the tokens
      with their own preference (the phase mean times a log-normal factor of std ``request_sigma``), which makes
      per-step load vary far more than sampling noise alone;
    - routing: ``N`` tokens with ``top_k`` distinct experts each. Approximation: the counts are a multinomial draw
      of ``N * top_k`` routings over the step's popularity (capped at one routing per token per expert; large
      conditional binomials drawn from their normal approximation, see
      :func:`eplb.sim._sampling.multinomial_rows`), then capped at ``N`` per expert with the overflow moved to
      experts with room, so every layer of a step totals exactly ``N * top_k`` and no expert gets more routings
      than there are tokens.

    Args:
        regimes: the workloads to mix (:func:`parametric_regimes` or :func:`real_regimes`).
        spec: the dynamics.
        seed: the same seed gives the same trace.
        name: stored in the trace.

    Returns:
        A :class:`Trace` with int32 counts ``[T, L, E]``.
    """
    rng = np.random.default_rng([seed, 0x7A4CE])
    steps = spec.steps
    prefill = dynamics.phases(spec, rng)
    tokens = np.where(prefill, spec.prefill_tokens,
                      np.maximum(1, np.round(spec.decode_tokens * rng.uniform(0.9, 1.1, steps)))).astype(np.int64)
    weights = {phase: dynamics.drift(steps, regimes.of_phase(phase).size, spec, rng) for phase in (False, True)}
    requests = dynamics.requests(spec, rng)
    if spec.tokens_per_request > 0:  # continuous batching: the decode batch is the live requests
        live = dynamics.live_requests(requests, steps)
        tokens = np.where(prefill, tokens, np.maximum(1, spec.tokens_per_request * live)).astype(np.int64)
    mean_profile = {phase: regimes.profiles[regimes.of_phase(phase)].mean(axis=0) for phase in (False, True)}
    counts = np.empty((steps, regimes.num_layers, regimes.num_experts), dtype=np.int32)
    preferences: dict[tuple[int, bool], np.ndarray] = {}
    for start in range(0, steps, _CHUNK):
        stop = min(start + _CHUNK, steps)
        popularity = np.empty((stop - start, regimes.num_layers, regimes.num_experts))
        for phase in (False, True):
            rows = np.flatnonzero(prefill[start:stop] == phase)
            if rows.size:
                mix = weights[phase][start:stop][rows]
                popularity[rows] = np.tensordot(mix, regimes.profiles[regimes.of_phase(phase)], axes=1)
        popularity = dynamics.add_requests(popularity, start, requests, preferences, mean_profile,
                                           prefill[start:stop], spec, seed, regimes.top_k)
        counts[start:stop] = dynamics.route(popularity, tokens[start:stop], regimes.top_k, rng)
    return Trace(counts, prefill, regimes.top_k, name, regimes.source)


_CHUNK = 128


# -- built-in scenarios ------------------------------------------------------------------------------------------------

#: name -> (what it shows, dynamics). Sizes: DeepSeek-V3 (58 layers, 256 experts, top-8).
SCENARIOS: dict[str, tuple[str, TraceSpec]] = {
    "default": ("regime drift, bursty requests and prefill/decode phases together",
                TraceSpec(steps=1000, prefill_run=3, decode_run=40, segment=(200, 600), requests=4,
                          request_share=0.3, request_sigma=1.0)),
    "drift": ("smooth drift between workloads, segments of 150-400 steps",
              TraceSpec(steps=1500, segment=(150, 400))),
    "bursty": ("one workload, with concurrent requests that prefer their own experts for tens of steps",
               TraceSpec(steps=1500, segment=None, requests=6, request_share=0.4, request_sigma=1.0)),
    "phases": ("runs of prefill steps (16k tokens) between runs of decode steps (2k tokens)",
               TraceSpec(steps=1500, segment=None, prefill_run=4, decode_run=30)),
    "steady": ("one workload mix, sampling noise only", TraceSpec(steps=1000, segment=None)),
    "batching": ("continuous batching: requests arrive and leave, the decode batch is 64 tokens per live request, "
                 "85% of the tokens follow their own request's expert preference",
                 TraceSpec(steps=1500, segment=None, requests=32, request_steps=80, request_share=0.85,
                           request_sigma=1.5, tokens_per_request=64, prefill_run=2, decode_run=50)),
    "olmoe": ("OLMoE-like model (16 layers, 64 experts, top-8) switching text domains: one workload dominates for "
              "300-800 steps, then the next takes over",
              TraceSpec(steps=1500, segment=(300, 800), blend=0.1, concentration=0.1)),
}

#: model size (layers, experts) of the built-in scenarios that are not DeepSeek-V3's 58 x 256
MODEL_SIZES: dict[str, tuple[int, int]] = {"olmoe": (16, 64)}

BUILTIN_PREFIX = "builtin:"


def builtin_trace(name: str, steps: int | None = None, seed: int = 0, regimes: Regimes | None = None,
                  num_layers: int | None = None, num_experts: int | None = None) -> Trace:
    """A built-in scenario (``default``, ``drift``, ``bursty``, ``phases``, ``steady``, ``batching``, ``olmoe``; see
    :data:`SCENARIOS`).

    Args:
        name: scenario name, with or without the ``builtin:`` prefix.
        steps: override the scenario's number of steps.
        seed: the same seed gives the same trace.
        regimes: workloads to draw from (e.g. :func:`real_regimes` of the real DeepSeek-V3 data); default
            :func:`parametric_regimes` with ``num_layers`` x ``num_experts`` (default: the scenario's model,
            :data:`MODEL_SIZES`, else DeepSeek-V3's 58 x 256) and the same seed.

    Raises:
        LoadError: unknown scenario or bad steps.
    """
    key = name[len(BUILTIN_PREFIX):] if name.startswith(BUILTIN_PREFIX) else name
    if key not in SCENARIOS:
        raise LoadError(f"unknown built-in trace {name!r}: expected one of "
                        f"{', '.join(BUILTIN_PREFIX + n for n in SCENARIOS)}"
                        f"{did_you_mean(key, SCENARIOS, (BUILTIN_PREFIX + '{}').format)}")
    spec = SCENARIOS[key][1]
    if steps is not None:
        spec = replace(spec, steps=steps)
    if regimes is None:
        layers, experts = MODEL_SIZES.get(key, (58, 256))
        regimes = parametric_regimes(num_layers or layers, num_experts or experts, seed)
    return generate_trace(regimes, spec, seed, name=BUILTIN_PREFIX + key)


def load_trace(source: str, steps: int | None = None, seed: int = 0, workloads=None) -> Trace:
    """The trace ``eplb simulate --trace`` names.

    - ``builtin:NAME``: a built-in scenario, drawn from the real workloads of the workload-statistics file
      ``workloads`` when given, else from the parametric DeepSeek-V3-like ones;
    - a workload-statistics ``.npz`` (``counts`` ``[workloads, L, E]`` + ``workloads``, such as
      ``sglang_dsv3_ep_statistics.npz``): ``builtin:default`` drawn from those real workloads;
    - any expert-load file :func:`eplb.formats.read_load` reads (our ``.npz`` traces included): a per-step load
      ``[T, L, E]`` is replayed as recorded (``steps`` keeps the first ones); a window ``[L, E]`` has no time axis,
      so it becomes the single workload of ``builtin:default``.

    Raises:
        EplbError: unknown scenario, unreadable file, bad load.
    """
    if source.startswith(BUILTIN_PREFIX):
        return builtin_trace(source, steps, seed, regimes=real_regimes(workloads) if workloads else None)
    if workloads:
        raise LoadError(f"workloads ({workloads}) only go with a built-in trace, not with --trace {source}")
    path = Path(source)
    if is_workload_statistics(path):
        return builtin_trace("default", steps, seed, regimes=real_regimes(path))
    if _is_per_step_npz(path):
        trace = Trace.load(path)
        counts, prefill, top_k, name, origin = trace.counts, trace.prefill, trace.top_k, trace.name, trace.source
    else:
        from eplb.formats import read_load

        counts, prefill, top_k, name, origin = read_load(path), None, TOP_K, path.name, f"recorded load {path.name}"
    if counts.ndim == 2:
        if not (counts.sum(axis=-1) > 0).all():
            layer = int(np.argmin(counts.sum(axis=-1) > 0))
            raise LoadError(f"{path} holds one window [L, E] whose layer {layer} has no load; a scenario is drawn "
                            "from each layer's expert popularity, so every layer needs some")
        logger.info("%s holds one window [L, E] (no time axis): generating builtin:default from it", path)
        profile = cap_popularity(counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1e-300) * top_k)
        regimes = Regimes(profile[None], (path.stem,), np.zeros(1, dtype=bool), top_k,
                          f"the window load of {path.name}")
        return builtin_trace("default", steps, seed, regimes=regimes)
    if steps is not None:
        counts = counts[:steps]
        prefill = None if prefill is None else prefill[:steps]
    return Trace.from_counts(counts, name=name, top_k=top_k, prefill=prefill, source=origin)
