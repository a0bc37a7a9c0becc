"""The continuous-batching engine: scheduling, paged KV memory, one forward per step.

Every :meth:`Engine.step`:

1. **schedules** — running sequences that are generating get one token each (decode);
   then running prefills continue and waiting requests are admitted, each taking a
   chunk of its prompt within the step's token budget (``max_batch_tokens``). KV
   blocks are allocated as tokens arrive; when none is left the most recently admitted
   sequence is *preempted* (its blocks freed, recomputed later), so the engine never
   runs out of memory whatever the workload;
2. **runs** the network once over the packed tokens (decode tokens first), with the
   paged attention backend; the head runs only on rows whose logits are needed;
3. **samples** on the device (``models.sampling``) and reads the tokens back in one
   host transfer; stop conditions are checked, finished sequences free their blocks
   and leave, and their requests are returned.

``n`` samples of one prompt share its prefill: the prompt's blocks are forked with
reference counts and the last, partly filled block is copied on first write.
``score(pairs)`` runs prefill-only requests through the same steps.

Threading: one thread drives the engine (``add_request``, ``abort``, ``step``).
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from models.attention import PagedAttention, StepMetadata, prefill_mask, tune_decode_kernel
from models.kv_cache import NULL_BLOCK, BlockAllocator, KVCache, block_bytes
from models.model import NeoX
from models.sampling import SampleRow, SamplingBatch, SamplingParams, StopChecker, sample

if TYPE_CHECKING:
    from models.pipeline import PipelineEngine

# Prefill chunks that start a sequence run as a few padded causal attention calls per
# layer, one per length group (see fresh_groups); at most this many groups.
MAX_FRESH_CALLS = 16

# --------------------------------------------------------------------------------------
# Public result types (docs/INTERFACES.md)
# --------------------------------------------------------------------------------------


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


@dataclass
class RequestOutput:
    request_id: str
    prompt_tokens: int
    samples: list[Sample]
    timings: Timings
    error: str | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)


@dataclass
class ScoreResult:
    """Log-likelihood of a continuation given its context."""

    logprob: float  # sum of token_logprobs
    is_greedy: bool  # every continuation token is the argmax of its logits
    token_logprobs: list[float]


# --------------------------------------------------------------------------------------
# Internal state
# --------------------------------------------------------------------------------------


class _NullTokenizer:
    """Stands in when the engine has no tokenizer: token ids in, token ids out, no text."""

    eos_id = None
    vocab_size = None

    def decode(self, ids: Sequence[int]) -> str:
        return ""


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams | None  # None for a score request
    seed: int
    timings: Timings
    seqs: list[_Seq] = field(default_factory=list)
    pending_fork: int = 0  # samples still to be forked from sample 0 after its prefill
    # score requests: tokens of the context (the first continuation logit is at ctx-1)
    score_ctx: int = 0
    score_targets: list[int] = field(default_factory=list)
    score_lps: list[float] = field(default_factory=list)
    score_greedy: list[bool] = field(default_factory=list)
    done: bool = False
    order: int = 0  # arrival order (preempted sequences go back in this order)


@dataclass(eq=False)
class _Seq:
    req: _Request
    index: int  # sample index
    tokens: list[int]  # prompt + generated
    num_prompt: int
    checker: StopChecker | None
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    demand: int = 0  # blocks counted against admission while running
    finished: bool = False
    logprobs: list[dict[str, Any]] | None = None

    @property
    def outputs(self) -> list[int]:
        return self.tokens[self.num_prompt:]


@dataclass
class _Scheduled:
    decodes: list[_Seq]
    prefills: list[tuple[_Seq, int]]  # (sequence, tokens this step)
    copies: list[tuple[int, int]]  # copy-on-write (src block, dst block)


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------


class Engine:
    """Continuous-batching text generation over a paged KV cache.

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
        kv_overcommit: a request is admitted while the running sequences' projected
            final sizes (prompt + max_tokens) add up to at most this many times the
            cache. 1.0 avoids preemption for ``ignore_eos`` workloads; larger values bet
            that requests stop early (EOS) and rely on preemption when they do not.
        watermark: fraction of blocks kept free when admitting (room for decodes).
        mask_padded_vocab: never sample ids >= the tokenizer's vocabulary (rows of a
            padded embedding). Turn off only to compare raw ids with a reference.
        clamp_max_tokens: when prompt + max_tokens exceeds the context, shorten
            max_tokens instead of rejecting the request (OpenAI rejects; so do we by
            default).
        cuda_graphs: capture decode-only steps in CUDA graphs at bucketed batch sizes
            (default: on for CUDA).
        tune_kernels: time a few configurations of the Triton decode kernel at this
            model's shape at start-up and keep the fastest (default: on for CUDA).
        seed: seeds the per-request seeds drawn for requests that give none.
    """

    def __init__(
        self,
        model: NeoX,
        tokenizer: Any | None = None,
        *,
        kv_memory: float | int | None = None,
        num_blocks: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_batch_tokens: int = 2048,
        kv_overcommit: float = 1.0,
        watermark: float = 0.01,
        mask_padded_vocab: bool = True,
        clamp_max_tokens: bool = False,
        cuda_graphs: bool | None = None,
        tune_kernels: bool | None = None,
        seed: int = 0,
    ) -> None:
        if not (model.has_embedding and model.has_head):
            raise ValueError("Engine needs a whole model (embedding and head)")
        if max_batch_tokens < 1 or max_num_seqs < 1 or block_size < 1:
            raise ValueError("max_batch_tokens, max_num_seqs and block_size must be >= 1")
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self._decoder = tokenizer if tokenizer is not None else _NullTokenizer()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.kv_overcommit = kv_overcommit
        self.clamp_max_tokens = clamp_max_tokens
        self.max_position = self.config.max_position
        self.eos_id: int = (
            int(tokenizer.eos_id) if tokenizer is not None and tokenizer.eos_id is not None
            else int(self.config.eos_token_id)
        )
        vocab = getattr(tokenizer, "vocab_size", None)
        self.valid_vocab: int | None = (
            min(int(vocab), self.config.vocab_size) if mask_padded_vocab and vocab else None
        )
        self.attn_config: tuple[int, int, int, int] | None = None
        if tune_kernels is None:
            tune_kernels = self.device.type == "cuda"
        if tune_kernels:
            # Before sizing the cache: tuning borrows some memory for a while.
            self.attn_config = tune_decode_kernel(
                self.config.num_heads, self.config.head_dim, block_size, self.dtype,
                self.device)
            torch.cuda.empty_cache()
        if num_blocks is None:
            num_blocks = self._blocks_from_budget(kv_memory)
        self.allocator = BlockAllocator(num_blocks)
        self.cache = KVCache(
            num_layers=self.config.num_layers, num_blocks=num_blocks, block_size=block_size,
            num_heads=self.config.num_heads, head_dim=self.config.head_dim,
            dtype=self.dtype, device=self.device,
        )
        self.attn = PagedAttention(self.cache)
        self.max_blocks_per_seq = math.ceil(self.max_position / block_size)
        self.watermark_blocks = int(watermark * self.allocator.capacity)
        self._rng = random.Random(seed)
        self._requests: dict[str, _Request] = {}
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._outputs: list[RequestOutput] = []  # finished, not yet returned by step()
        self._scores: dict[str, ScoreResult] = {}
        self._order = 0
        self._demand = 0
        self.stats = {"steps": 0, "preemptions": 0, "decode_steps": 0, "graph_steps": 0}
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        self._graphs: _DecodeGraphs | None = None
        if cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError("cuda_graphs: needs a CUDA model")
            self._graphs = _DecodeGraphs(self)

    # -- sizing --------------------------------------------------------------------------

    def _blocks_from_budget(self, kv_memory: float | int | None) -> int:
        per_block = block_bytes(self.config, self.block_size, self.dtype)
        if self.device.type == "cuda":
            if kv_memory is None:
                kv_memory = 0.9
            if isinstance(kv_memory, float):
                if not 0 < kv_memory <= 1:
                    raise ValueError(f"kv_memory: a fraction must be in (0, 1], got {kv_memory}")
                torch.cuda.synchronize(self.device)
                free, _ = torch.cuda.mem_get_info(self.device)
                # Activations of the largest step, the fp32 logits of a scoring step
                # and the sampler's (rows, vocab) temporaries stay outside the cache.
                v = self.config.vocab_size
                reserve = (2 << 30) + self.max_batch_tokens * v * 4 * 3 \
                    + self.max_num_seqs * v * 8 * 6
                budget = int(free * kv_memory) - reserve
            else:
                budget = int(kv_memory)
        else:
            budget = int(kv_memory) if kv_memory is not None else 256 << 20
            if isinstance(kv_memory, float):
                raise ValueError("kv_memory: give bytes (an int) off CUDA")
        n = budget // per_block
        if n < 2:
            raise ValueError(f"kv_memory: {budget} bytes is less than two KV blocks "
                             f"({per_block} bytes each)")
        return int(n)

    def capture_graphs(self) -> int:
        """Capture the CUDA graphs of every decode batch-size bucket now (largest first, so
        the smaller ones reuse its memory) instead of on first use. Returns how many."""
        if self._graphs is None:
            return 0
        with torch.inference_mode():
            for b in sorted(self._graphs.buckets, reverse=True):
                if b not in self._graphs.graphs:
                    self._graphs.graphs[b] = self._graphs._capture(b)
        return len(self._graphs.graphs)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def cache_tokens(self) -> int:
        """Tokens the KV cache holds (usable blocks x block size)."""
        return self.allocator.capacity * self.block_size

    # -- requests ------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | Mapping[str, Any] | None = None,
        arrival: float | None = None,
    ) -> None:
        """Queue a request. Raises ``ValueError`` naming the field for a bad one; nothing
        else in the engine is affected."""
        params = as_params(params)
        ids = self._prompt_ids(request_id, prompt)
        if len(ids) >= self.max_position:
            raise ValueError(f"prompt: {len(ids)} tokens leave no room to generate in the "
                             f"model's context of {self.max_position} tokens")
        total = len(ids) + params.max_tokens
        if total > self.max_position:
            if not self.clamp_max_tokens:
                raise ValueError(
                    f"max_tokens: prompt ({len(ids)} tokens) + max_tokens "
                    f"({params.max_tokens}) exceeds the model's context of "
                    f"{self.max_position} tokens")
            params = SamplingParams.from_dict(
                {**params.to_dict(), "max_tokens": self.max_position - len(ids),
                 "min_tokens": min(params.min_tokens, self.max_position - len(ids))})
        self._check_fits(min(total, self.max_position), "prompt")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = _Request(request_id, ids, params, seed, Timings(arrival or time.time()),
                       pending_fork=params.n - 1)
        seq = _Seq(req, 0, list(ids), len(ids), self._checker(params))
        req.seqs.append(seq)
        self._enqueue(req, seq)

    def _prompt_ids(self, request_id: str, prompt: str | Sequence[int]) -> list[int]:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id: must be a non-empty string, got {request_id!r}")
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already in the engine")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: this engine has no tokenizer; pass token ids")
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt: token id {bad[0]} outside the model's vocabulary "
                                 f"(0..{self.config.vocab_size - 1})")
        if not ids:
            raise ValueError("prompt: must have at least one token")
        return ids

    def _check_fits(self, tokens: int, what: str) -> None:
        if tokens > self.cache_tokens:
            raise ValueError(f"{what}: {tokens} tokens do not fit in the KV cache "
                             f"({self.cache_tokens} tokens)")

    def _checker(self, params: SamplingParams) -> StopChecker:
        return StopChecker(params, self._decoder, eos_id=self.eos_id)

    def _enqueue(self, req: _Request, seq: _Seq) -> None:
        req.order = self._order
        self._order += 1
        self._requests[req.request_id] = req
        self._waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its memory; its output (finish_reason "abort")
        comes back from the next :meth:`step`. False if it is unknown or finished."""
        req = self._requests.get(request_id)
        if req is None or req.done:
            return False
        if req.params is None:  # a score request (internal): just drop it
            self._release(req.seqs[0])
            req.done = True
            del self._requests[request_id]
            return True
        for seq in req.seqs:
            if not seq.finished:
                if seq.checker is not None:
                    seq.checker.finish_abort()
                self._release(seq)
        # Samples never forked still count, as empty aborted samples.
        for _ in range(req.pending_fork):
            sib = _Seq(req, len(req.seqs), list(req.prompt), len(req.prompt),
                       self._checker(req.params))
            assert sib.checker is not None
            sib.checker.finish_abort()
            sib.finished = True
            req.seqs.append(sib)
        req.pending_fork = 0
        self._finish_request(req, error=None)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._outputs)

    def num_unfinished(self) -> int:
        return sum(1 for r in self._requests.values() if not r.done)

    # -- the step ------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one forward over the scheduled tokens; return the requests that finished
        (or were aborted) since the last call."""
        sched = self._schedule()
        if sched.decodes or sched.prefills:
            self._execute(sched)
        out, self._outputs = self._outputs, []
        return out

    def _schedule(self) -> _Scheduled:
        bs = self.block_size
        budget = self.max_batch_tokens
        copies: list[tuple[int, int]] = []
        decodes: list[_Seq] = []
        prefills: list[tuple[_Seq, int]] = []
        now = time.time()
        # 1) decodes, then continuing prefills, in admission order. A sequence short of
        # blocks preempts the most recently admitted sequences not yet scheduled.
        scheduled: set[int] = set()
        any_prefill = False
        for want_decode in (True, False):
            if not want_decode and not any_prefill:
                break  # every running sequence is decoding: skip the second pass
            i = 0
            while i < len(self._running) and budget > 0:
                seq = self._running[i]
                need = len(seq.tokens) - seq.num_computed
                # A decode extends generated text; a prompt (or score input) with one token
                # left is still a prefill chunk (it may fork samples or score rows).
                is_decode = need == 1 and len(seq.tokens) > seq.num_prompt
                if is_decode != want_decode:
                    any_prefill = True
                    i += 1
                    continue
                n = min(need, budget)
                while True:
                    n_fit = self._grow(seq, n, copies)
                    victim = self._running[-1]
                    if n_fit > 0 or victim is seq or id(victim) in scheduled:
                        break
                    self._preempt(victim)
                if n_fit == 0:
                    if self._running[-1] is seq:  # the lowest priority itself: give way
                        self._preempt(seq)
                        break
                    # Blocks are held by sequences already in this step: wait, and admit
                    # nobody new, so that this older sequence goes first next step.
                    budget = 0
                    break
                scheduled.add(id(seq))
                if want_decode:
                    decodes.append(seq)
                else:
                    prefills.append((seq, n_fit))
                budget -= n_fit
                i += 1
        # 2) admit waiting sequences, first come first served.
        limit = self.kv_overcommit * self.allocator.capacity
        while self._waiting and budget > 0:
            seq = self._waiting[0]
            req = seq.req
            if len(self._running) + 1 + req.pending_fork * (seq.index == 0) > self.max_num_seqs \
                    and self._running:
                break
            demand = self._demand_of(seq)
            if self._running and self._demand + demand > limit:
                break
            n = min(len(seq.tokens), budget)
            need_blocks = math.ceil(n / bs)
            free = self.allocator.num_free
            if self._running and free - need_blocks < self.watermark_blocks:
                break
            if need_blocks > free:  # nothing running: everything is free but the prompt is huge
                n = free * bs
                if n == 0:
                    break
            self._waiting.popleft()
            self._running.append(seq)
            seq.demand = demand
            self._demand += demand
            n = self._grow(seq, n, copies)
            prefills.append((seq, n))
            budget -= n
            if req.timings.first_scheduled is None:
                req.timings.first_scheduled = now
        return _Scheduled(decodes, prefills, copies)

    def _demand_of(self, seq: _Seq) -> int:
        req, bs = seq.req, self.block_size
        if req.params is None:
            return math.ceil(len(seq.tokens) / bs)
        final = min(len(req.prompt) + req.params.max_tokens, self.max_position)
        d = math.ceil(final / bs)
        if seq.index == 0 and req.pending_fork:
            d += req.pending_fork * (d - len(req.prompt) // bs)
        return d

    def _grow(self, seq: _Seq, n: int, copies: list[tuple[int, int]]) -> int:
        """Give ``seq`` the blocks for its next ``n`` tokens, or as many as fit (a prefill
        chunk may shrink; copy-on-write of a shared last block included). Returns the
        number of tokens that fit."""
        bs, alloc = self.block_size, self.allocator
        start = seq.num_computed
        # Copy-on-write: the first new token lands in a block shared with a sibling.
        if start % bs and alloc.refs(seq.blocks[start // bs]) > 1:
            if alloc.num_free == 0:
                return 0
            src = seq.blocks[start // bs]
            dst = alloc.allocate()
            alloc.free(src)
            seq.blocks[start // bs] = dst
            copies.append((src, dst))
        have = len(seq.blocks) * bs - start
        if have < n:
            extra = min(math.ceil((n - have) / bs), alloc.num_free)
            for _ in range(extra):
                seq.blocks.append(alloc.allocate())
            have += extra * bs
        return min(n, have)

    def _preempt(self, seq: _Seq) -> None:
        """Free a running sequence's blocks; it goes back to the waiting queue (in
        arrival order) and is recomputed from its tokens when readmitted."""
        self._running.remove(seq)
        self.allocator.free_all(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        self._demand -= seq.demand
        seq.demand = 0
        self.stats["preemptions"] += 1
        if seq.req.params is None:  # a score request recomputes its rows from the start
            seq.req.score_lps.clear()
            seq.req.score_greedy.clear()
        # Keep waiting sequences in arrival order (preempted ones are older than new ones).
        pos = 0
        key = (seq.req.order, seq.index)
        while pos < len(self._waiting) and (
            (self._waiting[pos].req.order, self._waiting[pos].index) < key
        ):
            pos += 1
        self._waiting.insert(pos, seq)

    def _release(self, seq: _Seq) -> None:
        """A sequence is done (finished or aborted): free its blocks, drop it."""
        seq.finished = True
        if seq.blocks:
            self.allocator.free_all(seq.blocks)
            seq.blocks = []
        if seq in self._running:
            self._running.remove(seq)
            self._demand -= seq.demand
            seq.demand = 0
        else:
            try:
                self._waiting.remove(seq)
            except ValueError:
                pass

    # -- running a step ------------------------------------------------------------------

    def _execute(self, sched: _Scheduled) -> None:
        self.stats["steps"] += 1
        bs = self.block_size
        # Longest contexts first: the decode kernel then finishes with its shortest work.
        decodes = sorted(sched.decodes, key=lambda s: -s.num_computed)
        prefills = sched.prefills
        d = len(decodes)
        if sched.copies:
            src, dst = zip(*sched.copies, strict=True)
            self.cache.copy_blocks(torch.tensor(src, device=self.device),
                                   torch.tensor(dst, device=self.device))

        # Which logits rows are needed, and which sampler rows read them.
        toks: list[int] = []
        poss: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        samplers: list[tuple[_Seq, int]] = []  # (sequence or fork source, sample index)
        sample_rows: list[int] = []  # logits row of each sampler row
        fork_src: list[_Seq] = []
        score_rows: list[tuple[_Request, int]] = []  # (request, continuation index)
        score_idx: list[int] = []  # logits row of each score row
        score_targets: list[int] = []
        for seq in decodes:
            p = seq.num_computed
            toks.append(seq.tokens[p])
            poss.append(p)
            slots.append(seq.blocks[p // bs] * bs + p % bs)
            sample_rows.append(len(logit_rows))
            logit_rows.append(len(logit_rows))
            samplers.append((seq, seq.index))
        # Prefill metadata. Chunks that start a sequence attend only to themselves
        # (`fresh` row ranges); continuing chunks need their earlier keys: query
        # (sequence, position) pairs and the keys they see, for one masked SDPA call.
        q_seq: list[int] = []
        k_parts: list[np.ndarray] = []
        k_seq_parts: list[np.ndarray] = []
        k_pos_parts: list[np.ndarray] = []
        fresh: list[tuple[int, int]] = []
        num_continuing = 0
        row = d
        for j, (seq, n) in enumerate(prefills):
            start, end = seq.num_computed, seq.num_computed + n
            toks.extend(seq.tokens[start:end])
            pos = np.arange(end, dtype=np.int64)
            table = np.asarray(seq.blocks, dtype=np.int64)
            seq_slots = table[pos // bs] * bs + pos % bs  # (end,) slots of the whole context
            poss.extend(range(start, end))
            slots.extend(seq_slots[start:end].tolist())
            if start == 0:
                fresh.append((row - d, row - d + n))
            else:
                # The scheduler puts continuing chunks before starting ones.
                assert not fresh, "continuing prefill chunks must come first"
                num_continuing += n
                q_seq.extend([j] * n)
                k_parts.append(seq_slots)
                k_seq_parts.append(np.full(end, j, dtype=np.int64))
                k_pos_parts.append(pos)
            req = seq.req
            if req.params is None:
                # Logits at positions ctx-1 .. len-1 predict the continuation tokens.
                first = max(start, req.score_ctx - 1)
                for p in range(first, end):
                    score_rows.append((req, p - (req.score_ctx - 1)))
                    score_targets.append(req.score_targets[p - (req.score_ctx - 1)])
                    score_idx.append(len(logit_rows))
                    logit_rows.append(row + p - start)
            elif end == len(seq.tokens):
                # The chunk completes the sequence's context: sample its next token.
                sample_rows.append(len(logit_rows))
                samplers.append((seq, seq.index))
                if seq.index == 0 and req.pending_fork and len(seq.tokens) == seq.num_prompt:
                    # n > 1: the other samples draw their first token from the same row.
                    for k in range(req.pending_fork):
                        samplers.append((seq, len(req.seqs) + k))
                        sample_rows.append(len(logit_rows))
                    fork_src.append(seq)
                logit_rows.append(row + n - 1)
            row += n
            seq.num_computed = end
        for seq in decodes:
            seq.num_computed += 1

        identity = sample_rows == list(range(len(logit_rows)))
        srows_d = sidx_d = targets_d = None
        if self._graphs is not None and not prefills and self._graphs.covers(d):
            logits = self._graphs.run(toks, poss, slots, decodes)
            self.stats["graph_steps"] += 1
        else:
            logits, srows_d, sidx_d, targets_d = self._forward(
                toks, poss, slots, decodes, num_continuing, tuple(fresh), q_seq, k_parts,
                k_seq_parts, k_pos_parts, logit_rows, sample_rows, score_idx, score_targets)
        if d and not prefills:
            self.stats["decode_steps"] += 1
        self._sample_and_update(logits, samplers, fork_src, None if identity else srows_d,
                                score_rows, sidx_d, targets_d)

    def _forward(
        self, toks: list[int], poss: list[int], slots: list[int], decodes: list[_Seq],
        num_continuing: int, fresh: tuple[tuple[int, int], ...], q_seq: list[int],
        k_parts: list[np.ndarray], k_seq_parts: list[np.ndarray],
        k_pos_parts: list[np.ndarray], logit_rows: list[int], sample_rows: list[int],
        score_idx: list[int], score_targets: list[int],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The eager forward of a step: metadata to the device in one copy, the network,
        the head on the rows that need logits. Returns (logits, sampler rows, score rows,
        score targets) with the last three as device tensors."""
        bs = self.block_size
        d = len(decodes)
        dec_w = 0
        bt = np.zeros(0, dtype=np.int64)
        ctx = np.zeros(0, dtype=np.int64)
        if d:
            # Table width rounded up to 16 columns: one kernel specialisation for all steps.
            dec_w = -(-max(len(s.blocks) for s in decodes) // 16) * 16
            bt = np.zeros((d, dec_w), dtype=np.int64)
            _fill_tables(bt, decodes)
            ctx = np.asarray([s.num_computed for s in decodes], dtype=np.int64)
        empty = np.zeros(0, dtype=np.int64)
        k_slots = np.concatenate(k_parts) if k_parts else empty
        k_seq = np.concatenate(k_seq_parts) if k_parts else empty
        k_pos = np.concatenate(k_pos_parts) if k_parts else empty
        if len(k_slots) % 16:
            # Pad keys to a multiple of 16 (fused SDPA kernels want aligned mask rows);
            # padding keys belong to no sequence.
            pad = 16 - len(k_slots) % 16
            k_slots = np.concatenate([k_slots, np.full(pad, NULL_BLOCK * bs, dtype=np.int64)])
            k_seq = np.concatenate([k_seq, np.full(pad, -1, dtype=np.int64)])
            k_pos = np.concatenate([k_pos, np.zeros(pad, dtype=np.int64)])
        groups, f_gather, f_scatter = fresh_groups(fresh)
        # One host buffer -> one host-to-device copy for all integer metadata.
        parts = [
            np.asarray(toks, dtype=np.int64), np.asarray(poss, dtype=np.int64),
            np.asarray(slots, dtype=np.int64), bt.reshape(-1), ctx,
            np.asarray(q_seq, dtype=np.int64), k_slots, k_seq, k_pos,
            np.asarray(logit_rows, dtype=np.int64), np.asarray(sample_rows, dtype=np.int64),
            np.asarray(score_idx, dtype=np.int64), np.asarray(score_targets, dtype=np.int64),
            f_gather, f_scatter,
        ]
        (tokens_d, pos_d, slots_d, bt_d, ctx_d, qseq_d, kslot_d, kseq_d, kpos_d,
         lrows_d, srows_d, sidx_d, targets_d, fgather_d, fscatter_d) = _to_device(
            parts, self.device)
        meta = StepMetadata(
            slot_blocks=slots_d // bs, slot_offsets=slots_d % bs, num_decode=d,
            block_tables=bt_d.view(d, dec_w) if d else None,
            context_lens=ctx_d if d else None, num_continuing=num_continuing, fresh=fresh,
        )
        if groups:
            meta.fresh_groups = groups
            meta.fresh_gather, meta.fresh_scatter = fgather_d, fscatter_d
        if num_continuing:
            meta.key_blocks, meta.key_offsets = kslot_d // bs, kslot_d % bs
            meta.prefill_mask = prefill_mask(qseq_d, pos_d[d: d + num_continuing], kseq_d,
                                             kpos_d)
        self.attn.set_step(meta)
        hidden = self.model.run_layers(self.model.embed(tokens_d), pos_d, self.attn)
        if len(logit_rows) != len(toks):
            hidden = hidden[lrows_d]
        return self.model.head(hidden), srows_d, sidx_d, targets_d  # logits (rows, V)

    def _sample_and_update(
        self, logits: Tensor, samplers: list[tuple[_Seq, int]], fork_src: list[_Seq],
        srows_d: Tensor | None, score_rows: list[tuple[_Request, int]],
        sidx_d: Tensor | None, targets_d: Tensor | None,
    ) -> None:
        """Sample, score, read everything back in one transfer, update the sequences."""
        pieces: list[Tensor] = []
        want_lp = False
        res = None
        if samplers and all(_plain_greedy(seq) for seq, _ in samplers):
            # Greedy with nothing to report or ban (the benchmark's case): what sample()
            # would return, without packing per-row parameters to the device (a pinned
            # copy and a dozen small kernels per step) or the log-softmax.
            lg = logits if srows_d is None else logits[srows_d]
            valid = lg.shape[1] if self.valid_vocab is None else min(self.valid_vocab,
                                                                       lg.shape[1])
            pieces.append(lg[:, :valid].argmax(dim=-1).double())
        elif samplers:
            rows = [
                SampleRow(params=seq.req.params, seed=seq.req.seed, sample_index=index,
                          position=len(seq.tokens) - seq.num_prompt,
                          output_ids=seq.outputs if seq.req.params.has_penalties else (),
                          prompt_ids=seq.tokens[: seq.num_prompt]
                          if seq.req.params.repetition_penalty != 1 else ())
                for seq, index in samplers  # type: ignore[misc]
            ]
            batch = SamplingBatch.build(rows, device=self.device,
                                        vocab_size=logits.shape[1],
                                        valid_vocab=self.valid_vocab, eos_id=self.eos_id)
            res = sample(logits if srows_d is None else logits[srows_d], batch)
            pieces.append(res.tokens.double())
            want_lp = batch.max_logprobs is not None
            if want_lp:
                assert res.top_ids is not None and res.top_logprobs is not None
                pieces += [res.logprobs.double(), res.top_ids.double().reshape(-1),
                           res.top_logprobs.double().reshape(-1)]
        if score_rows:
            assert sidx_d is not None and targets_d is not None
            srow_logits = logits[sidx_d]  # (S, V)
            lp = torch.log_softmax(srow_logits.float(), dim=-1)
            pieces.append(lp.gather(1, targets_d[:, None])[:, 0].double())
            pieces.append((srow_logits.argmax(dim=-1) == targets_d).double())
        flat = torch.cat(pieces).tolist() if pieces else []  # the step's one host sync
        now = time.time()
        off = 0
        if samplers:
            m = len(samplers)
            tokens = [int(t) for t in flat[:m]]
            off = m
            if want_lp:
                k = int(res.top_ids.shape[1])  # type: ignore[union-attr]
                lps = flat[off: off + m]
                top_ids = flat[off + m: off + m + m * k]
                top_lps = flat[off + m + m * k: off + m + 2 * m * k]
                off += m + 2 * m * k
            # Fork new siblings first: sample 0 may finish on this very token.
            seqs = [self._fork(seq, index) if index != seq.index else seq
                    for seq, index in samplers]
            for src in fork_src:
                src.req.pending_fork = 0
            for r, seq in enumerate(seqs):
                tok = tokens[r]
                kk = seq.req.params.logprobs  # type: ignore[union-attr]
                if want_lp and kk is not None:
                    if seq.logprobs is None:
                        seq.logprobs = []
                    seq.logprobs.append({
                        "token_id": tok, "logprob": lps[r],
                        "top": [[int(top_ids[r * k + j]), top_lps[r * k + j]]
                                for j in range(kk)],
                    })
                self._append_token(seq, tok, now)
        if score_rows:
            s = len(score_rows)
            lps_s = flat[off: off + s]
            greedy_s = flat[off + s: off + 2 * s]
            for (req, _), lp_v, g in zip(score_rows, lps_s, greedy_s, strict=True):
                req.score_lps.append(lp_v)
                req.score_greedy.append(g > 0.5)
            for req in {id(r): r for r, _ in score_rows}.values():
                seq = req.seqs[0]
                if seq.num_computed == len(seq.tokens):
                    self._release(seq)
                    self._scores[req.request_id] = ScoreResult(
                        logprob=float(sum(req.score_lps)), is_greedy=all(req.score_greedy),
                        token_logprobs=list(req.score_lps))
                    req.done = True
                    req.timings.finished = now
                    del self._requests[req.request_id]

    def _fork(self, src: _Seq, index: int) -> _Seq:
        """A sibling sample sharing ``src``'s prompt blocks (reference counted)."""
        req = src.req
        assert req.params is not None
        sib = _Seq(req, index, list(src.tokens[: src.num_prompt]), src.num_prompt,
                   self._checker(req.params))
        sib.blocks = self.allocator.fork(src.blocks[: math.ceil(src.num_prompt / self.block_size)])
        sib.num_computed = src.num_prompt
        # Sample 0 was admitted with its siblings' growth in its demand; hand it over.
        share = self._demand_of_sibling(req)
        src.demand -= share
        sib.demand = share
        req.seqs.append(sib)
        self._running.append(sib)
        return sib

    def _demand_of_sibling(self, req: _Request) -> int:
        assert req.params is not None
        final = min(len(req.prompt) + req.params.max_tokens, self.max_position)
        return math.ceil(final / self.block_size) - len(req.prompt) // self.block_size

    def _append_token(self, seq: _Seq, tok: int, now: float) -> None:
        req = seq.req
        if req.timings.first_token is None:
            req.timings.first_token = now
        seq.tokens.append(tok)
        assert seq.checker is not None
        reason = seq.checker.append(tok)
        if reason is None and len(seq.tokens) >= self.max_position:
            reason = seq.checker.finish_length()
        if reason is not None:
            self._release(seq)
            if req.pending_fork == 0 and all(s.finished for s in req.seqs):
                self._finish_request(req, error=None, now=now)

    def _finish_request(self, req: _Request, error: str | None, now: float | None = None) -> None:
        req.done = True
        req.timings.finished = now or time.time()
        samples = []
        for s in sorted(req.seqs, key=lambda s: s.index):
            c = s.checker
            assert c is not None
            samples.append(Sample(index=s.index, text=c.text, token_ids=list(c.token_ids),
                                  finish_reason=c.finish_reason, logprobs=s.logprobs,
                                  stop_reason=c.stop_reason))
        self._outputs.append(RequestOutput(req.request_id, len(req.prompt), samples,
                                           req.timings, error))
        del self._requests[req.request_id]

    # -- conveniences --------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs in input order. A bad request gives an
        output with ``error`` set (and no samples); the others run."""
        return run_to_completion(self, prompts, params)

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[ScoreResult]:
        """Log-likelihood of each continuation given its context, batched through the
        engine's steps (prefill only). ``len(context) + len(continuation)`` may be up to
        the context length + 1 (the last token is never an input)."""
        tag = f"_score{self._rng.getrandbits(40):x}_"
        ids = []
        for i, pair in enumerate(pairs):
            ctx, cont, inp = score_pair(i, pair, self.max_position, self.config.vocab_size)
            self._check_fits(len(inp), f"pairs[{i}]")
            rid = f"{tag}{i}"
            req = _Request(rid, inp, None, 0, Timings(time.time()), score_ctx=len(ctx),
                           score_targets=cont)
            req.seqs.append(_Seq(req, 0, inp, len(inp), None))
            self._enqueue(req, req.seqs[0])
            ids.append(rid)
        others: list[RequestOutput] = []
        while any(rid not in self._scores for rid in ids):
            others.extend(self.step())
        self._outputs = others + self._outputs
        return [self._scores.pop(rid) for rid in ids]


# -- shared by Engine and PipelineEngine (models/pipeline.py) ----------------------------


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


def run_to_completion(
    engine: Engine | PipelineEngine,
    prompts: Sequence[str | Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
) -> list[RequestOutput]:
    """``generate`` of an :class:`Engine` or a ``PipelineEngine``: queue the prompts
    under private ids, step until all are done and return them in input order, with
    ids "0", "1", ... A bad request gives an output with ``error`` set; the others run.
    Outputs of the caller's own requests that finish meanwhile stay for its next
    ``step()``."""
    if params is None or isinstance(params, SamplingParams):
        params = [params or SamplingParams()] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"params: {len(params)} given for {len(prompts)} prompts")
    tag = f"_gen{engine._rng.getrandbits(40):x}_"
    results: dict[str, RequestOutput] = {}
    ids = [f"{tag}{i}" for i in range(len(prompts))]
    for rid, prompt, p in zip(ids, prompts, params, strict=True):
        try:
            engine.add_request(rid, prompt, p)
        except ValueError as exc:
            results[rid] = RequestOutput(rid, 0, [], Timings(time.time()), error=str(exc))
    others: list[RequestOutput] = []
    while any(rid not in results for rid in ids):
        for out in engine.step():
            if out.request_id.startswith(tag):
                results[out.request_id] = out
            else:
                others.append(out)
    engine._outputs = others + engine._outputs  # not ours: the caller's step() gets them
    final = []
    for i, rid in enumerate(ids):
        out = results[rid]
        out.request_id = str(i)
        final.append(out)
    return final


def _fill_tables(tables: np.ndarray, seqs: Sequence[_Seq]) -> None:
    """Row i of ``tables`` starts with seqs[i]'s block ids (the rest is left alone): one
    vectorised write instead of a numpy slice assignment per sequence."""
    lens = np.fromiter((len(s.blocks) for s in seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(s.blocks for s in seqs),
                       dtype=np.int64, count=int(lens.sum()))
    # Row-major order of the mask is the order of the concatenated block lists.
    tables[np.arange(tables.shape[1])[None, :] < lens[:, None]] = flat


def _plain_greedy(seq: _Seq) -> bool:
    """The sequence's next token is the plain argmax: greedy, no logprobs, no penalties
    and no banned ids (min_tokens reached)."""
    p = seq.req.params
    return (p is not None and p.temperature == 0 and p.logprobs is None
            and not p.has_penalties and len(seq.tokens) - seq.num_prompt >= p.min_tokens)


def fresh_groups(
    fresh: Sequence[tuple[int, int]],
) -> tuple[tuple[tuple[int, int], ...], np.ndarray, np.ndarray]:
    """Pack the chunks that start a sequence (``(start, end)`` rows, contiguous, in row
    order) into right-padded batches: ``((n, S), ...)`` per group, the gather rows (all
    groups' ``n * S`` padded rows, flattened in order; padding repeats a chunk's last
    row) and, for each fresh row, its index among the gathered rows (the scatter back).

    Right padding is exact under a causal mask (a real query never sees the padded keys
    after it). Chunks are grouped by length so padding stays under half of each group.
    """
    if not fresh:
        empty = np.zeros(0, dtype=np.int64)
        return (), empty, empty
    base = fresh[0][0]
    order = sorted(range(len(fresh)), key=lambda i: fresh[i][0] - fresh[i][1])  # longest first
    members: list[list[int]] = []
    for i in order:  # a chunk under half its group's length starts a new group
        n = fresh[i][1] - fresh[i][0]
        if not members or (2 * n < fresh[members[-1][0]][1] - fresh[members[-1][0]][0]
                           and len(members) < MAX_FRESH_CALLS):
            members.append([i])
        else:
            members[-1].append(i)
    total = fresh[-1][1] - base
    scatter = np.zeros(total, dtype=np.int64)
    gathers: list[np.ndarray] = []
    groups: list[tuple[int, int]] = []
    at = 0
    for group in members:
        s_max = fresh[group[0]][1] - fresh[group[0]][0]
        starts = np.asarray([fresh[i][0] for i in group], dtype=np.int64)
        lens = np.asarray([fresh[i][1] - fresh[i][0] for i in group], dtype=np.int64)
        cols = np.arange(s_max, dtype=np.int64)
        gathers.append((starts[:, None] + np.minimum(cols[None, :], lens[:, None] - 1))
                       .reshape(-1))
        for k, i in enumerate(group):
            scatter[fresh[i][0] - base: fresh[i][1] - base] = at + k * s_max + cols[: lens[k]]
        groups.append((len(group), s_max))
        at += len(group) * s_max
    return tuple(groups), np.concatenate(gathers), scatter


def _to_device(parts: list[np.ndarray], device: torch.device) -> list[Tensor]:
    """Concatenate int64 arrays, copy them to ``device`` in one transfer, split again.

    Each part starts 16-byte aligned (parts are padded to an even length), so a Triton
    kernel handed one sees the same pointer alignment every step and is not recompiled
    for a new specialisation mid-run.
    """
    sizes = [int(p.size) for p in parts]
    padded = [p if p.size % 2 == 0 else np.append(p, 0) for p in parts]
    host = torch.from_numpy(np.concatenate(padded))
    if device.type == "cuda":
        host = host.pin_memory()
        dev = host.to(device, non_blocking=True)
    else:
        dev = host
    out, at = [], 0
    for size, p in zip(sizes, padded, strict=True):
        out.append(dev[at: at + size])
        at += p.size
    return out


class _DecodeGraphs:
    """CUDA graphs of decode-only steps, one per bucketed batch size, captured on first use.

    A decode step at batch B replays the graph of the smallest bucket >= B. Inputs live in
    one static device buffer (tokens, positions, slots, context lengths, block tables of
    ``max_blocks_per_seq`` columns) refreshed by a single copy from a pinned host buffer;
    the host buffer is safe to reuse because every step ends with a host sync. Rows past
    B are padding: token 0 at position 0, written to and read from the reserved null block.

    ``capture=False`` runs the same static-buffer forward without capturing (so the
    buffer layout and padding are tested on CPU).
    """

    def __init__(self, engine: Engine, max_batch: int | None = None,
                 capture: bool = True) -> None:
        self.engine = engine
        self.capture = capture
        self.max_batch = max_batch or engine.max_num_seqs
        # Padding a decode batch costs little (it is bound by reading weights and KV), so
        # coarse buckets above 64 keep capture time and graph memory down.
        self.buckets = sorted({b for b in (1, 2, 4, 8, 16, 24, 32, 48) if b < self.max_batch}
                              | set(range(64, self.max_batch, 32)) | {self.max_batch})
        self.width = engine.max_blocks_per_seq
        m, w = self.max_batch, self.width
        # Sections of the flat buffer: tokens, positions, slots, context lengths, tables.
        self.offsets = [0, m, 2 * m, 3 * m, 4 * m, 4 * m + m * w]
        self.host = torch.zeros(self.offsets[-1], dtype=torch.int64)
        if engine.device.type == "cuda":
            self.host = self.host.pin_memory()
        self.host_np = self.host.numpy()
        self.static = torch.zeros(self.offsets[-1], dtype=torch.int64, device=engine.device)
        self.graphs: dict[int, Callable[[], Tensor]] = {}  # bucket -> replay
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def covers(self, d: int) -> bool:
        return 0 < d <= self.max_batch

    def _section(self, i: int, rows: int) -> Tensor:
        return self.static[self.offsets[i]: self.offsets[i] + rows]

    def _capture(self, b: int) -> Callable[[], Tensor]:
        eng = self.engine
        bs = eng.block_size
        tokens, positions, slots, ctx = (self._section(i, b) for i in range(4))
        tables = self.static[self.offsets[4]: self.offsets[5]].view(self.max_batch, self.width)
        attn = PagedAttention(eng.cache)
        # Padding rows everywhere while capturing: valid, harmless inputs.
        self.host_np[:] = 0
        self.host_np[self.offsets[2]: self.offsets[3]] = NULL_BLOCK * bs
        self.host_np[self.offsets[3]: self.offsets[4]] = 1
        self.static.copy_(self.host)

        def forward() -> Tensor:
            attn.set_step(StepMetadata(
                slot_blocks=slots // bs, slot_offsets=slots % bs, num_decode=b,
                block_tables=tables[:b], context_lens=ctx[:b]))
            hidden = eng.model.run_layers(eng.model.embed(tokens), positions, attn)
            return eng.model.head(hidden)  # (b, V)

        if not self.capture:
            return forward
        stream = torch.cuda.Stream(device=eng.device)
        stream.wait_stream(torch.cuda.current_stream(eng.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels (Triton compiles, cuBLAS picks) off-graph
                forward()
        torch.cuda.current_stream(eng.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = forward()

        def replay() -> Tensor:
            graph.replay()
            return out

        return replay

    def run(self, toks: list[int], poss: list[int], slots: list[int],
            decodes: list[_Seq]) -> Tensor:
        d = len(toks)
        b = next(x for x in self.buckets if x >= d)
        if b not in self.graphs:
            self.graphs[b] = self._capture(b)
        h, o, w = self.host_np, self.offsets, self.width
        h[o[0]: o[0] + b] = 0
        h[o[0]: o[0] + d] = toks
        h[o[1]: o[1] + b] = 0
        h[o[1]: o[1] + d] = poss
        h[o[2]: o[2] + b] = NULL_BLOCK * self.engine.block_size  # padding writes go there
        h[o[2]: o[2] + d] = slots
        h[o[3]: o[3] + b] = 1
        h[o[3]: o[3] + d] = [s.num_computed for s in decodes]
        tables = h[o[4]: o[5]].reshape(self.max_batch, w)
        tables[:b] = NULL_BLOCK
        _fill_tables(tables[:d], decodes)
        # Only the used prefix of the tables section travels.
        n = o[4] + b * w
        self.static[:n].copy_(self.host[:n], non_blocking=True)
        return self.graphs[b]()[:d]
