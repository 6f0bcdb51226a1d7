"""``eplb demo`` end to end: real ranks, a skewed workload, dynamic balancing, the output check, and the errors it
must give before any rank starts."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("compiled_auto")  # the runtime's default policy, compiled once

from eplb import Placement, Topology, get_policy  # noqa: E402
from eplb.cli import main  # noqa: E402
from eplb.engine.tokens import expert_popularity  # noqa: E402
from eplb.formats import write_map  # noqa: E402

SMALL_RUN = ["--tokens", "64", "--layers", "3", "--timeout", "240"]


def _demo_json(capsys, *argv) -> dict:
    code = main(["demo", "--json", *argv])
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.mark.dist
@pytest.mark.slow
def test_dynamic_demo_balances_while_serving_and_keeps_outputs(capsys):
    code, summary = _demo_json(capsys, "--steps", "150", "--window", "25", *SMALL_RUN)
    assert code == 0
    assert summary["ranks"] == 4 and summary["policy"] == "auto" and summary["slots_per_rank"] == 5
    assert summary["outputs_equal"] and summary["bitwise_equal"]
    first = summary["cycles"][0]
    assert first["par_before"] > 1.5 and first["moved_slots"] > 0 and first["skipped"] is None
    assert first["par_after"] is None or first["par_after"] < 1.15
    assert summary["after"] is not None, "the first plan was not applied within 150 steps"
    # the acceptance figure: the busiest rank's rows per step drop by at least 30% after the first cycle
    assert summary["busiest_rank_drop"] >= 0.30
    for key in ("step_time_ms", "tokens_per_s", "busiest_rank_rows", "step_par", "busiest_expert_cpu_ms"):
        assert summary["before"][key] > 0 and summary["after"][key] > 0
    assert all(set(c) >= {"par_before", "par_after", "moved_slots", "transfer_s", "tokens_per_s_before",
                          "tokens_per_s_after"} for c in summary["cycles"])


@pytest.mark.dist
@pytest.mark.slow
def test_demo_with_a_failed_rank_serves_on_over_the_survivors(capsys):
    code, summary = _demo_json(capsys, "--steps", "120", "--window", "25", "--slots-per-rank", "6",
                               "--fail-rank", "2", *SMALL_RUN)
    assert code == 0 and summary["outputs_equal"]
    failover = summary["failover"]
    assert failover["failed_ranks"] == [2] and failover["live_ranks"] == 3
    assert failover["lost_experts"] > 0 and failover["reloaded_slots"] >= failover["lost_experts"]
    assert summary["cycles"][0]["skipped"] == "ranks [2] failed"
    assert summary["steps"] == 120  # every step was served, the interrupted one again


@pytest.mark.dist
@pytest.mark.slow
def test_static_demo_serves_a_balanced_map_from_the_start(tmp_path, capsys):
    topology = Topology(2, 9)
    load = expert_popularity(2, 16, 4)
    plan = get_policy("default", allow_shared_rank=False).rebalance(load, topology,
                                                                     Placement.initial(16, topology, 2))
    path = tmp_path / "map.json"
    write_map(plan.placement, path, "ascend")
    code, summary = _demo_json(capsys, "--mode", "static", "--map", str(path), "--ranks", "2", "--steps", "12",
                               "--tokens", "64", "--layers", "2", "--slots-per-rank", "9", "--timeout", "240")
    assert code == 0 and summary["outputs_equal"] and summary["cycles"] == []
    assert summary["after"] is None and summary["before"]["step_par"] < 1.3  # the initial layout is at ~1.5


@pytest.mark.dist
@pytest.mark.slow
def test_record_demo_writes_the_map_it_planned(tmp_path, capsys):
    from eplb.formats import read_map

    path = tmp_path / "recorded.json"
    code, summary = _demo_json(capsys, "--mode", "record", "--map", str(path), "--ranks", "2", "--steps", "300",
                               "--window", "20", "--tokens", "64", "--layers", "2", "--timeout", "240")
    assert code == 0 and summary["map_written"] == str(path)
    assert read_map(path).num_layers == 2 and summary["cycles"][0]["moved_slots"] > 0


@pytest.mark.dist
@pytest.mark.slow
def test_record_demo_that_writes_no_map_exits_1(tmp_path, capsys):
    path = tmp_path / "never.json"  # 5 steps: no window ends, so no plan is made
    code, summary = _demo_json(capsys, "--mode", "record", "--map", str(path), "--ranks", "2", "--steps", "5",
                               "--tokens", "32", "--layers", "2", "--timeout", "240")
    assert code == 1 and summary["map_written"] is None and not path.exists()


@pytest.mark.parametrize("content, message", [
    ('{"moe_layer_count": 2', "not valid JSON"),
    (None, "is for 4 layers"),
    ("", "expert map"),
])
def test_static_mode_with_a_bad_map_fails_before_serving(tmp_path, capsys, monkeypatch, content, message):
    import eplb.engine.launch

    def launch(*args, **kwargs):
        pytest.fail("the demo launched its ranks")

    monkeypatch.setattr(eplb.engine.launch, "launch", launch)  # no rank may start
    path = tmp_path / "map.json"
    if content is None:  # a valid map for another model: 4 layers, the demo is asked for 3
        write_map(Placement.initial(16, Topology(4, 5), 4), path, "ascend")
    else:
        path.write_text(content)
    assert main(["demo", "--mode", "static", "--map", str(path), "--layers", "3"]) == 1
    err = capsys.readouterr().err
    assert "eplb demo: error:" in err and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--mode", "static"], "needs --map"),
    (["--ranks", "0"], "--ranks must be >= 1"),
    (["--slots-per-rank", "3"], "cannot hold 16 experts"),
    (["--policy", "nope"], "policy"),
    (["--experts", "10"], "multiple of num_groups"),
    (["--fail-rank", "4"], "--fail-rank 4: ranks are 0..3"),
    (["--fail-rank", "2"], "--fail-rank 2 leaves 15 slots for 16 experts"),
])
def test_bad_arguments_are_clear_errors(capsys, argv, message):
    assert main(["demo", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_demo_help_lists_the_documented_options(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    for option in ("--ranks", "--policy", "--steps", "--mode", "--map", "--json"):
        assert option in out


def test_a_trace_of_another_shape_is_a_clear_error(tmp_path, capsys):
    from eplb.formats import write_load

    path = tmp_path / "load.npz"
    write_load(np.ones((5, 3, 8)), path)
    assert main(["demo", "--trace", str(path)]) == 1
    err = capsys.readouterr().err
    assert "L=4 layers x E=16 experts" in err and "Traceback" not in err
