"""A tiny random GPT-NeoX in Hugging Face format, with the real 20B tokenizer.

Both backends load the very same directory: lm-eval's ``hf`` model through
transformers, neoxq through its own loader, so only the model backend differs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# Nothing in these tests may reach the network (lm-eval and transformers would try
# the Hugging Face hub for unknown names).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# lm-eval bootstraps perplexity stderr in a process pool; the suite shares 2 cores.
os.environ.setdefault("DISABLE_MULTIPROC", "1")

TINY_CONFIG = {
    "architectures": ["GPTNeoXForCausalLM"],
    "model_type": "gpt_neox",
    "vocab_size": 50304,  # covers the 20B tokenizer's 50277 ids
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "rotary_pct": 0.25,
    "rotary_emb_base": 10000,
    "max_position_embeddings": 2048,
    "layer_norm_eps": 1e-5,
    "use_parallel_residual": True,
    "hidden_act": "gelu_fast",
    "tie_word_embeddings": False,
    # a wider init than HF's 0.02 makes the random model's predictions less flat, so
    # argmax decisions (acc, acc_norm) are far from ties
    "initializer_range": 0.2,
    "bos_token_id": 0,
    "eos_token_id": 0,
}

TOKENIZER_CONFIG = {
    # load tokenizer.json as it is: no class-specific rebuilding of the vocabulary
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "model_max_length": 2048,
}


def write_tiny_hf_model(dest: Path, tokenizer_json: Path, seed: int = 0,
                        config: dict | None = None) -> Path:
    """Save a random ``GPTNeoXForCausalLM`` plus tokenizer files to ``dest``."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(**{**TINY_CONFIG, **(config or {})})
    model = GPTNeoXForCausalLM(cfg).eval()
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    shutil.copy(tokenizer_json, dest / "tokenizer.json")
    (dest / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=1))
    return dest


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Path:
    return write_tiny_hf_model(tmp_path_factory.mktemp("tiny-neox"), tokenizer_path)
