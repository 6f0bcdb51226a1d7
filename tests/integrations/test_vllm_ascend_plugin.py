"""eplb's vLLM plug-in inside vllm-ascend: ``EPLB_VLLM_POLICY`` makes vllm-ascend's policy factory return eplb's
``AscendPolicy``, which pickles (vllm-ascend's EPLB worker is a process of its own) and passes vllm-ascend's check.

vllm-ascend does not install here (it builds against Ascend's toolkit), so these tests run the plug-in's path against
a STAND-IN factory module with vllm-ascend's import path (``vllm_ascend.eplb.core.policy.policy_factory``) and its
signature (``PolicyFactory.generate_policy(policy_type)``, a static method). The same path through vllm-ascend's own
factory, ``EplbWorker.check_expert_placement`` and ``compose_expert_update_info_greedy``, from a checkout:
``benchmarks/engines_check.py --vllm-ascend DIR``.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import eplb
from eplb.integrations import AscendPolicy
from eplb.integrations.vllm import ASCEND_FACTORY
from eplb.policies import POLICY_IDS, POLICY_NAMES
from test_vllm_ascend_rule import _slot_workload, reverted_layers

SRC = Path(eplb.__file__).resolve().parents[1]

_STAND_IN = '''
class PolicyFactory:
    """Stand-in for vllm-ascend's factory: same import path, same static method."""

    @staticmethod
    def generate_policy(policy_type: int):
        return f"vllm-ascend's own policy {policy_type}"
'''

# asks the factory once per argument, in order: "-" unsets EPLB_VLLM_POLICY, anything else sets it; the plug-in runs
# before each ask, as vLLM runs it in each process
_ASK = '''
import os, pickle, sys
from eplb.integrations.vllm import register
from vllm_ascend.eplb.core.policy.policy_factory import PolicyFactory
answers = []
for name in sys.argv[1:]:
    if name == "-":
        os.environ.pop("EPLB_VLLM_POLICY", None)
    else:
        os.environ["EPLB_VLLM_POLICY"] = name
    register()
    answers.append(PolicyFactory.generate_policy(3))
sys.stdout.buffer.write(pickle.dumps(answers))
'''


def _stand_in(root: Path, factory: bool = True) -> Path:
    package = root / Path(*ASCEND_FACTORY.split(".")[:-1])
    package.mkdir(parents=True)
    for folder in [package, *package.parents]:
        if folder == root:
            break
        (folder / "__init__.py").write_text("")
    if factory:
        (package / "policy_factory.py").write_text(_STAND_IN)
    return root


def _run(root: Path, code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``python -c code args`` with the stand-in and this eplb importable, ``EPLB_VLLM*`` only as ``env`` says."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EPLB_VLLM")}, **env,
           "PYTHONPATH": os.pathsep.join([str(root), str(SRC)])}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def answers(tmp_path_factory) -> dict:
    names = ["-", *POLICY_NAMES, *map(str, POLICY_IDS)]
    out = _run(_stand_in(tmp_path_factory.mktemp("stand-in")), _ASK, *names)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return dict(zip(names, pickle.loads(out.stdout)))  # unpickled here: another process than the one that built them


def test_unset_leaves_the_factory_alone(answers):
    assert answers["-"] == "vllm-ascend's own policy 3"


def test_every_name_and_id_gives_eplbs_policy(answers):
    for name in POLICY_NAMES:
        assert isinstance(answers[name], AscendPolicy) and answers[name].policy.name == name
    for policy_id, name in POLICY_IDS.items():  # EPLB_VLLM_POLICY decides, not vllm-ascend's policy_type (3 here)
        assert answers[str(policy_id)].policy.name == name


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_the_factorys_policy_passes_vllm_ascends_check(name, answers, dsv3_counts):
    """Two DeepSeek-V3 cycles (32 NPUs x 9 slots) with the policy that crossed a process boundary."""
    policy = answers[name]
    topology = eplb.Topology(32, 9)
    table = eplb.Placement.initial(256, topology, 58).rank_table
    for cycle in range(2):
        changed, _, new = policy.rebalance_experts(table, _slot_workload(table, dsv3_counts[cycle].astype(float)))
        assert reverted_layers(table, new) == [], (name, cycle)
        assert changed == int((new != table).any())
        table = new
    if name != "random":
        assert changed == 1


def test_a_vllm_ascend_without_the_factory_stops_the_plug_in_only_when_asked(tmp_path):
    root = _stand_in(tmp_path, factory=False)
    code = "from eplb.integrations.vllm import register; register()"
    assert _run(root, code).returncode == 0
    out = _run(root, code, EPLB_VLLM_POLICY="auto")
    assert out.returncode != 0
    assert "EPLB_VLLM_POLICY='auto': vllm_ascend is installed, but its policy factory" in out.stderr.decode()
