"""The sampler of a step: the last stage's logits in, a :class:`StepResult` out.

Draws each sample row's token on the device (:func:`models.sampling.sample`, or a plain
argmax when every row is greedy with nothing to report), computes score rows'
log-probabilities, and reads everything back in **one** host transfer — the step's only
host sync. :meth:`Sampler.launch` queues that work and the copy without waiting
(:class:`LaunchedSample`): the drawn tokens stay on the device for the next step's
inputs, and the host waits only when it asks for the :class:`StepResult`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from models.engine.runner import SamplerInputs
from models.engine.scheduler import Seq, StepPlan, StepResult
from models.grammar import Grammars
from models.sampling import SampleRow, SamplingBatch, sample


def _plain_greedy(seq: Seq, position: int) -> bool:
    """The sequence's next token (its ``position``-th generated) is the plain argmax:
    greedy, no logprobs, no penalties and no banned ids (min_tokens reached)."""
    p = seq.params
    return (p is not None and p.temperature == 0 and p.logprobs is None
            and not p.has_penalties and position >= p.min_tokens and seq.matcher is None)


def needs_known_tokens(seq: Seq) -> bool:
    """Sampling ``seq``'s next token reads its earlier tokens on the host (a grammar's
    state, the penalties' counts): the step that draws its previous token must be
    applied before this step's sampling is launched (its forward need not wait)."""
    p = seq.params
    return seq.matcher is not None or (p is not None and p.has_penalties)


@dataclass
class LaunchedSample:
    """A step's sampling, queued on the device: ``tokens`` (one int64 per sample row, on
    the device) feed the next step's inputs; :meth:`result` waits for the copy to the
    host and unpacks it."""

    plan: StepPlan
    tokens: Tensor | None
    flat: Tensor | None  # the step's one host copy (pinned on CUDA)
    done: torch.cuda.Event | None  # recorded after the copy (CUDA)
    num_top: int | None = None  # top logprobs per sample row; None: no logprobs asked
    _result: StepResult | None = None

    def result(self) -> StepResult:
        """The step's tokens and scores on the host (waits for the device once)."""
        if self._result is None:
            if self.done is not None:
                self.done.synchronize()
            flat = self.flat.tolist() if self.flat is not None else []
            self._result = _unpack(self.plan, flat, self.num_top)
        return self._result


class Sampler:
    """Turns logits into tokens and scores for the rows a plan asks for.

    ``valid_vocab``: ids at or above it are never sampled (rows of a padded embedding);
    ``eos_id``: banned until a row's ``min_tokens``; ``grammars``: fills the token masks
    of grammar-constrained rows (models/grammar.py).
    """

    def __init__(self, *, device: torch.device, valid_vocab: int | None,
                 eos_id: int | None, grammars: Grammars | None = None) -> None:
        self.device = device
        self.valid_vocab = valid_vocab
        self.eos_id = eos_id
        self.grammars = grammars
        self.mask_seconds = 0.0  # host time spent filling grammar masks (benchmarks)
        self.batch_seconds = 0.0  # host time spent packing per-row parameters (benchmarks)

    def __call__(self, logits: Tensor, plan: StepPlan, rows: SamplerInputs) -> StepResult:
        """Sample the step and wait for its result."""
        return self.launch(logits, plan, rows).result()

    def launch(self, logits: Tensor, plan: StepPlan, rows: SamplerInputs) -> LaunchedSample:
        """Queue the step's sampling and its copy to the host; nothing here waits for the
        device (except filling grammar masks, which is host work)."""
        pieces: list[Tensor] = []
        res = None
        want_lp = False
        tokens: Tensor | None = None
        samplers = plan.samples
        lg = logits if rows.sample_rows is None else logits[rows.sample_rows]
        if samplers and all(_plain_greedy(seq, pos) for (seq, _), pos
                            in zip(samplers, plan.sample_positions, strict=True)):
            # Greedy with nothing to report or ban (the benchmark's case): what sample()
            # would return, without packing per-row parameters to the device (a pinned
            # copy and a dozen small kernels per step) or the log-softmax.
            valid = lg.shape[1] if self.valid_vocab is None else min(self.valid_vocab,
                                                                       lg.shape[1])
            tokens = lg[:, :valid].argmax(dim=-1)
            pieces.append(tokens.double())
        elif samplers:
            # Masks of constrained rows, filled on the host while the device still runs
            # the forward that produces ``logits`` (nothing here waits for it). A fork's
            # row (index != seq.index: a sibling sample not yet created) starts at the
            # grammar's start, where its source may no longer be.
            constrained = [(r, seq.matcher if index == seq.index else seq.new_matcher())
                           for r, (seq, index) in enumerate(samplers)
                           if seq.matcher is not None]
            masks = None
            if constrained:
                assert self.grammars is not None
                t0 = time.perf_counter()
                masks = ([r for r, _ in constrained],
                         self.grammars.fill_masks([m for _, m in constrained]))
                self.mask_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            sample_rows = []
            for (seq, index), position in zip(samplers, plan.sample_positions, strict=True):
                params = seq.params
                assert params is not None
                sample_rows.append(SampleRow(
                    params=params, seed=seq.seed,
                    sample_index=index, position=position,
                    output_ids=seq.outputs if params.has_penalties else (),
                    prompt_ids=seq.tokens[: seq.num_prompt]
                    if params.repetition_penalty != 1 else ()))
            batch = SamplingBatch.build(sample_rows, device=self.device,
                                        vocab_size=logits.shape[1],
                                        valid_vocab=self.valid_vocab, eos_id=self.eos_id,
                                        masks=masks)
            self.batch_seconds += time.perf_counter() - t0
            res = sample(lg, batch)
            tokens = res.tokens
            pieces.append(tokens.double())
            want_lp = batch.max_logprobs is not None
            if want_lp:
                assert res.top_ids is not None and res.top_logprobs is not None
                pieces += [res.logprobs.double(), res.top_ids.double().reshape(-1),
                           res.top_logprobs.double().reshape(-1)]
        if plan.scores:
            assert rows.score_rows is not None and rows.score_targets is not None
            srow_logits = logits[rows.score_rows]  # (S, V)
            lp = torch.log_softmax(srow_logits.float(), dim=-1)
            targets = rows.score_targets
            top_lp, top_id = lp.max(dim=-1)  # the most likely token (OpenAI's echo shows it)
            pieces.append(lp.gather(1, targets[:, None])[:, 0].double())
            pieces.append((top_id == targets).double())
            pieces += [top_id.double(), top_lp.double()]
        num_top = None
        if want_lp:
            assert res is not None and res.top_ids is not None
            num_top = int(res.top_ids.shape[1])
        if not pieces:
            return LaunchedSample(plan, tokens, None, None, num_top)
        flat = torch.cat(pieces)
        done = None
        if flat.device.type == "cuda":
            # Into pinned memory without waiting; the event says when it has landed.
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            flat = host
        return LaunchedSample(plan, tokens, flat, done, num_top)


def _unpack(plan: StepPlan, flat: list[float], k: int | None) -> StepResult:
    """A :class:`StepResult` from the flat values :meth:`Sampler.launch` read back
    (``k``: top logprobs per sample row, None when no row asked for logprobs)."""
    out = StepResult()
    off = 0
    m = len(plan.samples)
    if m:
        out.tokens = [int(t) for t in flat[:m]]
        off = m
        if k is not None:
            out.logprobs = flat[off: off + m]
            ids = flat[off + m: off + m + m * k]
            lps = flat[off + m + m * k: off + m + 2 * m * k]
            out.top_ids = [[int(i) for i in ids[r * k: (r + 1) * k]] for r in range(m)]
            out.top_logprobs = [lps[r * k: (r + 1) * k] for r in range(m)]
            off += m + 2 * m * k
    if plan.scores:
        s = len(plan.scores)
        out.score_logprobs = flat[off: off + s]
        out.score_greedy = [g > 0.5 for g in flat[off + s: off + 2 * s]]
        out.score_top = [(int(i), lp) for i, lp in zip(
            flat[off + 2 * s: off + 3 * s], flat[off + 3 * s: off + 4 * s], strict=True)]
    return out
