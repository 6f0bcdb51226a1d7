"""What the runtime costs the serving process per step, on CPU, for DeepSeek-V3 sizes.

Prints one JSON object with medians (microseconds) over ``--repeats`` runs:

- ``route_us`` per router mode and ``record_us``: one MoE layer, ``--tokens`` tokens x top-8, 256 experts on
  EP32 (32 ranks x 9 slots = 288 slots; ``balanced`` includes its water-filling over the replicated experts);
- ``step_hooks_us``: ``before_forward`` + ``after_forward`` of an :class:`EplbController` (58 layers, record mode,
  single process) in an ordinary step, in a step that polls the planner, and ``submit_us`` in the step that
  closes a heat window (logical load of 58 x 288 slots, planner hand-off; without a process group, so the
  all-reduce itself is not included);
- ``layer_switch_us``: the host work of switching one layer in ``after_forward`` besides the transfer itself:
  the commit recipe (``rank_fills``), the router's table update and the recorder's fold, for a layer of a real plan
  of the ``default`` policy on the SGLang DeepSeek-V3 loads;
- ``blocked_per_step_us``: per-step total for 58 layers (route + record on every layer + hooks), the figure to
  compare with the 1 ms target; ``blocked_per_cycle_ms``: the steps of a cycle that do more than the ordinary
  step (submit, planner checks, one switch per changed layer), summed.
- ``failover``: :meth:`EplbController.fail_ranks` on one survivor (single process, so no collective) when one rank
  or two ranks of the ``default`` plan fail (a whole node of 8 would leave 216 slots for 256 experts): milliseconds
  (median), experts lost, slots this rank reloads from host memory (4 KiB experts, so the time is the host work,
  not a checkpoint read);
- ``staging_schedule``: the move schedule of the ``default`` policy's plan for DeepSeek-V3 (58 layers, 256
  experts, 64 ranks x 5 slots, 44 MB per expert) from the initial placement, with ``bytes_per_step`` 2 GB and
  0.5 GB, device staging only and with the pinned host arena (``gloo`` on an accelerator): apply steps of the cycle
  and the staging peak per rank (bytes) ``before`` (the earlier rule: layers packed by the bytes they move over the
  whole group, at least one per step) and ``after`` (each rank's staging bounded, layers split into parts), and the
  changes left out;
- ``cycle_gloo`` (``--ranks W``, default 2; 0 skips it): a real dynamic cycle over a Gloo group of ``W`` processes
  (58 layers x 256 experts on ``W`` ranks x ``288 / W`` slots, 4 KiB per expert, ``default`` policy in the planner
  process, the default one layer per move step; the ranks pass a barrier before each step): per step kind, the host
  time EPLB adds over a no-EPLB baseline run in the same process (``added_host_us``: wall time of the hooks and
  the 58 routes, median and p99) and the part of it the serving thread itself spends on the CPU
  (``added_serving_cpu_us``, ``time.thread_time``: EPLB's own work, without the waits for a core or the
  interpreter lock that other threads and processes of a 2-core machine cause), ``forward_ratio_during_transfer``,
  ``staging_bytes`` and the memory EPLB adds per rank.

    python benchmarks/runtime.py [--tokens 256] [--repeats 20] [--ranks 2]
"""

from __future__ import annotations

import argparse
import json
import logging
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
from eplb.transfers import layer_transfer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sglang_dsv3_ep_statistics.npz"
NUM_LAYERS, NUM_EXPERTS, TOP_K = 58, 256, 8
TOPOLOGY = Topology(32, 9, num_nodes=4, num_groups=8)
TOPOLOGY_64 = Topology(64, 5, num_nodes=8, num_groups=8)


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
    for mode in ("rank", "token", "local", "balanced"):
        router = ReplicaRouter(plan, rank, mode)
        extra = (group_counts,) if mode == "balanced" else ()
        out["route_us"][mode] = median_us(lambda: router.route(0, ids, *extra), args.repeats, 10)
    router = ReplicaRouter(plan, rank, "rank")
    slots = router.route(0, ids)
    recorder = LoadRecorder(NUM_LAYERS, NUM_EXPERTS, 32, 9, rank)
    recorder.begin_step()
    out["record_us"] = median_us(lambda: recorder.record_ids(0, slots), args.repeats, 10)

    import tempfile

    record_path = str(Path(tempfile.mkdtemp()) / "map.json")
    config = EplbConfig.from_dict({"mode": "record", "window_steps": 10**9, "policy": "default",
                                   "record_path": record_path})
    ctl = EplbController(config, NUM_LAYERS, NUM_EXPERTS, TOPOLOGY, rank, placement=plan)
    try:
        def plain_step():
            ctl.before_forward()
            ctl.after_forward()

        hooks = {"collect": median_us(plain_step, args.repeats, 10)}
        out["submit_us"] = median_us(lambda: ctl.gather_load(), args.repeats)
        ctl.planner.submit(_request(ctl, load))
        hooks["poll"] = median_us(lambda: ctl.planner.poll(), args.repeats, 10)
        out["step_hooks_us"] = hooks
    finally:
        ctl.close()

    changed = np.flatnonzero(initial.moves_to(plan).any(axis=1))
    layer = int(changed[0]) if changed.size else 0
    transfer = layer_transfer(layer, initial.phy2log[layer], plan.phy2log[layer], TOPOLOGY)
    old_row = torch.as_tensor(np.array(initial.phy2log[layer]))
    switch = {
        "rank_fills": median_us(lambda: transfer.rank_fills(rank), args.repeats),
        "router_update": median_us(lambda: router.update_layer(layer, plan.phy2log[layer]), args.repeats),
        "recorder_fold": median_us(lambda: recorder.fold_layer(layer, old_row), args.repeats),
    }
    switch["total"] = sum(switch.values())
    out["layer_switch_us"] = switch
    out["changed_layers"] = int(changed.size)
    out["transfers_per_layer"] = int(transfer.num_transfers)
    per_layer = out["route_us"]["rank"] + out["record_us"]
    out["blocked_per_step_us"] = NUM_LAYERS * per_layer + hooks["collect"]
    checks = 4  # planner agreement checks in a typical cycle (planner_check_steps=8, ~30 steps of planning)
    out["blocked_per_cycle_ms"] = (out["submit_us"] + checks * hooks["poll"] + changed.size * switch["total"]) / 1e3
    out["failover"] = failover(plan, args.repeats)
    out["staging_schedule"] = staging_schedule(load)
    if args.ranks:
        cycle = gloo_cycle(args.ranks, load)
        for key in ("added_host_us", "added_serving_cpu_us", "forward_ratio_during_transfer", "staging_bytes"):
            out[key] = cycle.pop(key)
        out["cycle_gloo"] = cycle
    out["note"] = ("CPU, 1 thread per process; medians; a shared 2-core machine under load by other jobs, so "
                   "timings are noisy")
    print(json.dumps(out, indent=2))


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
    from eplb.planning import plan_cycle
    from eplb.sim.cost import DEEPSEEK_V3_EXPERT_BYTES
    from eplb.staging import staged_experts

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
            for transfer in whole.transfers:
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
                          "parts": len(plan.transfers), "left_out_slots": int(len(plan.left_out))},
                "plan_s": seconds}
    return out


def gloo_cycle(num_ranks: int, load: np.ndarray) -> dict:
    """Per step kind, the host time EPLB adds over a no-EPLB baseline, on a real Gloo group (rank 0's figures)."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gloo_rank, args=(num_ranks, tmp, load), nprocs=num_ranks, join=True)
        return json.loads(Path(tmp, "rank0.json").read_text())


def _forward(hidden: torch.Tensor, weight: torch.Tensor) -> float:
    """A stand-in forward (one matmul per layer); its seconds."""
    start = time.perf_counter()
    for _ in range(NUM_LAYERS):
        hidden = torch.tanh(hidden @ weight)
    return time.perf_counter() - start


def _serve_steps(ctl, ids, steps: int, hidden, weight, until=None):
    """Serve ``steps`` steps (every rank together); per step: (hook seconds, forward seconds, kinds, hook seconds of
    the serving thread's own CPU time)."""
    import torch.distributed as dist

    rows = []
    for _ in range(steps):
        dist.barrier()  # start every step together, so hook times do not include another rank's lag
        start, cpu = time.perf_counter(), time.thread_time()
        ctl.before_forward()
        for layer in range(NUM_LAYERS):
            ctl.route(layer, ids[layer])
        hooks, hooks_cpu = time.perf_counter() - start, time.thread_time() - cpu
        kinds = set(ctl.step_kinds)
        forward = _forward(hidden, weight)
        start, cpu = time.perf_counter(), time.thread_time()
        ctl.after_forward()
        hooks += time.perf_counter() - start
        hooks_cpu += time.thread_time() - cpu
        rows.append((hooks, forward, kinds, hooks_cpu))
        if until is not None:
            done = torch.tensor([int(until(ctl))])
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
            if done[0]:
                break
    return rows


def _gloo_rank(rank: int, num_ranks: int, tmp: str, load: np.ndarray) -> None:
    import torch.distributed as dist

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=num_ranks)
    topology = Topology(num_ranks, TOPOLOGY_64.num_physical // num_ranks)
    placement = Placement.initial(NUM_EXPERTS, topology, NUM_LAYERS, layout="spread")
    p = load / load.sum(axis=1, keepdims=True)
    rng = np.random.default_rng(rank)
    ids = [torch.as_tensor(rng.choice(NUM_EXPERTS, (64, TOP_K), p=p[l])) for l in range(NUM_LAYERS)]
    hidden, weight = torch.randn(64, 256), torch.randn(256, 256) / 16
    baseline_ctl = EplbController(EplbConfig.from_dict({"mode": "off"}), NUM_LAYERS, NUM_EXPERTS, topology, rank,
                                  placement=placement)
    baseline = _serve_steps(baseline_ctl, ids, 200, hidden, weight)
    base_us = statistics.median(row[0] for row in baseline) * 1e6
    base_cpu_us = statistics.median(row[3] for row in baseline) * 1e6
    tensors = [[torch.zeros(topology.slots_per_rank, 1024)] for _ in range(NUM_LAYERS)]
    config = EplbConfig.from_dict({"mode": "dynamic", "window_steps": 20, "planner_check_steps": 4,
                                   "policy": "default"})
    ctl = EplbController(config, NUM_LAYERS, NUM_EXPERTS, topology, rank, layer_tensors=tensors,
                         placement=placement)
    try:
        rows = _serve_steps(ctl, ids, 3000, hidden, weight,
                            until=lambda c: sum(1 for m in c.metrics if m.applied_layers) >= 3
                            and c.cycle.phase.value == "collect" and c._pending is None)
        added, added_cpu = {}, {}
        for kind in STEP_KINDS:
            values = [h * 1e6 - base_us for h, _, k, _ in rows if kind in k]
            cpu = [c * 1e6 - base_cpu_us for _, _, k, c in rows if kind in k]
            if values:
                added[kind] = {"median": float(np.median(values)), "p99": float(np.percentile(values, 99)),
                               "steps": len(values)}
                added_cpu[kind] = {"median": float(np.median(cpu)), "p99": float(np.percentile(cpu, 99))}
        moving = [f for _, f, k, _ in rows if "move" in k]
        still = [f for _, f, k, _ in rows if k == {"ordinary"}]
        out = {"ranks": num_ranks, "topology": topology.describe(), "steps": len(rows),
               "baseline_host_us": base_us, "added_host_us": added, "added_serving_cpu_us": added_cpu,
               "forward_ratio_during_transfer": statistics.median(moving) / statistics.median(still),
               "staging_bytes": max(m.staging_bytes for m in ctl.metrics),
               "added_memory_bytes": ctl.added_memory(),
               "late_steps": sum(m.late_steps for m in ctl.metrics),
               "layers_switched": sum(len(m.applied_layers) for m in ctl.metrics)}
        if rank == 0:
            Path(tmp, "rank0.json").write_text(json.dumps(out))
    finally:
        ctl.close()
        dist.destroy_process_group()


def _request(ctl, load):
    from eplb.runtime.planner import PlanRequest

    return PlanRequest(0, load, ctl.live.phy2log.copy(), ctl.topology, "default", {})


if __name__ == "__main__":
    main()
