"""What the runtime refuses when it is built, before anything starts (no thread, no process): a device it cannot use,
a stream that is not the device's, a communicator the build lacks; and the device it normalises (``cuda`` means the
current one, so every EPLB thread sets the same device)."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")

from eplb import Topology  # noqa: E402
from eplb.errors import EplbError  # noqa: E402
from eplb.runtime import EplbConfig, EplbController  # noqa: E402
from eplb.runtime.transport import SideChannel, runtime_device  # noqa: E402

TOPOLOGY = Topology(1, 4)


@pytest.mark.parametrize("device, message", [
    ("meta", "device 'meta' is not one the EPLB runtime can use; expected cpu or cuda"),
    ("nonsense", "device must be a torch device such as 'cpu' or 'cuda:0', got 'nonsense'"),
    pytest.param("cuda", "CUDA is not available", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                          reason="CUDA is here")),
])
@pytest.mark.parametrize("mode", ["dynamic", "record", "static", "off"])
def test_a_device_the_runtime_cannot_use_is_refused_before_anything_starts(device, message, mode, tmp_path):
    from eplb import Placement
    from eplb.formats import write_map

    settings = {"mode": mode, "window_steps": 4}
    if mode == "record":
        settings["record_path"] = str(tmp_path / "r.json")
    if mode == "static":
        settings["expert_map_path"] = str(tmp_path / "m.json")
        write_map(Placement.initial(4, TOPOLOGY, 1), settings["expert_map_path"], "ascend")
    threads = threading.active_count()
    with pytest.raises(EplbError, match=message):
        EplbController(EplbConfig.from_dict(settings), 1, 4, TOPOLOGY, 0, layer_tensors=[[torch.zeros(4, 2)]],
                       device=device)
    assert threading.active_count() == threads


def test_cpu_is_cpu():
    assert runtime_device("cpu") == torch.device("cpu")


@pytest.mark.gpu
def test_cuda_names_the_current_device():
    assert runtime_device("cuda") == torch.device("cuda", torch.cuda.current_device())


def test_a_stream_on_a_cpu_device_and_a_communicator_the_build_lacks_are_refused():
    threads = threading.active_count()
    with pytest.raises(EplbError, match="stream is for a CUDA device; the device is cpu"):
        SideChannel(stream=object())
    if not torch.cuda.is_available():
        with pytest.raises(EplbError, match="the nccl transfer backend .* needs a CUDA device"):
            SideChannel(backend="nccl")
    with pytest.raises(EplbError, match="transfer backend must be one of gloo, nccl, got 'nixl'"):
        SideChannel(backend="nixl")
    assert threading.active_count() == threads


def test_the_controller_takes_the_engines_stream():
    config = EplbConfig.from_dict({"mode": "dynamic", "window_steps": 4})
    with pytest.raises(EplbError, match="stream is for a CUDA device"):
        EplbController(config, 1, 4, TOPOLOGY, 0, layer_tensors=[[torch.zeros(4, 2)]], stream=object())
    ctl = EplbController(config, 1, 4, TOPOLOGY, 0, layer_tensors=[[torch.zeros(4, 2)]])
    try:
        assert ctl.channel.serving_stream is None  # CPU: no stream; on CUDA the current one at construction
    finally:
        ctl.close()
