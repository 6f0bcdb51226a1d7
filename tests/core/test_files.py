"""Files are written the way Unix tools write them: umask for new files, the mode of a replaced file kept, symbolic
links written through, the rename atomic, and every file eplb writes readable back by eplb without extra flags."""

import os
import stat

import numpy as np
import pytest

from eplb import Placement, Topology
from eplb._files import atomic_path, check_writable
from eplb.cli import main
from eplb.errors import EplbError
from eplb.formats import read_load, read_map, write_load, write_map

PLACEMENT = Placement(np.array([[0, 1, 2, 3, 4, 0], [4, 3, 2, 1, 0, 4]]), 5, Topology(2, 3))


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set a umask for the test and restore the old one."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_file_follows_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    write_map(PLACEMENT, tmp_path / "m.json", "ascend")
    write_load(np.ones((2, 5)), tmp_path / "l.npz")
    assert mode(tmp_path / "m.json") == expected and mode(tmp_path / "l.npz") == expected


def test_replaced_file_keeps_its_mode(tmp_path, umask):
    target = tmp_path / "m.npy"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    umask(0o077)
    write_map(PLACEMENT, target, "vllm")
    assert mode(target) == 0o640
    assert read_map(target, num_ranks=2) == PLACEMENT


def test_symlink_is_written_through(tmp_path):
    real = tmp_path / "real" / "map.json"
    real.parent.mkdir()
    real.write_text("{}")
    link = tmp_path / "current.json"
    link.symlink_to(real)
    write_map(PLACEMENT, link, "ascend")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert read_map(real) == PLACEMENT


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "m.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["m.json"]


@pytest.mark.parametrize("where, words", [("folder", "is a folder"), ("missing/m.json", "does not exist"),
                                          ("/proc/m.json", "cannot write")])
def test_unwritable_places_are_one_error(tmp_path, where, words):
    (tmp_path / "folder").mkdir()
    path = tmp_path / where if not where.startswith("/") else where
    with pytest.raises(EplbError, match=words):
        check_writable(path, "-o")
    with pytest.raises(EplbError, match=words):
        write_map(PLACEMENT, path, "ascend")


def test_statistics_folder_follows_the_umask(tmp_path, umask):
    umask(0o022)
    write_load(np.ones((2, 3, 5), dtype=np.int64), tmp_path / "stats", "trtllm")
    assert mode(tmp_path / "stats") == 0o755 and mode(tmp_path / "stats" / "meta_info.json") == 0o644
    assert read_load(tmp_path / "stats").shape == (2, 3, 5)


def test_trtllm_yaml_reads_back_without_ranks(tmp_path):
    write_map(PLACEMENT, tmp_path / "m.yaml", "trtllm")
    assert read_map(tmp_path / "m.yaml") == PLACEMENT
    assert "# eplb: ep_size=2" in (tmp_path / "m.yaml").read_text()


def test_files_the_commands_write_are_readable_by_others_and_back(tmp_path, capsys, umask):
    umask(0o022)
    write_load(np.random.default_rng(0).integers(1, 50, (4, 2, 5)), tmp_path / "load.npz")
    for name in ("plan.json", "plan.yaml"):  # formats from the suffix, and both state their ranks
        assert main(["plan", str(tmp_path / "load.npz"), "--ranks", "2", "--slots-per-rank", "3", "--policy",
                     "default", "-o", str(tmp_path / name)]) == 0
        assert mode(tmp_path / name) == 0o644
        assert main(["validate", str(tmp_path / name)]) == 0
    assert main(["convert", str(tmp_path / "plan.yaml"), str(tmp_path / "again.json")]) == 0
    assert read_map(tmp_path / "again.json") == read_map(tmp_path / "plan.yaml")
    assert main(["eval", str(tmp_path / "plan.json"), str(tmp_path / "load.npz"), "--plot",
                 str(tmp_path / "h.png")]) == 0
    assert mode(tmp_path / "h.png") == 0o644
    capsys.readouterr()


def test_plan_json_without_output_prints_the_map_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    write_load(np.random.default_rng(0).integers(1, 50, (2, 5)), tmp_path / "load.npz")
    assert main(["plan", "load.npz", "--ranks", "2", "--slots-per-rank", "3", "--policy", "default", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["output"] is None and np.array(result["phy2log"]).shape == (2, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["load.npz"]


def test_replaced_file_keeps_its_owner(tmp_path):
    # only root may give a file to another user; anyone may give it to another of their own groups
    if os.geteuid() == 0:
        owner = (1234, 1234)
    else:
        others = [g for g in os.getgroups() if g != os.getegid()]
        owner = (os.geteuid(), others[0] if others else os.getegid())
    target = tmp_path / "m.json"
    target.write_text("{}")
    os.chown(target, *owner)
    write_map(PLACEMENT, target, "ascend")
    assert (os.stat(target).st_uid, os.stat(target).st_gid) == owner
