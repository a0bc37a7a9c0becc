"""The sampling schema is written once (specs/sampling.py): the API's line checks
(core/jsonl.py) and the engine's SamplingParams (models/sampling.py) see the same fields,
the same defaults and give the same verdicts."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from core.jsonl import SAMPLING_DEFAULTS, SAMPLING_FIELDS, SamplingFields, check_sampling
from models.sampling import SamplingParams


def test_same_fields_and_defaults() -> None:
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert SAMPLING_FIELDS == fields
    assert set(SamplingFields.model_fields) == fields
    assert SAMPLING_DEFAULTS == SamplingParams().to_dict()


CASES: list[dict[str, Any]] = [
    {}, {"max_tokens": 1}, {"max_tokens": 0}, {"max_tokens": 2.0}, {"max_tokens": True},
    {"min_tokens": 64}, {"min_tokens": 65}, {"min_tokens": -1},
    {"min_tokens": 5, "max_tokens": 4}, {"temperature": 0}, {"temperature": -0.1},
    {"temperature": float("inf")}, {"temperature": "1"}, {"top_k": -1}, {"top_k": -2},
    {"top_k": 50}, {"top_p": 0.0}, {"top_p": 1.0}, {"top_p": 1.01}, {"min_p": 1.0},
    {"min_p": -0.01}, {"repetition_penalty": 0}, {"repetition_penalty": 1.3},
    {"presence_penalty": 2}, {"presence_penalty": -2.5}, {"frequency_penalty": 2.1},
    {"stop": "x"}, {"stop": ["a", "b"]}, {"stop": [""]}, {"stop": ["x" * 257]},
    {"stop": ["s"] * 17}, {"stop": [1]}, {"stop": 3}, {"stop_token_ids": [0, 5]},
    {"stop_token_ids": [-1]}, {"stop_token_ids": [1.5]}, {"stop_token_ids": 3},
    {"ignore_eos": True}, {"ignore_eos": 1}, {"seed": 2**64 - 1}, {"seed": 2**64},
    {"seed": -(2**63)}, {"seed": 1.0}, {"n": 128}, {"n": 129}, {"n": 0}, {"logprobs": 0},
    {"logprobs": 20}, {"logprobs": 21}, {"logprobs": True}, {"bogus": 1},
]


@pytest.mark.parametrize("case", CASES, ids=[repr(c)[:40] for c in CASES])
def test_same_verdicts(case: dict[str, Any]) -> None:
    try:
        SamplingParams.from_dict(case)
        engine_ok, engine_field = True, None
    except (ValueError, TypeError) as exc:
        engine_ok, engine_field = False, str(exc).split(":")[0]
    _, problems = check_sampling(case)
    assert (not problems) == engine_ok, (case, problems)
    if problems:
        assert engine_field in {p[0] for p in problems}
