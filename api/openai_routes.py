"""OpenAI-compatible Files and Batches (``/v1``): the official ``openai`` client, pointed
here with ``base_url``, runs its Batch flow unchanged. Object shapes, status names and
error shapes are OpenAI's; ``/v1/completions`` and ``/v1/chat/completions`` are the
valid endpoints."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api import render, service
from api.auth import OwnerDep, SessionDep, SettingsDep
from api.errors import ApiError, not_found
from api.fine_tuning import FINE_TUNE, check_training_file
from api.native import check_metadata, removing
from api.schemas import (
    CreateBatchRequest,
    FileDeleted,
    FileList,
    FileObject,
    ModelList,
    ModelObject,
    OpenAIBatch,
    OpenAIBatchList,
)
from api.streaming import ClosingStream
from api.uploads import save_multipart, upload_paths
from core.jsonl import OPENAI_URLS, quoted
from specs.status import CUT_SHORT, BatchStatus
from store.registry import ServedModel, served_models
from store.tables import new_id
from store.views import (
    create_file,
    delete_file,
    ensure_result_files,
    get_file,
    list_batches,
    list_files,
)

router = APIRouter(prefix="/v1", tags=["openai"])

FILE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file", "purpose"],
            "properties": {"file": {"type": "string", "format": "binary"},
                           "purpose": {"type": "string", "enum": ["batch"]}}}}},
    }
}


@router.post("/files", response_model=FileObject, openapi_extra=FILE_BODY,
             responses={413: {"description": "file over the size limit"}})
async def upload_file(request: Request, owner: OwnerDep, settings: SettingsDep) -> FileObject:
    """Upload a JSONL file with ``purpose=batch`` (streamed to disk; validated when a
    batch is created from it, as OpenAI does) or ``purpose=fine-tune`` (training data:
    checked line by line now, as ``neoxq finetune`` checks it; a file with bad lines is
    refused with every one listed)."""
    file_id = new_id("file-")
    tmp, final = upload_paths(settings.files_dir, file_id)
    with request.app.state.in_flight.hold(tmp), removing(tmp):
        size, name, fields = await save_multipart(request, tmp, limit=settings.max_file_bytes)
        purpose = dict(fields).get("purpose")
        if purpose not in ("batch", FINE_TUNE):
            raise ApiError(400, f"purpose: 'batch' or '{FINE_TUNE}' expected, got "
                                f"{quoted(purpose)}", code="invalid_value", param="purpose")
        if purpose == FINE_TUNE:
            refused = await run_in_threadpool(check_training_file, tmp)
            if refused is not None:
                raise refused
        f = await run_in_threadpool(service.commit, request.app.state.db, lambda s: create_file(
            session=s, owner=owner, filename=name, purpose=purpose, size=size,
            path=str(final), file_id=file_id))
        tmp.rename(final)  # committed: the content takes its final name
    return render.file_object(f)


@router.get("/files", response_model=FileList)
def list_files_route(
    session: SessionDep, owner: OwnerDep,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    """Your files, newest first (``order=asc`` for oldest first)."""
    rows, more = list_files(session=session, owner=owner, purpose=purpose, after=after,
                            limit=limit, ascending=order == "asc")
    data = [render.file_object(f) for f in rows]
    return FileList(data=data, has_more=more, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


@router.get("/files/{file_id}", response_model=FileObject)
def get_file_route(file_id: str, session: SessionDep, owner: OwnerDep) -> FileObject:
    """A file object."""
    f = get_file(session=session, file_id=file_id, owner=owner)
    if f is None:
        raise not_found("file", file_id)
    return render.file_object(f)


@router.delete("/files/{file_id}", response_model=FileDeleted)
def delete_file_route(file_id: str, session: SessionDep, owner: OwnerDep) -> FileDeleted:
    """Delete a file and its content (batches made from it keep their items)."""
    if not delete_file(session=session, file_id=file_id, owner=owner):
        raise not_found("file", file_id)
    session.commit()
    return FileDeleted(id=file_id, deleted=True)


@router.get("/files/{file_id}/content", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
def file_content(file_id: str, request: Request, session: SessionDep,
                 owner: OwnerDep) -> StreamingResponse:
    """A file's bytes: an upload as stored, or a batch's output/error file as JSONL in
    OpenAI's line shape (id, custom_id, response{status_code, request_id, body}, error)."""
    f = get_file(session=session, file_id=file_id, owner=owner)
    if f is None:
        raise not_found("file", file_id)
    session.close()  # the stream reads with its own session; free this connection now
    if f.path:
        from pathlib import Path

        path = Path(f.path)
        if not path.exists():
            raise ApiError(404, f"The content of file {file_id!r} is gone.", code="not_found")
        return ClosingStream(service.stream_stored_file(path),
                             media_type="application/octet-stream")
    return ClosingStream(service.stream_virtual_file(request.app.state.db, f),
                         media_type="application/octet-stream")


@router.post("/batches", response_model=OpenAIBatch)
async def create_batch(body: CreateBatchRequest, request: Request, owner: OwnerDep,
                       settings: SettingsDep) -> OpenAIBatch:
    """Create a batch from an uploaded file (``endpoint`` ``/v1/completions`` or
    ``/v1/chat/completions``, every line's ``url`` the same; ``completion_window=24h``).
    A file with bad lines gives a ``failed`` batch whose
    ``errors`` name every line and field, as OpenAI's validation does."""
    if body.endpoint not in OPENAI_URLS:
        raise ApiError(400, f"endpoint: {' or '.join(OPENAI_URLS)} expected (the endpoints "
                            f"served), got {body.endpoint!r}",
                       code="invalid_value", param="endpoint")
    if body.completion_window != "24h":
        raise ApiError(400, f"completion_window: '24h' expected, got {body.completion_window!r}",
                       code="invalid_value", param="completion_window")
    meta = check_metadata(dict(body.metadata or {}))
    db = request.app.state.db
    f = await run_in_threadpool(service.commit, db, lambda s: get_file(
        session=s, file_id=body.input_file_id, owner=owner))
    if f is None:
        raise not_found("file", body.input_file_id)
    if f.purpose != "batch" or not f.path:
        raise ApiError(400, f"input_file_id: a file with purpose 'batch' expected, "
                            f"got purpose {f.purpose!r}", code="invalid_value",
                       param="input_file_id")
    from pathlib import Path

    report = await run_in_threadpool(
        service.run_submission, db=db, settings=settings, enqueue=request.app.state.enqueue,
        path=Path(f.path), owner=owner, fmt="openai", defaults={}, metadata=meta,
        input_file_id=f.id, on_invalid="refuse", endpoint=body.endpoint,
        completion_window=body.completion_window)
    batch = await run_in_threadpool(service.commit, db, lambda s: service.owned_batch(
        s, report.batch_id, owner))
    return render.openai_batch(batch)


@router.get("/batches", response_model=OpenAIBatchList)
def list_batches_route(
    session: SessionDep, owner: OwnerDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> OpenAIBatchList:
    """Your batches, newest first; ``after`` a batch id for the next page."""
    rows, more = list_batches(session=session, owner=owner, after=after, limit=limit)
    data = [render.openai_batch(b) for b in rows]
    return OpenAIBatchList(data=data, has_more=more, first_id=data[0].id if data else None,
                           last_id=data[-1].id if data else None)


@router.get("/batches/{batch_id}", response_model=OpenAIBatch)
def get_batch_route(batch_id: str, session: SessionDep, owner: OwnerDep) -> OpenAIBatch:
    """A batch as OpenAI's Batch object (status, request_counts, file ids)."""
    batch = service.owned_batch(session, batch_id, owner)
    if batch.status in CUT_SHORT:
        batch = ensure_result_files(session=session, batch=batch)
        session.commit()
    return render.openai_batch(batch)


@router.post("/batches/{batch_id}/cancel", response_model=OpenAIBatch)
def cancel_batch_route(batch_id: str, session: SessionDep, owner: OwnerDep,
                       settings: SettingsDep) -> OpenAIBatch:
    """Cancel a batch (``cancelling``, then ``cancelled`` once workers have stopped it)."""
    batch = service.owned_batch(session, batch_id, owner)
    batch = service.cancel_batch(session=session, settings=settings, batch=batch)
    if batch.status == BatchStatus.CANCELLED:
        batch = ensure_result_files(session=session, batch=batch)
        session.commit()
    return render.openai_batch(batch)


def _model_object(m: ServedModel) -> ModelObject:
    return ModelObject(id=m.name, created=int(m.created_at), owned_by=m.owner, kind=m.kind,
                       parent=m.base, checkpoint=m.checkpoint, workers=len(m.workers),
                       dtypes=sorted({w.dtype for w in m.workers if w.dtype}),
                       pipeline_parallel=sorted({w.pipeline_parallel for w in m.workers}))


@router.get("/models", response_model=ModelList)
def list_models(
    session: SessionDep, _owner: OwnerDep, settings: SettingsDep,
    all_: Annotated[bool, Query(alias="all", description=(
        "every name a batch may ask for, served now or not (a batch for one that no "
        "live worker serves waits for one)"))] = False,
) -> ModelList:
    """The models live workers serve now: each with how many workers, their dtypes and
    pipeline sizes. Batches name one of these (or, with ``all``, any known name)."""
    models = served_models(session=session, within=settings.dead_worker_after,
                           default=settings.model_name, include_idle=all_)
    return ModelList(data=[_model_object(m) for m in models])


@router.get("/models/{model:path}", response_model=ModelObject)
def retrieve_model(model: str, session: SessionDep, _owner: OwnerDep,
                   settings: SettingsDep) -> ModelObject:
    """One known model (served now or not); 404 for a name the store does not know."""
    for m in served_models(session=session, within=settings.dead_worker_after,
                           default=settings.model_name, include_idle=True):
        if m.name == model:
            return _model_object(m)
    raise not_found("model", model)
