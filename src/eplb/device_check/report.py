"""The check's verdict from what the ranks reported (:func:`summarise`), and the table ``eplb doctor`` prints
(:func:`table`)."""

from __future__ import annotations

import collections

from eplb.device_check.settings import CheckSettings
from eplb.runtime.controller import STEP_KINDS

__all__ = ["summarise", "table"]

_CPU_SKIPS = ["CUDA sync debug mode (the sync guard still watches every hook)", "CUDA graph recording",
              "CUDA events (forwards are timed with the host clock)"]


def summarise(settings: CheckSettings, results: list, progress, error: str | None, stacks: dict,
              seconds: float) -> dict:
    """One JSON-ready dict: ``ok``, ``failures`` (one line each), the device, per dispatch rule the figures merged
    over the ranks (``modes``), ``graph_recording``, and what went wrong in the ranks (``error``, ``rank_errors``,
    ``last_seen``, ``stacks``)."""
    import torch

    failures: list[str] = [] if error is None else [error]
    errors = dict(progress.errors)
    for rank, result in enumerate(results):
        if result is not None and result.get("error"):
            errors.setdefault(rank, result["error"])
    for rank, trace in errors.items():  # in the order they came: the first is the cause, the others follow from it
        failures.append(f"rank {rank} raised: {_last_line(trace)}")
    modes = {}
    for dispatch in settings.modes:
        per_rank = [progress.modes.get((rank, dispatch)) for rank in range(settings.ranks)]
        if all(figures is None for figures in per_rank):
            if not failures:
                failures.append(f"{dispatch}: no rank reported this dispatch rule")
            continue
        modes[dispatch] = merged = _merge(per_rank)
        failures += [f"{dispatch}: {line}" for line in _mode_failures(settings, merged, per_rank)]
    graphs = {"skipped": "needs CUDA"}
    if settings.device.startswith("cuda"):
        graphs = (results[0] or {}).get("graph_recording") or {"skipped": "rank 0 did not get to it"}
        failures += [f"graph recording, {d}: {_graph_failure(r)}" for d, r in graphs.items()
                     if isinstance(r, dict) and not r.get("ok")]
    on_cuda = settings.device.startswith("cuda")
    return {
        "ok": not failures,
        "failures": failures,
        "device": torch.cuda.get_device_name(settings.device) if on_cuda else "cpu",
        "device_id": settings.device,
        "torch": torch.__version__,
        "ranks": settings.ranks,
        "model": {"layers": settings.layers, "experts": settings.experts, "slots": settings.slots_per_rank
                  * settings.ranks, "top_k": settings.top_k, "expert_bytes": settings.expert_bytes,
                  "expert_dtypes": list(settings.expert_dtypes), "cycles": settings.cycles},
        "seconds": round(seconds, 1),
        "skipped": [] if on_cuda else _CPU_SKIPS,
        "modes": modes,
        "graph_recording": graphs,
        "error": error,
        "rank_errors": {str(r): t for r, t in errors.items()},
        "last_seen": {str(r): list(v) for r, v in sorted(progress.last_step.items())} if failures else {},
        "stacks": {str(r): s for r, s in sorted(stacks.items())},
    }


def _last_line(trace: str) -> str:
    lines = [line for line in trace.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else trace


def _graph_failure(result: dict) -> str:
    if "error" in result:
        return _last_line(result["error"])
    return ", ".join(name for name in ("routes_equal_eager", "counts_equal") if result.get(name) is False) + " failed"


def _merge(per_rank: list) -> dict:
    """The ranks' figures of one mode: step kinds as the ranks agree, blocking calls summed, the worst ratio, the
    slowest transfer rate, the largest staging."""
    ranks = [f for f in per_rank if f is not None]
    blocking: dict = collections.defaultdict(collections.Counter)
    for figures in ranks:
        for kind, labels in figures["blocking"].items():
            blocking[kind].update(labels)

    def pick(name, how):
        values = [f[name] for f in ranks if f.get(name) is not None]
        return how(values) if values else None

    return {
        "steps": pick("steps", max),
        "stop_steps": [f["stop_step"] if f else None for f in per_rank],
        "stopped": pick("stopped", lambda v: "deadline" if "deadline" in v else v[0]),
        "kinds": ranks[0]["kinds"],
        "blocking": {kind: dict(labels) for kind, labels in blocking.items()},
        "serving_group_calls": pick("serving_group_calls", sum),
        "cycles": ranks[0]["cycles"],
        "routes_equal_numpy": all(f["routes_equal_numpy"] for f in ranks),
        "weights_match_placement": all(f["weights_match_placement"] for f in ranks),
        "forward_ratio_during_transfer": pick("forward_ratio_during_transfer", max),
        "transfer_gbps": pick("transfer_gbps", min),
        "staging_bytes": pick("staging_bytes", max),
        "ranks": per_rank,
    }


def _mode_failures(settings: CheckSettings, merged: dict, per_rank: list) -> list[str]:
    out = []
    missing = [rank for rank, f in enumerate(per_rank) if f is None]
    if missing:
        out.append(f"ranks {missing} did not finish it")
    if merged["stopped"] == "deadline":
        out.append(f"stopped at its share of the {settings.budget_s:g} s budget after {merged['steps']} steps, "
                   f"{len(merged['cycles'])} of {settings.cycles + 1} windows submitted")
    if len({s for s in merged["stop_steps"] if s is not None}) > 1:
        out.append(f"the ranks stopped at different steps {merged['stop_steps']}")
    out += [f"no {kind!r} step was served" for kind in STEP_KINDS if not merged["kinds"].get(kind)]
    for kind, labels in merged["blocking"].items():
        calls = ", ".join(f"{label} x{n}" for label, n in sorted(labels.items()))
        out.append(f"{kind} steps: the serving thread blocked in EPLB's hooks ({calls})")
    if merged["serving_group_calls"]:
        out.append(f"{merged['serving_group_calls']} collectives ran on the serving group")
    for cycle in merged["cycles"][:settings.cycles]:
        if not cycle["layers_switched"]:
            out.append(f"cycle {cycle['cycle']} switched no layer (skipped: {cycle['skipped']})")
    if not merged["routes_equal_numpy"]:
        out.append("the router's slots differ from the numpy reference (eplb.dispatch.route)")
    if not merged["weights_match_placement"]:
        out.append("expert weights do not match the placement in force (a move wrote the wrong bytes)")
    return out


def table(result: dict) -> str:
    """The check as a text table: one row per finding, one column per dispatch rule; then the failures."""
    modes = result.get("modes", {})
    names = list(modes)
    rows = [("", names)]
    for kind in STEP_KINDS:
        rows.append((f"sync-free: {kind} steps", [_sync_cell(modes[d], kind) for d in names]))
    rows.append(("serving group untouched", [_yes(not modes[d]["serving_group_calls"]) for d in names]))
    rows.append(("routes = numpy (balanced: split)", [_yes(modes[d]["routes_equal_numpy"]) for d in names]))
    rows.append(("weights follow the placement", [_yes(modes[d]["weights_match_placement"]) for d in names]))
    rows.append(("cycles that moved layers", [_moved(modes[d]) for d in names]))
    graphs = result.get("graph_recording", {})
    rows.append(("graph recording", [_graph_cell(graphs, d) for d in names]))
    rows.append(("forward time ratio in transfer", [_number(modes[d]["forward_ratio_during_transfer"], "{:.2f}")
                                                     for d in names]))
    rows.append(("transfer GB/s (lower bound)", [_number(modes[d]["transfer_gbps"], "{:.3f}") for d in names]))
    rows.append(("staging memory", [_number(modes[d]["staging_bytes"], "{}", _size) for d in names]))
    if not names:
        rows = []
    width = max([0] + [len(label) for label, _ in rows]) + 2
    cells = max([8] + [len(c) + 2 for _, row in rows for c in row])
    where = result["device"]
    if result["device_id"] != where:
        where += f" ({result['device_id']})"
    lines = [f"eplb doctor: {where}, torch {result['torch']}, {result['ranks']} "
             f"ranks on one device, {result['model']['layers']} layers x {result['model']['experts']} experts, "
             f"{result['seconds']:g} s"]
    lines += [label.ljust(width) + "".join(c.ljust(cells) for c in row).rstrip() for label, row in rows]
    lines += [f"skipped on this device: {what}" for what in result.get("skipped", [])]
    if result["ok"]:
        lines.append("OK: every check passed")
    else:
        lines.append(f"FAILED: {len(result['failures'])} problem(s)")
        lines += [f"  - {line}" for line in result["failures"]]
    if result.get("stacks"):
        lines.append(f"ranks {', '.join(result['stacks'])} were still running near the timeout: their threads' stacks "
                     "are in the JSON result (--json), under \"stacks\"")
    return "\n".join(lines)


def _yes(ok: bool) -> str:
    return "ok" if ok else "FAIL"


def _sync_cell(figures: dict, kind: str) -> str:
    if not figures["kinds"].get(kind):
        return "not seen"
    calls = sum(figures["blocking"].get(kind, {}).values())
    return "ok" if not calls else f"{calls} calls"


def _moved(figures: dict) -> str:
    cycles = figures["cycles"][:-1] if figures["stopped"] == "cycles" else figures["cycles"]
    return f"{sum(1 for c in cycles if c['layers_switched'])}/{len(cycles)}"


def _graph_cell(graphs: dict, dispatch: str) -> str:
    if "skipped" in graphs:
        return "skipped"
    return _yes(bool(graphs.get(dispatch, {}).get("ok")))


def _number(value, pattern: str, convert=None) -> str:
    if value is None:
        return "-"
    return convert(value) if convert else pattern.format(value)


def _size(nbytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"
