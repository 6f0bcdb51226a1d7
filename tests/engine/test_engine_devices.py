"""Where the demo engine's ranks serve: two ranks can share one GPU (Gloo), NCCL only with a GPU per rank."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from eplb.engine.launch import launch  # noqa: E402
from eplb.engine.serve import rank_device, serving_backend  # noqa: E402
from eplb.errors import EplbError  # noqa: E402


def test_ranks_share_the_gpus_there_are():
    assert [rank_device("cuda", r, gpus=1) for r in range(2)] == [torch.device("cuda", 0)] * 2
    assert [rank_device("cuda", r, gpus=2) for r in range(4)] == [torch.device("cuda", i) for i in (0, 1, 0, 1)]
    assert rank_device("cpu", 3) == torch.device("cpu")


def test_nccl_only_with_a_gpu_per_rank():
    assert serving_backend("cuda", 2, gpus=1) == "gloo"  # NCCL refuses two ranks on one device
    assert serving_backend("cuda", 2, gpus=2) == "nccl"
    assert serving_backend("cpu", 2, gpus=8) == "gloo"


def _never_runs(rank, world, emit):
    raise AssertionError("a rank started")


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs fewer than 2 GPUs")
def test_launch_refuses_nccl_with_fewer_gpus_than_ranks_before_any_rank_starts():
    with pytest.raises(EplbError, match="backend 'nccl' needs one GPU per rank: 2 ranks"):
        launch(_never_runs, 2, backend="nccl")
