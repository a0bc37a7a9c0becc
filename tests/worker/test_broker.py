"""The contract between worker/broker.py and the installed kombu, on a real Redis: where
kombu keeps queued and unacknowledged messages, what a Celery chunk message looks like,
and that refreshing and restoring them works. An upgrade that moves a key or changes a
format fails here, not silently in production (a dead worker's chunks never coming back).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection
from kombu.utils.imports import symbol_by_name

from core.celery_app import enqueue_chunk, make_celery, queue_depth, transport_options
from core.payloads import ChunkPayload
from core.settings import Settings
from tests.api.conftest import drop_redis_keys
from worker import broker


@pytest.fixture
def setup(redis_url: str, unique: str) -> Iterator[tuple[Settings, redis.Redis]]:
    s = Settings(redis_url=redis_url, queue=f"neoxq_b_{unique}",
                 redis_key_prefix=f"neoxq_b_{unique}:")
    r = redis.Redis.from_url(redis_url)
    yield s, r
    r.close()
    drop_redis_keys(redis_url, s.redis_key_prefix)


def _deliver(s: Settings) -> tuple[Connection, object]:
    """Take one message off the queue without acknowledging it, as a worker does."""
    conn = Connection(s.redis_url, transport_options=transport_options(s))
    message = conn.default_channel.basic_get(s.queue, no_ack=False)
    assert message is not None
    return conn, message


def test_queued_and_held_messages_are_read_and_restored(setup) -> None:
    s, r = setup
    app = make_celery(s)
    enqueue_chunk(ChunkPayload(batch_id="batch_x", start=0, end=10), app=app, queue=s.queue)
    enqueue_chunk(ChunkPayload(batch_id="batch_x", start=10, end=20), app=app, queue=s.queue)
    assert queue_depth(app, s.queue) == 2
    assert sorted(broker.broker_chunks(r, s)["batch_x"]) == [(0, 10), (10, 20)]

    conn, message = _deliver(s)
    held = list(broker.held(r, s))
    assert len(held) == 1 and queue_depth(app, s.queue) == 1
    tag, raw = held[0]
    assert broker.task_id(raw) == message.headers["id"]
    assert broker.chunk_of(raw) in {("batch_x", 0, 10), ("batch_x", 10, 20)}
    # Still covered while held (the reconciler must not re-enqueue it).
    assert sorted(broker.broker_chunks(r, s)["batch_x"]) == [(0, 10), (10, 20)]

    index = f"{s.redis_key_prefix}{broker.UNACKED_INDEX}"
    delivered_at = r.zscore(index, tag)
    assert delivered_at is not None and abs(delivered_at - time.time()) < 30
    # A heartbeat refreshes the index time of our own messages, not of others'.
    assert broker.touch(r, s, {"someone-else"}) == 0
    assert broker.touch(r, s, {broker.task_id(raw)}, at=delivered_at + 100) == 1
    assert r.zscore(index, tag) == delivered_at + 100

    # Fresh: nothing is restored. Stale (no heartbeat for longer than the limit): back on
    # the queue, marked redelivered, gone from the unacked hash and index.
    assert broker.restore_orphans(r, s, older_than=30) == 0
    r.zadd(index, {tag: time.time() - 60})
    assert broker.restore_orphans(r, s, older_than=30) == 1
    assert list(broker.held(r, s)) == [] and r.zcard(index) == 0
    assert queue_depth(app, s.queue) == 2
    again = [m for m in broker.queued(r, s) if broker.task_id(m) == broker.task_id(raw)]
    assert len(again) == 1 and again[0]["headers"]["redelivered"] is True
    conn.release()


def test_chunk_of_ignores_other_messages() -> None:
    assert broker.chunk_of({"headers": {"task": "other"}, "body": "[]"}) is None
    assert broker.chunk_of({"headers": {"task": broker.RUN_CHUNK}, "body": "not json"}) is None
    assert broker.task_id({"headers": None}) is None


def test_the_hardened_transport_is_kombus_with_our_channel() -> None:
    transport = symbol_by_name(broker.TRANSPORT)
    assert issubclass(transport, symbol_by_name("kombu.transport.redis:Transport"))
    assert transport.Channel is broker.Channel
    # The key names worker/broker.py reads are the ones kombu writes.
    assert (broker.UNACKED, broker.UNACKED_INDEX) == ("unacked", "unacked_index")
