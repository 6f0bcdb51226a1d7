"""``eplb tune``: the ranked rows, the files, each engine's settings read back by eplb's reader, bad input, Ctrl-C and
--resume, and Ray against local processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from eplb.cli import main
from eplb.errors import EplbError
from eplb.formats import read_map
from eplb.runtime.config import EplbConfig
from eplb.sim.sweep import MEASURED_FIELDS

SRC = Path(__file__).resolve().parents[2] / "src"
# a small model: 16 layers x 64 experts on 8 ranks x 9 slots (R = 8)
SMALL = ["--trace", "builtin:olmoe", "--steps", "240", "--ranks", "8", "--windows", "24,48", "--top", "5"]


def tune(capsys, *extra, out):
    code = main(["tune", *SMALL, "--out", str(out), "--json", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def comparable(rows):
    return [{k: v for k, v in row.items() if k not in MEASURED_FIELDS} for row in rows]


def test_rows_ranked_with_references_files_and_settings(tmp_path, capsys):
    report = tune(capsys, "--policies", "auto,default", "--jobs", "1", out=tmp_path / "t")
    rows = report["rows"]
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)) == 2 * 3 * (2 + 1)  # policies x redundancies x (2 windows + adaptive)
    assert [row["step_ms"] for row in rows] == sorted(row["step_ms"] for row in rows)
    assert report["best"] == keys[0] == report["pareto"][0]
    assert {row["kind"] for row in rows} == {"dynamic", "adaptive"}
    assert sorted({row["redundant"] for row in rows}) == [0, 8, 16]
    for row in rows:
        assert row["step_ms"] >= row["perfect_ms"] > 0
        assert 1.0 <= row["step_par"] and row["over_floor"] > 0.9 and row["speedup_vs_static"] > 0
        assert (row["bytes_moved"] > 0) == (row["bytes_per_hour"] > 0)
    front = [r for r in rows if r["key"] in report["pareto"]]
    assert all(a["bytes_per_hour"] > b["bytes_per_hour"] for a, b in zip(front, front[1:]))
    for refs in report["references"].values():
        assert refs["static"]["step_ms"] >= refs["floor"]["step_ms"]
    EplbConfig.from_dict(report["settings"])  # the pasted dict is the runtime's
    folder = tmp_path / "t"
    assert json.loads((folder / "tune.json").read_text())["best"] == report["best"]
    assert (folder / "pareto.png").stat().st_size > 0
    lines = (folder / "tune-rows.jsonl").read_text().splitlines()
    assert len(lines) == len(rows) + 2 * 3  # and per redundancy: no balancing, the floor


@pytest.mark.parametrize("engine", ["vllm", "vllm-ascend", "sglang", "trtllm"])
def test_each_engines_settings_are_what_its_reader_reads(engine, tmp_path, capsys):
    out = tmp_path / engine
    report = tune(capsys, "--engine", engine, "--policies", "default,swift", "--windows", "24",
                  "--redundant-range", "8", "--jobs", "1", out=out)
    best = next(row for row in report["rows"] if row["key"] == report["best"])
    settings = report["settings"]
    if engine == "vllm":
        assert settings["env"]["EPLB_VLLM_POLICY"] == best["policy"]
        config = EplbConfig.from_dict({**settings["eplb_config"], "mode": "dynamic"})
        assert (config.window_steps, config.interval_steps) == (best["window"], best["interval"])
        assert f"--eplb-config '{json.dumps(settings['eplb_config'])}'" in report["paste"]
    elif engine == "vllm-ascend":
        inner = settings["additional_config"]["eplb_config"]
        assert inner["expert_heat_collection_interval"] == 24 and inner["algorithm_execution_interval"] in (10, 50)
        assert EplbConfig.from_dict(inner, env=settings["env"]).mode == "dynamic"
        with pytest.raises(EplbError, match="DYNAMIC_EPLB"):
            EplbConfig.from_dict(inner, env={})  # why the export line is printed
        assert "export DYNAMIC_EPLB=true" in report["paste"]
    else:
        kind = {"sglang": {"static", "dynamic"}, "trtllm": {"static"}}[engine]
        assert {row["kind"] for row in report["rows"]} == kind
        map_file = out / ("sglang_init_expert_location.json" if engine == "sglang" else "moe_load_balancer.yaml")
        written = read_map(map_file, num_ranks=8)
        assert written.topology.slots_per_rank == 9
        plan_line = next(line for line in report["paste"].splitlines() if line.startswith("eplb plan"))
        words = plan_line.split("#")[0].split()
        again = tmp_path / ("again" + map_file.suffix)
        words[words.index("-o") + 1] = str(again)
        assert main(words[1:]) == 0  # the printed `eplb plan` line writes the same map
        capsys.readouterr()
        assert np.array_equal(read_map(again, num_ranks=8).phy2log, written.phy2log)


@pytest.mark.parametrize("flags, words", [
    (["--windows", ","], "--windows ',' is an empty grid"),
    (["--policies", " , "], "--policies"),
    (["--windows", "240"], "--windows 240 is not shorter than the trace (240 steps)"),
    (["--slots-per-rank", "7"], "cannot hold the 64 experts"),
    (["--redundant-range", "4"], "--redundant-range 4"),
])
def test_bad_input_is_one_line_and_writes_nothing(flags, words, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["tune", *SMALL, "--out", str(out), *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and err.startswith("eplb tune: error:")
    assert not out.exists()


def test_a_ray_address_that_does_not_answer_is_one_line(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["tune", *SMALL, "--out", str(out), "--ray", "127.0.0.1:9"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ray" in err[0]
    assert not out.exists()


@pytest.mark.slow
def test_ctrl_c_keeps_the_finished_rows_and_resume_runs_the_rest(tmp_path, capsys):
    out = tmp_path / "t"
    command = [sys.executable, "-m", "eplb.cli", "tune", *SMALL, "--policies", "auto,default", "--jobs", "1",
               "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows_file = out / "tune-rows.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if rows_file.exists() and len(rows_file.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "--resume" in err
    kept = len(rows_file.read_text().splitlines())
    assert kept >= 3 and not (out / "tune.json").exists()
    resumed = tune(capsys, "--policies", "auto,default", "--jobs", "1", "--resume", out=out)
    total = len(rows_file.read_text().splitlines())
    assert total == len(resumed["rows"]) + 2 * 3  # each run once: the kept rows were not run again
    fresh = tune(capsys, "--policies", "auto,default", "--jobs", "1", out=tmp_path / "fresh")
    assert comparable(resumed["rows"]) == comparable(fresh["rows"])


@pytest.mark.dist
@pytest.mark.slow
def test_ray_tasks_give_the_local_rows(tmp_path, capsys):
    pytest.importorskip("ray")
    small = ["--policies", "auto,default", "--windows", "24", "--redundant-range", "8"]  # 4 candidates, 2 references
    local = tune(capsys, *small, "--jobs", "1", out=tmp_path / "local")
    on_ray = tune(capsys, *small, "--ray", out=tmp_path / "ray")
    assert len(on_ray["rows"]) == 4
    assert comparable(on_ray["rows"]) == comparable(local["rows"])
    assert on_ray["settings"] == local["settings"]
