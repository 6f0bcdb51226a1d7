"""``eplb tune``'s output: the ranked table, the Pareto plot (step time against bytes moved) and tune.json.

Files written to the report folder (each atomically): ``tune.json`` (every row, the references, the grid, the best
row and its engine settings), ``pareto.png``, and ``tune-rows.jsonl``, one row per finished run as it finishes, which
``--resume`` reads back.
"""

from __future__ import annotations

import json
from pathlib import Path

from eplb._files import atomic_path
from eplb.errors import EplbError

__all__ = ["tune_table", "plot_pareto", "write_tune_json", "ROWS_FILE", "read_rows", "append_row"]

ROWS_FILE = "tune-rows.jsonl"


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _bytes(value: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if value >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value:,.0f} B"


def tune_table(rows: list[dict], pareto: list[str], top: int | None = 20, title: str = "candidates, fastest first"):
    """The ranked rows as a rich table (the ``top`` fastest; ``*`` marks the Pareto front)."""
    from rich.table import Table

    shown = rows if top is None else rows[:top]
    table = Table(title=title if len(shown) == len(rows) else f"{title} ({len(shown)} of {len(rows)})")
    for header in ("#", "candidate", "step PAR", "step ms", "vs none", "over floor", "moved / h", "cycles",
                   "plan ms"):
        table.add_column(header, justify="left" if header == "candidate" else "right", no_wrap=True)
    front = set(pareto)
    for rank, row in enumerate(shown, 1):
        table.add_row(str(rank), row["key"] + (" *" if row["key"] in front else ""), f"{row['step_par']:.3f}",
                      f"{row['step_ms']:.3f}", _cell(row.get("speedup_vs_static"), ".3f") + "x",
                      _cell(row.get("over_floor"), ".3f"), _bytes(row["bytes_per_hour"]),
                      f"{row['cycles_applied']}/{row['cycles']}", f"{row['planner_ms']:.0f}")
    table.caption = ("step PAR: busiest / mean rank, token-weighted over the scored steps; step ms: MoE time with "
                     "exposed transfers (cost model); vs none: speed-up over no balancing; over floor: step PAR over "
                     "the clairvoyant floor's; moved / h: weights moved per hour at that step time; * Pareto front")
    return table


def plot_pareto(rows: list[dict], pareto: list[str], path, title: str) -> None:
    """Step time against bytes moved per hour, one point per row, the Pareto front joined and labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 5.5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    largest = max((r["bytes_per_hour"] for r in rows), default=0.0)
    unit, size = ("TB", 1e12) if largest >= 1e12 else ("GB", 1e9)
    kinds = {"dynamic": ("o", "fixed cadence"), "adaptive": ("D", "adaptive cadence"), "static": ("s", "static map")}
    for kind, (marker, label) in kinds.items():
        points = [r for r in rows if r["kind"] == kind]
        if points:
            axes.scatter([r["bytes_per_hour"] / size for r in points], [r["step_ms"] for r in points], marker=marker,
                         s=22, alpha=0.55, label=label)
    by_key = {r["key"]: r for r in rows}
    front = sorted((by_key[k] for k in pareto), key=lambda r: r["bytes_per_hour"])
    if front:
        axes.plot([r["bytes_per_hour"] / size for r in front], [r["step_ms"] for r in front], color="black", lw=1,
                  label="Pareto front")
        for r in front[:8]:
            axes.annotate(r["key"], (r["bytes_per_hour"] / size, r["step_ms"]), fontsize=7, xytext=(4, 3),
                          textcoords="offset points")
    axes.set_xlabel(f"expert weights moved per hour, {unit}")
    axes.set_ylabel("estimated MoE step time, ms")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, frameon=False)
    figure.tight_layout()
    with atomic_path(Path(path), "--out") as tmp:
        figure.savefig(tmp, format="png")


def write_tune_json(report: dict, path) -> None:
    with atomic_path(Path(path), "--out") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")


def read_rows(out_dir, fingerprint: str) -> dict[str, dict]:
    """The rows ``--resume`` keeps: those of ``tune-rows.jsonl`` written by a sweep of the same trace, cluster and
    settings (``fingerprint``); a torn last line (the sweep was killed while writing it) is dropped."""
    path = Path(out_dir) / ROWS_FILE
    rows: dict[str, dict] = {}
    if not path.exists():
        return rows
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise EplbError(f"--resume: cannot read {path}: {exc.strerror or exc}") from None
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("fingerprint") == fingerprint and isinstance(entry.get("row"), dict):
            rows[entry["row"]["key"]] = entry["row"]
    return rows


def append_row(out_dir, fingerprint: str, row: dict) -> None:
    """Add one finished run's row to ``tune-rows.jsonl`` (one line, flushed: a Ctrl-C keeps every finished row)."""
    with open(Path(out_dir) / ROWS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps({"fingerprint": fingerprint, "row": row}) + "\n")
        f.flush()
