"""Everything neoxq knows about how kombu keeps Celery messages in Redis, in one place.

kombu's Redis transport has no real acknowledgements. It emulates them with:

- a list per queue (``<prefix><queue>``; priority levels add ``<queue>\\x06\\x16<n>``
  lists) that producers LPUSH to and consumers BRPOP from;
- ``<prefix>unacked``: a hash of delivery tag -> ``[message, exchange, routing_key]``
  (JSON) for every message delivered and not yet acknowledged;
- ``<prefix>unacked_index``: a sorted set of delivery tag -> the time of delivery;
  kombu puts a message back on its queue once that time is older than the visibility
  timeout (under the ``<prefix>unacked_mutex`` lock).

neoxq leans on that design in three ways, all here:

- **Heartbeats per message** (:func:`touch`): a worker refreshes the index time of the
  chunk messages it is running at every heartbeat, so the time means "last seen alive",
  not "delivered".
- **Dead-worker recovery** (:func:`restore_orphans`): messages whose time is older than
  ``dead_worker_after`` (default 30 s: six missed heartbeats) belong to a worker that
  died; they go back on the queue at once, through kombu's own restore code (same lock,
  same redelivered flag, same priority lists), instead of after the one-hour visibility
  timeout that only protects against chunks outliving it.
- **Reading what the broker holds** (:func:`broker_chunks`): the reconciler compares it
  with the store to find chunks whose message was lost.

The hardened consumer :class:`Transport` lives here too. ``tests/worker/test_broker.py``
holds these assumptions against the installed kombu and a real Redis: if an upgrade
moves a key or changes a format, that test fails rather than recovery silently stopping.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from kombu import Connection
from kombu.transport import redis as kombu_redis

from core.celery_app import RUN_CHUNK, transport_options
from core.settings import Settings

log = logging.getLogger("neoxq.worker")

# kombu.transport.redis.Channel's key names (before the global prefix).
UNACKED = kombu_redis.Channel.unacked_key
UNACKED_INDEX = kombu_redis.Channel.unacked_index_key

Range = tuple[int, int]


# ---------------------------------------------------------------------- the consumer


class Channel(kombu_redis.Channel):
    """The stock channel, but a list entry that is not a message is dropped.

    A list entry that is not JSON (something other than a producer of ours wrote to the
    queue) makes the stock transport raise inside the consumer loop and the Celery
    worker exits, taking every in-flight chunk with it; JSON without the message envelope
    is mistaken for a lost connection. This channel logs and drops such an entry instead
    - it was already popped, and no retry could parse it. A well-formed message that is
    not a valid task is handled by Celery itself (logged and discarded).
    """

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return super()._brpop_read(**options)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("dropped a queue entry that is not a message: %r", exc)
            return True


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel` (``broker_transport`` for workers)."""

    Channel = Channel


TRANSPORT = f"{__name__}:Transport"


# ------------------------------------------------------------------ reading messages


def _key(settings: Settings, name: str) -> str:
    return f"{settings.redis_key_prefix}{name}"


def task_id(message: dict[str, Any]) -> str | None:
    """The Celery task id of a raw message (protocol 2 keeps it in the headers)."""
    try:
        return str(message["headers"]["id"])
    except (KeyError, TypeError):
        return None


def chunk_of(message: dict[str, Any]) -> tuple[str, int, int] | None:
    """The (batch, start, end) a raw Celery message carries, if it is a chunk."""
    try:
        if message.get("headers", {}).get("task") != RUN_CHUNK:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = json.loads(body)
        c = kwargs["chunk"]
        return str(c["batch_id"]), int(c["start"]), int(c["end"])
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def held(r: Any, settings: Settings) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """``(delivery tag, message)`` of every delivered, unacknowledged message."""
    for tag, raw in r.hscan_iter(_key(settings, UNACKED), count=1000):
        try:
            yield tag, json.loads(raw)[0]
        except (ValueError, IndexError, TypeError):
            continue


def queued(r: Any, settings: Settings) -> Iterator[dict[str, Any]]:
    """Every message waiting on the queue (all its priority lists)."""
    for key in r.scan_iter(match=f"{_key(settings, settings.queue)}*", count=1000):
        if r.type(key) != b"list":
            continue
        for raw in r.lrange(key, 0, -1):
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            if isinstance(message, dict):
                yield message


def queue_length(r: Any, settings: Settings) -> int:
    """Messages waiting on the queue, not yet delivered: one LLEN per priority list (no
    SCAN: idle workers ask this twice a second before sharing another worker's tail)."""
    q = _key(settings, settings.queue)
    keys = [q] + [f"{q}{kombu_redis.Channel.sep}{p}" for p in kombu_redis.PRIORITY_STEPS if p]
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.llen(key)
    return int(sum(pipe.execute()))


def broker_chunks(r: Any, settings: Settings) -> dict[str, list[Range]]:
    """Chunk ranges per batch that the broker holds: queued or delivered-unacknowledged."""
    out: dict[str, list[Range]] = {}
    messages: Iterable[dict[str, Any]] = [*queued(r, settings),
                                          *(m for _, m in held(r, settings))]
    for message in messages:
        chunk = chunk_of(message)
        if chunk:
            out.setdefault(chunk[0], []).append((chunk[1], chunk[2]))
    return out


# ------------------------------------------------------------- liveness and recovery


def touch(r: Any, settings: Settings, task_ids: set[str], at: float | None = None) -> int:
    """Refresh the index time of the held messages of ``task_ids`` (this worker's running
    chunks); returns how many were refreshed. ``XX``: a message acknowledged or restored
    meanwhile is not put back into the index."""
    if not task_ids:
        return 0
    at = time.time() if at is None else at
    tags = [tag for tag, message in held(r, settings) if task_id(message) in task_ids]
    if tags:
        r.zadd(_key(settings, UNACKED_INDEX), {tag: at for tag in tags}, xx=True)
    return len(tags)


def restore_orphans(r: Any, settings: Settings, older_than: float) -> int:
    """Put back on the queue every held message whose index time is older than
    ``older_than`` seconds: its worker stopped refreshing it (it died). Returns how many
    were due (0 without touching kombu when none is: this runs at every heartbeat).

    Runs kombu's own ``restore_visible`` on a connection whose visibility timeout is
    ``older_than``, so the restore is exactly kombu's: under its mutex (one restorer at a
    time, no double restore; a held mutex means another worker is at it), in one
    transaction per message, redelivered flag set, priority lists honoured.
    """
    due = int(r.zcount(_key(settings, UNACKED_INDEX), "-inf", time.time() - older_than))
    if not due:
        return 0
    options = {**transport_options(settings), "visibility_timeout": older_than}
    with Connection(settings.redis_url, transport_options=options) as conn:
        conn.default_channel.qos.restore_visible(start=0, num=due + 100, interval=1)
    log.warning("restored %d chunk message(s) of a dead worker (no heartbeat for %.0fs)",
                due, older_than)
    return due
