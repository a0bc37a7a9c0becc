"""Synchronous OpenAI endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

The API checks the body with the same rules as a batch line (``core.jsonl``), pushes the
request on the interactive lane (``core/interactive.py``) and waits for a worker's
events: the answer comes back whole, or as OpenAI's server-sent events with
``"stream": true``. Workers run these requests ahead of batch work. No worker taking the
request within ``interactive_timeout`` seconds is a 503; a client that goes away aborts
its request in the engine.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
from fastapi import APIRouter, Request
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api import service
from api.auth import OwnerDep
from api.errors import ApiError, SafeJSONResponse
from api.render import CompletionLogprobs, chat_logprobs, completion_logprobs
from api.streaming import ClosingStream
from core.celery_app import model_queue
from core.interactive import LaneEvent, LaneRequest, abort_channel, lane_key, reply_key
from core.jsonl import CHAT_URL, ECHO, find_bad_text, parse_openai, quoted
from core.settings import Settings
from specs.status import GONE_WORKERS
from store.db import session_scope
from store.tables import Worker

router = APIRouter(prefix="/v1", tags=["openai"])

COMPLETIONS = "/v1/completions"
# Fields of a synchronous body that a batch line does not take: handled here.
_STREAM_FIELDS = ("stream", "stream_options")


def _redis(request: Request) -> Any:
    """The app's asyncio Redis client (created on first use)."""
    state = request.app.state
    client = getattr(state, "redis", None)
    if client is None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(state.settings.redis_url)
        state.redis = client
    return client


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"body: invalid JSON ({exc})", code="invalid_json") from None
    except RecursionError:  # the stdlib parser recurses once per nesting level
        raise ApiError(400, "body: invalid JSON (nested too deeply)",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"body: a JSON object expected, got {quoted(body)}",
                       code="invalid_value")
    return body


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage) from the body, which loses both fields."""
    stream = body.pop("stream", None)
    opts = body.pop("stream_options", None)
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"stream: true, false or null expected, got {quoted(stream)}",
                       code="invalid_value", param="stream")
    include_usage = False
    if opts is not None:
        if not stream:
            raise ApiError(400, "stream_options: only allowed with stream: true",
                           code="invalid_value", param="stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"} or \
                not isinstance(opts.get("include_usage", False), bool):
            raise ApiError(400, "stream_options: {\"include_usage\": bool} expected, got "
                           f"{quoted(opts)}", code="invalid_value", param="stream_options")
        include_usage = bool(opts.get("include_usage"))
    return bool(stream), include_usage


def _check(url: str, body: dict[str, Any]) -> Any:
    """The body as a batch line would be checked (the rules are written once, in
    core.jsonl); the first problem is a 400 naming its field."""
    if (bad := find_bad_text(body)) is not None:  # as parse_json_line finds it in a line
        raise ApiError(400, f"{bad[0]}: {bad[1]}", code="invalid_value", param=bad[0] or None)
    parsed = parse_openai({"custom_id": "sync", "method": "POST", "url": url, "body": body},
                          line=1)
    if parsed.errors:
        e = parsed.errors[0]
        param = e.field.removeprefix("body.") if e.field else None
        raise ApiError(400, f"{param}: {e.message}" if param else e.message,
                       code=e.code, param=param)
    return parsed


def _usage(ev: LaneEvent) -> dict[str, int]:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


class Lane:
    """One request's trip through the interactive lane, from the API's side."""

    def __init__(self, request: Request, req: LaneRequest, model: str | None = None) -> None:
        self.request, self.req = request, req
        self.settings: Settings = request.app.state.settings
        # Requests go to the lane of their model's queue: only its workers take them.
        self.queue = model_queue(self.settings, model)
        self.redis = _redis(request)
        self.reply = reply_key(self.settings, req.id)
        self.worker = ""
        self.finished = False

    async def submit(self) -> None:
        """Push the request and wait until a worker takes it (503 if none does in time)."""
        s = self.settings
        payload = self.req.model_dump_json()
        key = lane_key(s, self.queue)
        try:
            await self.redis.lpush(key, payload)
        except Exception as exc:  # noqa: BLE001 - Redis down
            raise ApiError(503, f"the queue is unavailable ({type(exc).__name__}: {exc})",
                           code="queue_unavailable") from None
        # Short waits (a Redis client's read timeout may be shorter than the whole wait),
        # checking in between whether the client is still there.
        until = time.monotonic() + s.interactive_timeout
        got = None
        while got is None and time.monotonic() < until:
            got = await self.redis.blpop(
                [self.reply], timeout=max(0.01, min(1.0, until - time.monotonic())))
            if got is None and await self.request.is_disconnected():
                if await self.redis.lrem(key, 1, payload):
                    self.finished = True
                    raise ApiError(499, "client closed the request", code="client_closed")
        if got is None:
            if await self.redis.lrem(key, 1, payload):
                self.finished = True
                raise ApiError(
                    503, f"No worker took this request within {s.interactive_timeout:g} s "
                         "(no worker is running, or all are still loading their model). "
                         "Retry later; the wait is NEOXQ_INTERACTIVE_TIMEOUT.",
                    code="no_worker_available")
            # A worker popped it just as we gave up: its answer is on the way.
            for _ in range(10):
                if (got := await self.redis.blpop([self.reply], timeout=1)) is not None:
                    break
            if got is None:
                await self.abort()
                raise ApiError(503, "the worker that took this request did not answer",
                               code="worker_lost")
        ev = LaneEvent.model_validate_json(got[1])
        if ev.type == "error":
            self.finished = True
            raise _event_error(ev)
        self.worker = ev.worker

    async def events(self) -> AsyncIterator[LaneEvent]:
        """The worker's events until ``done`` or ``error``; aborts when the client goes
        away, and gives up (503) if the worker stops heartbeating meanwhile."""
        s = self.settings
        next_check = time.monotonic() + s.heartbeat_interval
        while True:
            got = await self.redis.blpop([self.reply], timeout=1)
            if got is not None:
                ev = LaneEvent.model_validate_json(got[1])
                if ev.type in ("done", "error"):
                    self.finished = True
                yield ev
                if self.finished:
                    return
                continue
            if await self.request.is_disconnected():
                await self.abort()
                return
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + s.heartbeat_interval
                if not await run_in_threadpool(self._worker_alive):
                    self.finished = True
                    raise ApiError(503, f"worker {self.worker} stopped while running this "
                                   "request; retry", code="worker_lost")

    def _worker_alive(self) -> bool:
        with session_scope(self.request.app.state.db) as session:
            row = session.execute(select(Worker.status, Worker.last_seen)
                                  .where(Worker.id == self.worker)).first()
        if row is None:
            return True  # a worker with no store row (tests, embedded use): trust it
        status, last_seen = row
        return status not in GONE_WORKERS and \
            time.time() - last_seen < self.settings.dead_worker_after

    async def abort(self) -> None:
        """The request is over for us: tell the worker to drop it if it is still running
        (the client is gone) and remove its reply list. Never cancelled itself."""
        running, self.finished = not self.finished, True
        with anyio.CancelScope(shield=True):
            try:
                if running:
                    await self.redis.publish(abort_channel(self.settings), self.req.id)
                await self.redis.delete(self.reply)
            except Exception:  # noqa: BLE001 - best effort: the list expires on its own
                pass

    async def result(self) -> LaneEvent:
        """Wait for the whole result (non-streaming)."""
        async for ev in self.events():
            if ev.type == "done":
                await self.redis.delete(self.reply)
                return ev
            if ev.type == "error":
                raise _event_error(ev)
        raise ApiError(499, "client closed the request", code="client_closed")


def _event_error(ev: LaneEvent) -> ApiError:
    status = ev.status if ev.status in (400, 500, 503) else 503
    return ApiError(status, ev.message or ev.code, code=ev.code or None)


def _sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False,
                                                         separators=(",", ":"))
    return f"data: {data}\n\n".encode("utf-8", "replace")


def _event_stream(lane: Lane, head: dict[str, Any],
                  deltas: Callable[[LaneEvent], Iterator[bytes]],
                  finals: Callable[[LaneEvent], Iterator[bytes]],
                  include_usage: bool) -> ClosingStream:
    """Server-sent events of a lane, as OpenAI streams: the endpoint's chunks for each
    delta and for the finished choices, the usage chunk if asked for, then ``[DONE]``;
    an error ends the stream the same way. The request is aborted however it ends."""

    async def sse() -> AsyncIterator[bytes]:
        try:
            async for ev in lane.events():
                if ev.type == "delta":
                    for b in deltas(ev):
                        yield b
                elif ev.type == "done":
                    for b in finals(ev):
                        yield b
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(ev)})
                    yield _sse("[DONE]")
                elif ev.type == "error":
                    yield _sse(_event_error(ev).body())
                    yield _sse("[DONE]")
        except ApiError as exc:
            yield _sse(exc.body())
            yield _sse("[DONE]")
        finally:
            await lane.abort()  # once finished, only the reply list goes

    return ClosingStream(sse(), media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache"})


def _deadline(settings: Settings) -> float:
    return time.time() + settings.interactive_timeout


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


@router.post("/completions")
async def create_completion(request: Request, owner: OwnerDep) -> Any:
    """A completion, answered when it is done (or streamed with ``"stream": true``), as
    OpenAI's ``/v1/completions``; runs ahead of batch work on the same workers."""
    body = await _body(request)
    stream, include_usage = _stream_options(body)
    parsed = _check(COMPLETIONS, body)
    # Offsets count from the start of the returned text: the prompt's end, unless echoed.
    offset_base = "" if ECHO in parsed.params or not isinstance(parsed.prompt, str) \
        else parsed.prompt
    settings: Settings = request.app.state.settings
    model = parsed.model or settings.model_name
    await run_in_threadpool(service.commit, request.app.state.db,
                            lambda s: service.check_model(s, settings, model))
    cid = _new_id("cmpl-")
    lane = Lane(request, LaneRequest(id=cid, kind="completion", prompt=parsed.prompt,
                                     params=parsed.params, stream=stream,
                                     deadline=_deadline(settings)), model=model)
    await lane.submit()
    created = int(time.time())
    head = {"id": cid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None}
    if not stream:
        ev = await lane.result()
        return SafeJSONResponse({
            **head,
            "choices": [{"index": c["index"], "text": c["text"],
                         "logprobs": completion_logprobs(c.get("logprobs"), offset_base),
                         "finish_reason": c["finish_reason"]} for c in ev.choices],
            "usage": _usage(ev)})

    # Per choice: its logprobs rendered so far (text offsets continue across chunks)
    # and how many tokens' went out with the text; the result brings the rest.
    rendered: dict[int, CompletionLogprobs] = {}
    streamed: dict[int, int] = {}

    def logprobs_of(index: int, entries: list[dict[str, Any]] | None) -> Any:
        r = rendered.setdefault(index, CompletionLogprobs(offset_base))
        streamed[index] = streamed.get(index, 0) + len(entries or [])
        return r.next(entries)

    def deltas(ev: LaneEvent) -> Iterator[bytes]:
        for index in sorted(set(ev.deltas) | set(ev.logprobs)):
            yield _sse({**head, "choices": [{
                "index": index, "text": ev.deltas.get(index, ""),
                "logprobs": logprobs_of(index, ev.logprobs.get(index)),
                "finish_reason": None}]})

    def finals(ev: LaneEvent) -> Iterator[bytes]:
        for c in ev.choices:
            rest = (c.get("logprobs") or [])[streamed.get(c["index"], 0):]
            yield _sse({**head, "choices": [{
                "index": c["index"], "text": "", "logprobs": logprobs_of(c["index"], rest),
                "finish_reason": c["finish_reason"]}]})

    return _event_stream(lane, head, deltas, finals, include_usage)


@router.post("/chat/completions")
async def create_chat_completion(request: Request, owner: OwnerDep) -> Any:
    """A chat completion, whole or streamed (``"stream": true``), as OpenAI's
    ``/v1/chat/completions``: the worker renders the messages with its checkpoint's chat
    template (the one chat lines of a batch use); ``response_format`` constrains the
    output as on batch lines. Runs ahead of batch work on the same workers."""
    body = await _body(request)
    stream, include_usage = _stream_options(body)
    parsed = _check(CHAT_URL, body)
    settings: Settings = request.app.state.settings
    model = parsed.model or settings.model_name
    await run_in_threadpool(service.commit, request.app.state.db,
                            lambda s: service.check_model(s, settings, model))
    cid = _new_id("chatcmpl-")
    lane = Lane(request, LaneRequest(id=cid, kind="chat", messages=parsed.messages,
                                     params=parsed.params, stream=stream,
                                     deadline=_deadline(settings)), model=model)
    await lane.submit()
    created = int(time.time())
    if not stream:
        ev = await lane.result()
        return SafeJSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": c["index"],
                         "message": {"role": "assistant", "content": c["text"],
                                     "refusal": None},
                         "logprobs": chat_logprobs(c.get("logprobs")),
                         "finish_reason": c["finish_reason"]} for c in ev.choices],
            "usage": _usage(ev)})
    head = {"id": cid, "object": "chat.completion.chunk", "created": created,
            "model": model, "system_fingerprint": None}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None,
              logprobs: dict[str, Any] | None = None) -> bytes:
        return _sse({**head, "choices": [{"index": index, "delta": delta,
                                          "logprobs": logprobs, "finish_reason": finish}]})

    started: set[int] = set()  # choices whose first chunk (the role) went out

    def role_first(index: int) -> Iterator[bytes]:
        if index not in started:
            started.add(index)
            yield chunk(index, {"role": "assistant", "content": ""})

    streamed: dict[int, int] = {}  # per choice: tokens whose logprobs went out

    def deltas(ev: LaneEvent) -> Iterator[bytes]:
        for index in sorted(set(ev.deltas) | set(ev.logprobs)):
            yield from role_first(index)
            new = ev.logprobs.get(index)
            streamed[index] = streamed.get(index, 0) + len(new or [])
            yield chunk(index, {"content": ev.deltas.get(index, "")}, None,
                        chat_logprobs(new) if new else None)

    def finals(ev: LaneEvent) -> Iterator[bytes]:
        for c in ev.choices:
            yield from role_first(c["index"])
            lps = c.get("logprobs")
            rest = None if lps is None else lps[streamed.get(c["index"], 0):]
            yield chunk(c["index"], {}, c["finish_reason"],
                        chat_logprobs(rest) if rest else None)

    return _event_stream(lane, head, deltas, finals, include_usage)
