"""A worker's side of the interactive lane (core/interactive.py).

Three small threads next to the engine loop:

- the *taker* pops synchronous requests off the lane whenever this worker runs fewer than
  ``interactive_per_worker`` of them, however busy its engine is with batch work (the
  engine admits them at its next step, ahead of batch sequences), tells the API it took
  each one, and hands it to the engine loop;
- the *publisher* pushes the events the engine loop produces (stream deltas, results,
  errors) to each request's reply list, so the engine thread never waits on Redis;
- the *abort listener* aborts a request in the engine when the API says its client went
  away.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from core.interactive import (
    REPLY_TTL_S,
    LaneEvent,
    LaneRequest,
    abort_channel,
    lane_key,
    reply_key,
)
from core.settings import Settings
from models.engine.outputs import PartialSample
from models.tokenizer import token_text

log = logging.getLogger("neoxq.worker")


def describe_entries(tokenizer: Any, entries: list[dict[str, Any]] | None
                     ) -> list[dict[str, Any]] | None:
    """The engine's per-token logprobs (ids) with each token's text and bytes, which the
    API (no tokenizer) cannot add: ``[{"token_id", "token", "bytes", "logprob", "top":
    [{"token_id", "token", "bytes", "logprob"}]}]``. A token's text is its own bytes
    decoded, or ``bytes:\\xNN...`` when they are part of a character (OpenAI's way)."""
    if entries is None:
        return None

    def one(i: int) -> dict[str, Any]:
        if tokenizer is None:
            return {"token_id": i, "token": str(i), "bytes": []}
        data = tokenizer.token_bytes(i)
        return {"token_id": i, "token": token_text(data), "bytes": list(data)}

    return [{**one(e["token_id"]), "logprob": e["logprob"],
             "top": [{**one(int(i)), "logprob": lp} for i, lp in e.get("top") or []]}
            for e in entries]


@dataclass
class Echo:
    """OpenAI's ``echo``: the prompt's text and its tokens' logprobs (the first one's
    null: nothing predicts it), which come before a choice's own."""

    text: str
    logprobs: list[dict[str, Any]] | None
    prompt_tokens: int

    def before(self, choice: dict[str, Any]) -> dict[str, Any]:
        """``choice`` (``{"text", "logprobs", ...}``) with the prompt in front."""
        lps = choice.get("logprobs")
        return {**choice, "text": self.text + choice["text"],
                "logprobs": None if self.logprobs is None else self.logprobs + (lps or [])}


class InteractiveJob:
    """One synchronous request inside this worker. Its methods run on the engine loop's
    thread and only queue events."""

    def __init__(self, req: LaneRequest, prompt: str | list[int],
                 emit: Callable[[str, LaneEvent], None], done: Callable[[str], None],
                 worker_id: str) -> None:
        self.req = req
        self.prompt = prompt
        self.params = dict(req.params)
        self.stream = req.stream
        self._emit, self._done, self.worker_id = emit, done, worker_id
        self._sent: dict[int, int] = {}  # sample index -> characters already streamed
        # sample index -> (logprob entries streamed, their tokens' bytes)
        self._lp_sent: dict[int, tuple[int, int]] = {}
        self.echo: Echo | None = None

    @property
    def request_id(self) -> str:
        return self.req.id

    def progress(self, samples: list[PartialSample], tokenizer: Any = None) -> None:
        """Stream each sample's new settled text, with the logprobs of the tokens whose
        bytes that text now covers (the rest come with the result)."""
        deltas, lps = {}, {}
        for s in samples:
            sent = self._sent.get(s.index, 0)
            if len(s.text) > sent:
                deltas[s.index] = s.text[sent:]
                self._sent[s.index] = len(s.text)
            # An echo's logprobs start with the prompt's: they all come with the result.
            if s.logprobs and self.echo is None:
                new = self._covered(s.index, s.logprobs, s.text, tokenizer)
                if new:
                    lps[s.index] = describe_entries(tokenizer, new) or []
        if deltas or lps:
            self._emit(self.req.id, LaneEvent(type="delta", deltas=deltas, logprobs=lps))

    def _covered(self, index: int, entries: list[dict[str, Any]], text: str,
                 tokenizer: Any) -> list[dict[str, Any]]:
        """The entries not yet streamed whose tokens' bytes fit in ``text``'s."""
        k, used = self._lp_sent.get(index, (0, 0))
        start, room = k, len(text.encode("utf-8"))
        while k < len(entries):
            n = len(tokenizer.token_bytes(entries[k]["token_id"])) if tokenizer else 0
            if used + n > room:
                break
            used += n
            k += 1
        self._lp_sent[index] = (k, used)
        return entries[start:k]

    def finished(self, out: Any, tokenizer: Any) -> None:
        if any(s.finish_reason == "abort" for s in out.samples):
            self.aborted()
            return
        if out.error:
            self.failed("engine_error", out.error, 500)
            return
        if self.stream:  # the rest of each sample's text, before the result
            self.progress([PartialSample(s.index, s.text, len(s.token_ids))
                           for s in out.samples])
        choices = [{"index": s.index, "text": s.text, "finish_reason": s.finish_reason,
                    "logprobs": s.logprobs} for s in out.samples]
        if self.echo is not None:
            choices = [self.echo.before(c) for c in choices]
        for c in choices:
            c["logprobs"] = describe_entries(tokenizer, c["logprobs"])
        self._emit(self.req.id, LaneEvent(
            type="done", worker=self.worker_id, choices=choices,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=sum(len(s.token_ids) for s in out.samples)))
        self._done(self.req.id)

    def scored(self, tokenizer: Any) -> None:
        """An echo with ``max_tokens: 0``: the prompt alone is the result."""
        assert self.echo is not None
        choice = self.echo.before({"index": 0, "text": "", "finish_reason": "length",
                                   "logprobs": []})
        choice["logprobs"] = describe_entries(tokenizer, choice["logprobs"])
        if self.stream:
            self.progress([PartialSample(0, choice["text"], 0)])
        self._emit(self.req.id, LaneEvent(type="done", worker=self.worker_id,
                                          choices=[choice],
                                          prompt_tokens=self.echo.prompt_tokens))
        self._done(self.req.id)

    def failed(self, code: str, message: str, status: int) -> None:
        self._emit(self.req.id, LaneEvent(type="error", code=code, message=message,
                                          status=status, worker=self.worker_id))
        self._done(self.req.id)

    def aborted(self) -> None:
        self.failed("aborted", "the request was aborted", 499)


class InteractiveLane:
    """Takes synchronous requests for one worker's engine loop (see the module doc)."""

    def __init__(self, settings: Settings, loop: Any, *, worker_id: str,
                 render_chat: Callable[[list[dict[str, Any]]], str | list[int]] | None = None,
                 ) -> None:
        self.settings, self.loop, self.worker_id = settings, loop, worker_id
        self.render_chat = render_chat
        self.key = lane_key(settings)
        self.outbox: queue.Queue[tuple[str, LaneEvent] | None] = queue.Queue()
        self.running: set[str] = set()
        self._lock = threading.Lock()
        self._stop_evt = threading.Event()
        self.paused = False  # draining: take nothing new
        self.taken = 0
        self._threads = [threading.Thread(target=self._take, name="neoxq-lane-take",
                                          daemon=True),
                         threading.Thread(target=self._publish, name="neoxq-lane-publish",
                                          daemon=True),
                         threading.Thread(target=self._listen, name="neoxq-lane-abort",
                                          daemon=True)]

    def _redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.settings.redis_url)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking requests; tell the API about requests still here (they end
        with 503: the worker is going away), then stop the threads."""
        self._stop_evt.set()
        with self._lock:
            left = list(self.running)
        for rid in left:
            self.emit(rid, LaneEvent(type="error", code="worker_stopped", status=503,
                                     message="the worker running this request stopped",
                                     worker=self.worker_id))
        self.outbox.put(None)
        for t in self._threads:
            t.join(timeout=timeout)

    def emit(self, request_id: str, event: LaneEvent) -> None:
        self.outbox.put((request_id, event))

    def _done(self, request_id: str) -> None:
        with self._lock:
            self.running.discard(request_id)

    # -- threads -------------------------------------------------------------------------

    def _take(self) -> None:
        r = self._redis()
        while not self._stop_evt.is_set():
            with self._lock:
                full = len(self.running) >= self.settings.interactive_per_worker
            if full or self.paused or self.loop.error is not None:
                time.sleep(0.05)
                continue
            try:
                got = r.brpop([self.key], timeout=1)
            except Exception as exc:  # noqa: BLE001 - Redis restarting: try again
                log.warning("interactive lane: %s", exc)
                time.sleep(1.0)
                continue
            if got is not None:
                self._accept(got[1])

    def _accept(self, raw: bytes) -> None:
        try:
            req = LaneRequest.model_validate_json(raw)
        except ValidationError as exc:
            log.error("malformed interactive request dropped: %s", exc)
            return
        if time.time() > req.deadline:
            return  # the API has answered 503 already
        with self._lock:
            self.running.add(req.id)
        self.taken += 1
        self.emit(req.id, LaneEvent(type="accepted", worker=self.worker_id))
        job_prompt: str | list[int]
        if req.kind == "chat":
            if self.render_chat is None or req.messages is None:
                self._fail(req, "invalid_request", "this worker cannot render chats")
                return
            try:
                job_prompt = self.render_chat(req.messages)
            except ValueError as exc:  # the template refuses this conversation
                self._fail(req, "invalid_messages", str(exc))
                return
        else:
            assert req.prompt is not None
            job_prompt = req.prompt
        job = InteractiveJob(req, job_prompt, self.emit, self._done, self.worker_id)
        self.loop.submit_interactive(job)

    def _fail(self, req: LaneRequest, code: str, message: str) -> None:
        self.emit(req.id, LaneEvent(type="error", code=code, message=message, status=400))
        self._done(req.id)

    def _publish(self) -> None:
        r = self._redis()
        while True:
            first = self.outbox.get()
            if first is None:
                return
            batch = [first]
            with contextlib.suppress(queue.Empty):
                while len(batch) < 256:
                    nxt = self.outbox.get_nowait()
                    if nxt is None:
                        self.outbox.put(None)
                        break
                    batch.append(nxt)
            for attempt in range(5):
                try:
                    pipe = r.pipeline(transaction=False)
                    for rid, event in batch:
                        key = reply_key(self.settings, rid)
                        pipe.rpush(key, event.model_dump_json(exclude_defaults=True))
                        pipe.expire(key, REPLY_TTL_S)
                    pipe.execute()
                    break
                except Exception as exc:  # noqa: BLE001 - Redis restarting
                    log.warning("interactive replies not sent (%s); retrying", exc)
                    time.sleep(0.2 * (attempt + 1))

    def _listen(self) -> None:
        while not self._stop_evt.is_set():
            try:
                ps = self._redis().pubsub(ignore_subscribe_messages=True)
                ps.subscribe(abort_channel(self.settings))
                while not self._stop_evt.is_set():
                    msg = ps.get_message(timeout=0.5)
                    if msg is None:
                        continue
                    rid = msg["data"].decode() if isinstance(msg["data"], bytes) else ""
                    with self._lock:
                        ours = rid in self.running
                    if ours:
                        log.info("interactive request %s aborted by its client", rid)
                        self.loop.abort(request_ids=[rid])
                ps.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("interactive abort listener: %s", exc)
                time.sleep(1.0)
