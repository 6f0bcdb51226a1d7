"""Malformed input, every command and the library: one clear message naming the flag or file, the value and what was
expected; a non-zero exit; no traceback; nothing written. Plus a fuzz test of the map and load readers."""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
from eplb import Placement, Topology
from eplb.cli import main
from eplb.errors import EplbError
from eplb.formats import map_problems, read_load, read_map, write_load, write_map

PHY2LOG = np.array([[0, 1, 2, 3, 4, 0], [4, 3, 2, 1, 0, 4], [0, 2, 4, 1, 3, 2]])  # 3 layers, 2 ranks x 3 slots


def _ascend(rows_per_device: list[list[list[int]]]) -> dict:
    return {"moe_layer_count": len(rows_per_device), "layer_list": [
        {"layer_id": l, "device_count": len(devices),
         "device_list": [{"device_id": d, "device_expert": row} for d, row in enumerate(devices)]}
        for l, devices in enumerate(rows_per_device)]}


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    """A folder of good and bad input files, shared by the cases (none of them changes it)."""
    root = tmp_path_factory.mktemp("inputs")
    write_map(Placement(PHY2LOG, 5, Topology(2, 3)), root / "map.npy", "vllm")
    write_map(Placement(PHY2LOG, 5, Topology(2, 3)), root / "map.json", "ascend")
    write_map(Placement.initial(num_experts=8, topology=Topology(2, 4), num_layers=3), root / "big.json", "ascend")
    np.save(root / "dup.npy", np.array([[0, 0, 1, 2, 3, 4]] * 3))
    write_load(np.random.default_rng(0).integers(0, 100, (4, 3, 5)), root / "load.npz")
    write_load(np.random.default_rng(0).integers(0, 100, (4, 2, 5)), root / "load2layers.npz")
    write_load(np.random.default_rng(0).integers(0, 100, (4, 3, 6)), root / "load6.npz")
    np.savez(root / "nan.npz", counts=np.array([[1.0, np.nan, 2, 3, 4]] * 3))
    np.savez(root / "negative.npz", counts=np.array([[1, -3, 2, 3, 4]] * 3))
    np.savez(root / "nocounts.npz", load=np.ones((3, 5)))
    np.savez(root / "noexperts.npz", counts=np.zeros((3, 0)))
    np.savez(root / "nosteps.npz", counts=np.zeros((0, 3, 5)))
    np.savez(root / "zero.npz", counts=np.zeros((3, 5)))
    np.save(root / "pickled.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(root / "one.npy", np.arange(288))
    (root / "empty.npz").write_bytes(b"")
    (root / "empty.json").write_text("")
    (root / "garbage.npz").write_bytes(b"hello world, not numpy")
    (root / "garbage.npy").write_bytes(b"hello world, not numpy")
    (root / "garbage.pt").write_bytes(b"hello world, not torch")
    (root / "latin1.json").write_bytes(b'{"physical_to_logical_map": "\xe9\xff"}')
    (root / "notjson.json").write_text('{"layer_list": [1, 2,,]}')
    (root / "other.json").write_text('{"hello": 1}')
    (root / "list.json").write_text("[1, 2, 3]")
    (root / "bad.yaml").write_text("num_slots: [1, 2\n  - x: :\n")
    (root / "noassign.yaml").write_text("num_slots: 6\n")
    (root / "x.txt").write_text("hello")
    (root / "uneq.json").write_text(json.dumps(_ascend([[[0, 1, 2], [3, 4]]])))
    (root / "badid.json").write_text(json.dumps(_ascend([[[0, 1, 9], [2, 3, 4]]])))
    (root / "ragged_load.json").write_text(json.dumps({"logical_count": [[1, 2, 3], [1, 2]]}))
    (root / "u16.json").write_bytes(json.dumps({"physical_to_logical_map": PHY2LOG.tolist()}).encode("utf-16"))
    (root / "folder").mkdir()
    (root / "folder.png").mkdir()
    return root


# (argv with {d} for the inputs folder and {o} for an empty output folder, words the message must hold)
CASES = [
    # plan
    ("plan {d}/load.npz --ranks 2 --slots-per-rank 3 -o /proc/x.npy", ["-o /proc/x.npy", "cannot write"]),
    ("plan {d}/load.npz --ranks 2 --slots-per-rank 3 -o {d}/folder", ["-o", "is a folder"]),
    ("plan {d}/load.npz --ranks 2 --slots-per-rank 3 -o {o}/x.txt", ["-o", ".txt", "pass --format"]),
    ("plan {d}/load.npz --ranks 2 --slots-per-rank 3 -o {o}/missing/x.npy", ["-o", "does not exist"]),
    ("plan {d}/load.npz --ranks 0 --slots-per-rank 3 -o {o}/x.npy", ["--ranks must be >= 1, got 0"]),
    ("plan {d}/load.npz --ranks 2 --slots-per-rank 0 -o {o}/x.npy", ["--slots-per-rank must be >= 1, got 0"]),
    ("plan {d}/load.npz --ranks 2 --slots-per-rank 2 -o {o}/x.npy", ["4 slots cannot hold the 5 experts"]),
    ("plan {d}/load.npz --ranks 2 --redundant 2 -o {o}/x.npy", ["--redundant 2", "do not split evenly", "--ranks 2"]),
    ("plan {d}/load.npz --ranks 2 --redundant -1 -o {o}/x.npy", ["--redundant must be >= 0, got -1"]),
    ("plan {d}/load.npz --ranks 2 --slots-per-rank 3 --nodes 3 -o {o}/x.npy", ["--nodes 3 does not divide --ranks 2"]),
    ("plan {d}/load.npz --ranks 2 --slots-per-rank 3 --nodes 0 -o {o}/x.npy", ["--nodes must be >= 1, got 0"]),
    ("plan {d}/load.npz --ranks 2 --slots-per-rank 3 --groups 2 -o {o}/x.npy", ["--groups 2", "5 experts"]),
    ("plan {d}/load.npz --ranks 100000 --slots-per-rank 100000 -o {o}/x.npy", ["GiB", "--ranks", "available"]),
    ("plan {d}/load.npz --ranks 2 --slots-per-rank 3 --current {d}/big.json -o {o}/x.npy",
     ["--current", "8 experts", "has 5"]),
    ("plan {d}/empty.npz --ranks 2 --slots-per-rank 3 -o {o}/x.npy", ["empty.npz", "empty"]),
    ("plan {d}/garbage.npz --ranks 2 --slots-per-rank 3 -o {o}/x.npy", ["garbage.npz", "not a .npz archive"]),
    ("plan {d}/nocounts.npz --ranks 2 --slots-per-rank 3 -o {o}/x.npy", ["missing key 'counts'", "found load"]),
    ("plan {d}/nothere.npz --ranks 2 --slots-per-rank 3 -o {o}/x.npy", ["nothere.npz", "no such file"]),
    ("plan {d}/load.npz --ranks 2 --slots-per-rank 3 --select 9 -o {o}/x.npy", ["--select 9 is out of range"]),
    ("plan {d}/load.npz --ranks 2 --slots-per-rank 3 --select x -o {o}/x.npy", ["--select", "index or 'sum'"]),
    ("plan {d}/load.npz --ranks 2 --slots-per-rank 3 --option bad -o {o}/x.npy", ["--option", "KEY=VALUE"]),
    ("plan {d}/load.npz --ranks 2 --slots-per-rank 3 --policy nope -o {o}/x.npy", ["unknown policy 'nope'"]),
    ("plan {d}/map.json --ranks 2 --slots-per-rank 3 -o {o}/x.npy", ["expert map, not an expert load"]),
    ("plan {d}/nan.npz --ranks 2 --slots-per-rank 3 -o {o}/x.npy", ["nan.npz", "finite"]),
    ("plan {d}/negative.npz --ranks 2 --slots-per-rank 3 -o {o}/x.npy", ["negative load -3", "layer 0, expert 1"]),
    ("plan {d}/ragged_load.json --ranks 2 --slots-per-rank 3 -o {o}/x.npy", ["logical_count", "rectangular"]),
    ("plan {d}/noexperts.npz --ranks 2 --slots-per-rank 3 -o {o}/x.npy", ["noexperts.npz", "empty", "[3, 0]"]),
    # eval
    ("eval {d}/map.npy {d}/load.npz --ranks 2 --plot /proc/x.png", ["--plot /proc/x.png", "cannot write"]),
    ("eval {d}/map.npy {d}/load.npz --ranks 2 --plot {o}/x.txt", ["--plot", "PNG", ".png"]),
    ("eval {d}/map.npy {d}/load.npz --ranks 2 --plot {d}/folder.png", ["--plot", "is a folder"]),
    ("eval {d}/uneq.json {d}/load.npz", ["device 1: 2 experts", "same number of slots"]),
    ("eval", ["needs MAP and LOAD"]),
    ("eval --example {d}/map.npy", ["--example takes no MAP"]),
    ("eval {d}/map.npy {d}/load.npz --ranks 2 --top -1", ["--top must be >= 0, got -1"]),
    ("eval {d}/map.npy {d}/load2layers.npz --ranks 2", ["2 layers", "has 3"]),
    ("eval {d}/map.npy {d}/load6.npz --ranks 2", ["6 experts per layer", "has 5"]),
    ("eval {d}/map.npy {d}/load.npz", ["pass --ranks"]),
    ("eval {d}/map.npy {d}/load.npz --ranks 0", ["--ranks must be >= 1, got 0"]),
    ("eval {d}/map.npy {d}/garbage.npz --ranks 2", ["garbage.npz", "not a .npz archive"]),
    ("eval {d}/map.npy {d}/nosteps.npz --ranks 2", ["nosteps.npz", "empty", "(steps, layers, experts)"]),
    # validate (exit 1: the problems are listed)
    ("validate {d}/uneq.json", ["INVALID", "device 1: 2 experts (slots)", "same number of slots"]),
    ("validate {d}/one.npy --ranks 2", ["phy2log must be [layers, slots], got shape (288,)"]),
    ("validate {d}/garbage.npy --ranks 2", ["garbage.npy", "not a .npy array"]),
    ("validate {d}/garbage.pt --ranks 2", ["garbage.pt", "not a readable torch .pt file"]),
    ("validate {d}/pickled.npy --ranks 2", ["pickled.npy", "Python objects"]),
    ("validate {d}/empty.json", ["empty.json", "empty"]),
    ("validate {d}/notjson.json", ["not valid JSON", "line 1, column"]),
    ("validate {d}/latin1.json", ["latin1.json", "not JSON text", "UTF-8"]),
    ("validate {d}/other.json", ["'hello'", "expected vllm-ascend"]),
    ("validate {d}/list.json", ["holds a list"]),
    ("validate {d}/bad.yaml", ["bad.yaml", "not valid YAML", "line"]),
    ("validate {d}/noassign.yaml", ["initial_global_assignments"]),
    ("validate {d}/nothere.json", ["nothere.json", "no such file"]),
    ("validate {d}/x.txt", ["cannot tell the format", "'.txt'"]),
    ("validate {d}/map.npy --experts 0", ["--experts must be >= 1, got 0"]),
    ("validate {d}/folder", ["folder", "not TensorRT-LLM statistics"]),
    ("validate {d}/badid.json --experts 5", ["expert id 9 is out of range [0, 5)"]),
    ("validate {d}/map.npy", ["pass --ranks"]),
    # convert
    ("convert {d}/map.npy /proc/x.json --ranks 2", ["OUT /proc/x.json", "cannot write"]),
    ("convert {d}/map.npy {d}/folder --to ascend --ranks 2", ["is a folder"]),
    ("convert {d}/map.npy {o}/x.npz --to npz --ranks 2", ["holds an expert map", "converts to"]),
    ("convert {d}/map.npy {o}/x.txt --ranks 2", ["OUT", "'.txt'", "pass --to"]),
    ("convert {d}/garbage.npy {o}/x.json --ranks 2", ["garbage.npy", "not a .npy array"]),
    ("convert {d}/dup.npy {o}/x.json --ranks 2", ["cannot hold an expert twice on one device"]),
    ("convert {d}/map.npy {o}/x.json --ranks 0", ["--ranks must be >= 1, got 0"]),
    # simulate (each refused before any run)
    ("simulate --no-files --slots-per-rank 0", ["--slots-per-rank must be >= 1, got 0"]),
    ("simulate --no-files --overlap 2", ["--overlap must be within [0, 1], got 2"]),
    ("simulate --no-files --policies ,", ["--policies", "names no policy"]),
    ("simulate --no-files --bandwidth 0", ["--bandwidth must be > 0"]),
    ("simulate --no-files --similarity 5", ["--similarity must be within [0, 1], got 5"]),
    ("simulate --no-files --ranks 0", ["--ranks must be >= 1, got 0"]),
    ("simulate --no-files --steps 0", ["--steps must be >= 1, got 0"]),
    ("simulate --no-files --steps 10000000", ["10,000,000 steps", "GiB", "--steps"]),
    ("simulate --out {d}/load.npz", ["--out", "is a file"]),
    ("simulate --out /proc/report", ["--out /proc/report", "cannot write"]),
    ("simulate --no-files --save-trace /proc/t.npz", ["--save-trace /proc/t.npz", "cannot write"]),
    ("simulate --no-files --trace {d}/empty.npz", ["empty.npz", "empty"]),
    ("simulate --no-files --trace {d}/garbage.npz", ["not a .npz archive"]),
    ("simulate --no-files --jobs 0", ["--jobs must be >= 1, got 0"]),
    ("simulate --no-files --nodes 3", ["--nodes 3 does not divide --ranks 32"]),
    ("simulate --no-files --policies defualt", ["did you mean 'default'"]),
    ("simulate --no-files --gb-per-step 0", ["--gb-per-step must be > 0"]),
    ("simulate --no-files --gb-per-step 0.01", ["--gb-per-step 0.01 is smaller than one expert"]),
    ("simulate --no-files --min-gain -1", ["--min-gain must be >= 0"]),
    ("simulate --no-files --trace builtin:nope", ["unknown built-in trace"]),
    ("simulate --no-files --fail-rank 99@10", ["--fail-rank", "rank 99", "32 ranks"]),
    ("simulate --no-files --fail-rank 3", ["--fail-rank", "RANK@STEP"]),
    ("simulate --no-files --trace {d}/zero.npz", ["zero.npz", "layer 0 has no load"]),
    ("simulate --no-files --steps 50", ["50 steps", "--window 100", "warm-up"]),
    ("simulate --no-files --trace {d}/load.npz --ranks 2 --slots-per-rank 3", ["4 steps", "warm-up", "--window"]),
]


@pytest.mark.parametrize("argv, words", CASES, ids=[c[0].split(" --")[0][:40] + f"-{i}" for i, c in enumerate(CASES)])
def test_command_refuses_with_one_clear_message(argv, words, d, tmp_path, capsys):
    args = [a.format(d=d, o=tmp_path) for a in argv.split()]
    code = main(args)
    out = capsys.readouterr()
    text = (out.err + out.out).replace("\n", " ")
    assert code == 1, text
    assert "Traceback" not in text and "internal error" not in text
    for word in words:
        assert word in text, (word, text)
    assert not list(tmp_path.iterdir()), "nothing is written for a refused command"


def test_inputs_are_unchanged(d):
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    for argv, _ in CASES[:30]:
        main([a.format(d=d, o=d / "folder") for a in argv.split()])
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == before


def test_utf16_json_reads(d):
    """JSON saved as UTF-16 (Windows editors) is JSON: read, not refused."""
    assert np.array_equal(read_map(d / "u16.json", num_ranks=2).phy2log, PHY2LOG)


@pytest.mark.parametrize("call, words", [
    (lambda d: read_map(d / "uneq.json"), "same number of slots"),
    (lambda d: read_load(d / "empty.npz"), "empty"),
    (lambda d: read_load(d / "garbage.npz"), "not a .npz archive"),
    (lambda d: read_map(d / "pickled.npy", num_ranks=2), "Python objects"),
    (lambda d: read_map(d / "map.npy", num_ranks=0), "num_ranks must be a positive integer"),
    (lambda d: write_map(read_map(d / "map.json"), d / "folder", "ascend"), "is a folder"),
    (lambda d: write_map(read_map(d / "map.json"), d / "m.json", "nope"), "unknown expert-map format 'nope'"),
    (lambda d: write_load(np.ones(3), d / "l.npz"), "must be [layers, experts]"),
    (lambda d: eplb.get_policy("nope"), "unknown policy 'nope'"),
    (lambda d: Topology(0, 1), "num_ranks must be >= 1"),
    (lambda d: Topology(4, 2, num_nodes=3), "not divisible by num_nodes=3"),
    (lambda d: eplb.formats.detect_format(d / "nothere.json"), "no such file"),
])
def test_library_raises_eplb_errors(call, words, d):
    with pytest.raises(EplbError) as error:
        call(d)
    assert words in str(error.value)


@pytest.mark.parametrize("config, words", [({"bogus": 1}, "unknown EPLB config key 'bogus'"),
                                           ({"window_steps": 0}, "window_steps must be an integer >= 1")])
def test_config_errors_name_the_key(config, words):
    from eplb.runtime import EplbConfig

    with pytest.raises(EplbError, match=words):
        EplbConfig.from_dict(config)


def test_help_shows_each_default_once(capsys):
    for command in ("simulate", "plan", "eval", "validate", "convert"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and "(default: False)" not in text, command
        assert not re.search(r"\(default[^)]*\) \(default", text), command


@pytest.mark.parametrize("argv, words", [
    (["plan", "{d}/empty.npz", "--ranks", "2", "--slots-per-rank", "3", "-o", "/proc/x.npy"], "cannot write"),
    (["validate", "{d}/uneq.json"], "same number of slots"),
    (["simulate", "--no-files", "--overlap", "2"], "--overlap"),
])
def test_real_process_exits_non_zero_without_traceback(argv, words, d):
    result = subprocess.run([sys.executable, "-m", "eplb.cli", *[a.format(d=d) for a in argv]],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(eplb.__file__).parents[1])})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and words in result.stderr + result.stdout


# -- fuzz: the readers never fail with anything but an EplbError -------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
                    max_leaves=30)
MAP_KEYS = st.sampled_from(["physical_to_logical_map", "logical_count", "layer_list", "moe_layer_count",
                            "device_list", "device_expert", "device_id", "other"])
MAP_LIKE = st.recursive(st.integers(-3, 9) | st.none() | st.text(max_size=2),
                        lambda inner: st.lists(inner, max_size=6) | st.dictionaries(MAP_KEYS, inner, max_size=4),
                        max_leaves=40)


def _read_everything(path: Path):
    """Every reader on ``path``: each must return or raise an EplbError."""
    for call in (lambda: read_map(path), lambda: read_map(path, num_ranks=2), lambda: map_problems(path, num_ranks=2),
                 lambda: read_load(path)):
        try:
            call()
        except EplbError:
            pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(JSON, MAP_LIKE, st.dictionaries(MAP_KEYS, MAP_LIKE, max_size=3)),
       suffix=st.sampled_from([".json", ".yaml"]))
def test_fuzz_structured_files(data, suffix):
    import yaml

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"f{suffix}"
        try:
            text = json.dumps(data) if suffix == ".json" else yaml.safe_dump(data)
        except (ValueError, yaml.YAMLError):
            return
        path.write_text(text)
        _read_everything(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=st.sampled_from([b"", b"\x93NUMPY", b"PK\x03\x04", b"PK\x05\x06", b"{", b"\xff\xfe", b"\x80\x02"]),
       body=st.binary(max_size=300), suffix=st.sampled_from([".json", ".npy", ".npz", ".pt", ".yaml"]))
def test_fuzz_bytes(head, body, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"f{suffix}"
        path.write_bytes(head + body)
        _read_everything(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=4),
       dtype=st.sampled_from(["int64", "float64", "bool", "uint8", "complex64", "U3"]))
def test_fuzz_numpy_arrays(shape, dtype):
    with tempfile.TemporaryDirectory() as folder:
        array = np.zeros(shape, dtype=dtype)
        np.save(Path(folder) / "m.npy", array)
        np.savez(Path(folder) / "l.npz", counts=array)
        _read_everything(Path(folder) / "m.npy")
        _read_everything(Path(folder) / "l.npz")
