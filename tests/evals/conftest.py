"""A tiny random GPT-NeoX in Hugging Face format, with the real 20B tokenizer.

Both backends load the very same directory: lm-eval's ``hf`` model through
transformers, neoxq through its own loader, so only the model backend differs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in these tests may reach the network (lm-eval and transformers would try
# the Hugging Face hub for unknown names).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# lm-eval bootstraps perplexity's stderr in a process pool; the suite shares 2 cores.
os.environ.setdefault("DISABLE_MULTIPROC", "1")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Path:
    """A random ``GPTNeoXForCausalLM`` + tokenizer files, loadable offline by both sides."""
    from bench.eval import write_tiny_hf_model

    return write_tiny_hf_model(tmp_path_factory.mktemp("tiny-neox"), tokenizer_path)
