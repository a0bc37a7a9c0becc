"""From text requests to token pairs to ``(loglikelihood, is_greedy)``, as lm-eval's ``hf``
model does it, but scored by neoxq's engine.

Token handling copies lm-evaluation-harness 0.4 (``TemplateLM.loglikelihood``,
``_encode_pair`` and ``HFLM._loglikelihood_tokens``) so that the numbers can equal its
``hf`` model's:

- trailing whitespace of the context moves to the front of the continuation;
- the continuation's tokens are those of ``encode(context + continuation)`` after the
  first ``len(encode(context))`` tokens (so a merge across the boundary is scored the
  way the harness scores it);
- an empty context becomes the prefix token (EOS for GPT-NeoX);
- a pair longer than ``max_length + 1`` tokens loses tokens on the left.

The engine does the batching (it packs flattened tokens, so there is no padding to
waste); requests go to it longest first in chunks of ``batch_size`` so a progress bar
can move and the longest (most memory-hungry) requests fail first if they fail.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

TokenPair = tuple[list[int], list[int]]


class Scorer(Protocol):
    """The part of neoxq's engine (``models.engine.Engine``) that evaluation needs."""

    max_batch_tokens: int  # most tokens in one engine step

    def score(self, pairs: list[TokenPair]) -> list[Any]: ...


def encode_pair(
    encode: Callable[[str], list[int]], context: str, continuation: str, prefix_token_id: int
) -> TokenPair:
    """``(context_ids, continuation_ids)`` exactly as lm-eval's ``TemplateLM`` builds them."""
    if context == "":
        cont = encode(continuation)
        # lm-eval conditions on the prefix token, unless the continuation starts with it
        if cont and cont[0] == prefix_token_id:
            return cont[:1], cont[1:]
        return [prefix_token_id], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


def encode_pairs(
    encode_batch: Callable[[list[str]], list[list[int]]],
    requests: Sequence[tuple[str, str]],
    prefix_token_id: int,
) -> list[TokenPair]:
    """:func:`encode_pair` for many requests, with two batched tokenizer calls (the
    ``tokenizers`` library encodes a batch in parallel, in Rust)."""
    jobs: list[tuple[str, str]] = []  # (context, context + continuation) per request
    for context, continuation in requests:
        if context == "":
            jobs.append(("", continuation))
            continue
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        jobs.append((context, context + continuation))
    ctx_ids = encode_batch([c for c, _ in jobs])
    whole_ids = encode_batch([w for _, w in jobs])
    out: list[TokenPair] = []
    for (context, _), ctx, whole in zip(jobs, ctx_ids, whole_ids, strict=True):
        if context == "":
            cont = whole  # the continuation alone, see encode_pair
            out.append((cont[:1], cont[1:]) if cont and cont[0] == prefix_token_id
                       else ([prefix_token_id], cont))
        else:
            out.append((ctx, whole[len(ctx):]))
    return out


def truncate_pair(context: list[int], continuation: list[int], max_length: int) -> TokenPair:
    """Left-truncate as ``HFLM`` does: the model sees ``(ctx + cont)[-(max_length+1):][:-1]``
    and scores the last ``len(cont)`` positions, so keep ``max_length + 1`` tokens."""
    if not continuation:
        raise ValueError("empty continuation: nothing to score")
    if len(continuation) > max_length:
        raise ValueError(
            f"continuation of {len(continuation)} tokens exceeds the model's "
            f"context of {max_length} tokens"
        )
    total = len(context) + len(continuation)
    if total <= max_length + 1:
        return context, continuation
    keep = (context + continuation)[-(max_length + 1):]
    return keep[: len(keep) - len(continuation)], continuation


def _chunks(order: list[int], sizes: list[int], batch_size: int,
            max_tokens: int | None) -> list[list[int]]:
    """Consecutive runs of ``order`` with at most ``batch_size`` requests and, when
    ``max_tokens`` is set, at most that many input tokens (one request alone may exceed it)."""
    chunks: list[list[int]] = []
    cur: list[int] = []
    tokens = 0
    for i in order:
        full = len(cur) >= batch_size or (
            max_tokens is not None and cur and tokens + sizes[i] > max_tokens
        )
        if full:
            chunks.append(cur)
            cur, tokens = [], 0
        cur.append(i)
        tokens += sizes[i]
    if cur:
        chunks.append(cur)
    return chunks


def score_pairs(
    engine: Scorer,
    pairs: Sequence[TokenPair],
    *,
    max_length: int,
    batch_size: int = 256,
    max_tokens: int | None = None,
    progress: Any | None = None,
) -> list[tuple[float, bool]]:
    """Score every pair with ``engine.score``; answers come back in input order.

    Each call gets at most ``batch_size`` requests and, if ``max_tokens`` is given
    (default: the engine's ``max_batch_tokens``, i.e. one engine step per call), at
    most that many input tokens. One step per call keeps every request's prefill in
    one piece (an earlier engine failed on score prefills split with one token left)
    and moves the progress bar steadily; the steps are as full as the engine makes them.
    ``progress`` is anything with ``update(n)`` (a tqdm bar).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    if max_tokens is None:
        max_tokens = engine.max_batch_tokens
    prepared = [truncate_pair(list(c), list(t), max_length) for c, t in pairs]
    # input tokens: the last continuation token is never fed to the model
    sizes = [len(c) + len(t) - 1 for c, t in prepared]
    # Longest first, like lm-eval's Collator; ties by position for determinism.
    order = sorted(range(len(prepared)), key=lambda i: (-sizes[i], i))
    out: list[tuple[float, bool] | None] = [None] * len(prepared)
    for chunk in _chunks(order, sizes, batch_size, max_tokens):
        results = engine.score([prepared[i] for i in chunk])
        if len(results) != len(chunk):
            raise RuntimeError(f"engine.score returned {len(results)} results for {len(chunk)}")
        for i, res in zip(chunk, results, strict=True):
            out[i] = (float(res.logprob), bool(res.is_greedy))
        if progress is not None:
            progress.update(len(chunk))
    return out  # type: ignore[return-value]  # every slot was filled above
