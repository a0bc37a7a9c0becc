"""The scheduler and the block manager alone, on plain data (no torch, no model).

A step's "model" here is a random number generator: the scheduler cannot tell, which is
the point — block accounting, preemption, forks, aborts and the prefix cache are tested
over many thousands of steps in a second.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from models.engine.block_manager import NULL_BLOCK, BlockManager
from models.engine.scheduler import BATCH, INTERACTIVE, Scheduler, StepPlan, StepResult
from models.params import SamplingParams

ROOT = Path(__file__).resolve().parents[2]


def test_scheduler_imports_no_torch() -> None:
    code = ("import sys, models.engine.scheduler, models.engine.block_manager, "
            "models.engine.outputs, models.params; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---------------------------------------------------------------------------------------
# Block manager
# ---------------------------------------------------------------------------------------


def _filled(bm: BlockManager, tokens: list[int]) -> list[int]:
    """Allocate and register blocks for ``tokens`` as a computed sequence would."""
    blocks = [bm.allocate() for _ in range(-(-len(tokens) // bm.block_size))]
    bm.register(tokens, blocks, [], len(tokens))
    return blocks


def test_prefix_lookup_reuse_and_lru_eviction() -> None:
    bm = BlockManager(9, 4)  # 8 usable blocks of 4 tokens
    a = list(range(10, 22))  # 3 full blocks
    blocks_a = _filled(bm, a)
    assert bm.num_cached == 3
    # A prompt sharing 2 blocks then diverging finds exactly those 2.
    hit, hashes = bm.lookup(a[:8] + [99, 98, 97, 96, 1], max_blocks=10)
    assert hit == blocks_a[:2] and len(hashes) == 2
    # Same tokens after a different first block: no hit (the hash is chained).
    assert bm.lookup([0, 0, 0, 0] + a[4:8], max_blocks=2)[0] == []
    # Freed cached blocks stay findable and count as free.
    bm.free_all(blocks_a)
    assert bm.num_free == bm.capacity and bm.num_cached == 3
    assert bm.reusable(blocks_a) == 3
    bm.acquire(blocks_a[:2])
    assert bm.refs(blocks_a[0]) == 1 and bm.num_free == bm.capacity - 2
    bm.free_all(blocks_a[:2])
    # Never-used blocks go first; then cached ones, least recently freed first: the
    # tail block (freed first by free_all) before the prefix.
    got = [bm.allocate() for _ in range(5)]
    assert set(got).isdisjoint(blocks_a) and bm.num_cached == 3
    assert bm.allocate() == blocks_a[2] and bm.num_cached == 2
    assert bm.lookup(a, max_blocks=3)[0] == blocks_a[:2]  # the evicted tail is gone
    bm.check([got + [blocks_a[2]]])


def test_lookup_respects_max_blocks_and_disabled_cache() -> None:
    bm = BlockManager(20, 4)
    tokens = list(range(100, 116))  # 4 full blocks
    _filled(bm, tokens)
    assert len(bm.lookup(tokens, max_blocks=(len(tokens) - 1) // 4)[0]) == 3
    off = BlockManager(20, 4, enable_prefix_caching=False)
    blocks = _filled(off, tokens)
    assert off.num_cached == 0 and off.lookup(tokens, 4) == ([], [])
    off.free_all(blocks)
    assert off.num_free == off.capacity


def test_salt_separates_caches() -> None:
    one, two = BlockManager(10, 4, salt=1), BlockManager(10, 4, salt=2)
    tokens = [5, 6, 7, 8, 9]
    _filled(one, tokens)
    assert one.lookup(tokens, 1)[1] != two.lookup(tokens, 1)[1] or not two.lookup(tokens, 1)[0]


def test_null_block_is_never_handed_out() -> None:
    bm = BlockManager(5, 2)
    got = [bm.allocate() for _ in range(4)]
    assert NULL_BLOCK not in got
    with pytest.raises(RuntimeError, match="no free block"):
        bm.allocate()


# ---------------------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------------------


def _result(plan: StepPlan, rng: random.Random, vocab: int) -> StepResult:
    return StepResult(tokens=[rng.randrange(vocab) for _ in plan.samples],
                      score_logprobs=[-1.0] * len(plan.scores),
                      score_greedy=[True] * len(plan.scores))


def test_cache_hit_capped_at_prompt_length_minus_one() -> None:
    sched = Scheduler(BlockManager(40, 4), max_position=64, max_batch_tokens=64)
    prompt = list(range(1, 17))  # exactly 4 full blocks
    greedy = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    sched.add_generate("a", prompt, greedy, 0, 0.0)
    plan = sched.schedule()
    assert [len(c.tokens) for c in plan.chunks] == [16]
    sched.update(plan, _result(plan, random.Random(0), 50))
    sched.add_generate("b", prompt, greedy, 0, 0.0)
    plan = sched.schedule()
    # "a" decodes; "b" found 3 blocks and recomputes the last 4 tokens (it needs the
    # last one's logits), as a continuing chunk.
    assert plan.num_decode == 1
    assert [(c.start, len(c.tokens)) for c in plan.chunks] == [(12, 4)]
    assert sched.blocks.hit_tokens == 12 and sched.blocks.query_tokens == 32
    # A score whose continuation starts inside the cached prefix recomputes from there.
    sched.add_score("s", prompt[:15], context=6, targets=prompt[6:16])
    plan = sched.schedule()
    chunk = plan.chunks[-1]
    assert chunk.start == 4 and len(plan.scores) == 10  # (6 - 1) // 4 = 1 block reused


@pytest.mark.parametrize("caching", [True, False])
def test_random_steps_never_leak_a_block(caching: bool) -> None:
    """10,000 random steps of adds (prompts sharing prefixes, n > 1, scores), aborts,
    finishes (stop tokens) and preemptions (an overcommitted small cache): after every
    step the reference counts equal the block tables; at the end every block is free."""
    rng = random.Random(1234 if caching else 4321)
    bs, vocab = 4, 40
    bm = BlockManager(33, bs, enable_prefix_caching=caching)
    sched = Scheduler(bm, max_position=96, max_num_seqs=8, max_batch_tokens=24,
                      kv_overcommit=3.0, watermark=0.0)
    prefixes = [[rng.randrange(2, vocab) for _ in range(rng.randint(1, 40))] for _ in range(5)]
    live: set[str] = set()
    finished = scores = 0
    n_req = 0
    for _ in range(10_000):
        if rng.random() < 0.3 and len(live) < 12:
            rid = f"r{n_req}"
            n_req += 1
            prompt = rng.choice(prefixes)[: rng.randint(1, 40)] + [
                rng.randrange(2, vocab) for _ in range(rng.randint(0, 12))]
            if not prompt:
                prompt = [3]
            if rng.random() < 0.15 and len(prompt) > 1:
                ctx = rng.randint(1, len(prompt) - 1)
                sched.add_score(rid, prompt, ctx, prompt[ctx:] + [1])
            else:
                params = SamplingParams(
                    temperature=1.0, max_tokens=rng.randint(1, 30), n=rng.choice([1, 1, 2, 3]),
                    stop_token_ids=[0], seed=n_req)
                sched.add_generate(rid, prompt, params, n_req, 0.0)
            live.add(rid)
        if live and rng.random() < 0.05:
            sched.abort(rng.choice(sorted(live)))
        plan = sched.schedule()
        if not plan.is_empty:
            assert plan.num_tokens <= sched.max_batch_tokens
            sched.update(plan, _result(plan, rng, vocab))
        bm.check(sched.held_tables())
        for out in sched.take_outputs():
            live.discard(out.request_id)
            finished += 1
        for rid in list(live):
            if sched.take_score(rid) is not None:
                live.discard(rid)
                scores += 1
        live &= set(sched.requests)
    for rid in list(sched.requests):
        sched.abort(rid)
    sched.take_outputs()
    bm.check([])
    assert bm.num_free == bm.capacity and not sched.running and not sched.waiting
    assert sched.demand == 0
    assert sched.stats["preemptions"] > 50 and finished > 500 and scores > 50
    if caching:
        assert bm.hit_tokens > 1000
    else:
        assert bm.hit_tokens == 0


# ---------------------------------------------------------------------------------------
# Priority: interactive requests beat batch work
# ---------------------------------------------------------------------------------------


def _batch_params(max_tokens: int = 40) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)


def test_interactive_is_admitted_next_step_in_a_full_engine() -> None:
    """Every slot taken by batch sequences: the interactive request starts at the next
    step (the most recently admitted batch sequence gives way), ahead of batch requests
    that were waiting before it."""
    rng = random.Random(0)
    sched = Scheduler(BlockManager(200, 4), max_position=128, max_num_seqs=4,
                      max_batch_tokens=64, watermark=0.0)
    for i in range(6):
        sched.add_generate(f"b{i}", [2 + i] * 8, _batch_params(), i, 0.0)
    for _ in range(3):
        sched.update(plan := sched.schedule(), _result(plan, rng, 50))
    assert len(sched.running) == 4 and len(sched.waiting) == 2
    sched.add_generate("i", [9] * 8, _batch_params(8), 99, 0.0, priority=INTERACTIVE)
    plan = sched.schedule()
    started = [c.tokens for c in plan.chunks]
    assert [9] * 8 in started
    assert sched.running[0].req.request_id == "i"
    assert sched.stats["preemptions"] == 1
    # The preempted batch sequence waits ahead of later batch arrivals.
    assert [s.req.request_id for s in sched.waiting] == ["b3", "b4", "b5"]


def test_interactive_waits_ahead_of_batch_and_is_never_preempted_for_it() -> None:
    """A tiny, overcommitted cache full of batch work: interactive requests come and go;
    none is ever preempted (its computed tokens never go back), each starts within one
    step of arriving, and the batch still finishes."""
    rng = random.Random(7)
    bm = BlockManager(24, 4)
    sched = Scheduler(bm, max_position=96, max_num_seqs=6, max_batch_tokens=32,
                      kv_overcommit=3.0, watermark=0.0)
    for i in range(30):
        sched.add_generate(f"b{i}", [rng.randrange(2, 40) for _ in range(10)],
                           _batch_params(rng.randint(5, 30)), i, 0.0)
    seen: dict[str, int] = {}  # interactive id -> most tokens computed so far
    arrived: dict[str, int] = {}
    done_batch = done_inter = 0
    for step in range(10_000):
        if step < 2500 and step % 7 == 0 and sum(1 for r in seen if r in sched.requests) < 2:
            rid = f"i{step}"
            sched.add_generate(rid, [rng.randrange(2, 40) for _ in range(6)],
                               _batch_params(8), step, 0.0, priority=INTERACTIVE)
            seen[rid] = 0
            arrived[rid] = step
        plan = sched.schedule()
        for rid in list(seen):
            req = sched.requests.get(rid)
            if req is None:
                continue
            if step - arrived[rid] >= 1:
                assert req.timings.first_scheduled is not None, f"{rid} not started"
            for seq in req.seqs:
                assert seq.num_computed >= seen[rid] or seq.index > 0, f"{rid} preempted"
                seen[rid] = max(seen[rid], seq.num_computed) if seq.index == 0 else seen[rid]
        if plan.is_empty:
            break
        sched.update(plan, _result(plan, rng, 50))
        bm.check(sched.held_tables())
        for out in sched.take_outputs():
            if out.request_id.startswith("i"):
                done_inter += 1
                assert all(s.finish_reason == "length" for s in out.samples)
            else:
                done_batch += 1
    assert done_batch == 30 and done_inter == len(seen) > 50
    assert sched.stats["preemptions"] > 0


def test_batch_prefill_leaves_budget_for_a_waiting_interactive_prompt() -> None:
    """A long batch prompt mid-prefill does not take the whole token budget while an
    interactive prompt waits."""
    sched = Scheduler(BlockManager(400, 4), max_position=1024, max_num_seqs=8,
                      max_batch_tokens=64, watermark=0.0)
    sched.add_generate("b", list(range(2, 302)), _batch_params(4), 0, 0.0)
    sched.update(plan := sched.schedule(), _result(plan, random.Random(0), 50))
    sched.add_generate("i", [5] * 20, _batch_params(4), 1, 0.0, priority=INTERACTIVE)
    plan = sched.schedule()
    # The interactive prompt whole, the batch prompt's next chunk in what is left.
    assert [(c.start, c.tokens[:1], len(c.tokens)) for c in plan.chunks] == [
        (64, [66], 44), (0, [5], 20)]


def _batch_tokens(plan: StepPlan) -> int:
    """Tokens of batch-priority sequences in a plan (decodes, then chunks in order)."""
    d = plan.num_decode
    dec = sum(1 for s in plan.seqs[:d] if s.req.priority == BATCH)
    pre = sum(len(c.tokens) for s, c in zip(plan.seqs[d:], plan.chunks, strict=True)
              if s.req.priority == BATCH)
    return dec + pre


def _interactive_during_batch(
    yield_tokens: int | None,
) -> tuple[int, list[int], Scheduler, list[int]]:
    """40 batch sequences decoding, then a 100-token interactive prompt: the steps it
    took to finish, the batch tokens of each of those steps, the scheduler, and the
    batch sequences' lengths when it arrived."""
    rng = random.Random(3)
    sched = Scheduler(BlockManager(2000, 4), max_position=512, max_num_seqs=64,
                      max_batch_tokens=64, watermark=0.0, yield_tokens=yield_tokens)
    for i in range(40):
        sched.add_generate(f"b{i}", [2 + i % 30] * 8, _batch_params(120), i, 0.0)
    while sched.waiting or any(s.num_computed < len(s.tokens) - 1 for s in sched.running):
        sched.update(plan := sched.schedule(), _result(plan, rng, 50))
    before = [len(s.tokens) for s in sched.running]
    sched.add_generate("i", [45] * 100, _batch_params(10), 99, 0.0, priority=INTERACTIVE)
    batch_tokens: list[int] = []
    steps = 0
    while "i" in sched.requests:
        plan = sched.schedule()
        batch_tokens.append(_batch_tokens(plan))
        sched.update(plan, _result(plan, rng, 50))
        steps += 1
    assert [o.request_id for o in sched.take_outputs()] == ["i"]
    return steps, batch_tokens, sched, before


def test_batch_work_is_capped_while_an_interactive_request_runs() -> None:
    """While an interactive request is in the engine, batch sequences get at most
    ``yield_tokens`` tokens of each step (the oldest decode, the others pause without
    losing their blocks); the interactive prompt so gets the rest of the budget and
    finishes in fewer steps than with the budget shared by priority order alone. Once
    it is done, the whole batch decodes again and finishes."""
    capped_steps, capped, sched, before = _interactive_during_batch(yield_tokens=8)
    free_steps, shared, _, _ = _interactive_during_batch(yield_tokens=None)
    assert max(capped) <= 8 and min(capped) == 8
    assert min(shared) >= 24  # without the cap every batch sequence decodes each step
    # 100 prompt tokens in chunks of 64 - 8 instead of 64 - 40, then 9 decode steps.
    assert capped_steps == 2 + 9 < free_steps == 5 + 9
    assert sched.stats["preemptions"] == 0 and sched.stats["yield_steps"] == capped_steps
    # The oldest batch sequences decoded through the interactive request's steps; the
    # newest paused, keeping their blocks and their place.
    progress = [len(s.tokens) - b for s, b in zip(sched.running, before, strict=True)]
    assert progress == [capped_steps] * 8 + [0] * 32
    plan = sched.schedule()
    assert plan.num_decode == 40 and _batch_tokens(plan) == 40
    rng = random.Random(5)
    sched.update(plan, _result(plan, rng, 50))
    finished = []
    while sched.has_unfinished():
        sched.update(plan := sched.schedule(), _result(plan, rng, 50))
        finished += sched.take_outputs()
    assert len(finished) == 40 and all(len(o.samples[0].token_ids) == 120 for o in finished)


def test_interactive_overcommits_the_projection_instead_of_preempting() -> None:
    """Batch admission has projected the cache full (every sequence at its final size),
    yet most blocks are free: an interactive request starts at the next step without
    preempting anything, and every request finishes."""
    rng = random.Random(11)
    bm = BlockManager(101, 4)
    sched = Scheduler(bm, max_position=128, max_num_seqs=32, max_batch_tokens=128,
                      watermark=0.0)
    for i in range(12):
        sched.add_generate(f"b{i}", [3 + i] * 8, _batch_params(32), i, 0.0)
    sched.update(plan := sched.schedule(), _result(plan, rng, 50))
    assert len(sched.running) == 10 and sched.demand == bm.capacity  # 10 x 40 tokens
    sched.add_generate("i", [45] * 8, _batch_params(8), 99, 0.0, priority=INTERACTIVE)
    plan = sched.schedule()
    assert [45] * 8 in [c.tokens for c in plan.chunks]
    assert sched.stats["preemptions"] == 0
    sched.update(plan, _result(plan, rng, 50))
    done = []
    while sched.has_unfinished():
        sched.update(plan := sched.schedule(), _result(plan, rng, 50))
        bm.check(sched.held_tables())
        done += [o.request_id for o in sched.take_outputs()]
    assert sorted(done) == sorted([f"b{i}" for i in range(12)] + ["i"])
    assert sched.stats["preemptions"] == 0


# ---------------------------------------------------------------------------------------
# Admission projects early-stopping requests at what such requests generate
# ---------------------------------------------------------------------------------------


def test_output_lengths_is_a_high_quantile_of_recent_finishes_per_kind() -> None:
    from models.engine.scheduler import OutputLengths

    est = OutputLengths()
    p100 = SamplingParams(max_tokens=100)
    for _ in range(OutputLengths.MIN_SAMPLES - 1):
        est.observe(p100, 10)
    assert est.share(p100) == 1.0  # too few finishes to go by
    est.observe(p100, 10)
    assert est.share(p100) == max(0.1, OutputLengths.FLOOR)
    for i in range(OutputLengths.WINDOW):
        est.observe(p100, 20 + i % 50)  # shares 0.20 .. 0.69, evenly
    assert 0.6 <= est.share(p100) <= 0.69  # its 90th percentile, the old finishes forgotten
    # Other kinds learn on their own: another max_tokens, a grammar, ignore_eos.
    p50 = SamplingParams(max_tokens=50)
    assert est.share(p50) == 1.0
    # A grammar's kind not learnt yet: projected at the constrained prior.
    ab = SamplingParams(max_tokens=100, regex="[ab]+")
    assert est.share(ab) == OutputLengths.PRIOR_CONSTRAINED < 1.0
    for _ in range(OutputLengths.MIN_SAMPLES):
        est.observe(ab, 100)
    assert est.share(ab) == 1.0  # learnt: these run to their limit
    assert est.share(SamplingParams(max_tokens=100, ignore_eos=True)) == 1.0
    for _ in range(OutputLengths.WINDOW):
        est.observe(p100, 150)  # past max_tokens (cannot be): counted as all of it
    assert est.share(p100) == 1.0
    # Kinds beyond the bound: the least recently finished is forgotten.
    for _ in range(OutputLengths.WINDOW):
        est.observe(p100, 10)
    assert est.share(p100) == max(0.1, OutputLengths.FLOOR)
    for k in range(OutputLengths.KINDS):
        for _ in range(OutputLengths.MIN_SAMPLES):
            est.observe(SamplingParams(max_tokens=1000 + k), 1)
    assert est.share(SamplingParams(max_tokens=1000 + OutputLengths.KINDS - 1)) < 1.0
    assert est.share(p100) == 1.0


def _stop_after(plan: StepPlan, lengths: dict[str, int]) -> StepResult:
    """A fake model: each sample draws token 5, then the stop token 0 once it has
    generated its request's length in ``lengths``."""
    toks = []
    for seq, _ in plan.samples:
        generated = len(seq.tokens) - seq.num_prompt
        toks.append(0 if generated + 1 >= lengths[seq.req.request_id] else 5)
    return StepResult(tokens=toks)


def _run_early_stoppers(estimate: bool, lengths: dict[str, int],
                        max_tokens: int | None = 48, regex: str | None = None,
                        ignore_eos: bool = False) -> tuple[Scheduler, int, int]:
    """Requests of 16-token prompts and ``max_tokens`` (None: each its own length),
    stopping after their length: the scheduler, its peak running count and the finished
    count. ``regex`` marks them constrained (the fake model ignores it)."""
    bm = BlockManager(101, 4)  # 400 tokens: 6 requests at their full projection
    sched = Scheduler(bm, max_position=256, max_num_seqs=64, max_batch_tokens=256,
                      watermark=0.0, estimate_output_lengths=estimate, eos_id=0)
    for i, rid in enumerate(lengths):
        # A constrained output ends at EOS (token 0 here) when its grammar is complete.
        params = SamplingParams(temperature=1.0, stop_token_ids=[] if regex else [0],
                                regex=regex,
                                max_tokens=lengths[rid] if max_tokens is None else max_tokens,
                                ignore_eos=ignore_eos)
        sched.add_generate(rid, [1 + i % 7] * 16, params, i, 0.0)
    peak = done = 0
    while sched.has_unfinished():
        plan = sched.schedule()
        assert not plan.is_empty
        sched.update(plan, _stop_after(plan, lengths))
        bm.check(sched.held_tables())
        peak = max(peak, len(sched.running))
        for out in sched.take_outputs():
            assert len(out.samples[0].token_ids) == lengths[out.request_id]
            done += 1
    bm.check([])
    assert sched.demand == 0 and bm.num_free == bm.capacity
    return sched, peak, done


def test_early_stopping_requests_are_admitted_by_what_they_generate() -> None:
    """Lines that stop after 4-8 of their 48 tokens (structured output, say): once 64
    have finished, admission projects them at ~8 tokens instead of 48, so about three
    times as many run at once, with no preemption; every output is complete."""
    rng = random.Random(7)
    lengths = {f"r{i}": rng.randint(4, 8) for i in range(300)}
    off, peak_off, done_off = _run_early_stoppers(False, lengths)
    on, peak_on, done_on = _run_early_stoppers(True, lengths)
    assert done_off == done_on == 300
    assert peak_off <= 8 and peak_on >= 3 * peak_off  # (prefix hits let a few more in)
    assert on.stats["steps"] < 0.6 * off.stats["steps"]
    assert on.stats["preemptions"] == 0
    assert on.output_lengths is not None
    assert on.output_lengths.share(SamplingParams(max_tokens=48)) < 0.2


def test_requests_that_outgrow_the_estimate_are_preempted_not_lost() -> None:
    """The estimate is fooled: 100 requests stop after 4 tokens, then 60 run to their
    48-token limit. Too many of those are admitted; as they outgrow their blocks the most
    recently admitted give way and are recomputed, and every one still finishes whole."""
    lengths = {f"s{i}": 4 for i in range(100)} | {f"l{i}": 48 for i in range(60)}
    sched, _, done = _run_early_stoppers(True, lengths)
    assert done == 160
    assert sched.stats["preemptions"] > 0


def test_ignore_eos_requests_are_projected_at_max_tokens() -> None:
    sched = Scheduler(BlockManager(101, 4), max_position=256, max_batch_tokens=256)
    assert sched.output_lengths is not None
    for _ in range(200):
        sched.output_lengths.observe(SamplingParams(max_tokens=48), 2)
        sched.output_lengths.observe(SamplingParams(max_tokens=48, ignore_eos=True), 2)
    sched.add_generate("e", [1] * 16, SamplingParams(max_tokens=48, ignore_eos=True), 0, 0.0)
    sched.add_generate("s", [2] * 16, SamplingParams(max_tokens=48), 1, 0.0)
    sched.schedule()
    by_id = {s.req.request_id: s.demand for s in sched.running}
    assert by_id["e"] == (16 + 48) // 4
    # The prompt + the floor's share of max_tokens (6 of 48: the observed 2 is below it).
    assert by_id["s"] == -(-(16 + 6) // 4)


def test_a_new_constrained_kind_starts_at_the_prior() -> None:
    """A batch of constrained lines of a kind never seen (40, fewer than it takes to
    learn; stopping after 6-10 of 48 tokens) is projected at half the limit, not all of
    it, so more run at once and the batch takes fewer steps; lines of the kind that do run
    to their limit are preempted and recomputed, and every output is whole."""
    rng = random.Random(3)
    lengths = {f"r{i}": rng.randint(6, 10) for i in range(40)}
    exact, peak_exact, _ = _run_early_stoppers(True, lengths, max_tokens=None,
                                               ignore_eos=True)
    cold, peak_cold, done = _run_early_stoppers(True, lengths, regex="[a-z]+")
    plain, peak_plain, _ = _run_early_stoppers(True, lengths)  # unconstrained: no prior
    assert done == 40 and cold.stats["preemptions"] == 0
    assert peak_plain <= 8 and peak_cold >= 1.5 * peak_plain
    assert cold.stats["steps"] < 0.75 * plain.stats["steps"]
    assert exact.stats["steps"] <= cold.stats["steps"]
    full = {f"l{i}": 48 for i in range(30)}
    sched, _, done = _run_early_stoppers(True, full, regex="[a-z]+")
    assert done == 30 and sched.stats["preemptions"] > 0


# ---------------------------------------------------------------------------------------
# Even waves
# ---------------------------------------------------------------------------------------

def _wave_sched(cost=None) -> Scheduler:
    """80 blocks of 4 tokens: 10 sequences of 16 + 16 tokens fit at once, and a wave's
    prompts are prefilled in one step (its sequences finish together)."""
    sched = Scheduler(BlockManager(81, 4), max_position=128, max_num_seqs=64,
                      max_batch_tokens=512, watermark=0.0)
    sched.decode_seconds = cost
    return sched


def _add_uniform(sched: Scheduler, n: int, shared: int = 0, first: int = 0) -> None:
    """``n`` requests of 16-token prompts (their first ``shared`` tokens the same) and 16
    output tokens each."""
    for i in range(first, first + n):
        prompt = [1] * shared + [2 + i] * (16 - shared)
        sched.add_generate(f"r{i}", prompt, _batch_params(16), i, 0.0)


def _decode_rows(sched: Scheduler, rng: random.Random, steps: int = 10_000,
                 act=None) -> list[int]:
    """Step to the end (``act(step)`` before each step); the rows of each decode-only
    step, consecutive equal counts merged (one entry per wave)."""
    rows: list[int] = []
    for step in range(steps):
        if not sched.has_unfinished():
            break
        if act is not None:
            act(step)
        plan = sched.schedule()
        sched.update(plan, _result(plan, rng, 50))
        sched.blocks.check(sched.held_tables())
        if plan.decode_only and (not rows or rows[-1] != plan.num_decode):
            rows.append(plan.num_decode)
        sched.take_outputs()
    assert not sched.has_unfinished()
    sched.blocks.check([])
    return rows


@pytest.mark.parametrize("cost, waves", [
    (None, [10, 3]),  # greedy: no timings
    (lambda rows: float(rows), [10, 3]),  # proportional steps: nothing to gain
    # The weights' floor up to 8 rows, then a unit a row (the shape of the 20B's decode
    # steps on a GPU): 10 + 8 units > 8 + 8.
    (lambda rows: max(8.0, float(rows)), [7, 6]),
])
def test_a_known_queue_runs_in_even_waves_when_the_timings_favour_them(cost, waves) -> None:
    sched = _wave_sched(cost)
    _add_uniform(sched, 13)
    assert _decode_rows(sched, random.Random(0)) == waves


@pytest.mark.parametrize("shared, waves", [
    (12, [13]),  # the others need 5 blocks each: all 13 fit (8 + 12 x 5 <= 80)
    ((12, 8), [13]),  # alternately 3 and 2 blocks shared: 8 + 6 x 5 + 6 x 6 <= 80
    (4, [7, 6]),  # 1 shared: 11 fit, so 11 + 2 would run: even waves instead
])
def test_even_waves_count_prompt_blocks_shared_within_the_queue(shared, waves) -> None:
    """Prompts sharing their first blocks: the first takes its 8 blocks, each other only
    those past what it shares (admission finds the rest in the cache) — so the waves
    are sized by what really fits."""
    sched = _wave_sched(lambda rows: max(8.0, float(rows)))
    for i in range(13):
        n = shared if isinstance(shared, int) else shared[i % 2]
        sched.add_generate(f"r{i}", [1] * n + [2 + i] * (16 - n), _batch_params(16), i, 0.0)
    assert _decode_rows(sched, random.Random(0)) == waves


def _in_an_even_wave() -> tuple[Scheduler, random.Random]:
    """13 queued where 10 fit, timings that favour even waves: 7 running after 3 steps."""
    sched = _wave_sched(lambda rows: max(8.0, float(rows)))
    _add_uniform(sched, 13)
    rng = random.Random(0)
    for _ in range(3):
        sched.update(plan := sched.schedule(), _result(plan, rng, 50))
    return sched, rng


def test_an_even_wave_ends_when_one_of_its_sequences_does() -> None:
    """A wave capped at 7 of 10: once one of its sequences is aborted (as when one
    finishes early), admission is continuous again and fills the cache."""
    sched, rng = _in_an_even_wave()
    assert len(sched.running) == 7 and len(sched.waiting) == 6
    assert sched.abort("r0")
    sched.update(plan := sched.schedule(), _result(plan, rng, 50))
    assert len(sched.running) == 10 and len(sched.waiting) == 2


def test_requests_arriving_during_an_even_wave_resize_it() -> None:
    """7 of 13 running in an even wave; 7 more arrive: 20 need two full waves of 10, so
    the cap goes and the running wave fills up to 10 at the next step."""
    sched, rng = _in_an_even_wave()
    assert len(sched.running) == 7
    _add_uniform(sched, 7, first=13)
    sched.update(plan := sched.schedule(), _result(plan, rng, 50))
    assert len(sched.running) == 10
    assert _decode_rows(sched, rng)  # and the rest runs to the end, nothing leaked


def test_an_interactive_request_is_not_held_back_by_an_even_wave() -> None:
    sched, rng = _in_an_even_wave()
    assert len(sched.running) == 7
    sched.add_generate("i", [60] * 8, _batch_params(4), 99, 0.0, priority=INTERACTIVE)
    plan = sched.schedule()
    assert [60] * 8 in [c.tokens for c in plan.chunks]
    assert len(sched.running) == 8 and sched.running[0].req.request_id == "i"
