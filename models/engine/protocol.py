"""The engine interface worker/, evals/ and cli/ program against.

:class:`~models.engine.engine.Engine` (one GPU) and
:class:`~models.engine.pipeline.PipelineEngine` (N stages) both implement it; code
that holds "an engine" types it as :class:`InferenceEngine` and needs no probing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from models.config import NeoXConfig
from models.engine.outputs import PartialSample, RequestOutput, ScoreResult
from models.engine.scheduler import BATCH
from models.params import SamplingParams

if TYPE_CHECKING:
    import torch


@runtime_checkable
class InferenceEngine(Protocol):
    """A continuous-batching engine driven by one thread."""

    config: NeoXConfig
    device: torch.device  # where the logits are sampled (a pipeline's rank 0)
    tokenizer: Any  # models.tokenizer.Tokenizer, or None for token-id-only engines
    eos_id: int
    max_position: int  # the model's context length
    max_batch_tokens: int  # most tokens in one forward
    max_num_seqs: int  # most sequences in one forward (one micro-batch)
    block_size: int

    @property
    def micro_batches(self) -> int:
        """Forwards in flight at once (1 on one GPU; a pipeline's micro-batch groups)."""
        ...

    @property
    def cache_tokens(self) -> int:
        """Tokens the KV cache holds."""
        ...

    @property
    def stats(self) -> dict[str, float]:
        """Counters: steps, decode_steps, graph_steps, cascade_steps, preemptions,
        prefix_query_tokens, prefix_hit_tokens, prefix_cache_hit_rate."""
        ...

    def add_request(self, request_id: str, prompt: str | Sequence[int],
                    params: SamplingParams | Mapping[str, Any] | None = None,
                    arrival: float | None = None, priority: int = BATCH) -> None:
        """Queue a request; ``ValueError`` naming the field for a bad one. A larger
        ``priority`` is admitted first and never preempted for a smaller one
        (``models.engine.scheduler.BATCH`` / ``INTERACTIVE``)."""
        ...

    def abort(self, request_id: str) -> bool:
        """Stop a request; its output (finish_reason "abort") comes from a later step."""
        ...

    def step(self) -> list[RequestOutput]:
        """Run one step; return the requests that finished since the last call."""
        ...

    def partial(self, request_id: str) -> list[PartialSample] | None:
        """A running request's progress, per sample: index, text no later token can
        change, tokens generated, logprobs so far; None if not running (what a stream
        sends)."""
        ...

    def has_unfinished(self) -> bool: ...

    def num_unfinished(self) -> int: ...

    def generated_tokens(self) -> dict[str, int]:
        """Tokens generated so far by each unfinished request (its samples together)."""
        ...

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Run prompts to completion; outputs in input order."""
        ...

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
              ) -> list[ScoreResult]:
        """Log-likelihood of each continuation given its context."""
        ...

    def capture_graphs(self) -> int:
        """Capture decode CUDA graphs now instead of on first use; how many."""
        ...

    def check_health(self) -> None:
        """Raise if a part of the engine outside this process (a pipeline stage) failed."""
        ...

    def close(self) -> None:
        """Release the engine's processes and memory. Idempotent."""
        ...
