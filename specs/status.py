"""Batch and item status names, and the groups of them that code branches on.

The one place these are spelled: the store writes them, the worker obeys them, the API
renders them (they are OpenAI's Batch status names), and the CLI and the evaluation
client (``evals/remote.py``) poll for them. Members
are ``StrEnum``s, so they compare equal to the plain strings stored in the tables and
sent over HTTP.
"""

from __future__ import annotations

from enum import StrEnum


class BatchStatus(StrEnum):
    """A batch's life: ``validating -> in_progress -> finalizing -> completed | failed``,
    with ``cancelling -> cancelled`` and ``expired`` on the side (OpenAI's names)."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class ItemStatus(StrEnum):
    """One request's life inside a batch."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class WorkerStatus(StrEnum):
    """What a worker's heartbeat says it is doing (``stopped``: it shut down cleanly)."""

    STARTING = "starting"
    # Heartbeating while its engine warms up (graphs, kernels): alive, not yet consuming.
    WARMING = "warming"
    RUNNING = "running"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    STOPPED = "stopped"
    # Stopped heartbeating without a clean stop (killed, host lost): marked by another
    # worker, which then takes back its chunks. A heartbeat puts it back to live.
    LOST = "lost"


class JobStatus(StrEnum):
    """A fine-tuning job's life, as OpenAI names it: ``validating_files -> queued ->
    running -> succeeded | failed``, or ``cancelled`` from any of the first three. A job
    whose trainer died stays ``running``: another trainer resumes it."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Engine loaded and consuming (what a benchmark waits for before it submits).
READY_WORKERS = frozenset({WorkerStatus.RUNNING, WorkerStatus.IDLE, WorkerStatus.BUSY})

# A worker that will not heartbeat again on its own (shut down, or marked dead by another
# worker): not live, whatever its last heartbeat says.
GONE_WORKERS = frozenset({WorkerStatus.STOPPED, WorkerStatus.LOST})

# Final job states: a trainer never runs these, and they cannot be cancelled.
JOB_TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

# Alive but not yet taking work (warming its engine up): not counted when work is shared
# out among the workers. (``starting`` lasts only from registration to the first
# heartbeat, which says ``warming`` or that the worker is ready.)
NOT_READY = frozenset({WorkerStatus.WARMING})

B = BatchStatus
# Final: nothing about the batch changes any more (clients stop polling here).
TERMINAL = frozenset({B.COMPLETED, B.FAILED, B.CANCELLED, B.EXPIRED})
# Not final yet: counted as active work in listings, metrics and progress figures.
ACTIVE = frozenset(BatchStatus) - TERMINAL
# A user may still cancel these (later ones are finishing or finished).
CANCELLABLE = frozenset({B.VALIDATING, B.IN_PROGRESS})
# Past its ``expires_at`` these are expired (nothing has finished them).
EXPIRABLE = frozenset({B.VALIDATING, B.IN_PROGRESS})
# Workers abort in-flight sequences of these batches and run no more of their chunks.
STOPPED = frozenset({B.CANCELLING, B.CANCELLED, B.FAILED, B.EXPIRED})
# Ended before every item ran: their unrun items are reported as errors.
CUT_SHORT = frozenset({B.CANCELLED, B.EXPIRED})

# Items that still need a worker (no result yet, not cancelled).
UNFINISHED_ITEMS = frozenset({ItemStatus.QUEUED, ItemStatus.RUNNING})


def is_terminal(status: str) -> bool:
    """Whether a batch status is final."""
    return status in TERMINAL
