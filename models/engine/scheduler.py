"""The scheduler: which sequences run each step, with how many tokens, in which blocks.

Plain Python, no torch: it runs (and is tested) on plain data. Every step:

1. :meth:`Scheduler.schedule` decides the step. Running sequences that are generating
   get one token each (decode); then running prefills continue and waiting requests are
   admitted, each taking a chunk of its prompt within the step's token budget
   (``max_batch_tokens``). An admitted sequence first takes every leading full block of
   its tokens already in the prefix cache and prefills only the rest (always at least
   its last token, whose logits it needs). KV blocks are allocated as tokens arrive;
   when none is left the most recently admitted sequence is *preempted* (its blocks
   freed, recomputed later — mostly from the prefix cache), so the engine never runs
   out of memory whatever the workload. While a request of higher priority is in the
   engine (an interactive request during a batch), lower-priority sequences share each
   step with it only up to ``yield_tokens`` tokens: the rest of them pause (keeping
   their blocks) so that its steps run at nearly the speed of an idle engine. Full
   blocks whose tokens are known become findable in the prefix cache as soon as they
   are scheduled — by later steps and by sequences admitted later in the same step
   (each layer writes the step's keys and values before its attention reads any). The
   result is a :class:`StepPlan`.
2. The engine's runner turns the plan into tensors and runs the network; its sampler
   turns the logits into a :class:`StepResult`.
3. :meth:`Scheduler.update` appends the tokens, checks stop conditions, forks the
   ``n`` samples of a prompt whose prefill just ended (they share its blocks; a shared
   partial block is copied on first write), records score rows, frees finished
   sequences and produces their outputs.

A step may be scheduled while the previous one is still running (the one-GPU engine
overlaps its host work with the device): a sequence whose last step drew a token the
host has not seen yet (``Seq.inflight``) decodes that token next, its input read on the
device from the previous step's samples (``StepPlan.decode_sources``). Such a sequence
is not scheduled when the token it waits for ends it anyway (``max_tokens``, the
context) or when it still has samples to fork; one that finishes on a stop condition
only once its token is known wastes one row of the next step, which its update skips.
Aborts and preemptions may come between a step's ``schedule`` and its ``update``.
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from models.engine.block_manager import BlockManager
from models.engine.outputs import PartialSample, RequestOutput, Sample, ScoreResult, Timings
from models.params import Decoder, SamplingParams, StopChecker

# --------------------------------------------------------------------------------------
# Requests and sequences
# --------------------------------------------------------------------------------------

# Request priorities (larger first). Bulk work runs at BATCH; a request someone is
# waiting on (a synchronous API call) at INTERACTIVE: it is admitted at the next step,
# preempting batch sequences if it must, and no batch sequence ever preempts it. While it
# runs, batch work in a step is capped (``yield_tokens``).
BATCH = 0
INTERACTIVE = 1

# Default of ``yield_tokens``. A decode step of the 20B on one H200 is bound by reading
# the weights (~10 ms) up to ~150 tokens; each batch sequence decoding alongside adds its
# KV reads (~0.1 ms at a few hundred tokens of context). Measured with a 2,000-prompt
# batch and an interactive request every ~4 s (bench/results/priority_h200.json): 64
# kept the interactive request at 1.42x its idle latency but cost the batch 10.2%; 96
# gives 1.69x and 6.3%, inside both limits (2x, 10%).
YIELD_TOKENS = 96

# Defaults of a one-GPU engine's step: most sequences decoding together, and most tokens
# in one forward (prefill chunks + decodes). A batch system wants throughput: a decode
# step's GEMMs use the tensor cores best with a few hundred rows (the KV budget usually
# binds first), and prefill chunks of 4,096 tokens cost ~4% less per token than 2,048
# (measured on the 20B on one H200, workload (a): 5,205 vs 5,005 output tok/s; 8,192
# gave no more). Interactive requests are protected from big steps by ``yield_tokens``.
MAX_NUM_SEQS = 512
MAX_BATCH_TOKENS = 4096

# Even waves (see Scheduler.decode_seconds): a queue this many times longer than what
# fits at once is not balanced (its last wave is a small share of its decode steps, and
# sizing the waves would walk a long queue), and the even split must be cheaper than the
# greedy one by this share of its modelled decode time.
WAVE_QUEUE_LIMIT = 8
WAVE_MARGIN = 0.01


class OutputLengths:
    """What share of ``max_tokens`` a request that may stop early ends up generating,
    learnt from the samples that finished: admission projects such a request's final
    size from it instead of from ``max_tokens``.

    Structured output and chat lines usually stop well short of their ``max_tokens``
    (a JSON record of ~40 tokens under a limit of 160), and projecting every line at its
    limit leaves most of the KV cache reserved for tokens never generated: fewer lines
    run at once and each step does less. The projection is a high quantile of recent
    finishes, not their mean, so that few requests outgrow it; one that does takes its
    blocks as it grows and, in a real shortage, the most recently admitted batch
    sequence is preempted (recomputed later) as when the cache is overcommitted.

    Finishes are kept per kind of request — its ``max_tokens`` and whether a grammar
    constrains it — since lines of one batch share those and another batch's lines may
    stop at quite another share. Requests with ``ignore_eos`` always get to
    ``max_tokens``. Until a kind has :data:`MIN_SAMPLES` finishes, an unconstrained
    request is projected at ``max_tokens`` and a constrained one at :data:`PRIOR_CONSTRAINED`
    of it: a grammar's output (a label, a JSON record) usually ends far below the limit
    its caller set. Projected at the limit, the first wave of 1,000 JSON-schema lines
    (86-token prompts, ~44 of 160 tokens generated, an H200's 84k tokens of KV) would be
    ~340 lines where 512 fit; at half the limit it was 482: the 18 left out made the second wave
    larger than ``max_num_seqs``, and its 6 leftovers a third, nearly empty one — 127
    steps on the GPU where lines asking for exactly their length took 107. At a third of
    the limit the first wave is bounded by ``max_num_seqs``, as theirs is
    (``bench.admission_replay``: 111 steps, as for exact lengths). If a kind does run to
    its limit, the overflow is preempted and recomputed until 64 finishes have taught the
    share (the same replay with every line generating all 160 tokens: 176 preemptions,
    2% more modelled device time than projecting at the limit, once per kind).
    """

    WINDOW = 512  # recent finishes kept per kind
    MIN_SAMPLES = 64
    QUANTILE = 0.9
    FLOOR = 0.125  # never project less than this share of max_tokens
    PRIOR_CONSTRAINED = 0.35  # the share of a constrained kind not learnt yet
    KINDS = 64  # kinds remembered (least recently finished forgotten first)

    def __init__(self) -> None:
        self._recent: OrderedDict[tuple[int, bool], deque[float]] = OrderedDict()
        self._shares: dict[tuple[int, bool], float] = {}

    @staticmethod
    def _kind(params: SamplingParams) -> tuple[int, bool]:
        return params.max_tokens, params.constraint is not None

    def observe(self, params: SamplingParams, generated: int) -> None:
        """A sample of a request with ``params`` finished after ``generated`` tokens."""
        if params.ignore_eos:
            return
        kind = self._kind(params)
        recent = self._recent.pop(kind, None)
        if recent is None:
            recent = deque(maxlen=self.WINDOW)
            if len(self._recent) >= self.KINDS:
                self._shares.pop(self._recent.popitem(last=False)[0], None)
        self._recent[kind] = recent
        recent.append(min(1.0, generated / max(1, params.max_tokens)))
        self._shares.pop(kind, None)

    def share(self, params: SamplingParams) -> float:
        """The share of ``max_tokens`` to project for a request with ``params``."""
        if params.ignore_eos:
            return 1.0
        kind = self._kind(params)
        share = self._shares.get(kind)
        if share is None:
            recent = self._recent.get(kind, ())
            if len(recent) < self.MIN_SAMPLES:
                share = self.PRIOR_CONSTRAINED if kind[1] else 1.0
            else:
                ordered = sorted(recent)
                share = max(self.FLOOR,
                            ordered[min(len(ordered) - 1, int(self.QUANTILE * len(ordered)))])
            self._shares[kind] = share
        return share


@dataclass(eq=False)
class Request:
    """What every request has: an id, its input tokens, its sequences."""

    request_id: str
    prompt: list[int]
    timings: Timings
    seqs: list[Seq] = field(default_factory=list)
    done: bool = False
    order: int = 0  # arrival order (preempted sequences go back in this order)
    # Larger runs first: admitted before, and never preempted for, lower priorities.
    priority: int = BATCH


@dataclass(eq=False)
class GenerateRequest(Request):
    """Generate ``params.n`` samples after the prompt."""

    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    pending_fork: int = 0  # samples still to be forked from sample 0 after its prefill
    sibling_demand: int = 0  # blocks each forked sample takes over from sample 0's demand
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    # A structured-output constraint: makes one matcher per sample (models/grammar.py).
    new_matcher: Callable[[], Any] | None = None


@dataclass(eq=False)
class ScoreRequest(Request):
    """Log-likelihood of ``targets`` after the first ``context`` input tokens (prefill
    only: the input is context + continuation less its last token)."""

    context: int = 0
    targets: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    greedy: list[bool] = field(default_factory=list)
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(eq=False)
class Seq:
    """One sequence: a prompt and the tokens one sample generated after it."""

    req: Request
    index: int  # sample index
    tokens: list[int]  # prompt + generated
    num_prompt: int
    checker: StopChecker | None  # None for a score request
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # prefix-cache chain of full blocks
    num_computed: int = 0  # tokens whose K/V are in the cache
    demand: int = 0  # blocks counted against admission while running
    finished: bool = False
    logprobs: list[dict[str, Any]] | None = None
    # The grammar state of a constrained sample (an llguidance matcher): the sampler asks
    # it for the step's token mask, the scheduler feeds it the drawn token.
    matcher: Any = None
    # Tokens drawn by scheduled steps and not yet appended (0 or 1 when scheduling), and
    # the row of the last plan's samples that draws the newest one.
    inflight: int = 0
    sample_row: int = -1
    epoch: int = 0  # preemptions so far: a score row computed before one is stale

    @property
    def outputs(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def params(self) -> SamplingParams | None:
        req = self.req
        return req.params if isinstance(req, GenerateRequest) else None

    def new_matcher(self) -> Any:
        """A fresh grammar matcher for a sample of this sequence's request (None when it
        is unconstrained)."""
        req = self.req
        make = req.new_matcher if isinstance(req, GenerateRequest) else None
        return make() if make is not None else None

    @property
    def seed(self) -> int:
        req = self.req
        return req.seed if isinstance(req, GenerateRequest) else 0

    def max_cached_blocks(self, block_size: int) -> int:
        """Most leading blocks the prefix cache may supply: the logits this sequence
        needs (its last token's; a score's from the context's last token on) must be
        computed."""
        req = self.req
        first_logit = req.context - 1 if isinstance(req, ScoreRequest) else len(self.tokens) - 1
        return first_logit // block_size


# --------------------------------------------------------------------------------------
# The step plan and its result
# --------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """Prefill tokens ``[start, end)`` of a sequence; ``blocks`` is its block table."""

    tokens: list[int]  # the sequence's tokens[start:end]
    start: int
    blocks: list[int]

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass
class StepPlan:
    """One step as plain data. Token rows: decode tokens first (longest context first),
    then prefill chunks, those continuing a sequence before those starting one.

    Valid until the next :meth:`Scheduler.schedule` (block tables are the sequences'
    own lists).
    """

    decode_tokens: list[int] = field(default_factory=list)
    decode_positions: list[int] = field(default_factory=list)  # = context length - 1
    decode_tables: list[list[int]] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write src, dst
    # Rows (of the step's tokens) whose logits are computed, in order; then which of
    # those rows each sample and each score reads.
    logit_rows: list[int] = field(default_factory=list)
    samples: list[tuple[Seq, int]] = field(default_factory=list)  # (seq or fork source, index)
    sample_rows: list[int] = field(default_factory=list)
    # Per sample: tokens the sample generated before the one drawn now (seeds, min_tokens).
    sample_positions: list[int] = field(default_factory=list)
    # Decode rows whose input token an earlier, still running step draws:
    # (decode row, that step's sample row).
    decode_sources: list[tuple[int, int]] = field(default_factory=list)
    forks: list[Seq] = field(default_factory=list)
    scores: list[ScoreRequest] = field(default_factory=list)
    score_rows: list[int] = field(default_factory=list)
    score_targets: list[int] = field(default_factory=list)
    score_epochs: list[int] = field(default_factory=list)  # the seq's epoch per score row
    # Sequences that computed tokens this step (their new full blocks become cached).
    seqs: list[Seq] = field(default_factory=list)

    @property
    def num_decode(self) -> int:
        return len(self.decode_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.decode_tokens) + sum(len(c.tokens) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.decode_tokens and not self.chunks

    @property
    def decode_only(self) -> bool:
        return not self.chunks and bool(self.decode_tokens)


@dataclass
class StepResult:
    """The sampler's answer to a plan, read back from the device in one transfer."""

    tokens: list[int] = field(default_factory=list)  # one per plan.samples row
    logprobs: list[float] | None = None  # per sample row, when any request asked
    top_ids: list[list[int]] | None = None  # per sample row: top alternatives
    top_logprobs: list[list[float]] | None = None
    score_logprobs: list[float] = field(default_factory=list)  # one per plan.scores row
    score_greedy: list[bool] = field(default_factory=list)
    score_top: list[tuple[int, float]] = field(default_factory=list)  # (argmax id, its logprob)


class _NullDecoder:
    """Stands in when the engine has no tokenizer: token ids in, token ids out, no text."""

    def decode(self, ids: Sequence[int]) -> str:
        return ""


# --------------------------------------------------------------------------------------
# The scheduler
# --------------------------------------------------------------------------------------


def _shared_blocks(tokens: list[int], other: list[int], most: int, block_size: int,
                   hint: int = 0) -> int:
    """How many leading full blocks (at most ``most``, at least the first) ``tokens`` and
    ``other`` have in common; they share the first. ``hint``: a count to try first (the
    queue's prompts that share a prefix usually share all of it)."""
    bs = block_size
    if 1 <= hint <= most and tokens[:hint * bs] == other[:hint * bs] and (
            hint == most or tokens[hint * bs:(hint + 1) * bs] != other[hint * bs:(hint + 1) * bs]):
        return hint
    lo, hi = 1, most
    while lo < hi:  # the longest equal prefix, by halving: slices compare at C speed
        mid = (lo + hi + 1) // 2
        n = mid * bs
        if tokens[:n] == other[:n]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Scheduler:
    """Requests, sequences and KV blocks of one engine (or one pipeline micro-batch).

    Args:
        blocks: the block manager (its capacity is this scheduler's KV memory).
        max_position: the model's context length.
        max_num_seqs: most sequences in the running batch.
        max_batch_tokens: most tokens in one step (decode tokens + prefill chunks).
        kv_overcommit: a request is admitted while the running sequences' projected
            final sizes (prompt + max_tokens) add up to at most this many times the
            cache. 1.0 avoids preemption for ``ignore_eos`` workloads; larger values bet
            that requests stop early (EOS) and rely on preemption when they do not.
        watermark: fraction of blocks kept free when admitting (room for decodes).
        decoder: the tokenizer's ``decode`` for stop strings and output text (None: no
            text).
        eos_id: the end-of-text token.
        yield_tokens: while a request of higher priority is in the engine (running or
            waiting), lower-priority sequences get at most this many tokens of each step:
            decodes first (oldest admission first), then prefill chunks; the others
            pause for the step, keeping their blocks. ``None``: no cap (the step's
            budget is shared by priority order only). See :data:`YIELD_TOKENS`.
        estimate_output_lengths: project requests that may stop early (no
            ``ignore_eos``) at the share of ``max_tokens`` such requests have been
            generating (:class:`OutputLengths`) instead of at ``max_tokens``.

    **Even waves.** When more requests are queued than fit at once, admitting greedily
    runs them in waves of as many as fit and a last wave of whatever is left: 512
    prompts of (a) on an H200 decode as 328 sequences, then 184. A decode step's time
    is far from proportional to its rows (its GEMMs read every weight whatever the
    batch, and cuBLAS tiles the rows by 64-256), so the small last wave costs nearly
    what a full one does: two waves of 256 took 31.5 ms a step where 328 and 184 took
    40.2 and 25.0 (the 20B on an H200, a fixed cap of 256 against none). Setting
    :attr:`decode_seconds` (a decode step's seconds by batch size, which the engine
    measures when it captures its decode graphs) turns on even waves: when a wave
    starts in an empty scheduler, the waiting queue's sequences are counted, the waves
    they need are those of the greedy admission (how many fit: the same projected-demand
    rule as admission, prompt blocks shared within the queue counted once), and the wave
    is capped at an even share of the queue if that is cheaper by those timings (by
    :data:`WAVE_MARGIN`). Graphs are timed with empty contexts: the timings see the
    GEMMs' row tiling and the weights' floor, not how attention's cost per row varies
    with the batch, so the rule acts where the GEMMs decide (a last wave near the
    floor) and errs towards greedy waves elsewhere. The cap holds until a sequence of the wave
    finishes or is preempted — workloads whose outputs differ in length then admit
    continuously as before — and never holds back a request that outranks the running
    ones.
    """

    def __init__(self, blocks: BlockManager, *, max_position: int,
                 max_num_seqs: int = MAX_NUM_SEQS,
                 max_batch_tokens: int = MAX_BATCH_TOKENS, kv_overcommit: float = 1.0,
                 watermark: float = 0.01, decoder: Decoder | None = None,
                 eos_id: int | None = None, yield_tokens: int | None = YIELD_TOKENS,
                 estimate_output_lengths: bool = True) -> None:
        if max_batch_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_batch_tokens and max_num_seqs must be >= 1")
        if yield_tokens is not None and yield_tokens < 0:
            raise ValueError(f"yield_tokens: must be >= 0 or None, got {yield_tokens}")
        self.yield_tokens = yield_tokens
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.max_position = max_position
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.kv_overcommit = kv_overcommit
        self.watermark_blocks = int(watermark * blocks.capacity)
        self.decoder: Decoder = decoder if decoder is not None else _NullDecoder()
        self.eos_id = eos_id
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.outputs: list[RequestOutput] = []  # finished, not yet taken
        self.scores: dict[str, ScoreResult] = {}  # finished score requests
        self.demand = 0  # blocks the running sequences will need at their final size
        self.output_lengths = OutputLengths() if estimate_output_lengths else None
        # A decode step's seconds by its batch size (rows); None: admit greedily.
        self.decode_seconds: Callable[[int], float] | None = None
        # The wave being admitted into a scheduler that was empty: its cap (None: none)
        # and the arrival count it was sized for (None: no such wave now).
        self._wave_cap: int | None = None
        self._wave_sized_at: int | None = None
        self._order = 0
        # yield_steps: steps whose lower-priority work was capped by ``yield_tokens``.
        self.stats: dict[str, int] = {"steps": 0, "preemptions": 0, "decode_steps": 0,
                                      "yield_steps": 0}

    # -- requests ------------------------------------------------------------------------

    @property
    def cache_tokens(self) -> int:
        return self.blocks.capacity * self.block_size

    def check_fits(self, tokens: int, what: str) -> None:
        """Raise ``ValueError`` if ``tokens`` could never be in the cache at once."""
        if tokens > self.cache_tokens:
            raise ValueError(f"{what}: {tokens} tokens do not fit in the KV cache "
                             f"({self.cache_tokens} tokens)")

    def add_generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                     seed: int, arrival: float, priority: int = BATCH,
                     new_matcher: Callable[[], Any] | None = None) -> None:
        """Queue a checked generation request (the engine validates it);
        ``new_matcher`` makes each sample's grammar matcher when it is constrained."""
        req = GenerateRequest(request_id, prompt, Timings(arrival), params=params, seed=seed,
                              pending_fork=params.n - 1, priority=priority,
                              new_matcher=new_matcher)
        seq = Seq(req, 0, list(prompt), len(prompt), self._checker(params),
                  matcher=new_matcher() if new_matcher is not None else None)
        req.seqs.append(seq)
        self._enqueue(req, seq)

    def add_score(self, request_id: str, inputs: list[int], context: int,
                  targets: list[int], priority: int = BATCH) -> None:
        """Queue a score request: ``inputs`` = context + continuation less its last token."""
        req = ScoreRequest(request_id, inputs, Timings(time.time()), context=context,
                           targets=targets, priority=priority)
        req.seqs.append(Seq(req, 0, inputs, len(inputs), None))
        self._enqueue(req, req.seqs[0])

    def _checker(self, params: SamplingParams) -> StopChecker:
        return StopChecker(params, self.decoder, eos_id=self.eos_id)

    def _enqueue(self, req: Request, seq: Seq) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id: {req.request_id!r} is already in the engine")
        req.order = self._order
        self._order += 1
        self.requests[req.request_id] = req
        self._wait(seq)

    def _wait(self, seq: Seq) -> None:
        """Put ``seq`` in the waiting queue: by priority, then arrival (preempted
        sequences are older than new ones, so they go first within their priority)."""
        key = _wait_key(seq)
        waiting = self.waiting
        if not waiting or _wait_key(waiting[-1]) <= key:
            waiting.append(seq)  # the common case: same priority, newest
            return
        pos = 0
        while pos < len(waiting) and _wait_key(waiting[pos]) < key:
            pos += 1
        waiting.insert(pos, seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its memory; a generation's output (finish_reason
        "abort") is among the next :meth:`take_outputs`. False if unknown or finished."""
        req = self.requests.get(request_id)
        if req is None or req.done:
            return False
        if isinstance(req, ScoreRequest):  # internal to score(): just drop it
            self._release(req.seqs[0])
            req.done = True
            del self.requests[request_id]
            return True
        assert isinstance(req, GenerateRequest)
        for seq in req.seqs:
            if not seq.finished:
                if seq.checker is not None:
                    seq.checker.finish_abort()
                self._release(seq)
        # Samples never forked still count, as empty aborted samples.
        for _ in range(req.pending_fork):
            sib = Seq(req, len(req.seqs), list(req.prompt), len(req.prompt),
                      self._checker(req.params))
            assert sib.checker is not None
            sib.checker.finish_abort()
            sib.finished = True
            req.seqs.append(sib)
        req.pending_fork = 0
        self._finish_request(req, now=time.time())
        return True

    def take_outputs(self) -> list[RequestOutput]:
        out, self.outputs = self.outputs, []
        return out

    def take_score(self, request_id: str) -> ScoreResult | None:
        return self.scores.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.outputs)

    def num_unfinished(self) -> int:
        return sum(1 for r in self.requests.values() if not r.done)

    def generated_tokens(self) -> dict[str, int]:
        """Tokens generated so far by each unfinished generate request (its samples
        together): what a live throughput figure counts while requests run."""
        return {rid: sum(len(s.tokens) - s.num_prompt for s in r.seqs)
                for rid, r in self.requests.items()
                if not r.done and isinstance(r, GenerateRequest)}

    def partial(self, request_id: str) -> list[PartialSample] | None:
        """A running generate request's progress, per sample; None when it is not
        running here. Samples of ``n`` > 1 not yet forked are absent."""
        req = self.requests.get(request_id)
        if not isinstance(req, GenerateRequest) or req.done:
            return None
        out = []
        for seq in req.seqs:
            assert seq.checker is not None
            out.append(PartialSample(seq.index, seq.checker.stable_text(),
                                     len(seq.checker.token_ids), seq.logprobs))
        return out

    def held_tables(self) -> list[list[int]]:
        """Block tables of every sequence holding blocks (tests check the counts)."""
        return [s.blocks for s in self.running if s.blocks]

    # -- scheduling ----------------------------------------------------------------------

    def top_priority(self) -> int | None:
        """The highest priority of any running or waiting sequence (None: empty)."""
        pris = [q[0].req.priority for q in (self.running, self.waiting) if q]
        return max(pris) if pris else None

    def schedule(self, top_priority: int | None = None) -> StepPlan:
        """Decide the next step (it may be empty: nothing to run). ``top_priority``:
        the highest priority in the whole engine when it has several schedulers (a
        pipeline's micro-batches step one after another, so they yield together);
        default this scheduler's own."""
        bs = self.block_size
        budget = self.max_batch_tokens
        copies: list[tuple[int, int]] = []
        decodes: list[Seq] = []
        prefills: list[tuple[Seq, int]] = []
        now = time.time()
        # 0) a waiting request that outranks running ones gets their room now, and the
        # token budget its first chunk needs is kept from lower-priority prefills.
        top = self._make_room()
        reserve = 0
        if top is not None:
            reserve = min(len(self.waiting[0].tokens), budget // 2)
        # Lower-priority sequences share the step with higher-priority ones up to
        # `low_budget` tokens (a step's time grows with its tokens and their contexts).
        own_top = self.top_priority()
        present = max(p for p in (top_priority, own_top) if p is not None) \
            if own_top is not None else top_priority
        low_budget = budget
        yielding = False
        if self.yield_tokens is not None and present is not None:
            lowest = [q[-1].req.priority for q in (self.running, self.waiting) if q]
            if lowest and min(lowest) < present:
                low_budget = self.yield_tokens
                yielding = True
        # 1) decodes, then continuing prefills, by priority then admission order
        # (`running` is kept in that order). A sequence short of blocks preempts the
        # last sequences of that order not yet scheduled: never one that outranks it.
        scheduled: set[int] = set()
        any_prefill = False
        running = self.running
        for want_decode in (True, False):
            if not want_decode and not any_prefill:
                break  # every running sequence is decoding: skip the second pass
            i = 0
            while i < len(running) and budget > 0:
                seq = running[i]
                need = len(seq.tokens) + seq.inflight - seq.num_computed
                if need <= 0 or (seq.inflight and self._waits_for_inflight(seq)):
                    i += 1  # nothing to compute before its drawn token is known
                    continue
                # A decode extends generated text; a prompt (or score input) with one token
                # left is still a prefill chunk (it may fork samples or score rows).
                is_decode = need == 1 and len(seq.tokens) + seq.inflight > seq.num_prompt
                if is_decode != want_decode:
                    any_prefill = True
                    i += 1
                    continue
                low = present is not None and seq.req.priority < present
                n = min(need, budget, low_budget) if low else min(need, budget)
                if not want_decode and top is not None and seq.req.priority < top:
                    n = min(n, budget - reserve)
                if n <= 0:  # it yields this step (keeping its blocks)
                    i += 1
                    continue
                while True:
                    n_fit = self._grow(seq, n, copies)
                    victim = running[-1]
                    if n_fit > 0 or victim is seq or id(victim) in scheduled:
                        break
                    self._preempt(victim)
                if n_fit == 0:
                    if running[-1] is seq:  # the lowest priority itself: give way
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
                    self._register(seq, seq.num_computed + n_fit)
                budget -= n_fit
                if low:
                    low_budget -= n_fit
                i += 1
        # 2) admit waiting sequences, first come first served.
        limit = self.kv_overcommit * self.blocks.capacity
        blocks = self.blocks
        cap = self._wave() if self.waiting and budget > 0 else None
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            req = seq.req
            low = present is not None and req.priority < present
            if low and low_budget <= 0:
                break
            forks = req.pending_fork if isinstance(req, GenerateRequest) and seq.index == 0 \
                else 0
            if len(running) + 1 + forks > self.max_num_seqs and running:
                break
            if cap is not None and len(running) + 1 + forks > cap and running \
                    and req.priority <= running[-1].req.priority:
                break
            if seq.inflight:
                break  # preempted while its last token was being drawn: next step
            hit, hashes = blocks.lookup(seq.tokens, seq.max_cached_blocks(bs))
            reused = blocks.reusable(hit)
            # Blocks shared with running sequences are already in their demand.
            demand = self._demand_of(seq) - (len(hit) - reused)
            # A request that outranks running ones may overcommit the projection: it
            # takes blocks only as it grows, and a real shortage preempts the lowest
            # priority then (usually never: it is short, and the projection counts
            # every running sequence at its final size).
            if running and self.demand + demand > limit \
                    and req.priority <= running[-1].req.priority:
                break
            start = len(hit) * bs
            n = min(len(seq.tokens) - start, budget, low_budget) if low \
                else min(len(seq.tokens) - start, budget)
            need_blocks = math.ceil(n / bs) + reused
            free = blocks.num_free
            if running and free - need_blocks < self.watermark_blocks:
                break
            if need_blocks > free:  # nothing running: everything is free but the prompt is huge
                n = (free - reused) * bs
                if n <= 0:
                    break
            self.waiting.popleft()
            self._run(seq)
            blocks.acquire(hit)
            blocks.count_query(len(seq.tokens), start)
            seq.blocks, seq.hashes, seq.num_computed = list(hit), hashes, start
            if isinstance(req, GenerateRequest) and req.timings.first_scheduled is None:
                req.cached_tokens = start
            seq.demand = demand
            self.demand += demand
            n = self._grow(seq, n, copies)
            prefills.append((seq, n))
            self._register(seq, start + n)
            budget -= n
            if low:
                low_budget -= n
            if req.timings.first_scheduled is None:
                req.timings.first_scheduled = now
        if yielding and (decodes or prefills):
            self.stats["yield_steps"] += 1
        return self._plan(decodes, prefills, copies)

    def _waits_for_inflight(self, seq: Seq) -> bool:
        """Whether ``seq`` (with a token being drawn) must wait for it: the token ends it
        anyway (max_tokens or the context, or a complete grammar match, whose mask
        allowed only end-of-text), or its prompt's other samples are forked only when it
        is known."""
        req = seq.req
        if not isinstance(req, GenerateRequest):
            return True
        if seq.index == 0 and req.pending_fork:
            return True
        # The matcher has not consumed the token being drawn: it is in the state that
        # token's mask came from. Stopped there, it allowed only EOS.
        if seq.matcher is not None and seq.matcher.is_stopped():
            return True
        known = len(seq.tokens) + seq.inflight
        return known >= self.max_position or known - seq.num_prompt >= req.params.max_tokens

    def _wave(self) -> int | None:
        """The cap on running sequences while a wave is admitted (see the class's "Even
        waves"); sized when a wave starts in an empty scheduler and again when requests
        arrive during it."""
        if self.decode_seconds is None:
            return None
        if not self.running:
            self._wave_sized_at = None  # a new wave
        if self._wave_sized_at != self._order:
            if self._wave_sized_at is None and self.running:
                return None  # admitting continuously: no wave is being admitted
            self._wave_cap = self._even_wave(self.decode_seconds)
            self._wave_sized_at = self._order
        return self._wave_cap

    def _end_wave(self) -> None:
        """A running sequence finished or gave way: admission is continuous again."""
        self._wave_cap = None
        self._wave_sized_at = None

    def _even_wave(self, cost: Callable[[int], float]) -> int | None:
        """An even share of the running and waiting sequences over the waves greedy
        admission needs, if its decode steps are cheaper than the greedy waves' by
        ``cost`` (seconds of a decode step by rows); else None."""
        waiting = self.waiting
        if len(waiting) > WAVE_QUEUE_LIMIT * self.max_num_seqs:
            return None
        fit, forks = self._fits_now()
        total = len(self.running) + len(waiting) + forks
        if fit <= 0 or total <= fit:
            return None
        waves = math.ceil(total / fit)
        even = math.ceil(total / waves)
        greedy = (waves - 1) * cost(fit) + cost(total - (waves - 1) * fit)
        return even if waves * cost(even) < (1 - WAVE_MARGIN) * greedy else None

    def _fits_now(self) -> tuple[int, int]:
        """How many sequences would run at once if the waiting ones were admitted in
        order until the projected demand (or ``max_num_seqs``) stops admission — the
        running ones included — and how many forked samples (n > 1) the waiting requests
        walked add."""
        bs, blocks = self.block_size, self.blocks
        room = self.kv_overcommit * blocks.capacity - self.demand
        slots = self.max_num_seqs - len(self.running)
        # A prompt's first block -> (the first walked prompt starting with it, its
        # full blocks, the blocks the last one sharing it shared).
        owners: dict[tuple[int, ...], tuple[list[int], int, int]] = {}
        fit = forks = 0
        for seq in self.waiting:
            req = seq.req
            extra = req.pending_fork if isinstance(req, GenerateRequest) and seq.index == 0 \
                else 0
            if fit + 1 + extra > slots:
                break
            if isinstance(req, GenerateRequest):
                final = self._projected_final(req, len(seq.tokens) - seq.num_prompt)
                demand = math.ceil(final / bs)
                demand += extra * (demand - len(req.prompt) // bs)
            else:
                demand = math.ceil(len(seq.tokens) / bs)
            # The prompt blocks a waiting sequence shares with the first walked one that
            # starts with the same block are counted once (as admission will find them
            # in the cache; a block cached already costs its first user a free block
            # too). Found by comparing token slices, not by hashing every block: a
            # queue of long shared prompts is walked in a few milliseconds.
            most = seq.max_cached_blocks(bs) if blocks.enable_prefix_caching else 0
            if most:
                tokens = seq.tokens
                first = tuple(tokens[:bs])
                owner = owners.setdefault(first, (tokens, most, 0))
                if owner[0] is not tokens:
                    shared = _shared_blocks(tokens, owner[0], min(most, owner[1]), bs,
                                            owner[2])
                    owners[first] = (owner[0], owner[1], shared)
                    demand -= shared
            if demand > room:
                break
            room -= demand
            fit += 1 + extra
            forks += extra
        return len(self.running) + fit, forks

    def _run(self, seq: Seq) -> None:
        """Add ``seq`` to the running list after every sequence of its priority or
        higher: the end of the list is always the first to give way."""
        running, pri = self.running, seq.req.priority
        pos = len(running)
        while pos and running[pos - 1].req.priority < pri:
            pos -= 1
        running.insert(pos, seq)

    def _admission_fits(self, seq: Seq) -> bool:
        """Whether ``seq``, which outranks running sequences, could be admitted now
        without a prefix-cache hit (the conservative estimate :meth:`_make_room` frees
        room for): a slot and the blocks of its first chunk. Its projected final size
        may overcommit the cache (see :meth:`schedule`): preempting batch work for a
        projection would recompute it for nothing."""
        req = seq.req
        forks = req.pending_fork if isinstance(req, GenerateRequest) and seq.index == 0 \
            else 0
        if len(self.running) + 1 + forks > self.max_num_seqs:
            return False
        chunk = min(len(seq.tokens), self.max_batch_tokens)
        return self.blocks.num_free - math.ceil(chunk / self.block_size) \
            >= self.watermark_blocks

    def _make_room(self) -> int | None:
        """When the first waiting sequence outranks running ones, preempt those (the
        lowest priority, most recently admitted first) until it can be admitted; its
        priority then, else None. A higher-priority request so starts at the next step
        however full the engine is with lower-priority work."""
        if not self.waiting or not self.running:
            return None
        seq = self.waiting[0]
        pri = seq.req.priority
        if self.running[-1].req.priority >= pri:
            return None
        while self.running and self.running[-1].req.priority < pri \
                and not self._admission_fits(seq):
            self._preempt(self.running[-1])
        return pri

    def _plan(self, decodes: list[Seq], prefills: list[tuple[Seq, int]],
              copies: list[tuple[int, int]]) -> StepPlan:
        """The plan of the chosen work; advances each sequence's computed count."""
        plan = StepPlan(copies=copies)
        if not decodes and not prefills:
            return plan
        self.stats["steps"] += 1
        if not prefills:
            self.stats["decode_steps"] += 1
        # Longest contexts first (the decode kernel then finishes with its shortest work),
        # in bands of 256 tokens; within a band, sequences that share their first block (a
        # cached prompt prefix) are adjacent, so the kernel's programs running at the same
        # time read the same prefix blocks, mostly from L2.
        decodes.sort(key=lambda s: (-(s.num_computed >> 8), s.blocks[0]))
        logit_rows, samples, sample_rows = plan.logit_rows, plan.samples, plan.sample_rows
        for r, seq in enumerate(decodes):
            p = seq.num_computed
            if p < len(seq.tokens):
                plan.decode_tokens.append(seq.tokens[p])
            else:  # the token a running step draws: read on the device
                plan.decode_tokens.append(0)
                plan.decode_sources.append((r, seq.sample_row))
            plan.decode_positions.append(p)
            plan.decode_tables.append(seq.blocks)
            sample_rows.append(r)
            logit_rows.append(r)
            samples.append((seq, seq.index))
            seq.num_computed = p + 1
        # The scheduler lists continuing chunks (running sequences) before starting ones
        # (admissions without a cache hit); a cache hit makes an admission continue.
        prefills.sort(key=lambda sn: sn[0].num_computed == 0)
        row = len(decodes)
        for seq, n in prefills:
            start, end = seq.num_computed, seq.num_computed + n
            plan.chunks.append(Chunk(seq.tokens[start:end], start, seq.blocks))
            req = seq.req
            if isinstance(req, ScoreRequest):
                # Logits at positions context-1 .. len-1 predict the continuation tokens.
                first = max(start, req.context - 1)
                for p in range(first, end):
                    plan.scores.append(req)
                    plan.score_epochs.append(seq.epoch)
                    plan.score_targets.append(req.targets[p - (req.context - 1)])
                    plan.score_rows.append(len(logit_rows))
                    logit_rows.append(row + p - start)
            elif end == len(seq.tokens):
                assert isinstance(req, GenerateRequest)
                # The chunk completes the sequence's context: sample its next token.
                sample_rows.append(len(logit_rows))
                samples.append((seq, seq.index))
                if seq.index == 0 and req.pending_fork and len(seq.tokens) == seq.num_prompt:
                    # n > 1: the other samples draw their first token from the same row.
                    for k in range(req.pending_fork):
                        samples.append((seq, len(req.seqs) + k))
                        sample_rows.append(len(logit_rows))
                    plan.forks.append(seq)
                logit_rows.append(row + n - 1)
            row += n
            seq.num_computed = end
        plan.seqs = decodes + [s for s, _ in prefills]
        for seq in plan.seqs:
            self._register(seq)
        for r, (seq, index) in enumerate(samples):
            if index == seq.index:
                plan.sample_positions.append(len(seq.tokens) - seq.num_prompt + seq.inflight)
                seq.inflight += 1
                seq.sample_row = r
            else:  # a sibling's first token
                plan.sample_positions.append(0)
        return plan

    def _register(self, seq: Seq, computed: int | None = None) -> None:
        """Make ``seq``'s full blocks findable in the prefix cache as soon as they are
        scheduled and their tokens known (``computed``: its count once the step being
        planned has run). A later step that reuses them is queued on the device after
        the one computing them; a sequence admitted later in the *same* step may reuse
        them too, because every layer writes the whole step's keys and values into the
        cache before any of its attention reads it — so prompts that arrive together
        compute a shared prefix once, not once each."""
        if computed is None:
            computed = seq.num_computed
        computed = min(computed, len(seq.tokens))
        if seq.blocks and computed // self.block_size > len(seq.hashes):
            self.blocks.register(seq.tokens, seq.blocks, seq.hashes, computed)

    def _demand_of(self, seq: Seq) -> int:
        req, bs = seq.req, self.block_size
        if not isinstance(req, GenerateRequest):
            return math.ceil(len(seq.tokens) / bs)
        final = self._projected_final(req, len(seq.tokens) - seq.num_prompt)
        d = math.ceil(final / bs)
        if seq.index == 0 and req.pending_fork:
            # Kept on the request: the siblings take exactly this over when forked, even
            # if the projection has moved by then.
            req.sibling_demand = d - len(req.prompt) // bs
            d += req.pending_fork * req.sibling_demand
        return d

    def _projected_final(self, req: GenerateRequest, generated: int) -> int:
        """A sample's projected final size (prompt + output), see :class:`OutputLengths`."""
        params = req.params
        out = params.max_tokens
        if self.output_lengths is not None and not params.ignore_eos:
            out = min(out, max(generated + self.block_size,
                               math.ceil(self.output_lengths.share(params) * out)))
        return min(len(req.prompt) + out, self.max_position)

    def _grow(self, seq: Seq, n: int, copies: list[tuple[int, int]]) -> int:
        """Give ``seq`` the blocks for its next ``n`` tokens, or as many as fit (a prefill
        chunk may shrink; copy-on-write of a shared last block included). Returns the
        number of tokens that fit."""
        bs, blocks = self.block_size, self.blocks
        start = seq.num_computed
        # Copy-on-write: the first new token lands in a block shared with a sibling.
        if start % bs and blocks.refs(seq.blocks[start // bs]) > 1:
            if blocks.num_free == 0:
                return 0
            src = seq.blocks[start // bs]
            dst = blocks.allocate()
            blocks.free(src)
            seq.blocks[start // bs] = dst
            copies.append((src, dst))
        have = len(seq.blocks) * bs - start
        if have < n:
            extra = min(math.ceil((n - have) / bs), blocks.num_free)
            for _ in range(extra):
                seq.blocks.append(blocks.allocate())
            have += extra * bs
        return min(n, have)

    def _preempt(self, seq: Seq) -> None:
        """Free a running sequence's blocks; it goes back to the waiting queue (in
        arrival order) and is recomputed from its tokens when readmitted."""
        self.running.remove(seq)
        self._end_wave()
        self.blocks.free_all(seq.blocks)
        seq.blocks = []
        seq.hashes = []
        seq.num_computed = 0
        self.demand -= seq.demand
        seq.demand = 0
        seq.epoch += 1
        self.stats["preemptions"] += 1
        req = seq.req
        if isinstance(req, ScoreRequest):  # recomputes its rows from the start
            req.logprobs.clear()
            req.greedy.clear()
            req.top.clear()
        self._wait(seq)

    def _release(self, seq: Seq) -> None:
        """A sequence is done (finished or aborted): free its blocks, drop it."""
        seq.finished = True
        if seq.blocks:
            self.blocks.free_all(seq.blocks)
            seq.blocks = []
        if seq in self.running:
            self.running.remove(seq)
            self._end_wave()
            self.demand -= seq.demand
            seq.demand = 0
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass

    # -- after the step ------------------------------------------------------------------

    def update(self, plan: StepPlan, result: StepResult) -> None:
        """Apply a step's sampled tokens and score rows to the sequences."""
        now = time.time()
        if plan.samples:
            for seq, index in plan.samples:
                if index == seq.index:
                    seq.inflight -= 1
            # Fork new siblings first: sample 0 may finish on this very token. Rows of
            # requests aborted (or samples finished) since the plan are dropped.
            seqs = [None if seq.req.done or (index == seq.index and seq.finished)
                    else self._fork(seq, index) if index != seq.index else seq
                    for seq, index in plan.samples]
            for src in plan.forks:
                src_req = src.req
                assert isinstance(src_req, GenerateRequest)
                src_req.pending_fork = 0
            lps, top_ids, top_lps = result.logprobs, result.top_ids, result.top_logprobs
            for r, seq in enumerate(seqs):
                if seq is None:
                    continue
                tok = result.tokens[r]
                params = seq.params
                assert params is not None
                k = params.logprobs
                if lps is not None and k is not None:
                    assert top_ids is not None and top_lps is not None
                    if seq.logprobs is None:
                        seq.logprobs = []
                    seq.logprobs.append({
                        "token_id": tok, "logprob": lps[r],
                        "top": [[top_ids[r][j], top_lps[r][j]] for j in range(k)],
                    })
                self._append_token(seq, tok, now)
        if plan.scores:
            tops = result.score_top or [(-1, math.nan)] * len(plan.scores)
            for req, epoch, lp, g, top in zip(plan.scores, plan.score_epochs,
                                              result.score_logprobs, result.score_greedy,
                                              tops, strict=True):
                if req.done or epoch != req.seqs[0].epoch:
                    continue  # aborted, or preempted since: its rows are recomputed
                req.logprobs.append(lp)
                req.greedy.append(g)
                req.top.append(top)
            for req in {id(r): r for r in plan.scores}.values():
                seq = req.seqs[0]
                if not req.done and len(req.logprobs) == len(req.targets):
                    self._release(seq)
                    self.scores[req.request_id] = ScoreResult(
                        logprob=math.fsum(req.logprobs), is_greedy=all(req.greedy),
                        token_logprobs=list(req.logprobs), top=list(req.top))
                    req.done = True
                    req.timings.finished = now
                    del self.requests[req.request_id]

    def _fork(self, src: Seq, index: int) -> Seq:
        """A sibling sample sharing ``src``'s prompt blocks (reference counted)."""
        req = src.req
        assert isinstance(req, GenerateRequest)
        sib = Seq(req, index, list(src.tokens[: src.num_prompt]), src.num_prompt,
                  self._checker(req.params),
                  matcher=req.new_matcher() if req.new_matcher is not None else None)
        req.seqs.append(sib)
        if not src.blocks:
            # The source was preempted while its first token was drawn: the sibling waits
            # too, and recomputes its prompt (mostly from the prefix cache) when admitted.
            self._wait(sib)
            return sib
        sib.blocks = self.blocks.fork(src.blocks[: math.ceil(src.num_prompt / self.block_size)])
        sib.hashes = src.hashes[: src.num_prompt // self.block_size]
        sib.num_computed = src.num_prompt
        # Sample 0 was admitted with its siblings' growth in its demand; hand it over.
        share = min(req.sibling_demand, src.demand)
        src.demand -= share
        sib.demand = share
        self._run(sib)
        return sib

    def _append_token(self, seq: Seq, tok: int, now: float) -> None:
        req = seq.req
        if req.timings.first_token is None:
            req.timings.first_token = now
        seq.tokens.append(tok)
        assert seq.checker is not None
        if seq.matcher is not None and not seq.matcher.consume_token(tok):
            # Cannot happen when the token came from the matcher's own mask; if it does,
            # the output is not a match and must not be reported as a complete one.
            self._release(seq)
            seq.checker.finish_abort()
            assert isinstance(req, GenerateRequest)
            if req.pending_fork == 0 and all(s.finished for s in req.seqs):
                self._finish_request(req, now=now)
            return
        reason = seq.checker.append(tok)
        if reason is None and len(seq.tokens) >= self.max_position:
            reason = seq.checker.finish_length()
        if reason is not None:
            self._release(seq)
            assert isinstance(req, GenerateRequest)
            if self.output_lengths is not None:
                self.output_lengths.observe(req.params, len(seq.tokens) - seq.num_prompt)
            if req.pending_fork == 0 and all(s.finished for s in req.seqs):
                self._finish_request(req, now=now)

    def _finish_request(self, req: GenerateRequest, now: float) -> None:
        req.done = True
        req.timings.finished = now
        samples = []
        for s in sorted(req.seqs, key=lambda s: s.index):
            c = s.checker
            assert c is not None
            samples.append(Sample(index=s.index, text=c.text, token_ids=list(c.token_ids),
                                  finish_reason=c.finish_reason, logprobs=s.logprobs,
                                  stop_reason=c.stop_reason))
        self.outputs.append(RequestOutput(req.request_id, len(req.prompt), samples,
                                          req.timings, None, cached_tokens=req.cached_tokens))
        del self.requests[req.request_id]


def _wait_key(seq: Seq) -> tuple[int, int, int]:
    return (-seq.req.priority, seq.req.order, seq.index)


def new_seed(rng: random.Random) -> int:
    """A request seed for a request that gives none (one stream per engine)."""
    return rng.getrandbits(63)
