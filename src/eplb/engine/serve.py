"""One rank's serving loop: the model, the runtime controller, the skewed workload, and (for tests) faults.

:func:`serve_rank` is the ``target`` of :func:`eplb.engine.launch.launch`. Per step it calls the controller's hooks
around the forward exactly as an engine would, and emits ``("step", step, seconds, rows, switched, expert_cpu_s)``
(``rows`` int ``[L]``: the token x expert rows this rank's experts computed per layer; ``switched``: a layer's
placement changed in this step; ``expert_cpu_s``: CPU seconds in its experts) and, once per finished cycle,
``("cycle", figures)``.
At the end it runs a fixed batch through the balanced model and through the same model without balancing (initial
placement, EPLB off) and compares the outputs.

Rank failures (``Faults.kill_ranks``, in a launch with ``rank_failures=True``): the chosen ranks' processes exit (or
are killed, or hang: ``Faults.kill_signal``) at the start of a step. The survivors find out when a collective with a
failed rank raises, or, with EPLB's heartbeat on (``heartbeat_interval_s``), when the heartbeat declares the rank
failed (a hung rank never makes a collective raise: the serving group's collectives are waited through the heartbeat,
:meth:`eplb.engine.model.MoEModel.wait`). They take the failed ranks from the heartbeat (agreed by all survivors) or
else from the launcher (:func:`eplb.engine.launch.failure_notice`), build the survivors' process group, fail over
(:meth:`eplb.runtime.EplbController.fail_ranks`) and serve the interrupted step's batch again. Each survivor emits
``("failover", figures)``; a rank about to fail emits ``("dying", time.time())``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from eplb.engine.model import ModelConfig, MoEModel, expert_weights
from eplb.engine.tokens import SkewedTokens, expert_popularity
from eplb.errors import EplbError, EplbFailure
from eplb.topology import Topology

__all__ = ["ServeSettings", "Faults", "serve_rank", "cycle_figures", "rank_device", "serving_backend"]

_CHECK_SEED = 987654321
_CALIBRATION_SEED = 123456789
_CALIBRATION_TOKENS = 4096
#: outputs "equal": |balanced - unbalanced| <= 1e-6 x max(1, |unbalanced|) element-wise (float32 rounding)
OUTPUT_TOLERANCE = 1e-6
_KILL_SIGNALS = ("exit", "SIGKILL", "SIGSTOP")
#: how much later than its timeout a survivor still waits for the heartbeat's verdict after a collective raised: its
#: thread can be held off a loaded CPU; only a collective error with another cause waits this long before it raises
_LATE_HEARTBEAT_S = 30.0


@dataclass(frozen=True)
class Faults:
    """Faults injected on purpose (tests). Cycles are 0-based; ``None`` disables a fault.

    Attributes:
        kill_planner: ``(rank, cycle)``: that rank's planner process is stopped before the cycle's window is
            handed over and killed (SIGKILL) right after, so it dies holding the request.
        hang_planner: ``(rank, cycle)``: that rank's planner process is stopped (SIGSTOP) before the cycle's window
            is handed over: it hangs until the runtime's deadline kills it.
        late_rank: ``(rank, seconds)``: that rank sleeps this long before ``before_forward`` (where it posts its
            sends of a move) in each of the ``L + 2`` steps after a plan was accepted (one layer moves per step).
        kill_ranks: ``((rank, ...), cycle)``: those rank processes exit at the start of the step after the first
            layer of that cycle switched (so, mid-move when the plan moves several layers), or after the cycle was
            skipped; a node failure when they are a node's ranks. Needs a launch with ``rank_failures=True``.
        kill_signal: how they fail: ``exit`` (``os._exit``), ``SIGKILL`` or ``SIGSTOP`` (the process hangs, alive,
            its sockets open: no collective ever raises; the launcher kills it once the heartbeat declared it
            failed).
    """

    kill_planner: tuple[int, int] | None = None
    hang_planner: tuple[int, int] | None = None
    late_rank: tuple[int, float] | None = None
    kill_ranks: tuple[tuple[int, ...], int] | None = None
    kill_signal: str = "exit"

    def __post_init__(self):
        if self.kill_signal not in _KILL_SIGNALS:
            raise EplbError(f"kill_signal must be one of {', '.join(_KILL_SIGNALS)}, got {self.kill_signal!r}")
        ranks = [f[0] for f in (self.kill_planner, self.hang_planner) if f is not None]
        if len(ranks) != len(set(ranks)):
            raise EplbError("kill_planner and hang_planner must hit different ranks")


@dataclass(frozen=True)
class ServeSettings:
    """What one demo run serves.

    Attributes:
        model: the model.
        slots_per_rank: K (``K * W - E`` redundant slots in all).
        num_nodes: nodes the ranks are spread over (consecutive ranks share a node).
        tokens_per_rank: tokens each rank serves per step.
        steps: steps to serve (at most).
        eplb: the runtime's config dict (:meth:`eplb.runtime.EplbConfig.from_dict` keys).
        trace: optional load ``[T, L, E]`` / ``[L, E]`` whose popularity replaces the DeepSeek-V3-like profile.
        stop_after_cycles: stop early once every rank knows the outcome of this many cycles (a plan accepted or the
            cycle skipped; checked every 10 steps).
        faults: faults to inject.
        device: ``cpu``, or ``cuda`` (:func:`rank_device`: ranks share GPUs when there are fewer GPUs than ranks).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    slots_per_rank: int = 5
    num_nodes: int = 1
    tokens_per_rank: int = 128
    steps: int = 240
    eplb: dict = field(default_factory=dict)
    trace: np.ndarray | None = None
    stop_after_cycles: int | None = None
    faults: Faults = field(default_factory=Faults)
    device: str = "cpu"


def rank_device(device: str, rank: int, gpus: int | None = None) -> torch.device:
    """The device ``rank`` serves on: the CPU, or with ``device="cuda"`` GPU ``rank mod gpus`` (``gpus``: default the
    GPUs torch sees), so that two ranks share one GPU when there are fewer GPUs than ranks."""
    if device != "cuda":
        return torch.device("cpu")
    gpus = torch.cuda.device_count() if gpus is None else gpus
    return torch.device("cuda", rank % max(gpus, 1))


def serving_backend(device: str, ranks: int, gpus: int | None = None) -> str:
    """The serving group's backend: ``nccl`` when every rank has a GPU of its own, else ``gloo`` (the CPU, or ranks
    sharing a GPU: NCCL refuses two ranks on one device, Gloo runs the model's collectives on CUDA tensors too)."""
    if device != "cuda":
        return "gloo"
    gpus = torch.cuda.device_count() if gpus is None else gpus
    return "nccl" if gpus >= ranks else "gloo"


def cycle_figures(metrics) -> dict:
    """A picklable summary of one :class:`eplb.runtime.controller.CycleMetrics` (means over layers)."""
    def mean(values):
        return None if values is None else float(np.mean(values))

    return {"cycle": metrics.cycle, "submit_step": metrics.submit_step, "window_par": mean(metrics.window_par),
            "next_window_par": mean(metrics.next_window_par), "predicted_par_before": mean(metrics.par_before),
            "predicted_par_after": mean(metrics.par_after), "applied_layers": list(metrics.applied_layers),
            "moved_slots": int(metrics.moved_slots), "bytes_received": int(metrics.bytes_received),
            "planner_s": float(metrics.planner_s), "transfer_s": float(metrics.transfer_s),
            "staging_bytes": int(metrics.staging_bytes), "skipped": metrics.skipped}


def _build(settings: ServeSettings, rank: int, world: int, eplb: dict, device, popularity=None, gate_bias=None,
           calibration_tokens=None):
    from eplb.runtime import EplbConfig, EplbController

    topology = Topology(world, settings.slots_per_rank, settings.num_nodes)
    cfg = settings.model
    w13, w2 = MoEModel.allocate_experts(cfg, settings.slots_per_rank, device)

    def checkpoint(layer: int, expert: int):  # the weights as a checkpoint would give them back
        return [t.to(device) for t in expert_weights(cfg, layer, expert)]

    controller = EplbController(EplbConfig.from_dict(eplb), cfg.num_layers, cfg.num_experts, topology, rank,
                                layer_tensors=[[w13[l], w2[l]] for l in range(cfg.num_layers)], device=device,
                                expert_loader=checkpoint)
    return MoEModel(cfg, controller, (w13, w2), popularity, gate_bias, calibration_tokens, device=device)


def _signal_planner(controller, sig) -> None:
    pid = controller.planner.pid if controller.planner is not None else None
    if pid is not None:
        os.kill(pid, sig)


class _FaultInjector:
    """Applies :class:`Faults` to this rank around the controller's hooks."""

    def __init__(self, faults: Faults, rank: int, num_layers: int):
        self.faults, self.rank, self.num_layers = faults, rank, num_layers
        self.stopped_for: int | None = None
        self.accepted: dict[int, int] = {}  # cycle -> first step at which its plan was seen accepted

    def before_step(self, ctl) -> None:
        for fault in (self.faults.kill_planner, self.faults.hang_planner):
            if fault is None or fault[0] != self.rank or self.stopped_for is not None:
                continue
            cycle = fault[1]
            previous_done = cycle == 0 or (len(ctl.metrics) == cycle and (
                ctl.metrics[-1].par_after is not None or ctl.metrics[-1].skipped is not None))
            if len(ctl.metrics) == cycle and previous_done:
                _signal_planner(ctl, signal.SIGSTOP)  # idle, waiting for its next request: it will never take it
                self.stopped_for = cycle
        late = self.faults.late_rank
        if late is None or late[0] != self.rank or not ctl.metrics or ctl.metrics[-1].par_after is None:
            return
        accepted = self.accepted.setdefault(ctl.metrics[-1].cycle, ctl.step)
        if ctl.step < accepted + self.num_layers + 2:
            time.sleep(late[1])

    def doomed(self, ctl) -> bool:
        """Whether this rank's process dies now (:attr:`Faults.kill_ranks`)."""
        kill = self.faults.kill_ranks
        if kill is None or self.rank not in kill[0] or len(ctl.metrics) <= kill[1]:
            return False
        metrics = ctl.metrics[kill[1]]
        return bool(metrics.applied_layers) or metrics.skipped is not None or len(ctl.metrics) > kill[1] + 1

    def after_submit(self, ctl) -> None:
        fault = self.faults.kill_planner
        if fault is not None and self.stopped_for == fault[1] and len(ctl.metrics) == fault[1] + 1:
            ctl.channel.drain()  # the side thread hands the window over: the worker must die holding it
            _signal_planner(ctl, signal.SIGKILL)
            self.stopped_for = -1


def _die(how: str) -> None:
    from eplb.engine.launch import last_words

    last_words(("dying", time.time()))
    if how == "exit":
        os._exit(17)  # the process is gone: no cleanup, no goodbye to the group
    os.kill(os.getpid(), getattr(signal, how))


def _fail_over(model: MoEModel, events: int, interrupted: Exception):
    """After a collective raised: the failed ranks (agreed through the heartbeat when it runs, else the launcher's
    ``events``-th failure notice), the survivors' group, failover."""
    from eplb.engine.launch import failure_notice
    from eplb.runtime.heartbeat import survivors_group

    heartbeat = model.ctl.heartbeat
    if heartbeat is not None:
        try:  # a dead peer's socket error comes before its beat times out; the heartbeat may run late on a busy host
            heartbeat.wait_for_failure(heartbeat.timeout_s + 2 * heartbeat.interval_s + _LATE_HEARTBEAT_S)
        except EplbFailure:
            raise interrupted from None
        failed = heartbeat.failed_peers()
    else:
        failed = failure_notice(events)
    if model.rank in failed:  # this rank stopped too long and the others went on without it
        raise interrupted
    live = np.ones(model.num_ranks, dtype=bool)
    live[failed] = False
    group = survivors_group(list(range(model.num_ranks)), failed)
    report = model.ctl.fail_ranks(failed, group)
    model.use_group(group, live)
    return report


def _router_digest(ctl) -> int:
    """A digest of the router's tables: equal on two ranks when they route with the same placement."""
    return zlib.crc32(ctl.router.log2phy.cpu().numpy().tobytes())


def serve_rank(rank: int, world: int, emit, settings: ServeSettings) -> dict:
    """Serve ``settings.steps`` steps on this rank; see the module docstring. Returns a picklable dict."""
    device = rank_device(settings.device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = settings.model
    popularity = expert_popularity(cfg.num_layers, cfg.num_experts, cfg.top_k, cfg.seed, settings.trace)
    sample = SkewedTokens(cfg.vocab, _CALIBRATION_TOKENS, _CALIBRATION_SEED).batch(0, 0)
    model = _build(settings, rank, world, settings.eplb, device, popularity=popularity, calibration_tokens=sample)
    ctl = model.ctl
    emit(("ready",))
    tokens = SkewedTokens(cfg.vocab, settings.tokens_per_rank, cfg.seed)
    faults = _FaultInjector(settings.faults, rank, cfg.num_layers)
    reported, digests, steps, failovers = 0, [], [], []
    kill = settings.faults.kill_ranks
    step = 0
    try:
        while step < settings.steps:
            if faults.doomed(ctl):
                _die(settings.faults.kill_signal)
            batch = tokens.batch(step, rank).to(device)
            faults.before_step(ctl)
            start = time.perf_counter()
            try:
                ctl.before_forward(is_prefill=False)
                faults.after_submit(ctl)
                model.forward(batch)
                ctl.after_forward()
            except RuntimeError as exc:  # a collective with a rank that failed (Gloo/NCCL errors are RuntimeErrors)
                if kill is None:
                    raise
                report = _fail_over(model, len(failovers), exc)
                failovers.append({"step": step, "resume": report.step, "failed_ranks": report.failed_ranks,
                                  "lost": report.lost.tolist(), "reloaded": report.reloaded.tolist(),
                                  "completed_layers": report.completed_layers, "seconds": report.seconds})
                emit(("failover", failovers[-1]))
                continue  # the same batch again
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            digests.append(_router_digest(ctl))
            steps.append(step)
            switched = len(digests) > 1 and digests[-1] != digests[-2]
            emit(("step", step, seconds, model.last_received.tolist(), switched, model.last_expert_cpu_s))
            while reported < len(ctl.metrics) and ctl.metrics[reported].next_window_par is not None:
                emit(("cycle", cycle_figures(ctl.metrics[reported])))
                reported += 1
            if settings.stop_after_cycles is not None and step % 10 == 9:
                decided = sum(m.par_after is not None or m.skipped is not None for m in ctl.metrics)
                done = torch.tensor([decided >= settings.stop_after_cycles], dtype=torch.int64, device=device)
                model.all_reduce(done, op=dist.ReduceOp.MIN)
                if done.item():
                    break
            step += 1
        emit(("checking",))
        check = _check_outputs(model, settings, rank, world, device)
        return {"rank": rank, "cycles": [cycle_figures(m) for m in ctl.metrics], "digests": digests, "steps": steps,
                "failovers": failovers, "restarts": ctl.planner.restarts if ctl.planner is not None else 0,
                "heartbeat_events": [dataclasses.asdict(e) for e in ctl.heartbeat.events] if ctl.heartbeat else [],
                "placement": ctl.placement.phy2log.tolist(), "added_memory": ctl.added_memory(), **check}
    finally:
        ctl.close()


def _check_outputs(model: MoEModel, settings: ServeSettings, rank: int, world: int, device) -> dict:
    """Outputs of the balanced model for a fixed batch against the same model without balancing (same group,
    initial placement, EPLB off) and against a dense local computation."""
    tokens = SkewedTokens(settings.model.vocab, settings.tokens_per_rank, _CHECK_SEED).batch(0, rank).to(device)
    balanced = model.forward(tokens)
    reference_model = _build(settings, rank, world, {"mode": "off"}, device, gate_bias=model.gate_bias)
    try:
        if model.ctl.failed.any():  # the reference serves on the survivors too
            reference_model.ctl.fail_ranks(model.ctl.failed, model.group)
            reference_model.use_group(model.group, ~model.ctl.failed)
        reference = reference_model.forward(tokens)
    finally:
        reference_model.ctl.close()
    dense = model.dense_forward(tokens)
    scale = reference.abs().clamp_min(1.0)
    figures = torch.tensor([(balanced - reference).abs().max().item(), ((balanced - reference).abs() / scale).max().item(),
                            ((balanced - dense).abs() / scale).max().item(), float(not torch.equal(balanced, reference))],
                           dtype=torch.float64, device=device)
    dist.all_reduce(figures, op=dist.ReduceOp.MAX, group=model.group)
    diff, rel_diff, dense_diff, differs = figures.tolist()
    # bitwise unless a GEMM's reduction order depends on how many rows it gets (it does on CPU for some sizes)
    return {"max_abs_diff": diff, "max_rel_diff": rel_diff, "dense_max_rel_diff": dense_diff,
            "bitwise_equal": not differs, "outputs_equal": rel_diff <= OUTPUT_TOLERANCE}
