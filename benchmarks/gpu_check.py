"""Prepared GPU check of the runtime's step path (one CUDA device, under 5 minutes): prints one JSON object.

Two processes share the device over the Gloo backend (EPLB's transfers go through pinned host staging on a side
stream; NCCL cannot run two ranks on one device). Each rank serves a 58-layer, 256-expert model (2 ranks x 160
slots, 2 MiB experts) with ``torch.cuda.set_sync_debug_mode("error")`` on for the whole loop, through ordinary,
poll, check, window-end (submit), move and switch steps, in the ``rank``, ``token``, ``local`` and ``balanced``
dispatch modes (``balanced`` with every rank's counts, gathered once before the loop): any host sync raises, and the
error is reported. In ``balanced`` mode, ``split_equals_numpy`` says whether the device split of every layer equals
the numpy reference's bit for bit (integer tokens, so atomics cannot change it). The forward (a matmul per layer,
timed with CUDA events) of steps whose transfer is in flight is compared with that of ordinary steps:
``forward_ratio_during_transfer`` should be <= 1.05 (the transfer's copies run on the side stream and its sends on
host threads).
Before that, in one process, 58 layers of routing and recording are captured in one CUDA graph and
replayed over prefill and decode steps of a padded batch: the recorder must count exactly the real tokens of the
recorded stage.

Without CUDA it prints ``{"skipped": "no CUDA"}`` and exits 0.

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

LAYERS, EXPERTS, WORLD, SLOTS, TOP_K, TOKENS = 58, 256, 2, 160, 8, 256
EXPERT_FLOATS = 512 * 1024  # 2 MiB per expert in float32
MODES = ("rank", "token", "local", "balanced")
DEADLINE_S = 240.0


def _serve(rank: int, dispatch: str, device: torch.device, deadline: float) -> dict:
    import torch.distributed as dist

    from eplb import Topology
    from eplb.runtime import EplbConfig, EplbController
    from eplb.runtime.controller import STEP_KINDS as KINDS

    topology = Topology(WORLD, SLOTS)
    config = EplbConfig.from_dict({"mode": "dynamic", "window_steps": 16, "planner_check_steps": 2,
                                   "policy": "default", "dispatch": dispatch, "layers_per_step": 2,
                                   "planner_deadline_s": 120.0})
    tensors = [[torch.zeros(SLOTS, EXPERT_FLOATS, device=device)] for _ in range(LAYERS)]
    ctl = EplbController(config, LAYERS, EXPERTS, topology, rank, layer_tensors=tensors, device=device)
    rng = np.random.default_rng(rank)
    popularity = rng.dirichlet(np.full(EXPERTS, 0.2), size=LAYERS)
    ids = [torch.as_tensor(rng.choice(EXPERTS, size=(TOKENS, TOP_K), p=popularity[layer])).to(device)
           for layer in range(LAYERS)]
    group_counts = [None] * LAYERS
    if dispatch == "balanced":  # every rank's tokens per expert, the engine's all-gather (once: the ids are fixed)
        own = torch.stack([torch.bincount(x.cpu().reshape(-1), minlength=EXPERTS) for x in ids])
        gathered = [torch.empty_like(own) for _ in range(WORLD)]
        dist.all_gather(gathered, own)
        group_counts = list(torch.stack(gathered, dim=1).to(device))  # [W, E] per layer
    hidden = torch.randn(TOKENS, 2048, device=device)
    weight = torch.randn(2048, 2048, device=device) / 45
    done_flag = torch.zeros(1, dtype=torch.int64)
    kinds = dict.fromkeys(KINDS, 0)
    forwards = []  # (start event, end event, kinds)
    hooks_us: dict = {kind: [] for kind in KINDS}
    steps = 0
    torch.cuda.set_sync_debug_mode("error")
    try:
        while time.monotonic() < deadline:
            start = time.perf_counter()
            ctl.before_forward()
            for layer in range(LAYERS):
                ctl.route(layer, ids[layer], group_counts[layer])
            host = time.perf_counter() - start
            step_kinds = set(ctl.step_kinds)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            x = hidden
            for _ in range(LAYERS):
                x = torch.tanh(x @ weight)
            end.record()
            start = time.perf_counter()
            ctl.after_forward()
            host += time.perf_counter() - start
            forwards.append((begin, end, step_kinds))
            for kind in step_kinds:
                kinds[kind] += 1
                hooks_us[kind].append(host * 1e6)
            steps += 1
            if steps % 8 == 0:  # the test's own agreement to stop, with the sync check paused (it reads a flag)
                torch.cuda.set_sync_debug_mode(0)
                end.synchronize()
                done_flag[0] = int(sum(1 for m in ctl.metrics if m.applied_layers) >= 2 and all(kinds.values()))
                dist.all_reduce(done_flag, op=dist.ReduceOp.MIN)
                torch.cuda.set_sync_debug_mode("error")
                if done_flag[0]:
                    break
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        split_equal = None
        if dispatch == "balanced":
            from eplb.dispatch import balanced_split

            router = ctl.router
            split_equal = all(
                np.array_equal(router.replica_split(layer, group_counts[layer].sum(0)).cpu().numpy(),
                               balanced_split(group_counts[layer].sum(0).cpu().numpy(),
                                              np.where(ranks < WORLD, ranks, -1), WORLD))
                for layer in range(LAYERS) for ranks in [router.split_rank[layer, :-1].cpu().numpy()])
        moving = [b.elapsed_time(e) for b, e, k in forwards if "move" in k]
        still = [b.elapsed_time(e) for b, e, k in forwards if k == {"ordinary"}]
        return {"steps": steps, "kinds": kinds, "sync_error": None, "split_equals_numpy": split_equal,
                "applied_layers": sum(len(m.applied_layers) for m in ctl.metrics),
                "late_steps": sum(m.late_steps for m in ctl.metrics),
                "forward_ratio_during_transfer": (statistics.median(moving) / statistics.median(still)
                                                  if moving and still else None),
                "host_us": {k: {"median": statistics.median(v), "p99": float(np.percentile(v, 99))}
                            for k, v in hooks_us.items() if v},
                "staging_bytes": max((m.staging_bytes for m in ctl.metrics), default=0),
                "added_memory_bytes": ctl.added_memory()}
    except Exception:  # noqa: BLE001 - a host sync under the debug mode raises here; reported, not hidden
        torch.cuda.set_sync_debug_mode(0)
        return {"steps": steps, "kinds": kinds, "sync_error": traceback.format_exc(limit=8)}
    finally:
        ctl.close()


def _rank_main(rank: int, tmp: str) -> None:
    import torch.distributed as dist

    logging.disable(logging.WARNING)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    deadline = time.monotonic() + DEADLINE_S / len(MODES)
    out = {}
    try:
        for dispatch in MODES:
            out[dispatch] = _serve(rank, dispatch, device, deadline)
            deadline = time.monotonic() + DEADLINE_S / len(MODES)
    except Exception:  # noqa: BLE001 - reported in the JSON
        out["error"] = traceback.format_exc()
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    os._exit(0)  # side threads and planner processes are closed; skip the group teardown


def _graph_recording(device: torch.device) -> dict:
    """Route and record 58 layers inside one captured CUDA graph, replayed over steps of both stages with a padded
    batch: the recorder must count exactly the real tokens of the recorded stage (stage ``decode``, ring of 4)."""
    from eplb import Placement, Topology
    from eplb.runtime.recorder import LoadRecorder
    from eplb.runtime.router import ReplicaRouter

    topology = Topology(WORLD, SLOTS)
    placement = Placement.initial(EXPERTS, topology, LAYERS)
    router = ReplicaRouter(placement, 0, "rank", device=device)
    recorder = LoadRecorder(LAYERS, EXPERTS, WORLD, SLOTS, 0, "ids", ring_steps=4, stage="decode", device=device)
    rng = np.random.default_rng(7)
    ids = torch.as_tensor(rng.integers(0, EXPERTS, (TOKENS, TOP_K))).to(device)
    valid = torch.zeros(TOKENS, dtype=torch.bool, device=device)
    real = TOKENS - 37  # the batch is padded to the graph's size
    valid[:real] = True

    def forward():
        for layer in range(LAYERS):
            recorder.record_ids(layer, router.route(layer, ids), valid)

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up outside the capture, as torch.cuda.graphs asks
        recorder.begin_step(is_prefill=False)
        forward()
    torch.cuda.current_stream(device).wait_stream(stream)
    recorder.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    recorder.reset()
    stages = (False, True, False, False, True, False)
    for is_prefill in stages:
        recorder.begin_step(is_prefill=is_prefill)
        graph.replay()
    torch.cuda.synchronize(device)
    slots = router.route(0, ids)[:real].reshape(-1).cpu().numpy()
    expected = np.bincount(slots, minlength=WORLD * SLOTS) * stages.count(False)
    got = recorder.window[0].cpu().numpy()
    ring_rows = recorder.ring[0].sum(dim=1).cpu().numpy()
    return {"graph_recording_ok": bool(np.array_equal(got, expected)),
            "ring_tokens_per_row": ring_rows.tolist(), "real_tokens_x_top_k": real * TOP_K}


def main() -> int:
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA"}))
        return 0
    import torch.multiprocessing as mp

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    started = time.monotonic()
    try:
        graph = _graph_recording(torch.device("cuda", 0))
    except Exception:  # noqa: BLE001 - reported in the JSON
        graph = {"graph_recording_ok": False, "error": traceback.format_exc(limit=6)}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_rank_main, args=(tmp,), nprocs=WORLD, join=False, start_method="spawn")
        while not ctx.join(timeout=1):
            if time.monotonic() - started > DEADLINE_S + 50:
                for p in ctx.processes:
                    p.kill()
                print(json.dumps({"error": "the ranks did not finish in time"}))
                return 1
        ranks = []
        for rank in range(WORLD):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                ranks.append(json.load(f))
    ok = all("error" not in r and all(r[m]["sync_error"] is None and all(r[m]["kinds"].values())
                                      and r[m].get("split_equals_numpy") is not False for m in MODES) for r in ranks)
    ratios = [r[m].get("forward_ratio_during_transfer") for r in ranks for m in MODES if "error" not in r]
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "seconds": time.monotonic() - started,
           "sync_free": ok, "forward_ratio_during_transfer": max((x for x in ratios if x), default=None),
           "cuda_graph_recording": graph, "ranks": ranks}
    print(json.dumps(out, indent=2))
    return 0 if ok and graph["graph_recording_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
