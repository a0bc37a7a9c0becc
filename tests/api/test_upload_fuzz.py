"""Hypothesis over every upload route - JSONL lines (native batches, OpenAI batch files
and the batches made from them, fine-tuning files), query parameters, form fields and the
``/v1/batches`` body - with what breaks servers: random nesting (to 100,000 levels),
lone surrogates and NUL escaped in JSON, raw bytes in odd encodings, huge and
non-finite numbers, wrong types. On SQLite and PostgreSQL, after every request:

- no 5xx (the test client re-raises any unhandled server exception, too);
- no batch outside a final or running state (nothing stuck in ``validating``);
- every file on disk has a row and every stored file row its content; no temporary
  upload is left behind.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from specs.status import TERMINAL, BatchStatus
from store.db import session_scope
from store.tables import Batch, File
from tests.api.conftest import Api

SAMPLING = ["max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n",
            "stop", "stop_token_ids", "ignore_eos", "logprobs", "presence_penalty",
            "repetition_penalty"]
QUERY = ["format", "on_invalid", "defaults", "metadata", "filename", *SAMPLING[:9], "bogus"]

# Any code point, surrogates and NUL included (json.dumps escapes them as \udXXX, \u0000).
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
numbers = st.one_of(st.integers(-(10**40), 10**40), st.floats(allow_nan=True,
                                                              allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), numbers, any_text,
                    st.sampled_from(["", "native", "openai", "record", "refuse", "24h",
                                     "POST", "/v1/completions"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(any_text, st.sampled_from(SAMPLING)), inner, max_size=4)),
    max_leaves=12)


def _deep(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1"
                                                               + "}" * depth)


deep_json = st.builds(_deep, st.sampled_from([10, 900, 1100, 5000, 100_000]),
                      st.sampled_from(["list", "dict"]))
# Query strings are capped by the client (64 KiB): 3,000 levels already crash a naive parser.
deep_param = st.builds(_deep, st.sampled_from([900, 1100, 3000]),
                       st.sampled_from(["list", "dict"]))


@st.composite
def request_objects(draw: Any) -> dict[str, Any]:
    """A native or OpenAI line as an object: mostly right keys, random values."""
    obj: dict[str, Any] = {}
    if draw(st.booleans()):
        body = draw(st.dictionaries(st.sampled_from(["model", "prompt", *SAMPLING, "x"]),
                                    values, max_size=5))
        obj.update(method=draw(st.sampled_from(["POST", "GET", 1])),
                   url=draw(st.sampled_from(["/v1/completions", "/v1/chat", None])), body=body)
    else:
        obj["prompt"] = draw(st.one_of(any_text, values, st.just("hello")))
    obj.update(draw(st.dictionaries(st.sampled_from(["custom_id", *SAMPLING, "zz"]), values,
                                    max_size=4)))
    return obj


# Lines that broke a parser or a store once. Hypothesis promises no particular mix of
# route and line, so each is also sent on every route by a plain loop
# (test_hostile_lines_on_every_route).
HOSTILE_LINES = [
    b'{"prompt": "p", "stop": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"prompt": "p", "completion": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
    b'{"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"model": "m", '
    b'"prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}}",
    b'{"prompt": "a\\ud800b", "custom_id": "x\\udc00", "completion": "\\udfff"}',
    b'{"messages": [{"role": "user", "content": "\\ud83d"}, {"role": "assistant", '
    b'"content": "\\u0000"}]}',
    b'{"text": "nul \\u0000 and \\ud800"}',
    b'{"custom_id": "\\ud800", "method": "POST", "url": "/v1/completions", "body": '
    b'{"model": "m\\u0000", "prompt": "p\\udfff"}}',
    b'{"prompt": "p", "max_tokens": 1e999, "seed": 123456789012345678901234567890}',
    b'{"prompt": "p", "temperature": NaN, "top_p": -Infinity}',
    '{"prompt": "\u00e9"}'.encode("utf-16"),
    '{"text": "\u00e9"}'.encode("latin-1"),
    b"\xff\xfe\x00{",
]


@st.composite
def lines(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["obj", "obj", "deep", "hostile", "bytes", "latin1", "utf16"]))
    if kind == "hostile":
        return draw(st.sampled_from(HOSTILE_LINES))
    if kind == "obj":
        return json.dumps(draw(request_objects()), ensure_ascii=draw(st.booleans()),
                          allow_nan=True).encode("utf-8", "surrogatepass")
    if kind == "deep":
        return ('{"prompt": "p", "stop": ' + draw(deep_json) + "}").encode()
    if kind == "bytes":
        return draw(st.binary(max_size=40)).replace(b"\n", b" ")
    text = json.dumps({"prompt": draw(any_text.filter(lambda t: "\n" not in t))},
                      ensure_ascii=False)
    enc = "latin-1" if kind == "latin1" else "utf-16"
    return text.encode(enc, "replace").replace(b"\n", b" ")


files = st.lists(lines(), min_size=0, max_size=6).map(lambda ls: b"\n".join(ls) + b"\n")
param_text = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=20),
    values.map(lambda v: json.dumps(v, allow_nan=True)), deep_param,
    st.sampled_from(["auto", "record", "openai", "1e999", "-0", "nan", "a\x00b"]))
# The client refuses a query string over 64 KiB: percent-encoded, a value grows to 3x.
params = st.dictionaries(st.sampled_from(QUERY), param_text, max_size=4).filter(
    lambda d: sum(len(k) + len(v) for k, v in d.items()) < 20_000)


def _state_is_sound(api: Api) -> None:
    with session_scope(api.db) as s:
        statuses = set(s.scalars(select(Batch.status)))
        paths = set(s.scalars(select(File.path).where(File.path.is_not(None))))
    assert statuses <= TERMINAL | {BatchStatus.IN_PROGRESS}, statuses
    d = api.settings.files_dir
    on_disk = {str(p) for p in d.iterdir()} if d.exists() else set()
    assert on_disk == paths, (on_disk ^ paths)


def _check(api: Api, r: Any) -> None:
    assert r.status_code < 500, r.text[:500]
    _state_is_sound(api)


def _check_lines_of_a_batch_file(api: Api, body: bytes) -> None:
    """Upload ``body`` as an OpenAI batch file, then make a batch of it (the lines are read
    at that second step, as OpenAI does)."""
    r = api.client.post("/v1/files", data={"purpose": "batch"},
                        files={"file": ("in.jsonl", body)})
    _check(api, r)
    if r.status_code == 200:
        _check(api, api.client.post("/v1/batches", json={
            "input_file_id": r.json()["id"], "endpoint": "/v1/completions",
            "completion_window": "24h"}))


def test_hostile_lines_on_every_route(api: Api) -> None:
    """Each hostile line, alone and all in one file, through every route that reads lines."""
    c = api.client
    for body in [line + b"\n" for line in HOSTILE_LINES] + [b"\n".join(HOSTILE_LINES)]:
        for on_invalid in ("refuse", "record"):
            _check(api, c.post("/batches", params={"on_invalid": on_invalid}, content=body,
                               headers={"content-type": "application/x-ndjson"}))
        _check(api, c.post("/batches", files={"file": ("f.jsonl", body)},
                           data={"on_invalid": "record"}))
        _check(api, c.post("/v1/files", data={"purpose": "fine-tune"},
                           files={"file": ("f.jsonl", body)}))
        _check_lines_of_a_batch_file(api, body)


HYPOTHESIS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))


@pytest.mark.slow
def test_fuzz_every_upload_route(api: Api) -> None:
    c = api.client
    ok_file = c.post("/v1/files", files={"file": ("in.jsonl", json.dumps({
        "custom_id": "a", "method": "POST", "url": "/v1/completions",
        "body": {"model": "m", "prompt": "p"}}).encode() + b"\n")},
        data={"purpose": "batch"}).json()["id"]

    @given(body=files, query=params)
    @HYPOTHESIS
    def raw(body: bytes, query: dict[str, str]) -> None:
        _check(api, c.post("/batches", params=query, content=body,
                           headers={"content-type": "application/x-ndjson"}))

    @given(body=files, fields=params, query=params,
           name=st.text(st.characters(codec="utf-8"), max_size=10))
    @HYPOTHESIS
    def multipart(body: bytes, fields: dict[str, str], query: dict[str, str],
                  name: str) -> None:
        _check(api, c.post("/batches", params=query, data=fields,
                           files={"file": (name or "f", body)}))

    @given(body=files, purpose=st.sampled_from(["batch", "fine-tune", "", "batch\x00"]),
           name=st.text(st.characters(codec="utf-8"), max_size=10))
    @HYPOTHESIS
    def openai_file(body: bytes, purpose: str, name: str) -> None:
        _check(api, c.post("/v1/files", data={"purpose": purpose},
                           files={"file": (name or "f", body)}))

    @given(extra=st.dictionaries(st.sampled_from(["metadata", "endpoint", "completion_window",
                                                  "input_file_id", "output_expires_after",
                                                  "zz"]), values, max_size=4),
           deep=st.one_of(st.none(), deep_json), real=st.booleans())
    @HYPOTHESIS
    def openai_batch(extra: dict[str, Any], deep: str | None, real: bool) -> None:
        body = {"input_file_id": ok_file if real else "file-x", "endpoint": "/v1/completions",
                "completion_window": "24h", **extra}
        text = json.dumps(body, allow_nan=True)
        if deep is not None:
            text = text[:-1] + ', "metadata": ' + deep + "}"
        _check(api, c.post("/v1/batches", content=text.encode("utf-8", "surrogatepass"),
                           headers={"content-type": "application/json"}))

    @given(body=files)
    @HYPOTHESIS
    def openai_file_then_batch(body: bytes) -> None:
        _check_lines_of_a_batch_file(api, body)

    for run in (raw, multipart, openai_file, openai_batch, openai_file_then_batch):
        run()
    # Percent-escapes that are not UTF-8 (or NUL) in the query string itself.
    for q in ("filename=%ff%fe", "filename=a%00b", "metadata=%7B%22a%22%3A%22%ED%A0%80%22%7D",
              "defaults=%c0%af", "format=%00"):
        _check(api, c.post(f"/batches?{q}", content=b'{"prompt": "p"}\n',
                           headers={"content-type": "application/x-ndjson"}))
