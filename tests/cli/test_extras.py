"""Optional parts fail politely: without torch, matplotlib or prometheus_client, one line names the extra to install
and the command exits 1 before doing any work. Each case runs in a fresh process that cannot import the package
(``sys.modules[name] = None`` is what Python's import system does for a missing module)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _run(code: str, missing: list[str], cwd) -> subprocess.CompletedProcess:
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in missing)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def _cli(argv: list[str], missing: list[str], cwd) -> subprocess.CompletedProcess:
    return _run(f"from eplb.cli import main\nsys.exit(main({argv!r}))", missing, cwd)


@pytest.mark.parametrize("argv, missing, line", [
    (["demo", "--steps", "5"], ["torch"],
     'eplb demo: error: eplb demo needs torch, which is not installed: pip install "eplb[torch]"'),
    (["eval", "--example", "--plot", "heatmap.png"], ["matplotlib"],
     'eplb eval: error: --plot needs matplotlib, which is not installed: pip install "eplb[plot]"'),
    (["simulate", "--out", "report"], ["matplotlib"],
     "eplb simulate: error: eplb simulate (the report's plots) needs matplotlib, which is not installed: "
     'pip install "eplb[plot]"'),
])
def test_command_without_its_extra_is_one_line(tmp_path, argv, missing, line):
    result = _cli(argv, missing, tmp_path)
    assert (result.returncode, result.stderr, result.stdout) == (1, line + "\n", "")
    assert list(tmp_path.iterdir()) == []  # refused before any work: no plot, no report folder


def test_eval_without_matplotlib_works_without_plot(tmp_path):
    import json

    result = _cli(["eval", "--example", "--json"], ["matplotlib"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["num_layers"] == 58


def test_runtime_without_torch(tmp_path):
    """The config is torch-free (an engine's driver builds it); the controller names the extra."""
    code = """
from eplb.runtime import EplbConfig
assert EplbConfig.from_dict({"mode": "dynamic", "policy": "default"}).policy == "default"
try:
    from eplb.runtime import EplbController
except ImportError as exc:
    from eplb import EplbError
    assert isinstance(exc, EplbError)
    print(exc)
"""
    result = _run(code, ["torch"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ('eplb.runtime.EplbController needs torch, which is not installed: '
                             'pip install "eplb[torch]"\n')


def test_every_extra_named_exists():
    """The extras the messages name are the ones pyproject.toml declares, each with the package it stands for."""
    import re

    from eplb._extras import EXTRAS

    text = (Path(SRC).parent / "pyproject.toml").read_text()
    section = text[text.index("[project.optional-dependencies]"):]
    section = section[:section.index("\n[", 1)]
    declared = {name: re.findall(r'"([^"]+)"', deps)
                for name, deps in re.findall(r"^([a-z]+) = \[(.*)\]$", section, flags=re.M)}
    for module, extra in EXTRAS.items():
        assert any(req.replace("-", "_").startswith(module) for req in declared[extra]), (module, extra)
    assert any(req.startswith("prometheus_client") for req in declared["test"])  # the metrics tests scrape for real
