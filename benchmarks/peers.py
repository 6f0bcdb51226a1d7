"""vllm-ascend's own EPLB policies behind eplb's policy interface, loaded at run time from a checkout.

Nothing of vllm-ascend is part of this project: :func:`load_peer_policies` imports the policy files of a checkout the
user points to (``vllm_ascend/eplb/core/policy/`` under ``peer_dir``) by file path, as modules of a package of their
own. Where they import what only an Ascend machine or a vLLM installation has, a stand-in takes its place, and only
if the real module cannot be imported:

- ``torch_npu`` (SwiftBalancer imports it) is an empty module, and ``torch.npu.device_count()`` (read by
  SwiftBalancer's constructor for its intra-node mode, which the replay does not use) returns 8;
- ``vllm.logger.logger`` is a :mod:`logging` logger;
- ``vllm_ascend.distributed.parallel_state.get_dynamic_eplb_group()`` returns an object whose ``world_size`` is the
  number of ranks of the run (:func:`set_group_size`): FlashLB reads it to choose its re-plan thresholds.

:class:`PeerPolicy` then does, each cycle, what vllm-ascend's ``EplbWorker.do_update`` does: it hands the policy
object the expert table ``[L, W, K]`` and the load per slot (SwiftBalancer: the window's sum ``[L, W, K]``; FlashLB:
one row per step ``[T, L, W, K]``; each expert's tokens in its first replica's slot: both policies read only the sum
per expert, which stays exact that way), takes the new table it returns for every layer (the worker ignores the
policy's "changed" flag and layer priority) and puts the table in force back for a layer the worker's
``check_expert_placement`` rejects (an expert lost, a rank holding an expert twice, an expert changing slot on its
rank). The policy object is created once
per run and keeps its own state across cycles, as vllm-ascend's planner process does.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
from pathlib import Path

import numpy as np

from eplb.placement import Placement
from eplb.policies.base import Policy

__all__ = ["load_peer_policies", "set_group_size", "PeerPolicy", "POLICY_FILES"]

#: the policies replayed: our name -> (file under vllm_ascend/eplb/core/policy, class name)
POLICY_FILES = {"swift": ("policy_swift_balancer.py", "SwiftBalanceEplb"), "flashlb": ("policy_flashlb.py", "FlashLB")}
_PACKAGE = "vllm_ascend_peer_policy"
_GROUP = types.SimpleNamespace(world_size=1)


def set_group_size(num_ranks: int) -> None:
    """The EPLB group's size the loaded policies see (``get_dynamic_eplb_group().world_size``)."""
    _GROUP.world_size = int(num_ranks)


def _stand_in(name: str, **attributes) -> None:
    """Register module ``name`` (and its parents) with ``attributes`` unless the real one imports."""
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
    for key, value in attributes.items():
        setattr(sys.modules[name], key, value)


def _install_stand_ins() -> None:
    import torch

    _stand_in("torch_npu")
    if not hasattr(torch, "npu"):
        torch.npu = types.SimpleNamespace(device_count=lambda: 8)
    _stand_in("vllm.logger", logger=logging.getLogger("vllm-ascend"))
    # always ours: the group is the run's ranks, whatever the installation
    parallel_state = types.ModuleType("vllm_ascend.distributed.parallel_state")
    parallel_state.get_dynamic_eplb_group = lambda: _GROUP
    for parent in ("vllm_ascend", "vllm_ascend.distributed"):
        sys.modules.setdefault(parent, types.ModuleType(parent))
    sys.modules["vllm_ascend.distributed.parallel_state"] = parallel_state


def load_peer_policies(peer_dir) -> dict[str, type]:
    """The policy classes of the vllm-ascend checkout at ``peer_dir``, by our policy name.

    Raises:
        FileNotFoundError: ``peer_dir`` holds no ``vllm_ascend/eplb/core/policy/`` with the policy files.
    """
    folder = Path(peer_dir).expanduser().resolve() / "vllm_ascend" / "eplb" / "core" / "policy"
    missing = [file for file, _ in POLICY_FILES.values() if not (folder / file).is_file()]
    if missing:
        raise FileNotFoundError(f"--peer-dir {peer_dir}: expected a vllm-ascend checkout with {', '.join(missing)} "
                                f"in {folder}")
    _install_stand_ins()
    package = types.ModuleType(_PACKAGE)
    package.__path__ = [str(folder)]  # the files' relative imports (.policy_abstract) resolve in there
    sys.modules[_PACKAGE] = package
    classes = {}
    for name, (file, class_name) in POLICY_FILES.items():
        module_name = f"{_PACKAGE}.{file[:-3]}"
        spec = importlib.util.spec_from_file_location(module_name, folder / file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        classes[name] = getattr(module, class_name)
    return classes


def slot_loads(load: np.ndarray, phy2log: np.ndarray, num_ranks: int) -> np.ndarray:
    """``[..., L, W, K]``: each expert's tokens of ``load`` ``[..., L, E]`` in the slot of its first replica, 0 in
    the others (same dtype as ``load``)."""
    load = np.asarray(load)
    num_layers, num_slots = phy2log.shape
    first = np.zeros((num_layers, num_slots), dtype=bool)
    for layer, row in enumerate(phy2log):
        first[layer, np.unique(row, return_index=True)[1]] = True
    per_slot = np.take_along_axis(load, np.broadcast_to(phy2log, load.shape[:-2] + phy2log.shape), axis=-1)
    per_slot = np.where(first, per_slot, 0)
    return per_slot.reshape(*per_slot.shape[:-1], num_ranks, -1)


def worker_check(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """vllm-ascend's ``check_expert_placement`` on tables ``[L, W, K]``: ``new`` with the layers it rejects reset to
    ``old`` (an expert no rank holds, a rank holding an expert twice, an expert kept on a rank in another slot)."""
    out = new.copy()
    for layer in range(old.shape[0]):
        if np.unique(new[layer]).size < np.unique(old[layer]).size:
            out[layer] = old[layer]
            continue
        for rank in range(old.shape[1]):
            row, before = new[layer, rank], old[layer, rank]
            kept = np.isin(row, before)
            if np.unique(row).size != row.size or not np.array_equal(row[kept], before[kept]):
                out[layer] = old[layer]
                break
    return out


class PeerPolicy(Policy):
    """A vllm-ascend policy object driven the way vllm-ascend's EPLB worker drives it (see the module docstring).

    ``next_state`` keeps FlashLB's history in step with the cycle: a layer the policy recorded as improved but the
    cycle did not put in force (its predicted PAR did not improve) gets its previous history back, as vllm-ascend
    records only layers it applies (its worker applies every layer)."""

    allow_shared_rank = False

    def __init__(self, name: str, cls: type):
        self.name = f"vllm-ascend:{name}"
        self.kind = name
        self.wants_steps = name == "flashlb"
        self.peer = cls()
        self._history = None

    def place(self, load, topology, current, window):
        import torch

        num_layers = window.shape[0]
        if current is None:
            current = Placement.initial(window.shape[1], topology, num_layers)
        table = np.array(current.rank_table, dtype=np.int64)
        workload = slot_loads(load, current.phy2log, topology.num_ranks)
        history = getattr(self.peer, "average_to_peak_history", None)
        self._history = None if history is None else dict(history)
        new = self.peer.rebalance_experts(torch.from_numpy(table), torch.from_numpy(workload))[2]
        new = worker_check(table, np.asarray(new, dtype=np.int64).reshape(table.shape))
        return new.reshape(num_layers, -1)

    def next_state(self, state, plan, layers, load):
        if self._history is not None:
            in_force = set(layers) | set(np.flatnonzero(~plan.changed).tolist())
            history = self.peer.average_to_peak_history
            for layer in list(history):
                if layer not in in_force:
                    if layer in self._history:
                        history[layer] = self._history[layer]
                    else:
                        del history[layer]
        return state
