"""Synchronous ``/v1/completions`` through the interactive lane: the official ``openai``
package (plain and streaming) against ``neoxq api`` and a real ``neoxq worker`` on the
tiny model; 503 when no worker takes a request; a client that goes away aborts its
request in the engine; an interactive request overtakes a running batch."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from openai import OpenAI

from core.interactive import lane_key
from core.settings import Settings
from tests.api.live import Live, start_stack


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    # The deployment's model is named "tiny": the worker serves it, requests name it.
    stack = start_stack(tmp_path_factory.mktemp("live_sync"), worker=True, model_name="tiny")
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def client(live: Live) -> OpenAI:
    c = OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    # The worker loads its model after the API is up: the first request may wait for it,
    # longer than one request's 30 s on a busy machine (each try then answers 503).
    deadline = time.monotonic() + 300
    while True:
        try:
            c.completions.create(model="tiny", prompt="warm up", max_tokens=1)
            return c
        except openai.InternalServerError as exc:
            if exc.status_code != 503 or time.monotonic() > deadline \
                    or live.procs["worker"].poll() is not None:
                raise AssertionError(f"worker not serving:\n{live.log('worker')}") from exc


def test_completion_plain_and_streamed_agree(client: OpenAI) -> None:
    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw)
    assert plain.object == "text_completion" and plain.model == "tiny"
    assert plain.id.startswith("cmpl-")
    (choice,) = plain.choices
    assert choice.finish_reason == "length" and choice.text
    assert plain.usage is not None and plain.usage.completion_tokens == 12
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 12

    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.id == chunks[0].id and c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    # Text arrives as it is generated, then a chunk with the finish reason, then usage.
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 1
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_n_logprobs_and_stop(client: OpenAI) -> None:
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6,
                                    n=3, seed=7, logprobs=2,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    for c in out.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
        assert all(x <= 0 for x in lp.token_logprobs)
        assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert out.usage.completion_tokens == 18
    # A stop string cuts the text before it.
    base = client.completions.create(model="tiny", prompt="abc", max_tokens=20,
                                     temperature=0, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if stop.strip():
        cut = client.completions.create(model="tiny", prompt="abc", max_tokens=20,
                                        temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True})
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].text == text[:text.index(stop)]


def test_streams_send_logprobs_with_each_chunk(client: OpenAI) -> None:
    """A streamed completion (and chat completion) with logprobs: the chunks that carry
    text carry the logprobs of its tokens as they come, not all at the end; put
    together they equal the plain answer's."""
    kw = dict(model="tiny", prompt="Logprobs as they come", max_tokens=16, temperature=0,
              logprobs=2, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].logprobs
    chunks = [c for c in client.completions.create(**kw, stream=True) if c.choices]
    with_lp = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert len(with_lp) > 1
    assert [t for lp in with_lp for t in lp.tokens] == whole.tokens
    assert [x for lp in with_lp for x in lp.text_offset] == whole.text_offset
    assert [x for lp in with_lp for x in lp.token_logprobs] == pytest.approx(
        whole.token_logprobs, abs=1e-5)
    assert [x for lp in with_lp for x in lp.top_logprobs] == [
        pytest.approx(t, abs=1e-5) for t in whole.top_logprobs]

    chat = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=16,
                temperature=0, logprobs=True, top_logprobs=1,
                extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**chat).choices[0].logprobs.content
    parts = [c.choices[0].logprobs.content
             for c in client.chat.completions.create(**chat, stream=True)
             if c.choices and c.choices[0].logprobs]
    assert len(parts) > 1
    assert [e.token for p in parts for e in p] == [e.token for e in plain]
    assert [e.logprob for p in parts for e in p] == pytest.approx(
        [e.logprob for e in plain], abs=1e-5)


def test_bad_requests_name_the_field(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=10**6)
    assert "max_tokens" in e.value.message  # the engine's check, from the worker
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", extra_body={"bogus": 1})
    assert e.value.body["param"] == "bogus"


def test_disconnect_aborts_in_the_engine(live: Live, client: OpenAI) -> None:
    # Long enough (8 samples to the context's end) that the generation is still running
    # when the hang-up reaches the worker, even on a loaded 2-core machine.
    body = {"model": "tiny", "prompt": "Tell me everything", "max_tokens": 480, "n": 8,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, \
            http.stream("POST", live.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                # Generation is under way (not finished): hang up.
                assert json.loads(line[6:])["choices"][0]["finish_reason"] is None
                break
    deadline = time.monotonic() + 20
    while "aborted by its client" not in live.log("worker"):
        assert time.monotonic() < deadline, live.log("worker")
        time.sleep(0.2)


def test_interactive_overtakes_a_running_batch(live: Live, client: OpenAI,
                                               tmp_path: Path) -> None:
    lines = [json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"model": "tiny", "prompt": f"batch prompt {i}",
                                  "max_tokens": 300, "ignore_eos": True}})
             for i in range(48)]
    src = tmp_path / "batch.jsonl"
    src.write_text("\n".join(lines) + "\n")
    f = client.files.create(file=src.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                                  completion_window="24h")
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).request_counts.completed == 0 and \
            httpx.get(live.url + f"/v1/batches/{batch.id}").json()["status"] != "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.0)  # the engine is full of batch sequences now
    t0 = time.monotonic()
    out = client.completions.create(model="tiny", prompt="quick question", max_tokens=8,
                                    extra_body={"ignore_eos": True})
    took = time.monotonic() - t0
    assert out.usage.completion_tokens == 8
    b = client.batches.retrieve(batch.id)
    assert b.status == "in_progress" and b.request_counts.completed < 48, (took, b)
    client.batches.cancel(batch.id)


def test_no_worker_is_a_503_and_leaves_nothing_queued(tmp_path: Path) -> None:
    stack = start_stack(tmp_path, worker=False, interactive_timeout="1.5", model_name="tiny")
    try:
        c = OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)
        # A name the store does not know: no worker would ever take it, so no wait.
        with pytest.raises(openai.NotFoundError) as nf:
            c.completions.create(model="no-such-model", prompt="anyone?", max_tokens=4)
        assert nf.value.code == "model_not_found" and "known: tiny" in nf.value.message
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="tiny", prompt="anyone?", max_tokens=4)
        assert e.value.status_code == 503
        assert "No worker took this request within 1.5 s" in e.value.message
        assert 1.4 < time.monotonic() - t0 < 10
        s = Settings(queue=stack.env["NEOXQ_QUEUE"],
                     redis_key_prefix=stack.env["NEOXQ_REDIS_KEY_PREFIX"])
        assert redis.Redis.from_url(stack.redis_url).llen(lane_key(s)) == 0
    finally:
        stack.stop()


def test_echo_scores_equal_the_engine(client: OpenAI) -> None:
    """``echo`` + ``logprobs`` with ``max_tokens: 0`` (how evaluation tools score over
    HTTP): the prompt's tokens and logprobs, the first null, equal to the engine's
    ``score()`` on the same model; the top alternative is the argmax."""
    import torch

    from models.runtime import build_engine

    ids = [101 + 7 * i for i in range(30)]
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True,
                                    logprobs=1)
    (c,) = out.choices
    lp = c.logprobs
    assert out.usage.prompt_tokens == 30 and out.usage.completion_tokens == 0
    assert len(lp.token_logprobs) == 30
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    engine = build_engine("preset:tiny", device="cpu", dtype=torch.float32)
    (ref,) = engine.score([(ids[:1], ids[1:])])
    assert lp.token_logprobs[1:] == pytest.approx(ref.token_logprobs, rel=1e-5, abs=1e-6)
    greedy = [t >= max(top.values()) for t, top in zip(lp.token_logprobs[1:],
                                                         lp.top_logprobs[1:], strict=True)]
    assert all(greedy) == ref.is_greedy
    # echo with a completion: the prompt comes first.
    both = client.completions.create(model="tiny", prompt="Hello there", max_tokens=4,
                                     echo=True, temperature=0, logprobs=0,
                                     extra_body={"ignore_eos": True})
    assert both.choices[0].text.startswith("Hello there")
    n_prompt = both.usage.prompt_tokens
    assert len(both.choices[0].logprobs.token_logprobs) == n_prompt + 4


def test_a_stream_cancelled_while_writing_closes_its_body() -> None:
    """A hang-up that cancels the response while it writes a chunk (the client stopped
    reading) still runs the body's ``finally`` (which aborts the request in the engine)
    at once, not whenever the suspended generator is garbage-collected."""
    import anyio

    from api.completions import ClosingStream

    closed: list[str] = []

    async def body() -> Any:
        try:
            while True:
                yield b"data: x\n\n"
        finally:
            closed.append("finally")

    async def stuck_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            await anyio.sleep_forever()  # a full socket buffer

    async def main() -> list[str]:
        response = ClosingStream(body(), media_type="text/event-stream")
        with anyio.move_on_after(0.2):
            await response.stream_response(stuck_send)
        return list(closed)  # before the event loop's shutdown closes any generator

    assert anyio.run(main) == ["finally"]
