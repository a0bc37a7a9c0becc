"""Line-by-line validation of native and OpenAI Batch JSONL: every error names the line,
the field and what was expected."""

from __future__ import annotations

import json

import pytest

from core.jsonl import LineValidator, check_defaults, check_sampling, parse_json_line


def run(lines: list[bytes | str], fmt: str = "native", **kw):
    v = LineValidator(fmt, **kw)  # type: ignore[arg-type]
    parsed = [p for p in (v.feed(x if isinstance(x, bytes) else x.encode()) for x in lines) if p]
    return parsed, v.finish(), v


def errors_of(lines, fmt="native", **kw) -> list[str]:
    parsed, file_errors, _ = run(lines, fmt, **kw)
    return [str(e) for p in parsed for e in p.errors] + [str(e) for e in file_errors]


def openai_line(custom_id: str = "a", **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                       "body": {"model": "gpt-neox-20b", "prompt": "hi", **body}})


def test_native_valid_line() -> None:
    parsed, errs, _ = run(['{"prompt": "Hello", "custom_id": "x", "max_tokens": 5, '
                           '"temperature": 0, "stop": "\\n"}'])
    assert errs == [] and parsed[0].ok
    p = parsed[0]
    assert (p.prompt, p.custom_id, p.line) == ("Hello", "x", 1)
    assert p.params == {"max_tokens": 5, "temperature": 0, "stop": ["\n"]}


def test_token_id_prompt_and_nulls_mean_default() -> None:
    parsed, _, _ = run(['{"prompt": [1, 2, 3], "seed": null, "top_p": null}'])
    assert parsed[0].ok and parsed[0].prompt == [1, 2, 3] and parsed[0].params == {}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"prompt": "a",}', "line 1: invalid JSON: Expecting property name"),
        (b"\xff\xfe", "line 1: not valid UTF-8"),
        (b"[1, 2]", "line 1: a JSON object expected, got array"),
        (b'{"prompt": NaN}', "line 1: invalid JSON: NaN is not valid JSON"),
        (b'{"custom_id": "x"}', "line 1: prompt: required"),
        (b'{"prompt": ""}', "line 1: prompt: a non-empty string expected"),
        (b'{"prompt": ["a", "b"]}', "line 1: prompt: a string or a non-empty list of token ids"),
        (b'{"prompt": "a", "temprature": 1}', "line 1: temprature: unknown field"),
        (b'{"prompt": "a", "temperature": -1}', "line 1: temperature: must be >= 0, got -1"),
        (b'{"prompt": "a", "max_tokens": 0}', "line 1: max_tokens: must be >= 1, got 0"),
        (b'{"prompt": "a", "max_tokens": "5"}', "line 1: max_tokens: must be an integer"),
        (b'{"prompt": "a", "max_tokens": true}', "line 1: max_tokens: must be an integer"),
        (b'{"prompt": "a", "top_p": 0}', "line 1: top_p: must be in (0, 1]"),
        (b'{"prompt": "a", "n": 0}', "line 1: n: must be between 1 and 128"),
        (b'{"prompt": "a", "min_tokens": 9, "max_tokens": 4}',
         "line 1: min_tokens: must be between 0 and max_tokens (4)"),
        (b'{"prompt": "a", "stop": [1]}', "line 1: stop: must be a string or a list of strings"),
        (b'{"prompt": "a", "logprobs": 21}', "line 1: logprobs: must be an integer between 0"),
        (b'{"prompt": "a", "custom_id": 5}', "line 1: custom_id: a non-empty string expected"),
    ],
)
def test_native_bad_lines(line: bytes, expected: str) -> None:
    errs = errors_of([line])
    assert any(e.startswith(expected) for e in errs), errs


def test_every_bad_field_of_a_line_is_reported() -> None:
    errs = errors_of(['{"prompt": "a", "temperature": -1, "top_k": -5, "foo": 1}'])
    assert [e.split(":")[1].strip() for e in errs] == ["foo", "temperature", "top_k"]


def test_duplicate_custom_id_names_first_line() -> None:
    errs = errors_of(['{"prompt": "a", "custom_id": "x"}', "", '{"prompt": "b", "custom_id": "x"}'])
    assert errs == ["line 3: custom_id: 'x' already used on line 1"]


def test_empty_file_and_blank_lines() -> None:
    assert errors_of([]) == ["file: the file has no requests"]
    assert errors_of(["", "   "]) == ["file: the file has no requests"]


def test_too_many_lines() -> None:
    _, file_errors, _ = run(['{"prompt": "a"}'] * 4, max_lines=3)
    assert file_errors[0].code == "too_many_tasks"
    assert "at most 3 requests per file, got 4" in str(file_errors[0])


def test_batch_defaults_take_part_in_cross_field_rules() -> None:
    errs = errors_of(['{"prompt": "a", "min_tokens": 10}'], defaults={"max_tokens": 5})
    assert errs == ["line 1: min_tokens: must be between 0 and max_tokens (5), got 10"]
    assert check_defaults({"temperature": -1}) == ["temperature: must be >= 0, got -1"]
    assert check_defaults({"bogus": 1})[0].startswith("bogus: not a known field")


def test_openai_valid_and_auto_detect() -> None:
    parsed, errs, v = run([openai_line("a", max_tokens=3), openai_line("b")], fmt="auto")
    assert errs == [] and v.fmt == "openai" and v.first_model == "gpt-neox-20b"
    assert [p.custom_id for p in parsed] == ["a", "b"]
    assert parsed[0].params == {"max_tokens": 3}


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "x"}},
         "line 1: custom_id: required"),
        ({"custom_id": "a", "method": "GET", "url": "/v1/completions",
          "body": {"model": "m", "prompt": "x"}}, "line 1: method: 'POST' expected"),
        ({"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
          "body": {"model": "m", "prompt": "x"}},
         "line 1: url: '/v1/completions' or '/v1/chat/completions' expected, got "
         "'/v1/embeddings'"),
        ({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
          "body": {"model": "m", "prompt": "x"}}, "line 1: body.prompt: unknown"),
        ({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": "x"},
         "line 1: body: an object expected, got string"),
        ({"custom_id": "a", "method": "POST", "url": "/v1/completions",
          "body": {"prompt": "x"}}, "line 1: body.model: a model name expected"),
        ({"custom_id": "a", "method": "POST", "url": "/v1/completions",
          "body": {"model": "m"}}, "line 1: body.prompt: required"),
        ({"custom_id": "a", "method": "POST", "url": "/v1/completions",
          "body": {"model": "m", "prompt": "x", "temperature": 3.5e9, "echo": 1}},
         "line 1: body.echo: true, false or null expected"),
        ({"custom_id": "a", "method": "POST", "url": "/v1/completions",
          "body": {"model": "m", "prompt": "x", "max_tokens": 0}},
         "line 1: body.max_tokens: must be >= 1"),
        ({"custom_id": "a", "method": "POST", "url": "/v1/completions",
          "body": {"model": "m", "prompt": "x", "messages": []}},
         "line 1: body.messages: unknown or unsupported field"),
        ({"custom_id": "a", "method": "POST", "url": "/v1/completions", "extra": 1,
          "body": {"model": "m", "prompt": "x"}}, "line 1: extra: unknown field"),
    ],
)
def test_openai_bad_lines(obj: dict, expected: str) -> None:
    errs = errors_of([json.dumps(obj)], fmt="openai")
    assert any(e.startswith(expected) for e in errs), errs


def test_openai_error_codes() -> None:
    parsed, _, _ = run([openai_line("a"), openai_line("a"), "{"], fmt="openai")
    codes = [e.code for p in parsed for e in p.errors]
    assert codes == ["duplicate_custom_id", "invalid_json_line"]


def test_bom_and_crlf_tolerated() -> None:
    obj, err = parse_json_line('\ufeff{"prompt": "a"}\r'.encode(), 1)
    assert err is None and obj == {"prompt": "a"}


def test_check_sampling_returns_clean_copy() -> None:
    clean, problems = check_sampling({"stop": "x", "seed": None, "n": 2})
    assert clean == {"stop": ["x"], "n": 2} and problems == []


def test_openai_echo_lines() -> None:
    """``echo`` with ``max_tokens: 0`` scores the prompt only; with a completion it comes
    first. It travels to the worker as the ``ECHO`` item parameter."""
    from core.jsonl import ECHO, parse_openai

    def body(**b: object) -> dict:
        return {"custom_id": "a", "method": "POST", "url": "/v1/completions",
                "body": {"model": "m", "prompt": [5, 6, 7], **b}}

    score = parse_openai(body(echo=True, max_tokens=0, logprobs=1), 1)
    assert score.ok and score.params == {ECHO: "score", "logprobs": 1}
    both = parse_openai(body(echo=True, max_tokens=3), 1)
    assert both.ok and both.params == {ECHO: "prompt", "max_tokens": 3}
    plain = parse_openai(body(echo=False, max_tokens=3), 1)
    assert plain.ok and ECHO not in plain.params


# -- chat lines and structured output ----------------------------------------------------

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}},
          "required": ["label"], "additionalProperties": False}


def chat_line(custom_id: str = "a", url: str = "/v1/chat/completions", **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                       "body": {"model": "m", "messages": [
                           {"role": "system", "content": "Be brief."},
                           {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                        {"type": "text", "text": "there"}]}],
                           **body}})


def test_chat_line_normalised_and_chat_fields_mapped() -> None:
    parsed, errs, v = run([chat_line(logprobs=True, top_logprobs=3, max_completion_tokens=9,
                                     response_format={"type": "json_schema", "json_schema": {
                                         "name": "label", "schema": SCHEMA, "strict": True}})],
                          fmt="openai")
    p = parsed[0]
    assert errs == [] and p.ok, p.errors
    assert p.messages == [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi\nthere"}]
    assert p.params["logprobs"] == 3 and p.params["max_tokens"] == 9
    assert v.endpoint == "/v1/chat/completions"
    parsed, _, _ = run([chat_line(logprobs=False)], fmt="openai")
    assert parsed[0].ok and "logprobs" not in parsed[0].params


@pytest.mark.parametrize(("body", "expected"), [
    ({"messages": []}, "line 1: body.messages: a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "line 1: body.messages[0].role: one of"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "line 1: body.messages[0].content[0]: a text part"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
     "line 1: body.messages[0].tool_calls: unknown"),
    ({"top_logprobs": 2}, "line 1: body.top_logprobs: requires logprobs: true"),
    ({"logprobs": 2}, "line 1: body.logprobs: true, false or null expected"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objekt"}}}},
     "line 1: body.response_format.json_schema.schema: not a valid JSON Schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
     "line 1: body.response_format.json_schema.name: must be"),
    ({"response_format": {"type": "xml"}}, "line 1: body.response_format: must be an object"),
    ({"response_format": {"type": "json_object"}, "stop": ["}"]},
     "line 1: body.response_format: cannot be combined with stop"),
])
def test_bad_chat_lines(body: dict, expected: str) -> None:
    obj = json.loads(chat_line())
    obj["body"].update(body)
    errs = errors_of([json.dumps(obj)], fmt="openai")
    assert any(e.startswith(expected) for e in errs), errs


def test_endpoint_and_urls_must_agree() -> None:
    # The batch's endpoint decides; without one the first line's url does.
    errs = errors_of([openai_line("a"), chat_line("b")], fmt="openai",
                     endpoint="/v1/completions")
    assert errs == ["line 2: url: every line's url must be the batch's endpoint "
                    "'/v1/completions' (the batch's endpoint), got '/v1/chat/completions'"]
    errs = errors_of([chat_line("a"), openai_line("b")], fmt="auto")
    assert errs[0].startswith("line 2: url: every line's url must be the batch's endpoint "
                              "'/v1/chat/completions' (line 1's url)")


def test_native_messages_regex_choice() -> None:
    parsed, errs, _ = run([
        '{"messages": [{"role": "user", "content": "Is it good?"}], "choice": ["yes", "no"]}',
        '{"prompt": "Year: ", "regex": "[0-9]{4}"}',
        '{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}',
        '{"prompt": "x", "regex": "(", "choice": ["a"]}',
        '{"prompt": "x", "regex": "a+", "choice": ["a"]}',
    ])
    assert parsed[0].ok and parsed[0].messages == [{"role": "user", "content": "Is it good?"}]
    assert parsed[0].params == {"choice": ["yes", "no"]}
    assert parsed[1].ok and parsed[1].params == {"regex": "[0-9]{4}"}
    assert [str(e) for e in parsed[2].errors] == [
        "line 3: messages: give prompt or messages, not both"]
    assert str(parsed[3].errors[0]).startswith("line 4: regex: not a valid regular expression")
    assert [str(e) for e in parsed[4].errors] == [
        "line 5: choice: only one of response_format, regex and choice may be given, got "
        "regex and choice"]


def test_structured_output_as_batch_default() -> None:
    rf = {"type": "json_object"}
    assert check_defaults({"response_format": rf}) == []
    assert check_defaults({"response_format": rf, "stop": "\n"})[0].startswith(
        "response_format: cannot be combined with stop")
    # A line's own stop conflicts with the batch's constraint: a per-line error, one
    # that concerns the request (it does not refuse the file).
    parsed, _, _ = run(['{"prompt": "x", "stop": "\\n"}', '{"prompt": "y"}'],
                       defaults={"response_format": rf})
    assert str(parsed[0].errors[0]).startswith(
        "line 1: response_format: cannot be combined with stop")
    assert not parsed[0].fatal and parsed[1].ok


@pytest.mark.parametrize(("fmt", "line", "field"), [
    ("native", {"prompt": "a", "custom_id": "k1", "max_tokens": 0}, "max_tokens"),
    ("native", {"prompt": "", "custom_id": "k1"}, "prompt"),
    ("native", {"custom_id": "k1"}, "prompt"),
    ("native", {"prompt": "a", "custom_id": "k1", "temprature": 1}, "temprature"),
    ("native", {"prompt": "a", "custom_id": "k1", "stop": 5}, "stop"),
    ("openai", {"custom_id": "k1", "method": "POST", "url": "/v1/completions",
                "body": {"model": "m", "prompt": "p", "max_tokens": -1}}, "body.max_tokens"),
    ("openai", {"custom_id": "k1", "method": "GET", "url": "/v1/completions",
                "body": {"model": "m", "prompt": "p"}}, "method"),
    ("openai", {"custom_id": "k1", "method": "POST", "url": "/v1/completions",
                "body": "x"}, "body"),
])
def test_a_bad_field_is_reported_with_the_lines_custom_id(fmt: str, line: dict,
                                                           field: str) -> None:
    # The caller matches an error to its request by custom_id: a valid one is always kept.
    [parsed], _, _ = run([json.dumps(line)], fmt)
    assert parsed.errors and parsed.errors[0].field == field
    assert {e.as_dict()["custom_id"] for e in parsed.errors} == {"k1"}
