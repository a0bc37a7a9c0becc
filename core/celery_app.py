"""The one Celery app: broker settings, the queue, the task names.

Producers (the API, the CLI) only need :func:`enqueue_chunk`; they never import the
worker, so they never import torch. The worker registers the task bodies on this app.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from core.payloads import ChunkPayload
from core.settings import Settings, get_settings

RUN_CHUNK = "neoxq.run_chunk"


def transport_options(s: Settings) -> dict[str, Any]:
    """kombu's Redis transport options for ``s`` (producers, consumers and the worker's
    own recovery connection share them)."""
    transport: dict[str, Any] = {
        # Redis has no acks: a delivered, unacknowledged message sits in an "unacked" hash
        # and is restored to its queue once older than this. Set well above the longest
        # chunk (chunks are sized to take minutes) so that a healthy worker's chunk is never
        # delivered twice; the worker also refreshes the timestamps of the messages it holds
        # at every heartbeat, so even a slow chunk is safe. A killed worker's chunks come
        # back much sooner, once they miss `dead_worker_after` seconds of heartbeats
        # (worker/broker.py); this timeout is only the backstop.
        "visibility_timeout": s.visibility_timeout,
        # How often a consumer looks for messages past their timeout (kombu's default is
        # every 100 s); a quarter of the timeout bounds recovery at 1.25 timeouts.
        "unacked_restore_interval": max(1, min(60, s.visibility_timeout // 4)),
        "unacked_restore_throttle": 1,
        # The lock one consumer takes while restoring. A sweep takes milliseconds; the
        # expiry only matters when a worker is killed holding it, and kombu's 5-minute
        # default would then stop every other worker from restoring for 5 minutes.
        "unacked_mutex_expire": 10,
    }
    if s.redis_key_prefix:
        # Isolates queues *and* the unacked hash: otherwise every app on the Redis database
        # restores every other app's unacknowledged messages with its own timeout.
        transport["global_keyprefix"] = s.redis_key_prefix
    return transport


def make_celery(settings: Settings | None = None) -> Celery:
    """Build the Celery app for ``settings`` (default: the environment's)."""
    s = settings or get_settings()
    app = Celery("neoxq", broker=s.redis_url, set_as_current=False)
    transport = transport_options(s)
    app.conf.update(
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_default_queue=s.queue,
        task_queues=[Queue(s.queue, routing_key=s.queue)],
        # A mistyped queue name must fail loudly, not silently create a queue nobody reads.
        task_create_missing_queues=False,
        task_routes={RUN_CHUNK: {"queue": s.queue, "routing_key": s.queue}},
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,  # results go to SQL, never to Celery's result backend
        task_ignore_result=True,
        # Acknowledge a chunk only when its results are committed; if the worker process
        # dies (SIGKILL, OOM, lost host) the message is redelivered and the redelivered
        # chunk skips the items whose results are already stored.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Prefetch exactly what the pool can run: each worker holds `concurrency` chunks
        # (several in flight keep the engine full) and no more, so other workers get the
        # rest of the queue instead of one worker hoarding it.
        worker_prefetch_multiplier=1,
        worker_concurrency=s.worker_concurrency,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=False,  # no pidbox queues in a shared Redis
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


_app: Celery | None = None


def get_celery() -> Celery:
    """The process-wide app built from the environment's settings."""
    global _app
    if _app is None:
        _app = make_celery()
    return _app


def queue_depth(app: Celery, queue: str) -> int:
    """Messages waiting on ``queue`` (every priority level), through kombu's public queue
    declare (which answers the count; on Redis it writes nothing), so that producers never
    read the broker's own keys. Not passive: kombu's passive check does not see a prefixed
    queue, and an empty Redis queue does not exist anyway."""
    with app.connection_for_read() as conn:
        return int(conn.default_channel.queue_declare(queue=queue).message_count)


def model_queue(settings: Settings, model: str | None) -> str:
    """The queue of ``model``'s chunks: each model has its own, consumed only by workers
    serving it, so one fleet holds several models. The default model (``model_name``,
    what batches naming none get) keeps the plain configured queue, so a single-model
    deployment's queue is what it always was."""
    if not model or model == settings.model_name:
        return settings.queue
    return f"{settings.queue}@{model}"


def enqueue_chunk(payload: ChunkPayload, *, app: Celery | None = None,
                  queue: str | None = None, settings: Settings | None = None) -> None:
    """Publish one chunk message: on ``queue``, or with ``settings`` on the queue of the
    payload's model, or else on the app's default queue."""
    app = app or get_celery()
    if queue is None and settings is not None:
        queue = model_queue(settings, payload.model)
    q = queue or app.conf.task_default_queue
    # A declared Queue, not its name: the app refuses names it has not declared
    # (task_create_missing_queues=False), and model queues come and go with the registry.
    app.send_task(RUN_CHUNK, kwargs={"chunk": payload.model_dump(exclude_none=True)},
                  queue=Queue(q, routing_key=q), routing_key=q)
