"""What the routes do, kept out of the routes: submitting a stored upload, cancelling,
and the streamed JSONL bodies (each opens its own session: a streamed response outlives
the request's session)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from api import render
from api.errors import ApiError, not_found
from core.payloads import ChunkPayload
from core.settings import Settings
from specs.status import CUT_SHORT, TERMINAL, BatchStatus, is_terminal
from store.db import make_sessionmaker, session_scope
from store.ingest import IngestReport, submit_batch
from store.queries import (
    batch_generation,
    finish_cancel,
    get_batch,
    live_workers,
    request_cancel,
)
from store.registry import known_models, live_model_names, waiting_reason
from store.tables import Batch, File
from store.views import iter_batch_results, iter_unrun_items

Enqueue = Callable[[ChunkPayload], None]


def run_submission(*, db: Engine, settings: Settings, enqueue: Enqueue, path: Path,
                   owner: str, fmt: str, defaults: dict[str, Any],
                   metadata: dict[str, Any], input_file_id: str, on_invalid: str,
                   endpoint: str | None = None, completion_window: str = "24h",
                   with_batch: Callable[[Session], None] | None = None,
                   on_commit: Callable[[], None] | None = None,
                   model: str | None = None) -> IngestReport:
    """Ingest a stored upload into a new batch and enqueue it (blocking: run in a thread).
    ``with_batch``/``on_commit`` as :func:`store.ingest.submit_batch`'s."""
    try:
        with path.open("rb") as source:
            return submit_batch(engine=db, source=source, owner=owner, fmt=fmt,  # type: ignore[arg-type]
                                endpoint=endpoint, defaults=defaults, metadata=metadata,
                                input_file_id=input_file_id, on_invalid=on_invalid,  # type: ignore[arg-type]
                                completion_window=completion_window, enqueue=enqueue,
                                settings=settings, with_batch=with_batch,
                                on_commit=on_commit, model=model)
    except ValueError as exc:  # bad batch-level defaults
        msg = str(exc)
        raise ApiError(400, msg, code="invalid_value", param=msg.split(":", 1)[0]) from None
    except FileNotFoundError:
        raise ApiError(404, "the input file's content is gone", code="not_found") from None
    except Exception as exc:  # the broker refused the chunks: the batch is marked failed
        if type(exc).__module__.split(".")[0] in ("kombu", "redis", "celery", "amqp"):
            raise ApiError(503, f"the queue is unavailable: {exc}",
                           code="queue_unavailable") from None
        raise


def refusal(report: IngestReport) -> ApiError:
    """The 400 for a refused file: every bad line (or the file-level reason) and the id of
    the failed batch that records them."""
    errors = [e.as_dict() for e in report.errors]
    first = report.errors[0] if report.errors else None
    if first is None:
        summary = "The file was refused."
    elif first.line == 0:  # the file as a whole: empty, too many lines
        summary = f"The file was refused: {first.message}."
    else:
        summary = (f"The file was refused: {report.invalid} bad line(s); first: {first}")
    return ApiError(400, summary, code=first.code if first else "invalid_file",
                    param=first.field if first else None, batch_id=report.batch_id,
                    errors=errors)


@dataclass(frozen=True)
class LiveView:
    """What the live workers do now: generation per batch, and the models they serve."""

    rates: dict[str, dict[str, float]]
    served: set[str]


def live_generation(session: Session, settings: Settings) -> LiveView:
    """What the live workers generate per batch (:func:`store.queries.batch_generation`)
    and which models they serve; read once per request, then :func:`status_of` for each
    batch shown."""
    within = settings.dead_worker_after
    return LiveView(rates=batch_generation(session=session, within=within),
                    served=live_model_names(session=session, within=within))


def status_of(batch: Batch, live: LiveView) -> dict[str, Any]:
    """The live figures of a batch, and why it waits if no live worker serves its model,
    as :func:`api.render.native_batch` takes them."""
    if is_terminal(batch.status):
        return {}
    return {**live.rates.get(batch.id, {}), "waiting": waiting_reason(batch.model, live.served)}


def owned_batch(session: Session, batch_id: str, owner: str) -> Batch:
    """The caller's batch, or 404 (also for another key's batch)."""
    batch = get_batch(session=session, batch_id=batch_id, owner=owner)
    if batch is None:
        raise not_found("batch", batch_id)
    return batch


def cancel_batch(*, session: Session, settings: Settings, batch: Batch) -> Batch:
    """Ask workers to cancel; with no live worker the API finishes the cancel itself
    (otherwise the batch would wait in ``cancelling`` for a worker that never comes)."""
    if batch.status in TERMINAL - {BatchStatus.CANCELLED}:
        raise ApiError(409, f"Cannot cancel a batch that is {batch.status}.",
                       code="batch_not_cancellable")
    request_cancel(session=session, batch_id=batch.id)
    live = live_workers(session=session, within=settings.dead_worker_after)
    if not live:
        finish_cancel(session=session, batch_id=batch.id)
    session.commit()
    return get_batch(session=session, batch_id=batch.id) or batch


def stream_native_results(db: Engine, batch_id: str) -> Iterator[bytes]:
    """Successful results in input order (partial while the batch runs)."""
    with make_sessionmaker(db)() as session:
        for item, result in iter_batch_results(session=session, batch_id=batch_id,
                                               failed=False):
            yield render.native_result_line(item, result)


def stream_native_errors(db: Engine, batch_id: str) -> Iterator[bytes]:
    """File-level errors, then failed items, in input order."""
    with make_sessionmaker(db)() as session:
        batch = session.get(Batch, batch_id)
        for e in (batch.errors if batch is not None else None) or []:
            if isinstance(e, dict):
                yield render.file_error_line(e)
        for item, result in iter_batch_results(session=session, batch_id=batch_id,
                                               failed=True):
            yield render.native_error_line(item, result)


def stream_virtual_file(db: Engine, f: File) -> Iterator[bytes]:
    """A batch's output or error file, rendered from its results in input order."""
    with make_sessionmaker(db)() as session:
        batch = session.get(Batch, f.batch_id) if f.batch_id else None
        if batch is None:
            return
        if f.purpose == "batch_output":
            for item, result in iter_batch_results(session=session, batch_id=batch.id,
                                                   failed=False):
                yield render.openai_output_line(batch, item, result)
            return
        for item, result in iter_batch_results(session=session, batch_id=batch.id,
                                               failed=True):
            yield render.openai_error_line(item, result)
        if batch.status in CUT_SHORT:
            code = "batch_cancelled" if batch.status == BatchStatus.CANCELLED \
                else "batch_expired"
            for item in iter_unrun_items(session=session, batch_id=batch.id):
                yield render.openai_error_line(item, None, unrun_code=code)


def stream_stored_file(path: Path, block: int = 1024 * 1024) -> Iterator[bytes]:
    """An uploaded file's bytes, 1 MiB at a time."""
    with path.open("rb") as f:
        while chunk := f.read(block):
            yield chunk


def commit(db: Engine, fn: Callable[[Session], Any]) -> Any:
    """Run ``fn(session)`` in its own committed transaction."""
    with session_scope(db) as session:
        return fn(session)


def check_model(session: Session, settings: Settings, model: str) -> None:
    """404 ``model_not_found`` (OpenAI's answer) for a name no worker has announced and no
    job registered: no worker would ever take the request."""
    known = known_models(session=session, default=settings.model_name)
    if model not in known:
        raise ApiError(404, f"The model {model!r} does not exist; known: "
                            f"{', '.join(sorted(known))}.", code="model_not_found",
                       param="model")
