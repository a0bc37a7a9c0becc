"""The continuous-batching engine against independent references, on tiny CPU models.

References: Hugging Face ``GPTNeoXForCausalLM.generate`` with the same weights (greedy),
the network's own cache-free ``dense_logits`` (logprobs, scores, penalties, seeded
sampling step by step), and the same request run alone in a fresh engine.

Random tiny models use a 512-token vocabulary and no tokenizer (ids in, ids out), so
no padded-vocabulary masking applies and ids compare directly with HF's; the tests of
text (stop strings, padded-vocab masking) use the real 20B tokenizer.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import transformers

from models.config import NeoXConfig, get_preset
from models.engine import INTERACTIVE, Engine, InferenceEngine, RequestOutput
from models.model import NeoX, init_random_
from models.runtime import build_engine
from models.sampling import SampleRow, SamplingBatch, SamplingParams, sample
from models.tokenizer import load_tokenizer

VOCAB = 512


def _model(config: NeoXConfig, seed: int = 1) -> NeoX:
    return init_random_(NeoX(config), seed=seed).eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models are all per-op overhead; intra-op threads only add to it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def config() -> NeoXConfig:
    return get_preset("tiny").replace(vocab_size=VOCAB, max_position=256)


@pytest.fixture(scope="module")
def model(config: NeoXConfig) -> NeoX:
    return _model(config)


def _hf(model: NeoX) -> transformers.GPTNeoXForCausalLM:
    hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**model.config.to_hf()))
    head = "lm_head.weight" if "lm_head.weight" in hf.state_dict() else "embed_out.weight"
    sd = {(head if k == "embed_out.weight" else f"gpt_neox.{k}"): v
          for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], missing
    return hf.eval()


def _prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    r = random.Random(seed)
    return [[r.randrange(2, VOCAB) for _ in range(r.randint(lo, hi))] for _ in range(n)]


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def _run(engine: Engine, arrivals: list[tuple[int, str, list[int], SamplingParams]],
         max_steps: int = 10_000) -> dict[str, RequestOutput]:
    """Add each request at its step number; step until everything is done."""
    out: dict[str, RequestOutput] = {}
    pending = sorted(arrivals, key=lambda a: a[0])
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, rid, prompt, params = pending.pop(0)
            engine.add_request(rid, prompt, params)
        for o in engine.step():
            out[o.request_id] = o
        step += 1
        assert step < max_steps
    return out


def _no_leaks(engine: Engine) -> None:
    sched = engine.scheduler
    engine.blocks.check(sched.held_tables())
    assert engine.blocks.num_free == engine.blocks.capacity
    assert sched.demand == 0 and not sched.running and not sched.waiting


# ---------------------------------------------------------------------------------------
# Greedy: continuous batching, chunked prefill, preemption == alone == HF
# ---------------------------------------------------------------------------------------


def test_greedy_continuous_batching_equals_alone_and_hf(model: NeoX) -> None:
    prompts = _prompts(10, 1, 70, seed=3)
    prompts[0] = prompts[0][:1]  # a one-token prompt
    prompts[1] = _prompts(1, 120, 120, seed=9)[0]  # a long prompt, prefilled in chunks
    lengths = [1, 30, 5, 17, 40, 2, 25, 9, 33, 12]
    arrivals = [(step, f"r{i}", p, _greedy(lengths[i]))
                for i, (step, p) in enumerate(zip([0, 0, 0, 1, 3, 3, 7, 8, 20, 40], prompts,
                                                  strict=True))]
    # 40 usable blocks of 4 tokens for up to 10 sequences of up to ~160 tokens, a 24-token
    # step budget and no admission control: chunked prefill and preemption both happen.
    engine = Engine(model, None, num_blocks=41, block_size=4, max_batch_tokens=24,
                    kv_overcommit=100.0)
    got = _run(engine, arrivals)
    assert engine.stats["preemptions"] > 0
    _no_leaks(engine)

    hf = _hf(model)
    for _, rid, prompt, params in arrivals:
        alone = Engine(model, None, num_blocks=200, block_size=4)
        ref = alone.generate([prompt], params)[0].samples[0].token_ids
        with torch.no_grad():
            hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=params.max_tokens,
                                 min_new_tokens=params.max_tokens, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        hf_ids = hf_out[0, len(prompt):].tolist()
        sample = got[rid].samples[0]
        assert sample.token_ids == ref == hf_ids, rid
        assert sample.finish_reason == "length"
        assert got[rid].prompt_tokens == len(prompt)


def test_even_waves_run_through_the_engine_with_the_same_tokens(model: NeoX) -> None:
    """13 prompts where 10 fit at once: with decode-step timings that favour them (a
    floor up to 8 rows) the engine runs waves of 7 and 6 instead of 10 and 3; the
    tokens are those of greedy admission."""
    prompts = _prompts(13, 16, 16, seed=17)
    params = _greedy(16)

    def run(cost) -> tuple[list[list[int]], int]:
        engine = Engine(model, None, num_blocks=81, block_size=4, max_batch_tokens=512,
                        watermark=0.0)
        engine.scheduler.decode_seconds = cost
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        out, peak = {}, 0
        while engine.has_unfinished():
            out.update({o.request_id: o for o in engine.step()})
            peak = max(peak, len(engine.scheduler.running))
        _no_leaks(engine)
        return [out[str(i)].samples[0].token_ids for i in range(13)], peak

    greedy, greedy_peak = run(None)
    even, even_peak = run(lambda rows: max(8.0, float(rows)))
    assert (greedy_peak, even_peak) == (10, 7)
    assert even == greedy


def test_decode_graph_buffers_on_cpu(model: NeoX) -> None:
    """The CUDA-graph decode path's static buffers, buckets and padding rows, run without
    capture: same tokens as the eager path, across batch sizes that shrink and grow."""
    from models.engine.runner import DecodeGraphs

    prompts = _prompts(9, 1, 50, seed=13)
    arrivals = [(3 * i, f"r{i}", p, _greedy(5 + 4 * i)) for i, p in enumerate(prompts)]
    eager = _run(Engine(model, None, num_blocks=30, block_size=4, kv_overcommit=100.0),
                 arrivals)
    engine = Engine(model, None, num_blocks=30, block_size=4, kv_overcommit=100.0,
                    max_num_seqs=8)
    graphs = engine.runner.graphs = DecodeGraphs(engine.runner, 8, capture=False)
    got = _run(engine, arrivals)
    assert engine.stats["graph_steps"] > 10 and engine.stats["preemptions"] > 0
    assert len(graphs.graphs) > 2  # several buckets used
    for rid, out in eager.items():
        assert got[rid].samples[0].token_ids == out.samples[0].token_ids, rid
    _no_leaks(engine)


def test_greedy_sequential_residual_matches_hf() -> None:
    cfg = get_preset("tiny-sequential").replace(vocab_size=VOCAB, max_position=128)
    model = _model(cfg, seed=4)
    hf = _hf(model)
    prompts = _prompts(4, 3, 40, seed=5)
    engine = Engine(model, None, num_blocks=30, block_size=8, max_batch_tokens=32)
    outs = engine.generate(prompts, _greedy(10))
    for p, o in zip(prompts, outs, strict=True):
        with torch.no_grad():
            h = hf.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10,
                            do_sample=False, pad_token_id=0, eos_token_id=None)
        assert o.samples[0].token_ids == h[0, len(p):].tolist()


# ---------------------------------------------------------------------------------------
# Sampling features through the engine
# ---------------------------------------------------------------------------------------


def _reference_sample(model: NeoX, prompt: list[int], params: SamplingParams, seed: int,
                      index: int, steps: int) -> tuple[list[int], list[float]]:
    """Token by token through dense_logits (no cache) and models.sampling's draw."""
    ids, lps = list(prompt), []
    for t in range(steps):
        logits = model.dense_logits(torch.tensor([ids]))[0, -1:].float()
        row = SampleRow(params=params, seed=seed, sample_index=index, position=t,
                        output_ids=ids[len(prompt):], prompt_ids=prompt)
        res = sample(logits, SamplingBatch.build([row], device="cpu", vocab_size=VOCAB))
        ids.append(int(res.tokens[0]))
        lps.append(float(res.logprobs[0]))
    return ids[len(prompt):], lps


def test_n_samples_share_prefill_and_match_reference(model: NeoX) -> None:
    # A 7-token prompt with 4-token blocks: the samples share a partial block that each
    # must copy before writing its own tokens.
    prompt = _prompts(1, 7, 7, seed=11)[0]
    params = SamplingParams(temperature=1.0, top_k=40, max_tokens=9, ignore_eos=True, n=3,
                            seed=1234)
    engine = Engine(model, None, num_blocks=60, block_size=4)
    engine.add_request("other", _prompts(1, 20, 20, seed=2)[0], _greedy(12))
    engine.add_request("n3", prompt, params)
    outs = {o.request_id: o for o in _drain(engine)}
    samples = outs["n3"].samples
    assert [s.index for s in samples] == [0, 1, 2]
    for s in samples:
        ref, _ = _reference_sample(model, prompt, params, 1234, s.index, 9)
        assert s.token_ids == ref
    assert len({tuple(s.token_ids) for s in samples}) == 3  # independent draws
    assert outs["n3"].completion_tokens == 27
    _no_leaks(engine)


def _drain(engine: Engine) -> list[RequestOutput]:
    outs: list[RequestOutput] = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return outs


def test_seed_gives_same_tokens_whatever_the_batch(model: NeoX) -> None:
    prompt = _prompts(1, 13, 13, seed=21)[0]
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=15, ignore_eos=True,
                            seed=99)
    alone = Engine(model, None, num_blocks=100, block_size=4).generate([prompt], params)[0]
    engine = Engine(model, None, num_blocks=100, block_size=4, max_batch_tokens=20)
    mixed = [(0, f"x{i}", p, SamplingParams(temperature=1.3, max_tokens=10 + i,
                                            ignore_eos=True, seed=i, repetition_penalty=1.2))
             for i, p in enumerate(_prompts(5, 5, 30, seed=22))]
    got = _run(engine, [*mixed, (2, "target", prompt, params)])
    assert got["target"].samples[0].token_ids == alone.samples[0].token_ids
    ref, _ = _reference_sample(model, prompt, params, 99, 0, 15)
    assert alone.samples[0].token_ids == ref
    other_seed = Engine(model, None, num_blocks=100, block_size=4).generate(
        [prompt], SamplingParams(**{**params.to_dict(), "seed": 100}))[0]
    assert other_seed.samples[0].token_ids != alone.samples[0].token_ids


def test_interactive_during_a_batch_yields_without_changing_tokens(model: NeoX) -> None:
    """Interactive requests arrive while a batch decodes: with the batch capped to 2
    tokens a step while they run, and without a cap, every request's greedy tokens equal
    its tokens alone; with the cap the interactive requests finish in fewer steps."""
    batch = _prompts(10, 4, 40, seed=31)
    inter = _prompts(3, 30, 60, seed=32)
    alone = Engine(model, None, num_blocks=200, block_size=4)
    ref = {f"b{i}": o.samples[0].token_ids
           for i, o in enumerate(alone.generate(batch, _greedy(24)))}
    ref.update({f"i{i}": o.samples[0].token_ids
                for i, o in enumerate(alone.generate(inter, _greedy(8)))})
    took: dict[int | None, int] = {}
    for cap in (2, None):
        engine = Engine(model, None, num_blocks=200, block_size=4, max_batch_tokens=24,
                        yield_tokens=cap)
        for i, p in enumerate(batch):
            engine.add_request(f"b{i}", p, _greedy(24))
        got: dict[str, list[int]] = {}
        started: dict[str, int] = {}
        steps = 0
        for step in range(10_000):
            if step in (6, 14, 22):
                rid = f"i{len(started)}"
                engine.add_request(rid, inter[len(started)], _greedy(8),
                                   priority=INTERACTIVE)
                started[rid] = step
            for o in engine.step():
                got[o.request_id] = o.samples[0].token_ids
                if o.request_id in started:
                    steps += step + 1 - started[o.request_id]
            if not engine.has_unfinished() and len(started) == 3:
                break
        assert got == ref, cap
        _no_leaks(engine)
        assert engine.stats["preemptions"] == 0
        assert (engine.stats["yield_steps"] > 0) == (cap is not None)
        took[cap] = steps
    assert took[2] < took[None]


def _penalized_greedy(model: NeoX, prompt: list[int], steps: int, rep: float, pres: float,
                      freq: float) -> list[int]:
    """Penalties written out per token (HF's repetition rule, OpenAI's presence/frequency)."""
    ids = list(prompt)
    for _ in range(steps):
        logits = model.dense_logits(torch.tensor([ids]))[0, -1].float().clone()
        out = ids[len(prompt):]
        for t in set(ids):
            logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
        for t in set(out):
            logits[t] -= pres + freq * out.count(t)
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_penalties_against_reference(model: NeoX) -> None:
    prompts = _prompts(3, 4, 20, seed=31)
    cases = [(1.5, 0.0, 0.0), (1.0, 1.5, 0.0), (1.0, 0.0, 1.0), (1.3, 0.5, 0.7)]
    engine = Engine(model, None, num_blocks=200, block_size=4)
    for rep, pres, freq in cases:
        params = _greedy(12, repetition_penalty=rep, presence_penalty=pres,
                         frequency_penalty=freq)
        outs = engine.generate(prompts, params)
        for p, o in zip(prompts, outs, strict=True):
            assert o.samples[0].token_ids == _penalized_greedy(model, p, 12, rep, pres, freq)


def test_logprobs_against_dense_logits(model: NeoX) -> None:
    prompt = _prompts(1, 9, 9, seed=41)[0]
    engine = Engine(model, None, num_blocks=100, block_size=4)
    out = engine.generate([prompt], _greedy(6, logprobs=3))[0].samples[0]
    assert out.logprobs is not None and len(out.logprobs) == 6
    ids = prompt + out.token_ids
    lp = torch.log_softmax(model.dense_logits(torch.tensor([ids]))[0].float(), dim=-1)
    for t, entry in enumerate(out.logprobs):
        row = lp[len(prompt) - 1 + t]
        assert entry["token_id"] == out.token_ids[t]
        assert entry["logprob"] == pytest.approx(float(row[out.token_ids[t]]), abs=1e-4)
        vals, top = row.topk(3)
        assert [i for i, _ in entry["top"]] == top.tolist()
        assert [v for _, v in entry["top"]] == pytest.approx(vals.tolist(), abs=1e-4)
    # Sampled tokens (temperature 1) report logprobs under the raw model distribution.
    params = SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True, seed=3,
                            logprobs=0)
    s = engine.generate([prompt], params)[0].samples[0]
    ref_ids, ref_lps = _reference_sample(model, prompt, params, 3, 0, 5)
    assert s.token_ids == ref_ids
    assert [e["logprob"] for e in s.logprobs] == pytest.approx(ref_lps, abs=1e-4)
    assert all(e["top"] == [] for e in s.logprobs)


def test_stop_strings_and_stop_tokens(tokenizer_path) -> None:
    tok = load_tokenizer(tokenizer_path)
    model = _model(get_preset("tiny").replace(max_position=128), seed=7)
    engine = Engine(model, tok, num_blocks=60, block_size=8)
    prompt = "The quick brown fox"
    base = engine.generate([prompt], _greedy(30))[0].samples[0]
    text = base.text
    # A stop string from the middle of the text, likely spanning a token boundary.
    clean = [i for i in range(6, len(text) - 3) if "\ufffd" not in text[i:i + 3]]
    assert clean, text
    stop = text[clean[0]:clean[0] + 3]
    out = engine.generate([prompt], _greedy(30, stop=[stop, "never-there"]))[0].samples[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.find(stop)]
    assert out.token_ids == base.token_ids[: len(out.token_ids)]
    # A stop token ends the sample and is kept in token_ids but not in the text.
    k = 5
    stop_id = base.token_ids[k]
    out = engine.generate([prompt], _greedy(30, stop_token_ids=[stop_id]))[0].samples[0]
    first = base.token_ids.index(stop_id)
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: first + 1]
    assert out.text == tok.decode(base.token_ids[:first])


def test_padded_vocab_is_never_sampled(tokenizer_path) -> None:
    tok = load_tokenizer(tokenizer_path)  # 50277 ids; the tiny preset's embedding has 50304
    model = _model(get_preset("tiny").replace(max_position=64), seed=8)
    with torch.no_grad():
        model.final_layer_norm.bias.fill_(1.0)
        model.embed_out.weight[tok.vocab_size:] = 1.0  # padded rows would win every argmax
    for temp in (0.0, 1.0):
        params = SamplingParams(temperature=temp, max_tokens=6, ignore_eos=True, seed=1)
        masked = Engine(model, tok, num_blocks=20, block_size=8).generate(["hi"], params)[0]
        assert all(t < tok.vocab_size for t in masked.samples[0].token_ids)
    raw = Engine(model, tok, num_blocks=20, block_size=8, mask_padded_vocab=False).generate(
        ["hi"], _greedy(6))[0]
    assert all(t >= tok.vocab_size for t in raw.samples[0].token_ids)


# ---------------------------------------------------------------------------------------
# Abort, errors, timings, memory
# ---------------------------------------------------------------------------------------


def test_abort_frees_blocks_within_one_step(model: NeoX) -> None:
    prompts = _prompts(3, 10, 30, seed=51)
    engine = Engine(model, None, num_blocks=100, block_size=4)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, _greedy(20, n=2 if i == 1 else 1))
    engine.step()
    engine.step()
    held = engine.blocks.num_free
    assert engine.abort("r1") is True
    assert engine.blocks.num_free > held  # freed at once, not at the next step
    assert engine.abort("r1") is False and engine.abort("nope") is False
    outs = {o.request_id: o for o in engine.step()}
    assert "r1" in outs
    assert [s.finish_reason for s in outs["r1"].samples] == ["abort", "abort"]
    outs.update({o.request_id: o for o in _drain(engine)})
    alone = Engine(model, None, num_blocks=100, block_size=4).generate(
        [prompts[0], prompts[2]], _greedy(20))
    assert outs["r0"].samples[0].token_ids == alone[0].samples[0].token_ids
    assert outs["r2"].samples[0].token_ids == alone[1].samples[0].token_ids
    # Aborting a request still waiting (never scheduled) works too.
    engine.add_request("late", prompts[0], _greedy(5))
    assert engine.abort("late")
    assert [o.samples[0].finish_reason for o in engine.step()] == ["abort"]
    _no_leaks(engine)


@pytest.mark.parametrize(
    ("params", "prompt_len", "field"),
    [
        ({"temperature": -1.0}, 5, "temperature"),
        ({"top_p": 1.5}, 5, "top_p"),
        ({"max_tokens": 0}, 5, "max_tokens"),
        ({"n": 0}, 5, "n"),
        ({"bogus": 1}, 5, "bogus"),
        ({"max_tokens": 10}, 256, "prompt"),  # prompt as long as the context
        ({"max_tokens": 10}, 300, "prompt"),  # longer
        ({"max_tokens": 200}, 100, "max_tokens"),  # prompt + max_tokens past the context
    ],
)
def test_bad_requests_raise_and_others_run(model: NeoX, params: dict, prompt_len: int,
                                           field: str) -> None:
    engine = Engine(model, None, num_blocks=100, block_size=4)
    engine.add_request("ok", _prompts(1, 6, 6)[0], _greedy(4))
    engine.step()
    with pytest.raises(ValueError, match=field):
        engine.add_request("bad", [5] * prompt_len, params)
    outs = _drain(engine)
    assert [o.request_id for o in outs] == ["ok"] and outs[0].error is None
    assert len(outs[0].samples[0].token_ids) == 4
    _no_leaks(engine)


def test_other_request_errors(model: NeoX) -> None:
    engine = Engine(model, None, num_blocks=20, block_size=4)
    engine.add_request("a", [3, 4], _greedy(2))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("a", [3, 4], _greedy(2))
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("b", [], _greedy(2))
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("c", [VOCAB + 3], _greedy(2))
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("d", "text needs a tokenizer", _greedy(2))
    with pytest.raises(ValueError, match="KV cache"):  # 19 blocks x 4 tokens < 100
        engine.add_request("e", [3] * 90, _greedy(10))
    # generate() reports bad requests in their output and runs the rest.
    outs = engine.generate([[3, 4, 5], [1] * 300], _greedy(3))
    assert outs[0].error is None and len(outs[0].samples[0].token_ids) == 3
    assert outs[1].error is not None and "prompt" in outs[1].error
    assert [o.request_id for o in _drain(engine)] == ["a"]
    clamped = Engine(model, None, num_blocks=100, block_size=4, clamp_max_tokens=True)
    out = clamped.generate([[3] * 250], _greedy(50))[0]
    assert len(out.samples[0].token_ids) == 6 and out.samples[0].finish_reason == "length"


def test_timings_and_budget_sizing(model: NeoX) -> None:
    per_token = 2 * model.config.num_layers * model.config.hidden_size * 4  # fp32 K and V
    engine = Engine(model, None, kv_memory=per_token * 16 * 50, block_size=16)
    assert engine.num_blocks == 50
    outs = engine.generate(_prompts(3, 5, 20), _greedy(5))
    for o in outs:
        t = o.timings
        assert t.arrival <= t.first_scheduled <= t.first_token <= t.finished
        assert o.completion_tokens == 5


def test_random_stress_no_leaks(model: NeoX) -> None:
    """Random arrivals, parameters and aborts on a tiny cache: every request finishes
    or is aborted, and every block comes back."""
    r = random.Random(61)
    engine = Engine(model, None, num_blocks=30, block_size=4, max_batch_tokens=16,
                    max_num_seqs=6, kv_overcommit=3.0)
    live: set[str] = set()
    done: dict[str, RequestOutput] = {}
    for step in range(150):
        if step < 60 and r.random() < 0.4:
            rid = f"s{step}"
            params = SamplingParams(temperature=r.choice([0.0, 0.7]), n=r.choice([1, 1, 2]),
                                    max_tokens=r.randint(1, 20), seed=step,
                                    stop_token_ids=[r.randrange(VOCAB)])
            engine.add_request(rid, _prompts(1, 1, 40, seed=step)[0], params)
            live.add(rid)
        if live and r.random() < 0.05:
            engine.abort(r.choice(sorted(live)))
        for o in engine.step():
            done[o.request_id] = o
            live.discard(o.request_id)
    done.update({o.request_id: o for o in _drain(engine)})
    assert not live
    _no_leaks(engine)
    assert engine.stats["preemptions"] > 0


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------


def test_score_equals_log_softmax_of_dense_logits(model: NeoX) -> None:
    r = random.Random(71)
    pairs = [(p[: r.randint(1, len(p) - 1)], [r.randrange(VOCAB) for _ in range(r.randint(1, 8))])
             for p in _prompts(12, 2, 60, seed=72)]
    # The greedy continuation of one context scores as greedy.
    greedy_ctx = pairs[0][0]
    greedy_cont = Engine(model, None, num_blocks=50, block_size=4).generate(
        [greedy_ctx], _greedy(4))[0].samples[0].token_ids
    pairs.append((greedy_ctx, greedy_cont))
    # Context + continuation = max_position + 1 (the last token is never an input).
    pairs.append(([7] * 250, [9] * 7))
    engine = Engine(model, None, num_blocks=120, block_size=4, max_batch_tokens=48)
    engine.add_request("gen", [1, 2, 3], _greedy(5))  # generation shares the steps
    results = engine.score(pairs)
    assert len(results) == len(pairs)
    for (ctx, cont), res in zip(pairs, results, strict=True):
        ids = (ctx + cont)[:-1]
        lp = torch.log_softmax(model.dense_logits(torch.tensor([ids]))[0].float(), dim=-1)
        rows = lp[len(ctx) - 1:]
        ref = [float(rows[i, t]) for i, t in enumerate(cont)]
        assert res.token_logprobs == pytest.approx(ref, abs=1e-4)
        assert res.logprob == pytest.approx(math.fsum(ref), abs=1e-3)
        assert res.is_greedy == all(int(rows[i].argmax()) == t for i, t in enumerate(cont))
    assert results[-2].is_greedy
    outs = _drain(engine)
    assert [o.request_id for o in outs] == ["gen"]
    _no_leaks(engine)
    with pytest.raises(ValueError, match="pairs"):
        engine.score([([], [1])])


def test_prefill_split_with_one_token_left(model: NeoX) -> None:
    """A prompt (n > 1) or a score input whose last chunk is a single token is still a
    prefill: samples fork, score rows come back."""
    prompt = _prompts(1, 9, 9, seed=84)[0]
    engine = Engine(model, None, num_blocks=60, block_size=4, max_batch_tokens=8)
    params = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, n=3, seed=8)
    out = engine.generate([prompt], params)[0]
    assert [len(s.token_ids) for s in out.samples] == [4, 4, 4]
    for s in out.samples:
        assert s.token_ids == _reference_sample(model, prompt, params, 8, s.index, 4)[0]
    res = engine.score([(prompt[:5], prompt[5:] + [3])])[0]  # 9 input tokens: 8 + 1
    lp = torch.log_softmax(model.dense_logits(torch.tensor([prompt]))[0], dim=-1)
    ref = [float(lp[4 + i, t]) for i, t in enumerate(prompt[5:] + [3])]
    assert res.token_logprobs == pytest.approx(ref, abs=1e-4)
    _no_leaks(engine)


def test_score_many_short_pairs_in_one_step(model: NeoX) -> None:
    """More new sequences in a step than per-sequence attention calls allowed: they share
    one masked attention call."""
    from models.engine.runner import MAX_FRESH_CALLS

    pairs = [(p[:-2], p[-2:]) for p in _prompts(MAX_FRESH_CALLS + 8, 3, 12, seed=83)]
    engine = Engine(model, None, num_blocks=200, block_size=4, max_batch_tokens=512)
    got = engine.score(pairs)
    assert engine.stats["steps"] == 1
    for (ctx, cont), res in zip(pairs, got, strict=True):
        lp = torch.log_softmax(model.dense_logits(torch.tensor([ctx + cont[:-1]]))[0], dim=-1)
        ref = [float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)]
        assert res.token_logprobs == pytest.approx(ref, abs=1e-4)


def test_score_under_preemption(model: NeoX) -> None:
    pairs = [(p[:-3], p[-3:]) for p in _prompts(6, 35, 55, seed=81)]
    ref = Engine(model, None, num_blocks=200, block_size=4).score(pairs)
    tight = Engine(model, None, num_blocks=18, block_size=4, max_batch_tokens=32,
                   kv_overcommit=100.0)
    # Older generation requests grow while the scores prefill: everyone gets preempted.
    gen_prompts = _prompts(4, 3, 8, seed=82)
    for i, p in enumerate(gen_prompts):
        tight.add_request(f"gen{i}", p, _greedy(50))
    got = tight.score(pairs)
    assert tight.stats["preemptions"] > 0
    for a, b in zip(ref, got, strict=True):
        assert b.token_logprobs == pytest.approx(a.token_logprobs, abs=1e-5)
    gens = {o.request_id: o.samples[0].token_ids for o in _drain(tight)}
    alone = Engine(model, None, num_blocks=200, block_size=4).generate(gen_prompts, _greedy(50))
    assert [gens[f"gen{i}"] for i in range(4)] == [a.samples[0].token_ids for a in alone]
    _no_leaks(tight)


# ---------------------------------------------------------------------------------------
# build_engine
# ---------------------------------------------------------------------------------------


def test_build_engine_from_preset() -> None:
    engine = build_engine("preset:tiny", device="cpu", dtype=torch.float32, num_blocks=40)
    assert isinstance(engine, Engine) and isinstance(engine, InferenceEngine)
    out = engine.generate(["hello"], SamplingParams(max_tokens=3, seed=1))[0]
    assert out.error is None and len(out.samples[0].token_ids) <= 3
    assert engine.config.name == "tiny" and engine.tokenizer is not None
    with pytest.raises(ValueError, match="pipeline_parallel"):
        build_engine("preset:tiny", device="cpu", dtype=torch.float32, pipeline_parallel=0)


# ---------------------------------------------------------------------------------------
# CUDA (skipped here; figures from the GPU live in bench/results)
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_decode_kernel_matches_torch() -> None:
    from models.attention import paged_decode_torch, paged_decode_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    for hd, bs, dtype in ((16, 16, torch.float32), (96, 16, torch.bfloat16),
                          (64, 8, torch.float16)):
        d, nh, w = 5, 3, 9
        kc = torch.randn(d * w + 1, nh, bs, hd, generator=g, device="cuda").to(dtype)
        vc = torch.randn(d * w + 1, nh, bs, hd, generator=g, device="cuda").to(dtype)
        q = torch.randn(d, nh, hd, generator=g, device="cuda").to(dtype)
        tables = (torch.randperm(d * w, generator=g, device="cuda") + 1).view(d, w)
        ctx = torch.tensor([1, bs, bs + 1, w * bs - 3, w * bs], device="cuda")
        ref = paged_decode_torch(q.float(), kc.float(), vc.float(), tables, ctx)
        got = paged_decode_triton(q, kc, vc, tables, ctx).float()
        assert (got - ref).abs().max().item() < (1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("budget,lengths", [(50, [9] * 6 + [40]), (60, [9, 9, 7, 7, 5, 12])])
def test_cuda_runs_of_equal_prompts_in_place_equal_cpu(
        config: NeoXConfig, model: NeoX, budget: int, lengths: list[int]) -> None:
    """The in-place prefill runs (the CUDA attention kernels reading row slices and
    writing the step's output in place) give the CPU engine's greedy tokens."""
    prompts = [_prompts(1, n, n, seed=21 + i)[0] for i, n in enumerate(lengths)]
    params = _greedy(6)
    cpu = Engine(model, None, num_blocks=200, block_size=4,
                 max_batch_tokens=budget).generate(prompts, params)
    engine = Engine(_model(config).cuda(), None, num_blocks=200, block_size=4,
                    max_batch_tokens=budget)
    outs = engine.generate(prompts, params)
    assert [o.samples[0].token_ids for o in outs] == [o.samples[0].token_ids for o in cpu]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graphs", ["none", "serial", "streams", "streams-qkv"])
def test_cuda_engine_greedy_equals_cpu(config: NeoXConfig, model: NeoX, graphs: str) -> None:
    """Eager, decode graphs, and decode graphs with each block's MLP on a second stream
    (captured up front, so the buckets are timed and batches may run a larger one; each
    bucket with the stream or serially, whichever timed faster); the last after the QKV
    GEMM, leaving SMs free, at the higher priority, in every bucket; then with the
    attention's stream first and the MLP forked once the attention's inputs are stored,
    recaptured on the same engine."""
    from models.model import BranchPlan

    assert config.parallel_residual
    prompts = _prompts(6, 1, 60, seed=91)
    params = _greedy(12)
    cpu = Engine(model, None, num_blocks=200, block_size=4).generate(prompts, params)
    gpu_model = _model(config).cuda()
    engine = Engine(gpu_model, None, num_blocks=41, block_size=4, max_batch_tokens=24,
                    kv_overcommit=100.0, cuda_graphs=graphs != "none",
                    branch_streams=graphs.startswith("streams"),
                    branch_plan=BranchPlan.parse("qkv/16/mlp-first/everywhere")
                    if graphs == "streams-qkv"
                    else None)
    if graphs.startswith("streams"):
        dg = engine.runner.graphs
        assert dg is not None and dg.side is not None
        engine.capture_graphs()
        assert set(dg.seconds) == set(dg.buckets)
        assert all(r >= b for b, r in dg.runs_as.items())
        assert set(dg.sides) == (set(dg.buckets) if graphs == "streams" else set())
        if graphs == "streams-qkv":
            assert dg.serial_buckets == []
        # Captured and timed: admission has the timings for even waves.
        cost = engine.scheduler.decode_seconds
        assert cost is not None and cost(3) == dg.seconds[dg.runs_as[4]] > 0
        engine.set_balance_waves(False)
        assert engine.scheduler.decode_seconds is None
        engine.set_balance_waves(True)
    outs = engine.generate(prompts, params)
    assert [o.samples[0].token_ids for o in outs] == [o.samples[0].token_ids for o in cpu]
    assert engine.stats["preemptions"] > 0
    if graphs != "none":
        assert engine.stats["graph_steps"] > 0
    if graphs == "streams-qkv":
        dg = engine.runner.graphs
        assert dg is not None
        engine.set_branch_plan(BranchPlan.parse("attn/0/attn-first/everywhere"))
        assert dg.side is not None and dg.side.plan.fork == "attn"
        assert dg.capture_stream is not None and dg.capture_stream.priority < 0
        assert set(dg.seconds) == set(dg.buckets) and dg.serial_buckets == []
        again = engine.generate(prompts, params)
        assert [o.samples[0].token_ids for o in again] == \
            [o.samples[0].token_ids for o in cpu]
    if graphs == "serial":
        # k and v stored by a kernel of their own: the graphs captured again, same tokens.
        dg = engine.runner.graphs
        assert dg is not None and dg.graphs
        engine.set_fused_kv_store(False)
        assert not engine.runner.attn.fused_store and dg.graphs
        again = engine.generate(prompts, params)
        assert [o.samples[0].token_ids for o in again] == \
            [o.samples[0].token_ids for o in cpu]


def test_fresh_packing_in_place_for_runs_of_equal_chunks() -> None:
    """Chunks of one length are already packed: no gather or scatter; so are a few runs
    of equal chunks in row order (one group each: prompts of one length and the one the
    step's budget cut); more mixed lengths are gathered right-padded by group and
    scattered back to every row once."""
    from models.engine.runner import MAX_IN_PLACE_RUNS, fresh_groups

    groups, gather, scatter = fresh_groups([(3, 7), (7, 11), (11, 15)])
    assert groups == ((3, 4),) and gather.size == 0 and scatter.size == 0
    groups, gather, scatter = fresh_groups([(0, 4), (4, 8), (8, 11)])
    assert groups == ((2, 4), (1, 3)) and gather.size == 0 and scatter.size == 0
    # Alternating lengths: one run per chunk, too many to read in place.
    rows, at = [], 0
    for n in [4, 2, 4, 2, 4][: MAX_IN_PLACE_RUNS + 1]:
        rows.append((at, at + n))
        at += n
    groups, gather, scatter = fresh_groups(rows)
    assert groups == ((5, 4),)  # 2 is not under half of 4: one group, padded
    assert gather.tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15, 4, 5, 5, 5,
                               10, 11, 11, 11]
    assert gather[scatter].tolist() == list(range(at))
    groups, gather, scatter = fresh_groups([(0, 8), (8, 11), (11, 19), (19, 22), (22, 30)])
    assert groups == ((3, 8), (2, 3))  # 3 is under half of 8: a group of its own
    assert gather[scatter].tolist() == list(range(30))


@pytest.mark.parametrize("budget,lengths", [
    (54, [9] * 6 + [40]),  # one run read in place, then a prompt alone beside decodes
    (50, [9] * 6 + [40]),  # a run and the chunk the budget cut, in place; it continues
    (60, [9, 9, 7, 7, 5, 12]),  # three runs in place, then a prompt beside decodes
])
def test_runs_of_equal_prompts_prefilled_in_place_match_hf(
        model: NeoX, budget: int, lengths: list[int]) -> None:
    """Prompts prefilled together as runs of equal length, read in place: greedy equals
    HF."""
    prompts = [_prompts(1, n, n, seed=21 + i)[0] for i, n in enumerate(lengths)]
    params = _greedy(6)
    engine = Engine(model, None, num_blocks=200, block_size=4, max_batch_tokens=budget)
    outs = engine.generate(prompts, params)
    hf = _hf(model)
    for p, o in zip(prompts, outs, strict=True):
        with torch.no_grad():
            h = hf.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6,
                            do_sample=False, pad_token_id=0, eos_token_id=None)
        assert o.samples[0].token_ids == h[0, len(p):].tolist()


def test_max_batch_tokens_lowered_and_restored(model: NeoX) -> None:
    """A running engine's step budget can go down (not past what its buffers were sized
    for): later steps prefill in smaller chunks, with the same greedy tokens."""
    prompts = _prompts(3, 20, 30, seed=5)
    params = _greedy(4)
    engine = Engine(model, None, num_blocks=200, block_size=4, max_batch_tokens=64)
    engine.set_prefix_caching(False)  # the second run prefills the prompts again
    want = [o.samples[0].token_ids for o in engine.generate(prompts, params)]
    steps = engine.stats["steps"]
    engine.set_max_batch_tokens(8)
    got = [o.samples[0].token_ids for o in engine.generate(prompts, params)]
    assert got == want and engine.stats["steps"] - steps > steps
    for bad in (0, 65):
        with pytest.raises(ValueError, match="max batch tokens"):
            engine.set_max_batch_tokens(bad)
    engine.set_max_batch_tokens(64)
    assert engine.scheduler.max_batch_tokens == 64
