"""The device check (``benchmarks/gpu_check.py``, ``eplb doctor``) on CPU, end to end: two real Gloo ranks on one
device, every dispatch mode to its end; and when a rank raises, dies or hangs, still one result that says so."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from eplb import Placement, Topology  # noqa: E402
from eplb.cli import main  # noqa: E402
from eplb.device_check import CheckSettings, DeviceCheckError, resolve_device, run_check, table  # noqa: E402
from eplb.device_check.graphs import graph_recording  # noqa: E402
from eplb.device_check.workload import expert_tensors, weights_match  # noqa: E402
from eplb.runtime.controller import STEP_KINDS  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
SMALL = dict(layers=8, experts=32, slots=40, top_k=4, layers_per_step=2)


@pytest.fixture(scope="module")
def compiled(compiled_auto):
    """The check's policy compiled once here, so that each planner worker loads the numba cache."""
    from eplb.runtime.planner import warm_up

    warm_up("default", {})


@pytest.fixture(scope="module")
def doctor(compiled):
    """``eplb doctor --device cpu --json``, in this process (the ranks are processes of their own)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["doctor", "--device", "cpu", "--json"])
    return code, out.getvalue()


@pytest.mark.dist
@pytest.mark.slow
def test_doctor_prints_one_json_object_and_its_exit_code_follows_the_verdict(doctor):
    code, out = doctor
    result = json.loads(out)  # exactly one JSON object: anything else on stdout fails here
    assert code == (0 if result["ok"] else 1)
    assert result["ok"] == (not result["failures"])
    assert result["device"] == "cpu" and result["ranks"] == 2
    assert result["model"] == {"layers": 58, "experts": 256, "slots": 320, "top_k": 8, "expert_bytes": 8192,
                               "expert_dtypes": ["bfloat16", "uint8"], "cycles": 3}


@pytest.mark.dist
@pytest.mark.slow
def test_every_mode_runs_its_cycles_to_an_agreed_stop(doctor):
    result = json.loads(doctor[1])
    assert list(result["modes"]) == ["rank", "token", "local", "balanced"]
    for dispatch, mode in result["modes"].items():
        assert mode["stopped"] == "cycles", dispatch  # by construction, not by the budget
        assert len(set(mode["stop_steps"])) == 1 and mode["stop_steps"][0] == mode["steps"], (dispatch, mode)
        assert all(mode["kinds"][kind] > 0 for kind in STEP_KINDS), (dispatch, mode["kinds"])
        # a new load profile every cycle: each of the three cycles moved layers (the fourth window only started)
        assert len(mode["cycles"]) == 4 and all(c["layers_switched"] > 0 for c in mode["cycles"][:3]), mode["cycles"]


@pytest.mark.dist
@pytest.mark.slow
def test_routes_weights_and_groups_are_right_in_every_mode(doctor):
    result = json.loads(doctor[1])
    for dispatch, mode in result["modes"].items():
        assert mode["routes_equal_numpy"], dispatch  # balanced: the device split equals eplb.dispatch's
        assert mode["weights_match_placement"], dispatch  # every moved byte landed where the placement says
        assert mode["serving_group_calls"] == 0, dispatch
        assert mode["staging_bytes"] > 0 and mode["transfer_gbps"] > 0
        assert mode["forward_ratio_during_transfer"] > 0


@pytest.mark.dist
@pytest.mark.slow
def test_the_serving_thread_makes_no_host_sync_in_any_hook(doctor):
    result = json.loads(doctor[1])
    for dispatch, mode in result["modes"].items():
        assert mode["blocking"] == {} or not any(mode["blocking"].values()), (dispatch, mode["blocking"])
    assert result["ok"], result["failures"]


@pytest.mark.dist
@pytest.mark.slow
def test_cpu_skips_only_what_needs_cuda_and_says_so(doctor):
    result = json.loads(doctor[1])
    assert result["graph_recording"] == {"skipped": "needs CUDA"}
    assert len(result["skipped"]) == 3 and all("CUDA" in line for line in result["skipped"])
    text = table(result)
    for kind in STEP_KINDS:
        assert f"sync-free: {kind} steps" in text
    assert "skipped on this device: CUDA graph recording" in text
    assert ("OK: every check passed" in text) == result["ok"]


@pytest.mark.dist
@pytest.mark.slow
def test_a_rank_that_raises_still_gives_one_json_object_and_exit_1(compiled):
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--modes", "balanced", "--layers", "8",
                          "--experts", "32", "--slots", "40", "--fault", "1:raise"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert not result["ok"]
    assert "fails on purpose" in result["rank_errors"]["1"]
    assert any(line.startswith("rank 1 raised: RuntimeError: rank 1 fails on purpose") for line in result["failures"])


@pytest.mark.dist
@pytest.mark.slow
def test_a_rank_that_dies_is_reported(compiled):
    result = run_check(CheckSettings(modes=("rank",), fault=(0, "exit"), **SMALL))
    assert not result["ok"]
    assert "rank 0 died (exit code 17)" in result["error"]
    assert result["failures"][0] == result["error"]
    assert multiprocessing.active_children() == []


@pytest.mark.dist
@pytest.mark.slow
def test_a_rank_that_hangs_is_reported_with_its_stacks(compiled):
    # a rank reaches its first move step (where it hangs) within seconds: 15 s of margin leave it three times that
    result = run_check(CheckSettings(modes=("rank",), fault=(1, "hang"), budget_s=5, margin_s=15, **SMALL))
    assert not result["ok"]
    assert "did not finish within 20 s" in result["error"]
    assert "in _fail" in result["stacks"]["1"]  # where the hung rank's serving thread was
    assert result["last_seen"]["1"][0] == "rank"
    assert "their threads' stacks are in the JSON result" in table(result)


@pytest.mark.dist
@pytest.mark.slow
def test_ranks_past_their_budget_stop_on_the_same_step(compiled):
    # more cycles than any machine serves in 2 s: the stop is the budget's, however fast the machine
    result = run_check(CheckSettings(modes=("local",), budget_s=2, cycles=1000, **SMALL))
    mode = result["modes"]["local"]
    assert mode["stopped"] == "deadline" and len(set(mode["stop_steps"])) == 1
    assert not result["ok"] and any("budget" in line for line in result["failures"])


_WATCH_PROBE = """
import threading, warnings
from eplb.device_check.watch import HookWatch

watch = HookWatch(cuda=True)  # what torch's sync debug mode raises in warn mode, on this thread and on another

def sync():
    warnings.warn("called a synchronizing CUDA operation (Triggered internally at CUDAFunctions.cpp)")

with watch.hook():
    sync()
    sync()
    side = threading.Thread(target=sync)  # EPLB's side thread may synchronise
    side.start()
    side.join()
sync()  # outside a hook
print(watch.hits)
"""


def test_cuda_syncs_count_on_the_serving_thread_inside_a_hook_only():
    out = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", _WATCH_PROBE],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(["CUDA sync at <string>:8 (sync)"] * 2)
    assert "synchronizing" not in out.stderr  # the side thread's and the unwatched one are neither counted nor shown


@pytest.mark.parametrize("dispatch", ["rank", "token", "local", "balanced"])
def test_graph_recording_counts_the_real_tokens_of_the_recorded_stage(dispatch):
    # on CPU the forward runs eagerly: the counting the CUDA graph replays is the same code
    result = graph_recording(CheckSettings(modes=(dispatch,), **SMALL), torch.device("cpu"))
    assert result == {dispatch: {"ok": True, "routes_equal_eager": True, "counts_equal": True}}


def test_weights_match_tells_a_wrong_byte():
    settings = CheckSettings(**SMALL)
    placement = Placement.initial(settings.experts, Topology(2, settings.slots_per_rank), settings.layers)
    tensors = expert_tensors(settings, placement.phy2log, 1, "cpu")
    assert weights_match(settings, tensors, placement.phy2log, 1)
    swapped = placement.phy2log.copy()
    swapped[3, [20, 21]] = swapped[3, [21, 20]]  # two slots of rank 1 in layer 3
    assert not weights_match(settings, tensors, swapped, 1)
    tensors[5][1].view(torch.uint8)[2, 7] ^= 1
    assert not weights_match(settings, tensors, placement.phy2log, 1)


@pytest.mark.parametrize("name, words", [("tpu", "expected cpu, cuda or cuda:N"), ("cpu:1", "expected cpu"),
                                         ("", "expected cpu")])
def test_a_device_the_runtime_cannot_use_is_refused(name, words):
    with pytest.raises(DeviceCheckError, match=words):
        resolve_device(name)


@pytest.mark.gpu
@pytest.mark.dist
@pytest.mark.slow
def test_doctor_on_cuda_runs_what_the_cpu_run_skips(compiled, capsys):
    code = main(["doctor", "--device", "cuda", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["device"].startswith("cuda") and result["skipped"] == []
    assert "skipped" not in result["graph_recording"], result["graph_recording"]
    assert result["ok"] and code == 0, result["failures"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_doctor_without_cuda_says_so_in_one_line_and_starts_nothing(capsys):
    assert main(["doctor", "--device", "cuda"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "device 'cuda'" in captured.err and "--device cpu" in captured.err
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("changes, field", [(dict(ranks=1), "ranks"), (dict(cycles=1), "cycles"),
                                            (dict(expert_bytes=1000), "expert_bytes"),
                                            (dict(expert_dtypes=("float64",)), "expert_dtypes"),
                                            (dict(modes=("fast",)), "modes"), (dict(fault=(5, "raise")), "fault"),
                                            (dict(slots=100), "slots")])
def test_bad_settings_name_the_field(changes, field):
    with pytest.raises(DeviceCheckError, match=f"^{field} must be"):
        CheckSettings(**changes)


def test_the_script_refuses_a_bad_device_with_one_json_object():
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "tpu"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    result = json.loads(out.stdout)
    assert not result["ok"] and "expected cpu, cuda or cuda:N" in result["error"]
