"""Native batch routes: submit a JSONL file, poll, list, cancel, stream results/errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import render, service
from api.auth import OwnerDep, SessionDep, SettingsDep
from api.errors import ApiError
from api.schemas import BatchList, BatchStatus, WorkerList, WorkerOut
from api.streaming import ClosingStream
from api.uploads import (
    multipart_or_raw,
    remove,
    safe_filename,
    save_multipart,
    save_raw_body,
    upload_paths,
)
from core.jsonl import SAMPLING_FIELDS, SAMPLING_TYPES, check_defaults, text_problem
from specs.status import BatchStatus as BatchState  # (BatchStatus: the response schema)
from store.queries import list_workers
from store.tables import new_id
from store.views import create_file, list_batches

router = APIRouter(tags=["batches"])

JSONL = "application/x-ndjson"
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The JSONL file: a raw body, or a multipart form with a `file` part "
                       "(other form fields as the query parameters).",
        "content": {
            JSONL: {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}}}},
        },
    }
}


def _is_object_type(t: Any) -> bool:
    return get_origin(t) is dict or any(get_origin(a) is dict for a in get_args(t))


def _as_query_type(t: Any) -> Any:
    """A field's type as a query parameter or form field: a list stays a (repeatable)
    list; a union with a list (``stop: str | list[str]``) becomes the list; an object
    (``response_format``) is its JSON text."""
    if _is_object_type(t):
        return str
    args = [a for a in get_args(t) if get_origin(a) is list]
    return args[0] if args else t


# Submission options, from the query string or multipart form fields: the batch-level
# sampling defaults are every sampling field, taken from core (which takes them from
# specs/sampling.py) rather than listed again here.
BatchOptions: type[BaseModel] = create_model(
    "BatchOptions", __config__=ConfigDict(extra="forbid"),
    format=(Literal["auto", "native", "openai"], "auto"),
    model=(str | None, Field(None, max_length=200, description=(
        "the model to run on (native lines name none; default the deployment's "
        "NEOXQ_MODEL_NAME); OpenAI lines name theirs. Unknown names are refused"))),
    on_invalid=(Literal["refuse", "record"], Field(
        "refuse", description="refuse: one bad line refuses the file (nothing runs); record: "
                              "bad lines become item errors and the rest runs")),
    defaults=(str | None, Field(None, description="JSON object of sampling defaults")),
    metadata=(str | None, Field(None, description="JSON object of strings")),
    filename=(str | None, None),
    **{name: (_as_query_type(SAMPLING_TYPES[name]) | None, None)
       for name in sorted(SAMPLING_FIELDS)},
)
_LIST_OPTIONS = frozenset(name for name in SAMPLING_FIELDS
                          if get_origin(_as_query_type(SAMPLING_TYPES[name])) is list)
_JSON_OPTIONS = frozenset(name for name in SAMPLING_FIELDS
                          if _is_object_type(SAMPLING_TYPES[name]))


def _json_object(raw: str | None, param: str) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"{param}: a JSON object expected ({exc})", code="invalid_value",
                       param=param) from None
    except RecursionError:
        raise ApiError(400, f"{param}: a JSON object expected (nested too deeply)",
                       code="invalid_value", param=param) from None
    if not isinstance(value, dict):
        raise ApiError(400, f"{param}: a JSON object expected, got {type(value).__name__}",
                       code="invalid_value", param=param)
    return value


def check_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """OpenAI's metadata rules: at most 16 string pairs, keys <= 64, values <= 512 chars;
    and text the store can hold (no NUL, no lone surrogates). Checked before anything is
    stored or enqueued: a bad value must not reach the rows every listing reads."""
    if len(meta) > 16:
        raise ApiError(400, f"metadata: at most 16 keys, got {len(meta)}", code="invalid_value",
                       param="metadata")
    for k, v in meta.items():
        # The key names the field only when it is printable text itself.
        param = f"metadata.{k}" if len(k) <= 64 and text_problem(k) is None else "metadata"
        if not isinstance(v, str) or len(k) > 64 or len(v) > 512:
            raise ApiError(400, f"{param}: string keys of at most 64 and string values of "
                                "at most 512 characters expected", code="invalid_value",
                           param=param)
        why = text_problem(k) or text_problem(v)
        if why is not None:
            raise ApiError(400, f"{param}: {why}", code="invalid_value", param=param)
    return meta


def _options(opts: BatchOptions) -> tuple[dict[str, Any], dict[str, str]]:
    defaults = _json_object(opts.defaults, "defaults")
    for name in SAMPLING_FIELDS:
        value = getattr(opts, name)
        if value is not None:
            defaults[name] = _json_object(value, name) if name in _JSON_OPTIONS else value
    problems = check_defaults(defaults)
    if problems:
        raise ApiError(400, "; ".join(problems), code="invalid_value",
                       param=problems[0].split(":", 1)[0])
    return defaults, check_metadata(_json_object(opts.metadata, "metadata"))


def _form_options(query: BatchOptions, fields: list[tuple[str, str]]) -> BatchOptions:
    merged: dict[str, Any] = query.model_dump(exclude_none=True)
    merged.update({k: v for k, v in fields if k not in _LIST_OPTIONS})
    for name in _LIST_OPTIONS:  # repeated form fields, like repeated query parameters
        if values := [v for k, v in fields if k == name]:
            merged[name] = values
    try:
        return BatchOptions.model_validate(merged)
    except ValidationError as exc:
        e = exc.errors()[0]
        param = ".".join(str(p) for p in e["loc"])
        raise ApiError(400, f"{param}: {e['msg']}", code="invalid_value", param=param) from None


@contextmanager
def removing(tmp: Path) -> Iterator[None]:
    """Remove the temporary upload however the request ends: refused, failed or
    interrupted, it is not kept (a committed one was renamed away already)."""
    try:
        yield
    finally:
        remove(tmp)


@router.post("/batches", status_code=201, response_model=BatchStatus, openapi_extra=UPLOAD_BODY,
             responses={400: {"description": "refused: every bad line with its number"},
                        413: {"description": "file over the size limit"}})
async def create_batch(
    request: Request, owner: OwnerDep, settings: SettingsDep,
    opts: Annotated[BatchOptions, Query()],  # type: ignore[valid-type]
) -> BatchStatus:
    """Submit a JSONL file (native or OpenAI Batch lines): stored, validated line by line
    and enqueued. Batch-level sampling defaults (any sampling field, as a query parameter
    or form field, or all of them as ``defaults``) apply to fields a line leaves out."""
    if multipart_or_raw(request) == "raw":
        batch_defaults, meta = _options(opts)  # before reading the body: fail fast
    file_id = new_id("file-")
    tmp, final = upload_paths(settings.files_dir, file_id)
    limit = settings.max_file_bytes
    db = request.app.state.db
    with request.app.state.in_flight.hold(tmp), removing(tmp):
        if multipart_or_raw(request) == "multipart":
            size, name, fields = await save_multipart(request, tmp, limit=limit)
            opts = _form_options(opts, fields)
            batch_defaults, meta = _options(opts)
            name = opts.filename or name
        else:
            size = await save_raw_body(request, tmp, limit=limit)
            name = opts.filename or "upload.jsonl"
        name = safe_filename(name)

        def store_file(s: Session) -> None:  # with the batch, in its transaction
            create_file(session=s, owner=owner, filename=name, purpose="batch", size=size,
                        path=str(final), file_id=file_id)

        report = await run_in_threadpool(
            service.run_submission, db=db, settings=settings,
            enqueue=request.app.state.enqueue, path=tmp, owner=owner, fmt=opts.format,
            defaults=batch_defaults, metadata=meta, input_file_id=file_id,
            on_invalid=opts.on_invalid, with_batch=store_file, model=opts.model,
            on_commit=lambda: tmp.rename(final))  # committed: the content's final name
    batch, live = await run_in_threadpool(service.commit, db, lambda s: (service.owned_batch(
        s, report.batch_id, owner), service.live_generation(s, settings)))
    if batch.status == BatchState.FAILED and batch.errors:
        raise service.refusal(report)
    return render.native_batch(batch, **service.status_of(batch, live))


@router.get("/batches", response_model=BatchList)
def list_batches_route(
    session: SessionDep, owner: OwnerDep, settings: SettingsDep,
    after: Annotated[str | None, Query(max_length=64, description="a batch id: the page "
                                                                  "after it")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    """Your batches, newest first, a page at a time."""
    rows, more = list_batches(session=session, owner=owner, after=after, limit=limit)
    live = service.live_generation(session, settings)
    data = [render.native_batch(b, **service.status_of(b, live)) for b in rows]
    return BatchList(data=data, has_more=more, first_id=data[0].id if data else None,
                     last_id=data[-1].id if data else None)


@router.get("/batches/{batch_id}", response_model=BatchStatus)
def get_batch_route(batch_id: str, session: SessionDep, owner: OwnerDep,
                    settings: SettingsDep) -> BatchStatus:
    """A batch's state, counts, progress, tokens, current tokens/s, ETA and timestamps."""
    batch = service.owned_batch(session, batch_id, owner)
    live = service.live_generation(session, settings)
    return render.native_batch(batch, **service.status_of(batch, live))


@router.post("/batches/{batch_id}/cancel", response_model=BatchStatus)
def cancel_batch_route(batch_id: str, session: SessionDep, owner: OwnerDep,
                       settings: SettingsDep) -> BatchStatus:
    """Cancel a batch: workers stop its sequences within seconds; finished results stay."""
    batch = service.owned_batch(session, batch_id, owner)
    batch = service.cancel_batch(session=session, settings=settings, batch=batch)
    return render.native_batch(batch)


@router.get("/batches/{batch_id}/results", response_class=StreamingResponse,
            responses={200: {"content": {JSONL: {}}}})
def results_route(batch_id: str, request: Request, session: SessionDep,
                  owner: OwnerDep) -> StreamingResponse:
    """Results as JSONL in input order (partial while the batch runs): custom_id, index,
    line, text, finish_reason, usage, timings."""
    service.owned_batch(session, batch_id, owner)
    session.close()  # the stream reads with its own session; free this connection now
    return ClosingStream(service.stream_native_results(request.app.state.db, batch_id),
                         media_type=JSONL)


@router.get("/batches/{batch_id}/errors", response_class=StreamingResponse,
            responses={200: {"content": {JSONL: {}}}})
def errors_route(batch_id: str, request: Request, session: SessionDep,
                 owner: OwnerDep) -> StreamingResponse:
    """One JSONL line per failed item (or refused line): line number, field, reason."""
    service.owned_batch(session, batch_id, owner)
    session.close()  # the stream reads with its own session; free this connection now
    return ClosingStream(service.stream_native_errors(request.app.state.db, batch_id),
                         media_type=JSONL)


@router.get("/workers", response_model=WorkerList, tags=["workers"])
def workers_route(
    session: SessionDep, _owner: OwnerDep,
    seen_within: Annotated[float, Query(gt=0, le=30 * 86400,
                                        description="seconds since the last heartbeat")] = 3600,
) -> WorkerList:
    """Workers seen recently: host, model, devices, status, tokens/s, items done.

    Fleet-wide, not per key: workers serve every key's batches, so every key sees the
    same list (no batch ids, prompts or results are in it)."""
    rows = list_workers(session=session, seen_within=seen_within)
    return WorkerList(data=[WorkerOut(
        id=w.id, host=w.host, pid=w.pid, model=w.model, checkpoint=w.checkpoint,
        dtype=w.dtype, devices=list(w.devices or []),
        pipeline_parallel=w.pipeline_parallel, status=w.status, started_at=w.started_at,
        last_seen=w.last_seen, tokens_per_s=w.tokens_per_s, items_done=w.items_done,
        tokens_done=w.tokens_done, prefix_cache_hit_rate=w.prefix_cache_hit_rate,
        warmup_seconds=w.warmup_seconds)
        for w in rows])
