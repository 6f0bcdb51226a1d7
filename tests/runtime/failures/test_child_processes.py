"""``eplb demo`` and ``eplb simulate`` leave no process behind, whichever process is killed, and ``demo`` refuses a
run the machine cannot hold.

Real processes, real signals: the command runs in a subprocess, the test records every process it started (ranks,
their planner workers, simulation workers, helpers) by pid and start time, kills one process, and checks by pid that
none survives.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
if not sys.platform.startswith("linux"):
    pytest.skip("reads the process tree from /proc", allow_module_level=True)

from eplb.cli import main  # noqa: E402
from eplb.commands import common, demo  # noqa: E402

SRC = str(Path(__file__).resolve().parents[3] / "src")
# long enough to be killed mid-run; small enough to start fast on two shared cores
DEMO = ["demo", "--ranks", "2", "--steps", "100000", "--tokens", "16", "--layers", "2", "--window", "10",
        "--timeout", "300", "--json"]
#: how long the processes of a killed command may take to go: generous, a loaded 2-core runner is slow to schedule
#: them; what is checked is that they go, not how fast
GONE_WITHIN_S = 60.0


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
    return int(fields[1]), fields[0], int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live process below ``root``."""
    parent_of, started = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] != "Z":
                parent_of[int(entry)], started[int(entry)] = stat[0], stat[2]
    found, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parent_of.items():
            if parent == pid and child not in found:
                found[child] = started[child]
                frontier.append(child)
    return found


def _alive(processes: dict[int, int]) -> list[int]:
    """The pids of ``processes`` still running (same start time, not a zombie)."""
    out = []
    for pid, start in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[1] != "Z" and stat[2] == start:
            out.append(pid)
    return out


def _start_demo():
    """A demo in its own session, once both ranks have planned a cycle (so every process is past its start-up)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen([sys.executable, "-m", "eplb.cli", "-v", *DEMO], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)  # the pipe never fills
    reader.start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        planned = {m.group(1) for line in list(lines) if (m := re.search(r"rank (\d) \S+: eplb cycle \d+:", line))}
        if planned == {"0", "1"}:
            tree = _descendants(process.pid)
            parent_of = {pid: stat[0] for pid in tree if (stat := _stat(pid)) is not None}
            children = {pid for pid, parent in parent_of.items() if parent == process.pid}  # ranks, resource tracker
            ranks = sorted({parent for parent in parent_of.values() if parent in children})
            assert len(ranks) == 2, "each rank runs a planner worker"
            return process, tree, ranks, reader, lines
        if process.poll() is not None:
            reader.join(5)
            pytest.fail("the demo ended early:\n" + "".join(lines))
        time.sleep(0.5)
    _kill_all(process, _descendants(process.pid))
    pytest.fail("the demo did not plan a cycle within 180 s")


def _kill_all(process, tree: dict[int, int]) -> None:
    """Clean up after a failed test, so one failure does not leave processes for the next."""
    for pid in [process.pid, *_alive(tree)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=10)


def _wait_gone(tree: dict[int, int]) -> list[int]:
    deadline = time.monotonic() + GONE_WITHIN_S
    while _alive(tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(tree)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.usefixtures("compiled_auto")  # the demo's ranks load the compiled policy
@pytest.mark.parametrize("sig, whole_group", [(signal.SIGKILL, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGKILL", "SIGTERM", "Ctrl-C"])  # Ctrl-C: SIGINT to every process of the demo
def test_no_process_outlives_a_killed_demo(sig, whole_group):
    process, tree, _, reader, lines = _start_demo()
    try:
        tree.update(_descendants(process.pid))
        if whole_group:
            os.killpg(process.pid, sig)  # the demo leads its own session
        else:
            os.kill(process.pid, sig)
        process.wait(timeout=GONE_WITHIN_S)
        survivors = _wait_gone(tree)
        assert not survivors, f"still running {GONE_WITHIN_S} s after {sig.name} to the demo: {survivors}"
        reader.join(GONE_WITHIN_S)
        if sig == signal.SIGINT:
            err = "".join(lines)
            assert process.returncode == 130 and "eplb demo: interrupted" in err and "Traceback" not in err, err
    finally:
        _kill_all(process, tree)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.usefixtures("compiled_auto")  # the demo's ranks load the compiled policy
def test_a_killed_rank_ends_the_demo_and_every_other_process():
    process, tree, ranks, reader, lines = _start_demo()
    try:
        tree.update(_descendants(process.pid))
        os.kill(ranks[0], signal.SIGKILL)
        process.wait(timeout=GONE_WITHIN_S)
        survivors = _wait_gone(tree)
        assert not survivors, f"still running after rank pid {ranks[0]} was killed: {survivors}"
        reader.join(GONE_WITHIN_S)
        err = "".join(lines)
        assert process.returncode == 1
        assert "eplb demo: error: rank 0 died (killed by SIGKILL)" in err and "Traceback" not in err, err
    finally:
        _kill_all(process, tree)


@pytest.mark.dist
@pytest.mark.slow
def test_no_simulation_worker_outlives_a_killed_simulate():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen([sys.executable, "-m", "eplb.cli", "simulate", "--jobs", "2", "--no-files", "--json"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tree = {}
    try:
        deadline = time.monotonic() + 120
        while len(_descendants(process.pid)) < 3 and time.monotonic() < deadline:  # two workers and the tracker
            time.sleep(0.2)
        time.sleep(2)  # past their start-up: simulating
        tree = _descendants(process.pid)
        assert len(tree) >= 3 and process.poll() is None
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=GONE_WITHIN_S)
        survivors = _wait_gone(tree)
        assert not survivors, f"still running {GONE_WITHIN_S} s after SIGKILL to simulate: {survivors}"
    finally:
        _kill_all(process, tree)


@pytest.mark.parametrize("argv, message", [
    (["--ranks", "200"], "--ranks 200 is too many for"),
    (["--ranks", "4", "--experts", "65536", "--layers", "64"], "is available; lower --ranks"),
    (["--slots-per-rank", "0"], "--slots-per-rank must be >= 1, got 0"),
    (["--slots-per-rank", "-2"], "--slots-per-rank must be >= 1, got -2"),
    (["--mode", "record", "--map", "/proc/x.json"], "--map /proc/x.json: cannot write in /proc"),
    (["--mode", "record", "--map", "/"], "--map /: is a folder"),
    (["--mode", "record", "--map", "/no/such/folder/map.json"], "folder /no/such/folder does not exist"),
    (["--ranks", "0"], "--ranks must be >= 1, got 0"),
])
def test_a_demo_the_machine_cannot_run_is_refused_before_any_process_starts(capsys, monkeypatch, argv, message):
    import eplb.engine.launch

    def launch(*args, **kwargs):
        pytest.fail("the demo launched its ranks")

    monkeypatch.setattr(eplb.engine.launch, "launch", launch)
    before = _descendants(os.getpid())
    assert main(["demo", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert _descendants(os.getpid()).keys() <= before.keys()


# the rule of check_machine_fits, written out by hand: 4 ranks per usable core, at least 8
@pytest.mark.parametrize("cores, cap", [(1, 8), (2, 8), (3, 12), (16, 64)])
def test_the_rank_cap_follows_the_usable_cores(monkeypatch, cores, cap):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    demo.check_machine_fits(cap, 1)  # fits
    with pytest.raises(demo.EplbError, match=rf"--ranks {cap + 1} is too many for {cores} usable CPU core\(s\).* "
                                             rf"at most {cap} here"):
        demo.check_machine_fits(cap + 1, 1)


def test_the_memory_estimate_grows_with_the_model_and_is_refused_past_the_available_memory():
    from eplb.engine.model import ModelConfig

    small = demo.rank_memory_bytes(ModelConfig(), 5, 128)
    large = demo.rank_memory_bytes(ModelConfig(num_layers=64, num_experts=4096, num_groups=1), 5, 128)
    assert 500 * 2**20 < small < 700 * 2**20  # the measured fixed part dominates the default model
    assert large > 40 * small
    free = common.available_memory()
    assert 0 < free < 1 << 62
    with pytest.raises(demo.EplbError, match=r"--ranks 2 \(2 ranks x .* MiB each, plus this process\) needs about"):
        demo.check_machine_fits(2, free)


def test_a_container_memory_limit_lowers_the_available_memory(tmp_path, monkeypatch):
    limit, usage, stat = tmp_path / "memory.max", tmp_path / "memory.current", tmp_path / "memory.stat"
    limit.write_text(f"{2 * 2**30}\n")
    usage.write_text(f"{1536 * 2**20}\n")
    stat.write_text(f"anon 1000\ninactive_file {512 * 2**20}\nactive_file 7\n")
    monkeypatch.setattr(common, "_CGROUP_MEMORY", ((str(limit), str(usage), str(stat), "inactive_file"),))
    assert common._cgroup_free_bytes() == 1 * 2**30  # 2 GiB limit - 1.5 GiB used + 0.5 GiB of reclaimable cache
    assert common.available_memory() == 1 * 2**30
    limit.write_text("max\n")
    assert common._cgroup_free_bytes() is None
