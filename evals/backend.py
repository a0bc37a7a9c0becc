"""Building neoxq's engine for evaluation, and the few facts about it evaluation needs.

Shared by ``neoxq evaluate`` (:mod:`evals.runner`) and the lm-eval model
(:mod:`evals.harness`), so both see the same tokenizer, EOS and context length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.engine.protocol import InferenceEngine


@dataclass
class EvalBackend:
    """An engine plus what scoring needs to know about its model and tokenizer."""

    engine: InferenceEngine
    tokenizer: Any  # models.tokenizer.Tokenizer: .encode, .decode, .eos_id
    max_length: int  # tokens the model can attend over (its max_position)
    eos_id: int
    spec: str = ""

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        batch = getattr(self.tokenizer, "encode_batch", None)
        if batch is None:
            return [self.encode(t) for t in texts]
        return [list(ids) for ids in batch(list(texts))]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))


def wrap_engine(engine: InferenceEngine, tokenizer: Any = None, *,
                max_length: int | None = None, spec: str = "") -> EvalBackend:
    """Wrap an already built engine (tests and benchmarks share one model this way)."""
    tok = tokenizer if tokenizer is not None else engine.tokenizer
    if tok is None:
        raise ValueError("the engine has no tokenizer; pass one")
    if max_length is None:
        max_length = engine.max_position
    eos = tok.eos_id if tok.eos_id is not None else engine.eos_id
    return EvalBackend(engine=engine, tokenizer=tok, max_length=max_length, eos_id=int(eos),
                       spec=spec)


def build_backend(
    spec: str,
    *,
    device: str = "cpu",
    dtype: Any = "float32",
    tokenizer: str | None = None,
    pipeline_parallel: int = 1,
    max_length: int | None = None,
    **engine_kwargs: Any,
) -> EvalBackend:
    """Load ``spec`` (``preset:NAME``, an HF dir, a NeoX YAML, a converted dir) into an engine.

    ``tokenizer`` overrides the checkpoint's own tokenizer (a ``tokenizer.json`` path).
    """
    from models.dtypes import parse_dtype
    from models.runtime import build_engine

    tok = None
    if tokenizer is not None:
        from models.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
    engine = build_engine(
        spec, device=device, dtype=parse_dtype(dtype, device), pipeline_parallel=pipeline_parallel,
        tokenizer=tok, **engine_kwargs,
    )
    return wrap_engine(engine, tok, max_length=max_length, spec=spec)
