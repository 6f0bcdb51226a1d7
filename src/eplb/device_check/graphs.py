"""CUDA graphs: routing and recording of every MoE layer captured in one graph, in each dispatch rule, replayed over
prefill and decode steps of a padded batch (needs CUDA; the check's CPU run skips it and says so).

What must hold after the replays: the graph's slots equal an eager call of the router (the tables it reads are the
ones in force), and the recorder counted exactly the real tokens of the recorded stage (``decode``), padding and
prefill steps left out.
"""

from __future__ import annotations

import traceback

import numpy as np
import torch

__all__ = ["graph_recording"]

_STAGES = (False, True, False, False, True, False)  # is_prefill of each replayed step
_PADDING = 37  # rows of the batch that are padding (a graph's batch size is fixed)


def graph_recording(settings, device: torch.device) -> dict:
    """Per dispatch rule ``{"ok": bool, "routes_equal_eager": bool, "counts_equal": bool}`` or ``{"ok": False,
    "error": traceback}``."""
    out = {}
    for dispatch in settings.modes:
        try:
            out[dispatch] = _one_mode(settings, dispatch, device)
        except Exception:  # noqa: BLE001 - a capture that fails is a finding, reported per mode
            out[dispatch] = {"ok": False, "error": traceback.format_exc(limit=8)}
    return out


def _captured(forward, recorder, device):
    """``forward`` captured in a CUDA graph (after a warm-up on a side stream, as torch.cuda.graphs asks); returns
    its replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        recorder.begin_step(is_prefill=False)
        forward()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    return graph.replay


def _one_mode(settings, dispatch: str, device) -> dict:
    """One dispatch rule; on a CPU ``device`` the forward runs eagerly (the tests check the counting this way)."""
    from eplb import Placement, Topology
    from eplb.runtime import LoadRecorder, ReplicaRouter

    layers, experts, world, slots = settings.layers, settings.experts, settings.ranks, settings.slots_per_rank
    placement = Placement.initial(experts, Topology(world, slots), layers)
    router = ReplicaRouter(placement, 0, dispatch, device=device)
    recorder = LoadRecorder(layers, experts, world, slots, 0, "ids", ring_steps=4, stage="decode", device=device)
    rng = np.random.default_rng(settings.seed + 7)
    ids = torch.from_numpy(rng.integers(0, experts, (settings.tokens, settings.top_k))).to(device)
    counts = None
    if dispatch == "balanced":  # this rank's tokens per expert, and made-up ones of the others
        own = torch.bincount(ids.reshape(-1), minlength=experts)
        others = torch.from_numpy(rng.integers(0, 3 * settings.tokens * settings.top_k // experts + 1,
                                               (world - 1, experts))).to(device)
        counts = torch.cat([own[None], others])
    real = max(1, settings.tokens - _PADDING)
    valid = torch.zeros(settings.tokens, dtype=torch.bool, device=device)
    valid[:real] = True
    outputs: list = [None] * layers

    def forward():
        for layer in range(layers):
            outputs[layer] = router.route(layer, ids, counts)
            recorder.record_ids(layer, outputs[layer], valid)

    replay = _captured(forward, recorder, device) if device.type == "cuda" else forward
    recorder.reset()
    for is_prefill in _STAGES:
        recorder.begin_step(is_prefill=is_prefill)
        replay()
    eager = [router.route(layer, ids, counts) for layer in range(layers)]
    routes_equal = all(torch.equal(a, b) for a, b in zip(outputs, eager))
    expected = torch.stack([torch.bincount(slots_[:real].reshape(-1), minlength=world * slots) for slots_ in eager])
    counts_equal = torch.equal(recorder.window, expected * _STAGES.count(False))
    return {"ok": routes_equal and counts_equal, "routes_equal_eager": routes_equal, "counts_equal": counts_equal}
