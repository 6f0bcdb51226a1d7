"""What ``eplb simulate`` shows and writes: the policy table, report.json, plots and report.md.

Files written to the output folder (each atomically):

- ``report.json``: the scenario, the settings and every run's figures (:func:`build_report`);
- ``par_over_time.png``: per-step PAR (token-weighted over layers, smoothed) and estimated step time per run;
- ``heatmap_before.png`` / ``heatmap_after.png``: rank x layer load summed over the scored steps (after the
  warm-up), without balancing and with the best online policy, on the one colour scale of
  :func:`eplb.report.heatmap.plot_rank_heatmap` (white = balanced, red = busier than the layer's mean);
- ``report.md``: the table and the plots, with how to read them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from eplb._files import atomic_path
from eplb.errors import EplbError

__all__ = ["build_report", "summary_rows", "policy_table", "write_report", "plot_par_over_time", "COLUMNS"]

#: (key in a run's summary, table header, format)
COLUMNS = (
    ("step_par_mean", "PAR\nmean", "{:.3f}"),
    ("step_par_p99", "PAR\np99", "{:.3f}"),
    ("window_par_mean", "window\nPAR", "{:.3f}"),
    ("moved_slots_per_cycle", "moved\n/cycle", "{:,.0f}"),
    ("gb_moved", "GB\nmoved", "{:,.0f}"),
    ("planner_ms", "plan\nms", "{:,.0f}"),
    ("speedup_vs_static", "speed\n-up", "{:.2f}x"),
    ("speedup_vs_perfect", "of\nideal", "{:.0%}"),
)
#: the report file's table adds each run's distance to the clairvoyant floor (the console table has no room)
FILE_COLUMNS = (*COLUMNS, ("par_vs_floor", "PAR vs floor", "{:.3f}x"))


def build_report(runs: dict, static, clairvoyant, meta: dict) -> dict:
    """The JSON-ready report.

    Args:
        runs: name -> :class:`~eplb.sim.simulator.RunResult` of every policy run (``static`` included).
        static: the static run (the reference of ``speedup_vs_static``).
        clairvoyant: the clairvoyant run of the floor (the best of those run), or None.
        meta: scenario and settings, copied under their own keys (``trace``, ``topology``, ``settings``, ...).

    Returns:
        ``{**meta, "policies": {name: figures}, "clairvoyant": figures or None, "per_layer": {...},
        "cycles": {name: [...]}}``; figures hold at least ``step_par_mean``, ``step_par_p99``,
        ``window_par_mean``, ``moved_slots_per_cycle``, ``bytes_moved_per_cycle``, ``planner_ms``,
        ``speedup_vs_static``, and with a floor ``par_vs_floor`` (step PAR over the floor's).
    """
    def figures(run):
        out = run.summary(static)
        out["gb_moved"] = out["bytes_moved_total"] / 1e9
        return out

    report = dict(meta)
    report["policies"] = {name: figures(run) for name, run in runs.items()}
    report["clairvoyant"] = None
    if clairvoyant is not None:
        report["clairvoyant"] = {"policy": clairvoyant.name.split(":", 1)[-1], **figures(clairvoyant)}
        # each run's distance to the floor: its step PAR over the floor's
        floor = report["clairvoyant"]["step_par_mean"]
        for entry in [*report["policies"].values(), report["clairvoyant"]]:
            entry["par_vs_floor"] = entry["step_par_mean"] / floor if floor > 0 else None
    every = {**runs, **({clairvoyant.name: clairvoyant} if clairvoyant is not None else {})}
    report["per_layer"] = {name: run.per_layer() for name, run in every.items()}
    report["cycles"] = {name: _cycles_json(run) for name, run in every.items() if run.cycles}
    return report


def _cycles_json(run) -> list[dict]:
    """One entry per cycle; ``measured_step_par``: token-weighted step PAR from the step its last layer came into
    force until the next cycle starts applying (None when nothing was applied)."""
    applied = [r.apply_start for r in run.cycles if r.apply_start is not None] + [run.step_par.shape[0]]
    out = []
    for record, planner_ms in zip(run.cycles, run.planner_ms + [None] * len(run.cycles)):
        entry = _cycle_json(record, planner_ms)
        entry["measured_step_par"] = None
        if record.in_force_step is not None:
            stop = min(start for start in applied if start > record.apply_end)
            steps = slice(record.in_force_step, stop)
            tokens = run.tokens[steps].sum()
            if tokens > 0:
                entry["measured_step_par"] = float((run.step_par[steps] * run.tokens[steps]).sum() / tokens)
        out.append(entry)
    return out


def _cycle_json(record, planner_ms) -> dict:
    return {
        "window": [record.window_start, record.window_end],
        "apply": [record.apply_start, record.apply_end],
        "layers": len(record.layers),
        "moved_slots": record.moved_slots,
        "bytes_moved": record.bytes_moved,
        "predicted_par_before": None if np.isnan(record.par_before) else record.par_before,
        "predicted_par_after": None if np.isnan(record.par_after) else record.par_after,
        "planner_ms": planner_ms,
        "skipped": record.skipped,
    }


def summary_rows(report: dict) -> list[tuple[str, dict]]:
    """(label, figures) of every run to show: the policies in order, then the clairvoyant floor."""
    rows = list(report["policies"].items())
    if report.get("clairvoyant"):
        rows.append((f"clairvoyant:{report['clairvoyant']['policy']}", report["clairvoyant"]))
    return rows


def _cell(figures: dict, key: str, fmt: str) -> str:
    value = figures.get(key)
    return "-" if value is None else fmt.format(value)


def policy_table(report: dict):
    """A rich table, one row per run."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    trace, topology = report["trace"], report["topology"]
    table = Table(title=f"{escape(trace['name'])} ({escape(trace['source'])}): {trace['steps']:,} steps x "
                        f"{trace['layers']} "
                        f"layers, {topology['num_ranks']} ranks x {topology['slots_per_rank']} slots",
                  caption=f"per-step PAR (busiest / mean rank), token-weighted, after step {report['warmup_steps']}; "
                          "speed-up: estimated MoE time vs static; ideal: PAR = 1",
                  box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False)
    table.add_column("policy", no_wrap=True)
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)
    best = min((f["step_par_mean"], name) for name, f in report["policies"].items())[1]
    for label, figures in summary_rows(report):
        style = "bold green" if label == best else ("dim" if label.startswith("clairvoyant") else None)
        table.add_row(label, *(_cell(figures, key, fmt) for key, _, fmt in COLUMNS), style=style)
    return table


def _one_line(header: str) -> str:
    return header.replace("\n/", "/").replace("\n-", "-").replace("\n", " ")


def _markdown_table(report: dict) -> str:
    lines = ["| policy | " + " | ".join(_one_line(header) for _, header, _ in FILE_COLUMNS) + " |",
             "| --- |" + " ---: |" * len(FILE_COLUMNS)]
    for label, figures in summary_rows(report):
        lines.append(f"| {label} | " + " | ".join(_cell(figures, key, fmt) for key, _, fmt in FILE_COLUMNS) + " |")
    return "\n".join(lines)


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average (shorter at the ends)."""
    if width <= 1:
        return values
    kernel = np.ones(width)
    total = np.convolve(values, kernel, mode="same")
    count = np.convolve(np.ones_like(values), kernel, mode="same")
    return total / count


def plot_par_over_time(runs: dict, clairvoyant, path, title: str, warmup: int) -> None:
    """Write a PNG: per-step PAR (token-weighted over layers, moving average) and estimated step time, per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    every = list(runs.items()) + ([(clairvoyant.name, clairvoyant)] if clairvoyant is not None else [])
    steps = len(next(iter(runs.values())).moe_us)
    width = max(1, steps // 100)
    figure = Figure(figsize=(12.5, 7.5), dpi=110)
    FigureCanvasAgg(figure)
    par_axes, time_axes = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    colours = iter(["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"])
    # Distinct dashes and markers, so that a policy whose line coincides with another (random or a policy that
    # moves nothing lies on static) still shows: static is a wide grey band underneath, the others thin on top.
    dashes = iter([(0, ()), (0, (6, 2)), (0, (2, 2)), (0, (6, 2, 2, 2)), (0, (10, 3)), (0, (1, 3)),
                   (0, (4, 1, 1, 1, 1, 1)), (0, (8, 2, 2, 2, 2, 2))])
    markers = iter("osD^vP*X")
    x = np.arange(steps)
    marks = max(1, steps // 12)
    for index, (label, run) in enumerate(every):
        if label == "static":
            style = {"color": "#9a9a9a", "linewidth": 4.0, "alpha": 0.55, "zorder": 2}
        elif label.startswith("clairvoyant"):
            style = {"color": "black", "linewidth": 1.4, "linestyle": (0, (3, 2)), "zorder": 5}
        else:
            style = {"color": next(colours, "#333333"), "linewidth": 1.3, "linestyle": next(dashes, (0, ())),
                     "marker": next(markers, "o"), "markersize": 4, "markevery": (index * marks // 7, marks),
                     "zorder": 3}
        par_axes.plot(x, _smooth(run.step_par_series(), width), label=label, **style)
        time_axes.plot(x, _smooth(run.step_us / 1e3, width), **style)
    for axes in (par_axes, time_axes):
        axes.axvspan(0, warmup, color="#eeeeee", zorder=0)
        axes.grid(True, alpha=0.3)
    par_axes.text(warmup / 2, 0.98, "warm-up\n(not scored)", transform=par_axes.get_xaxis_transform(),
                  ha="center", va="top", fontsize=8, color="#666666")
    par_axes.set_ylabel("per-step PAR (busiest / mean rank)")
    par_axes.set_ylim(bottom=1.0)
    par_axes.set_title(title)
    par_axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    time_axes.set_ylabel("MoE time per step, ms\n(incl. exposed transfers)")
    time_axes.set_xlabel(f"step (moving average over {width} steps)" if width > 1 else "step")
    figure.tight_layout()
    _save(figure, Path(path))


def _save(figure, path: Path) -> None:
    with atomic_path(path, "--out") as tmp:
        figure.savefig(tmp, format="png")


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path, "--out") as tmp:
        tmp.write_text(text)


def write_report(report: dict, runs: dict, static, clairvoyant, out_dir) -> dict[str, Path]:
    """Write report.json, the plots and report.md into ``out_dir`` (created if needed).

    Returns:
        name -> path of every file written.

    Raises:
        EplbError: the folder cannot be created or written.
    """
    from eplb.report.heatmap import plot_rank_heatmap

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EplbError(f"--out {out}: cannot create the report folder: {exc.strerror or exc}") from None
    files = {name: out / name for name in ("report.json", "par_over_time.png", "heatmap_before.png",
                                           "heatmap_after.png", "report.md")}
    online = {name: run for name, run in runs.items() if name != "static"}
    best = min(online, key=lambda name: report["policies"][name]["step_par_mean"]) if online else None
    summed = f"load summed over steps {report['warmup_steps']}-{report['trace']['steps'] - 1}"
    try:
        _write_text(files["report.json"], json.dumps(report, indent=1) + "\n")
        plot_par_over_time(runs, clairvoyant, files["par_over_time.png"],
                           f"per-step PAR and MoE time of each policy: {report['trace']['name']} on "
                           f"{report['topology']['description']}",
                           report["warmup_steps"])
        plot_rank_heatmap(static.rank_load, files["heatmap_before.png"],
                          title=f"no balancing (static), {summed}", flag="--out")
        if best is not None:
            plot_rank_heatmap(runs[best].rank_load, files["heatmap_after.png"],
                              title=f"{best} (lowest per-step PAR), {summed}", flag="--out")
        else:
            del files["heatmap_after.png"]
        _write_text(files["report.md"], _markdown(report, best))
    except OSError as exc:
        raise EplbError(f"--out {out}: cannot write the report: {exc}") from None
    return files


def _markdown(report: dict, best: str | None) -> str:
    trace, settings = report["trace"], report["settings"]
    lines = [
        f"# eplb simulate: {trace['name']}",
        "",
        f"{trace['steps']:,} steps of {trace['layers']} MoE layers x {trace['experts']} experts "
        f"(top-{trace['top_k']}; {trace['description']}; from {trace['source']}) on "
        f"{report['topology']['description']}. "
        f"A plan is made every {settings['interval']} steps on the last window, arrives "
        f"{settings['planner_steps']} steps later and is applied {settings['pace']}; replica choice "
        f"`{settings['dispatch']}`; seed {report['seed']}.",
        "",
        _markdown_table(report),
        "",
        "- **step PAR**: busiest rank / mean rank in each step and layer, token-weighted mean and 99th percentile "
        "(1.0 is perfect). **window PAR**: the same on the load summed over each window of "
        f"{settings['interval']} steps.",
        f"- Figures leave out the first {report['warmup_steps']} steps (first window, planner delay and first "
        "layer-by-layer application), which every run starts on the initial layout.",
        "- **speed-up**: estimated MoE time of the run (busiest rank per layer, plus transfers compute does not "
        "hide) against static; **of ideal**: time at PAR = 1 over the run's time.",
        "- **clairvoyant**: the policy plans on the very steps it is scored on, with no delay and free moves: "
        "the floor.",
        "",
        "![per-step PAR over time](par_over_time.png)",
        "",
        "Rank x layer load summed over the steps after the warm-up, as rank load / layer mean (white: balanced, "
        f"red: busier, blue: idler; one scale for both), without balancing and with {best or 'no policy'}:",
        "",
        "![rank x layer load without balancing](heatmap_before.png)",
    ]
    if best is not None:
        lines += ["", f"![rank x layer load with {best}](heatmap_after.png)"]
    return "\n".join(lines) + "\n"
