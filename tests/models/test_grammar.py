"""Constrained decoding: with a schema, regex or choice list, every sample that finishes
with ``stop`` is a complete match — on random weights, whose unconstrained output is
noise — and unconstrained requests in the same batch are untouched."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
import torch

from models.config import get_preset
from models.engine import Engine
from models.grammar import Grammars, allowed_ids
from models.model import NeoX, init_random_
from models.sampling import SamplingParams, disallowed
from models.tokenizer import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]},
        "score": {"type": "integer", "minimum": -5, "maximum": 5},
        "ok": {"type": "boolean"},
        "who": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["name", "age"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]},
                 "minItems": 1, "maxItems": 3},
    },
    "required": ["label", "score", "ok", "who", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return load_tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def model(tok) -> NeoX:
    model = init_random_(NeoX(get_preset("tiny").replace(max_position=256)), seed=3).eval()
    with torch.no_grad():  # padded embedding rows would win every draw if allowed
        model.embed_out.weight[tok.vocab_size:] = 1.0
        model.final_layer_norm.bias.fill_(1.0)
    return model


def rf(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema,
                                                   "strict": True}}


def test_json_schema_outputs_validate_on_random_weights(model: NeoX, tok) -> None:
    engine = Engine(model, tok, num_blocks=400, block_size=8)
    params = [SamplingParams(response_format=rf(SCHEMA), max_tokens=160, seed=s,
                             temperature=t, n=n)
              for s, t, n in [(1, 1.0, 2), (2, 0.0, 1), (3, 0.7, 1), (4, 1.0, 3), (5, 1.5, 1)]]
    outs = engine.generate(["Review: great film. JSON:"] * len(params), params)
    samples = [s for o in outs for s in o.samples]
    stopped = [s for s in samples if s.finish_reason == "stop"]
    assert len(stopped) >= 4, [(s.finish_reason, s.text) for s in samples]
    for s in stopped:
        jsonschema.validate(json.loads(s.text), SCHEMA)
        assert s.token_ids[-1] == tok.eos_id  # the grammar ended it, through EOS
    for s in samples:
        assert all(t < tok.vocab_size for t in s.token_ids)
    # Blocks are freed as samples finish; a step launched for rows that finished as it
    # ran (overlap) is applied by the next step() and returns nothing.
    assert engine.blocks.num_free == engine.blocks.capacity
    while engine.has_unfinished():
        assert engine.step() == []


def test_json_object_regex_choice_and_unconstrained_neighbours(model: NeoX, tok) -> None:
    engine = Engine(model, tok, num_blocks=400, block_size=8)
    free = SamplingParams(max_tokens=12, seed=9, temperature=1.0, ignore_eos=True)
    alone = engine.generate(["Once upon"], free)[0].samples[0].token_ids
    params = [
        SamplingParams(response_format={"type": "json_object"}, max_tokens=120, seed=1,
                       temperature=0.8),
        SamplingParams(regex=r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])", max_tokens=20, seed=2),
        SamplingParams(choice=["yes", "no", "maybe \"so\""], max_tokens=20, seed=3, n=4),
        free,
    ]
    outs = engine.generate(["A:", "Date:", "Answer:", "Once upon"], params)
    obj = outs[0].samples[0]
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.text), dict)
    date = outs[1].samples[0]
    assert date.finish_reason == "stop" and re.fullmatch(r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])",
                                                         date.text), date.text
    for s in outs[2].samples:
        assert s.finish_reason == "stop" and s.text in {"yes", "no", 'maybe "so"'}, s.text
    # An unconstrained request draws exactly what it draws alone.
    assert outs[3].samples[0].token_ids == alone


def test_constrained_logprobs_are_the_models(model: NeoX, tok) -> None:
    engine = Engine(model, tok, num_blocks=100, block_size=8)
    out = engine.generate(["Q:"], SamplingParams(choice=["yes", "no"], max_tokens=5,
                                                 logprobs=3, temperature=0))[0].samples[0]
    assert out.finish_reason == "stop" and out.text in {"yes", "no"}
    for e in out.logprobs:  # finite: alternatives the grammar forbade are still reported
        assert np.isfinite(e["logprob"]) and all(np.isfinite(lp) for _, lp in e["top"])


def test_bad_grammars_are_request_errors(model: NeoX, tok) -> None:
    engine = Engine(model, tok, num_blocks=100, block_size=8)
    with pytest.raises(ValueError, match="^regex: .*look-around"):
        engine.add_request("r", "x", SamplingParams(regex="(?<=a)b"))
    with pytest.raises(ValueError, match="^response_format: "):
        engine.add_request("s", "x", SamplingParams(response_format=rf(
            {"type": "object", "patternProperties": {"(?<=a)": {}}})))
    assert not engine.has_unfinished()
    # Token-id-only engines cannot constrain text.
    bare = Engine(model, None, num_blocks=20, block_size=8)
    with pytest.raises(ValueError, match="tokenizer"):
        bare.add_request("t", [1, 2], SamplingParams(choice=["a"]))


def test_masks_cover_the_padded_vocabulary(tok) -> None:
    g = Grammars(tok, 50432, tok.eos_id)
    m = g.matcher(g.grammar({"type": "choice", "choices": ["yes", "no"]}))
    ids = allowed_ids(g.fill_masks([m])[0], 50432)
    assert ids.max() < tok.vocab_size
    assert {tok.decode([int(i)]) for i in ids} == {"y", "ye", "yes", "n", "no"}
    for t in tok.encode("yes"):
        assert m.consume_token(t)
    assert allowed_ids(g.fill_masks([m])[0], 50432).tolist() == [tok.eos_id]


def test_json_strings_never_take_raw_control_characters(tok) -> None:
    """Inside a JSON string only escaped control characters are JSON (the failure that
    ruled xgrammar out: bench/grammar_cpu.py)."""
    g = Grammars(tok, 50432, tok.eos_id)
    m = g.matcher(g.grammar({"type": "json_schema", "schema": {
        "type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}}))
    for t in tok.encode('{"s":"ab'):
        assert m.consume_token(t)
    ids = allowed_ids(g.fill_masks([m])[0], 50432)
    assert len(ids) > 1000  # free text
    raw = [int(i) for i in ids if any(b < 0x20 for b in tok.token_bytes(int(i)))]
    assert raw == []


def test_byte_tokenizer_grammar() -> None:
    tok = load_tokenizer(None)
    g = Grammars(tok, 512, tok.eos_id)
    m = g.matcher(g.grammar({"type": "regex", "pattern": "[0-9]{2}"}))
    assert [tok.decode([int(i)]) for i in allowed_ids(g.fill_masks([m])[0], 512)] == list(
        "0123456789")


def test_matchers_are_independent_copies(tok) -> None:
    """Matchers come from one kept per grammar: each starts fresh and none shares state."""
    g = Grammars(tok, 50432, tok.eos_id)
    grammar = g.grammar({"type": "choice", "choices": ["yes", "no"]})
    a, b = g.matcher(grammar), g.matcher(grammar)
    for t in tok.encode("yes"):
        assert a.consume_token(t)
    assert allowed_ids(g.fill_masks([a])[0], 50432).tolist() == [tok.eos_id]
    fresh = allowed_ids(g.fill_masks([g.matcher(grammar)])[0], 50432)
    assert allowed_ids(g.fill_masks([b])[0], 50432).tolist() == fresh.tolist()
    assert len(fresh) == 5


def test_packed_masks_unpack_on_the_device_like_numpy() -> None:
    rng = np.random.default_rng(0)
    words = (50432 + 31) // 32
    masks = rng.integers(-2**31, 2**31, size=(7, words), dtype=np.int64).astype(np.int32)
    want = np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little")[:, :50277] == 0
    got = disallowed(torch.from_numpy(masks).view(torch.uint8), 50277)
    assert got.dtype == torch.bool and np.array_equal(got.numpy(), want)
