import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from eplb import EplbError, FormatError, LoadError, Placement, Topology
from eplb.formats import (
    detect_format,
    detect_kind,
    map_problems,
    read_load,
    read_map,
    write_load,
    write_map,
)
from eplb.placement import shared_rank_experts

MAP_FILES = [("ascend", "m.json"), ("sglang", "m.json"), ("sglang", "m.pt"), ("vllm", "m.npy"), ("vllm", "m.pt"),
             ("trtllm", "m.yaml")]
LOAD_FILES = [("npz", "l.npz"), ("sglang", "l.json"), ("sglang", "l.pt"), ("trtllm", "stats")]


@st.composite
def placements(draw):
    ranks = draw(st.integers(1, 4))
    slots = draw(st.integers(1, 3))
    experts = draw(st.integers(1, ranks * slots))
    layers = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    phy2log = np.stack([rng.permutation(np.arange(ranks * slots) % experts) for _ in range(layers)])
    return Placement(phy2log, experts, Topology(ranks, slots))


@pytest.mark.parametrize("fmt,name", MAP_FILES)
@settings(max_examples=15, deadline=None)
@given(placement=placements())
# the highest expert last on every device: a valid map that vllm-ascend's mix placement resembles
@example(placement=Placement(np.array([[0, 1, 0, 1]]), 2, Topology(2, 2)))
def test_map_round_trip(fmt, name, placement):
    with tempfile.TemporaryDirectory() as folder:
        _check_round_trip(Path(folder) / name, fmt, placement)


def _check_round_trip(path, fmt, placement):
    if fmt == "ascend" and len(shared_rank_experts(placement.phy2log, placement.topology)):
        with pytest.raises(FormatError, match="more than once"):
            write_map(placement, path, fmt)
        assert not path.exists()
        return
    write_map(placement, path, fmt)
    assert detect_format(path) == fmt and detect_kind(path) == "map"
    back = read_map(path, num_ranks=placement.topology.num_ranks, num_experts=placement.num_experts)
    assert back == placement
    assert map_problems(path, num_ranks=placement.topology.num_ranks, num_experts=placement.num_experts)[0] == []


@pytest.mark.parametrize("fmt,name", LOAD_FILES)
@pytest.mark.parametrize("shape", [(3, 5), (4, 3, 5)])
def test_load_round_trip(tmp_path, fmt, name, shape):
    load = np.random.default_rng(1).integers(0, 1000, size=shape)
    path = tmp_path / name
    write_load(load, path, fmt)
    assert detect_format(path) == fmt and detect_kind(path) == "load"
    back = read_load(path)
    expected = load[None] if fmt == "trtllm" and load.ndim == 2 else load  # statistics always have iterations
    np.testing.assert_array_equal(back, expected)


def test_float_load_round_trip(tmp_path):
    load = np.random.default_rng(2).random((2, 3, 4))
    for fmt, name in LOAD_FILES:
        write_load(load, tmp_path / name, fmt)
        np.testing.assert_allclose(read_load(tmp_path / name), load)


def test_ascend_vector(tmp_path, ascend_vectors):
    example = ascend_vectors["expert_map_json_example"]
    src = tmp_path / "in.json"
    src.write_text(json.dumps(example))
    placement = read_map(src)
    table = [d["device_expert"] for d in example["layer_list"][0]["device_list"]]
    assert placement.topology == Topology(2, 5)
    assert placement.num_experts == 8
    np.testing.assert_array_equal(placement.phy2log, [table[0] + table[1]])
    write_map(placement, tmp_path / "out.json", "ascend")
    assert json.loads((tmp_path / "out.json").read_text()) == example


def test_ascend_devices_read_by_position_like_vllm_ascend(tmp_path, caplog):
    doc = {"moe_layer_count": 1, "layer_list": [{"layer_id": 5, "device_count": 2, "device_list": [
        {"device_id": 1, "device_expert": [2, 3]}, {"device_id": 0, "device_expert": [0, 1]}]}]}
    (tmp_path / "m.json").write_text(json.dumps(doc))
    with caplog.at_level("WARNING"):
        np.testing.assert_array_equal(read_map(tmp_path / "m.json").phy2log, [[2, 3, 0, 1]])
    assert "device_id is 1; devices are read by their position" in caplog.text


def test_ascend_mix_placement_is_named(tmp_path, caplog):
    # vllm-ascend's mix placement: 4 routed experts, shared expert 4 in the last slot of both devices
    doc = {"moe_layer_count": 1, "layer_list": [{"layer_id": 0, "device_count": 2, "device_list": [
        {"device_id": 0, "device_expert": [0, 1, 4]}, {"device_id": 1, "device_expert": [2, 3, 4]}]}]}
    (tmp_path / "m.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=r"ids \[4\].*mix placement.*not routed experts \(--experts 4\)"):
        read_map(tmp_path / "m.json", num_experts=4)
    assert any("mix placement off" in line for line in map_problems(tmp_path / "m.json", num_experts=4)[0])
    # without the routed experts' count the same table is a valid map whose expert 4 sits last on every device
    # (as [[0, 1], [0, 1]] is): read, with a warning that names mix placement
    with caplog.at_level("WARNING"):
        assert read_map(tmp_path / "m.json").num_experts == 5
    assert "mix_placement=true" in caplog.text and "pass --experts" in caplog.text


def test_dsv3_statistics_read_as_steps(data_dir):
    load = read_load(data_dir / "sglang_dsv3_ep_statistics.npz")
    assert load.shape == (12, 58, 256) and load.dtype == np.int64


def test_trtllm_statistics_sum_over_ranks(tmp_path):
    from safetensors.numpy import save_file

    folder = tmp_path / "stats"
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": 3, "num_experts_per_token": 2}))
    rank0 = {"10_3": np.array([1, 2, 3]), "10_5": np.array([0, 0, 1]), "11_3": np.array([4, 4, 4]),
             "11_5": np.array([1, 1, 1])}
    rank1 = {key: 10 * value for key, value in rank0.items()}
    save_file(rank0, str(folder / "rank0.safetensors"))
    save_file(rank1, str(folder / "rank1.safetensors"))
    load = read_load(folder)
    # row l is TensorRT-LLM's layer_idx l (its load-balancer config keys layers the same way); unrecorded rows are 0
    expected = np.zeros((2, 6, 3), dtype=np.int64)
    expected[:, [3, 5]] = 11 * np.array([[[1, 2, 3], [0, 0, 1]], [[4, 4, 4], [1, 1, 1]]])
    np.testing.assert_array_equal(load, expected)

    save_file({"10_3": np.array([1, 2, 3])}, str(folder / "rank2.safetensors"))
    save_file({**rank0, "12_3": np.array([1, 1, 1])}, str(folder / "rank1.safetensors"))
    with pytest.raises(FormatError, match="iteration 12, layer 5"):
        read_load(folder)
    save_file({"iter10-layer3": np.array([1, 2, 3])}, str(folder / "rank1.safetensors"))
    with pytest.raises(FormatError, match="rank1.safetensors: key 'iter10-layer3'"):
        read_load(folder)
    save_file({"10_3": np.array([1, 2])}, str(folder / "rank1.safetensors"))
    with pytest.raises(FormatError, match=r"shape \[2\], expected \[3\]"):
        read_load(folder)


def test_trtllm_statistics_need_meta_info_and_a_new_folder(tmp_path):
    write_load(np.ones((2, 3)), tmp_path / "stats", "trtllm")
    with pytest.raises(FormatError, match="already exists"):
        write_load(np.ones((2, 3)), tmp_path / "stats", "trtllm")
    (tmp_path / "stats" / "meta_info.json").unlink()
    with pytest.raises(FormatError, match="missing meta_info.json"):
        read_load(tmp_path / "stats")


def test_trtllm_ep_size_in_file(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("num_slots: 4\nep_size: 2\ninitial_global_assignments:\n  3: [0, 1, 2, 0]\n  4: [2, 1, 0, 1]\n")
    placement = read_map(path)
    assert placement.topology == Topology(2, 2)
    # row l is layer key l, as TensorRT-LLM looks layers up; the unkeyed layers 0-2 read as the initial layout
    np.testing.assert_array_equal(placement.phy2log, [[0, 1, 2, 0]] * 4 + [[2, 1, 0, 1]])
    problems, _ = map_problems(path, num_ranks=4)
    assert problems == ["the file has 2 devices (ranks) but --ranks says 4"]


# -- detection ------------------------------------------------------------------------------------------------------

def test_detection_failures(tmp_path):
    (tmp_path / "m.txt").write_text("0 1 2")
    with pytest.raises(FormatError, match="pass --format"):
        detect_format(tmp_path / "m.txt")
    (tmp_path / "other.json").write_text(json.dumps({"experts": [1, 2]}))
    with pytest.raises(FormatError, match="'experts'"):
        detect_format(tmp_path / "other.json")
    with pytest.raises(FormatError, match="no such file"):
        detect_format(tmp_path / "absent.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="not TensorRT-LLM statistics"):
        detect_format(tmp_path / "empty")


def test_map_and_load_are_not_confused(tmp_path):
    write_load(np.ones((2, 4)), tmp_path / "l.npz")
    with pytest.raises(FormatError, match="expert loads, not expert maps"):
        read_map(tmp_path / "l.npz")
    write_load(np.ones((2, 4)), tmp_path / "l.json", "sglang")
    with pytest.raises(FormatError, match="use it as LOAD"):
        read_map(tmp_path / "l.json", num_ranks=1)
    write_map(Placement.initial(4, Topology(2, 2)), tmp_path / "m.npy", "vllm")
    with pytest.raises(FormatError, match="not an expert load"):
        read_load(tmp_path / "m.npy")


# -- bad input: one test per kind of problem -------------------------------------------------------------------------

def _ascend(tmp_path, layers, name="m.json", **top):
    doc = {"moe_layer_count": len(layers), **top, "layer_list": [
        {"layer_id": l, "device_count": len(devices),
         "device_list": [{"device_id": d, "device_expert": experts} for d, experts in enumerate(devices)]}
        for l, devices in enumerate(layers)]}
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_not_json(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{"moe_layer_count": 1, "layer_list": [')
    with pytest.raises(FormatError, match=r"m.json: not valid JSON: .* line 1"):
        read_map(path)
    problems, _ = map_problems(path)
    assert len(problems) == 1 and "not valid JSON" in problems[0]


def test_not_yaml(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("num_slots: [4\ninitial_global_assignments: {")
    with pytest.raises(FormatError, match="not valid YAML at line"):
        read_map(path, num_ranks=2)


@pytest.mark.parametrize("content,fmt,message", [
    ({"moe_layer_count": 1}, "ascend", "missing key 'layer_list'"),
    ({"moe_layer_count": 1, "layer_list": [{"device_list": [{"device_id": 0}]}]}, "ascend",
     "layer 0, device 0: missing key 'device_expert'"),
    ({"moe_layer_count": 1, "layer_list": [{"layer_id": 0}]}, "ascend", "layer 0: missing key 'device_list'"),
    ({"physical_to_logical_maps": [[0, 1]]}, "sglang", "missing key 'physical_to_logical_map'"),
])
def test_missing_key(tmp_path, content, fmt, message):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(content))
    with pytest.raises(FormatError, match=message):
        read_map(path, format=fmt, num_ranks=1)


def test_missing_key_yaml_and_npz(tmp_path):
    (tmp_path / "m.yaml").write_text("num_slots: 4\n")
    with pytest.raises(FormatError, match="missing key 'initial_global_assignments'"):
        read_map(tmp_path / "m.yaml", num_ranks=2)
    np.savez(tmp_path / "l.npz", count=np.ones((2, 3)))
    with pytest.raises(FormatError, match=r"l.npz: missing key 'counts' \(found count\)"):
        read_load(tmp_path / "l.npz")


def test_ragged_rows(tmp_path):
    path = _ascend(tmp_path, [[[0, 1], [2, 3]], [[0, 1], [2]]])
    with pytest.raises(FormatError, match="layer 1, device 1: 1 experts \\(slots\\), but layer 0, device 0 has 2"):
        read_map(path)
    (tmp_path / "s.json").write_text(json.dumps({"physical_to_logical_map": [[0, 1, 2], [0, 1], [2, 1, 0]]}))
    with pytest.raises(FormatError, match="layer 1: 2 slots, but layer 0 has 3"):
        read_map(tmp_path / "s.json", num_ranks=1)
    (tmp_path / "t.yaml").write_text("num_slots: 3\ninitial_global_assignments:\n  0: [0, 1, 2]\n  1: [0, 1]\n")
    with pytest.raises(FormatError, match="layer 1: 2 slots, but num_slots is 3"):
        read_map(tmp_path / "t.yaml", num_ranks=1)
    (tmp_path / "l.json").write_text(json.dumps({"logical_count": [[1, 2], [3]]}))
    with pytest.raises(FormatError, match="not a rectangular array"):
        read_load(tmp_path / "l.json")


def test_expert_id_out_of_range(tmp_path):
    path = _ascend(tmp_path, [[[0, 1], [2, 3]], [[0, 9], [2, 3]]])
    with pytest.raises(FormatError, match=r"layer 1, device 0, slot 1: expert id 9 is out of range \[0, 4\)"):
        read_map(path)
    np.save(tmp_path / "m.npy", np.array([[0, 1, -1, 2]]))
    with pytest.raises(FormatError, match=r"layer 0, device 1, slot 0: expert id -1 is out of range \[0, 3\)"):
        read_map(tmp_path / "m.npy", num_ranks=2, num_experts=3)


def test_expert_without_replica(tmp_path):
    path = _ascend(tmp_path, [[[0, 1], [2, 3]]])
    with pytest.raises(FormatError, match="layer 0: expert 4 has no replica"):
        read_map(path, num_experts=5)
    np.save(tmp_path / "m.npy", np.array([[0, 1, 2, 3], [0, 1, 2, 2]]))
    with pytest.raises(FormatError, match="layer 1: expert 3 has no replica"):
        read_map(tmp_path / "m.npy", num_ranks=2)


def test_duplicate_on_one_device_is_an_error_for_ascend_only(tmp_path, caplog):
    path = _ascend(tmp_path, [[[0, 0, 1], [2, 3, 1]]])
    with pytest.raises(FormatError, match="layer 0, device 0: expert 0 is placed more than once on the same device"):
        read_map(path)
    (tmp_path / "s.json").write_text(json.dumps({"physical_to_logical_map": [[0, 0, 1, 2, 3, 1]]}))
    with caplog.at_level(logging.WARNING, logger="eplb.formats"):
        placement = read_map(tmp_path / "s.json", num_ranks=2)
    assert placement.num_experts == 4
    assert "device 0: expert 0 is placed more than once" in caplog.text
    problems, warnings = map_problems(tmp_path / "s.json", num_ranks=2)
    assert problems == [] and len(warnings) == 1


def test_device_count_disagrees_with_ranks(tmp_path):
    path = _ascend(tmp_path, [[[0, 1], [2, 3]]])
    with pytest.raises(FormatError, match="the file has 2 devices \\(ranks\\) but --ranks says 4"):
        read_map(path, num_ranks=4)
    layers = {"moe_layer_count": 1, "layer_list": [{"device_count": 3, "device_list": [
        {"device_id": 0, "device_expert": [0, 1]}, {"device_id": 1, "device_expert": [2, 3]}]}]}
    (tmp_path / "c.json").write_text(json.dumps(layers))
    with pytest.raises(FormatError, match="layer 0: device_count is 3 but device_list has 2 devices"):
        read_map(tmp_path / "c.json")


def test_slot_count_disagrees_with_ranks_or_experts(tmp_path):
    np.save(tmp_path / "m.npy", np.array([[0, 1, 2, 3, 0, 1]]))
    with pytest.raises(FormatError, match="6 slots per layer cannot be split evenly over 4 ranks"):
        read_map(tmp_path / "m.npy", num_ranks=4)
    with pytest.raises(FormatError, match="8 experts do not fit in 6 slots per layer"):
        read_map(tmp_path / "m.npy", num_ranks=2, num_experts=8)


def test_ranks_required_when_the_file_does_not_say(tmp_path):
    np.save(tmp_path / "m.npy", np.array([[0, 1, 2, 3]]))
    with pytest.raises(FormatError, match="pass --ranks"):
        read_map(tmp_path / "m.npy")


@pytest.mark.parametrize("bad,message", [(-3, "negative load -3"), (float("nan"), "holds nan")])
def test_negative_or_nan_loads(tmp_path, bad, message):
    load = np.ones((2, 3, 4))
    load[1, 2, 3] = bad
    np.savez(tmp_path / "l.npz", counts=load)
    with pytest.raises(LoadError, match=message):
        read_load(tmp_path / "l.npz")
    (tmp_path / "l.json").write_text(json.dumps({"logical_count": load.tolist()}))
    with pytest.raises(LoadError, match=r"l.json.*index \(1, 2, 3\)"):
        read_load(tmp_path / "l.json")


def test_map_problems_lists_every_problem(tmp_path):
    path = _ascend(tmp_path, [[[0, 1], [2, 3]], [[0, 9], [2, 3]], [[0, 1], [2]], [[0, 0], [2, 3]]],
                   moe_layer_count=5)
    problems, warnings = map_problems(path)
    text = "\n".join(problems)
    assert "moe_layer_count is 5 but layer_list has 4 layers" in text
    assert "layer 2, device 1: 1 experts" in text
    assert "layer 1, device 0, slot 1: expert id 9 is out of range" in text
    assert "layer 1: expert 1 has no replica" in text
    assert "layer 3, device 0: expert 0 is placed more than once" in text
    assert "layer 3: expert 1 has no replica" in text
    assert warnings == []


def test_pt_without_torch(tmp_path, monkeypatch):
    write_map(Placement.initial(4, Topology(2, 2)), tmp_path / "m.pt", "vllm")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(FormatError, match="m.pt: .pt files need torch"):
        read_map(tmp_path / "m.pt", num_ranks=2)
    with pytest.raises(FormatError, match="need torch"):
        write_map(Placement.initial(4, Topology(2, 2)), tmp_path / "n.pt", "sglang")
    assert not (tmp_path / "n.pt").exists()


def test_not_a_torch_file(tmp_path):
    (tmp_path / "m.pt").write_text("hello")
    with pytest.raises(FormatError, match="not a readable torch .pt file"):
        read_map(tmp_path / "m.pt", num_ranks=1)


def test_bad_arguments(tmp_path):
    placement = Placement.initial(4, Topology(2, 2))
    with pytest.raises(FormatError, match="unknown expert-map format 'npz'"):
        write_map(placement, tmp_path / "m.npz", "npz")
    with pytest.raises(FormatError, match="num_ranks must be a positive integer"):
        map_problems(tmp_path / "m.npy", num_ranks=0)
    with pytest.raises(FormatError, match="folder .* does not exist"):
        write_map(placement, tmp_path / "absent" / "m.json", "ascend")
    assert issubclass(FormatError, EplbError)
