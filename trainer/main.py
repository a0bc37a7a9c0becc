"""``neoxq trainer``: take fine-tuning jobs off the training queue and run them, one at a
time, on this host's GPUs (``--gpus N``: N data-parallel ranks per job).

The loop: wait up to ``poll`` seconds for a job id on the training queue (Redis,
``core/training_queue.py``), then try to claim that job and any the store says is
claimable — queued, or running under a trainer that stopped heart-beating
``dead_worker_after`` seconds ago (store/jobs.py). The first claim won is run to its end
(``trainer/job.py``); then the loop goes on. SIGTERM/SIGINT stop the job's ranks and hand
the job back at once (it stays ``running``; the next trainer resumes it from its last
checkpoint); SIGKILL does the same, one ``dead_worker_after`` later.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("neoxq.trainer")


@dataclass
class TrainerOptions:
    """What ``neoxq trainer`` was asked for; None means "from the settings"."""

    out_dir: str | None = None  # default <data_dir>/jobs
    gpus: int = 1
    device: str | None = None
    trainer_id: str | None = None
    database_url: str | None = None
    redis_url: str | None = None
    poll: float = 2.0
    loglevel: str = "INFO"


def run_trainer(opts: TrainerOptions) -> int:
    """Run jobs until SIGTERM/SIGINT; the exit code."""
    import redis

    from core.settings import get_settings
    from core.training_queue import pop_job, queue_key
    from store.db import make_engine, session_scope
    from store.jobs import claim_job, claimable_jobs
    from trainer.job import JobRun, TrainerSetup

    logging.basicConfig(level=opts.loglevel.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # now, not while holding a job's lease: it takes seconds (torch, deepspeed)
        import train.finetune  # noqa: F401
    except ImportError as exc:
        log.error("neoxq trainer needs the train extra (%s is missing): pip install "
                  "'neoxq[train]'", exc.name)
        return 1
    overrides = {k: v for k, v in {"database_url": opts.database_url,
                                   "redis_url": opts.redis_url}.items() if v}
    settings = get_settings().model_copy(update=overrides)
    db = make_engine(settings.db_url)
    r = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5,
                             socket_timeout=opts.poll + 10)
    out_dir = Path(opts.out_dir or settings.data_dir / "jobs").resolve()
    setup = TrainerSetup(trainer_id=opts.trainer_id or f"{socket.gethostname()}:{os.getpid()}",
                         out_dir=out_dir, gpus=opts.gpus, device=opts.device)
    stopping = threading.Event()

    def stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("trainer %s (%d rank(s) per job) waiting for jobs on %s; results in %s",
             setup.trainer_id, setup.gpus, queue_key(settings), out_dir)
    while not stopping.is_set():
        try:
            popped = pop_job(r, settings, timeout=opts.poll)
        except redis.RedisError as exc:
            # The store alone is enough to find work; Redis only makes it prompt.
            log.warning("training queue unavailable (%s); looking in the store", exc)
            popped = None
            stopping.wait(opts.poll)
        with session_scope(db) as s:
            candidates = claimable_jobs(session=s, dead_after=settings.dead_worker_after)
        for job_id in dict.fromkeys(([popped] if popped else []) + candidates):
            with session_scope(db) as s:
                claim = claim_job(session=s, job_id=job_id, trainer_id=setup.trainer_id,
                                  dead_after=settings.dead_worker_after,
                                  out_dir=str(out_dir / job_id))
            if claim is None:
                continue
            log.info("claimed %s (%s)", job_id, "resuming" if claim.resumed else "new")
            try:
                JobRun(claim, db=db, settings=settings, setup=setup, stopping=stopping).run()
            except Exception as exc:  # noqa: BLE001 - a bug, or the store went away
                log.exception("job %s: the trainer failed while running it", job_id)
                give_up(db, job_id, setup.trainer_id, exc)
            break
    r.close()
    db.dispose()
    log.info("trainer %s stopped", setup.trainer_id)
    return 0


def give_up(db: Any, job_id: str, trainer_id: str, exc: Exception) -> None:
    """Fail a job this trainer could not run (an error that would recur on any trainer).
    If even that cannot be written (the store is down), the lease goes stale and a
    trainer resumes the job later."""
    from specs.status import JobStatus
    from store.db import session_scope
    from store.jobs import add_event, finish_job

    message = f"the trainer failed: {type(exc).__name__}: {exc}"[:2000]
    try:
        with session_scope(db) as s:
            if finish_job(session=s, job_id=job_id, trainer_id=trainer_id,
                          status=JobStatus.FAILED,
                          error={"code": "trainer_error", "message": message, "param": None}):
                add_event(session=s, job_id=job_id, level="error",
                          message=f"The job failed: {message}")
    except Exception:  # noqa: BLE001
        log.exception("job %s: could not record the failure", job_id)
