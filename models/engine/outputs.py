"""What the engine hands back (docs/INTERFACES.md), and the checks of what it is given.

Plain data, no torch: the scheduler builds these; worker/, evals/ and cli/ read them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from models.params import SamplingParams


@dataclass
class Timings:
    """Wall-clock ``time.time()`` stamps of one request."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


@dataclass
class Sample:
    """One of a request's ``n`` completions."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort"
    # Per generated token: {"token_id", "logprob", "top": [[id, logprob], ...]}.
    logprobs: list[dict[str, Any]] | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it


class PartialSample(NamedTuple):
    """A running sample's progress: what a stream may send."""

    index: int
    text: str  # the beginning of its text that no later token can change
    tokens: int  # tokens generated so far
    # Per generated token so far, as Sample.logprobs (when asked); the engine's own
    # list: read it before the next step.
    logprobs: list[dict[str, Any]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_tokens: int
    samples: list[Sample]
    timings: Timings
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)


@dataclass
class ScoreResult:
    """Log-likelihood of a continuation given its context."""

    logprob: float  # sum of token_logprobs
    is_greedy: bool  # every continuation token is the argmax of its logits
    token_logprobs: list[float]
    # Per continuation token: the argmax token's id and logprob (equal to the token's own
    # where it is the argmax) - what OpenAI's echo reports as the top alternative.
    top: list[tuple[int, float]] = field(default_factory=list)


def as_params(params: SamplingParams | Mapping[str, Any] | None) -> SamplingParams:
    """``add_request``'s ``params`` as a validated :class:`SamplingParams` (the
    defaults for None); a bad field is a ``ValueError`` naming it."""
    if params is None:
        return SamplingParams()
    if isinstance(params, Mapping):
        return SamplingParams.from_dict(params)
    params.validate()
    return params


def score_pair(
    i: int, pair: tuple[Sequence[int], Sequence[int]], max_position: int, vocab_size: int,
) -> tuple[list[int], list[int], list[int]]:
    """Check ``score``'s pair ``i``; returns (context, continuation, input tokens), the
    input being context + continuation less the last token (never an input)."""
    ctx, cont = pair
    ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
    if not ctx or not cont:
        raise ValueError(f"pairs[{i}]: context and continuation must be non-empty")
    inp = (ctx + cont)[:-1]
    if len(inp) > max_position:
        raise ValueError(f"pairs[{i}]: {len(inp) + 1} tokens exceed the model's "
                         f"context of {max_position} + 1")
    bad = [t for t in ctx + cont if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"pairs[{i}]: token id {bad[0]} outside the vocabulary")
    return ctx, cont, inp


def expand_params(
    prompts: Sequence[object],
    params: SamplingParams | Sequence[SamplingParams] | None,
) -> list[SamplingParams]:
    """``generate``'s ``params``: one per prompt (a single one, or None, for all)."""
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"params: {len(params)} given for {len(prompts)} prompts")
    return list(params)
