"""The Celery task that runs a chunk, registered on the app by the worker process."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from pydantic import ValidationError

from core.celery_app import RUN_CHUNK
from core.payloads import ChunkPayload
from worker.runtime import HandBack, Retry, WorkerRuntime

log = logging.getLogger("neoxq.worker")

# Countdown before a retried chunk runs again. Kept far below the visibility timeout:
# Redis holds a countdown message unacknowledged until it is due, and one held past the
# timeout would be delivered a second time.
RETRY_COUNTDOWN_S = 2.0


def register_tasks(app: Celery, runtime: WorkerRuntime) -> Task:
    """Register ``neoxq.run_chunk`` on ``app``, bound to this process's runtime."""

    @app.task(name=RUN_CHUNK, bind=True, acks_late=True, reject_on_worker_lost=True,
              max_retries=None)
    def run_chunk(self: Task, chunk: Any = None, **extra: Any) -> str:
        """Run one chunk (items ``[start, end)`` of a batch) through this worker's engine.

        Acknowledged only when every item has a committed result (acks_late), so a worker
        killed mid-chunk loses nothing: the message is redelivered and finished items are
        skipped. A malformed payload is logged and dropped - no retry can fix it. On
        shutdown the chunk is handed back (requeued); after a transient failure it is
        retried, and items that keep failing give up after ``max_attempts`` attempts.
        """
        try:
            payload = ChunkPayload.parse(chunk)
            if extra:
                raise ValueError(f"unexpected arguments {sorted(extra)}")
        except (ValidationError, ValueError, TypeError) as exc:
            log.error("malformed chunk message %s dropped: %s", self.request.id, exc)
            return "malformed"
        try:
            return runtime.run_chunk(payload, task_id=self.request.id)
        except HandBack:
            log.info("handing chunk %s back to the queue", payload)
            raise Reject("worker shutting down", requeue=True) from None
        except Retry:
            log.warning("chunk %s failed transiently; retrying", payload)
            raise self.retry(countdown=RETRY_COUNTDOWN_S) from None
        except Exception:  # noqa: BLE001 - e.g. the database is down
            # With acks_late a task that *fails* is still acknowledged, and its items would
            # never run: every unexpected error becomes a retry instead.
            log.exception("chunk %s failed; retrying", payload)
            raise self.retry(countdown=RETRY_COUNTDOWN_S) from None

    return run_chunk
