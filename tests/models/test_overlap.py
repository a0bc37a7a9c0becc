"""The engine's overlapped step loop (step N+1 launched before step N's tokens are read)
gives exactly what the one-step-at-a-time loop gives, on tiny CPU models.

Each scenario runs twice, ``overlap=True`` and ``overlap=False``, from the same requests
added at the same step numbers; the outputs must be identical token for token (greedy
and seeded sampling draw from counter-based noise keyed by seed, sample and position,
so the batch a sequence happens to run in does not matter).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import jsonschema
import pytest
import torch

from models.config import get_preset
from models.engine import Engine, RequestOutput
from models.engine.runner import DecodeGraphs
from models.model import NeoX, init_random_
from models.sampling import SamplingParams
from models.tokenizer import load_tokenizer

VOCAB = 512


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> NeoX:
    config = get_preset("tiny").replace(vocab_size=VOCAB, max_position=128)
    return init_random_(NeoX(config), seed=5).eval()


def _prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    r = random.Random(seed)
    return [[r.randrange(2, VOCAB) for _ in range(r.randint(lo, hi))] for _ in range(n)]


Arrival = tuple[int, str, list[int] | str, SamplingParams]


def _run(engine: Engine, arrivals: list[Arrival], aborts: dict[int, list[str]] | None = None,
         scores: dict[int, list[tuple[list[int], list[int]]]] | None = None,
         ) -> tuple[dict[str, RequestOutput], dict[int, list]]:
    """Add requests (and abort them, and score pairs) at their step numbers; step until
    all is done. Returns the outputs by request id and the score results by step."""
    out: dict[str, RequestOutput] = {}
    scored: dict[int, list] = {}
    pending = sorted(arrivals, key=lambda a: a[0])
    step = 0
    while pending or engine.has_unfinished() or (scores and max(scores) >= step):
        while pending and pending[0][0] <= step:
            _, rid, prompt, params = pending.pop(0)
            engine.add_request(rid, prompt, params)
        for rid in (aborts or {}).get(step, []):
            engine.abort(rid)
        if scores and step in scores:
            scored[step] = engine.score(scores[step])  # steps the engine meanwhile
        for o in engine.step():
            out[o.request_id] = o
        step += 1
        assert step < 5000
    sched = engine.scheduler
    engine.blocks.check(sched.held_tables())
    assert engine.blocks.num_free == engine.blocks.capacity
    assert sched.demand == 0 and not sched.running and not sched.waiting
    return out, scored


def _both(make: Callable[[bool], Engine], arrivals: list[Arrival], **kw,
          ) -> tuple[tuple[dict, dict], tuple[dict, dict], Engine]:
    on_engine = make(True)
    on = _run(on_engine, arrivals, **kw)
    off = _run(make(False), arrivals, **kw)
    return on, off, on_engine


def _summary(outs: dict[str, RequestOutput]) -> dict[str, list]:
    """Everything a request reports but logprob values (see :func:`_same`): a row's float
    arithmetic may differ in its last bits with the batch it runs in."""
    def ids(entries: list[dict] | None) -> list | None:
        return None if entries is None else [
            (e["token_id"], [i for i, _ in e["top"]]) for e in entries]

    return {rid: [(s.index, s.token_ids, s.text, s.finish_reason, s.stop_reason,
                   ids(s.logprobs)) for s in o.samples]
            + [o.prompt_tokens, o.cached_tokens, o.error]
            for rid, o in outs.items()}


def _logprobs(outs: dict[str, RequestOutput]) -> list[float]:
    return [v for rid in sorted(outs) for s in outs[rid].samples for e in (s.logprobs or [])
            for v in [e["logprob"], *(lp for _, lp in e["top"])]]


def _same(a: dict[str, RequestOutput], b: dict[str, RequestOutput],
          skip: tuple[str, ...] = ()) -> None:
    """``a`` and ``b`` report the same (logprob values to 1e-4), but for ``skip``."""
    a = {k: v for k, v in a.items() if k not in skip}
    b = {k: v for k, v in b.items() if k not in skip}
    assert _summary(a) == _summary(b)
    assert _logprobs(a) == pytest.approx(_logprobs(b), abs=1e-4)


def _mixed(seed: int, n: int, max_position: int = 128) -> list[Arrival]:
    """Greedy and sampled requests (top-k/top-p, n > 1, logprobs, min_tokens, stop
    tokens) arriving over the first steps."""
    r = random.Random(seed)
    out: list[Arrival] = []
    for i, prompt in enumerate(_prompts(n, 3, 40, seed)):
        kind = i % 5
        max_tokens = r.randint(1, 30)
        if kind == 0:
            p = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        elif kind == 1:
            p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=max_tokens,
                               seed=r.randrange(1000), n=r.choice([1, 2, 3]))
        elif kind == 2:
            p = SamplingParams(temperature=0.8, top_k=20, max_tokens=max_tokens, seed=i,
                               logprobs=2, min_tokens=min(3, max_tokens))
        elif kind == 3:  # a stop token drawn often enough to end some samples early
            p = SamplingParams(temperature=1.5, max_tokens=max_tokens, seed=i,
                               stop_token_ids=list(range(2, 60)))
        else:
            p = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0, n=2,
                               ignore_eos=True)
        out.append((r.randint(0, 12), f"r{i}", prompt, p))
    return out


def test_mixed_workload_same_outputs(model: NeoX) -> None:
    arrivals = _mixed(1, 24)

    def make(overlap: bool) -> Engine:
        return Engine(model, None, num_blocks=400, block_size=4, max_num_seqs=16,
                      max_batch_tokens=64, overlap=overlap)

    (on, _), (off, _), engine = _both(make, arrivals)
    _same(on, off)
    assert len(on) == len(arrivals)
    # Steady decode did overlap: decode rows read the previous step's tokens on device.
    assert engine.stats["overlapped_steps"] > 0


def test_tiny_kv_budget_preempts_and_matches(model: NeoX) -> None:
    arrivals = _mixed(2, 16)

    def make(overlap: bool) -> Engine:
        return Engine(model, None, num_blocks=30, block_size=4, max_batch_tokens=32,
                      kv_overcommit=100.0, overlap=overlap)

    (on, _), (off, _), engine = _both(make, arrivals)
    assert engine.stats["preemptions"] > 0
    _same(on, off)


def test_decode_graph_layout_matches(model: NeoX) -> None:
    """The static-buffer decode path (graphs replayed uncaptured on CPU), whose tokens
    are filled on the device from the previous step's samples."""
    arrivals = _mixed(3, 12)

    def make(overlap: bool) -> Engine:
        engine = Engine(model, None, num_blocks=400, block_size=4, max_num_seqs=8,
                        overlap=overlap)
        engine.runner.graphs = DecodeGraphs(engine.runner, 8, capture=False)
        return engine

    (on, _), (off, _), engine = _both(make, arrivals)
    _same(on, off)
    assert engine.stats["graph_steps"] > 0 and engine.stats["overlapped_steps"] > 0


def test_abort_mid_run(model: NeoX) -> None:
    prompts = _prompts(4, 5, 20, seed=4)
    params = [SamplingParams(temperature=0, max_tokens=25, ignore_eos=True),
              SamplingParams(temperature=1.0, max_tokens=25, seed=7, n=3),
              SamplingParams(temperature=1.0, max_tokens=25, seed=8),
              SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)]
    arrivals = [(0, f"a{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params,
                                                                   strict=True))]
    aborts = {6: ["a1", "a2"], 9: ["a0"]}

    def make(overlap: bool) -> Engine:
        return Engine(model, None, num_blocks=200, block_size=4, overlap=overlap)

    (on, _), (off, _), _ = _both(make, arrivals, aborts=aborts)
    full = _run(make(False), arrivals)[0]
    _same({"a3": on["a3"]}, {"a3": off["a3"]})
    _same({"a3": on["a3"]}, {"a3": full["a3"]})
    for rid in ("a0", "a1", "a2"):
        for res in (on, off):
            samples = res[rid].samples
            assert [s.finish_reason for s in samples] == ["abort"] * len(samples)
            for s in samples:  # what was generated before the abort is the full run's
                ref = full[rid].samples[s.index].token_ids
                assert s.token_ids == ref[: len(s.token_ids)]


def test_scoring_mixed_with_generation(model: NeoX) -> None:
    pairs = [(p[:-4], p[-4:]) for p in _prompts(6, 20, 50, seed=6)]
    arrivals = _mixed(7, 10)

    def make(overlap: bool) -> Engine:
        return Engine(model, None, num_blocks=40, block_size=4, max_batch_tokens=32,
                      kv_overcommit=100.0, overlap=overlap)

    (on, on_scores), (off, off_scores), _ = _both(make, arrivals,
                                                  scores={2: pairs, 5: pairs[:3]})
    _same(on, off)
    assert sorted(on_scores) == sorted(off_scores) == [2, 5]
    assert len(on_scores[2]) == len(pairs)
    for step, results in on_scores.items():
        for a, b in zip(results, off_scores[step], strict=True):
            assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
            assert a.is_greedy == b.is_greedy and [i for i, _ in a.top] == [i for i, _ in b.top]


def test_penalties_stay_exact(model: NeoX) -> None:
    """Penalised samples read their earlier tokens on the host: their steps are read
    back before the next is scheduled, next to overlapped plain requests."""
    prompts = _prompts(4, 5, 15, seed=9)
    params = [SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3,
                             ignore_eos=True),
              SamplingParams(temperature=1.0, max_tokens=20, seed=3, presence_penalty=0.5,
                             frequency_penalty=0.3),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.0, max_tokens=20, seed=4)]
    arrivals = [(i, f"p{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params,
                                                                   strict=True))]

    def make(overlap: bool) -> Engine:
        return Engine(model, None, num_blocks=200, block_size=4, overlap=overlap)

    (on, _), (off, _), _ = _both(make, arrivals)
    _same(on, off)


def test_stop_strings_and_grammar_with_text(tokenizer_path) -> None:
    tok = load_tokenizer(tokenizer_path)
    model = init_random_(NeoX(get_preset("tiny").replace(max_position=128)), seed=7).eval()
    with torch.no_grad():  # padded embedding rows would win every draw if allowed
        model.embed_out.weight[tok.vocab_size:] = 1.0
        model.final_layer_norm.bias.fill_(1.0)
    base = Engine(model, tok, num_blocks=100, block_size=8).generate(
        ["The quick brown fox"], SamplingParams(temperature=0, max_tokens=30,
                                                ignore_eos=True))[0].samples[0].text
    stop = next(base[i:i + 3] for i in range(6, len(base) - 3)
                if "\ufffd" not in base[i:i + 3])
    arrivals: list[Arrival] = [
        (0, "greedy-stop", "The quick brown fox",
         SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop, "zz"])),
        (0, "sampled-stop", "Once upon a time",
         SamplingParams(temperature=1.0, max_tokens=30, seed=2, n=2, stop=[" the", "."])),
        (1, "choice", "Answer:",
         SamplingParams(choice=["yes", "no", "maybe"], max_tokens=10, seed=3, n=2)),
        (2, "plain", "Hello", SamplingParams(temperature=0.7, max_tokens=20, seed=5)),
    ]

    def make(overlap: bool) -> Engine:
        return Engine(model, tok, num_blocks=100, block_size=8, overlap=overlap)

    (on, _), (off, _), _ = _both(make, arrivals)
    _same(on, off)
    assert on["greedy-stop"].samples[0].stop_reason == stop
    assert {s.text for s in on["choice"].samples} <= {"yes", "no", "maybe"}


SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1,
                 "maxItems": 2},
    },
    "required": ["label", "score", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def text_model(tokenizer_path) -> tuple[NeoX, object]:
    tok = load_tokenizer(tokenizer_path)
    model = init_random_(NeoX(get_preset("tiny").replace(max_position=128)), seed=7).eval()
    with torch.no_grad():  # padded embedding rows would win every draw if allowed
        model.embed_out.weight[tok.vocab_size:] = 1.0
        model.final_layer_norm.bias.fill_(1.0)
    return model, tok


def _check_schema_outputs(outs: dict[str, RequestOutput], rids: list[str]) -> None:
    assert rids
    for rid in rids:
        for s in outs[rid].samples:
            if s.finish_reason == "stop":
                jsonschema.validate(json.loads(s.text), SCHEMA)


def _structured(seed: int, n: int, steps: int = 6) -> list[Arrival]:
    """JSON-schema requests (n = 1..3, greedy and sampled, logprobs), a choice, a regex
    and unconstrained neighbours (a penalised one among them), arriving over the first
    steps."""
    r = random.Random(seed)
    rf = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}
    out: list[Arrival] = []
    for i in range(n):
        kind = i % 5
        if kind in (0, 1):
            p = SamplingParams(response_format=rf, max_tokens=r.randint(20, 60), seed=i,
                               temperature=[0.0, 0.8, 1.2][i % 3], n=r.choice([1, 2, 3]),
                               logprobs=1 if i % 4 == 0 else None)
        elif kind == 2:
            p = SamplingParams(choice=["yes", "no", "maybe"], max_tokens=8, seed=i, n=2)
        elif kind == 3:
            p = SamplingParams(regex=r"[0-9]{2}-[a-c]{1,3}", max_tokens=12, seed=i,
                               temperature=1.0)
        else:
            p = SamplingParams(temperature=1.0, max_tokens=r.randint(5, 25), seed=i,
                               presence_penalty=0.5 if i % 2 else 0.0)
        out.append((r.randint(0, steps), f"s{i}", f"Item {i} as JSON:", p))
    return out


def test_constrained_steps_overlap_and_match(text_model) -> None:
    """Grammar-constrained rows (n > 1, forks, choice, regex) next to unconstrained
    ones: the forward of each step is launched before the previous step's tokens are
    read, and the outputs equal the one-step-at-a-time loop's."""
    model, tok = text_model
    arrivals = _structured(1, 15)

    def make(overlap: bool) -> Engine:
        return Engine(model, tok, num_blocks=300, block_size=8, max_num_seqs=16,
                      overlap=overlap)

    (on, _), (off, _), engine = _both(make, arrivals)
    _same(on, off)
    _check_schema_outputs(on, [rid for _, rid, _, p in arrivals if p.response_format])
    # Every step has constrained rows here (they last longest), and they overlapped.
    assert engine.stats["overlapped_steps"] > engine.stats["steps"] // 2


def test_only_constrained_rows_overlap(text_model) -> None:
    model, tok = text_model
    rf = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}
    arrivals: list[Arrival] = [
        (0, f"j{i}", f"Row {i}:", SamplingParams(response_format=rf, max_tokens=60, seed=i,
                                                 temperature=0.9)) for i in range(6)]

    def make(overlap: bool) -> Engine:
        return Engine(model, tok, num_blocks=200, block_size=8, overlap=overlap)

    (on, _), (off, _), engine = _both(make, arrivals)
    _same(on, off)
    _check_schema_outputs(on, list(on))
    assert any(s.finish_reason == "stop" for o in on.values() for s in o.samples)
    assert engine.stats["overlapped_steps"] > 0


def test_complete_match_is_not_decoded_again(text_model) -> None:
    """Once a grammar is complete its mask allows only EOS: the step after the one that
    draws it schedules no row for the sample (as max_tokens does), so overlap runs no
    more steps than the one-step-at-a-time loop."""
    model, tok = text_model
    rf = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}
    arrivals: list[Arrival] = [
        (0, "c", "Pick:", SamplingParams(choice=["yes", "no"], max_tokens=10, seed=1)),
        (0, "j", "Row:", SamplingParams(response_format=rf, max_tokens=60, seed=2,
                                        temperature=0)),
    ]
    engines = []

    def make(overlap: bool) -> Engine:
        engines.append(Engine(model, tok, num_blocks=100, block_size=8, overlap=overlap))
        return engines[-1]

    (on, _), (off, _), _ = _both(make, arrivals)
    _same(on, off)
    assert [s.finish_reason for o in on.values() for s in o.samples] == ["stop", "stop"]
    assert engines[0].stats["steps"] == engines[1].stats["steps"]


def test_constrained_rows_preempted_and_aborted(text_model) -> None:
    """A KV budget too small for the batch preempts constrained samples (their matchers
    keep their state while they wait) and an abort lands mid-run."""
    model, tok = text_model
    arrivals = _structured(2, 12, steps=3)

    def make(overlap: bool) -> Engine:
        return Engine(model, tok, num_blocks=24, block_size=8, max_batch_tokens=64,
                      kv_overcommit=100.0, overlap=overlap)

    aborts = {5: ["s0"]}
    (on, _), (off, _), engine = _both(make, arrivals, aborts=aborts)
    assert engine.stats["preemptions"] > 0
    _same(on, off, skip=("s0",))  # the abort lands at another token in each mode
    assert all(s.finish_reason == "abort" for s in on["s0"].samples)
    _check_schema_outputs(on, [rid for _, rid, _, p in arrivals
                               if p.response_format and rid != "s0"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_overlap_on_and_off_agree(model: NeoX) -> None:
    """On the GPU: decode graphs fed from the previous step's samples on the device, a
    tight KV budget (preemptions), n > 1, stop tokens, seeded sampling and an abort."""
    gpu_model = init_random_(NeoX(model.config), seed=5).eval().cuda()
    arrivals = _mixed(11, 32)
    aborts = {8: ["r3"]}

    def make(overlap: bool) -> Engine:
        return Engine(gpu_model, None, num_blocks=80, block_size=4, max_num_seqs=16,
                      max_batch_tokens=64, kv_overcommit=100.0, cuda_graphs=True,
                      overlap=overlap)

    (on, _), (off, _), engine = _both(make, arrivals, aborts=aborts)
    assert engine.stats["graph_steps"] > 0 and engine.stats["overlapped_steps"] > 0
    assert engine.stats["preemptions"] > 0
    assert set(on) == set(off)
    _same(on, off, skip=("r3",))  # the aborted request stops at another step in each mode
