"""The runtime's Prometheus metrics, scraped over HTTP from a real run of 2 Gloo ranks in real processes, checked
against figures computed here from the ids the ranks routed; and every metric the docs list is the one served."""

from __future__ import annotations

import re
import socket
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from eplb import Placement, Topology
from eplb.runtime.config import ConfigError, EplbConfig

WORLD = 2
TOPO = Topology(WORLD, 5)
NUM_EXPERTS, NUM_LAYERS = 6, 2
WINDOW = 6
SPAWN_TIMEOUT_S = 300
DOCS = Path(__file__).resolve().parents[2] / "docs" / "runtime.md"


def skewed_ids(step: int, rank: int):
    import torch

    rng = np.random.default_rng(104729 * step + rank)
    p = 1.0 / np.arange(1, NUM_EXPERTS + 1) ** 2
    return torch.as_tensor(rng.choice(NUM_EXPERTS, size=(32, 2), p=p / p.sum()), dtype=torch.int64)


def _ended(m) -> bool:
    """Cycle ``m`` ended: skipped, or its last planned layer switched (and it was exported with that switch)."""
    return bool(m.skipped) or bool(m.planned_layers) and set(m.applied_layers) >= set(m.planned_layers)


def _serve_and_scrape(rank: int, tmp: str, port: int) -> dict:
    import torch
    import torch.distributed as dist

    from eplb.runtime import EplbController

    out = {}
    config = EplbConfig.from_dict({"mode": "dynamic", "window_steps": WINDOW, "planner_check_steps": 1,
                                   "policy": "default", "prometheus_port": port})
    tensors = [[torch.zeros(TOPO.slots_per_rank, 3)] for _ in range(NUM_LAYERS)]
    ctl = EplbController(config, NUM_LAYERS, NUM_EXPERTS, TOPO, rank, layer_tensors=tensors,
                         placement=Placement.initial(NUM_EXPERTS, TOPO, NUM_LAYERS))
    in_force = []
    try:
        for _ in range(3000):
            step = ctl.step
            ctl.before_forward()
            in_force.append(ctl.in_force.phy2log.copy())
            for layer in range(NUM_LAYERS):
                ctl.route(layer, skewed_ids(step, rank))
            ctl.after_forward()
            if ctl.cycle.records and ctl.step == ctl.cycle.records[-1].window_end + 1:
                ctl.channel.drain()  # the window's figures are in before the next step reads them
                ctl.planner.wait(60)
            time.sleep(0.002)
            done = torch.tensor([int(len(ctl.metrics) >= 3 and ctl.metrics[1].next_step_s > 0
                                     and _ended(ctl.metrics[2]))])
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
            if done.item():
                break
        if rank == 0:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
                out["scrape"] = response.read().decode()
        out["steps"] = ctl.step
        out["in_force"] = in_force
        out["metrics"] = [{k: getattr(m, k) for k in ("cycle", "submit_step", "window_par", "par_before",
                                                        "par_after", "planned_layers", "rank_load", "step_s",
                                                        "next_step_s", "bytes_received", "late_steps", "skipped",
                                                        "applied_layers")} for m in ctl.metrics]
        out["windows"] = [(r.window_start, r.window_end) for r in ctl.cycle.records]
    finally:
        ctl.close()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("prometheus_client")
    from gloo_ranks import run_ranks

    out = run_ranks(_serve_and_scrape, WORLD, str(tmp_path_factory.mktemp("metrics")), (_free_port(),),
                    SPAWN_TIMEOUT_S)
    for result in out:
        assert "error" not in result, result["error"]
    return out


def _families(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(family, **labels) -> float:
    return next(s.value for s in family.samples if s.labels == labels and not s.name.endswith("_created"))


def _rank_load_by_hand(window_ids: np.ndarray, phy2log: np.ndarray) -> list[float]:
    """Routings per rank over all layers: each expert's count split evenly over its replicas (a plain loop)."""
    k = TOPO.slots_per_rank
    loads = [0.0] * WORLD
    for layer in range(NUM_LAYERS):
        row = phy2log[layer].tolist()
        for expert in range(NUM_EXPERTS):
            slots = [s for s, e in enumerate(row) if e == expert]
            for slot in slots:
                loads[slot // k] += window_ids[expert] / len(slots)
    return loads


@pytest.mark.dist
@pytest.mark.slow
def test_scraped_metrics_match_the_run(run):
    families = _families(run[0]["scrape"])
    steps = run[0]["steps"]
    # the cycles exported: a window may end in the step the last cycle's plan came into force, and not be planned yet
    metrics = [m for m in run[0]["metrics"]
               if m["skipped"] or m["planned_layers"] and set(m["applied_layers"]) >= set(m["planned_layers"])]
    last = metrics[-1]
    # the step-time histogram holds every step rank 0 saw: one fewer than its before_forward calls
    histogram = families["eplb_step_seconds"]
    count = next(s.value for s in histogram.samples if s.name == "eplb_step_seconds_count")
    buckets = [s.value for s in histogram.samples if s.name == "eplb_step_seconds_bucket"]
    assert count == steps - 1 and buckets == sorted(buckets) and buckets[-1] == count
    # per-rank load of the last window, from the ids both ranks routed and the placement the window was gathered on
    start, end = run[0]["windows"][len(metrics) - 1]
    ids = sum(np.bincount(skewed_ids(s, r).numpy().ravel(), minlength=NUM_EXPERTS)
              for s in range(start, end) for r in range(WORLD))
    expected = _rank_load_by_hand(ids, run[0]["in_force"][last["submit_step"]])
    scraped = [_value(families["eplb_rank_load"], rank=str(r)) for r in range(WORLD)]
    assert scraped == pytest.approx(expected, rel=1e-12)
    assert _value(families["eplb_window_par"]) == pytest.approx(float(np.mean(last["window_par"])))
    # PAR before / after and the predicted gain of the last plan, recomputed from its per-layer figures
    before = [float(x) for x in last["par_before"]]
    after = [float(last["par_after"][i]) if i in last["planned_layers"] else before[i] for i in range(NUM_LAYERS)]
    assert _value(families["eplb_par_before"]) == pytest.approx(sum(before) / NUM_LAYERS)
    assert _value(families["eplb_par_after"]) == pytest.approx(sum(after) / NUM_LAYERS)
    # the gains are of the last cycle whose next window ended; measured = 1 - median step after / median before
    gain_cycle = int(_value(families["eplb_gain_cycle"]))
    measured = metrics[gain_cycle]
    assert measured["next_step_s"] > 0 and gain_cycle >= 1
    assert _value(families["eplb_measured_step_gain"]) == pytest.approx(1 - measured["next_step_s"] /
                                                                       measured["step_s"])
    m_before = float(np.mean(measured["par_before"]))
    m_after = np.array(measured["par_before"], dtype=float)
    m_after[measured["planned_layers"]] = np.asarray(measured["par_after"])[measured["planned_layers"]]
    assert _value(families["eplb_predicted_step_gain"]) == pytest.approx(1 - m_after.mean() / m_before)
    outcomes = {s.labels["outcome"]: s.value for s in families["eplb_cycles"].samples if s.name.endswith("_total")}
    assert outcomes == {"applied": sum(not m["skipped"] for m in metrics),
                        "skipped": sum(bool(m["skipped"]) for m in metrics), "recorded": 0}
    assert _value(families["eplb_received_bytes"]) == sum(m["bytes_received"] for m in metrics)
    assert _value(families["eplb_late_steps"]) == sum(m["late_steps"] for m in metrics)


@pytest.mark.dist
@pytest.mark.slow
def test_docs_list_every_metric_served(run):
    """docs/runtime.md's metrics table names exactly the metric families a scrape returns."""
    text = DOCS.read_text()
    section = text[text.index("## Metrics"):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    documented = {re.sub("_total$", "", name) for name in re.findall(r"^\| `(eplb_[a-z_]+)", section, flags=re.M)}
    served = set(_families(run[0]["scrape"]))
    assert documented == served


def test_metrics_without_prometheus_client_is_one_line(monkeypatch):
    """prometheus_port with prometheus_client missing: the controller refuses to start, naming the extra."""
    pytest.importorskip("torch")
    from eplb.runtime import EplbController

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # what an environment without it imports
    config = EplbConfig.from_dict({"prometheus_port": 9400, "mode": "dynamic"})  # building it does not look
    with pytest.raises(ConfigError) as caught:
        EplbController(config, 1, 4, Topology(2, 2), 0, layer_tensors=[[]])
    assert str(caught.value) == ('prometheus_port=9400 needs prometheus_client, which is not installed: '
                                 'pip install "eplb[metrics]"')
