"""OpenAI's fine-tuning API (``/v1/fine_tuning/jobs``): create, list, retrieve, cancel,
events and checkpoints, so that the official ``openai`` client's ``fine_tuning.jobs``
calls work unchanged. Jobs are stored and queued here; ``neoxq trainer`` processes run
them (``trainer/``) and write their events, checkpoints and result to the store.

Training files are checked line by line when they are uploaded (``purpose=fine-tune``),
with the same rules ``neoxq finetune`` applies (``specs/training.py``); a job names files
that passed.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from api import render, service
from api.auth import OwnerDep, SessionDep, SettingsDep
from api.errors import ApiError, not_found
from api.schemas import (
    CreateFineTuningJobRequest,
    FineTuningCheckpointList,
    FineTuningEventList,
    FineTuningJobList,
    FineTuningJobObject,
    Hyperparameters,
    NeoxqTrainingOptions,
)
from core.settings import Settings
from specs.status import JOB_TERMINAL
from specs.training import check_lines
from store.jobs import (
    add_event,
    cancel_job,
    create_job,
    get_job,
    list_checkpoints,
    list_events,
    mark_queued,
)
from store.registry import get_model, known_models
from store.tables import FineTuningJob
from store.views import get_file, list_jobs

log = logging.getLogger("neoxq.api")
router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])

FINE_TUNE = "fine-tune"
# Bad lines listed in a refusal: every one, up to this many (then a count of the rest),
# so that a wholly wrong 50,000-line file does not make a megabyte of error.
MAX_LISTED_LINES = 1000


def check_training_file(path: Path) -> ApiError | None:
    """The 400 for an uploaded fine-tuning file with bad lines (every one listed with its
    line number, up to :data:`MAX_LISTED_LINES`), or None when every line is good."""
    with path.open("rb") as f:
        checked = check_lines(f, keep=False)
    if not checked.bad and checked.count:
        return None
    if not checked.bad:
        return ApiError(400, "The training file was refused: it has no training examples "
                             "(every line is blank).", code="invalid_training_file",
                        param="file", errors=[])
    errors = [{"line": b.line, "param": None, "code": "invalid_training_line",
               "message": str(b)} for b in checked.bad[:MAX_LISTED_LINES]]
    more = len(checked.bad) - len(errors)
    tail = f" (the first {len(errors)} are listed)" if more > 0 else ""
    lines = ", ".join(str(b.line) for b in checked.bad[:20])
    return ApiError(400, f"The training file was refused: {len(checked.bad)} bad line(s) "
                         f"(lines {lines}{', ...' if len(checked.bad) > 20 else ''}){tail}; "
                         f"first: {checked.bad[0]}",
                    code="invalid_training_file", param="file", line=checked.bad[0].line,
                    errors=errors)


def _owned_job(session: Any, job_id: str, owner: str) -> FineTuningJob:
    job = get_job(session=session, job_id=job_id, owner=owner)
    if job is None:
        raise not_found("fine-tuning job", job_id)
    return job


def _check_file(session: Any, owner: str, file_id: str, param: str) -> None:
    f = get_file(session=session, file_id=file_id, owner=owner)
    if f is None:
        raise ApiError(400, f"{param}: no file {file_id!r} (upload it with purpose "
                            f"'{FINE_TUNE}' first)", code="invalid_file", param=param)
    if f.purpose != FINE_TUNE or not f.path:
        raise ApiError(400, f"{param}: a file uploaded with purpose '{FINE_TUNE}' expected, "
                            f"{file_id} has purpose {f.purpose!r}", code="invalid_file",
                       param=param)


def _check_base(session: Any, settings: Settings, model: str) -> None:
    known = known_models(session=session, default=settings.model_name)
    if model not in known:
        raise ApiError(400, f"model: unknown base model {model!r}; known: "
                            f"{', '.join(sorted(known))}", code="model_not_found",
                       param="model")
    entry = get_model(session=session, name=model)
    if entry is None or not entry.checkpoint:
        raise ApiError(400, f"model: no checkpoint is recorded for {model!r} (a worker "
                            "serving it records one when it starts), so no trainer can "
                            "load it", code="model_not_trainable", param="model")


def _push(request: Request, job_id: str) -> None:
    try:
        request.app.state.push_job(job_id)
    except Exception as exc:  # noqa: BLE001 - trainers also find queued jobs in the store
        log.warning("training queue unavailable (%s); trainers will find job %s in the "
                    "store", exc, job_id)


@router.post("/jobs", response_model=FineTuningJobObject)
async def create_job_route(body: CreateFineTuningJobRequest, request: Request,
                           owner: OwnerDep, settings: SettingsDep) -> FineTuningJobObject:
    """Create a fine-tuning job of ``model`` (a base model or an earlier fine-tune, by
    its registry name) on an uploaded ``training_file``; a trainer runs it. ``method``:
    OpenAI's ``supervised`` hyperparameters, and neoxq's options under ``method.neoxq``
    (``lora`` or ``full``, LoRA rank, max length, checkpoint interval, ...)."""
    method = body.method
    hp = (method.supervised.hyperparameters if method and method.supervised
          else body.hyperparameters)
    options = method.neoxq if method and method.neoxq else None
    hp = hp or Hyperparameters()
    options = options or NeoxqTrainingOptions()

    def create(s: Any) -> FineTuningJob:
        _check_base(s, settings, body.model)
        _check_file(s, owner, body.training_file, "training_file")
        if body.validation_file:
            _check_file(s, owner, body.validation_file, "validation_file")
        job = create_job(session=s, owner=owner, model=body.model,
                         training_file=body.training_file,
                         validation_file=body.validation_file, suffix=body.suffix or None,
                         seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
                         hyperparameters=hp.model_dump(), options=options.model_dump(),
                         metadata=dict(body.metadata or {}))
        add_event(session=s, job_id=job.id, message=f"Validating training file: "
                  f"{body.training_file}" + (f" and validation file: {body.validation_file}"
                                             if body.validation_file else ""))
        return job

    db = request.app.state.db
    job = await run_in_threadpool(service.commit, db, create)

    # The files were checked line by line when they were uploaded; what is left to check
    # (tokens per example against max_length) needs the model's tokenizer: the trainer's.
    def queue(s: Any) -> FineTuningJob:
        if mark_queued(session=s, job_id=job.id):
            add_event(session=s, job_id=job.id,
                      message="Files validated, moving job to queued state")
        return get_job(session=s, job_id=job.id) or job

    job = await run_in_threadpool(service.commit, db, queue)
    await run_in_threadpool(_push, request, job.id)
    return render.fine_tuning_job(job)


@router.get("/jobs", response_model=FineTuningJobList)
def list_jobs_route(
    session: SessionDep, owner: OwnerDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> FineTuningJobList:
    """Your fine-tuning jobs, newest first; ``after`` a job id for the next page."""
    rows, more = list_jobs(session=session, owner=owner, after=after, limit=limit)
    return FineTuningJobList(data=[render.fine_tuning_job(j) for j in rows], has_more=more)


@router.get("/jobs/{job_id}", response_model=FineTuningJobObject)
def retrieve_job_route(job_id: str, session: SessionDep, owner: OwnerDep
                       ) -> FineTuningJobObject:
    """A fine-tuning job: its state, hyperparameters and, once it succeeded,
    ``fine_tuned_model`` (the name batches and workers use)."""
    return render.fine_tuning_job(_owned_job(session, job_id, owner))


@router.post("/jobs/{job_id}/cancel", response_model=FineTuningJobObject)
def cancel_job_route(job_id: str, session: SessionDep, owner: OwnerDep) -> FineTuningJobObject:
    """Cancel a job that has not finished (409 for one that has). A running job's trainer
    stops within a heartbeat (seconds)."""
    job = _owned_job(session, job_id, owner)
    if job.status in JOB_TERMINAL or not cancel_job(session=session, job_id=job.id):
        session.rollback()
        job = _owned_job(session, job_id, owner)
        raise ApiError(409, f"Cannot cancel a fine-tuning job that has {job.status}.",
                       code="job_not_cancellable")
    add_event(session=session, job_id=job.id, message="Fine-tuning job cancelled")
    session.commit()
    return render.fine_tuning_job(_owned_job(session, job_id, owner))


@router.get("/jobs/{job_id}/events", response_model=FineTuningEventList)
def list_events_route(
    job_id: str, session: SessionDep, owner: OwnerDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> FineTuningEventList:
    """A job's events, newest first: status messages, and one ``metrics`` event per
    logged training step (``data``: step, train_loss, valid_loss, lr, tokens_per_s)."""
    job = _owned_job(session, job_id, owner)
    rows, more = list_events(session=session, job_id=job.id, after=after, limit=limit)
    return FineTuningEventList(data=[render.fine_tuning_event(e) for e in rows], has_more=more)


@router.get("/jobs/{job_id}/checkpoints", response_model=FineTuningCheckpointList)
def list_checkpoints_route(
    job_id: str, session: SessionDep, owner: OwnerDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> FineTuningCheckpointList:
    """A job's checkpoints, newest first: step, train and validation loss."""
    job = _owned_job(session, job_id, owner)
    rows, more = list_checkpoints(session=session, job_id=job.id, after=after, limit=limit)
    data = [render.fine_tuning_checkpoint(c, job) for c in rows]
    return FineTuningCheckpointList(data=data, has_more=more,
                                    first_id=data[0].id if data else None,
                                    last_id=data[-1].id if data else None)
