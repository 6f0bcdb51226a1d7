"""Shared test fixtures and checks.

- The reference data in ``tests/data`` (public figures copied with their provenance: ``tests/data/README.md``).
- ``@pytest.mark.reaches(n)`` and :func:`reached`: a property test counts the examples that reached its assertion
  and fails when fewer than ``n`` did, so an early ``return`` or a branch that is never taken cannot pass silently.
- ``EPLB_TEST_NO_SKIP=1`` (set by ``.ci/run``): the run fails if any test skipped (the skip report, ``-rs``, names
  them), so a missing dependency on CI's own machine is an error, not a silent gap.
- ``@pytest.mark.gpu``: the test needs CUDA. Without it the test is deselected at collection (the summary counts
  them as deselected and says why), not skipped: under ``EPLB_TEST_NO_SKIP=1`` no skip at all is allowed, and CI's
  machine has no GPU. With CUDA they run with the rest.
- Markers ``dist`` and ``slow`` (pyproject.toml): ``pytest -m "not slow and not dist"`` is the quick loop.
"""

import json
import os
from collections import Counter
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"

_REACHED: Counter = Counter()
_SKIPPED: list[str] = []
_NO_CUDA = "need CUDA, which this machine does not have"
_GPU_DESELECTED: list[str] = []


def reached(label: str = "assertion") -> None:
    """Count one example of the running property test that got as far as ``label`` (see ``reaches``)."""
    _REACHED[label] += 1


def pytest_configure(config):
    config.addinivalue_line("markers", "reaches(n=None, **floors): the test fails unless reached() was called at "
                                       "least n times (label 'assertion'), and reached(label) floors[label] times")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    marker = item.get_closest_marker("reaches")
    if marker is None:
        return (yield)
    floors = dict(marker.kwargs)
    if marker.args:
        floors["assertion"] = marker.args[0]
    _REACHED.clear()
    result = yield  # a failing test raises here, before the counts are read
    counts = dict(_REACHED)
    unknown = sorted(set(counts) - set(floors))
    if unknown:
        raise AssertionError(f"reached() labels {unknown} have no floor in @pytest.mark.reaches({floors})")
    short = {label: counts.get(label, 0) for label, floor in floors.items() if counts.get(label, 0) < floor}
    if short:
        raise AssertionError(f"too few examples reached the checks: {short}, floors {floors}")
    return result


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.hookimpl(trylast=True)  # after -m and -k deselected what they do not run
def pytest_collection_modifyitems(config, items):
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu and not _cuda_available():
        _GPU_DESELECTED.extend(item.nodeid for item in gpu)
        items[:] = [item for item in items if item.get_closest_marker("gpu") is None]
        config.hook.pytest_deselected(items=gpu)


def _note_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append(report.nodeid)


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):
    _note_skip(report)


def _skips_fail() -> bool:
    return bool(_SKIPPED) and os.environ.get("EPLB_TEST_NO_SKIP") == "1"


def pytest_sessionfinish(session, exitstatus):
    if _skips_fail() and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _GPU_DESELECTED:
        terminalreporter.write_line(f"{len(_GPU_DESELECTED)} gpu-marked test(s) deselected: they {_NO_CUDA}")
    if _skips_fail():
        terminalreporter.write_line(f"EPLB_TEST_NO_SKIP=1: {len(_SKIPPED)} skipped, and nothing may skip here: "
                                    + ", ".join(_SKIPPED), red=True)


def _json(name: str) -> dict:
    return json.loads((DATA / "vectors" / name).read_text())


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def ascend_vectors() -> dict:
    return _json("vllm_ascend_vectors.json")


@pytest.fixture(scope="session")
def vllm_vectors() -> dict:
    return _json("vllm_eplb_vectors.json")


@pytest.fixture(scope="session")
def deepseek_vectors() -> dict:
    return _json("deepseek_readme_example.json")


@pytest.fixture(scope="session")
def dsv3_counts():
    """int64 [12, 58, 256]: real DeepSeek-V3 expert loads, one row per workload."""
    import numpy as np

    with np.load(DATA / "sglang_dsv3_ep_statistics.npz") as f:
        return f["counts"]


@pytest.fixture(scope="session")
def compiled_auto():
    """Compile the default policy's numba kernels once, in this process, before a test spawns planner workers:
    they then load the cache instead of all compiling at once on a cold checkout (about 30 s each). The same warm-up
    a planner worker runs, live-ranks path included."""
    from eplb.runtime.planner import warm_up

    warm_up("auto", {})
