"""Automatic prefix caching through the whole engine: greedy tokens with the cache on equal
the cache off and Hugging Face ``generate``, for prompts sharing 0, 1, several and
all-but-one blocks, under preemption, n > 1, abort and staggered arrivals, in one
process and in 2 pipeline stages."""

from __future__ import annotations

import random

import pytest
import torch

from models.config import get_preset
from models.engine import Engine
from models.model import NeoX
from models.runtime import build_engine
from models.sampling import SamplingParams
from tests.models.test_engine import VOCAB, _greedy, _hf, _model, _no_leaks, _run

BS = 4


@pytest.fixture(scope="module")
def model() -> NeoX:
    return _model(get_preset("tiny").replace(vocab_size=VOCAB, max_position=256))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _shared_prefix_arrivals(vocab: int, seed: int = 5,
                            ) -> list[tuple[int, str, list[int], SamplingParams]]:
    """Requests whose prompts share 0, 1, several and all-but-one blocks of one prefix
    (and one exact duplicate), arriving over several steps; one asks for n=2."""
    r = random.Random(seed)

    def fresh(n: int) -> list[int]:
        return [r.randrange(2, vocab) for _ in range(n)]

    base = fresh(6 * BS)  # 6 full blocks
    prompts = {
        "none": fresh(13),
        "first": base,  # computes the prefix
        "one": base[:BS] + fresh(9),
        "several": base[: 4 * BS] + fresh(5),
        "all-but-one": base[: 5 * BS] + fresh(3),  # every full block shared
        "same": list(base),  # shares all, recomputes its last block
        "n2": base[: 3 * BS] + fresh(2),
        "late": base[: 2 * BS] + fresh(BS),  # exactly 3 full blocks, 2 shared
    }
    steps = {"none": 0, "first": 0, "one": 2, "several": 3, "all-but-one": 3, "same": 5,
             "n2": 6, "late": 30}
    out = []
    for rid, p in prompts.items():
        params = _greedy(14, n=2) if rid == "n2" else _greedy(10 + len(rid))
        out.append((steps[rid], rid, p, params))
    return out


def _tokens(outs: dict) -> dict[str, list[list[int]]]:
    return {rid: [s.token_ids for s in o.samples] for rid, o in outs.items()}


def test_caching_on_equals_off_and_hf_under_preemption(model: NeoX) -> None:
    arrivals = _shared_prefix_arrivals(model.config.vocab_size)
    off = Engine(model, None, num_blocks=200, block_size=BS, enable_prefix_caching=False)
    ref = _tokens(_run(off, arrivals))
    assert off.stats["prefix_hit_tokens"] == 0
    # A small, overcommitted cache: sequences are preempted and recomputed — from the
    # prefix cache where their blocks survived.
    on = Engine(model, None, num_blocks=26, block_size=BS, max_batch_tokens=20,
                kv_overcommit=3.0)
    got = _tokens(_run(on, arrivals))
    assert got == ref
    stats = on.stats
    assert stats["preemptions"] > 0
    assert stats["prefix_hit_tokens"] >= 5 * BS and 0 < stats["prefix_cache_hit_rate"] < 1
    _no_leaks(on)
    roomy = Engine(model, None, num_blocks=200, block_size=BS)
    assert _tokens(_run(roomy, arrivals)) == ref
    assert roomy.stats["prefix_hit_tokens"] >= (1 + 4 + 5 + 5 + 3 + 2) * BS
    hf = _hf(model)
    for _, rid, prompt, params in arrivals:
        with torch.no_grad():
            h = hf.generate(torch.tensor([prompt]), max_new_tokens=params.max_tokens,
                            min_new_tokens=params.max_tokens, do_sample=False,
                            pad_token_id=0, eos_token_id=None)
        assert got[rid][0] == h[0, len(prompt):].tolist(), rid


def test_prompts_arriving_together_compute_their_shared_prefix_once(model: NeoX) -> None:
    """Prompts about one document, all added before the first step: the first admitted
    computes the document's blocks and the others, admitted in that same step, read them
    (each layer writes the step's keys before attending). With a token budget that cuts
    the first prompt, the rest reuse only the blocks that step computes. Tokens equal
    the cache off and HF."""
    r = random.Random(21)
    doc = [r.randrange(2, model.config.vocab_size) for _ in range(7 * BS)]
    arrivals = [(0, f"q{i}", doc + [r.randrange(2, model.config.vocab_size)
                                    for _ in range(1 + i % 3)], _greedy(5))
                for i in range(6)]
    ref = _tokens(_run(Engine(model, None, num_blocks=200, block_size=BS,
                              enable_prefix_caching=False), arrivals))
    together = Engine(model, None, num_blocks=200, block_size=BS)
    assert _tokens(_run(together, arrivals)) == ref
    # The first prompt's 7 document blocks, found by each of the five others.
    assert together.stats["prefix_hit_tokens"] == 5 * 7 * BS
    assert together.stats["steps"] == 5  # one prefill step for all six, then 4 decodes
    _no_leaks(together)
    # The first step's budget holds only part of the first prompt; its second chunk
    # (blocks 4..6) is registered as it is scheduled, before the others are admitted
    # into the rest of that second step.
    cut = Engine(model, None, num_blocks=200, block_size=BS, max_batch_tokens=4 * BS + 2)
    assert _tokens(_run(cut, arrivals)) == ref
    assert cut.stats["prefix_hit_tokens"] == 5 * 7 * BS
    _no_leaks(cut)
    hf = _hf(model)
    for _, rid, prompt, params in arrivals[:2]:
        with torch.no_grad():
            h = hf.generate(torch.tensor([prompt]), max_new_tokens=params.max_tokens,
                            min_new_tokens=params.max_tokens, do_sample=False,
                            pad_token_id=0, eos_token_id=None)
        assert ref[rid][0] == h[0, len(prompt):].tolist(), rid


def test_abort_while_sharing_blocks(model: NeoX) -> None:
    """An aborted request that shares prefix blocks frees only its own references: the
    others' tokens do not change and a later request still hits the cache."""
    arrivals = _shared_prefix_arrivals(model.config.vocab_size, seed=8)
    ref = _tokens(_run(Engine(model, None, num_blocks=200, block_size=BS,
                              enable_prefix_caching=False), arrivals))
    engine = Engine(model, None, num_blocks=200, block_size=BS, max_batch_tokens=16)
    out: dict = {}
    pending = sorted(arrivals, key=lambda a: a[0])
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, rid, prompt, params = pending.pop(0)
            engine.add_request(rid, prompt, params)
        if step == 8:
            assert engine.abort("several") and engine.abort("n2")
        out.update({o.request_id: o for o in engine.step()})
        step += 1
    got = _tokens(out)
    for rid in ref:
        if rid in ("several", "n2"):
            assert all(s.finish_reason == "abort" for s in out[rid].samples)
            for full, part in zip(ref[rid], got[rid], strict=True):
                assert full[: len(part)] == part
        else:
            assert got[rid] == ref[rid], rid
    _no_leaks(engine)
    before = engine.stats["prefix_hit_tokens"]
    again = engine.generate([arrivals[1][2]], _greedy(3))[0]
    assert again.cached_tokens == 5 * BS
    assert engine.stats["prefix_hit_tokens"] - before == 5 * BS


def test_scores_share_cached_contexts(model: NeoX) -> None:
    """Scoring several continuations of one context (as multiple-choice evals do)
    reuses the context's blocks and gives the same log-probabilities."""
    r = random.Random(3)
    ctx = [r.randrange(2, 500) for _ in range(30)]
    pairs = [(ctx, [r.randrange(2, 500) for _ in range(r.randint(1, 6))]) for _ in range(6)]
    off = Engine(model, None, num_blocks=200, block_size=BS, enable_prefix_caching=False)
    on = Engine(model, None, num_blocks=200, block_size=BS, max_batch_tokens=40)
    a, b = off.score(pairs), on.score(pairs)
    for x, y in zip(a, b, strict=True):
        assert y.token_logprobs == pytest.approx(x.token_logprobs, abs=1e-5)
        assert x.is_greedy == y.is_greedy
    assert on.stats["prefix_hit_tokens"] >= 4 * (29 // BS) * BS
    _no_leaks(on)


def test_two_pipeline_stages_with_prefix_caching() -> None:
    arrivals = _shared_prefix_arrivals(250, seed=11)
    kw = dict(block_size=BS, max_batch_tokens=20)
    one = build_engine("preset:tiny", num_blocks=300, enable_prefix_caching=False, **kw)
    ref = _tokens(_run(one, arrivals))
    with build_engine("preset:tiny", pipeline_parallel=2, num_blocks=3 * 12 + 1,
                      micro_batches=3, kv_overcommit=3.0, **kw) as two:
        got = _tokens(_run(two, arrivals))
        stats = two.stats
    assert got == ref
    assert stats["prefix_hit_tokens"] > 0 and stats["preemptions"] > 0
    with build_engine("preset:tiny", pipeline_parallel=2, num_blocks=200,
                      enable_prefix_caching=False, **kw) as two_off:
        assert _tokens(_run(two_off, arrivals)) == ref
        assert two_off.stats["prefix_hit_tokens"] == 0
