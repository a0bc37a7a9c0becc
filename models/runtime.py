"""Building an engine from a model spec: the one entry point the worker, CLI and evals use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.engine.engine import Engine
from models.engine.protocol import InferenceEngine
from models.tokenizer import Tokenizer


def build_engine(
    spec: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    pipeline_parallel: int = 1,
    tokenizer: Tokenizer | str | Path | None = None,
    seed: int = 0,
    quantization: str | None = None,
    **engine_kwargs: Any,
) -> InferenceEngine:
    """Load ``spec`` (``preset:NAME``, an HF dir, a NeoX YAML, a neoxq dir) and wrap it in
    an :class:`~models.engine.engine.Engine`.

    ``tokenizer`` overrides the checkpoint's own; ``seed`` fills random presets;
    ``quantization`` ("fp8" or None) quantizes the linear layers at load time;
    ``engine_kwargs`` go to :class:`Engine` (``kv_memory``, ``max_num_seqs``,
    ``kv_cache_dtype``, ...).

    ``pipeline_parallel=N`` > 1 splits the model over N stages (N GPUs from ``device``
    on CUDA, N processes on CPU) and returns a
    :class:`~models.engine.pipeline.PipelineEngine` (both are
    :class:`~models.engine.protocol.InferenceEngine`); close it (or use
    it as a context manager) to stop the stage processes.
    """
    if pipeline_parallel != 1:
        if pipeline_parallel < 1:
            raise ValueError(f"pipeline_parallel: must be >= 1, got {pipeline_parallel}")
        from models.engine.pipeline import PipelineEngine

        return PipelineEngine(
            spec, num_stages=pipeline_parallel, device=device, dtype=dtype,
            tokenizer=tokenizer, seed=seed, quantization=quantization, **engine_kwargs)
    from models.loaders import load_model

    loaded = load_model(spec, device=device, dtype=dtype, tokenizer=tokenizer, seed=seed,
                        quantization=quantization)
    return Engine(loaded.model, loaded.tokenizer, **engine_kwargs)
