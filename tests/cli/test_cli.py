import json

import numpy as np
import pytest

from eplb import Placement, Topology
from eplb.cli import main
from eplb.formats import read_load, read_map, write_load, write_map


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def small(tmp_path):
    """A 3-layer map (2 ranks x 3 slots, 5 experts) as vLLM .npy and a [4, 3, 5] load as .npz."""
    phy2log = np.array([[0, 1, 2, 3, 4, 0], [4, 3, 2, 1, 0, 4], [0, 2, 4, 1, 3, 2]])
    placement = Placement(phy2log, 5, Topology(2, 3))
    write_map(placement, tmp_path / "map.npy", "vllm")
    load = np.random.default_rng(0).integers(0, 100, size=(4, 3, 5))
    write_load(load, tmp_path / "load.npz")
    return placement, load


def test_help_reads_like_the_field(capsys):
    for command in ("validate", "eval", "convert"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
    assert "--ranks" in capsys.readouterr().out


def test_validate_ok_prints_one_line(tmp_path, capsys, small):
    code, out, _ = run(capsys, "validate", tmp_path / "map.npy", "--ranks", 2)
    assert code == 0
    assert out.strip().splitlines() == [f"OK {tmp_path / 'map.npy'}: 3 layers, 5 experts, 2 ranks x 3 slots = 6 "
                                        "slots; replicas per expert 1-2"]


def test_validate_lists_every_problem(tmp_path, capsys):
    doc = {"moe_layer_count": 2, "layer_list": [
        {"layer_id": 0, "device_count": 2, "device_list": [{"device_id": 0, "device_expert": [0, 7]},
                                                           {"device_id": 1, "device_expert": [2, 2]}]},
        {"layer_id": 1, "device_count": 2, "device_list": [{"device_id": 0, "device_expert": [0, 1]},
                                                           {"device_id": 1, "device_expert": [2, 3]}]}]}
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    code, out, _ = run(capsys, "validate", tmp_path / "bad.json", "--experts", 4)
    assert code == 1
    assert "4 problem(s)" in out
    for line in ("layer 0, device 0, slot 1: expert id 7 is out of range [0, 4)", "layer 0: expert 1 has no replica",
                 "layer 0: expert 3 has no replica", "layer 0, device 1: expert 2 is placed more than once"):
        assert line in out


def test_validate_a_load(tmp_path, capsys, small):
    code, out, _ = run(capsys, "validate", tmp_path / "load.npz")
    assert code == 0 and "expert load, 4 steps x 3 layers x 5 experts" in out


def test_eval_json_per_step(tmp_path, capsys, small):
    placement, load = small
    code, out, _ = run(capsys, "eval", tmp_path / "map.npy", tmp_path / "load.npz", "--ranks", 2, "--json")
    assert code == 0
    result = json.loads(out)
    share = np.zeros((3, 5, 2))
    for layer in range(3):
        for slot, expert in enumerate(placement.phy2log[layer]):
            share[layer, expert, slot // 3] += 1 / placement.replica_count[layer, expert]
    ranks = np.einsum("tle,lew->tlw", load, share)
    par, tokens = ranks.max(-1) / ranks.mean(-1), ranks.sum(-1)
    assert result["par_mean"] == pytest.approx((par * tokens).sum() / tokens.sum())
    assert result["par_max"] == pytest.approx(par.max())
    assert result["balancedness"] == pytest.approx(ranks.mean(-1).sum() / ranks.max(-1).sum())
    np.testing.assert_allclose(result["par_per_layer"], (par * tokens).sum(0) / tokens.sum(0), rtol=1e-5)
    assert result["num_steps"] == 4


def test_eval_table_worst_first_and_plot(tmp_path, capsys, small):
    code, out, _ = run(capsys, "eval", tmp_path / "map.npy", tmp_path / "load.npz", "--ranks", 2, "--top", 0,
                       "--plot", tmp_path / "heat.png")
    assert code == 0
    assert (tmp_path / "heat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pars = [float(line.split("│")[2]) for line in out.splitlines() if line.count("│") == 5]
    assert len(pars) == 3 and pars == sorted(pars, reverse=True)
    assert "balancedness" in out


def test_eval_dsv3_vllm_default_at_ep32(tmp_path, capsys, data_dir):
    """The issue's check: vLLM's default placement of DeepSeek-V3 at EP32 scores mean PAR 2.0-3.1 on the real loads."""
    placement = Placement.initial(256, Topology(32, 9, 4, 8), num_layers=58, layout="vllm")
    write_map(placement, tmp_path / "vllm_default.json", "ascend")
    code, out, _ = run(capsys, "eval", tmp_path / "vllm_default.json", data_dir / "sglang_dsv3_ep_statistics.npz",
                       "--json")
    assert code == 0
    result = json.loads(out)
    assert 2.0 <= result["par_mean"] <= 3.1
    assert result["num_steps"] == 12 and len(result["par_per_layer"]) == 58


def test_eval_example(capsys):
    code, out, _ = run(capsys, "eval", "--example", "--json")
    assert code == 0
    result = json.loads(out)
    assert (result["num_ranks"], result["slots_per_rank"], result["num_layers"]) == (32, 9, 58)
    assert result["par_mean"] > 1.2


def test_eval_shape_mismatch(tmp_path, capsys, small):
    write_load(np.ones((4, 3, 6)), tmp_path / "wide.npz")
    code, _, err = run(capsys, "eval", tmp_path / "map.npy", tmp_path / "wide.npz", "--ranks", 2)
    assert code == 1 and "wide.npz has 6 experts per layer" in err and "map.npy has 5" in err
    write_load(np.ones((2, 5)), tmp_path / "short.npz")
    code, _, err = run(capsys, "eval", tmp_path / "map.npy", tmp_path / "short.npz", "--ranks", 2)
    assert code == 1 and "short.npz has 2 layers" in err and "map.npy has 3" in err


def test_eval_needs_inputs(capsys):
    code, _, err = run(capsys, "eval")
    assert code == 1 and "needs MAP and LOAD" in err


def test_convert_map_through_every_format(tmp_path, capsys, small):
    placement, _ = small
    chain = [("map.npy", "a.json", "ascend"), ("a.json", "t.yaml", "trtllm"), ("t.yaml", "s.pt", "sglang"),
             ("s.pt", "s.json", "sglang"), ("s.json", "v.pt", "vllm")]
    for source, target, fmt in chain:
        code, out, err = run(capsys, "convert", tmp_path / source, tmp_path / target, "--to", fmt, "--ranks", 2)
        assert code == 0, err
        assert out.startswith(f"wrote {tmp_path / target} ({fmt})")
    assert read_map(tmp_path / "v.pt", num_ranks=2) == placement


def test_convert_load(tmp_path, capsys, small):
    _, load = small
    code, _, err = run(capsys, "convert", tmp_path / "load.npz", tmp_path / "stats", "--to", "trtllm")
    assert code == 0, err
    np.testing.assert_array_equal(read_load(tmp_path / "stats"), load)


def test_convert_refuses_kind_change(tmp_path, capsys, small):
    code, _, err = run(capsys, "convert", tmp_path / "map.npy", tmp_path / "m.npz", "--to", "npz", "--ranks", 2)
    assert code == 1 and "holds an expert map" in err
    assert not (tmp_path / "m.npz").exists()


def test_convert_bad_map_writes_nothing(tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.array([[0, 1, 1, 1]]))
    code, _, err = run(capsys, "convert", tmp_path / "bad.npy", tmp_path / "out.json", "--to", "ascend", "--ranks",
                       2, "--experts", 3)
    assert code == 1 and "layer 0: expert 2 has no replica" in err
    assert not (tmp_path / "out.json").exists()
