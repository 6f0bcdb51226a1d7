"""Shared test fixtures: the read-only data in ../shared/data, skipped with a reason when absent."""

import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data folder sits beside the repository)")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _need(DATA)


@pytest.fixture(scope="session")
def ascend_vectors() -> dict:
    return json.loads(_need(DATA / "vectors" / "vllm_ascend_vectors.json").read_text())


@pytest.fixture(scope="session")
def vllm_vectors() -> dict:
    return json.loads(_need(DATA / "vectors" / "vllm_eplb_vectors.json").read_text())


@pytest.fixture(scope="session")
def deepseek_vectors() -> dict:
    return json.loads(_need(DATA / "vectors" / "deepseek_readme_example.json").read_text())


@pytest.fixture(scope="session")
def dsv3_counts():
    """int64 [12, 58, 256]: real DeepSeek-V3 expert loads, one row per workload."""
    import numpy as np

    with np.load(_need(DATA / "sglang_dsv3_ep_statistics.npz")) as f:
        return f["counts"]


@pytest.fixture(scope="session")
def compiled_auto():
    """Compile the default policy's numba kernels once, in this process, before a test spawns planner workers:
    they then load the cache instead of all compiling at once on a cold checkout (about 30 s each). The same warm-up
    a planner worker runs, live-ranks path included."""
    from eplb.runtime.planner import warm_up

    warm_up("auto", {})
