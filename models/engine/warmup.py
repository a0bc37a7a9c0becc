"""Warming an engine up before it serves: everything a first batch would otherwise pay
for inside its own time.

A fresh engine has tuned its decode kernel (at construction, on CUDA) but not yet
captured its decode graphs, compiled the Triton specialisations or picked the cuBLAS and
attention kernels of the shapes it will meet. :func:`warm_up` captures every decode graph,
then runs, for each decode batch-size bucket B: B prompts prefilled in one step, a
decode-only step at batch B (a graph replay reading the prefill's samples on the
device), and a mixed step of those B decodes with a long prompt's first chunk (the eager
decode path, a long prefill chunk), whose rest continues in the next step (the
continuing-chunk path) - the shapes of a batch ramping up, running with new prompts
arriving, and draining. Without decode graphs only the smallest and largest
bucket run; on the CPU (nothing to compile, capture or tune) only the smallest.

The work is greedy on fixed token ids with explicit seeds: it draws nothing from the
engine's seed stream, so the requests served afterwards get exactly the outputs they
would get from a cold engine.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from models.engine.protocol import InferenceEngine
from models.engine.runner import decode_buckets
from models.params import SamplingParams

# Decode steps of each bucket's B sequences: decode-only (a graph step), then mixed with
# a long prompt's prefill (eager).
DECODE_STEPS = 2
# Tokens of the long prompt left for a continuing chunk in the step after its first.
CONTINUED = 16
# Longest warm-up prompt: long enough for the prefill kernels of long chunks, short
# enough that the warm-up takes seconds on the 20B.
MAX_PROMPT = 1024


@dataclass
class WarmUpReport:
    """What :func:`warm_up` did and how long it took."""

    seconds: float
    capture_seconds: float  # of ``seconds``: capturing the decode graphs
    graphs: int
    buckets: list[int]
    requests: int

    def describe(self) -> str:
        return (f"warm-up {self.seconds:.1f}s: {self.graphs} decode graphs captured in "
                f"{self.capture_seconds:.1f}s, a prefill and {DECODE_STEPS} decode steps at "
                f"batch sizes {self.buckets} ({self.requests} requests)")


def warm_up(engine: InferenceEngine, *, buckets: Sequence[int] | None = None,
            max_steps: int = 100_000) -> WarmUpReport:
    """Capture the engine's decode graphs and run one prefill and decode steps at every
    decode bucket (``buckets``: these batch sizes instead). The engine must be idle; it
    is idle again on return."""
    if engine.has_unfinished():
        raise RuntimeError("warm_up: the engine has unfinished requests")
    t0 = time.perf_counter()
    graphs = engine.capture_graphs()
    capture = time.perf_counter() - t0
    if buckets is not None:
        buckets = sorted(set(buckets))
        if not buckets or buckets[0] < 1 or buckets[-1] > engine.max_num_seqs:
            raise ValueError(f"buckets: batch sizes in 1..{engine.max_num_seqs}")
    elif engine.device.type == "cpu":
        # Nothing is captured, compiled or tuned on the CPU: one small request proves the
        # path without slowing every CPU worker's start.
        buckets = decode_buckets(engine.max_num_seqs)[:1]
    elif not graphs:
        # No decode graphs: nothing is made per bucket; the smallest and largest batch
        # cover the kernels' shapes.
        buckets = sorted({1, engine.max_num_seqs})
    else:
        buckets = decode_buckets(engine.max_num_seqs)
    vocab = min(engine.config.vocab_size, engine.tokenizer.vocab_size
                if engine.tokenizer is not None else engine.config.vocab_size)
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=1 + DECODE_STEPS, ignore_eos=True,
                            seed=0)

    def prompt(n: int) -> list[int]:  # distinct prompts: no prefix-cache hits among them
        return [rng.randrange(2, vocab) for _ in range(n)]

    def step() -> None:
        for out in engine.step():
            if out.error is not None:
                raise RuntimeError(f"warm_up: {out.request_id}: {out.error}")

    requests = 0
    for b in buckets:
        length = _prompt_length(engine, b)
        for i in range(b):
            engine.add_request(f"_warmup_{b}_{i}", prompt(length), params)
        requests += b
        step()  # the B prefills
        step()  # B decodes (a graph step)
        # A little longer than the step has room for: its last chunk continues in the
        # next step (the continuing-chunk attention path).
        long = min(engine.max_batch_tokens - b + CONTINUED, engine.max_position - 3,
                   engine.cache_tokens // 4)
        if long > 0 and b < engine.max_num_seqs:  # prefilled next to the B decodes
            engine.add_request(f"_warmup_{b}_long", prompt(long),
                               SamplingParams(temperature=0, max_tokens=2,
                                              ignore_eos=True, seed=0))
            requests += 1
        steps = 0
        while engine.has_unfinished():
            step()
            steps += 1
            if steps > max_steps:
                raise RuntimeError("warm_up: the engine does not finish its warm-up requests")
    return WarmUpReport(seconds=time.perf_counter() - t0, capture_seconds=capture,
                        graphs=graphs, buckets=buckets, requests=requests)


def _prompt_length(engine: InferenceEngine, b: int) -> int:
    """Prompt length for bucket ``b``: all ``b`` prompts prefill in one step (so that the
    decode steps run at exactly ``b``), with room for their tokens in the KV cache."""
    # Half the cache: the long prompt (a quarter at most) and block rounding fit too.
    room = engine.cache_tokens // (2 * b) - DECODE_STEPS - 1 - engine.block_size
    return max(1, min(engine.max_batch_tokens // b, room, MAX_PROMPT,
                      engine.max_position - DECODE_STEPS - 2))
