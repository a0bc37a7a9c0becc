"""The interactive lane: synchronous requests from the API to any worker, through Redis.

Batch work travels as Celery chunk messages naming items in the store; a synchronous
request cannot afford a store round trip per token, so it travels whole on a plain Redis
list that every worker pops ahead of its batch work (the engine then runs it at
``INTERACTIVE`` priority). Everything both sides must agree on is here:

- :func:`lane_key` — the list: the API ``LPUSH``-es a :class:`LaneRequest`, workers
  ``BRPOP`` it (oldest first). Named after the batch queue, so a deployment with a queue
  per model has a lane per model too.
- :func:`reply_key` — one list per request, where the worker ``RPUSH``-es
  :class:`LaneEvent` s: ``accepted`` (a worker took it), ``delta`` (new text of a stream),
  ``done`` (the result) or ``error``; the API ``BLPOP``-s them. It expires on its own.
- :func:`abort_channel` — a pub/sub channel: the API publishes a request id when its
  client went away (or it gave up), and the worker running it aborts it in the engine.

A request no worker took within ``Settings.interactive_timeout`` is taken back off the
list by the API (``LREM``), which answers 503; a worker that pops a request past its
``deadline`` drops it (the API may already have answered).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.settings import Settings

# A reply list outlives its request by this much at most (a vanished API leaves nothing).
REPLY_TTL_S = 600


def lane_key(settings: Settings, queue: str | None = None) -> str:
    """The Redis list of waiting synchronous requests for ``queue`` (default: the
    settings' queue)."""
    return f"{settings.redis_key_prefix}{queue or settings.queue}:interactive"


def reply_key(settings: Settings, request_id: str) -> str:
    """The Redis list a request's events are pushed to."""
    return f"{settings.redis_key_prefix}neoxq:reply:{request_id}"


def abort_channel(settings: Settings) -> str:
    """The pub/sub channel of request ids to abort."""
    return f"{settings.redis_key_prefix}neoxq:interactive-abort"


class LaneRequest(BaseModel):
    """One synchronous request, as the API checked it."""

    model_config = ConfigDict(extra="forbid")

    v: int = 1
    id: str = Field(min_length=1, max_length=128)
    kind: Literal["completion", "chat"] = "completion"
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    # Checked sampling fields, plus core.jsonl.ECHO for OpenAI's echo.
    params: dict[str, Any] = Field(default_factory=dict)
    stream: bool = False
    deadline: float  # time.time() after which no worker may start it


class LaneEvent(BaseModel):
    """What a worker reports about a request."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["accepted", "delta", "done", "error"]
    worker: str = ""
    # delta: new text per sample index, and the logprobs of the tokens that text
    # completes (when asked; described as in a done event's choices)
    deltas: dict[int, str] = Field(default_factory=dict)
    logprobs: dict[int, list[dict[str, Any]]] = Field(default_factory=dict)
    # done: the engine's result
    choices: list[dict[str, Any]] = Field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # error: OpenAI's code and message; status is the HTTP status to answer
    code: str = ""
    message: str = ""
    status: int = 400
