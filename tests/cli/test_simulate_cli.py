"""``eplb simulate``: the table, --json, the report folder, reproducibility and clear errors."""

import json

import pytest

from eplb.cli import main

FAST = ["--steps", "200", "--interval", "50", "--planner-steps", "4", "--policies", "default,random",
        "--clairvoyant", "default"]


def run_json(capsys, *args):
    assert main(["simulate", *FAST, "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_json_report_and_files(capsys, tmp_path):
    out = run_json(capsys, "--out", str(tmp_path / "report"))
    policies = out["policies"]
    assert list(policies) == ["static", "default", "random"]
    keys = {"step_par_mean", "step_par_p99", "window_par_mean", "moved_slots_per_cycle", "bytes_moved_per_cycle",
            "planner_ms", "speedup_vs_static"}
    assert keys <= set(policies["default"]) and keys <= set(out["clairvoyant"])
    static, default, floor = policies["static"], policies["default"], out["clairvoyant"]
    assert floor["step_par_mean"] < default["step_par_mean"] < static["step_par_mean"]
    assert static["speedup_vs_static"] == 1.0 and default["speedup_vs_static"] > 1.0
    assert out["clairvoyant"]["policy"] == "default" and out["trace"]["name"] == "builtin:default"
    written = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert written == ["heatmap_after.png", "heatmap_before.png", "par_over_time.png", "report.json", "report.md"]
    report_md = (tmp_path / "report" / "report.md").read_text()
    assert "![per-step PAR over time](par_over_time.png)" in report_md and "| default |" in report_md
    full = json.loads((tmp_path / "report" / "report.json").read_text())
    assert full["policies"]["default"] == default and len(full["per_layer"]["default"]["step_par_mean"]) == 58
    first = full["cycles"]["default"][0]
    assert first["window"] == [0, 50] and first["layers"] > 0 and first["skipped"] is None
    assert first["predicted_par_after"] < first["measured_step_par"] < static["step_par_mean"]


@pytest.mark.slow
def test_same_seed_same_results_and_saved_trace_replays(capsys, tmp_path):
    quick = ["--no-files", "--steps", "120", "--policies", "default", "--clairvoyant", "none"]
    first = run_json(capsys, *quick, "--seed", "3", "--save-trace", str(tmp_path / "t.npz"))
    second = run_json(capsys, *quick, "--seed", "3")
    replay = run_json(capsys, *quick, "--trace", str(tmp_path / "t.npz"))
    for out in (first, second, replay):
        for figures in out["policies"].values():
            figures.pop("planner_ms"), figures.pop("planner_ms_max")
    assert first["policies"] == second["policies"] == replay["policies"]
    assert first["clairvoyant"] is None
    other = run_json(capsys, *quick, "--seed", "4", "--policies", "random")
    assert other["policies"]["static"]["step_par_mean"] != first["policies"]["static"]["step_par_mean"]


@pytest.mark.slow
def test_table_output(capsys, tmp_path):
    assert main(["simulate", *FAST, "--out", str(tmp_path), "--redundant", "32", "--dispatch", "local",
                 "--similarity", "0.99"]) == 0
    out = capsys.readouterr().out
    assert "static" in out and "clairvoyant:default" in out and "speed" in out
    assert f"report written to {tmp_path}" in out.replace("\n", "")


@pytest.mark.parametrize("args, message", [
    (["--policies", "defualt"], "did you mean 'default'"),
    (["--interval", "0"], "--window/--interval must be >= 1"),
    (["--trace", "builtin:nope"], "unknown built-in trace"),
    (["--trace", "/nonexistent/load.npz"], "/nonexistent/load.npz"),
    (["--ranks", "7"], "--ranks 7 x --slots-per-rank 9 = 63 slots cannot hold the 256 experts"),
    (["--ranks", "6", "--slots-per-rank", "50", "--nodes", "4"], "--nodes 4 does not divide --ranks 6"),
    (["--redundant", "3"], "do not split evenly over --ranks 32"),
    (["--clairvoyant", "oracle"], "unknown policy 'oracle'"),
])
def test_bad_input_is_one_clear_error(capsys, args, message):
    assert main(["simulate", "--steps", "20", "--no-files", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow
def test_deepseek_v3_statistics_as_trace(capsys, data_dir):
    out = run_json(capsys, "--no-files", "--trace", str(data_dir / "sglang_dsv3_ep_statistics.npz"), "--steps",
                   "150", "--policies", "default")
    assert out["trace"]["layers"] == 58 and out["policies"]["default"]["step_par_mean"] < \
        out["policies"]["static"]["step_par_mean"]


@pytest.mark.dist
@pytest.mark.slow
def test_parallel_runs_match_in_process_runs(capsys):
    quick = ["--no-files", "--steps", "120", "--policies", "default,random", "--clairvoyant", "default"]
    outs = [run_json(capsys, *quick, "--jobs", jobs) for jobs in ("1", "2")]
    for out in outs:
        for figures in [*out["policies"].values(), out["clairvoyant"]]:
            figures.pop("planner_ms"), figures.pop("planner_ms_max")
    assert list(outs[1]["policies"]) == ["static", "default", "random"]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_error_in_a_run_is_one_clear_error(capsys, jobs):
    # 32 ranks x 7 slots cannot hold 256 experts: simulate() raises, in a worker with --jobs 2
    assert main(["simulate", "--steps", "20", "--no-files", "--policies", "default", "--slots-per-rank", "7",
                 "--jobs", jobs]) == 1
    err = capsys.readouterr().err
    assert "256" in err and "Traceback" not in err


def test_a_policy_that_can_plan_for_balanced_dispatch_is_told_so():
    from eplb.cycle.planning import cycle_policy

    assert cycle_policy("auto", dispatch="balanced").dispatch == "balanced"
    assert cycle_policy("auto", dispatch="even").dispatch == "even"
    assert cycle_policy("auto", {"dispatch": "even"}, dispatch="balanced").dispatch == "even"  # the user's option
    # no such option: built as usual, and it plans what the plain policy plans
    import numpy as np

    from eplb import Topology, get_policy

    load, topology = np.random.default_rng(0).integers(0, 100, (2, 16)), Topology(4, 5)
    told = cycle_policy("default", dispatch="balanced").rebalance(load, topology)
    plain = get_policy("default").rebalance(load, topology)
    np.testing.assert_array_equal(told.placement.phy2log, plain.placement.phy2log)


@pytest.mark.slow
def test_clairvoyant_floor_is_the_best_of_its_candidates_and_each_run_reports_its_distance(capsys, tmp_path):
    out = run_json(capsys, "--steps", "150", "--clairvoyant", "default,random", "--out", str(tmp_path))
    candidates = out["clairvoyant_candidates"]
    assert set(candidates) == {"default", "random"}
    best = min(candidates, key=candidates.get)
    assert out["clairvoyant"]["policy"] == best == "default"  # random moves one slot: far from a floor
    floor = out["clairvoyant"]["step_par_mean"]
    for figures in out["policies"].values():
        assert figures["par_vs_floor"] == pytest.approx(figures["step_par_mean"] / floor)
        assert figures["par_vs_floor"] >= 1.0
    assert "PAR vs floor" in (tmp_path / "report.md").read_text()
