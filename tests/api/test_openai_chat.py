"""Chat and structured-output batches through the official ``openai`` package, against
``neoxq api`` and a real ``neoxq worker`` (tiny random model on CPU, the real 20B
tokenizer, a ``--chat-template`` file): every output that finished with ``stop`` under a
JSON schema parses and validates against it, whatever the random weights write."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from openai import OpenAI

from models.chat import ChatTemplate
from models.tokenizer import load_tokenizer
from tests.api.live import Live, start_stack
from tests.api.test_openai_sdk import create_key, wait_status

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "mixed"]},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "reviewer": {"type": "object", "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "verified": {"type": "boolean"}},
            "required": ["age", "verified"], "additionalProperties": False},
        "topics": {"type": "array", "items": {"enum": ["plot", "acting", "music"]},
                   "minItems": 1, "maxItems": 2},
    },
    "required": ["sentiment", "stars", "reviewer", "topics"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": [{"type": "text", "text": "Review:"},
                                         {"type": "text", "text": "a fine film"}]}]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("live_chat")
    template = tmp / "chat.jinja"
    template.write_text(TEMPLATE)
    stack = start_stack(tmp, worker=False, model_name="tiny")  # the name requests give
    stack.start("worker", "worker", "--model", "preset:tiny", "--device", "cpu",
                "--tokenizer", str(tokenizer_path), "--chat-template", str(template),
                "--worker-id", "w-chat", "--concurrency", "2")
    yield stack
    stack.stop()


def chat_line(cid: str, **body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "tiny", "messages": MESSAGES, **body}})


def run_batch(client: OpenAI, tmp_path: Path, lines: list[str], endpoint: str
              ) -> tuple[list[dict], list[dict]]:
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    f = client.files.create(file=src.open("rb"), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint=endpoint,  # type: ignore[arg-type]
                              completion_window="24h")
    done = wait_status(client, b.id, ("completed", "failed"), timeout=240)
    assert done.status == "completed", done
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    err = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()
           ] if done.error_file_id else []
    return out, err


def test_chat_structured_output_batch(live: Live, tmp_path: Path, tokenizer_path) -> None:
    client = OpenAI(base_url=live.url + "/v1", api_key=create_key(live, "chat"),
                    max_retries=0)
    rf = {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA,
                                                 "strict": True}}
    lines = [chat_line(f"json-{i}", response_format=rf, max_completion_tokens=120, seed=i,
                       temperature=t, n=n)
             for i, (t, n) in enumerate([(1.0, 2), (0.0, 1), (0.7, 2), (1.3, 1), (1.0, 2)])]
    lines += [
        chat_line("object", response_format={"type": "json_object"}, max_tokens=80, seed=5),
        chat_line("lp", logprobs=True, top_logprobs=2, max_tokens=4, temperature=0),
        chat_line("plain", max_tokens=5, seed=1),
        # An invalid schema: that request fails (HTTP 400 in the error file, naming its
        # line), the batch runs.
        chat_line("bad", response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "minProperties": "two"}}}),
    ]
    out, err = run_batch(client, tmp_path, lines, "/v1/chat/completions")
    by_id = {o["custom_id"]: o["response"]["body"] for o in out}
    assert set(by_id) == {f"json-{i}" for i in range(5)} | {"object", "lp", "plain"}
    stopped = 0
    for i in range(5):
        body = by_id[f"json-{i}"]
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        for c in body["choices"]:
            assert c["message"]["role"] == "assistant"
            if c["finish_reason"] == "stop":
                jsonschema.validate(json.loads(c["message"]["content"]), SCHEMA)
                stopped += 1
    assert stopped >= 4, [c for i in range(5) for c in by_id[f"json-{i}"]["choices"]]
    obj = by_id["object"]["choices"][0]
    if obj["finish_reason"] == "stop":
        assert isinstance(json.loads(obj["message"]["content"]), dict)
    # The prompt is the --chat-template's rendering of the messages (text parts joined).
    tok = load_tokenizer(tokenizer_path)
    rendered = ChatTemplate(TEMPLATE).render(
        [MESSAGES[0], {"role": "user", "content": "Review:\na fine film"}])
    assert by_id["plain"]["usage"]["prompt_tokens"] == len(tok.encode(rendered))
    # logprobs in chat's shape, with token strings and bytes.
    lp = by_id["lp"]["choices"][0]
    content = lp["logprobs"]["content"]
    assert len(content) == by_id["lp"]["usage"]["completion_tokens"]
    assert "".join(e["token"] for e in content) == lp["message"]["content"]
    for e in content:
        assert bytes(e["bytes"]).decode() == e["token"] and len(e["top_logprobs"]) == 2
        assert e["top_logprobs"][0]["logprob"] >= e["logprob"] - 1e-6  # greedy: the top
    [bad] = err
    assert bad["custom_id"] == "bad" and bad["response"]["status_code"] == 400
    error = bad["response"]["body"]["error"]
    assert error["param"] == "body.response_format.json_schema.schema"
    assert error["message"].startswith("line 9: ")


def test_completions_regex_choice_and_logprobs(live: Live, tmp_path: Path) -> None:
    client = OpenAI(base_url=live.url + "/v1", api_key=create_key(live, "cmpl"),
                    max_retries=0)

    def line(cid: str, **body) -> str:
        return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                           "body": {"model": "tiny", "prompt": "Label:", **body}})

    rf = {"type": "json_schema", "json_schema": {"name": "l", "schema": {
        "type": "object", "properties": {"label": {"enum": ["a", "b"]}},
        "required": ["label"], "additionalProperties": False}}}
    out, err = run_batch(client, tmp_path, [
        line("rf", response_format=rf, max_tokens=30, logprobs=2, temperature=0),
        line("choice", choice=["yes", "no"], max_tokens=5, seed=3),
        line("regex", regex="[0-9]{3}-[a-z]{2}", max_tokens=12, seed=4),
    ], "/v1/completions")
    assert err == []
    by_id = {o["custom_id"]: o["response"]["body"]["choices"][0] for o in out}
    rfc = by_id["rf"]
    assert rfc["finish_reason"] == "stop" and json.loads(rfc["text"])["label"] in "ab"
    lp = rfc["logprobs"]
    assert "".join(lp["tokens"]) == rfc["text"] + "<|endoftext|>"  # the EOS that ended it
    assert lp["text_offset"][0] == len("Label:")
    assert len(lp["top_logprobs"]) == len(lp["tokens"]) == len(lp["token_logprobs"])
    assert by_id["choice"]["text"] in ("yes", "no")
    assert by_id["regex"]["finish_reason"] == "stop"
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", by_id["regex"]["text"])


def test_sync_chat_completions(live: Live) -> None:
    """``client.chat.completions.create``, plain and streamed, on the interactive lane:
    the worker renders the messages with the template chat lines use (the same prompt
    as a completion of the rendered text gives the same greedy answer); logprobs in
    chat's shape; ``response_format`` constrains the answer."""
    client = OpenAI(base_url=live.url + "/v1", api_key=create_key(live, "sync-chat"),
                    max_retries=0, timeout=120)
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
              extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**kw)
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-")
    (c,) = plain.choices
    assert c.message.role == "assistant" and c.finish_reason == "length"
    rendered = ChatTemplate(TEMPLATE).render(
        [MESSAGES[0], {"role": "user", "content": "Review:\na fine film"}])
    same = client.completions.create(model="tiny", prompt=rendered, max_tokens=10,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert same.choices[0].text == c.message.content
    assert same.usage.prompt_tokens == plain.usage.prompt_tokens

    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == c.message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == 10

    lp = client.chat.completions.create(**{**kw, "max_tokens": 4}, logprobs=True,
                                        top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 2 for e in content)

    rf = {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA,
                                                 "strict": True}}
    for seed in range(3):
        out = client.chat.completions.create(model="tiny", messages=MESSAGES, seed=seed,
                                             max_tokens=120, response_format=rf)
        choice = out.choices[0]
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
            break
    else:
        raise AssertionError("no schema-constrained answer finished in 120 tokens")
