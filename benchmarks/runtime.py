"""What the runtime costs the serving process per step, on CPU, for DeepSeek-V3 sizes.

Prints one JSON object (``--json``; the only output format), medians in microseconds unless a key says otherwise:

- ``route_us`` per dispatch rule and ``record_us``: one MoE layer, ``--tokens`` tokens x top-8, 256 experts on
  EP32 (32 ranks x 9 slots = 288 slots; ``balanced`` includes its water-filling over the replicated experts);
- ``switch_us``: what the serving thread does to switch one layer of a real ``default`` plan (DeepSeek-V3 loads),
  its tables already on the device: recorder fold, row, router tables (``live``), and the weights' copy from staging
  (``weights``, one ``[9, 1024]`` float32 tensor); ``planner_recipes_ms``: what the planner process spends building
  one rank's move recipes and switch tables of that plan (58 layers; the side thread no longer builds them), and
  ``reply_bytes``, the pickled reply the reader thread unpickles;
- ``failover``: :meth:`EplbController.fail_ranks` on one survivor (single process, so no collective) when one rank
  or two ranks of the ``default`` plan fail: milliseconds (median), experts lost, slots this rank reloads from host
  memory (4 KiB experts, so the time is the host work, not a checkpoint read);
- ``staging_schedule``: the move schedule of the ``default`` policy's plan for DeepSeek-V3 (58 layers, 256
  experts, 64 ranks x 5 slots, 44 MB per expert) from the initial placement, with ``bytes_per_step`` 2 GB and
  0.5 GB, device staging only and with the pinned host arena (``gloo`` on an accelerator): apply steps of the cycle
  and the staging peak per rank (bytes) ``before`` (the earlier rule: layers packed by the bytes they move over the
  whole group, at least one per step) and ``after`` (each rank's staging bounded, layers split into parts), and the
  changes left out;
- ``cycle_gloo`` (``--ranks W``, default 2; 0 skips it), per dispatch rule (``--dispatch``, default all four): real
  dynamic cycles over a Gloo group of ``W`` processes (58 layers x 256 experts on ``W`` ranks x ``320 / W`` slots,
  4 KiB per expert, ``default`` policy in the planner process, one layer per apply step; the load profile changes
  every window so that every cycle moves layers; the ranks pass a barrier before each step), rank 0's figures:
  per step kind (:data:`~eplb.runtime.controller.STEP_KINDS`, counted as the controller reports them), the serving
  thread's own CPU time in EPLB's hooks (``hooks_serving_cpu_us``: ``time.thread_time`` of ``before_forward`` and
  ``after_forward``, which a no-EPLB controller spends ~1 us in; median, p99 and the steps of the kind) and the wall
  time EPLB adds to a step, hooks and 58 routes, over a no-EPLB run of the same steps in the same process
  (``added_host_us``: with the waits for a core or the interpreter lock that other threads and processes of a
  shared machine cause); ``record_serving_cpu_us``, what recording adds to the 58 routes of a step (median, any
  kind); ``steps_per_cycle`` of each kind; ``hooks_serving_cpu_ms_per_cycle`` (the hooks' CPU time over every
  step, per applied cycle); ``switches``, ``deferred_switches`` and
  ``deferred_steps`` (switches that waited for transfers spanning more than one forward, and the steps they waited
  beyond the earliest switch); ``late_agreements`` (steps the serving thread waited for an agreement: 0 unless a
  peer hangs); ``forward_ratio_during_transfer``, ``staging_bytes`` and the memory EPLB adds per rank.

    python benchmarks/runtime.py --json [--tokens 256] [--repeats 20] [--ranks 2] [--dispatch rank,balanced]
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from eplb import Placement, Topology, get_policy
from eplb.runtime import EplbConfig, EplbController
from eplb.runtime.controller import STEP_KINDS
from eplb.runtime.recorder import LoadRecorder
from eplb.runtime.router import ReplicaRouter

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sglang_dsv3_ep_statistics.npz"
NUM_LAYERS, NUM_EXPERTS, TOP_K = 58, 256, 8
TOPOLOGY = Topology(32, 9, num_nodes=4, num_groups=8)
TOPOLOGY_64 = Topology(64, 5, num_nodes=8, num_groups=8)
MODES = ("rank", "token", "local", "balanced")


def median_us(fn, repeats: int, inner: int = 1) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times) * 1e6


def dsv3_load() -> np.ndarray:
    if DATA.exists():
        with np.load(DATA) as f:
            return f["counts"][0].astype(np.float64)
    rng = np.random.default_rng(0)
    return rng.zipf(1.3, (NUM_LAYERS, NUM_EXPERTS)).astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="tokens per rank per step")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the Gloo cycle measurement (0: skip)")
    parser.add_argument("--dispatch", default=",".join(MODES), help="dispatch rules of the Gloo cycle, comma-separated")
    parser.add_argument("--json", action="store_true", help="print one JSON object (the only output format)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    load = dsv3_load()
    initial = Placement.initial(NUM_EXPERTS, TOPOLOGY, NUM_LAYERS, layout="spread")
    plan = get_policy("default").rebalance(load, TOPOLOGY, initial).placement
    rng = np.random.default_rng(0)
    p = load[0] / load[0].sum()
    ids = torch.as_tensor(np.stack([rng.choice(NUM_EXPERTS, TOP_K, replace=False, p=p) for _ in range(args.tokens)]))
    rank = 5
    out: dict = {"tokens": args.tokens, "top_k": TOP_K, "topology": TOPOLOGY.describe(), "layers": NUM_LAYERS,
                 "threads": 1, "route_us": {}}
    group_counts = torch.as_tensor(np.stack([np.bincount(ids.numpy().ravel(), minlength=NUM_EXPERTS)] * 32))
    for mode in MODES:
        router = ReplicaRouter(plan, rank, mode)
        extra = (group_counts,) if mode == "balanced" else ()
        out["route_us"][mode] = median_us(lambda: router.route(0, ids, *extra), args.repeats, 10)
    router = ReplicaRouter(plan, rank, "rank")
    slots = router.route(0, ids)
    recorder = LoadRecorder(NUM_LAYERS, NUM_EXPERTS, 32, 9, rank)
    recorder.begin_step()
    out["record_us"] = median_us(lambda: recorder.record_ids(0, slots), args.repeats, 10)
    out.update(switch_costs(initial, load, rank, args.repeats))
    out["failover"] = failover(plan, args.repeats)
    out["staging_schedule"] = staging_schedule(load)
    if args.ranks:
        out["cycle_gloo"] = gloo_cycle(args.ranks, load, args.dispatch.split(","))
    out["note"] = ("CPU, 1 thread per process; medians; a shared 2-core machine under load by other jobs, so "
                   "timings are noisy")
    print(json.dumps(out, indent=2))


def switch_costs(initial: Placement, load: np.ndarray, rank: int, repeats: int) -> dict:
    """The serving thread's switch of one layer (tables already uploaded), and the planner's side of it."""
    from eplb.cycle import CycleConfig
    from eplb.cycle.planning import plan_cycle
    from eplb.runtime.in_force import PlacementInForce
    from eplb.runtime.planner import PlannerReply
    from eplb.runtime.recipes import rank_recipes

    plan = plan_cycle(get_policy("default"), load, initial, CycleConfig(cycle_steps=1), 4096)
    router = ReplicaRouter(initial, rank, "rank")
    recorder = LoadRecorder(NUM_LAYERS, NUM_EXPERTS, 32, 9, rank)
    in_force = PlacementInForce(initial, rank, router, recorder)
    spec = router.spec
    start = time.perf_counter()
    moves, switches = rank_recipes(plan.parts, spec, NUM_EXPERTS, TOPOLOGY)
    recipes_ms = (time.perf_counter() - start) * 1e3
    reply = pickle.dumps(PlannerReply(0, plan, 0.0, moves, switches))
    tables = in_force.upload(switches[0])
    weights, staging = torch.zeros(TOPOLOGY.slots_per_rank, 1024), torch.zeros(TOPOLOGY.slots_per_rank, 1024)
    dst, row = torch.arange(TOPOLOGY.slots_per_rank), torch.arange(TOPOLOGY.slots_per_rank)
    switch = {"live": median_us(lambda: in_force.switch(tables), repeats, 10),
              "weights": median_us(lambda: weights.index_copy_(0, dst, staging.index_select(0, row)), repeats, 10)}
    switch["total"] = sum(switch.values())
    return {"switch_us": switch, "planner_recipes_ms": recipes_ms, "reply_bytes": len(reply),
            "changed_layers": len(plan.layers)}


def failover(plan: Placement, repeats: int) -> dict:
    """fail_ranks on rank 31 when rank 3, or ranks 3 and 20, fail; a fresh controller per run."""
    config = EplbConfig.from_dict({"mode": "off"})
    expert = torch.zeros(1024)
    out = {}
    for name, failed in (("rank", [3]), ("two_ranks", [3, 20])):
        times, report = [], None
        for _ in range(max(3, repeats // 4)):
            tensors = [[torch.zeros(TOPOLOGY.slots_per_rank, 1024)] for _ in range(NUM_LAYERS)]
            ctl = EplbController(config, NUM_LAYERS, NUM_EXPERTS, TOPOLOGY, 31, layer_tensors=tensors,
                                 placement=plan, expert_loader=lambda layer, e: [expert])
            start = time.perf_counter()
            report = ctl.fail_ranks(failed)
            times.append(time.perf_counter() - start)
            ctl.close()
        out[name] = {"ms": statistics.median(times) * 1e3, "lost_experts": int(len(report.lost)),
                     "reloaded_here": int(len(report.reloaded))}
    return out


def staging_schedule(load: np.ndarray) -> dict:
    """Apply steps and staging peak per rank of one DeepSeek-V3 cycle, before and after bounding each rank's
    staging (see the module docstring)."""
    from eplb.cycle import CycleConfig
    from eplb.cycle.planning import plan_cycle
    from eplb.cycle.staging import staged_experts
    from eplb.sim.cost import DEEPSEEK_V3_EXPERT_BYTES

    initial = Placement.initial(NUM_EXPERTS, TOPOLOGY_64, NUM_LAYERS, layout="spread")
    out = {"expert_bytes": int(DEEPSEEK_V3_EXPERT_BYTES), "topology": TOPOLOGY_64.describe()}
    whole = plan_cycle(get_policy("default"), load, initial, CycleConfig(cycle_steps=1), DEEPSEEK_V3_EXPERT_BYTES)
    for budget in (2e9, 0.5e9):
        for host in (False, True):
            cycle = CycleConfig(cycle_steps=1, bytes_per_step=budget, host_staging=host)
            start = time.perf_counter()
            plan = plan_cycle(get_policy("default"), load, initial, cycle, DEEPSEEK_V3_EXPERT_BYTES)
            seconds = time.perf_counter() - start
            steps, used = [], budget  # the earlier rule: whole layers, by the bytes they move over the group
            for transfer in whole.parts:
                size = int(whole.layer_bytes[transfer.layer])
                if not steps or used + size > budget:
                    steps.append([])
                    used = 0
                steps[-1].append(transfer)
                used += size
            before = max(sum(staged_experts(t, host).sum(axis=0) for t in step).max() for step in steps)
            out[f"{budget / 1e9:g}GB{'_host' if host else ''}"] = {
                "layers": len(plan.layers),
                "before": {"steps": len(steps), "staging_peak_bytes": int(before) * int(DEEPSEEK_V3_EXPERT_BYTES)},
                "after": {"steps": len(plan.schedule), "staging_peak_bytes": int(plan.staged_bytes.max()),
                          "parts": len(plan.parts), "left_out_slots": int(len(plan.left_out))},
                "plan_s": seconds}
    return out


def gloo_cycle(num_ranks: int, load: np.ndarray, modes: list[str]) -> dict:
    """Per dispatch rule, what EPLB adds per step kind on a real Gloo group (rank 0's figures)."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gloo_rank, args=(num_ranks, tmp, load, modes), nprocs=num_ranks, join=True)
        return json.loads(Path(tmp, "rank0.json").read_text())


def _forward(hidden: torch.Tensor, weight: torch.Tensor) -> float:
    """A stand-in forward (one matmul per layer); its seconds."""
    start = time.perf_counter()
    for _ in range(NUM_LAYERS):
        hidden = torch.tanh(hidden @ weight)
    return time.perf_counter() - start


def _serve_steps(ctl, ids, counts, steps: int, hidden, weight, until=None):
    """Serve ``steps`` steps (every rank together); per step: (hooks and routes wall seconds, forward seconds, kinds,
    the hooks' serving-thread CPU seconds, the routes' serving-thread CPU seconds). ``ids`` and ``counts`` (the
    group's tokens per expert, for ``balanced``) follow the controller's cycle: a new load profile every window."""
    import torch.distributed as dist

    rows = []
    for _ in range(steps):
        profile = len(ctl.metrics) % len(ids)
        dist.barrier()  # start every step together, so hook times do not include another rank's lag
        start, cpu = time.perf_counter(), time.thread_time()
        ctl.before_forward()
        hooks_cpu = time.thread_time() - cpu
        cpu = time.thread_time()
        for layer in range(NUM_LAYERS):
            ctl.route(layer, ids[profile][layer], counts[profile][layer])
        routes_cpu = time.thread_time() - cpu
        wall = time.perf_counter() - start
        kinds = set(ctl.step_kinds)
        forward = _forward(hidden, weight)
        start, cpu = time.perf_counter(), time.thread_time()
        ctl.after_forward()
        wall += time.perf_counter() - start
        hooks_cpu += time.thread_time() - cpu
        rows.append((wall, forward, kinds, hooks_cpu, routes_cpu))
        if until is not None:
            done = torch.tensor([int(until(ctl))])
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
            if done[0]:
                break
    return rows


def _profiles(rank: int, num_ranks: int, load: np.ndarray, dispatch: str) -> tuple[list, list]:
    """Three load profiles (the real loads, skewed two more ways): this rank's ids per layer, and every rank's
    tokens per expert for ``balanced`` (an engine's all-gather, done here once, outside the measured steps)."""
    import torch.distributed as dist

    ids, counts = [], []
    for seed in range(3):
        skew = np.random.default_rng(seed).dirichlet(np.full(NUM_EXPERTS, 0.5), size=NUM_LAYERS) if seed else 1.0
        p = load * skew
        p = p / p.sum(axis=1, keepdims=True)
        rng = np.random.default_rng([rank, seed])
        ids.append([torch.as_tensor(rng.choice(NUM_EXPERTS, (64, TOP_K), p=p[l])) for l in range(NUM_LAYERS)])
        counts.append([None] * NUM_LAYERS)
        if dispatch == "balanced":
            own = torch.stack([torch.bincount(x.reshape(-1), minlength=NUM_EXPERTS) for x in ids[-1]])
            gathered = [torch.empty_like(own) for _ in range(num_ranks)]
            dist.all_gather(gathered, own)
            counts[-1] = list(torch.stack(gathered, dim=1))  # [W, E] per layer
    return ids, counts


def _gloo_rank(rank: int, num_ranks: int, tmp: str, load: np.ndarray, modes: list[str]) -> None:
    import torch.distributed as dist

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=num_ranks)
    out = {mode: _gloo_mode(rank, num_ranks, load, mode) for mode in modes}
    if rank == 0:
        Path(tmp, "rank0.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def _gloo_mode(rank: int, num_ranks: int, load: np.ndarray, dispatch: str) -> dict:
    topology = Topology(num_ranks, TOPOLOGY_64.num_physical // num_ranks)
    placement = Placement.initial(NUM_EXPERTS, topology, NUM_LAYERS, layout="spread")
    ids, counts = _profiles(rank, num_ranks, load, dispatch)
    hidden, weight = torch.randn(64, 256), torch.randn(256, 256) / 16
    baseline_ctl = EplbController(EplbConfig.from_dict({"mode": "off", "dispatch": dispatch}), NUM_LAYERS,
                                  NUM_EXPERTS, topology, rank, placement=placement)
    baseline = _serve_steps(baseline_ctl, ids, counts, 200, hidden, weight)
    base_us = statistics.median(row[0] for row in baseline) * 1e6
    base_routes_us = statistics.median(row[4] for row in baseline) * 1e6
    tensors = [[torch.zeros(topology.slots_per_rank, 1024)] for _ in range(NUM_LAYERS)]
    config = EplbConfig.from_dict({"mode": "dynamic", "window_steps": 20, "planner_check_steps": 4,
                                   "policy": "default", "dispatch": dispatch})
    ctl = EplbController(config, NUM_LAYERS, NUM_EXPERTS, topology, rank, layer_tensors=tensors,
                         placement=placement)
    try:
        rows = _serve_steps(ctl, ids, counts, 4000, hidden, weight,
                            until=lambda c: sum(1 for m in c.metrics if m.applied_layers) >= 3)
        cycles = max(1, sum(1 for m in ctl.metrics if m.applied_layers))
        added, cpu = {}, {}
        for kind in STEP_KINDS:
            wall = [row[0] * 1e6 - base_us for row in rows if kind in row[2]]
            own = [row[3] * 1e6 for row in rows if kind in row[2]]
            if own:
                added[kind] = {"median": float(np.median(wall)), "p99": float(np.percentile(wall, 99))}
                cpu[kind] = {"median": float(np.median(own)), "p99": float(np.percentile(own, 99)),
                             "steps": len(own)}
        moving = [row[1] for row in rows if {"move", "landing"} & row[2]]
        still = [row[1] for row in rows if row[2] == {"ordinary"}]
        records = [r for r in ctl.cycle.records if r.switch_steps]
        return {"ranks": num_ranks, "topology": topology.describe(), "steps": len(rows),
                "baseline_host_us": base_us, "hooks_serving_cpu_us": cpu, "added_host_us": added,
                "record_serving_cpu_us": statistics.median(row[4] for row in rows) * 1e6 - base_routes_us,
                "steps_per_cycle": {kind: cpu[kind]["steps"] / cycles for kind in cpu},
                "hooks_serving_cpu_ms_per_cycle": sum(row[3] for row in rows) * 1e3 / cycles,
                "switches": sum(len(r.switch_steps) for r in records),
                "deferred_switches": sum(1 for r in records for a, b in zip([r.apply_start] + r.switch_steps,
                                                                            r.switch_steps) if b - a > 2),
                "deferred_steps": sum(r.deferred_steps for r in records),
                "late_agreements": sum(m.late_steps for m in ctl.metrics),
                "forward_ratio_during_transfer": statistics.median(moving) / statistics.median(still),
                "staging_bytes": max(m.staging_bytes for m in ctl.metrics),
                "added_memory_bytes": ctl.added_memory(),
                "layers_switched": sum(len(m.applied_layers) for m in ctl.metrics)}
    finally:
        ctl.close()


if __name__ == "__main__":
    main()
