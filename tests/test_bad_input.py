"""Every bad input in one place: malformed files, flags and settings given to every command, and bad arguments to the
library's public functions.

Commands: one clear message naming the flag or file, the value and what was expected; a non-zero exit; no traceback;
nothing written. Plus a fuzz test of the map and load readers. Library: each bad argument raises one ``EplbError``
subclass whose message names the argument, the value and what was expected; never an AttributeError, TypeError or
numpy's own error (one case per line: the call, the error class, and the words the message must hold).
"""

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
import eplb.policies
from eplb import LoadError, Placement, PlacementError, PolicyError, Topology, TopologyError, get_policy
from eplb import metrics
from eplb.cli import main
from eplb.errors import EplbError
from eplb.formats import map_problems, read_load, read_map, write_load, write_map
from eplb.policies.shared.resilience import Resilience

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


# -- the library's public functions ------------------------------------------------------------------------------------
T = Topology(4, 5)
CURRENT = Placement.initial(16, T, 2)
LOAD = np.arange(32, dtype=np.int64).reshape(2, 16) * 10


def _rebalance(*args, **kwargs):
    return lambda name: get_policy(name).rebalance(*args, **kwargs)


# (id, call, error, words in the message)
LIBRARY_CASES = [
    # Topology
    ("topology-ranks-none", lambda: Topology(None, 5), TopologyError, ["num_ranks", "None", "integer"]),
    ("topology-ranks-str", lambda: Topology("4", 5), TopologyError, ["num_ranks", "'4'", "integer"]),
    ("topology-ranks-float", lambda: Topology(4.0, 5), TopologyError, ["num_ranks", "4.0", "integer"]),
    ("topology-ranks-bool", lambda: Topology(True, 5), TopologyError, ["num_ranks", "True", "integer"]),
    ("topology-ranks-negative", lambda: Topology(-1, 5), TopologyError, ["num_ranks", ">= 1", "-1"]),
    ("topology-slots-zero", lambda: Topology(4, 0), TopologyError, ["slots_per_rank", ">= 1", "0"]),
    ("topology-nodes-not-dividing", lambda: Topology(4, 5, 3), TopologyError, ["num_ranks=4", "num_nodes=3"]),
    ("topology-groups-none", lambda: Topology(4, 5, 1, None), TopologyError, ["num_groups", "None"]),
    ("from-redundant-negative", lambda: Topology.from_redundant(4, 16, -1), TopologyError,
     ["num_redundant", ">= 0", "-1"]),
    ("from-redundant-none", lambda: Topology.from_redundant(4, 16, None), TopologyError, ["num_redundant", "None"]),
    ("from-redundant-indivisible", lambda: Topology.from_redundant(4, 16, 1), TopologyError,
     ["(16 + 1) % 4", "= 1"]),
    ("check-experts-none", lambda: T.check_experts(None), TopologyError, ["num_experts", "None"]),
    ("check-experts-too-many", lambda: T.check_experts(21), TopologyError, ["21 logical experts", "20 physical"]),
    # Placement
    ("placement-topology-none", lambda: Placement(CURRENT.phy2log, 16, None), TopologyError,
     ["topology", "eplb.Topology", "None"]),
    ("placement-topology-str", lambda: Placement(CURRENT.phy2log, 16, "4x5"), TopologyError,
     ["topology", "eplb.Topology", "'4x5'"]),
    ("placement-experts-none", lambda: Placement(CURRENT.phy2log, None, T), TopologyError, ["num_experts", "None"]),
    ("placement-experts-negative", lambda: Placement(CURRENT.phy2log, -3, T), TopologyError,
     ["num_experts", ">= 1", "-3"]),
    ("placement-experts-float", lambda: Placement(CURRENT.phy2log, 16.5, T), TopologyError,
     ["num_experts", "16.5"]),
    ("placement-phy2log-none", lambda: Placement(None, 16, T), PlacementError, ["phy2log", "array"]),
    ("placement-phy2log-text", lambda: Placement("abc", 16, T), PlacementError, ["phy2log", "integers"]),
    ("placement-phy2log-nan", lambda: Placement(np.full((1, 20), np.nan), 16, T), PlacementError,
     ["phy2log", "integers", "nan"]),
    ("placement-phy2log-3d", lambda: Placement(np.zeros((2, 2, 20), int), 16, T), PlacementError,
     ["phy2log", "2-D", "(2, 2, 20)"]),
    ("placement-phy2log-wrong-slots", lambda: Placement(np.arange(288) % 16, 16, T), PlacementError,
     ["288 slots", "expected 20"]),
    ("placement-phy2log-out-of-range", lambda: Placement(np.arange(20) % 17, 16, T), PlacementError,
     ["expert id 16", "[0, 16)"]),
    ("placement-missing-expert", lambda: Placement(np.zeros(20, int), 16, T), PlacementError,
     ["expert 1 has no replica"]),
    ("initial-topology-none", lambda: Placement.initial(16, None), TopologyError, ["topology", "None"]),
    ("initial-layers-zero", lambda: Placement.initial(16, T, 0), PlacementError, ["num_layers", ">= 1", "0"]),
    ("initial-layers-text", lambda: Placement.initial(16, T, "a"), PlacementError, ["num_layers", "'a'"]),
    ("initial-layout", lambda: Placement.initial(16, T, 1, layout="round"), PlacementError,
     ["layout", "vllm, ascend, spread", "'round'"]),
    ("rank-table-negative", lambda: Placement.from_rank_table([[-1, 0]]), PlacementError, ["expert id -1"]),
    ("expert-map-rank-text", lambda: CURRENT.expert_map("a"), PlacementError, ["rank", "integer", "'a'"]),
    ("expert-map-rank-out-of-range", lambda: CURRENT.expert_map(9), PlacementError, ["rank", "[0, 4)", "9"]),
    ("log2phy-tp-zero", lambda: CURRENT.log2phy_for_rank(0, 0), PlacementError, ["tp_size", ">= 1", "0"]),
    ("log2phy-tp-text", lambda: CURRENT.log2phy_for_rank(0, "2"), PlacementError, ["tp_size", "'2'"]),
    ("without-ranks-none", lambda: CURRENT.without_ranks(None), PlacementError, ["failed ranks", "None"]),
    ("without-ranks-out-of-range", lambda: CURRENT.without_ranks([9]), PlacementError,
     ["failed ranks", "rank 9", "[0, 4)"]),
    ("without-ranks-mask-length", lambda: CURRENT.without_ranks(np.ones(3, bool)), PlacementError,
     ["one entry per rank (4)", "(3,)"]),
    ("moves-to-none", lambda: CURRENT.moves_to(None), PlacementError, ["placement", "NoneType"]),
    ("replace-layers-out-of-range", lambda: CURRENT.replace_layers([5], CURRENT), PlacementError,
     ["layers", "[0, 2)", "[5]"]),
    # get_policy and policy options
    ("policy-unknown", lambda: get_policy("balanced"), PolicyError, ["unknown policy 'balanced'", "auto"]),
    ("policy-none", lambda: get_policy(None), PolicyError, ["unknown policy 'None'"]),
    ("policy-id", lambda: get_policy(99), PolicyError, ["policy id", "99", "[0, 1, 2, 3]"]),
    ("policy-option-typo", lambda: get_policy("swift", treshold=1.1), PolicyError,
     ["no option 'treshold'", "did you mean 'threshold'"]),
    ("policy-option-bool-text", lambda: get_policy("default", allow_shared_rank="false"), PolicyError,
     ["allow_shared_rank", "true or false", "'false'"]),
    ("policy-option-swift-flag", lambda: get_policy("swift", intra_node=1), PolicyError,
     ["intra_node", "true or false", "1"]),
    ("policy-option-number-text", lambda: get_policy("swift", threshold="x"), PolicyError, ["threshold", "'x'"]),
    ("policy-options-unknown", lambda: eplb.policies.policy_options("swfit"), PolicyError,
     ["unknown policy 'swfit'", "did you mean 'swift'"]),
    ("policy-option-random-seed", lambda: get_policy("random", seed="x"), PolicyError, ["seed", "integer", "'x'"]),
    ("policy-option-random-moves", lambda: get_policy("random", num_moves=-1), PolicyError,
     ["num_moves", ">= 0", "-1"]),
    ("policy-option-flashlb-balance", lambda: get_policy("flashlb", last_balance="x"), PolicyError,
     ["last_balance", "numbers"]),
    ("policy-option-auto-dispatch", lambda: get_policy("auto", dispatch=["even"]), PolicyError,
     ["dispatch", "even", "['even']"]),
    ("resilience-min-replicas", lambda: Resilience(min_replicas=0), PolicyError, ["min_replicas", ">= 1", "0"]),
    # eplb.rebalance_experts (DeepSeek's drop-in)
    ("rebalance-experts-weight-none", lambda: eplb.rebalance_experts(None, 20, 1, 1, 4), LoadError,
     ["weight", "array"]),
    ("rebalance-experts-weight-nan", lambda: eplb.rebalance_experts(np.full((2, 16), np.nan), 20, 1, 1, 4),
     LoadError, ["weight", "nan", "finite"]),
    ("rebalance-experts-weight-negative", lambda: eplb.rebalance_experts(-np.ones((2, 16)), 20, 1, 1, 4),
     LoadError, ["weight", "negative", ">= 0"]),
    ("rebalance-experts-weight-1d", lambda: eplb.rebalance_experts(np.ones(16), 20, 1, 1, 4), LoadError,
     ["weight", "(16,)"]),
    ("rebalance-experts-replicas-none", lambda: eplb.rebalance_experts(LOAD, None, 1, 1, 4), PolicyError,
     ["num_replicas", "None", "integer"]),
    ("rebalance-experts-replicas-text", lambda: eplb.rebalance_experts(LOAD, "20", 1, 1, 4), PolicyError,
     ["num_replicas", "'20'"]),
    ("rebalance-experts-replicas-indivisible", lambda: eplb.rebalance_experts(LOAD, 21, 1, 1, 4), PolicyError,
     ["num_replicas=21", "num_gpus=4"]),
    ("rebalance-experts-gpus-zero", lambda: eplb.rebalance_experts(LOAD, 20, 1, 1, 0), PolicyError,
     ["num_gpus", ">= 1", "0"]),
    ("rebalance-experts-groups-negative", lambda: eplb.rebalance_experts(LOAD, 20, -2, 1, 4), PolicyError,
     ["num_groups", ">= 1", "-2"]),
    # metrics
    ("rank-loads-placement-none", lambda: metrics.rank_loads(None, LOAD), PlacementError,
     ["placement", "eplb.Placement", "None"]),
    ("rank-loads-wrong-experts", lambda: metrics.rank_loads(CURRENT, np.ones((2, 8))), LoadError,
     ["8 experts", "expected 16"]),
    ("rank-loads-wrong-layers", lambda: metrics.rank_loads(CURRENT, np.ones((3, 16))), LoadError,
     ["3 layers", "expected 2"]),
    ("rank-loads-nan", lambda: metrics.rank_loads(CURRENT, np.full((2, 16), np.nan)), LoadError, ["nan", "finite"]),
    ("rank-share-placement-array", lambda: metrics.rank_share(CURRENT.phy2log), PlacementError,
     ["placement", "eplb.Placement", "ndarray"]),
    ("step-par-placement-none", lambda: metrics.step_par(None, LOAD), PlacementError, ["placement", "None"]),
    ("par-none", lambda: metrics.par(None), LoadError, ["loads", "array"]),
    ("par-empty", lambda: metrics.par([]), LoadError, ["loads", "at least one rank", "(0,)"]),
    ("par-scalar", lambda: metrics.par(3.0), LoadError, ["loads", "[..., ranks]", "()"]),
    ("par-nan", lambda: metrics.par([np.nan, 1.0]), LoadError, ["loads", "nan", "finite and >= 0"]),
    ("par-negative", lambda: metrics.par([[1.0, -2.0]]), LoadError, ["loads", "-2.0", "(0, 1)"]),
    ("par-text", lambda: metrics.par(["a", "b"]), LoadError, ["loads", "numbers"]),
    ("balancedness-empty", lambda: metrics.balancedness([]), LoadError, ["loads", "at least one rank"]),
    ("balancedness-inf", lambda: metrics.balancedness([[np.inf, 1.0]]), LoadError, ["loads", "inf"]),
    ("quantile-q", lambda: metrics.weighted_quantile([1, 2], [1, 1], 2), LoadError, ["q", "[0, 1]", "2"]),
    ("quantile-shapes", lambda: metrics.weighted_quantile([1, 2], [1, 1, 1], 0.5), LoadError,
     ["values and weights", "(2,)", "(3,)"]),
    ("quantile-negative-weight", lambda: metrics.weighted_quantile([1, 2], [-1, 1], 0.5), LoadError,
     ["weights", ">= 0", "-1"]),
    ("summarize-shapes", lambda: metrics.summarize_par([1.0, 2.0], [1.0]), LoadError,
     ["par_values and tokens", "(2,)", "(1,)"]),
    ("moved-slots-none", lambda: metrics.moved_slots(None, CURRENT), PlacementError, ["old", "eplb.Placement"]),
]

# Policy.rebalance, checked for every registered policy
REBALANCE_CASES = [
    ("topology-none", _rebalance(LOAD, None), TopologyError, ["topology", "eplb.Topology", "None"]),
    ("topology-tuple", _rebalance(LOAD, (4, 5)), TopologyError, ["topology", "eplb.Topology", "(4, 5)"]),
    ("load-none", _rebalance(None, T), LoadError, ["load", "array"]),
    ("load-text", _rebalance("load", T), LoadError, ["load", "numbers"]),
    ("load-nan", _rebalance(np.full((2, 16), np.nan), T), LoadError, ["load", "nan", "finite"]),
    ("load-negative", _rebalance(-LOAD, T), LoadError, ["load", "negative", "layer 0, expert 1", ">= 0"]),
    ("load-1d", _rebalance(np.ones(16), T), LoadError, ["load", "[layers, experts]", "(16,)"]),
    ("load-4d", _rebalance(np.ones((1, 1, 2, 16)), T), LoadError, ["load", "(1, 1, 2, 16)"]),
    ("load-no-layers", _rebalance(np.ones((0, 16)), T), LoadError, ["load is empty", "[0, 16]", "at least one layer"]),
    ("load-no-experts", _rebalance(np.ones((2, 0)), T), LoadError, ["load is empty", "[2, 0] (layers, experts)", "one expert"]),
    ("load-bool", _rebalance(np.ones((2, 16), bool), T), LoadError, ["load", "numbers", "bool"]),
    ("load-ragged", _rebalance([[1, 2], [3]], T), LoadError, ["load", "rectangular"]),
    ("load-too-many-experts", _rebalance(np.ones((2, 32)), T), TopologyError, ["32 logical experts", "20 physical"]),
    ("current-text", _rebalance(LOAD, T, current="map.json"), PlacementError, ["phy2log", "integers"]),
    ("current-layers", _rebalance(LOAD, T, current=CURRENT.phy2log[0]), PolicyError,
     ["current placement has 1 layers", "2 layers"]),
    ("current-other-topology", _rebalance(LOAD, T, current=Placement.initial(16, Topology(5, 4), 2)), PolicyError,
     ["current placement is for 5 ranks", "4 ranks"]),
    ("live-ranks-int", _rebalance(LOAD, T, live_ranks=5), PlacementError, ["live ranks", "rank ids", "5"]),
    ("live-ranks-none-live", _rebalance(LOAD, T, live_ranks=[]), PlacementError, ["live ranks", "no rank of 4"]),
    ("live-ranks-out-of-range", _rebalance(LOAD, T, live_ranks=[0, 7]), PlacementError, ["rank 7", "[0, 4)"]),
    ("resilience-text", _rebalance(LOAD, T, resilience="spread"), PolicyError,
     ["resilience", "Resilience", "'spread'"]),
]


def _check(call, error, words):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize("call, error, words", [c[1:] for c in LIBRARY_CASES], ids=[c[0] for c in LIBRARY_CASES])
def test_library_bad_input(call, error, words):
    _check(call, error, words)


@pytest.mark.parametrize("name", eplb.available_policies())
@pytest.mark.parametrize("call, error, words", [c[1:] for c in REBALANCE_CASES], ids=[c[0] for c in REBALANCE_CASES])
def test_rebalance_bad_input(name, call, error, words):
    _check(lambda: call(name), error, words)


def test_every_error_is_an_eplb_error_and_a_value_error():
    for error in (LoadError, PlacementError, PolicyError, TopologyError):
        assert issubclass(error, eplb.EplbError) and issubclass(error, ValueError)


def test_a_torch_load_with_nan_is_a_load_error():
    torch = pytest.importorskip("torch")
    load = torch.ones(2, 16)
    load[1, 3] = float("nan")
    _check(lambda: get_policy("auto").rebalance(load, T), LoadError, ["load", "nan", "(1, 3)"])
    _check(lambda: eplb.rebalance_experts(load, 20, 1, 1, 4), LoadError, ["weight", "nan"])
