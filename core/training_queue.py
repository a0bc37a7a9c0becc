"""The training queue: fine-tuning jobs from the API to ``neoxq trainer`` processes,
through Redis. Everything both sides must agree on is here.

A job is one long task (minutes to days) that must never run twice at once and must
survive its trainer's death; what guarantees that is the job's lease in the store
(``store/jobs.py``), not the message. So the message is only a wake-up: the API
``LPUSH``-es a job id on :func:`queue_key` when the job is queued, an idle trainer
``BRPOP``-s it and tries to claim the job. A lost or duplicated message is harmless:
trainers also look in the store for queued jobs and for running ones whose trainer
stopped heart-beating, so a job whose message is lost (or whose trainer died) is still
taken within a few seconds of becoming claimable.
"""

from __future__ import annotations

from typing import Any

from core.settings import Settings


def queue_key(settings: Settings) -> str:
    """The Redis list of queued job ids (named after the batch queue, with its prefix)."""
    return f"{settings.redis_key_prefix}{settings.queue}:training"


def push_job(r: Any, settings: Settings, job_id: str) -> None:
    """Tell the trainers that ``job_id`` is queued (``r``: a redis client)."""
    r.lpush(queue_key(settings), job_id)


def pop_job(r: Any, settings: Settings, timeout: float) -> str | None:
    """The next queued job id, waiting up to ``timeout`` seconds (None if none came)."""
    got = r.brpop([queue_key(settings)], timeout=max(timeout, 0.01))
    if got is None:
        return None
    value = got[1]
    return value.decode() if isinstance(value, bytes) else str(value)
