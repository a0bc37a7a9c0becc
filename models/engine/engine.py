"""The one-GPU engine: scheduler -> runner -> sampler, one step at a time.

Every :meth:`Engine.step` asks the :class:`~models.engine.scheduler.Scheduler` for a
plan (which sequences, how many tokens, which blocks), has the
:class:`~models.engine.runner.ModelRunner` run the whole network on it (decode-only
steps from CUDA graphs), samples with the :class:`~models.engine.sampler.Sampler` and
hands the tokens back to the scheduler, which returns the finished requests.

With ``overlap`` (the default) the host works while the device runs: a step schedules,
prepares and launches step N+1 (its decode inputs read step N's drawn tokens on the
device) before it waits for step N's tokens, then applies them (stop checks,
detokenization, outputs) while step N+1 runs. Steady decode then waits for the device
once per step, for the sampled tokens, and the device never waits for the host as long
as the host work of a step takes less than its forward. A step whose samples need their
sequences' earlier tokens on the host (a grammar's mask, the penalties' counts) still
overlaps: its forward is launched first, step N's tokens are applied (matchers consume
them) while it runs, and only then is its sampling queued, behind the forward.

Threading: one thread drives the engine (``add_request``, ``abort``, ``step``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from models.attention import DecodeChoice, tune_decode_kernel
from models.cascade import CascadeConfig, tune_cascade_kernel
from models.config import NeoXConfig
from models.dtypes import canonical_kv_cache_dtype, parse_kv_cache_dtype
from models.engine.block_manager import BlockManager
from models.engine.kv_cache import KVCache, blocks_for_budget
from models.engine.outputs import (
    PartialSample,
    RequestOutput,
    ScoreResult,
    Timings,
    as_params,
    expand_params,
    score_pair,
)
from models.engine.runner import ModelRunner
from models.engine.sampler import LaunchedSample, Sampler, needs_known_tokens
from models.engine.scheduler import (
    BATCH,
    MAX_BATCH_TOKENS,
    MAX_NUM_SEQS,
    YIELD_TOKENS,
    Scheduler,
    StepPlan,
)
from models.fp8 import quantization_of
from models.grammar import Grammars
from models.model import BranchPlan, NeoX
from models.params import SamplingParams


def prefix_salt(config: NeoXConfig, dtype: torch.dtype, kv_dtype: torch.dtype | None = None,
                quantization: str | None = None) -> int:
    """The start of every prefix-cache hash chain: what besides the tokens decides a
    block's keys and values (the model's shape and weights' identity, the weights' and
    the KV cache's dtypes, the weights' quantization)."""
    return hash((repr(config), str(dtype), str(kv_dtype or dtype), quantization))


def prompt_ids(prompt: str | Sequence[int], tokenizer: Any | None, vocab_size: int) -> list[int]:
    """A prompt as checked token ids (``ValueError`` naming the field when bad)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("prompt: this engine has no tokenizer; pass token ids")
        ids = list(tokenizer.encode(prompt))
    else:
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} outside the model's vocabulary "
                             f"(0..{vocab_size - 1})")
    if not ids:
        raise ValueError("prompt: must have at least one token")
    return ids


def fit_params(ids: list[int], params: SamplingParams, max_position: int,
               clamp_max_tokens: bool) -> SamplingParams:
    """``params`` for a prompt of ``ids`` in a context of ``max_position`` tokens:
    rejected (``ValueError``) or shortened when prompt + max_tokens exceeds it."""
    if len(ids) >= max_position:
        raise ValueError(f"prompt: {len(ids)} tokens leave no room to generate in the "
                         f"model's context of {max_position} tokens")
    if len(ids) + params.max_tokens > max_position:
        if not clamp_max_tokens:
            raise ValueError(
                f"max_tokens: prompt ({len(ids)} tokens) + max_tokens "
                f"({params.max_tokens}) exceeds the model's context of "
                f"{max_position} tokens")
        room = max_position - len(ids)
        params = SamplingParams.from_dict(
            {**params.to_dict(), "max_tokens": room,
             "min_tokens": min(params.min_tokens, room)})
    return params


def run_to_completion(
    add: Any, step: Any, tag: str, prompts: Sequence[str | Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] | None,
) -> tuple[list[RequestOutput], list[RequestOutput]]:
    """``generate`` of any engine: queue the prompts under ids ``tag + i`` with ``add``,
    call ``step`` until all are done. Returns (their outputs in input order, with ids
    "0", "1", ...; the outputs of other requests that finished meanwhile). A bad
    request gives an output with ``error`` set; the others run."""
    plist = expand_params(prompts, params)
    results: dict[str, RequestOutput] = {}
    ids = [f"{tag}{i}" for i in range(len(prompts))]
    for rid, prompt, p in zip(ids, prompts, plist, strict=True):
        try:
            add(rid, prompt, p)
        except ValueError as exc:
            results[rid] = RequestOutput(rid, 0, [], Timings(time.time()), error=str(exc))
    others: list[RequestOutput] = []
    while any(rid not in results for rid in ids):
        for out in step():
            if out.request_id.startswith(tag):
                results[out.request_id] = out
            else:
                others.append(out)
    final = []
    for i, rid in enumerate(ids):
        out = results[rid]
        out.request_id = str(i)
        final.append(out)
    return final, others


class Engine:
    """Continuous-batching text generation over a paged KV cache with prefix caching.

    Args:
        model: a whole :class:`NeoX` (embedding and head), already on its device.
        tokenizer: ``encode``/``decode``/``eos_id``/``vocab_size``; ``None`` runs on token
            ids only (prompts must be id lists, texts are empty, EOS is the config's).
        kv_memory: KV-cache budget — a float in (0, 1] is a fraction of the free GPU
            memory (after an activation reserve), an int is bytes. Default 0.9 on CUDA,
            256 MiB elsewhere.
        num_blocks: the number of KV blocks, overriding ``kv_memory`` (tests).
        block_size: tokens per KV block.
        max_num_seqs: most sequences in the running batch.
        max_batch_tokens: most tokens in one forward (decode tokens + prefill chunks).
        kv_overcommit, watermark: admission control (see
            :class:`~models.engine.scheduler.Scheduler`).
        yield_tokens: while an interactive (higher-priority) request is in the engine,
            batch sequences get at most this many tokens of each step (decodes of the
            oldest first, then prefill); the rest pause, keeping their KV, so the
            interactive request's steps stay close to an idle engine's. ``None``: no cap.
            Default :data:`~models.engine.scheduler.YIELD_TOKENS`.
        enable_prefix_caching: reuse the KV of full prompt blocks already computed (for
            another request, or before a preemption) instead of recomputing it.
        enable_cascade: decode sequences that share a cached prefix attend to it once
            per group (:mod:`models.cascade`) instead of each reading it: fewer bytes
            read on the GPU, more small ops on a CPU. Default: on with prefix caching
            on CUDA.
        mask_padded_vocab: never sample ids >= the tokenizer's vocabulary (rows of a
            padded embedding). Turn off only to compare raw ids with a reference.
        clamp_max_tokens: when prompt + max_tokens exceeds the context, shorten
            max_tokens instead of rejecting the request (OpenAI rejects; so do we by
            default).
        cuda_graphs: capture decode-only steps in CUDA graphs at bucketed batch sizes
            (default: on for CUDA).
        tune_kernels: time a few configurations of the Triton decode kernel (and, with
            cascade, of its prefix pass) at this model's shape at start-up and keep the
            fastest (default: on for CUDA).
        kv_cache_dtype: "auto" (the model's dtype) or "fp8" (float8 e4m3 values with a
            float32 scale per token and head: half the bytes, about twice the blocks).
        seed: seeds the per-request seeds drawn for requests that give none.
        overlap: prepare and launch each step before reading the previous one's tokens
            (see the module's docstring); off runs one step at a time. Outputs are the
            same either way.
        branch_streams: decode graphs run each block's MLP on a second CUDA stream beside
            its attention (parallel-residual models: the KV reads of attention overlap
            the MLP's tensor-core math). Same outputs either way.
        branch_plan: where the MLP branch starts and how many SMs its GEMMs leave to
            the attention (:class:`models.model.BranchPlan`).
        balance_waves: once the decode graphs are captured and timed, admit a queue
            longer than what fits at once in even waves where those timings say that is
            cheaper than full waves and a small last one (the scheduler's "Even
            waves"); off (or without timed graphs, e.g. on a CPU) admission is greedy.
    """

    def __init__(
        self,
        model: NeoX,
        tokenizer: Any | None = None,
        *,
        kv_memory: float | int | None = None,
        num_blocks: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = MAX_NUM_SEQS,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
        kv_overcommit: float = 1.0,
        watermark: float = 0.01,
        yield_tokens: int | None = YIELD_TOKENS,
        enable_prefix_caching: bool = True,
        enable_cascade: bool | None = None,
        mask_padded_vocab: bool = True,
        clamp_max_tokens: bool = False,
        cuda_graphs: bool | None = None,
        tune_kernels: bool | None = None,
        kv_cache_dtype: str | None = None,
        seed: int = 0,
        overlap: bool = True,
        branch_streams: bool = True,
        branch_plan: BranchPlan | None = None,
        balance_waves: bool = True,
    ) -> None:
        if not (model.has_embedding and model.has_head):
            raise ValueError("Engine needs a whole model (embedding and head)")
        if max_batch_tokens < 1 or max_num_seqs < 1 or block_size < 1:
            raise ValueError("max_batch_tokens, max_num_seqs and block_size must be >= 1")
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.kv_cache_dtype = canonical_kv_cache_dtype(kv_cache_dtype)
        self.kv_dtype = parse_kv_cache_dtype(self.kv_cache_dtype, self.dtype)
        self.quantization = quantization_of(model)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.clamp_max_tokens = clamp_max_tokens
        self.max_position = self.config.max_position
        self.eos_id: int = (
            int(tokenizer.eos_id) if tokenizer is not None and tokenizer.eos_id is not None
            else int(self.config.eos_token_id)
        )
        vocab = tokenizer.vocab_size if tokenizer is not None else None
        self.valid_vocab: int | None = (
            min(int(vocab), self.config.vocab_size) if mask_padded_vocab and vocab else None
        )
        if enable_cascade is None:
            enable_cascade = enable_prefix_caching and self.device.type == "cuda"
        # The decode kernel's picks per shape class, and the cascade prefix pass's pick
        # (None: not tuned).
        self.attn_config: dict[str, DecodeChoice] | None = None
        self.cascade_config: CascadeConfig | None = None
        if tune_kernels is None:
            tune_kernels = self.device.type == "cuda"
        if tune_kernels:
            # Before sizing the cache: tuning borrows some memory for a while.
            self.attn_config = tune_decode_kernel(
                self.config.num_heads, self.config.head_dim, block_size, self.kv_dtype,
                self.device, query_dtype=self.dtype)
            if enable_cascade:
                self.cascade_config, _ = tune_cascade_kernel(
                    self.config.num_heads, self.config.head_dim, block_size, self.kv_dtype,
                    self.device, query_dtype=self.dtype)
            torch.cuda.empty_cache()
        whole = (0, self.config.num_layers)
        if num_blocks is None:
            num_blocks = blocks_for_budget(
                self.config, layer_range=whole, block_size=block_size, dtype=self.kv_dtype,
                device=self.device, kv_memory=kv_memory, max_batch_tokens=max_batch_tokens,
                max_num_seqs=max_num_seqs, logits=True)
            if num_blocks < 2:
                raise ValueError(f"kv_memory: {kv_memory!r} holds less than two KV blocks")
        self.blocks = BlockManager(num_blocks, block_size,
                                   enable_prefix_caching=enable_prefix_caching,
                                   salt=prefix_salt(self.config, self.dtype, self.kv_dtype,
                                                    self.quantization))
        self.scheduler = Scheduler(
            self.blocks, max_position=self.max_position, max_num_seqs=max_num_seqs,
            max_batch_tokens=max_batch_tokens, kv_overcommit=kv_overcommit,
            watermark=watermark, decoder=tokenizer, eos_id=self.eos_id,
            yield_tokens=yield_tokens)
        cache = KVCache.for_model(self.config, whole, num_blocks, block_size, self.kv_dtype,
                                  self.device)
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs: needs a CUDA model")
        self.runner = ModelRunner(model, cache, max_num_seqs=max_num_seqs,
                                  cuda_graphs=cuda_graphs, cascade=enable_cascade,
                                  branch_streams=branch_streams,
                                  branch_plan=branch_plan or BranchPlan())
        self.balance_waves = balance_waves
        self.grammars = Grammars(tokenizer, self.config.vocab_size, self.eos_id)
        self.sampler = Sampler(device=self.device, valid_vocab=self.valid_vocab,
                               eos_id=self.eos_id, grammars=self.grammars)
        self._rng = random.Random(seed)
        self._pending: list[RequestOutput] = []  # finished, returned by the next step()
        self.overlap = overlap
        self._inflight: LaunchedSample | None = None  # launched, tokens not yet applied
        self.overlapped_steps = 0
        # Host seconds per part of the step (benchmarks): scheduling, preparing inputs,
        # launching the forward, launching the sampling (masks included), applying the
        # tokens (waits for the device included). On a CPU model the launches are the
        # computation itself.
        self.phase_seconds: dict[str, float] = dict.fromkeys(
            ("schedule", "prepare", "forward", "sample", "apply"), 0.0)

    # -- sizes and stats -----------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    @property
    def cache_tokens(self) -> int:
        """Tokens the KV cache holds (usable blocks x block size)."""
        return self.scheduler.cache_tokens

    @property
    def stats(self) -> dict[str, float]:
        """Step counts, preemptions, decode-graph steps, steps launched while the previous
        one still ran (``overlapped_steps``) and the prefix cache's hits."""
        s: dict[str, float] = dict(self.scheduler.stats)
        s["graph_steps"] = self.runner.graph_steps
        s["overlapped_steps"] = self.overlapped_steps
        s["cascade_steps"] = self.runner.cascade_steps
        s.update(prefix_stats([self.blocks]))
        return s

    @property
    def micro_batches(self) -> int:
        """One forward at a time (as the protocol counts a pipeline's groups)."""
        return 1

    @property
    def kv_cache_bytes(self) -> int:
        return self.runner.cache.nbytes

    def set_prefix_caching(self, enabled: bool) -> None:
        """Turn prefix caching on or off from now on (off forgets what is cached)."""
        self.blocks.set_enabled(enabled)

    def set_overlap(self, enabled: bool) -> None:
        """Overlap host work with the device from the next step on, or not (outputs are
        the same either way; benchmarks compare the two)."""
        self.overlap = enabled

    def set_cascade(self, enabled: bool, *, graphs: bool = True) -> None:
        """Turn cascade decode attention on or off from now on; ``graphs=False`` runs
        decode-only cascade steps eagerly instead of from their CUDA graphs."""
        self.runner.cascade = enabled
        self.runner.cascade_graphs = graphs

    def set_max_batch_tokens(self, tokens: int) -> None:
        """Bound the tokens of each step from now on, at most the ``max_batch_tokens``
        the engine was built with (its buffers and KV budget were sized for that)."""
        if not 1 <= tokens <= self.max_batch_tokens:
            raise ValueError(f"max batch tokens: 1..{self.max_batch_tokens}, got {tokens}")
        self.scheduler.max_batch_tokens = tokens

    def set_fused_kv_store(self, on: bool) -> None:
        """Keys and values stored in the cache by the kernel that splits them out of the
        projection (on, the default) or by one of their own (off): the same outputs; a
        benchmark's A/B. Recaptures decode graphs already captured."""
        self.runner.set_fused_kv_store(on)
        self.set_balance_waves(self.balance_waves)

    def set_branch_plan(self, plan: BranchPlan) -> None:
        """Decode graphs run each block's MLP branch as ``plan`` says (see
        ``branch_plan``): the same outputs; a benchmark's A/B. Recaptures decode graphs
        already captured."""
        self.runner.set_branch_plan(plan)
        self.set_balance_waves(self.balance_waves)

    def capture_graphs(self) -> int:
        """Capture the CUDA graphs of every decode batch-size bucket now instead of on
        first use. Returns how many."""
        n = self.runner.capture_graphs()
        self.set_balance_waves(self.balance_waves)
        return n

    def set_balance_waves(self, on: bool) -> None:
        """Even waves on or off (see ``balance_waves``); on needs the decode graphs'
        timings, which :meth:`capture_graphs` (a worker's warm-up) takes."""
        self.balance_waves = on
        graphs = self.runner.graphs
        timed = graphs is not None and graphs.timed
        self.scheduler.decode_seconds = graphs.step_seconds if on and timed else None

    def check_health(self) -> None:
        """Nothing can fail outside the caller's own calls in one process."""

    def close(self) -> None:
        """Nothing to stop (the pipeline engine's close stops its stage processes)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | Mapping[str, Any] | None = None,
        arrival: float | None = None,
        priority: int = BATCH,
    ) -> None:
        """Queue a request. Raises ``ValueError`` naming the field for a bad one; nothing
        else in the engine is affected. ``priority`` (``scheduler.BATCH`` or
        ``INTERACTIVE``; larger first) orders admission and preemption."""
        params = as_params(params)
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id: must be a non-empty string, got {request_id!r}")
        if request_id in self.scheduler.requests:
            raise ValueError(f"request_id: {request_id!r} is already in the engine")
        ids = prompt_ids(prompt, self.tokenizer, self.config.vocab_size)
        params = fit_params(ids, params, self.max_position, self.clamp_max_tokens)
        self.scheduler.check_fits(len(ids) + params.max_tokens, "prompt")
        new_matcher = self.grammars.factory(params.constraint)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        self.scheduler.add_generate(request_id, ids, params, seed, arrival or time.time(),
                                    priority, new_matcher=new_matcher)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its memory; its output (finish_reason "abort")
        comes back from the next :meth:`step`. False if it is unknown or finished."""
        return self.scheduler.abort(request_id)

    def partial(self, request_id: str) -> list[PartialSample] | None:
        """A running request's progress per sample (see ``Scheduler.partial``)."""
        return self.scheduler.partial(request_id)

    def has_unfinished(self) -> bool:
        return (bool(self._pending) or self._inflight is not None
                or self.scheduler.has_unfinished())

    def num_unfinished(self) -> int:
        return self.scheduler.num_unfinished()

    def generated_tokens(self) -> dict[str, int]:
        """Tokens generated so far by each unfinished request (all its samples); a
        finished request's total is its RequestOutput's ``completion_tokens``."""
        return self.scheduler.generated_tokens()

    # -- the step ------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one forward over the scheduled tokens; return the requests that finished
        (or were aborted) since the last call."""
        prev, self._inflight = self._inflight, None
        if prev is not None and not self.overlap:
            self._apply(prev)
            prev = None
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        self.phase_seconds["schedule"] += time.perf_counter() - t0
        launched = None
        if not plan.is_empty:
            launched, prev = self._launch(plan, prev)
        if prev is not None:
            self._apply(prev)  # while `launched` runs on the device
        if launched is not None:
            if self.overlap:
                self._inflight = launched
            else:
                self._apply(launched)
        out = self._pending + self.scheduler.take_outputs()
        self._pending = []
        return out

    def _launch(self, plan: StepPlan, prev: LaunchedSample | None,
                ) -> tuple[LaunchedSample, LaunchedSample | None]:
        """Queue the plan's forward and sampling on the device (``prev``: the step still
        running, whose drawn tokens some of the plan's decode rows take as input).
        Returns the launched step and ``prev`` if it is still to be applied (None when
        the plan's sampling needed its tokens on the host first)."""
        times = self.phase_seconds
        t0 = time.perf_counter()
        inputs = self.runner.prepare(plan)
        t1 = time.perf_counter()
        if prev is not None:
            self.overlapped_steps += 1
        logits, rows = self.runner.execute(
            inputs, prev_tokens=prev.tokens if prev is not None else None)
        t2 = time.perf_counter()
        times["prepare"] += t1 - t0
        times["forward"] += t2 - t1
        if prev is not None and any(needs_known_tokens(seq) for seq, _ in plan.samples):
            # The forward does not need step N's tokens on the host, but masks and
            # penalties do: apply them now, while the forward runs.
            self._apply(prev)
            prev = None
        t3 = time.perf_counter()
        launched = self.sampler.launch(logits, plan, rows)
        times["sample"] += time.perf_counter() - t3
        return launched, prev

    def _apply(self, launched: LaunchedSample) -> None:
        """Wait for a launched step's tokens and hand them to the scheduler."""
        t0 = time.perf_counter()
        self.scheduler.update(launched.plan, launched.result())
        self.phase_seconds["apply"] += time.perf_counter() - t0

    # -- conveniences --------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs in input order. A bad request gives an
        output with ``error`` set (and no samples); the others run. Outputs of the
        caller's own requests that finish meanwhile come from its next :meth:`step`."""
        tag = f"_gen{self._rng.getrandbits(40):x}_"
        final, others = run_to_completion(self.add_request, self.step, tag, prompts, params)
        self._pending = others + self._pending
        return final

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[ScoreResult]:
        """Log-likelihood of each continuation given its context, batched through the
        engine's steps (prefill only). ``len(context) + len(continuation)`` may be up to
        the context length + 1 (the last token is never an input)."""
        tag = f"_score{self._rng.getrandbits(40):x}_"
        checked = []
        for i, pair in enumerate(pairs):
            ctx, cont, inp = score_pair(i, pair, self.max_position, self.config.vocab_size)
            self.scheduler.check_fits(len(inp), f"pairs[{i}]")
            checked.append((ctx, cont, inp))
        ids = []
        for i, (ctx, cont, inp) in enumerate(checked):
            rid = f"{tag}{i}"
            self.scheduler.add_score(rid, inp, len(ctx), cont)
            ids.append(rid)
        results: dict[str, ScoreResult] = {}
        others: list[RequestOutput] = []
        while len(results) < len(ids):
            others.extend(self.step())
            for rid in ids:
                if rid not in results:
                    got = self.scheduler.take_score(rid)
                    if got is not None:
                        results[rid] = got
        self._pending = others + self._pending
        return [results[rid] for rid in ids]


def prefix_stats(managers: Sequence[BlockManager]) -> dict[str, float]:
    """Prefix-cache figures of one or more block managers: prompt tokens looked up, found,
    and the hit rate (found / looked up; 0 before any lookup)."""
    query = sum(m.query_tokens for m in managers)
    hit = sum(m.hit_tokens for m in managers)
    return {"prefix_query_tokens": query, "prefix_hit_tokens": hit,
            "prefix_cache_hit_rate": hit / query if query else 0.0}
