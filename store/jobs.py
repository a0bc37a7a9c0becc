"""Fine-tuning jobs in the store: creating them, their events and checkpoints, and the
trainer's lease — keyword-only functions ``fn(*, session, ...)``.

**The lease.** A trainer runs a job only while it holds the job's lease: ``trainer_id``
set to its id and ``heartbeat_at`` refreshed every few seconds (:func:`heartbeat`).
:func:`claim_job` is one conditional UPDATE (compare-and-set on the holder and heartbeat
it read), so of two trainers racing for a job exactly one wins. A heartbeat older than
``dead_after`` (``dead_worker_after``, the window that declares a worker dead) means the
holder died: the job stays ``running`` and any trainer may claim it and resume it from
its checkpoint. Every write a trainer makes as the holder (heartbeat, finishing) is
conditional on still holding it and the job still being ``running``, so a trainer whose
job was cancelled or taken over learns it at its next heartbeat and stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from specs.status import JOB_TERMINAL, JobStatus
from store.tables import FineTuningCheckpoint, FineTuningEvent, FineTuningJob, new_id, now

EVENT_PREFIX = "ftevent-"


def create_job(*, session: Session, owner: str, model: str, training_file: str,
               validation_file: str | None, suffix: str | None, seed: int,
               hyperparameters: dict[str, Any], options: dict[str, Any],
               metadata: dict[str, Any] | None = None) -> FineTuningJob:
    """Insert a job in ``validating_files`` (the caller checks its files, then
    :func:`mark_queued`)."""
    job = FineTuningJob(id=new_id("ftjob-"), owner=owner, model=model,
                        training_file=training_file, validation_file=validation_file,
                        suffix=suffix, seed=seed, status=JobStatus.VALIDATING_FILES.value,
                        hyperparameters=hyperparameters, options=options,
                        metadata_=metadata or {}, created_at=now(), attempts=0)
    session.add(job)
    session.flush()
    return job


def get_job(*, session: Session, job_id: str, owner: str | None = None) -> FineTuningJob | None:
    """A job by id, read afresh; with ``owner``, only that owner's (another's answers
    None)."""
    job = session.get(FineTuningJob, job_id, populate_existing=True)
    if job is None or (owner is not None and job.owner != owner):
        return None
    return job


def mark_queued(*, session: Session, job_id: str) -> bool:
    """``validating_files`` -> ``queued`` (False if it moved on meanwhile: cancelled)."""
    res = session.execute(update(FineTuningJob).where(
        FineTuningJob.id == job_id, FineTuningJob.status == JobStatus.VALIDATING_FILES)
        .values(status=JobStatus.QUEUED.value).execution_options(synchronize_session=False))
    return res.rowcount == 1


def cancel_job(*, session: Session, job_id: str) -> bool:
    """Cancel a job that has not finished (False if it already had). A running job's
    trainer sees it at its next heartbeat and stops training."""
    res = session.execute(update(FineTuningJob).where(
        FineTuningJob.id == job_id, FineTuningJob.status.not_in(JOB_TERMINAL))
        .values(status=JobStatus.CANCELLED.value, finished_at=now(), trainer_id=None)
        .execution_options(synchronize_session=False))
    return res.rowcount == 1


def add_event(*, session: Session, job_id: str, message: str, level: str = "info",
              type: str = "message", step: int | None = None,
              data: dict[str, Any] | None = None) -> FineTuningEvent:
    """Append an event to a job's log."""
    ev = FineTuningEvent(job_id=job_id, created_at=now(), level=level, type=type,
                         message=message, step=step, data=data)
    session.add(ev)
    session.flush()
    return ev


def event_id(ev: FineTuningEvent) -> str:
    """An event's public id (``ftevent-<seq>``)."""
    return f"{EVENT_PREFIX}{ev.seq}"


def list_events(*, session: Session, job_id: str, after: str | None = None,
                limit: int = 20) -> tuple[list[FineTuningEvent], bool]:
    """A job's events newest first, after the event id ``after``; ``(page, has_more)``."""
    q = select(FineTuningEvent).where(FineTuningEvent.job_id == job_id)
    if after:
        seq = after.removeprefix(EVENT_PREFIX)
        if not seq.isdigit():
            return [], False
        q = q.where(FineTuningEvent.seq < int(seq))
    rows = list(session.scalars(q.order_by(FineTuningEvent.seq.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def metrics_series(*, session: Session, job_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The ``metrics`` events' data of these jobs, by job, in step order (loss curves)."""
    out: dict[str, list[dict[str, Any]]] = {j: [] for j in job_ids}
    if not job_ids:
        return out
    rows = session.execute(select(FineTuningEvent.job_id, FineTuningEvent.data)
                           .where(FineTuningEvent.job_id.in_(job_ids),
                                  FineTuningEvent.type == "metrics")
                           .order_by(FineTuningEvent.step, FineTuningEvent.seq)).tuples()
    for job_id, data in rows:
        out[job_id].append(data or {})
    return out


def last_metrics_step(*, session: Session, job_id: str) -> int:
    """The highest step a ``metrics`` event was recorded for (0 if none)."""
    return int(session.scalar(select(func.max(FineTuningEvent.step)).where(
        FineTuningEvent.job_id == job_id, FineTuningEvent.type == "metrics")) or 0)


def add_checkpoint(*, session: Session, job_id: str, step: int, metrics: dict[str, Any],
                   path: str | None) -> FineTuningCheckpoint | None:
    """Record a checkpoint at ``step`` (None if one is recorded there already)."""
    exists = session.scalar(select(FineTuningCheckpoint.id).where(
        FineTuningCheckpoint.job_id == job_id, FineTuningCheckpoint.step == step))
    if exists:
        return None
    ck = FineTuningCheckpoint(id=new_id("ftckpt-"), job_id=job_id, step=step,
                              created_at=now(), metrics=metrics, path=path)
    session.add(ck)
    session.flush()
    return ck


def list_checkpoints(*, session: Session, job_id: str, after: str | None = None,
                     limit: int = 10) -> tuple[list[FineTuningCheckpoint], bool]:
    """A job's checkpoints, newest (highest step) first, after checkpoint id ``after``."""
    q = select(FineTuningCheckpoint).where(FineTuningCheckpoint.job_id == job_id)
    if after:
        cursor = session.get(FineTuningCheckpoint, after)
        if cursor is None or cursor.job_id != job_id:
            return [], False
        q = q.where(FineTuningCheckpoint.step < cursor.step)
    rows = list(session.scalars(q.order_by(FineTuningCheckpoint.step.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def count_jobs_by_status(*, session: Session) -> dict[str, int]:
    """How many jobs are in each state (every owner's: an operator's figure)."""
    return dict(session.execute(select(FineTuningJob.status, func.count())
                                .group_by(FineTuningJob.status)).tuples().all())


# ---------------------------------------------------------------------- the lease


def claimable_jobs(*, session: Session, dead_after: float, limit: int = 10) -> list[str]:
    """Jobs a trainer may take, oldest first: queued ones, and running ones whose holder
    stopped heart-beating ``dead_after`` seconds ago (or released them)."""
    stale = now() - dead_after
    q = select(FineTuningJob.id).where(or_(
        FineTuningJob.status == JobStatus.QUEUED,
        and_(FineTuningJob.status == JobStatus.RUNNING,
             or_(FineTuningJob.trainer_id.is_(None), FineTuningJob.heartbeat_at < stale))))
    return list(session.scalars(q.order_by(FineTuningJob.created_at).limit(limit)))


@dataclass(frozen=True)
class Claim:
    """A job a trainer now holds; ``previous`` is the trainer it took it over from (None
    for a queued job, or one released cleanly by a stopping trainer)."""

    job: FineTuningJob
    previous: str | None
    resumed: bool  # it was running before (a trainer started it earlier)


def claim_job(*, session: Session, job_id: str, trainer_id: str, dead_after: float,
              out_dir: str) -> Claim | None:
    """Take the lease of a queued job, or of a running one whose holder is dead or gone
    (None if the job is not claimable or another trainer won the race). The job becomes
    ``running`` with this trainer as holder; ``out_dir`` is kept from an earlier run."""
    job = session.get(FineTuningJob, job_id, populate_existing=True)
    if job is None:
        return None
    t = now()
    if job.status == JobStatus.QUEUED:
        cond = FineTuningJob.status == JobStatus.QUEUED
    elif job.status == JobStatus.RUNNING and (
            job.trainer_id is None or (job.heartbeat_at or 0.0) < t - dead_after):
        # Compare-and-set on what was read: a live holder's heartbeat moves it on.
        holder = (FineTuningJob.trainer_id.is_(None) if job.trainer_id is None
                  else FineTuningJob.trainer_id == job.trainer_id)
        beat = (FineTuningJob.heartbeat_at.is_(None) if job.heartbeat_at is None
                else FineTuningJob.heartbeat_at == job.heartbeat_at)
        cond = and_(FineTuningJob.status == JobStatus.RUNNING, holder, beat)
    else:
        return None
    previous, resumed = job.trainer_id, job.status == JobStatus.RUNNING
    res = session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id, cond).values(
        status=JobStatus.RUNNING.value, trainer_id=trainer_id, heartbeat_at=t,
        started_at=func.coalesce(FineTuningJob.started_at, t),
        out_dir=func.coalesce(FineTuningJob.out_dir, out_dir),
        attempts=FineTuningJob.attempts + 1).execution_options(synchronize_session=False))
    if res.rowcount != 1:
        return None
    session.flush()
    job = session.get(FineTuningJob, job_id, populate_existing=True)
    assert job is not None
    return Claim(job=job, previous=previous, resumed=resumed)


def _held(job_id: str, trainer_id: str) -> Any:
    return and_(FineTuningJob.id == job_id, FineTuningJob.trainer_id == trainer_id,
                FineTuningJob.status == JobStatus.RUNNING)


def heartbeat(*, session: Session, job_id: str, trainer_id: str) -> bool:
    """Refresh the lease; False if this trainer no longer holds a running job (it was
    cancelled, or taken over after a missed heartbeat): it must stop training."""
    res = session.execute(update(FineTuningJob).where(_held(job_id, trainer_id))
                          .values(heartbeat_at=now())
                          .execution_options(synchronize_session=False))
    return res.rowcount == 1


def release_job(*, session: Session, job_id: str, trainer_id: str) -> bool:
    """Give the lease back without finishing (a trainer shutting down): the job stays
    ``running`` and the next trainer to look takes it at once."""
    res = session.execute(update(FineTuningJob).where(_held(job_id, trainer_id))
                          .values(trainer_id=None, heartbeat_at=None)
                          .execution_options(synchronize_session=False))
    return res.rowcount == 1


def finish_job(*, session: Session, job_id: str, trainer_id: str, status: JobStatus,
               fine_tuned_model: str | None = None, error: dict[str, Any] | None = None,
               trained_tokens: int | None = None) -> bool:
    """``running`` -> ``succeeded`` or ``failed`` by its holder (False if it no longer
    holds it: a cancelled job stays cancelled)."""
    if status not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise ValueError(f"finish_job: succeeded or failed expected, got {status}")
    res = session.execute(update(FineTuningJob).where(_held(job_id, trainer_id)).values(
        status=status.value, fine_tuned_model=fine_tuned_model, error=error,
        trained_tokens=trained_tokens, finished_at=now(), trainer_id=None, heartbeat_at=None)
        .execution_options(synchronize_session=False))
    return res.rowcount == 1


def fail_job(*, session: Session, job_id: str, error: dict[str, Any]) -> bool:
    """Fail a job that has not finished, whoever holds it (a job nobody can run)."""
    res = session.execute(update(FineTuningJob).where(
        FineTuningJob.id == job_id, FineTuningJob.status.not_in(JOB_TERMINAL))
        .values(status=JobStatus.FAILED.value, error=error, finished_at=now(),
                trainer_id=None, heartbeat_at=None)
        .execution_options(synchronize_session=False))
    return res.rowcount == 1


def set_hyperparameters(*, session: Session, job_id: str,
                        hyperparameters: dict[str, Any]) -> None:
    """Record the hyperparameters a trainer resolved (``"auto"`` replaced by values)."""
    session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id)
                    .values(hyperparameters=hyperparameters)
                    .execution_options(synchronize_session=False))
