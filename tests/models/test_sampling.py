"""models/sampling.py against independent references.

References: Hugging Face's logits processors/warpers (the filtered sets must match),
plain per-row torch code written here, a pure-Python splitmix64, scipy's chi-square
test for the draw, and the real GPT-NeoX-20B tokenizer for stop strings.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from models.sampling import (
    IncrementalDetokenizer,
    SampleRow,
    SamplingBatch,
    SamplingParams,
    StopChecker,
    decode_output,
    process_logits,
    row_keys,
    sample,
    uniform_noise,
)
from models.tokenizer import load_tokenizer

# ---------------------------------------------------------------------------------------
# SamplingParams
# ---------------------------------------------------------------------------------------


def test_defaults_match_the_interface():
    p = SamplingParams()
    assert (p.max_tokens, p.min_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (
        64, 0, 1.0, 0, 1.0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.seed, p.n, p.logprobs) == (
        [], [], False, None, 1, None)


def test_round_trip_and_stop_string_accepted():
    p = SamplingParams.from_dict({"stop": "\n", "seed": 7, "logprobs": 0, "top_k": -1})
    assert p.stop == ["\n"]
    assert SamplingParams.from_dict(p.to_dict()) == p


def test_defaults_merge_and_null_means_unset():
    d = {"temperature": 0.5, "max_tokens": None, "stop": None}
    p = SamplingParams.from_dict(d, defaults={"max_tokens": 10, "temperature": 0.0})
    assert (p.temperature, p.max_tokens, p.stop) == (0.5, 10, [])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1}, "temperature: must be >= 0, got -1"),
        ({"temperature": float("nan")}, "temperature: must be finite"),
        ({"top_p": 1.5}, "top_p: must be in (0, 1], got 1.5"),
        ({"top_p": 0}, "top_p: must be in (0, 1], got 0"),
        ({"top_k": -2}, "top_k: must be >= 1, or 0 or -1"),
        ({"min_p": 1.1}, "min_p: must be in [0, 1]"),
        ({"max_tokens": 0}, "max_tokens: must be >= 1, got 0"),
        ({"max_tokens": 5, "min_tokens": 6}, "min_tokens: must be between 0 and max_tokens"),
        ({"repetition_penalty": 0}, "repetition_penalty: must be > 0"),
        ({"presence_penalty": 2.5}, "presence_penalty: must be in [-2, 2]"),
        ({"frequency_penalty": -3}, "frequency_penalty: must be in [-2, 2]"),
        ({"stop": [""]}, "stop: strings must not be empty"),
        ({"stop": ["a"] * 17}, "stop: at most 16 strings"),
        ({"stop": [1]}, "stop: must be a string or a list of strings"),
        ({"stop_token_ids": [-1]}, "stop_token_ids: must be a list of non-negative"),
        ({"n": 0}, "n: must be between 1 and 128"),
        ({"n": 129}, "n: must be between 1 and 128"),
        ({"logprobs": 21}, "logprobs: must be an integer between 0 and 20"),
        ({"seed": 2**64}, "seed: must be a 64-bit integer"),
        # types: bool is not an int, a float is not an int, a string is not a number
        ({"max_tokens": True}, "max_tokens: must be an integer, got True"),
        ({"max_tokens": 10.0}, "max_tokens: must be an integer, got 10.0"),
        ({"temperature": "0.5"}, "temperature: must be a number, got '0.5'"),
        ({"temperature": False}, "temperature: must be a number"),
        ({"seed": 1.5}, "seed: must be a 64-bit integer"),
        ({"logprobs": True}, "logprobs: must be an integer"),
        ({"ignore_eos": 1}, "ignore_eos: must be true or false"),
    ],
)
def test_validation_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as err:
        SamplingParams.from_dict(kwargs)
    assert message in str(err.value)
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match="best_of, foo: unknown sampling parameters"):
        SamplingParams.from_dict({"foo": 1, "best_of": 2, "temperature": 1})
    with pytest.raises(ValueError, match="bar: unknown sampling parameter"):
        SamplingParams.from_dict({}, defaults={"bar": 1})


def test_validate_catches_later_mutation():
    p = SamplingParams()
    p.top_p = 2.0
    with pytest.raises(ValueError, match="top_p"):
        p.validate()


# ---------------------------------------------------------------------------------------
# Counter-based noise
# ---------------------------------------------------------------------------------------

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def py_mix(z: int) -> int:
    """splitmix64's finalizer on Python ints (unbounded, masked): the reference."""
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def py_uniform(seed: int, sample_index: int, position: int, v: int) -> float:
    k = py_mix(seed + GOLDEN)
    k = py_mix(k + sample_index * GOLDEN)
    k = py_mix(k + position * GOLDEN)
    h = py_mix(k + (v + 1) * GOLDEN)
    return ((h >> 41) + 0.5) / 2**23


def test_noise_matches_unsigned_reference_including_negative_and_huge_seeds():
    cases = [(0, 0, 0), (1, 2, 3), (2**64 - 1, 5, 100), (-5, 0, 7), (2**63, 1, 1)]
    seeds = torch.tensor([(s & M64) - (1 << 64) if s & M64 >= 1 << 63 else s
                          for s, _, _ in cases])
    keys = row_keys(seeds, torch.tensor([c[1] for c in cases]),
                    torch.tensor([c[2] for c in cases]))
    u = uniform_noise(keys, 40)
    want = torch.tensor([[py_uniform(s, i, p, v) for v in range(40)] for s, i, p in cases])
    assert torch.equal(u, want.float())
    assert 0 < u.min() and u.max() < 1


def test_noise_extremes_stay_inside_the_open_interval():
    # The largest and smallest 23-bit draws, as float32: a draw of exactly 1 would make
    # the Gumbel noise +inf, and +inf + (-inf) of a masked token is NaN, which argmax picks.
    top = torch.tensor([(1 << 23) - 1, 0], dtype=torch.float32).add_(0.5).mul_(1.0 / (1 << 23))
    assert top[0] < 1 and top[1] > 0
    gumbel = top.log().neg().log().neg()
    assert torch.isfinite(gumbel).all()


def test_masked_tokens_are_never_drawn_over_many_draws():
    # A row allowing one token, sampled at many positions: with noise that can reach
    # +inf, about 1 in 330 draws over a 50k vocabulary picked a masked token.
    vocab, allowed_id, n = 50_432, 1234, 2_000
    params = [SamplingParams(temperature=0.8, seed=7)] * n
    logits = torch.randn(n, vocab)
    bits = np.zeros((n, (vocab + 31) // 32), dtype=np.int32)
    bits[:, allowed_id // 32] = 1 << (allowed_id % 32)
    batch = SamplingBatch.build(
        [SampleRow(params=p, seed=7, position=i) for i, p in enumerate(params)],
        device=torch.device("cpu"), vocab_size=vocab, valid_vocab=vocab, eos_id=None,
        masks=(list(range(n)), bits))
    assert sample(logits, batch).tokens.eq(allowed_id).all()


# ---------------------------------------------------------------------------------------
# sample(): filters, penalties, bans against references
# ---------------------------------------------------------------------------------------


def build(params_list, *, vocab=64, valid=None, eos=None, outputs=None, prompts=None,
          positions=None, seeds=None):
    rows = []
    for r, p in enumerate(params_list):
        rows.append(SampleRow(
            params=p,
            seed=seeds[r] if seeds else 1000 + r,
            position=positions[r] if positions else 0,
            output_ids=outputs[r] if outputs else (),
            prompt_ids=prompts[r] if prompts else (),
        ))
    return SamplingBatch.build(rows, device="cpu", vocab_size=vocab, valid_vocab=valid,
                               eos_id=eos)


def hf_filtered(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The row through HF's warpers, in HF's order (temperature, top-k, top-p, min-p)."""
    x = row[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    x = TemperatureLogitsWarper(p.temperature)(ids, x)
    if p.top_k > 0:
        x = TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1:
        x = TopPLogitsWarper(p.top_p)(ids, x)
    if p.min_p > 0:
        x = MinPLogitsWarper(p.min_p)(ids, x)
    return x[0]


FILTER_CASES = [
    SamplingParams(temperature=0.7),
    SamplingParams(top_k=5),
    SamplingParams(top_k=1),
    SamplingParams(top_k=-1, top_p=0.8),
    SamplingParams(temperature=1.3, top_p=0.5),
    SamplingParams(temperature=0.5, top_k=20, top_p=0.9),
    SamplingParams(min_p=0.1),
    SamplingParams(temperature=2.0, top_k=30, top_p=0.95, min_p=0.05),
    SamplingParams(top_p=1e-6),  # only the top token survives
    SamplingParams(top_k=1000),  # larger than the vocabulary
]


@pytest.mark.parametrize("with_top_p", [False, True])
def test_filtered_sets_match_hf_warpers(with_top_p):
    torch.manual_seed(0)
    cases = [p for p in FILTER_CASES if with_top_p or p.top_p == 1]  # False: topk path
    logits = torch.randn(len(cases), 64) * 3
    x = process_logits(logits, build(cases))
    for r, p in enumerate(cases):
        want = hf_filtered(logits[r], p)
        assert torch.equal(torch.isfinite(x[r]), torch.isfinite(want)), (r, p)
        kept = torch.isfinite(want)
        torch.testing.assert_close(x[r][kept], want[kept])


def test_penalties_match_hf_and_openai_reference():
    torch.manual_seed(1)
    v = 50
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(presence_penalty=0.7, frequency_penalty=0.4),
        SamplingParams(repetition_penalty=0.8, presence_penalty=-1.0, frequency_penalty=2.0),
        SamplingParams(),  # neighbour without penalties stays bit-identical
    ]
    prompts = [[1, 2, 3, 3], [4, 5], [6, 6, 7], [1, 2]]
    outputs = [[3, 8, 8], [4, 9, 9, 9], [7, 10], [1]]
    logits = torch.randn(4, v) * 2
    batch = build([SamplingParams(temperature=0, **{
        k: getattr(p, k) for k in ("repetition_penalty", "presence_penalty",
                                   "frequency_penalty")}) for p in params],
                  vocab=v, prompts=prompts, outputs=outputs)
    got = process_logits(logits, batch)
    for r, p in enumerate(params):
        want = logits[r : r + 1].clone()
        if p.repetition_penalty != 1:
            ids = torch.tensor([prompts[r] + outputs[r]])
            want = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, want)
        want = want[0]
        for t in set(outputs[r]):  # OpenAI: over output tokens only
            want[t] -= p.frequency_penalty * outputs[r].count(t) + p.presence_penalty
        if p.has_penalties:
            torch.testing.assert_close(got[r], want)
        else:
            assert torch.equal(got[r], logits[r])
    assert torch.equal(sample(logits, batch).tokens, got.argmax(-1))


def test_greedy_fast_path_padded_vocab_and_min_tokens_ban():
    torch.manual_seed(2)
    logits = torch.randn(3, 70)
    logits[:, 65] = 100.0  # a padded embedding row: never a token
    logits[0, 4] = 50.0  # EOS, banned while row 0 is under min_tokens
    logits[1, 9] = 50.0  # a stop token id, banned for row 1
    logits[2, 4] = 50.0  # row 2 is past min_tokens: EOS allowed
    params = [SamplingParams(temperature=0, min_tokens=3),
              SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[9]),
              SamplingParams(temperature=0, min_tokens=3)]
    batch = build(params, vocab=70, valid=60, eos=4, positions=[0, 2, 3])
    assert batch.all_greedy
    res = sample(logits, batch)
    ref = logits[:, :60].clone()
    ref[0, 4] = ref[1, 9] = ref[1, 4] = float("-inf")
    assert res.tokens.tolist() == ref.argmax(-1).tolist()
    assert res.tokens[2] == 4
    # ignore_eos: EOS is not banned (it is not a stop), the stop ids still are.
    batch = build([SamplingParams(temperature=0, min_tokens=3, ignore_eos=True)], vocab=70,
                  valid=60, eos=4)
    assert sample(logits[:1], batch).tokens.item() == 4


def test_logprobs_are_under_raw_log_softmax():
    torch.manual_seed(3)
    logits = torch.randn(3, 40)
    params = [SamplingParams(logprobs=5, temperature=0.3, repetition_penalty=1.5),
              SamplingParams(temperature=0), SamplingParams(logprobs=2, top_k=3)]
    batch = build(params, vocab=40, valid=32, outputs=[[1, 2], [], []])
    res = sample(logits, batch)
    ref = torch.log_softmax(logits[:, :32], dim=-1)
    torch.testing.assert_close(res.logprobs, ref.gather(1, res.tokens[:, None])[:, 0])
    assert res.top_ids is not None and res.top_ids.shape == (3, 5)
    want_lp, want_ids = ref.topk(5, dim=-1)
    assert torch.equal(res.top_ids, want_ids)
    torch.testing.assert_close(res.top_logprobs, want_lp)
    assert batch.num_logprobs == [5, None, 2]
    assert sample(logits, build([SamplingParams()] * 3, vocab=40)).top_ids is None


def reference_token(row_logits, p: SamplingParams, seed, sample_index, position):
    """Independent per-row draw: HF's filters, then the exponential race on noise from the
    pure-Python hash."""
    if p.temperature == 0:
        return int(row_logits.argmax())
    x = hf_filtered(row_logits, p)
    u = torch.tensor([py_uniform(seed, sample_index, position, v)
                      for v in range(len(row_logits))], dtype=torch.float32)
    return int((x - torch.log(-torch.log(u))).argmax())


def test_draws_match_per_row_reference():
    torch.manual_seed(4)
    cases = FILTER_CASES + [SamplingParams(temperature=0)]
    logits = torch.randn(len(cases), 64) * 2
    rows = [SampleRow(p, seed=17 * r + 3, sample_index=r % 3, position=r)
            for r, p in enumerate(cases)]
    res = sample(logits, SamplingBatch.build(rows, device="cpu", vocab_size=64))
    want = [reference_token(logits[r], row.params, row.seed, row.sample_index, row.position)
            for r, row in enumerate(rows)]
    assert res.tokens.tolist() == want


def test_a_row_draws_the_same_token_whatever_its_neighbours():
    torch.manual_seed(5)
    target_logits = torch.randn(1, 128)
    target = SampleRow(SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=99),
                       seed=99, sample_index=1, position=17)
    seen = set()
    for trial in range(6):
        n = random.Random(trial).randint(0, 9)
        neighbours = [SampleRow(SamplingParams(temperature=random.Random(i).choice(
            [0, 0.5, 1.5]), top_k=i % 4 * 50, top_p=[1.0, 0.3][i % 2],
            min_p=[0.0, 0.2][i % 3 == 0]), seed=trial * 100 + i, position=i)
            for i in range(n)]
        rows = neighbours[: n // 2] + [target] + neighbours[n // 2 :]
        logits = torch.randn(len(rows), 128)
        logits[n // 2] = target_logits[0]
        res = sample(logits, SamplingBatch.build(rows, device="cpu", vocab_size=128))
        seen.add(res.tokens[n // 2].item())
    assert len(seen) == 1
    # The draw does depend on the counter: other positions give other tokens.
    toks = set()
    for pos in range(20):
        row = SampleRow(target.params, seed=99, sample_index=1, position=pos)
        toks.add(sample(target_logits, SamplingBatch.build(
            [row], device="cpu", vocab_size=128)).tokens.item())
    assert len(toks) > 3


@pytest.mark.parametrize(
    "params",
    [SamplingParams(), SamplingParams(temperature=0.6, top_k=4),
     SamplingParams(temperature=1.4, top_p=0.7), SamplingParams(min_p=0.15)],
)
def test_empirical_frequencies_match_the_filtered_softmax(params):
    torch.manual_seed(6)
    v, n = 10, 6000
    row = torch.randn(v) * 1.5
    probs = torch.softmax(hf_filtered(row, params), dim=-1).double()
    rows = [SampleRow(params, seed=s) for s in range(n)]  # one row per seed
    res = sample(row.expand(n, v), SamplingBatch.build(rows, device="cpu", vocab_size=v))
    counts = torch.bincount(res.tokens, minlength=v).double()
    kept = probs > 0
    assert counts[~kept].sum() == 0  # filtered tokens never drawn
    expected = probs[kept] / probs[kept].sum() * n  # float32 softmax sums to 1 ± 1 ulp
    chi2, pvalue = stats.chisquare(counts[kept].numpy(), expected.numpy())
    assert pvalue > 1e-4, (chi2, counts.tolist(), (probs * n).tolist())


def test_large_vocab_mixed_batch_runs_and_stays_in_range():
    torch.manual_seed(7)
    v, valid = 50432, 50277
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50), SamplingParams(
        temperature=0), SamplingParams(min_p=0.05, repetition_penalty=1.1, logprobs=3)]
    batch = build(params, vocab=v, valid=valid, outputs=[[5, 6], [], [7, 7]],
                  prompts=[[], [], [1, 2, 3]])
    logits = torch.randn(3, v)
    logits[:, valid:] = 1e4
    res = sample(logits, batch)
    assert (res.tokens < valid).all()
    assert res.tokens[1] == logits[1, :valid].argmax()


# ---------------------------------------------------------------------------------------
# Stop handling with the real GPT-NeoX-20B tokenizer
# ---------------------------------------------------------------------------------------


class CountingDecoder:
    """The project tokenizer, recording how many ids each decode call saw."""

    def __init__(self, tok):
        self.tok = tok
        self.lengths: list[int] = []

    def decode(self, ids):
        self.lengths.append(len(ids))
        return self.tok.decode(ids)


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return load_tokenizer(tokenizer_path)


TEXT = "Hello world. The end is near 🙂 日本語のテキスト. Done!\nNext line — ünïcödé 👩‍👩‍👧 ok"


def run_checker(tok, params, ids, eos_id=0):
    checker = StopChecker(params, tok, eos_id=eos_id)
    reason = None
    for t in ids:
        reason = checker.append(t)
        if reason:
            break
    if reason is None:
        reason = checker.finish_length()
    return checker, reason


def test_text_tokens_split_characters(tok):
    ids = tok.encode(TEXT)
    # The point of the fixture: some characters span several tokens.
    assert any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize(
    "stop",
    [["The e"], ["d. Th"], ["🙂"], ["本語"], ["語の"], ["👩"], ["\nNext"], ["ok"],
     ["near", "d. Th"],  # earliest occurrence wins, not list order
     ["zzz"]],
)
def test_stop_strings_across_token_boundaries(tok, stop):
    ids = tok.encode(TEXT)
    checker, reason = run_checker(tok, SamplingParams(stop=stop, max_tokens=500), ids)
    hits = [TEXT.find(s) for s in stop if s in TEXT]
    if hits:
        assert reason == "stop"
        assert checker.text == TEXT[: min(hits)]
        assert checker.stop_reason in stop
        assert "\ufffd" not in checker.text
    else:
        assert reason == "length" and checker.text == TEXT
    assert checker.token_ids == ids[: len(checker.token_ids)]


def test_stop_string_must_end_after_min_tokens(tok):
    text = "ab ab ab ab ab ab"
    ids = tok.encode(text)
    checker, reason = run_checker(tok, SamplingParams(stop=["ab"], min_tokens=4,
                                                      max_tokens=50), ids)
    # Stop strings count once the sample has min_tokens tokens: the first "ab" that
    # completes with the 4th token ends it.
    assert reason == "stop" and len(checker.token_ids) == 4
    assert checker.text == "ab ab ab "



def test_eos_stop_token_and_length(tok):
    ids = tok.encode("one two three four")
    checker, reason = run_checker(tok, SamplingParams(max_tokens=50), ids[:2] + [0] + ids[2:])
    assert (reason, checker.text, checker.token_ids) == ("stop", "one two", ids[:2] + [0])
    assert checker.stop_reason == 0
    stop_id = ids[2]
    checker, reason = run_checker(tok, SamplingParams(stop_token_ids=[stop_id], stop=["zz"]),
                                  ids)
    assert (reason, checker.text) == ("stop", "one two")
    checker, reason = run_checker(tok, SamplingParams(max_tokens=3), ids)
    assert (reason, checker.text) == ("length", tok.decode(ids[:3]))
    checker, reason = run_checker(tok, SamplingParams(ignore_eos=True, max_tokens=3),
                                  [ids[0], 0, ids[1]])
    assert reason == "length" and checker.token_ids == [ids[0], 0, ids[1]]
    assert decode_output(tok, ids[:2] + [0], SamplingParams(), eos_id=0) == "one two"
    assert decode_output(tok, ids[:3], SamplingParams(stop_token_ids=[stop_id]),
                         eos_id=0) == "one two"
    checker = StopChecker(SamplingParams(stop=["x"]), tok, eos_id=0)
    checker.append(ids[0])
    assert checker.finish_abort() == "abort" and checker.text == "one"


def test_incremental_detokenizer_is_exact_and_windowed(tok):
    text = (TEXT + " ") * 30
    ids = tok.encode(text)
    dec = CountingDecoder(tok)
    detok = IncrementalDetokenizer(dec)
    deltas = [detok.append(t) for t in ids]
    assert "".join(deltas) + detok.flush() == text
    assert not any("\ufffd" in d for d in deltas)  # partial UTF-8 is held back
    assert max(dec.lengths) <= 8  # O(window) per step, not O(output)


def test_incremental_detokenizer_on_random_tokens(tok):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(2, 50277) for _ in range(rng.randint(1, 40))]
        detok = IncrementalDetokenizer(tok)
        text = "".join(detok.append(t) for t in ids) + detok.flush()
        assert text == tok.decode(ids)


def test_stop_checker_without_stop_strings_never_detokenizes(tok):
    dec = CountingDecoder(tok)
    ids = tok.encode(TEXT)
    checker, reason = run_checker(dec, SamplingParams(max_tokens=len(ids)), ids)
    assert dec.lengths == []
    assert checker.text == TEXT and reason == "length"
    assert len(dec.lengths) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_the_same_integers_and_tokens_as_cpu():
    torch.manual_seed(8)
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.2),
              SamplingParams(temperature=0, logprobs=3), SamplingParams(min_p=0.1)]
    rows = [SampleRow(p, seed=11 * r, position=r, output_ids=[1, 2, 2], prompt_ids=[3])
            for r, p in enumerate(params)]
    logits = torch.randn(3, 50432)
    cpu = SamplingBatch.build(rows, device="cpu", vocab_size=50432, valid_vocab=50277)
    gpu = SamplingBatch.build(rows, device="cuda", vocab_size=50432, valid_vocab=50277)
    # The uniforms are exact (integers, then exact float ops); only log() may differ.
    assert torch.equal(uniform_noise(cpu.keys, 1000), uniform_noise(gpu.keys, 1000).cpu())
    assert torch.equal(sample(logits, cpu).tokens, sample(logits.cuda(), gpu).tokens.cpu())


def test_noise_keys_fold_seeds_like_python():
    # A seed given as a huge unsigned value and as its signed twin draw the same.
    a = SampleRow(SamplingParams(seed=2**64 - 1), seed=2**64 - 1)
    b = SampleRow(SamplingParams(seed=-1), seed=-1)
    ka = SamplingBatch.build([a], device="cpu", vocab_size=8).keys
    kb = SamplingBatch.build([b], device="cpu", vocab_size=8).keys
    assert torch.equal(ka, kb)
    assert math.isfinite(float(ka.item()))


def test_samples_of_one_request_differ_by_index_and_bf16_logits_work():
    torch.manual_seed(9)
    row = torch.randn(1, 256).to(torch.bfloat16)
    p = SamplingParams(n=8, seed=5)
    rows = [SampleRow(p, seed=5, sample_index=i) for i in range(8)]
    res = sample(row.expand(8, 256), SamplingBatch.build(rows, device="cpu", vocab_size=256))
    assert len(set(res.tokens.tolist())) > 1  # n samples are independent draws
    greedy = SamplingBatch.build([SampleRow(SamplingParams(temperature=0), seed=0)],
                                 device="cpu", vocab_size=256)
    assert sample(row, greedy).tokens.item() == row.float().argmax().item()
    assert sample(torch.zeros(0, 256), SamplingBatch.build(
        [], device="cpu", vocab_size=256)).tokens.shape == (0,)
