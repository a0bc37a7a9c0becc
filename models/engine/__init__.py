"""The batching engine: scheduler -> runner -> sampler, on one GPU or N pipeline stages.

=====================  ==============================================================
``scheduler.py``       which sequences run each step, with how many tokens, in which
                       blocks (plain Python, no torch); returns a ``StepPlan``
``block_manager.py``   block reference counts, free list, prefix cache (no torch)
``kv_cache.py``        the KV memory tensor and its sizing
``runner.py``          a plan -> device tensors -> a slice of the network; decode graphs
``sampler.py``         the last stage's logits -> tokens and score rows
``engine.py``          the one-GPU engine (``Engine``)
``pipeline.py``        the same over N stage processes (``PipelineEngine``)
``protocol.py``        ``InferenceEngine``, the interface both implement
``outputs.py``         ``RequestOutput``, ``Sample``, ``Timings``, ``ScoreResult``
=====================  ==============================================================

Names are imported lazily so that ``models.engine.scheduler`` (and its tests) load
without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BATCH": "models.engine.scheduler",
    "INTERACTIVE": "models.engine.scheduler",
    "YIELD_TOKENS": "models.engine.scheduler",
    "MAX_NUM_SEQS": "models.engine.scheduler",
    "MAX_BATCH_TOKENS": "models.engine.scheduler",
    "Engine": "models.engine.engine",
    "PipelineEngine": "models.engine.pipeline",
    "PipelineError": "models.engine.pipeline",
    "InferenceEngine": "models.engine.protocol",
    "PartialSample": "models.engine.outputs",
    "RequestOutput": "models.engine.outputs",
    "Sample": "models.engine.outputs",
    "ScoreResult": "models.engine.outputs",
    "Timings": "models.engine.outputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'models.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
